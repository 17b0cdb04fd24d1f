"""Numba backend: the LSTM time loop compiled, BLAS only for products with many rows.

Where the time goes, and what each part here does about it (DESIGN.md §6 has the measurements):

* Only ``h_{t-1} @ Wh`` (forward) and ``da_t @ Wh.T`` (backward) are sequential. dx, dWx and
  dWh are GEMMs after the loop, db a reduction.
* The gate update (σ, tanh, c and h) is fused into one pass per step. float32 uses a rational
  tanh that vectorizes (scalar ``math.tanh`` does not: no SVML in llvmlite); float64 keeps the
  exact functions, because the float64 tolerance is 1e-10.
* With several rows per thread, a forward step is one product [x_t, h_{t-1}, 1] @ [Wx; Wh; b]
  by register tiles written in LLVM IR ("Register tiles" below) over the stacked weights,
  packed once per call, and a BPTT step runs the same tiles over Wh.T: no input projection
  and no BLAS in the time loop (OpenBLAS per step repacked the weights at every call; S3
  forward 8.9 -> 6.6 ms, S5 336 -> 264 ms). With one row per thread, matrix-vector kernels
  (MATVEC_MAX_ROWS) after the input projection ``x @ Wx`` as one GEMM.
* Batch rows are independent for the whole sequence, so with several rows each thread takes
  a chunk of rows and runs the whole time loop on it: no synchronisation per step. (Splitting
  the hidden units across threads for every batch size, with a barrier per step, had better
  minima at S3/S4 but worse medians on cores shared with other work: a thread that is
  descheduled for a time slice stalls the other at every step.)
* With one row (H >= 128), the recurrent product is a matrix-vector product bound by the
  cache bandwidth for Wh (H=256: 1 MiB per step), so the hidden units are split across the
  threads (each core streams its share of Wh, packed once per call, from its own L2) inside
  one parallel region, with a cheap per-step barrier of our own ("Step barrier" below).

Threads: one owner of the cores per call. Numba's threads run everything, GEMMs included,
split by rows, with every BLAS single-threaded (`blas_threads(1)`): BLAS pools that spin
after a call starved Numba's threads 13x (DESIGN.md §6). `n_threads` sets Numba's count for
the call. Results depend only on the inputs and the thread count, never on timing.
"""

import itertools
import math
import os
from typing import NamedTuple

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (loaded now so the BLAS thread control sees it)
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._backends import Backend
from .._scratch import aligned_copy, aligned_empty, recycled, scratch
from .._step import StepKernel
from .._threads import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    NUMBA_POOL,
    OPENMP_TEAM,
    SoloBackoff,
    blas_threads,
    check_no_fork_conflict,
    fork_conflict,
    get_num_threads,
    note_started,
)

# --------------------------------------------------------------------------------------------
# Threading layer
# --------------------------------------------------------------------------------------------

#: Order of preference. 'workqueue' costs ~145 µs per parallel launch here (DESIGN.md §6), the
#: others 1.3–1.7 µs; 'omp' comes first because it is what was measured and it ships with
#: the Numba wheels (it needs libgomp), 'tbb' needs the separate tbb package.
_LAYER_PREFERENCE = ("omp", "tbb", "workqueue")
_LAYER_MODULES = {"omp": "omppool", "tbb": "tbbpool", "workqueue": "workqueue"}

def _load_layer(layer):
    """Import Numba's module for `layer` (loading its runtime); False if it cannot load."""
    # libgomp's wait policy is left as the user set it (OMP_WAIT_POLICY): forcing PASSIVE
    # here would apply to every library sharing the process's libgomp.so.1, and measured on
    # 2 idle cores it made torch's forward 10x slower (S1 0.43 -> 5.3 ms) and our own
    # kernels up to 2.5x slower (cython S1 0.34 -> 0.86 ms) for a gain only under heavy load.
    try:
        __import__(f"numba.np.ufunc.{_LAYER_MODULES[layer]}")
    except ImportError:
        return False
    return True


def _choose_threading_layer():
    """Ask Numba for the best layer that loads, unless the user chose one through the env."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    for layer in _LAYER_PREFERENCE:
        if _load_layer(layer):
            numba.config.THREADING_LAYER = layer
            return


_choose_threading_layer()

# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------

#: |x| above which tanh(x) is taken as tanh(±_TANH_CLAMP); float32 tanh(7.9) = 0.99999976.
_TANH_CLAMP = np.float32(7.9)
#: tanh(x) ≈ x·P(x²)/Q(x²) on [0, 7.9]; fitted here (Lawson-weighted linearised least squares,
#: minimax): 1.5e-8 max abs error in exact arithmetic, 3.4e-7 when evaluated in float32.
_TANH_P = tuple(np.float32(v) for v in (
    0.9999999230918841, 0.1297846342771903, 0.002985235026267957,
    9.877257553525392e-06, -1.4720258023640426e-08, 2.3617783115957472e-11,
))
_TANH_Q = tuple(np.float32(v) for v in (
    1.0, 0.46311764963073754, 0.02402483554506214, 0.00023714430336797948,
))
_P0, _P1, _P2, _P3, _P4, _P5 = _TANH_P
_Q0, _Q1, _Q2, _Q3 = _TANH_Q
_HALF32 = np.float32(0.5)
_ONE64 = 1.0


def tanh_act(x):
    """tanh(x) as the kernels compute it (float32: rational approximation; float64: exact)."""
    return np.tanh(x)


def sigmoid_act(x):
    """1 / (1 + exp(-x)) as the kernels compute it."""
    return 1.0 / (1.0 + np.exp(-x))


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def _tanh_float32(x):
    # Comparisons rather than min/max so that NaN falls through both and propagates.
    if x > _TANH_CLAMP:
        x = _TANH_CLAMP
    elif x < -_TANH_CLAMP:
        x = -_TANH_CLAMP
    s = x * x
    p = ((((_P5 * s + _P4) * s + _P3) * s + _P2) * s + _P1) * s + _P0
    q = ((_Q3 * s + _Q2) * s + _Q1) * s + _Q0
    return x * p / q


@overload(tanh_act, jit_options={"fastmath": {"contract"}})
def _tanh_act_impl(x):
    if x == numba.float32:
        return lambda x: _tanh_float32(x)
    return lambda x: np.tanh(x)


@overload(sigmoid_act, jit_options={"fastmath": {"contract"}})
def _sigmoid_act_impl(x):
    if x == numba.float32:
        # σ(x) = 1/2 + tanh(x/2)/2: one vectorizable rational instead of exp and a division.
        return lambda x: _HALF32 + _HALF32 * _tanh_float32(_HALF32 * x)
    return lambda x: _ONE64 / (_ONE64 + np.exp(-x))


# --------------------------------------------------------------------------------------------
# Compile options
# --------------------------------------------------------------------------------------------

#: 'numpy' error model: Python's division checks block vectorisation (5x on tanh). 'contract'
#: allows FMA, 'reassoc' vectorized reductions; no 'nnan'/'ninf', so NaN and Inf propagate.
#: Summation order depends only on the compiled code and on shapes, never on timing: results
#: are bit-identical run to run.
_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract", "reassoc"})

#: Hidden-unit ranges given to threads start at multiples of this (whole SIMD vectors).
UNIT_ALIGN = 16


# --------------------------------------------------------------------------------------------
# Step barrier for splitting one row's hidden units across threads
# --------------------------------------------------------------------------------------------
# A Numba parallel launch per step costs 1.3–5 µs here (more under load), longer than a whole
# B=1 step at H=128. Instead one parallel region runs all steps, and each step's parts are
# *claimed*: a thread claims its own part first (so each core keeps its share of Wh in its
# own L2), then any part nobody has claimed yet, then waits until every part of the step is
# done. A thread that starts late only finds its parts done by the other one.
#
# The 2 cores are shared with other work, so a thread can be descheduled for milliseconds
# while it holds a claim. A waiting thread therefore *helps*: once it has waited several
# times as long as its own part took, it computes the missing part itself. That is safe
# because every part writes only step-unique storage (no ring buffers in these kernels) and
# computes it with the same code from the same inputs, so a late duplicate writes the same
# bits; "done" is a per-(step, part) flag, so a duplicate finish counts once. Nothing ever
# waits for a thread that is not running: it can neither deadlock nor stall for a time slice.
#
# `claims` holds one counter per part, one cache line apart: the steps of that part claimed
# so far. `done[step * n_parts + part]` is 1 once that part of that step is written. (The
# atomic intrinsics take flat int64 arrays and one index.)

_SYNC_STRIDE = 16
#: A waiting thread helps after PATIENCE_FACTOR × (its own last part) + PATIENCE_CYCLES
#: (~7 µs; a kernel argument, so the tests can make every wait help).
PATIENCE_FACTOR = 4
PATIENCE_CYCLES = 20_000


def _array_item_pointer(context, builder, aryty, ary, idx):
    assert aryty.ndim == 1, "the atomic intrinsics take 1-D arrays"
    array = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, aryty, array, [idx], wraparound=False)


@intrinsic
def _atomic_compare_exchange(typingctx, ary, idx, expected, new):
    """If ary[idx] == expected, set it to new; True when this call made the change."""

    def codegen(context, builder, signature, args):
        ptr = _array_item_pointer(context, builder, signature.args[0], args[0], args[1])
        result = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(result, 1)

    return types.boolean(ary, idx, ary.dtype, ary.dtype), codegen


@intrinsic
def _atomic_load(typingctx, ary, idx):
    """ary[idx] read with acquire ordering (sees every write made before a finish)."""

    def codegen(context, builder, signature, args):
        ptr = _array_item_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return ary.dtype(ary, idx), codegen


@intrinsic
def _atomic_store(typingctx, ary, idx, value):
    """ary[idx] = value with release ordering (publishes every write made before it)."""

    def codegen(context, builder, signature, args):
        ptr = _array_item_pointer(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(ary, idx, ary.dtype), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once (llvm.fma). For a sum of two products, 'contract' lets LLVM fuse
    either one, and it chose differently when a kernel was compiled inside its caller than in
    the copy Numba caches: float32 results of compiling and loading processes differed."""

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty] * 3))
        return builder.call(fn, args)

    return a(a, a, a), codegen


@intrinsic
def _cycle_counter(typingctx):
    """The CPU's cycle counter (llvm.readcyclecounter; 0 where the target has none)."""

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic(
            "llvm.readcyclecounter", fnty=ir.FunctionType(ir.IntType(64), [])
        )
        return builder.call(fn, [])

    return types.int64(), codegen


@njit(**_JIT)
def _claim_part(claims, part, step):
    """True if this thread now owns `part` of `step` (nobody claimed it before)."""
    return _atomic_compare_exchange(claims, part * _SYNC_STRIDE, step, step + 1)


@njit(**_JIT)
def _mark_done(done, step, part, n_parts):
    _atomic_store(done, step * n_parts + part, 1)


