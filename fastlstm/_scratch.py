"""Scratch arrays that a thread keeps from one kernel call to its next.

Fresh arrays cost page faults: glibc gives freed blocks back to the system and the next call
faults them in again, one page at a time. A Cython forward+backward call at S1 faulted 348
pages (0.7 ms of kernel time, more than half the call), at S3 4000 (12 ms of CPU time); the
Numba one at S3 3649 (14 ms of system time in a 32 ms call).
"""

import threading

import numpy as np

#: Largest scratch array (bytes) a thread keeps for its next call.
SCRATCH_KEEP_BYTES = 128 << 20

_kept = threading.local()


def scratch(name, shape, dtype):
    """An uninitialised array for a kernel's scratch (packed weights, gradients of the
    pre-activations), reused by this thread's next call that asks for the same name, shape and
    dtype. Each thread keeps one array per name (at most SCRATCH_KEEP_BYTES), so calls from
    several Python threads never share scratch; names start with the backend's.
    """
    arrays = getattr(_kept, "arrays", None)
    if arrays is None:
        arrays = _kept.arrays = {}
    array = arrays.get(name)
    if array is None or array.shape != shape or array.dtype != dtype:
        array = np.empty(shape, dtype)
        if array.nbytes <= SCRATCH_KEEP_BYTES:
            arrays[name] = array
    return array
