"""Single-step LSTM kernels for streaming (`LSTM.step`): one time step, no allocation.

A step kernel is three functions, bundled as a `StepKernel`:

``prepare(Wx, Wh, b) -> prepared``
    Rearrange one layer's weights (gate order i, f, o, g; Wx (D, 4H), Wh (H, 4H), b (4H,))
    into whatever the kernel reads fastest. Called once per layer; ``prepared`` is never
    written afterwards, so threads share it.
``new_buffers(prepared, h0, c0) -> buffers``
    Allocate everything one stream needs, starting from the states h0, c0 (B, H) (copied).
    ``buffers.h`` and ``buffers.c`` are (B, H) views holding the current states.
``step(prepared, buffers, x_t) -> None``
    Advance one time step: read x_t (B, D) and the states in ``buffers``, write h_t into
    ``buffers.h`` and c_t into ``buffers.c``. Must not allocate.

The NumPy kernel below is the one every backend falls back to. A backend module may offer a
faster one by defining a module-level ``STEP_KERNEL``; `get_step_kernel` finds it.
"""

import sys
from typing import Callable, NamedTuple

import numpy as np

from . import _backends, _threads

#: From this many stacked weights on, a NumPy step runs its product on one BLAS thread. A
#: one-row product is too small to share: on this 2-core machine under load, two OpenBLAS
#: threads made a D = H = 256 step 228 µs instead of 55 µs, and D = H = 512 1542 µs instead of
#: 125 µs. Below it the product does not split anyway (D = H = 128: 9.5 µs on 1 or 2 threads),
#: and pinning (`blas_threads`, 3.4 µs) would cost a third of the step.
ONE_BLAS_THREAD_FROM = 1 << 18


class StepKernel(NamedTuple):
    """The three functions of a single-step kernel (see the module docstring)."""

    prepare: Callable
    new_buffers: Callable
    step: Callable


def _numpy_prepare(Wx, Wh, b):
    """Stack [Wx; Wh; b] into one (D + H + 1, 4H) matrix, the i, f, o columns halved.

    One matrix product ``[x_t, h_prev, 1] @ W`` then gives the whole pre-activation: at B = 1
    each NumPy call costs ~0.3-6 µs, so one product instead of two products and two additions
    saves a third of a step. Halving the sigmoid columns lets one ``tanh`` serve all four gates:
    ``σ(a) = 0.5 + 0.5·tanh(a/2)``, and scaling by 0.5 is exact in binary floating point.
    """
    H = Wh.shape[0]
    stacked = np.concatenate([Wx, Wh, b[np.newaxis, :]], axis=0)
    stacked[:, : 3 * H] *= 0.5
    stacked.setflags(write=False)
    return stacked


class _NumpyStepBuffers:
    """One stream's buffers for the NumPy step kernel, with every view made once.

    xh : (B, D + H + 1) holds [x_t, h, 1]; ``h`` is a view of its middle block, so the new
    hidden state is written straight into next step's input. gates : (B, 4H) scratch.
    """

    __slots__ = ("xh", "x_in", "h", "c", "gates", "sigmoid_gates", "i", "f", "o", "g", "half")

    def __init__(self, prepared, h0, c0):
        B, H = h0.shape
        D = prepared.shape[0] - H - 1
        self.xh = np.empty((B, D + H + 1), prepared.dtype)
        self.x_in = self.xh[:, :D]
        self.h = self.xh[:, D : D + H]
        self.xh[:, D + H] = 1.0
        self.h[...] = h0
        self.c = np.array(c0, dtype=prepared.dtype, order="C")
        self.gates = np.empty((B, 4 * H), prepared.dtype)
        self.sigmoid_gates = self.gates[:, : 3 * H]
        self.i = self.gates[:, :H]
        self.f = self.gates[:, H : 2 * H]
        self.o = self.gates[:, 2 * H : 3 * H]
        self.g = self.gates[:, 3 * H :]
        # A 0-d array operand: a Python float would be converted (allocated) at every call.
        self.half = np.array(0.5, prepared.dtype)


def _numpy_step(prepared, buffers, x_t):
    """h, c <- LSTM step of (x_t, h, c), on one BLAS thread for large weights (see above)."""
    if prepared.size >= ONE_BLAS_THREAD_FROM:
        with _threads.blas_threads(1):
            _numpy_step_into(prepared, buffers, x_t)
    else:
        _numpy_step_into(prepared, buffers, x_t)


def _numpy_step_into(prepared, buffers, x_t):
    """h, c <- LSTM step of (x_t, h, c); every NumPy call writes into a preallocated buffer.

    Plain form: a = x_t @ Wx + h @ Wh + b; c = σ(a_f)·c + σ(a_i)·tanh(a_g); h = σ(a_o)·tanh(c).
    """
    buf = buffers
    np.copyto(buf.x_in, x_t)
    np.dot(buf.xh, prepared, out=buf.gates)
    np.tanh(buf.gates, out=buf.gates)  # tanh(a/2) for i, f, o (halved columns), tanh(a) for g
    np.multiply(buf.sigmoid_gates, buf.half, out=buf.sigmoid_gates)
    np.add(buf.sigmoid_gates, buf.half, out=buf.sigmoid_gates)  # σ(a) = 0.5 + 0.5·tanh(a/2)
    np.multiply(buf.f, buf.c, out=buf.c)
    np.multiply(buf.i, buf.g, out=buf.i)
    np.add(buf.c, buf.i, out=buf.c)
    np.tanh(buf.c, out=buf.g)
    np.multiply(buf.o, buf.g, out=buf.h)


NUMPY_STEP_KERNEL = StepKernel(_numpy_prepare, _NumpyStepBuffers, _numpy_step)


def get_step_kernel(backend):
    """The step kernel for ``backend`` (a name, or None for the best one available).

    A named backend must be available (else ValueError, as for `lstm_forward`); if it defines
    no ``STEP_KERNEL`` the NumPy kernel is used. None prefers a compiled backend's kernel
    (cython, then numba) and falls back to NumPy.
    """
    names = [backend] if backend is not None else list(reversed(_backends.available_backends()))
    for name in names:
        _backends.get_backend(name, (1, 1, 1, 1))
        module = sys.modules.get(_backends.BACKEND_MODULES[name])
        kernel = getattr(module, "STEP_KERNEL", None)
        if kernel is not None:
            return kernel
    return NUMPY_STEP_KERNEL