@njit(**_JIT)
def _wait_done(done, step, part, n_parts, patience):
    """Wait for done[step, part]; False if `patience` cycles passed first (then help)."""
    index = step * n_parts + part
    start = _cycle_counter()
    while _atomic_load(done, index) == 0:
        if _cycle_counter() - start > patience:
            return False
    return True


def _new_sync(n_steps, n_parts):
    """(claims, done) for a split kernel of n_steps steps in n_parts parts."""
    claims = np.zeros(n_parts * _SYNC_STRIDE, np.int64)
    done = np.zeros(n_steps * n_parts, np.int64)
    return claims, done


# --------------------------------------------------------------------------------------------
# Register tiles
# --------------------------------------------------------------------------------------------
# BLAS called per step repacks the weights at every call, and a tiled loop in plain Numba,
# whose accumulators live in arrays, reached 50 GFLOP/s. The batch time loops therefore use a
# product tile written in LLVM IR: c (rows x 2 vectors) = a (rows x K) @ panel (K x 2 vectors),
# its 2·rows accumulators in registers for the whole k loop, over weights packed once per
# call. One thread, float32, K = 385, 6 rows x 32 columns, 1.5 MiB of weights: 115 GFLOP/s.

#: Bytes per vector of the tiles: 16 float32 or 8 float64 (one AVX-512 register; LLVM splits
#: it into two AVX2 registers, or four SSE ones, on other x86-64 CPUs).
VECTOR_BYTES = 64


def _tile_rows():
    """Rows per tile: with AVX-512, 12 accumulators + 2 weight vectors + a broadcast fit in its
    32 registers; otherwise a vector takes two (AVX2) registers of 16, so 2 rows."""
    if numba.config.CPU_NAME not in (None, "host"):
        return 2
    try:
        return 6 if binding.get_host_cpu_features().get("avx512f", False) else 2
    except Exception:  # no host feature query on this platform
        return 2


TILE_ROWS = _tile_rows()


class _VectorIR:
    """LLVM IR for the intrinsics below, on vectors of VECTOR_BYTES of one float type: element
    pointers of array arguments, vector loads and stores at element indices, splats and fused
    multiply-adds."""

    def __init__(self, context, builder, dtype):
        self.context, self.builder = context, builder
        scalar = context.get_value_type(dtype)
        self.itemsize = context.get_abi_sizeof(scalar)
        self.width = VECTOR_BYTES // self.itemsize
        self.vec = ir.VectorType(scalar, self.width)
        self.intp = context.get_value_type(types.intp)
        self.zero = ir.Constant(self.vec, [ir.Constant(scalar, 0.0)] * self.width)
        self._undef = ir.Constant(self.vec, ir.Undefined)
        self._splat = ir.Constant(ir.VectorType(ir.IntType(32), self.width), [0] * self.width)
        self._fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.vec, [self.vec] * 3),
            f"llvm.fma.v{self.width}f{8 * self.itemsize}")

    def const(self, value):
        return ir.Constant(self.intp, value)

    def data(self, array_type, array):
        return self.context.make_array(array_type)(self.context, self.builder, array).data

    def _at(self, ptr, index):
        return self.builder.bitcast(self.builder.gep(ptr, [index]), self.vec.as_pointer())

    def load(self, ptr, index):
        return self.builder.load(self._at(ptr, index), align=self.itemsize)

    def store(self, value, ptr, index):
        self.builder.store(value, self._at(ptr, index), align=self.itemsize)

    def broadcast(self, ptr, index):
        """The element at ptr[index] in every lane."""
        value = self.builder.load(self.builder.gep(ptr, [index]))
        value = self.builder.insert_element(self._undef, value, ir.Constant(ir.IntType(32), 0))
        return self.builder.shuffle_vector(value, self._undef, self._splat)

    def accumulate(self, acc, a, b):
        """acc (an entry-block slot, promoted to a register by mem2reg) += a · b, fused."""
        self.builder.store(self.builder.call(self._fma, [a, b, self.builder.load(acc)]), acc)

    def accumulators(self, count):
        return [cgutils.alloca_once_value(self.builder, self.zero) for _ in range(count)]


