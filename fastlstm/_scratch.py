"""Memory that kernel calls reuse instead of asking the system for it again.

Fresh arrays cost page faults: glibc gives freed blocks back to the system and the next call
faults them in again, one page at a time. A Cython forward+backward call at S1 faulted 348
pages (0.7 ms of kernel time, more than half the call), at S3 4000 (12 ms of CPU time); the
Numba one at S3 3649 (14 ms of system time in a 32 ms call). Two kinds of reuse:

- `scratch`: arrays only the kernels see (packed weights, gradients of the pre-activations),
  kept by the calling thread for its next call.
- `recycled`: arrays the caller gets (outputs, the forward cache, gradients), whose memory goes
  back to a small process-wide pool once the caller has dropped them. At S5 (84 MB of cached
  pre-activations) a forward+backward call faulted 4400 pages, 94 ms of system time.
"""

import ctypes
import math
import threading
import weakref

import numpy as np

#: Largest scratch array (bytes) a thread keeps for its next call.
SCRATCH_KEEP_BYTES = 128 << 20
#: Most bytes of dropped result blocks the pool keeps for reuse (the oldest go beyond it).
RECYCLE_KEEP_BYTES = 512 << 20
#: Smaller results come from NumPy: malloc reuses blocks below its mmap threshold itself.
RECYCLE_MIN_BYTES = 1 << 20
_ALIGN = 64

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
        array = aligned_empty(shape, dtype)
        if array.nbytes <= SCRATCH_KEEP_BYTES:
            arrays[name] = array
    return array


def aligned_empty(shape, dtype):
    """np.empty(shape, dtype) starting on a _ALIGN-byte (cache line) boundary.

    malloc aligns to 16 bytes. Elsewhere in a line, every 64-byte vector load of packed weights
    spans two cache lines, and where two threads write neighbouring ranges of one array (each
    its own hidden units) they share the line at the boundary at every step. Paired in one
    process against np.empty, float32, 2 threads: Cython forward S1 0.85x, S2 0.86x, forward+
    backward S1 0.95x, S2 0.94x; Numba 0.96-0.98x; S3 and B = 8 level.
    """
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    flat = np.empty(count + _ALIGN // dtype.itemsize, dtype)
    skip = -_address(flat) % _ALIGN // dtype.itemsize
    return flat[skip:skip + count].reshape(shape)


def _address(array):
    """Address of the first byte of a writeable, non-empty, C-contiguous array. (0.44 µs,
    where ``array.__array_interface__`` took 2.0 µs and ``array.ctypes.data`` 1.1 µs: a few
    arrays a call, measurable on short sequences.)"""
    return ctypes.addressof(ctypes.c_char.from_buffer(array))


def aligned_copy(a):
    """A C-contiguous copy of array `a` (same dtype) from `aligned_empty`."""
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


# Free blocks (1-D uint8 arrays), oldest first, and their total size. A block is released by
# a finalizer, which the garbage collector may run inside `_take` on the same thread: hence a
# reentrant lock, and `_take` finds its block again by identity after choosing it.
_pool_lock = threading.RLock()
_free = []
_free_bytes = 0


def recycled(shape, dtype):
    """An uninitialised C-contiguous array for a result the caller keeps (an output, the
    forward cache, a gradient). Its memory may have held an earlier result: once an array from
    here and every view of it are gone, its block returns to a pool (RECYCLE_KEEP_BYTES at
    most) for the next call rather than to the system. Below RECYCLE_MIN_BYTES: `aligned_empty`.
    """
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < RECYCLE_MIN_BYTES:
        return aligned_empty(shape, dtype)
    block = _take(nbytes + _ALIGN)
    if block is None:
        block = np.empty(nbytes + _ALIGN, np.uint8)
    start = -_address(block) % _ALIGN
    # An array over a memoryview rather than a view of `block`: NumPy makes every view of it
    # refer to it, so it lives exactly as long as the caller holds any part of the result.
    root = np.frombuffer(memoryview(block)[start:start + nbytes], dtype, count)
    release = weakref.finalize(root, _release, block)
    release.atexit = False
    return root.reshape(shape)


def _take(nbytes):
    """The smallest free block of nbytes to 2·nbytes, removed from the pool, or None."""
    global _free_bytes
    with _pool_lock:
        fits = [block for block in _free if nbytes <= block.nbytes <= 2 * nbytes]
        if not fits:
            return None
        best = min(fits, key=lambda block: block.nbytes)
        for i, block in enumerate(_free):
            if block is best:
                del _free[i]
                _free_bytes -= best.nbytes
                return best
        return None


def _release(block):
    global _free_bytes
    with _pool_lock:
        _free.append(block)
        _free_bytes += block.nbytes
        while _free_bytes > RECYCLE_KEEP_BYTES:
            _free_bytes -= _free.pop(0).nbytes