def _make_tile(rows):
    """An intrinsic ``tile(K, a, a_off, lda, panel, p_off, c, c_off, c_hi, ldc)`` for `rows`
    rows: with s[r, j] = Σ_{k < K} a[a_off + r·lda + k] · panel[p_off + k·2V + j] (j < 2V),

    c[c_off + r·ldc + j] = s[r, j],  c[c_off + c_hi + r·ldc + j] = s[r, V + j]   (j < V)

    a, panel and c are 1-D arrays of one float type, V = VECTOR_BYTES / itemsize; the caller
    keeps every index in bounds (no checks in here). Multiply-adds are fused (llvm.fma).
    """

    @intrinsic
    def tile(typingctx, K, a, a_off, lda, panel, p_off, c, c_off, c_hi, ldc):
        sig = types.void(types.intp, a, types.intp, types.intp, panel, types.intp, c,
                         types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            K, a, a_off, lda, panel, p_off, c, c_off, c_hi, ldc = args
            v = _VectorIR(context, builder, signature.args[1].dtype)
            a_ptr = v.data(signature.args[1], a)
            p_ptr = v.data(signature.args[4], panel)
            c_ptr = v.data(signature.args[6], c)
            accs = v.accumulators(2 * rows)
            a_rows = [builder.add(a_off, builder.mul(v.const(r), lda)) for r in range(rows)]
            with cgutils.for_range(builder, K) as loop:
                k = loop.index
                at = builder.add(p_off, builder.mul(k, v.const(2 * v.width)))
                w_lo = v.load(p_ptr, at)
                w_hi = v.load(p_ptr, builder.add(at, v.const(v.width)))
                for r in range(rows):
                    s = v.broadcast(a_ptr, builder.add(a_rows[r], k))
                    v.accumulate(accs[2 * r], s, w_lo)
                    v.accumulate(accs[2 * r + 1], s, w_hi)
            for r in range(rows):
                at = builder.add(c_off, builder.mul(v.const(r), ldc))
                v.store(builder.load(accs[2 * r]), c_ptr, at)
                v.store(builder.load(accs[2 * r + 1]), c_ptr, builder.add(at, c_hi))
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile1, _tile2, _tile3, _tile4, _tile5, _tile6 = (_make_tile(rows) for rows in range(1, 7))


@njit(**_JIT)
def _tile(rows, K, a, a_off, lda, panel, p_off, c, c_off, c_hi, ldc):
    """`_make_tile`'s tile for 1 <= rows <= 6."""
    if rows == 6:
        _tile6(K, a, a_off, lda, panel, p_off, c, c_off, c_hi, ldc)
    elif rows == 5:
        _tile5(K, a, a_off, lda, panel, p_off, c, c_off, c_hi, ldc)
    elif rows == 4:
        _tile4(K, a, a_off, lda, panel, p_off, c, c_off, c_hi, ldc)
    elif rows == 3:
        _tile3(K, a, a_off, lda, panel, p_off, c, c_off, c_hi, ldc)
    elif rows == 2:
        _tile2(K, a, a_off, lda, panel, p_off, c, c_off, c_hi, ldc)
    else:
        _tile1(K, a, a_off, lda, panel, p_off, c, c_off, c_hi, ldc)


def _make_vecmat(vectors):
    """An intrinsic ``vecmat(K, v, v_off, panel, p_off, out, o_off, o_stride)``:

    out[o_off + q·o_stride + j] = Σ_{k < K} v[v_off + k] · panel[p_off + (k·Q + q)·V + j]

    for q < Q = `vectors`, j < V = VECTOR_BYTES / itemsize: one row times a panel of Q vectors
    per k. The k loop is unrolled 8 / Q times with separate accumulators (8 independent chains
    hide the FMA latency; one row has no other rows to interleave), summed in a fixed order.
    """
    unroll = max(1, 8 // vectors)

    @intrinsic
    def vecmat(typingctx, K, v, v_off, panel, p_off, out, o_off, o_stride):
        sig = types.void(types.intp, v, types.intp, panel, types.intp, out, types.intp,
                         types.intp)

        def codegen(context, builder, signature, args):
            K, row, v_off, panel, p_off, out, o_off, o_stride = args
            v = _VectorIR(context, builder, signature.args[1].dtype)
            r_ptr = v.data(signature.args[1], row)
            p_ptr = v.data(signature.args[3], panel)
            o_ptr = v.data(signature.args[5], out)
            accs = [v.accumulators(vectors) for _ in range(unroll)]

            def step(k, chain):
                s = v.broadcast(r_ptr, builder.add(v_off, k))
                at = builder.add(p_off, builder.mul(k, v.const(vectors * v.width)))
                for q in range(vectors):
                    v.accumulate(accs[chain][q], s,
                                 v.load(p_ptr, builder.add(at, v.const(q * v.width))))

            blocks = builder.sdiv(K, v.const(unroll))
            with cgutils.for_range(builder, blocks) as loop:
                k0 = builder.mul(loop.index, v.const(unroll))
                for chain in range(unroll):
                    step(builder.add(k0, v.const(chain)), chain)
            with cgutils.for_range_slice(builder, builder.mul(blocks, v.const(unroll)), K,
                                         v.const(1)) as (k, _):
                step(k, 0)
            for q in range(vectors):
                total = builder.load(accs[0][q])
                for chain in range(1, unroll):
                    total = builder.fadd(total, builder.load(accs[chain][q]))
                v.store(total, o_ptr, builder.add(o_off, builder.mul(v.const(q), o_stride)))
            return context.get_dummy_value()

        return sig, codegen

    return vecmat


@intrinsic
def _copy_vector(typingctx, src, s_off, dst, d_off):
    """dst[d_off:d_off + V] = src[s_off:s_off + V] as one vector load and store. (Slice copies
    of 16 values packed S1's Wh at 0.73 ns a value, half of it in 23.9 µs; this, 4.0 µs.)"""
    sig = types.void(src, types.intp, dst, types.intp)

    def codegen(context, builder, signature, args):
        src, s_off, dst, d_off = args
        v = _VectorIR(context, builder, signature.args[0].dtype)
        v.store(v.load(v.data(signature.args[0], src), s_off), v.data(signature.args[2], dst),
                d_off)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _transpose_vectors(typingctx, src, s_off, lds, dst, d_off, ldd):
    """dst[d_off + c·ldd + r] = src[s_off + r·lds + c] for r, c < V: one V x V tile through
    registers. Each of log2(V) rounds pairs rows i and i + s (bit s of i clear) and swaps
    their off-diagonal s x s blocks, i.e. bit s of the row number with bit s of the lane.
    (Value by value, S1's Wh.T took 20 µs on one thread.)"""
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src, s_off, lds, dst, d_off, ldd = args
        v = _VectorIR(context, builder, signature.args[0].dtype)
        s_ptr, d_ptr = v.data(signature.args[0], src), v.data(signature.args[3], dst)
        V = v.width
        rows = [v.load(s_ptr, builder.add(s_off, builder.mul(v.const(i), lds)))
                for i in range(V)]
        lanes = ir.VectorType(ir.IntType(32), V)
        s = V // 2
        while s:
            # lanes of the pair (a, b) as shuffle_vector numbers them: b's from V on
            low = ir.Constant(lanes, [V + k - s if k & s else k for k in range(V)])
            high = ir.Constant(lanes, [V + k if k & s else k + s for k in range(V)])
            for i in range(V):
                if not i & s:
                    a, b = rows[i], rows[i + s]
                    rows[i] = builder.shuffle_vector(a, b, low)
                    rows[i + s] = builder.shuffle_vector(a, b, high)
            s //= 2
        for i in range(V):
            v.store(rows[i], d_ptr, builder.add(d_off, builder.mul(v.const(i), ldd)))
        return context.get_dummy_value()

    return sig, codegen


#: One row times a panel of the four gates of V hidden units per k (the one-row forward step).
_vecmat_gates = _make_vecmat(4)
#: One row times a `_pack_transposed` panel of 2V hidden units per k (the one-row BPTT step).
_vecmat_panel = _make_vecmat(2)


@njit(**_JIT)
def _next_tile_rows(rows_left):
    """Rows of the next tile: the rows left spread evenly over the fewest tiles."""
    tiles = (rows_left + TILE_ROWS - 1) // TILE_ROWS
    return (rows_left + tiles - 1) // tiles


#: Rows of the source matrix per pass of the packing loops: a pass's rows stay in L2 while
#: every block reads from them (a block's column strip down all rows is a new page per row).
PACK_ROWS = 64


@njit(**_JIT)
def _pack_stacked(Wx, Wh, b, packed, blk_lo, blk_hi):
    """Arrange [Wx; Wh; b] (K = D + H + 1 rows of 4H) for the forward tiles, blocks
    blk_lo..blk_hi-1 of V hidden units (V = VECTOR_BYTES / itemsize):

    packed[((blk·2 + half)·K + k)·2V + q2·V + j] = stacked[k, (2·half + q2)·H + blk·V + j],
    0 past H: per block, K rows of the i and f gates' V columns, then K rows of o and g.
    """
    D, H = Wx.shape[0], Wh.shape[0]
    K = D + H + 1
    V = VECTOR_BYTES // Wx.itemsize
    for k0 in range(0, K, PACK_ROWS):
        for blk in range(blk_lo, blk_hi):
            u = blk * V
            n = min(V, H - u)
            for half in range(2):
                for k in range(k0, min(K, k0 + PACK_ROWS)):
                    if k < D:
                        row = Wx[k]
                    elif k < D + H:
                        row = Wh[k - D]
                    else:
                        row = b
                    start = ((blk * 2 + half) * K + k) * 2 * V
                    if n == V:
                        _copy_vector(row, 2 * half * H + u, packed, start)
                        _copy_vector(row, (2 * half + 1) * H + u, packed, start + V)
                        continue
                    out = packed[start:start + 2 * V]
                    for q2 in range(2):
                        src = row[(2 * half + q2) * H + u:(2 * half + q2) * H + u + n]
                        for j in range(n):
                            out[q2 * V + j] = src[j]
                        for j in range(n, V):
                            out[q2 * V + j] = 0


@njit(**_JIT)
def _pack_transposed(Wh, packed_t, blk_lo, blk_hi):
    """Arrange Wh.T (4H rows of H) for the backward tiles, blocks blk_lo..blk_hi-1 of 2V
    hidden units: packed_t[(blk·4H + g)·2V + j] = Wh[blk·2V + j, g], 0 past H. Whole V x V
    tiles by `_transpose_vectors`, the edges value by value."""
    H, G = Wh.shape
    V = VECTOR_BYTES // Wh.itemsize
    width = 2 * V
    flat = Wh.reshape(-1)
    full_g = G // V * V
    for blk in range(blk_lo, blk_hi):
        n = min(width, H - blk * width)
        panel = packed_t[blk * G * width:(blk + 1) * G * width].reshape(G, width)
        for j0 in range(0, n - V + 1, V):
            for g0 in range(0, full_g, V):
                _transpose_vectors(flat, (blk * width + j0) * G + g0, G, packed_t,
                                   (blk * G + g0) * width + j0, width)
        full_j = n // V * V
        for j in range(width):
            column = panel[:, j]
            if j >= n:
                column[:] = 0
                continue
            src = Wh[blk * width + j]
            for g in range(0 if j >= full_j else full_g, G):
                column[g] = src[g]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _matvec_columns(vec, W, out, lo, hi):
    """out[lo:hi] = vec @ W[:, lo:hi]   (vec: (K,), W: (K, N), out: (N,)).

    Row-by-row axpy over a contiguous column range, four rows per pass so the partial sums in
    ``out`` are loaded and stored once per four FMAs. Slices starting at 0 (not offsets from
    ``lo``) let LLVM see that indices are non-negative; without that it kept the scalar loop.
    """
    K = vec.shape[0]
    acc = out[lo:hi]
    n = acc.shape[0]
    for m in range(n):
        acc[m] = 0
    k = 0
    while k + 4 <= K:
        v0, v1, v2, v3 = vec[k], vec[k + 1], vec[k + 2], vec[k + 3]
        w0, w1, w2, w3 = W[k, lo:hi], W[k + 1, lo:hi], W[k + 2, lo:hi], W[k + 3, lo:hi]
        for m in range(n):
            acc[m] += v0 * w0[m] + v1 * w1[m] + v2 * w2[m] + v3 * w3[m]
        k += 4
    while k < K:
        v0 = vec[k]
        w0 = W[k, lo:hi]
        for m in range(n):
            acc[m] += v0 * w0[m]
        k += 1


@njit(**_JIT)
def _matvec_rows(W, vec, out, lo, hi):
    """out[lo:hi] = W[lo:hi] @ vec   (W: (N, K), vec: (K,), out: (N,)).

    One dot product per row of the natural (untransposed) matrix, four rows per pass so each
    load of ``vec`` feeds four FMAs; 'reassoc' lets LLVM vectorize the sums.
    """
    K = vec.shape[0]
    k = lo
    while k + 4 <= hi:
        w0, w1, w2, w3 = W[k], W[k + 1], W[k + 2], W[k + 3]
        s0 = s1 = s2 = s3 = vec[0] - vec[0]
        for m in range(K):
            v = vec[m]
            s0 += w0[m] * v
            s1 += w1[m] * v
            s2 += w2[m] * v
            s3 += w3[m] * v
        out[k], out[k + 1], out[k + 2], out[k + 3] = s0, s1, s2, s3
        k += 4
    while k < hi:
        w0 = W[k]
        s0 = vec[0] - vec[0]
        for m in range(K):
            s0 += w0[m] * vec[m]
        out[k] = s0
        k += 1


@njit(**_JIT)
def _cell_forward(pre, stride, xproj_row, x_off, x_stride, b, c_prev, j0, n, gates_row, c_row,
                  tanh_c_row, h_row):
    """Gate update for hidden units j0 .. j0+n-1 of one batch row, `_cell_update` of the
    pre-activations ``a[gate, j] = pre[gate*stride + j - j0] + xproj_row[x_off + gate*x_stride
    + j - j0] + b[gate*H + j]`` (``pre`` holds h_{t-1} @ Wh, and receives a)."""
    H = c_prev.shape[0]
    for gate in range(4):
        a = pre[gate * stride:gate * stride + n]
        x_part = xproj_row[x_off + gate * x_stride:x_off + gate * x_stride + n]
        b_part = b[gate * H + j0:gate * H + j0 + n]
        for u in range(n):
            a[u] = a[u] + x_part[u] + b_part[u]
    _cell_update(pre, stride, j0, n, c_prev, gates_row, c_row, tanh_c_row, h_row)


@njit(**_JIT)
def _forward_rows(xproj, b, Wh, r0, r1, hs, cells, gates, tanh_cells):
    """The whole time loop for batch rows r0..r1-1 (rows are independent of each other), one
    `_matvec_columns` per row and step (few rows; see `_forward_rows_tiled` for more).

    xproj: (T, B, 4H) = x @ Wx;  hs: (T+1, B, H), h0 in slot 0, h_t written to slot t+1;
    cells: (Tc, B, H), c0 in slot 0, c_t written to slot (t+1) % Tc;  gates: (Tg, B, 4H) and
    tanh_cells: (Tg, B, H), step t in slot t % Tg.
    """
    T = xproj.shape[0]
    H = hs.shape[2]
    Tc = cells.shape[0]
    Tg = gates.shape[0]
    pre = np.empty((r1 - r0, 4 * H), dtype=xproj.dtype)
    for t in range(T):
        for r in range(r0, r1):
            _matvec_columns(hs[t, r], Wh, pre[r - r0], 0, 4 * H)
        for r in range(r0, r1):
            _cell_forward(pre[r - r0], H, xproj[t, r], 0, H, b, cells[t % Tc, r], 0, H,
                          gates[t % Tg, r], cells[(t + 1) % Tc, r], tanh_cells[t % Tg, r],
                          hs[t + 1, r])


@njit(**_JIT)
def _cell_update(pre, stride, j0, n, c_prev, gates_row, c_row, tanh_c_row, h_row):
    """Gate update for hidden units j0 .. j0+n-1 of one row from their pre-activations
    a[gate, j] = pre[gate·stride + j - j0]. Writes the activated gates (natural layout i, f, o,
    g), c_t, tanh(c_t) and h_t."""
    H = c_prev.shape[0]
    a_i, a_f = pre[:n], pre[stride:stride + n]
    a_o, a_g = pre[2 * stride:2 * stride + n], pre[3 * stride:3 * stride + n]
    out_i, out_f = gates_row[j0:j0 + n], gates_row[H + j0:H + j0 + n]
    out_o, out_g = gates_row[2 * H + j0:2 * H + j0 + n], gates_row[3 * H + j0:3 * H + j0 + n]
    c_old, c_out = c_prev[j0:j0 + n], c_row[j0:j0 + n]
    tanh_c_out, h_out = tanh_c_row[j0:j0 + n], h_row[j0:j0 + n]
    for u in range(n):
        i = sigmoid_act(a_i[u])
        f = sigmoid_act(a_f[u])
        o = sigmoid_act(a_o[u])
        g = tanh_act(a_g[u])
        c = _fma(f, c_old[u], i * g)
        tanh_c = tanh_act(c)
        out_i[u] = i
        out_f[u] = f
        out_o[u] = o
        out_g[u] = g
        c_out[u] = c
        tanh_c_out[u] = tanh_c
        h_out[u] = o * tanh_c


@njit(**_JIT)
def _forward_rows_tiled(x, packed, r0, r1, hs, cells, gates, tanh_cells):
    """The whole time loop for batch rows r0..r1-1: per step one product [x_t, h_{t-1}, 1] @
    [Wx; Wh; b] by `_tile` over `_pack_stacked`'s panels, block by block of V hidden units
    (each block's panels stay in cache for all the rows), then each row's gate update over all
    its units. Arrays as in `_forward_rows` (x: (T, B, D)); no input projection.

    The tiles write whole vectors, so the pre-activations have Hp = (blocks)·V columns per gate.
    (A gate update per block and row, while its tiles were in L1, cost 2.9 of 16.2 ms at S3 on
    one thread; over whole rows the loop vectorizes without per-call overhead.)
    """
    T, _, D = x.shape
    H = hs.shape[2]
    K = D + H + 1
    V = VECTOR_BYTES // x.itemsize
    n_blocks = (H + V - 1) // V
    Hp = n_blocks * V
    Tc = cells.shape[0]
    Tg = gates.shape[0]
    rows = r1 - r0
    xh = np.empty(rows * K, dtype=x.dtype)
    pre = np.empty(rows * 4 * Hp, dtype=x.dtype)
    for r in range(rows):
        xh[r * K + K - 1] = 1
    for t in range(T):
        for r in range(rows):
            xh[r * K:r * K + D] = x[t, r0 + r]
            xh[r * K + D:r * K + D + H] = hs[t, r0 + r]
        for blk in range(n_blocks):
            w_if = blk * K * 4 * V
            r = 0
            while r < rows:
                mr = _next_tile_rows(rows - r)
                at = r * 4 * Hp + blk * V
                _tile(mr, K, xh, r * K, K, packed, w_if, pre, at, Hp, 4 * Hp)
                _tile(mr, K, xh, r * K, K, packed, w_if + K * 2 * V, pre, at + 2 * Hp, Hp,
                      4 * Hp)
                r += mr
        for r in range(rows):
            row = r0 + r
            _cell_update(pre[r * 4 * Hp:(r + 1) * 4 * Hp], Hp, 0, H, cells[t % Tc, row],
                         gates[t % Tg, row], cells[(t + 1) % Tc, row], tanh_cells[t % Tg, row],
                         hs[t + 1, row])


@njit(**_JIT)
def _matmul_row_range(A, B, out, part, n_parts):
    """out[rows] = A[rows] @ B for the part-th of n_parts contiguous row ranges."""
    M = A.shape[0]
    r0 = part * M // n_parts
    r1 = (part + 1) * M // n_parts
    if r1 > r0:
        np.dot(A[r0:r1], B, out[r0:r1])


@njit(parallel=True, **_JIT)
def _matmul_rows(A, B, out, n_parts):
    """out = A @ B with the rows split over n_parts threads, single-threaded BLAS in each."""
    for part in prange(n_parts):
        _matmul_row_range(A, B, out, part, n_parts)


@njit(parallel=True, **_JIT)
def _matmul_transposed_partials(A, B, partials):
    """partials[p] = A[rows_p].T @ B[rows_p]: A.T @ B = partials.sum(0), rows split over threads.

    Splitting the reduction (the rows) keeps every operand contiguous; the partial sums are
    added in a fixed order, so the result depends on the thread count but not on timing.
    """
    n_parts = partials.shape[0]
    M = A.shape[0]
    for part in prange(n_parts):
        r0 = part * M // n_parts
        r1 = (part + 1) * M // n_parts
        if r1 > r0:
            np.dot(A[r0:r1].T, B[r0:r1], partials[part])
        else:
            partials[part] = 0


@njit(**_JIT)
def _pack_columns(A, panels, p_lo, p_hi):
    """Column panels p_lo..p_hi-1 of A (M, N), 2V wide, zero past N:
    panels[(p·M + k)·2V + j] = A[k, p·2V + j] (the `_tile` panel of the product X @ A)."""
    M, N = A.shape
    width = 2 * (VECTOR_BYTES // A.itemsize)
    for p in range(p_lo, p_hi):
        n = min(width, N - p * width)
        for k in range(M):
            out = panels[(p * M + k) * width:(p * M + k + 1) * width]
            src = A[k, p * width:p * width + n]
            for j in range(n):
                out[j] = src[j]
            for j in range(n, width):
                out[j] = 0


@njit(**_JIT)
def _product_panels(a, panels, K, out, p_lo, p_hi, tile, accumulate=False):
    """out[:, panel columns] (+)= a (rows, K) @ P for panels p_lo..p_hi-1 of P (K rows, panels
    as `_pack_columns` lays them out), by `_tile`, added to out's values with accumulate; tile:
    scratch of TILE_ROWS·2V values."""
    rows, N = out.shape
    width = 2 * (VECTOR_BYTES // out.itemsize)
    a_flat, out_flat = a.reshape(-1), out.reshape(-1)
    for p in range(p_lo, p_hi):
        n = min(width, N - p * width)
        r = 0
        while r < rows:
            mr = _next_tile_rows(rows - r)
            if n == width and not accumulate:  # straight into out
                _tile(mr, K, a_flat, r * K, K, panels, p * K * width, out_flat,
                      r * N + p * width, width // 2, N)
            else:  # through the scratch tile: to add, or where vectors reach past N
                _tile(mr, K, a_flat, r * K, K, panels, p * K * width, tile, 0, width // 2, width)
                for i in range(mr):
                    if accumulate:
                        out[r + i, p * width:p * width + n] += tile[i * width:i * width + n]
                    else:
                        out[r + i, p * width:p * width + n] = tile[i * width:i * width + n]
            r += mr


def _tiled_gradients_size(M, D, H, itemsize):
    """Scratch values of `_weight_gradients_tiled` for chunks of M rows: Wx.T in panels, and a
    chunk's da in panels, x.T and h_prev.T."""
    width = 2 * (VECTOR_BYTES // itemsize)
    G = 4 * H
    return (D + width - 1) // width * G * width + (G + width - 1) // width * M * width + (D + H) * M


@njit(parallel=True, **_JIT)
def _weight_gradients_tiled(dgates, x_rows, h_rows, Wx, need_dx, n_parts, dx_rows, dWx, dWh,
                            db, scratch, accumulate):
    """dx = dgates @ Wx.T, dWx (+)= x.T @ dgates, dWh (+)= h_prev.T @ dgates, db (+)= dgates.sum(0)
    by `_tile` (BLAS runs these products at half its peak for few rows, and on Zen 5 OpenBLAS
    runs AVX2 kernels), for one chunk of rows; with accumulate (the chunks after the first), the
    sums add to those of the chunks before, and Wx.T is already packed.

    dgates (M, 4H), x_rows (M, D), h_rows (M, H): the chunk's rows. The products' panels
    (dgates by columns, Wx.T by blocks of its columns) are packed by n_parts threads into
    scratch (`_tiled_gradients_size` values), then each thread computes its share of every
    output's column panels.
    """
    M, G = dgates.shape
    D, H = x_rows.shape[1], h_rows.shape[1]
    width = 2 * (VECTOR_BYTES // dgates.itemsize)
    n_da, n_dx = (G + width - 1) // width, (D + width - 1) // width
    wx_size = n_dx * G * width
    wx_panels = scratch[:wx_size]
    da_panels = scratch[wx_size:wx_size + n_da * M * width]
    x_t = scratch[wx_size + n_da * M * width:wx_size + n_da * M * width + D * M].reshape(D, M)
    h_t = scratch[wx_size + n_da * M * width + D * M:
                  wx_size + n_da * M * width + (D + H) * M].reshape(H, M)
    for part in prange(n_parts):
        _pack_columns(dgates, da_panels, part * n_da // n_parts, (part + 1) * n_da // n_parts)
        if need_dx and not accumulate:
            _pack_transposed(Wx, wx_panels, part * n_dx // n_parts,
                             (part + 1) * n_dx // n_parts)
        if part == 0:
            _transpose_into(x_rows, x_t)
        if part == n_parts - 1:
            _transpose_into(h_rows, h_t)
    for part in prange(n_parts):
        tile = np.empty(TILE_ROWS * width, dtype=dgates.dtype)
        lo, hi = part * n_da // n_parts, (part + 1) * n_da // n_parts
        _product_panels(x_t, da_panels, M, dWx, lo, hi, tile, accumulate)
        _product_panels(h_t, da_panels, M, dWh, lo, hi, tile, accumulate)
        c0, c1 = lo * width, min(G, hi * width)
        column_sums = db[c0:c1]
        if not accumulate:
            column_sums[:] = 0
        for k in range(M):
            row = dgates[k, c0:c1]
            for j in range(c1 - c0):
                column_sums[j] += row[j]
        if need_dx:
            _product_panels(dgates, wx_panels, G, dx_rows, part * n_dx // n_parts,
                            (part + 1) * n_dx // n_parts, tile)


@njit(parallel=True, **_JIT)
def _forward_batch_chunks(x_rows, Wx, b, Wh, n_chunks, xproj, hs, cells, gates, tanh_cells):
    """xproj = x @ Wx split by rows, then the batch in n_chunks chunks of `_forward_rows`, one
    thread each."""
    B = xproj.shape[1]
    for part in prange(n_chunks):
        _matmul_row_range(x_rows, Wx, xproj.reshape(x_rows.shape[0], xproj.shape[2]),
                          part, n_chunks)
    for chunk in prange(n_chunks):
        _forward_rows(xproj, b, Wh, chunk * B // n_chunks, (chunk + 1) * B // n_chunks,
                      hs, cells, gates, tanh_cells)


@njit(parallel=True, **_JIT)
def _forward_batch_tiles(x, Wx, Wh, b, n_chunks, pack, packed, hs, cells, gates, tanh_cells):
    """[Wx; Wh; b] packed by block ranges (if ``pack``; else packed holds them), then the batch
    in n_chunks chunks of `_forward_rows_tiled`, one thread each."""
    B = x.shape[1]
    V = VECTOR_BYTES // x.itemsize
    n_blocks = (Wh.shape[0] + V - 1) // V
    for part in prange(n_chunks if pack else 0):
        _pack_stacked(Wx, Wh, b, packed, part * n_blocks // n_chunks,
                      (part + 1) * n_blocks // n_chunks)
    for chunk in prange(n_chunks):
        _forward_rows_tiled(x, packed, chunk * B // n_chunks, (chunk + 1) * B // n_chunks,
                            hs, cells, gates, tanh_cells)


@njit(**_JIT)
def _unit_range(part, n_parts, H, align=UNIT_ALIGN):
    """Hidden units lo..hi-1 of `part`: equal shares, starting at multiples of align."""
    n_groups = (H + align - 1) // align
    lo = min(H, part * n_groups // n_parts * align)
    hi = min(H, (part + 1) * n_groups // n_parts * align)
    return lo, hi


@njit(**_JIT)
def _transpose_into(src, dst):
    """dst[:] = src.T   (src: (N, M), dst: (M, N), both C-contiguous): whole V x V tiles by
    `_transpose_vectors`, the edges value by value. (Passes of 64 source rows through slices
    took 0.32 ns per float32 for (1024, 32).)
    """
    N, M = src.shape
    V = VECTOR_BYTES // src.itemsize
    src_flat, dst_flat = src.reshape(-1), dst.reshape(-1)
    full_n, full_m = N // V * V, M // V * V
    for i0 in range(0, full_n, V):
        for j0 in range(0, full_m, V):
            _transpose_vectors(src_flat, i0 * M + j0, M, dst_flat, j0 * N + i0, N)
    for i in range(N):
        for j in range(full_m if i < full_n else 0, M):
            dst[j, i] = src[i, j]


@njit(**_JIT)
def _pack_part(W, packed, lo, hi, gates_per_row):
    """Copy the columns of units lo..hi-1 (all four gates) of W (K, 4H) into panels: per V
    units u0 (V = VECTOR_BYTES / itemsize; lo is a multiple of V), K rows of gates_per_row·V
    values at u0·4K, the gates in order, gates_per_row of them a row: 4 (Wh for
    `_vecmat_gates`: panel[k, gate·V + j] = W[k, gate·H + u0 + j]) or 2 (Wx for `_tile`: K rows
    of i and f, then K rows of o and g). 0 past hi. packed holds ceil(H / V)·V·4K values.
    """
    K, G = W.shape
    H = G // 4
    V = VECTOR_BYTES // W.itemsize
    flat = W.reshape(-1)
    row_run = gates_per_row * V
    for u in range(lo, hi, V):
        nu = min(V, hi - u)
        for gate in range(4):
            # where (k = 0, gate)'s V values go
            at = 4 * K * u + gate // gates_per_row * K * row_run + gate % gates_per_row * V
            if nu == V:
                for k in range(K):
                    _copy_vector(flat, k * G + gate * H + u, packed, at + k * row_run)
                continue
            for k in range(K):
                out = packed[at + k * row_run:at + k * row_run + V]
                out[:nu] = W[k, gate * H + u:gate * H + u + nu]
                out[nu:] = 0


@njit(**_JIT)
def _largest_part(n_parts, H):
    """The most hidden units any of the n_parts parts has (see `_unit_range`)."""
    largest = 0
    for part in range(n_parts):
        lo, hi = _unit_range(part, n_parts, H)
        largest = max(largest, hi - lo)
    return largest


@njit(**_JIT)
def _project_part(x_rows, Wx_packed, lo, hi, xproj_part):
    """xproj_part[m, gate·Hs + j - lo] = (x_rows @ Wx)[m, gate·H + j] for units lo <= j < hi
    (Hs = xproj_part.shape[1] // 4, whole vectors: columns up to the vector's end hold the
    zero padding's products), by `_tile` over Wx_packed (`_pack_part`, 2 gates a row).
    Each output is stored once, as the complete sum: a duplicate of this (a helping thread)
    writes the same bits over it and never shows partial sums to a thread reading it."""
    M, D = x_rows.shape
    Hs = xproj_part.shape[1] // 4
    V = VECTOR_BYTES // x_rows.itemsize
    x_flat = x_rows.reshape(-1)
    out = xproj_part.reshape(-1)
    for u in range(lo, hi, V):
        for half in range(2):
            panel = 4 * D * u + half * 2 * D * V
            m = 0
            while m < M:
                mr = _next_tile_rows(M - m)
                _tile(mr, D, x_flat, m * D, D, Wx_packed, panel, out,
                      m * 4 * Hs + 2 * half * Hs + u - lo, Hs, 4 * Hs)
                m += mr


@njit(**_JIT)
def _forward_part(x_rows, Wx, Wh, b, pack, Wh_packed, Wx_packed, xproj, hs, cells, gates,
                  tanh_cells, pre, step, part, n_parts):
    """`part` of `step`: step 0 packs the part's columns of Wh and Wx (if ``pack``; else the
    packed arrays hold them) and computes its columns of x @ Wx into xproj[part] (T·B rows);
    step 1 + t is step t of every batch row for the part's hidden units. Either writes only
    that step's slots (gates and tanh_cells may be a 1-slot scratch when nothing reads them: a
    duplicate then writes the same bits where nobody looks). Each part's projection is its own
    array: the thread that reads it at every step wrote it, into its own cache (row ranges of
    one shared array, each step's gate update read half its inputs from the other core).
    """
    H = hs.shape[2]
    lo, hi = _unit_range(part, n_parts, H)
    n = hi - lo
    if n == 0:
        return
    if step == 0:
        if pack:
            _pack_part(Wh, Wh_packed, lo, hi, 4)
            _pack_part(Wx, Wx_packed, lo, hi, 2)
        _project_part(x_rows, Wx_packed, lo, hi, xproj[part])
        return
    B = hs.shape[1]
    t = step - 1
    Tg = gates.shape[0]
    V = VECTOR_BYTES // hs.itemsize
    stride = (n + V - 1) // V * V  # per gate in pre_part: whole vectors
    pre_part = pre[:B * 4 * stride].reshape(B, 4 * stride)
    h_all = hs.reshape(-1)
    for r in range(B):
        for u in range(lo, hi, V):
            _vecmat_gates(H, h_all, (t * B + r) * H, Wh_packed, 4 * H * u, pre_part[r],
                          u - lo, stride)
    Hs = xproj.shape[2] // 4
    for r in range(B):
        _cell_forward(pre_part[r], stride, xproj[part, t * B + r], 0, Hs, b, cells[t, r], lo, n,
                      gates[t % Tg, r], cells[t + 1, r], tanh_cells[t % Tg, r], hs[t + 1, r])


@njit(parallel=True, **_JIT)
def _forward_split_hidden(x_rows, Wx, b, Wh, n_parts, claims, done, patience, parts_done,
                          pack, Wh_packed, Wx_packed, xproj, hs, cells, gates, tanh_cells):
    """The whole forward pass in one parallel region of claimed parts (see "Step barrier"):
    each part's columns of x @ Wx, then the steps one after the other, each step's hidden units
    (for all batch rows) split into n_parts. One region, not two: under load a region waits
    for a slow thread. Needs step-unique hs (T+1, B, H) and cells (T+1, B, H); xproj
    (n_parts, T·B, 4·Hs) with Hs = `_largest_part` rounded up to whole vectors.
    parts_done[i] (out) counts the parts the i-th thread computed.
    """
    T, B = hs.shape[0] - 1, hs.shape[1]
    H = hs.shape[2]
    n_max = _largest_part(n_parts, H)
    for first in prange(n_parts):
        pre = np.empty(B * 4 * (n_max + VECTOR_BYTES // hs.itemsize), dtype=hs.dtype)
        own_cycles = 0
        parts_done[first] = 0
        for step in range(1 + T):
            for q in range(n_parts):
                part = (first + q) % n_parts
                if _claim_part(claims, part, step):
                    start = _cycle_counter()
                    _forward_part(x_rows, Wx, Wh, b, pack, Wh_packed, Wx_packed, xproj, hs,
                                  cells, gates, tanh_cells, pre, step, part, n_parts)
                    own_cycles = _cycle_counter() - start
                    _mark_done(done, step, part, n_parts)
                    parts_done[first] += 1
            for part in range(n_parts):
                if not _wait_done(done, step, part, n_parts,
                                  PATIENCE_FACTOR * own_cycles + patience):
                    _forward_part(x_rows, Wx, Wh, b, pack, Wh_packed, Wx_packed, xproj, hs,
                                  cells, gates, tanh_cells, pre, step, part, n_parts)
                    _mark_done(done, step, part, n_parts)
                    parts_done[first] += 1


@njit(**_JIT)
def _cell_backward(dh_carry, dy_row, dc, gates_row, c_prev, tanh_c_row, dc_prev, da_row, j0, n):
    """Gradients of one step for hidden units j0 .. j0+n-1 of one batch row.

    In: dh_carry = dL/dh_t from step t+1 (da_{t+1} @ Wh.T), dy_row = dL/dy_t, dc = dL/dc_t.
    Out: dc_prev = dL/dc_{t-1}, da_row = dL/da_t (pre-activations, i, f, o, g).
    Written without constants (i - i*i is i*(1 - i)) so float32 stays float32.
    """
    H = dc.shape[0]
    i_in, f_in = gates_row[j0:j0 + n], gates_row[H + j0:H + j0 + n]
    o_in, g_in = gates_row[2 * H + j0:2 * H + j0 + n], gates_row[3 * H + j0:3 * H + j0 + n]
    da_i, da_f = da_row[j0:j0 + n], da_row[H + j0:H + j0 + n]
    da_o, da_g = da_row[2 * H + j0:2 * H + j0 + n], da_row[3 * H + j0:3 * H + j0 + n]
    carry, dy_u, dc_u = dh_carry[j0:j0 + n], dy_row[j0:j0 + n], dc[j0:j0 + n]
    dc_out = dc_prev[j0:j0 + n]
    c_old, tanh_c_in = c_prev[j0:j0 + n], tanh_c_row[j0:j0 + n]
    for u in range(n):
        i, f, o, g = i_in[u], f_in[u], o_in[u], g_in[u]
        tanh_c = tanh_c_in[u]
        dh = dy_u[u] + carry[u]
        dh_o = dh * o
        dc_t = dc_u[u] + (dh_o - dh_o * tanh_c * tanh_c)
        d_i = dc_t * g
        d_f = dc_t * c_old[u]
        d_o = dh * tanh_c
        d_g = dc_t * i
        dc_out[u] = dc_t * f
        da_i[u] = d_i * i - d_i * i * i
        da_f[u] = d_f * f - d_f * f * f
        da_o[u] = d_o * o - d_o * o * o
        da_g[u] = d_g - d_g * g * g


@njit(**_JIT)
def _backward_rows(dy, gates, cells, tanh_cells, Wh, packed_t, use_matvec, r0, r1, dh, dc,
                   dgates):
    """BPTT over the whole sequence for batch rows r0..r1-1.

    dh, dc: (B, H), in: dL/dh_T, dL/dc_T; out: dL/dh0, dL/dc0. dgates: (T, B, 4H) out, dL/da_t.
    ``dh_{t-1} = da_t @ Wh.T`` is `_matvec_rows` of Wh (H, 4H) per row, or `_tile` over
    packed_t (`_pack_transposed`), block by block of 2V hidden units.
    """
    T = dy.shape[0]
    H = dy.shape[2]
    G = 4 * H
    width = 2 * (VECTOR_BYTES // dy.itemsize)
    n_panels = (H + width - 1) // width
    carry = np.empty((r1 - r0, H), dtype=dy.dtype)
    dh_tile = np.empty(TILE_ROWS * width, dtype=dy.dtype)
    dc_steps = np.empty((2, r1 - r0, H), dtype=dy.dtype)
    dc_steps[T % 2] = dc[r0:r1]
    for t in range(T - 1, -1, -1):
        carry[:] = dh[r0:r1]
        for r in range(r0, r1):
            _cell_backward(carry[r - r0], dy[t, r], dc_steps[(t + 1) % 2, r - r0], gates[t, r],
                           cells[t, r], tanh_cells[t, r], dc_steps[t % 2, r - r0],
                           dgates[t, r], 0, H)
        if use_matvec:
            for r in range(r0, r1):
                _matvec_rows(Wh, dgates[t, r], dh[r], 0, H)
            continue
        da = dgates[t].reshape(-1)
        for panel in range(n_panels):
            j0 = panel * width
            n = min(width, H - j0)
            r = r0
            while r < r1:
                mr = _next_tile_rows(r1 - r)
                _tile(mr, G, da, r * G, G, packed_t, panel * G * width, dh_tile, 0, width // 2,
                      width)
                for i in range(mr):
                    dh[r + i, j0:j0 + n] = dh_tile[i * width:i * width + n]
                r += mr
    dc[r0:r1] = dc_steps[0]


@njit(parallel=True, **_JIT)
def _backward_batch_chunks(dy, gates, cells, tanh_cells, Wh, packed_t, use_matvec, n_chunks,
                           dh, dc, dgates):
    """Wh.T packed by block ranges (unless use_matvec), then the batch in n_chunks contiguous
    chunks; each thread runs `_backward_rows`."""
    B = dy.shape[1]
    width = 2 * (VECTOR_BYTES // dy.itemsize)
    n_panels = (Wh.shape[0] + width - 1) // width
    if not use_matvec:
        for part in prange(n_chunks):
            _pack_transposed(Wh, packed_t, part * n_panels // n_chunks,
                             (part + 1) * n_panels // n_chunks)
    for chunk in prange(n_chunks):
        _backward_rows(dy, gates, cells, tanh_cells, Wh, packed_t, use_matvec,
                       chunk * B // n_chunks, (chunk + 1) * B // n_chunks, dh, dc, dgates)


@njit(**_JIT)
def _backward_part(dy, gates, cells, tanh_cells, Wh, packed_t, dh_panel, dgates, carry, dcs, k,
                   part, n_parts):
    """Phase k of every batch row for the hidden units of `part` (whole panels of
    `_pack_transposed`); writes only phase k's slots, and in phase 0 the part's panels.

    carry[k] = dL/dh_{T-1-k} (carry[0] = dL/dh_T), dcs[k] = dL/dc_{T-k}; both (T+1, B, H).
    dh_panel: scratch of one panel's 2V values.
    """
    T, B, H = dy.shape
    G = 4 * H
    width = 2 * (VECTOR_BYTES // dy.itemsize)
    lo, hi = _unit_range(part, n_parts, H, width)
    n = hi - lo
    if n == 0:
        return
    if k == 0:
        _pack_transposed(Wh, packed_t, lo // width, (hi + width - 1) // width)
    else:
        da = dgates.reshape(-1)
        for r in range(B):
            for j0 in range(lo, hi, width):
                _vecmat_panel(G, da, ((T - k) * B + r) * G, packed_t, j0 * G, dh_panel, 0,
                              width // 2)
                carry[k, r, j0:min(hi, j0 + width)] = dh_panel[:min(hi, j0 + width) - j0]
    if k < T:
        t = T - 1 - k
        for r in range(B):
            _cell_backward(carry[k, r], dy[t, r], dcs[k, r], gates[t, r], cells[t, r],
                           tanh_cells[t, r], dcs[k + 1, r], dgates[t, r], lo, n)


@njit(parallel=True, **_JIT)
def _backward_split_hidden(dy, gates, cells, tanh_cells, Wh, packed_t, n_parts, claims, done,
                           patience, parts_done, carry, dcs, dgates):
    """BPTT for all batch rows together; each phase's hidden units split into n_parts parts.

    Phase k (k = 0..T) does, for the part's units: dL/dh_{T-k} = da_{T-k} @ Wh.T
    (k >= 1; needs all of da_{T-k}, finished in phase k-1), then the gate gradients of step
    T-1-k (k < T; needs only the part's own units). So one barrier per step.
    carry, dcs: (T+1, B, H) with carry[0] = dL/dh_T, dcs[0] = dL/dc_T; on return
    carry[T] = dL/dh0 and dcs[T] = dL/dc0. parts_done as in `_forward_split_hidden`.
    """
    T = dy.shape[0]
    for first in prange(n_parts):
        dh_panel = np.empty(2 * (VECTOR_BYTES // dy.itemsize), dtype=dy.dtype)
        own_cycles = 0
        parts_done[first] = 0
        for step in range(T + 1):
            for q in range(n_parts):
                part = (first + q) % n_parts
                if _claim_part(claims, part, step):
                    start = _cycle_counter()
                    _backward_part(dy, gates, cells, tanh_cells, Wh, packed_t, dh_panel, dgates,
                                   carry, dcs, step, part, n_parts)
                    own_cycles = _cycle_counter() - start
                    _mark_done(done, step, part, n_parts)
                    parts_done[first] += 1
            for part in range(n_parts):
                if not _wait_done(done, step, part, n_parts,
                                  PATIENCE_FACTOR * own_cycles + patience):
                    _backward_part(dy, gates, cells, tanh_cells, Wh, packed_t, dh_panel, dgates,
                                   carry, dcs, step, part, n_parts)
                    _mark_done(done, step, part, n_parts)
                    parts_done[first] += 1


# --------------------------------------------------------------------------------------------
# Planning: which kernel for which shape (measured, see the module docstring)
# --------------------------------------------------------------------------------------------

#: Splitting the hidden units of one row across threads (each with its share of Wh packed)
#: pays from this H on. Below it a step is ~1 µs, not much more than the cross-core hand-over
#: of h_{t-1}, and batch rows split over threads need no per-step sync at all.
SPLIT_HIDDEN_MIN_H = 128
#: Rows per thread up to which the per-row matrix-vector kernels beat the tiles. Measured,
#: float32, T = 50, median ms forward / forward+backward, matvec vs tiles: 2 threads, B = 2,
#: D = H = 256 (1 row each) 1.07/4.77 vs 1.57/5.76; B = 4, (D, H) = (128, 256) 1.73/6.40 vs
#: 1.36/5.79; B = 8 3.33/11.1 vs 1.86/8.16; 1 thread, B = 4 3.32/8.47 vs 1.85/7.85.
MATVEC_MAX_ROWS = 1


#: When a split call finds its partner thread mostly absent (it computed less than this share
#: of the parts: the cores are busy with other work, and the split was then 1.3–2x slower
#: than one thread), the next split calls run every part on one thread (`SoloBackoff`): the
#: same parts computed by the same code, so the results are bit-identical either way.
SPLIT_MIN_SHARE = 0.25
_backoff = SoloBackoff(BACKOFF_FIRST, BACKOFF_MAX)


def _note_partner(parts_done, plan):
    """Tell the back-off whether the parts were shared (see SPLIT_MIN_SHARE)."""
    counts = parts_done.tolist()  # a few ints: Python's min and sum beat NumPy's reductions
    _backoff.note(plan.n_threads, min(counts) < SPLIT_MIN_SHARE * sum(counts) / len(counts))


class Plan(NamedTuple):
    """How one call runs: `mode` "chunks" (n_workers row chunks, one thread each) or
    "split_hidden" (n_workers parts of the hidden units per step), per-row matrix-vector
    products or BLAS, and the threads that run it (fewer than parts: one takes several)."""

    mode: str
    n_workers: int
    use_matvec: bool
    n_threads: int


def _plan(B, H, n_threads):
    """The `Plan` for a call of batch B and hidden size H on n_threads threads."""
    if B == 1 and H >= SPLIT_HIDDEN_MIN_H:
        return Plan("split_hidden", n_threads, True, _backoff.threads(n_threads))
    n_chunks = max(1, min(n_threads, B))
    use_matvec = B // n_chunks <= MATVEC_MAX_ROWS and H >= SPLIT_HIDDEN_MIN_H
    return Plan("chunks", n_chunks, use_matvec, n_threads)


def _usable_threads(n_threads):
    """Numba cannot run more threads than it started with (NUMBA_NUM_THREADS)."""
    return max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS))


class _numba_threads:
    """Set Numba's thread count (per calling thread) for a block and restore it."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = numba.get_num_threads()
        if self.before != self.n:  # each set costs 1 µs
            numba.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.before != self.n:
            numba.set_num_threads(self.before)


#: Multiply-adds below which a GEMM after the time loop stays on one thread: waking the
#: other thread (a futex with the passive libgomp) costs more than it saves.
PARALLEL_GEMM_MIN_FMA = 4_000_000

#: Most rows T·B for which the weight gradients run on `_tile` rather than BLAS: OpenBLAS ran
#: those products at 40-50 GFLOP/s on one thread for T·B = 100 (S1: dx 81, dWx 71, dWh 138 µs).
#: Backward, 2 threads, BLAS vs tiles, median ms: S1 0.537 vs 0.454, S2 2.15 vs 1.84, S3 (1600
#: rows) 15.7 vs 14.3. Their scratch is as large as the gradient of the pre-activations.
TILED_GRADIENTS_MAX_ROWS = 2048

#: Whether longer products run on the tiles too, in chunks of at most TILED_GRADIENTS_MAX_ROWS
#: rows, each adding to the sums of the ones before: where the tiles are AVX-512 ones. On Zen 5,
#: whose OpenBLAS runs AVX2 kernels, forward+backward, 2 threads, BLAS vs chunked tiles, median
#: ms over 5 calls, two alternating pairs of processes: S4 (6400 rows) 278-287 vs 194-202, S5
#: (5120 rows) 551-566 vs 389-399.
TILED_GRADIENTS_ANY_LENGTH = TILE_ROWS == 6


def _tiled_gradients(rows):
    """Whether the weight gradients over `rows` rows (T·B) run on `_tile`."""
    return rows <= TILED_GRADIENTS_MAX_ROWS or TILED_GRADIENTS_ANY_LENGTH


def _chunk_rows(rows):
    """Rows of each chunk of the tiled weight gradients (the last may have fewer): the rows in
    the fewest chunks of at most TILED_GRADIENTS_MAX_ROWS, near-equal, so that the chunks depend
    on the shape alone, never on the threads."""
    chunks = max(1, -(-rows // TILED_GRADIENTS_MAX_ROWS))
    return -(-rows // chunks)


def _matmul(A, B, n_threads):
    """A @ B as a fresh array, rows split over the threads when it is large enough."""
    out = recycled((A.shape[0], B.shape[1]), A.dtype)
    if n_threads > 1 and A.shape[0] * A.shape[1] * B.shape[1] >= PARALLEL_GEMM_MIN_FMA:
        _matmul_rows(A, B, out, n_threads)
    else:
        np.matmul(A, B, out=out)
    return out


def _matmul_transposed(A, B, n_threads):
    """A.T @ B as a fresh array; large ones as per-thread partial sums over row ranges."""
    out = recycled((A.shape[1], B.shape[1]), A.dtype)
    if n_threads > 1 and A.shape[0] * A.shape[1] * B.shape[1] >= PARALLEL_GEMM_MIN_FMA:
        partials = scratch("numba/partials", (n_threads, A.shape[1], B.shape[1]), A.dtype)
        _matmul_transposed_partials(A, B, partials)
        return np.sum(partials, axis=0, out=out)
    return np.matmul(A.T, B, out=out)


def _empty_arrays(dtype, *shapes):
    """Uninitialised arrays of these shapes, carved out of one allocation (64-byte aligned).

    Fresh memory is mapped on first touch: several separate buffers of 1.6-6.5 MB (S3's
    per-step storage) took 1760 page faults and 4.6 ms to fill, one buffer of the same total
    11 faults and 0.41 ms (NumPy asks for huge pages for large allocations).
    """
    align = max(1, 64 // np.dtype(dtype).itemsize)
    sizes = [math.prod(shape) for shape in shapes]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // align) * align)
    block = recycled((starts[-1],), dtype)
    return [block[start:start + size].reshape(shape)
            for start, size, shape in zip(starts, sizes, shapes)]


class _ReadOnlyMemory:
    """A read-only array's memory offered to NumPy as writeable (the array interface protocol);
    the NumPy array made from it keeps this object, and so the read-only array, alive."""

    __slots__ = ("array", "__array_interface__")

    def __init__(self, array):
        self.array = array
        interface = dict(array.__array_interface__)
        interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface


def _writeable(a):
    """``a`` as a writeable array, for the kernels to read.

    Numba types a read-only array apart, which would compile every kernel again; a copy cost
    the layer (whose weights are read-only) 1.13x at S1 and 1.19x at S2, paired against the same
    forward call on writeable weights. So a read-only array is passed as a writeable array over
    the same memory: the kernels never write their inputs (tested on read-only inputs).
    """
    return a if a.flags.writeable else np.asarray(_ReadOnlyMemory(a))


def threading_layer():
    """Name of the threading layer Numba uses ('omp', 'tbb' or 'workqueue').

    Numba fixes the layer at its first parallel launch; this makes one if none happened yet.
    """
    try:
        return numba.threading_layer()
    except ValueError:
        _start_pool(1)
        _warm_up_layer(np.zeros(1))
        return numba.threading_layer()


def _start_pool(n_threads):
    """Before a parallel launch: Numba's pool starts at the first (see `note_started`)."""
    check_no_fork_conflict(NUMBA_POOL, "numba")
    note_started(NUMBA_POOL, n_threads)
    note_started(OPENMP_TEAM, n_threads)


@njit(parallel=True, cache=True)
def _warm_up_layer(a):
    for k in prange(a.shape[0]):
        a[k] = k


# --------------------------------------------------------------------------------------------
# Backend protocol
# --------------------------------------------------------------------------------------------


def _packed_weights(name, sizes, dtype, prepared):
    """1-D arrays of ``sizes`` for the weights a kernel reads packed, and whether the kernel
    must pack them: those a call kept in ``prepared`` (a `PreparedWeights`) before (False);
    else new ones for this call to keep there, or, without one, this thread's scratch (True).
    """
    if prepared is None:
        return tuple(scratch(f"{name}/{i}", (size,), dtype) for i, size in enumerate(sizes)), True
    kept = prepared.get(name)
    if kept is not None:
        return kept, False
    return tuple(aligned_empty((size,), dtype) for size in sizes), True


def forward(x, Wx, Wh, b, h0, c0, *, need_cache, n_threads, lengths=None, prepared=None):
    T, B, D = x.shape
    H = Wh.shape[0]
    dtype = x.dtype
    _start_pool(n_threads)
    plan = _plan(B, H, _usable_threads(n_threads))
    split = plan.mode == "split_hidden"
    # Per-step storage when cached; the split kernel needs step-unique cells as well, while
    # gates and tanh(c), which only the cache reads, can then be a 1-slot scratch. What the
    # caller keeps (y = hs[1:], the cache) is one allocation; the rest is this thread's
    # scratch. With lengths, every step's cell state too (the kernels index it modulo its
    # length), from which each row's own last one is read.
    cells_shape = (T + 1 if need_cache or split or lengths is not None else 2, B, H)
    slots = T if need_cache else 1
    gates_shape, tanh_cells_shape = (slots, B, 4 * H), (slots, B, H)
    # The tiles read [Wx; Wh; b] packed, the split kernel Wh and Wx packed; the others the
    # weights as they are.
    tiles = not split and not plan.use_matvec
    V = VECTOR_BYTES // dtype.itemsize
    padded = (H + V - 1) // V * V  # hidden units in whole panels of V
    if split:
        arrangement, sizes = "numba/split", (padded * 4 * H, padded * 4 * D)
        # each part's columns of x @ Wx, whole vectors of them
        part_units = -(-_largest_part(plan.n_workers, H) // V) * V
        xproj = scratch("numba/xproj", (plan.n_workers, T * B, 4 * part_units), dtype)
    else:
        arrangement, sizes = "numba/stacked", (padded * 4 * (D + H + 1),) if tiles else ()
        xproj = scratch("numba/xproj", (0 if tiles else T, B, 4 * H), dtype)
    packed, pack = _packed_weights(arrangement, sizes, dtype, prepared if sizes else None)
    if need_cache:
        hs, cells, gates, tanh_cells = _empty_arrays(dtype, (T + 1, B, H), cells_shape,
                                                     gates_shape, tanh_cells_shape)
    else:
        hs = recycled((T + 1, B, H), dtype)
        cells = scratch("numba/cells", cells_shape, dtype)
        gates = scratch("numba/gates", gates_shape, dtype)
        tanh_cells = scratch("numba/tanh_cells", tanh_cells_shape, dtype)
    hs[0] = h0
    cells[0] = c0
    x_rows = _writeable(x).reshape(T * B, D)
    Wx = _writeable(Wx)
    Wh = _writeable(Wh)
    b = b.copy()
    with _numba_threads(plan.n_threads):
        if split:
            parts_done = np.empty(plan.n_workers, np.int64)
            _forward_split_hidden(x_rows, Wx, b, Wh, plan.n_workers,
                                  *_new_sync(1 + T, plan.n_workers), PATIENCE_CYCLES,
                                  parts_done, pack, *packed, xproj, hs, cells, gates,
                                  tanh_cells)
            _note_partner(parts_done, plan)
        elif tiles:
            _forward_batch_tiles(x_rows.reshape(T, B, D), Wx, Wh, b, plan.n_workers, pack,
                                 *packed, hs, cells, gates, tanh_cells)
        else:
            # The only forward kernel with BLAS in it (the input projection); each of Numba's
            # threads calls it single-threaded: one owner of the cores.
            with blas_threads(1):
                _forward_batch_chunks(x_rows, Wx, b, Wh, plan.n_workers, xproj, hs, cells,
                                      gates, tanh_cells)
    if prepared is not None and pack and sizes:
        prepared.keep(arrangement, packed)
    y = hs[1:]
    if lengths is None:
        h_T = hs[T].copy()
        c_T = cells[T % cells.shape[0]].copy()
    else:
        # Slot 0 holds h0 and c0, slot t the states after step t.
        rows = np.arange(B)
        h_T = hs[lengths, rows]
        c_T = cells[lengths, rows]
    cache = (x_rows, Wx, Wh, hs, cells, gates, tanh_cells) if need_cache else None
    return y, h_T, c_T, cache


def backward(dy, dh_T, dc_T, cache, *, n_threads, need_dx=True):
    x_rows, Wx, Wh, hs, cells, gates, tanh_cells = cache
    T, B, H = dy.shape
    D = x_rows.shape[1]
    dy = _writeable(dy)
    _start_pool(n_threads)
    n_threads = _usable_threads(n_threads)
    plan = _plan(B, H, n_threads)
    split = plan.mode == "split_hidden"
    steps = T + 1 if split else 0
    dgates = scratch("numba/dgates", (T, B, 4 * H), dy.dtype)
    carry = scratch("numba/carry", (steps, B, H), dy.dtype)
    dcs = scratch("numba/dcs", (steps, B, H), dy.dtype)
    # Wh.T in panels of 2V hidden units, for the split kernel and the tiles
    width = 2 * (VECTOR_BYTES // dy.itemsize)
    panels = 0 if plan.use_matvec and not split else (H + width - 1) // width
    packed_t = scratch("numba/packed_t", (panels * width * 4 * H,), dy.dtype)
    with _numba_threads(plan.n_threads):
        if split:
            parts_done = np.empty(plan.n_workers, np.int64)
            carry[0] = dh_T
            dcs[0] = dc_T
            _backward_split_hidden(dy, gates, cells, tanh_cells, Wh, packed_t, plan.n_workers,
                                   *_new_sync(T + 1, plan.n_workers),
                                   PATIENCE_CYCLES, parts_done, carry, dcs, dgates)
            _note_partner(parts_done, plan)
            dh, dc = carry[T].copy(), dcs[T].copy()
        else:
            dh = dh_T.copy()
            dc = dc_T.copy()
            _backward_batch_chunks(dy, gates, cells, tanh_cells, Wh, packed_t, plan.use_matvec,
                                   plan.n_workers, dh, dc, dgates)
    dgates_rows = dgates.reshape(T * B, 4 * H)
    h_rows = hs[:T].reshape(T * B, H)
    if _tiled_gradients(T * B):
        dx = recycled((T, B, D) if need_dx else (0, B, D), dy.dtype)
        dx_rows = dx.reshape(-1, D)
        dWx, dWh = recycled((D, 4 * H), dy.dtype), recycled((H, 4 * H), dy.dtype)
        db = np.empty(4 * H, dy.dtype)
        chunk = _chunk_rows(T * B)
        gradients_scratch = scratch("numba/gradients",
                                    (_tiled_gradients_size(chunk, D, H, dy.itemsize),), dy.dtype)
        # On the time loop's threads: one where the back-off ran the loop on one (the tiles
        # give the same bits on any number of threads).
        with _numba_threads(plan.n_threads):
            for r0 in range(0, T * B, chunk):
                r1 = min(T * B, r0 + chunk)
                _weight_gradients_tiled(dgates_rows[r0:r1], x_rows[r0:r1], h_rows[r0:r1], Wx,
                                        need_dx, plan.n_threads, dx_rows[r0:r1], dWx, dWh, db,
                                        gradients_scratch, r0 > 0)
        return dx if need_dx else None, dh, dc, dWx, dWh, db
    with blas_threads(1), _numba_threads(n_threads):
        dx = _matmul(dgates_rows, Wx.T, n_threads).reshape(T, B, D) if need_dx else None
        dWx = _matmul_transposed(x_rows, dgates_rows, n_threads)
        dWh = _matmul_transposed(h_rows, dgates_rows, n_threads)
    db = dgates_rows.sum(axis=0)
    return dx, dh, dc, dWx, dWh, db


def cells_from_cache(cache, c_T):
    """Cell state c_t at every step, (T, B, H), from a forward cache (for `LSTM` return_cells).

    A copy: the cache's own array feeds the backward pass.
    """
    cells = cache[4]
    return cells[1:].copy()


def speed_rank(T, B, D, H):
    """Preference for backend=None (higher wins; the reference ranks 0, Cython 2).

    Faster than the reference on every benchmark shape and level with the Cython backend, which
    has no JIT start-up and so stays first where it is built. Measured side by side (the
    reference report, docs/bench-report: float32, 2 threads, median ms, numba vs numpy vs
    cython): forward S1 0.309 vs 2.29 vs 0.282, S2 1.08 vs 6.23 vs 1.09, S3 6.52 vs 14.8 vs
    6.70, S4 135 vs 238 vs 134, S5 267 vs 362 vs 272; forward+backward S1 0.826 vs 19.5 vs
    0.749, S3 22.9 vs 53.8 vs 22.6, S4 425 vs 768 vs 432, S5 893 vs 1097 vs 845.
    """
    return 1


BACKEND = Backend("numba", forward, backward, speed_rank)


# --------------------------------------------------------------------------------------------
# Step kernel (`LSTM.step`, see fastlstm._step)
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _step_input(x_t, h, xh):
    """xh[:, :D] = x_t, xh[:, D:D + H] = h; the last column holds the constant 1."""
    B, D = x_t.shape
    H = h.shape[1]
    for r in range(B):
        xh[r, :D] = x_t[r]
        xh[r, D:D + H] = h[r]


@njit(**_JIT)
def _step_blocks(xh, packed, blk_lo, blk_hi, pre, gates, tanh_c, h, c):
    """One step for hidden units blk_lo·V .. blk_hi·V - 1 of every row: their columns of
    [x_t, h_{t-1}, 1] @ [Wx; Wh; b] by `_tile` over `_pack_stacked`'s panels (xh (B, K) holds
    the left side), then their gate updates, h and c in place. pre (B, 4·Hp), gates (B, 4H) and
    tanh_c (B, H) are scratch."""
    B, K = xh.shape
    H = h.shape[1]
    V = VECTOR_BYTES // xh.itemsize
    Hp = pre.shape[1] // 4
    xh_flat, pre_flat = xh.reshape(-1), pre.reshape(-1)
    for blk in range(blk_lo, blk_hi):
        w_if = blk * K * 4 * V
        r = 0
        while r < B:
            mr = _next_tile_rows(B - r)
            at = r * 4 * Hp + blk * V
            _tile(mr, K, xh_flat, r * K, K, packed, w_if, pre_flat, at, Hp, 4 * Hp)
            _tile(mr, K, xh_flat, r * K, K, packed, w_if + K * 2 * V, pre_flat, at + 2 * Hp, Hp,
                  4 * Hp)
            r += mr
    j0 = blk_lo * V
    n = min(H, blk_hi * V) - j0
    if n > 0:
        for r in range(B):
            _cell_update(pre[r, j0:], Hp, j0, n, c[r], gates[r], c[r], tanh_c[r], h[r])


@njit(**_JIT)
def _step_one_thread(x_t, packed, xh, pre, gates, tanh_c, h, c):
    _step_input(x_t, h, xh)
    _step_blocks(xh, packed, 0, pre.shape[1] // 4 // (VECTOR_BYTES // xh.itemsize), pre, gates,
                 tanh_c, h, c)


@njit(parallel=True, **_JIT)
def _step_threads(x_t, packed, xh, pre, gates, tanh_c, h, c, n_parts):
    """`_step_one_thread` with the blocks of hidden units split over n_parts threads (each
    writes only its own units of h and c; all read xh, filled before)."""
    _step_input(x_t, h, xh)
    n_blocks = pre.shape[1] // 4 // (VECTOR_BYTES // xh.itemsize)
    for part in prange(n_parts):
        _step_blocks(xh, packed, part * n_blocks // n_parts, (part + 1) * n_blocks // n_parts,
                     pre, gates, tanh_c, h, c)


#: Weight bytes times rows from which a step runs on fastlstm's threads: below it the parallel
#: launch costs more than the second core saves. Measured, float32, median µs per step, 1 vs 2
#: threads: B = 1, (D, H) = (64, 128) 7.9 vs 9.1 (0.4 MB), (128, 128) 8.9 vs 13.2 (0.53 MB);
#: interleaved: (160, 192) 17.2 vs 13.4 (1.08 MB), (256, 256) 29.9 vs 22.2; B = 4, (64, 128)
#: 20.2 vs 19.5; B = 32, (128, 256) 329 vs 211.
STEP_THREADS_FROM = 1 << 20


def _step_prepare(Wx, Wh, b):
    """[Wx; Wh; b] in `_pack_stacked`'s panels. (Left writeable: a read-only array is another
    Numba type, and so another compile of every kernel it reaches.)"""
    Wx, Wh, b = (np.ascontiguousarray(a) for a in (Wx, Wh, b))
    H = Wh.shape[0]
    V = VECTOR_BYTES // Wx.itemsize
    blocks = (H + V - 1) // V
    packed = aligned_empty((blocks * V * 4 * (Wx.shape[0] + H + 1),), Wx.dtype)
    _pack_stacked(Wx, Wh, b, packed, 0, blocks)
    return packed


class _StepBuffers:
    """One stream's buffers: the states h, c (B, H), and the kernels' xh (B, D + H + 1) =
    [x_t, h, 1], pre-activations (B, 4·Hp), gates (B, 4H) and tanh(c) (B, H). ``threaded``:
    whether its steps are large enough for threads."""

    __slots__ = ("h", "c", "xh", "pre", "gates", "tanh_c", "threaded")

    def __init__(self, packed, h0, c0):
        B, H = h0.shape
        dtype = packed.dtype
        V = VECTOR_BYTES // dtype.itemsize
        Hp = (H + V - 1) // V * V
        K = packed.size // (4 * Hp)
        self.h = aligned_copy(np.asarray(h0, dtype))
        self.c = aligned_copy(np.asarray(c0, dtype))
        self.xh = aligned_empty((B, K), dtype)
        self.xh[:, K - 1] = 1
        self.pre = aligned_empty((B, 4 * Hp), dtype)
        self.gates = aligned_empty((B, 4 * H), dtype)
        self.tanh_c = aligned_empty((B, H), dtype)
        self.threaded = B * packed.nbytes >= STEP_THREADS_FROM


def _step(packed, buffers, x_t):
    """h, c <- LSTM step of (x_t, h, c) by the forward tiles, on threads for large steps."""
    b = buffers
    n_threads = _backoff.threads(_usable_threads(get_num_threads())) if b.threaded else 1
    if n_threads > 1 and fork_conflict(NUMBA_POOL, "numba") is not None:
        n_threads = 1  # the one-thread step is no parallel launch, and runs here
    if n_threads > 1:
        _start_pool(n_threads)
    if n_threads == 1:
        _step_one_thread(x_t, packed, b.xh, b.pre, b.gates, b.tanh_c, b.h, b.c)
    else:
        with _numba_threads(n_threads):
            _step_threads(x_t, packed, b.xh, b.pre, b.gates, b.tanh_c, b.h, b.c, n_threads)
    if b.threaded:
        _backoff.note(n_threads)


STEP_KERNEL = StepKernel(_step_prepare, _StepBuffers, _step)


# --------------------------------------------------------------------------------------------
# Warm-up
# --------------------------------------------------------------------------------------------

#: (T, B, D, H) calls that reach every kernel: split hidden units (B = 1, H >= 128), one row
#: per thread (B = 2), row tiles (B = 5, small H), and the weight gradients of T·B above
#: TILED_GRADIENTS_MAX_ROWS (on BLAS, or in chunks on the tiles).
_WARM_UP_SHAPES = ((3, 1, 3, SPLIT_HIDDEN_MIN_H), (3, 2, 3, SPLIT_HIDDEN_MIN_H), (3, 5, 3, 16),
                   (TILED_GRADIENTS_MAX_ROWS // 4 + 1, 5, 3, 16))


def warm_up():
    """Compile every kernel of this backend, or load it from Numba's cache, for float32 and
    float64: forward with and without a cache and lengths, backward with and without dx, and
    streaming steps, on one thread and on several (as many as Numba has, up to 2). Returns the
    number of calls made. For a process of its own (`python -m fastlstm warm`): meanwhile,
    other threads' calls would run without the back-off.

    A process that finds them cached starts in well under a second (S1: import plus the first
    forward 0.5 s here, against 13.7 s compiling), so a service image runs this once.
    """
    global _backoff
    n_threads = [1] + ([2] if numba.config.NUMBA_NUM_THREADS >= 2 else [])
    saved, _backoff = _backoff, SoloBackoff(0, 0, clock=lambda: 0.0)
    _backoff.note(2, False)  # every call on the threads it asks for: no back-off, no idle rule
    calls = 0
    try:
        for dtype, n in itertools.product((np.float32, np.float64), n_threads):
            for T, B, D, H in _WARM_UP_SHAPES:
                calls += _warm_up_calls(T, B, D, H, dtype, n)
            calls += _warm_up_step(dtype, n)
    finally:
        _backoff = saved
    return calls


def cache_dir():
    """The directory where Numba caches this backend's kernels: NUMBA_CACHE_DIR when set, else
    next to this module if writable, else the user's cache directory."""
    return _warm_up_layer._cache.cache_path


def _warm_up_calls(T, B, D, H, dtype, n_threads):
    """The forward and backward calls of `warm_up` for one shape; returns how many."""
    x, h0, c0 = (np.zeros(s, dtype) for s in ((T, B, D), (B, H), (B, H)))
    Wx, Wh, b = (np.zeros(s, dtype) for s in ((D, 4 * H), (H, 4 * H), 4 * H))
    lengths = np.full(B, T, np.intp)
    for need_cache, with_lengths in itertools.product((False, True), repeat=2):
        forward(x, Wx, Wh, b, h0, c0, need_cache=need_cache, n_threads=n_threads,
                lengths=lengths if with_lengths else None)
    *_, cache = forward(x, Wx, Wh, b, h0, c0, need_cache=True, n_threads=n_threads)
    for need_dx in (True, False):
        backward(np.zeros((T, B, H), dtype), h0, c0, cache, n_threads=n_threads, need_dx=need_dx)
    return 7


def _warm_up_step(dtype, n_threads):
    """A streaming step of `warm_up` (its weights prepared writeable, and read-only as a
    layer's are); returns 1."""
    B, D, H = 32, 128, 256
    weights = [np.zeros(s, dtype) for s in ((D, 4 * H), (H, 4 * H), 4 * H)]
    packed = _step_prepare(*weights)
    for w in weights:
        w.flags.writeable = False
    _step_prepare(*weights)
    b = _StepBuffers(packed, np.zeros((B, H), dtype), np.zeros((B, H), dtype))
    x_t = np.zeros((B, D), dtype)
    if n_threads == 1:
        _step_one_thread(x_t, packed, b.xh, b.pre, b.gates, b.tanh_c, b.h, b.c)
    else:
        _start_pool(n_threads)
        with _numba_threads(n_threads):
            _step_threads(x_t, packed, b.xh, b.pre, b.gates, b.tanh_c, b.h, b.c, n_threads)
    return 1
