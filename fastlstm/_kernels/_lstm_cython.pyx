# cython: boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled LSTM forward and BPTT kernels of the Cython backend (glue: cython_backend.py).

Every kernel computes into arrays the caller allocated and runs without the GIL inside OpenMP
regions of exactly ``n_threads`` threads. The backward's weight gradients call BLAS (through
`_blas.gemm`) from inside those regions on row or column partitions, so its caller must hold
BLAS to one thread: one owner of the cores per call (DESIGN.md §6).

Two ways through the time loops, chosen by the caller:
- small batches (`forward`, ``use_matvec`` in `backward`): the threads split the hidden units
  (all four gates of a unit together) and run the whole sequence in ONE parallel region with a
  barrier per step. The input projection ``x @ Wx`` comes first, each thread's onto its own
  units, by register tiles over Wx packed the same way as Wh (project_blocks); at B = 1 in
  float32 on one thread (AVX-512, D >= H / 2), the steps compute most of it instead, six
  steps ahead (forward_step_projecting), their FMAs running while a step waits on the stream
  of Wh.
  A forward step is a fused product over pre-arranged (packed) recurrent weights plus the cell
  update (forward_step, or forward_tiles from 4 rows, in csrc/lstm_kernels_impl.h); a backward
  step is the cell's backward and dh = da @ Wh.T over Wh.T packed once per call
  (backward_dh_panels; S2 on one thread 4% faster than dot products over Wh's natural rows,
  whose horizontal sums cost more than the packing). Each thread streams only its share of the
  weights, and nothing repacks them per step.
- batches (`forward_stacked`, `backward`): the threads split the batch rows, which are
  independent over the whole sequence, and run with no synchronisation at all. A forward step
  is one product [x_t, h_{t-1}, 1] @ [Wx; Wh; b] by register-blocked tiles (up to 6 rows x 2
  vectors) over the stacked weights packed once per call, each block's cell update while its
  gates are in L1; a backward step runs the same tiles over Wh.T. A gemm per step repacked Wh
  at every call (S3 forward, 1 thread, CPU time: 18.7 -> 15.5 ms; forward+backward 56 -> 45 ms).
In backward, dx, dWx and dWh are single large GEMMs after the time loop, split across the
threads.

Gate blocks along the 4H axis: i, f, o, g.
"""

import os

cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.string cimport memcpy

from fastlstm._kernels._blas cimport gemm

cnp.import_array()


cdef extern from "csrc/lstm_kernels.h" nogil:
    int FASTLSTM_ISA_PORTABLE
    int FASTLSTM_ISA_AVX2
    int FASTLSTM_ISA_AVX512
    int fastlstm_cpu_isa()
    int fastlstm_cpu_amd_family_19h()
    int fastlstm_set_isa(int wanted)
    int fastlstm_isa
    int fastlstm_units_f32()
    int fastlstm_units_f64()
    int fastlstm_team_size()

    int fastlstm_spins_before_sleep
    ctypedef struct fastlstm_barrier:
        pass
    void fastlstm_barrier_init(fastlstm_barrier *barrier)
    int fastlstm_barrier_wait(fastlstm_barrier *barrier, int team)
    int fastlstm_barrier_solo(const fastlstm_barrier *barrier)

    void fastlstm_sigmoid_array_f32(const float *x, float *out, Py_ssize_t n)
    void fastlstm_sigmoid_array_f64(const double *x, double *out, Py_ssize_t n)
    void fastlstm_tanh_array_f32(const float *x, float *out, Py_ssize_t n)
    void fastlstm_tanh_array_f64(const double *x, double *out, Py_ssize_t n)
    void fastlstm_cell_update_f32(float *gates, Py_ssize_t H, const float *c_prev, float *c,
                                  float *h, float *tanh_c, Py_ssize_t u_begin, Py_ssize_t u_end)
    void fastlstm_cell_update_f64(double *gates, Py_ssize_t H, const double *c_prev, double *c,
                                  double *h, double *tanh_c, Py_ssize_t u_begin,
                                  Py_ssize_t u_end)
    void fastlstm_forward_step_f32(const float *packed, Py_ssize_t H, Py_ssize_t rows,
                                   const float *h_prev, float *gates, const float *c_prev,
                                   float *c, float *h, float *tanh_c, Py_ssize_t blk_begin,
                                   Py_ssize_t blk_end, int descending)
    void fastlstm_forward_step_f64(const double *packed, Py_ssize_t H, Py_ssize_t rows,
                                   const double *h_prev, double *gates, const double *c_prev,
                                   double *c, double *h, double *tanh_c, Py_ssize_t blk_begin,
                                   Py_ssize_t blk_end, int descending)
    void fastlstm_backward_cell_f32(const float *gates, Py_ssize_t H, const float *c_prev,
                                    const float *tanh_c, const float *dy, const float *dh,
                                    float *dc, float *da, Py_ssize_t u_begin, Py_ssize_t u_end)
    void fastlstm_backward_cell_f64(const double *gates, Py_ssize_t H, const double *c_prev,
                                    const double *tanh_c, const double *dy, const double *dh,
                                    double *dc, double *da, Py_ssize_t u_begin,
                                    Py_ssize_t u_end)
    void fastlstm_forward_tiles_f32(const float *packed, Py_ssize_t H, const float *h_prev,
                                    float *gates, const float *c_prev, float *c, float *h,
                                    float *tanh_c, Py_ssize_t row_begin, Py_ssize_t row_end,
                                    Py_ssize_t blk_begin, Py_ssize_t blk_end)
    void fastlstm_forward_tiles_f64(const double *packed, Py_ssize_t H, const double *h_prev,
                                    double *gates, const double *c_prev, double *c, double *h,
                                    double *tanh_c, Py_ssize_t row_begin, Py_ssize_t row_end,
                                    Py_ssize_t blk_begin, Py_ssize_t blk_end)
    void fastlstm_project_blocks_f32(const float *packed_x, Py_ssize_t D, Py_ssize_t H,
                                     const float *x, Py_ssize_t rows, const float *b,
                                     float *gates, Py_ssize_t blk_begin, Py_ssize_t blk_end)
    void fastlstm_project_blocks_f64(const double *packed_x, Py_ssize_t D, Py_ssize_t H,
                                     const double *x, Py_ssize_t rows, const double *b,
                                     double *gates, Py_ssize_t blk_begin, Py_ssize_t blk_end)
    int FASTLSTM_PIPE_STEPS
    void fastlstm_forward_step_projecting_f32(const float *packed, Py_ssize_t H,
                                              const float *h_prev, float *gates,
                                              const float *c_prev, float *c, float *h,
                                              float *tanh_c, Py_ssize_t blk_begin,
                                              Py_ssize_t blk_end, const float *packed_x,
                                              Py_ssize_t D, const float *tile_x, const float *b,
                                              float *tile_gates, int phase, int descending)
    void fastlstm_backward_dh_panels_f32(const float *packed_t, Py_ssize_t H, Py_ssize_t rows,
                                         const float *da, float *dh, Py_ssize_t blk_begin,
                                         Py_ssize_t blk_end)
    void fastlstm_backward_dh_panels_f64(const double *packed_t, Py_ssize_t H, Py_ssize_t rows,
                                         const double *da, double *dh, Py_ssize_t blk_begin,
                                         Py_ssize_t blk_end)
    void fastlstm_panel_with_sums_f32(const float *a, Py_ssize_t lda, Py_ssize_t rows,
                                      Py_ssize_t n, float *out, float *sums, int accumulate)
    void fastlstm_panel_with_sums_f64(const double *a, Py_ssize_t lda, Py_ssize_t rows,
                                      Py_ssize_t n, double *out, double *sums, int accumulate)
    void fastlstm_transpose_f32(const float *src, Py_ssize_t lds, Py_ssize_t rows,
                                Py_ssize_t cols, float *dst, Py_ssize_t ldd)
    void fastlstm_transpose_f64(const double *src, Py_ssize_t lds, Py_ssize_t rows,
                                Py_ssize_t cols, double *dst, Py_ssize_t ldd)
    void fastlstm_backward_dh_tiles_f32(const float *packed_t, Py_ssize_t H, const float *da,
                                        float *dh, Py_ssize_t row_begin, Py_ssize_t row_end)
    void fastlstm_backward_dh_tiles_f64(const double *packed_t, Py_ssize_t H, const double *da,
                                        double *dh, Py_ssize_t row_begin, Py_ssize_t row_end)


# ---- instruction set -------------------------------------------------------------------------

#: The kernel builds, in order: each runs on a subset of the CPUs the one before it runs on.
ISAS = ("portable", "avx2", "avx512")


def cpu_isa():
    """The best kernel build this CPU runs: "avx512" (x86-64-v4), "avx2" (AVX2+FMA), "portable"."""
    return ISAS[fastlstm_cpu_isa()]


def _set_isa(str wanted):
    """Run the best kernel build up to `wanted` (a name of ISAS) that the CPU has; returns its name.

    Private: for the tests, which run every build against the reference.
    """
    return ISAS[fastlstm_set_isa(ISAS.index(wanted))]


def _set_barrier_spins(int spins):
    """Polls a waiter at the per-step barrier makes before it sleeps; returns the old count.

    Private: the tests set 0, so that every wait sleeps and the time loops go on with one
    thread after their first step, as they do when the cores are busy elsewhere.
    """
    global fastlstm_spins_before_sleep
    old = fastlstm_spins_before_sleep
    fastlstm_spins_before_sleep = spins
    return old


def isa():
    """The kernel build now in use (a name of ISAS)."""
    return ISAS[fastlstm_isa]


def cpu_has_simd():
    """Whether this CPU runs a vectorised (AVX2+FMA or AVX-512) build of the kernels."""
    return cpu_isa() != "portable"


def simd_active():
    """Whether the kernels now run a vectorised build."""
    return isa() != "portable"


# FASTLSTM_DISABLE_SIMD=1 in the environment at import forces the portable kernels.
_set_isa("portable" if os.environ.get("FASTLSTM_DISABLE_SIMD", "0") not in ("", "0") else "avx512")


# ---- element-wise activations (exposed for the tests) ----------------------------------------

def sigmoid(const floating[::1] x, floating[::1] out):
    """out = 1 / (1 + exp(-x)) with the kernels' activation."""
    with nogil:
        if floating is float:
            fastlstm_sigmoid_array_f32(&x[0], &out[0], x.shape[0])
        else:
            fastlstm_sigmoid_array_f64(&x[0], &out[0], x.shape[0])


def tanh(const floating[::1] x, floating[::1] out):
    """out = tanh(x) with the kernels' activation."""
    with nogil:
        if floating is float:
            fastlstm_tanh_array_f32(&x[0], &out[0], x.shape[0])
        else:
            fastlstm_tanh_array_f64(&x[0], &out[0], x.shape[0])


# ---- packing ---------------------------------------------------------------------------------

cdef inline Py_ssize_t _units(floating *type_tag) noexcept nogil:
    """Hidden units per packed block for this element type and the kernel build in use."""
    return fastlstm_units_f32() if floating is float else fastlstm_units_f64()


cdef inline Py_ssize_t _packed_size(Py_ssize_t K, Py_ssize_t H, Py_ssize_t units) noexcept nogil:
    return (H + units - 1) // units * K * 4 * units


def units_per_block(dtype_size):
    """Hidden units per block of the packed recurrent weights for an element of that size
    (one vector of the kernel build in use)."""
    return fastlstm_units_f32() if dtype_size == 4 else fastlstm_units_f64()


def packed_size(Py_ssize_t K, Py_ssize_t H, dtype_size):
    """Number of elements the packing functions write for K stacked rows and hidden size H."""
    return _packed_size(K, H, units_per_block(dtype_size))


# Rows per pass of the packing loops: a pass reads PACK_ROWS whole rows (S5: 64 x 16 KiB, in L2)
# into every block's panels, rather than one block's column strip down all rows, each row a new
# page (TLB misses: S5 Wh on one thread 9.8 -> 3.0 ms, the transposed one 13 -> 6 ms).
cdef enum:
    PACK_ROWS = 64


cdef inline floating *_pack_panel_rows(floating *out, const floating *rows, Py_ssize_t n_rows,
                                       Py_ssize_t G, Py_ssize_t col, Py_ssize_t H,
                                       Py_ssize_t n, Py_ssize_t units) noexcept nogil:
    """For each of n_rows rows (G values apart) from ``rows``: its n values from col, then from
    col + H, each zero-padded to units, written at out (2·units values a row). Returns the end.
    Whole vectors (32 or 64 bytes) are constant-size copies, a few vector moves: a libc call per
    64 bytes packed S2's [Wx; Wh; b] in 122 µs on one thread, one branch per copy in 89 µs, and
    one branch per run of rows (this) in 0.69x the time of a branch per copy (132 vs 191 µs,
    interleaved, on a slower day; its Wh 63 vs 96 µs)."""
    cdef Py_ssize_t k, q, j
    if n == units and n * sizeof(floating) == 64:
        for k in range(n_rows):
            memcpy(out, rows + k * G + col, 64)
            memcpy(out + units, rows + k * G + col + H, 64)
            out = out + 2 * units
    elif n == units and n * sizeof(floating) == 32:
        for k in range(n_rows):
            memcpy(out, rows + k * G + col, 32)
            memcpy(out + units, rows + k * G + col + H, 32)
            out = out + 2 * units
    else:
        for k in range(n_rows):
            for q in range(2):
                memcpy(out, rows + k * G + col + q * H, n * sizeof(floating))
                for j in range(n, units):
                    out[j] = 0
                out = out + units
    return out


cdef void _pack_blocks(const floating *Wx, Py_ssize_t D, const floating *Wh, const floating *b,
                       Py_ssize_t H, floating *packed, Py_ssize_t blk_begin,
                       Py_ssize_t blk_end) noexcept nogil:
    """Arrange blocks [blk_begin, blk_end) of the K rows of [Wx; Wh; b] (D + H + 1 rows of 4H; a
    NULL part is left out: Wx with D = 0) in panels: per block of U hidden units, K rows of
    [i|f] x U, then K rows of [o|g] x U, zero past H."""
    cdef Py_ssize_t G = 4 * H
    cdef Py_ssize_t H_rows = H if Wh != NULL else 0
    cdef Py_ssize_t K = D + H_rows + (1 if b != NULL else 0)
    cdef Py_ssize_t units = _units(<floating *>NULL)
    cdef Py_ssize_t blk, k_pass, k0, k1, half, n, col
    cdef floating *out
    for k_pass in range((K + PACK_ROWS - 1) // PACK_ROWS):
        k0 = k_pass * PACK_ROWS
        k1 = min(k0 + PACK_ROWS, K)
        for blk in range(blk_begin, blk_end):
            n = min(units, H - blk * units)
            for half in range(2):
                out = packed + ((blk * 2 + half) * K + k0) * 2 * units
                col = 2 * half * H + blk * units
                # rows k0..k1-1 of Wx (k < D), then of Wh, then b (k = D + H_rows)
                if k0 < D:
                    out = _pack_panel_rows(out, Wx + k0 * G, min(k1, D) - k0, G, col, H, n, units)
                if k1 > D and k0 < D + H_rows:
                    out = _pack_panel_rows(out, Wh + (max(k0, D) - D) * G,
                                           min(k1, D + H_rows) - max(k0, D), G, col, H, n, units)
                if k1 > D + H_rows:
                    _pack_panel_rows(out, b, 1, G, col, H, n, units)


cdef void _pack_rows(const floating *Wx, Py_ssize_t D, const floating *Wh, const floating *b,
                     Py_ssize_t H, floating *packed, int n_threads) noexcept nogil:
    """`_pack_blocks` of all blocks, split across n_threads threads as the small-batch time loop
    splits them, so that each thread's panels are where its kernels read them."""
    cdef Py_ssize_t n_blocks = (H + _units(<floating *>NULL) - 1) // _units(<floating *>NULL)
    cdef int team
    with parallel(num_threads=n_threads):
        team = fastlstm_team_size()
        _pack_blocks(Wx, D, Wh, b, H, packed, _bound(n_blocks, team, threadid(), 1),
                     _bound(n_blocks, team, threadid() + 1, 1))


def pack_recurrent_weights(const floating[:, ::1] Wh, floating[::1] packed, int n_threads=1):
    """Arrange Wh (H, 4H) for the small-batch forward kernels (`_pack_rows` over K = H rows):

    packed[(((blk * 2 + half) * H + k) * 2 + q2) * U + j] = Wh[k, (2 * half + q2) * H + blk * U + j],
    0 where that unit >= H; packed has packed_size(H, H, itemsize) elements.
    """
    cdef Py_ssize_t H = Wh.shape[0]
    if packed.shape[0] != _packed_size(H, H, _units(<floating *>NULL)):
        raise ValueError("packed must have packed_size(H, H) elements")
    with nogil:
        _pack_rows(<const floating *>NULL, 0, &Wh[0, 0], <const floating *>NULL, H, &packed[0],
                   n_threads)


def pack_input_weights(const floating[:, ::1] Wx, floating[::1] packed, int n_threads=1):
    """Arrange Wx (D, 4H) for the small-batch forward kernels' input projection as
    `pack_recurrent_weights` arranges Wh, with K = D rows (`_pack_rows`); packed has
    packed_size(D, H, itemsize) elements."""
    cdef Py_ssize_t D = Wx.shape[0], H = Wx.shape[1] // 4
    if packed.shape[0] != _packed_size(D, H, _units(<floating *>NULL)):
        raise ValueError("packed must have packed_size(D, H) elements")
    with nogil:
        _pack_rows(&Wx[0, 0], D, <const floating *>NULL, <const floating *>NULL, H, &packed[0],
                   n_threads)


def pack_stacked_weights(const floating[:, ::1] Wx, const floating[:, ::1] Wh,
                         const floating[::1] b, floating[::1] packed, int n_threads=1):
    """Arrange [Wx; Wh; b] (K = D + H + 1 rows, 4H columns) for the kernels that take the input,
    the state and a constant 1 in one product (`_pack_rows`):

    packed[(((blk * 2 + half) * K + k) * 2 + q2) * U + j] = stacked[k, (2 * half + q2) * H + blk * U + j],
    0 where that unit >= H; packed has packed_size(K, H, itemsize) elements.
    """
    cdef Py_ssize_t D = Wx.shape[0], H = Wh.shape[0]
    if packed.shape[0] != _packed_size(D + H + 1, H, _units(<floating *>NULL)):
        raise ValueError("packed must have packed_size(D + H + 1, H) elements")
    with nogil:
        _pack_rows(&Wx[0, 0], D, &Wh[0, 0], &b[0], H, &packed[0], n_threads)


def packed_transposed_size(Py_ssize_t H, dtype_size):
    """Number of elements of Wh.T arranged for the backward (`_pack_transposed_blocks`) at
    hidden size H."""
    cdef Py_ssize_t width = 2 * units_per_block(dtype_size)
    return (H + width - 1) // width * width * 4 * H


cdef inline void _transpose(const floating *src, Py_ssize_t lds, Py_ssize_t rows,
                            Py_ssize_t cols, floating *dst, Py_ssize_t ldd) noexcept nogil:
    """dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: vector tiles in registers."""
    if floating is float:
        fastlstm_transpose_f32(src, lds, rows, cols, dst, ldd)
    else:
        fastlstm_transpose_f64(src, lds, rows, cols, dst, ldd)


cdef void _pack_transposed_blocks(const floating *W, Py_ssize_t H, Py_ssize_t G,
                                  floating *packed_t, Py_ssize_t blk_begin,
                                  Py_ssize_t blk_end) noexcept nogil:
    """W.T for W (H, G), blocks [blk_begin, blk_end) of N = 2U of W's rows:
    packed_t[(blk * G + k) * N + j] = W[blk * N + j, k], 0 where blk * N + j >= H."""
    cdef Py_ssize_t width = 2 * _units(<floating *>NULL)
    cdef Py_ssize_t blk, k, j, n
    cdef floating *out
    for blk in range(blk_begin, blk_end):
        n = min(width, H - blk * width)
        out = packed_t + blk * G * width
        _transpose(W + blk * width * G, G, n, G, out, width)
        if n < width:  # the last block: zeros past H
            for k in range(G):
                for j in range(n, width):
                    out[k * width + j] = 0


cdef void _pack_transposed(const floating *W, Py_ssize_t H, Py_ssize_t G, floating *packed_t,
                           int n_threads) noexcept nogil:
    """`_pack_transposed_blocks` of all blocks, split across n_threads threads as the
    small-batch backward loop splits them."""
    cdef Py_ssize_t width = 2 * _units(<floating *>NULL)
    cdef Py_ssize_t n_blocks = (H + width - 1) // width
    cdef int team
    with parallel(num_threads=n_threads):
        team = fastlstm_team_size()
        _pack_transposed_blocks(W, H, G, packed_t, _bound(n_blocks, team, threadid(), 1),
                                _bound(n_blocks, team, threadid() + 1, 1))


# ---- helpers ---------------------------------------------------------------------------------


cdef inline Py_ssize_t _bound(Py_ssize_t n, int parts, int part, Py_ssize_t grain) noexcept nogil:
    """Start of share `part` of `parts` near-equal shares of range(n), cut at multiples of grain.

    Share p is [_bound(.., p, ..), _bound(.., p + 1, ..)). (Returned, not written through a
    pointer: Cython makes a variable thread-private only where the parallel block assigns it.)
    """
    cdef Py_ssize_t chunks = (n + grain - 1) // grain
    return min(n, chunks * part // parts * grain)


# Rows per thread below which a product over all T·B rows splits its output columns across the
# threads instead of its rows: OpenBLAS on one thread runs short, wide operands slowly. Measured,
# float32, one thread, µs for one thread's share of 2: S2's projection (100 rows, K = 256,
# 4H = 1024) 286-304 by columns vs 305-349 by rows, S2's dx (K = 1024, D = 256) 312-352 vs
# 413-465; 400 rows 1075 vs 1145-1155; at S3 (1600 rows) 2156-2219 vs 2105-2114. Two threads,
# paired runs in one process: S2 forward+backward 2.68 vs 2.85 ms, forward 0.964 vs 0.997, S1
# level.
cdef enum:
    COLUMN_SPLIT_MAX_ROWS = 512


cdef inline bint _split_columns(Py_ssize_t rows, int team) noexcept nogil:
    return rows < COLUMN_SPLIT_MAX_ROWS * team


# ---- forward ---------------------------------------------------------------------------------

# Fewest rows for which a thread's forward step runs register tiles rather than row pairs
# (forward_step): one thread, (T, D, H) = (50, 256, 256), B=2 1.61 vs 1.73 ms, B=4 2.96 vs 2.57.
cdef enum:
    TILE_MIN_ROWS = 4


cdef inline void _keep_last_cells(const floating *c, floating *c_last,
                                  const Py_ssize_t *last_steps, Py_ssize_t t,
                                  Py_ssize_t row_begin, Py_ssize_t row_end, Py_ssize_t u_begin,
                                  Py_ssize_t u_end, Py_ssize_t H) noexcept nogil:
    """c_last[row, u_begin:u_end] = c[row, u_begin:u_end] for the rows whose last step is t.

    For padded batches (``last_steps`` NULL: nothing to do). Each thread copies what it just
    computed, so this adds no synchronisation; the scan costs B compares a step.
    """
    cdef Py_ssize_t row
    if last_steps == NULL or u_end <= u_begin:
        return
    for row in range(row_begin, row_end):
        if last_steps[row] == t:
            memcpy(c_last + row * H + u_begin, c + row * H + u_begin,
                   (u_end - u_begin) * sizeof(floating))


cdef inline void _wait_for_solo_thread(fastlstm_barrier *barrier) noexcept nogil:
    """After a time loop that went on with thread 0 alone: the threads that left wait here
    (asleep after a short spin) until thread 0 is done too. At the end of the parallel region
    OpenMP spins for milliseconds instead, on a core that thread 0 may share (a worker woken
    after 50 ms idle was often placed on the caller's core): S1 forward calls 50 ms apart had
    a 90th percentile of 9.7-10 ms with that spin, 2.0-5.2 ms with this wait."""
    fastlstm_barrier_wait(barrier, fastlstm_team_size())


cdef inline void _project_blocks(const floating *packed_x, Py_ssize_t D, Py_ssize_t H,
                                 const floating *x, Py_ssize_t rows, const floating *b,
                                 floating *gates, Py_ssize_t blk_begin,
                                 Py_ssize_t blk_end) noexcept nogil:
    if floating is float:
        fastlstm_project_blocks_f32(packed_x, D, H, x, rows, b, gates, blk_begin, blk_end)
    else:
        fastlstm_project_blocks_f64(packed_x, D, H, x, rows, b, gates, blk_begin, blk_end)


# Where the B = 1 forward steps carry the input projection of later steps: "auto" where
# measured faster (`_steps_carry_projection`), "always" wherever the kernel runs, whatever the
# CPU (so that the tests check it on any AVX-512 CPU), "never".
PROJECTION_IN_STEPS = ("never", "auto", "always")
cdef int projection_in_steps = 1


def _set_projection_in_steps(str mode):
    """Set where the B = 1 forward steps carry the input projection of later steps (a name of
    PROJECTION_IN_STEPS); returns the old setting. Private: for the tests, which check that
    every way gives the same bits."""
    global projection_in_steps
    old = PROJECTION_IN_STEPS[projection_in_steps]
    projection_in_steps = PROJECTION_IN_STEPS.index(mode)
    return old


#: Whether this CPU is an AMD one of family 19h (with AVX-512: Zen 4, whose vector units take
#: two passes for a 512-bit instruction).
CPU_AMD_FAMILY_19H = bool(fastlstm_cpu_amd_family_19h())
cdef bint cpu_amd_family_19h = CPU_AMD_FAMILY_19H


cdef inline bint _steps_carry_projection(Py_ssize_t itemsize, Py_ssize_t B, Py_ssize_t D,
                                         Py_ssize_t H, int n_threads) noexcept nogil:
    """Whether the forward steps carry the input projection of later steps
    (forward_step_projecting), rather than all of it coming before the time loop: in float32
    at B = 1 on one thread (as the back-off runs calls when the cores are busy), on the AVX-512
    build, for D >= H / 2, on Zen 4 (AMD family 19h): the CPU where it was measured faster.

    Measured, float32, T = 100, median of per-round ratios of the two ways in one process
    (`_set_projection_in_steps`). On Zen 4, one thread: (D, H) = (64, 128) 0.95-0.97, (256, 256)
    0.88-0.99, quiet machine or busy. Two threads, where every step ends at a barrier: on a
    quiet machine (GEMM peak ~200 GFLOP/s) (256, 256) 0.93, (512, 512) 0.91, (128, 128) 0.95,
    (64, 128) 1.00, (64, 256) 1.02; on a busy one (peak 163-191) (256, 256) 0.98-1.24 over seven
    sets, (64, 128) 1.03-1.07: the work moved into the steps waits for the slower of the two
    threads at every step. The AVX2 build, whose 16 vector registers cannot hold the 20
    accumulators, ran 1.42-1.45x slower; float64 on AVX-512 (twice the blocks and bytes of Wh
    a step) 1.07x at (64, 128) and 1.04x at (256, 256), two threads. On Zen 5 (512-bit vector
    units, twice Zen 4's multiply-adds a cycle), carried against up front: one thread, through
    `LSTM`, (64, 128) 1.07x (1.05-1.23 over 10 rounds), (256, 256) 1.18x (1.15-1.34); two
    threads, through `lstm_forward`, alternating processes, (256, 256) 1.10-1.15x (3 pairs).
    """
    return (projection_in_steps != 0 and itemsize == 4 and B == 1 and n_threads == 1
            and fastlstm_isa == FASTLSTM_ISA_AVX512 and 2 * D >= H
            and (projection_in_steps == 2 or cpu_amd_family_19h))


def steps_carry_projection(dtype_size, Py_ssize_t B, Py_ssize_t D, Py_ssize_t H,
                           int n_threads):
    """Whether `forward` on elements of dtype_size bytes, at batch size B, input size D, hidden
    size H and on n_threads threads has its time steps compute the input projection of later
    steps (with the kernel build in use)."""
    return _steps_carry_projection(dtype_size, B, D, H, n_threads)


cdef bint _forward_matvec(const floating *x, const floating *packed_x, const floating *b,
                          const floating *packed, const floating *h0, const floating *c0,
                          floating *gates, floating *y, floating *c_store, floating *tanh_c,
                          Py_ssize_t T, Py_ssize_t B, Py_ssize_t D, Py_ssize_t H,
                          bint keep_history, int n_threads, const Py_ssize_t *last_steps,
                          floating *c_last, const floating *Wx, const floating *Wh) noexcept nogil:
    """The input projection and the time loop: threads split the hidden-unit blocks, one
    barrier a step. Returns whether it went on with thread 0 alone (a partner thread was absent).

    Wx, Wh (NULL when packed before): each thread first packs its own blocks of Wx into packed_x
    and, after its projection, of Wh into packed (the panels of `_pack_blocks`), in this region.
    Against packing both in calls and parallel regions of their own before, float32, 2 threads,
    `lstm_forward`, median of per-pair ratios of alternating processes (16 pairs): S1 0.945
    (0.926-0.985), S2 0.970 (0.83-1.68); a call at T = B = D = 1, H = 16 took 12.6 µs, not 16.1.

    Each thread projects all T·B rows of x onto its own blocks' gate columns by register tiles
    (`packed_x`) before its time loop, which then reads only gate values its own core wrote.
    Before, one OpenBLAS GEMM in a region of its own split the columns in halves (thread 0 gates
    i and f of every unit, thread 1 o and g). One thread's half, float32, best of 200-400: S1 (100
    rows, D = 64) 31-34 µs here vs 38 µs by OpenBLAS, S2 (D = 256) 232-237 vs 286 µs. Whole
    forward calls, 2 threads, median of the per-pair ratios of alternating processes: S1 0.94x
    (25 pairs), S2 0.93x (20 pairs), through `lstm_forward` and through `LSTM` alike.

    Where `_steps_carry_projection` says so (float32, B = 1, one thread), the thread
    projects only the first tile of steps and the rows past the last whole tile up front; the
    steps of each tile then compute the next tile's projection between their loads of Wh.
    """
    cdef Py_ssize_t units = _units(<floating *>NULL)
    cdef Py_ssize_t n_blocks = (H + units - 1) // units
    cdef Py_ssize_t G = 4 * H
    cdef Py_ssize_t BH = B * H
    cdef Py_ssize_t blk_begin, blk_end, t
    cdef int team
    cdef const floating *h_prev
    cdef const floating *c_prev
    cdef floating *c
    cdef floating *tc
    cdef bint went_solo
    cdef fastlstm_barrier barrier
    # At B = 1, tiles 1 .. carried_tiles of FASTLSTM_PIPE_STEPS rows are projected by the steps
    # of the tile before each (forward_step_projecting); rows from `tail` on, up front.
    cdef Py_ssize_t tile, carried_tiles = 0, tail = 0
    if _steps_carry_projection(sizeof(floating), B, D, H, n_threads):
        carried_tiles = max(0, T // FASTLSTM_PIPE_STEPS - 1)
        tail = (carried_tiles + 1) * FASTLSTM_PIPE_STEPS
    fastlstm_barrier_init(&barrier)
    with parallel(num_threads=n_threads):
        team = fastlstm_team_size()
        blk_begin = _bound(n_blocks, team, threadid(), 1)
        blk_end = _bound(n_blocks, team, threadid() + 1, 1)
        went_solo = False
        if Wx != NULL:
            _pack_blocks(Wx, D, <const floating *>NULL, <const floating *>NULL, H,
                         <floating *>packed_x, blk_begin, blk_end)
        # gates[:, this thread's units] = x @ Wx[:, those units] + b: all rows here, or at B = 1
        # the first tile and the rows past the last whole tile, the steps carrying the rest
        if carried_tiles == 0:
            _project_blocks(packed_x, D, H, x, T * B, b, gates, blk_begin, blk_end)
        else:
            _project_blocks(packed_x, D, H, x, FASTLSTM_PIPE_STEPS, b, gates, blk_begin, blk_end)
            _project_blocks(packed_x, D, H, x + tail * D, T - tail, b, gates + tail * G,
                            blk_begin, blk_end)
        # after the projection, whose panels would push these out of this core's L2
        if Wh != NULL:
            _pack_blocks(<const floating *>NULL, 0, Wh, <const floating *>NULL, H,
                         <floating *>packed, blk_begin, blk_end)
        for t in range(T):
            h_prev = h0 if t == 0 else y + (t - 1) * BH
            c = c_store + t * BH if keep_history else c_store
            c_prev = (c0 if t == 0 else c - BH) if keep_history else c
            tc = tanh_c + t * BH if keep_history else NULL
            # gates[t] += h_prev @ Wh, then the cell update, for this thread's units
            tile = t // FASTLSTM_PIPE_STEPS + 1
            if floating is float and tile <= carried_tiles:
                fastlstm_forward_step_projecting_f32(
                    packed, H, h_prev, gates + t * G, c_prev, c, y + t * H, tc, blk_begin,
                    blk_end, packed_x, D, x + tile * FASTLSTM_PIPE_STEPS * D, b,
                    gates + tile * FASTLSTM_PIPE_STEPS * G, t % FASTLSTM_PIPE_STEPS, t & 1)
            elif B >= TILE_MIN_ROWS:
                if floating is float:
                    fastlstm_forward_tiles_f32(packed, H, h_prev, gates + t * B * G, c_prev, c,
                                               y + t * BH, tc, 0, B, blk_begin, blk_end)
                else:
                    fastlstm_forward_tiles_f64(packed, H, h_prev, gates + t * B * G, c_prev, c,
                                               y + t * BH, tc, 0, B, blk_begin, blk_end)
            elif floating is float:
                fastlstm_forward_step_f32(packed, H, B, h_prev, gates + t * B * G, c_prev, c,
                                          y + t * BH, tc, blk_begin, blk_end, t & 1)
            else:
                fastlstm_forward_step_f64(packed, H, B, h_prev, gates + t * B * G, c_prev, c,
                                          y + t * BH, tc, blk_begin, blk_end, t & 1)
            _keep_last_cells(c, c_last, last_steps, t, 0, B, blk_begin * units,
                             min(H, blk_end * units), H)
            if fastlstm_barrier_wait(&barrier, team):
                # the cores are busy elsewhere: thread 0 finishes the sequence alone
                went_solo = True
                if threadid() != 0:
                    break
                team = 1
                blk_begin = 0
                blk_end = n_blocks
        if went_solo:
            _wait_for_solo_thread(&barrier)
    return fastlstm_barrier_solo(&barrier)


def forward(const floating[:, :, ::1] x, const floating[::1] packed_x, const floating[::1] b,
            const floating[::1] packed, const floating[:, ::1] h0,
            const floating[:, ::1] c0, floating[:, :, ::1] gates, floating[:, :, ::1] y,
            floating[:, :, ::1] c_store, floating[:, :, ::1] tanh_c, int n_threads,
            const Py_ssize_t[::1] last_steps=None, floating[:, ::1] c_last=None,
            const floating[:, ::1] Wx=None, const floating[:, ::1] Wh=None):
    """LSTM forward pass of a small batch (threads split the hidden units) into preallocated
    arrays.

    Inputs: x (T, B, D), packed_x: Wx (D, 4H) arranged by `pack_input_weights`, b (4H,),
    packed: Wh (H, 4H) arranged by `pack_recurrent_weights`, h0, c0 (B, H).
    Outputs: gates (T, B, 4H): the activated gates i, f, o, g; y (T, B, H);
    c_store: (T, B, H) cell states of every step, or (1, B, H) holding c0 on entry and c_T on
    exit when no history is kept; tanh_c: (T, B, H) tanh of every cell state, or an empty array
    when no history is kept. Uses no BLAS.
    Optional, for padded batches: last_steps (B,) and c_last (B, H): c_last[row] receives the
    cell state after step last_steps[row] (rows whose last step is outside [0, T) keep theirs).
    Optional, both or neither: Wx (D, 4H) and Wh (H, 4H), which the threads then pack into
    packed_x and packed (outputs then, writable) as those functions arrange them, each thread
    its own blocks, in the time loop's parallel region.
    Returns whether the time loop went on with one thread (a partner thread was absent).
    """
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], D = x.shape[2], H = h0.shape[1]
    cdef bint keep_history = tanh_c.shape[0] > 0
    cdef floating *tanh_c_ptr = &tanh_c[0, 0, 0] if keep_history else NULL
    cdef const Py_ssize_t *last_steps_ptr = _last_steps(last_steps, c_last, B, H)
    cdef floating *c_last_ptr = &c_last[0, 0] if last_steps_ptr != NULL else NULL
    cdef bint went_solo
    if (packed_x.shape[0] != _packed_size(D, H, _units(<floating *>NULL))
            or packed.shape[0] != _packed_size(H, H, _units(<floating *>NULL))):
        raise ValueError("packed_x must have packed_size(D, H) elements and packed "
                         "packed_size(H, H)")
    if (Wx is None) != (Wh is None):
        raise ValueError("Wx and Wh must be given together")
    if Wx is not None:
        if (Wx.shape[0] != D or Wx.shape[1] != 4 * H or Wh.shape[0] != H
                or Wh.shape[1] != 4 * H):
            raise ValueError(f"Wx must have shape ({D}, {4 * H}) and Wh ({H}, {4 * H}); got "
                             f"({Wx.shape[0]}, {Wx.shape[1]}) and ({Wh.shape[0]}, {Wh.shape[1]})")
        if memoryview(packed_x.base).readonly or memoryview(packed.base).readonly:
            raise ValueError("packed_x and packed must be writable to pack Wx and Wh into")
    with nogil:
        went_solo = _forward_matvec(&x[0, 0, 0], &packed_x[0], &b[0], &packed[0], &h0[0, 0],
                                    &c0[0, 0], &gates[0, 0, 0], &y[0, 0, 0], &c_store[0, 0, 0],
                                    tanh_c_ptr, T, B, D, H, keep_history, n_threads,
                                    last_steps_ptr, c_last_ptr,
                                    &Wx[0, 0] if Wx is not None else NULL,
                                    &Wh[0, 0] if Wh is not None else NULL)
    return went_solo


cdef const Py_ssize_t *_last_steps(const Py_ssize_t[::1] last_steps, floating[:, ::1] c_last,
                                   Py_ssize_t B, Py_ssize_t H) except? NULL:
    """The last_steps pointer of the forward functions (NULL without one), shapes checked."""
    if last_steps is None:
        return NULL
    if c_last is None or last_steps.shape[0] != B or c_last.shape[0] != B \
            or c_last.shape[1] != H:
        raise ValueError("last_steps must have shape (B,) and c_last (B, H)")
    return &last_steps[0]


cdef void _forward_stacked(const floating *packed, const floating *x, const floating *h0,
                           const floating *c0, floating *xh, floating *gates, floating *y,
                           floating *c_store, floating *tanh_c, Py_ssize_t T, Py_ssize_t B,
                           Py_ssize_t D, Py_ssize_t H, bint keep_history, int n_threads,
                           const Py_ssize_t *last_steps, floating *c_last) noexcept nogil:
    """The time loop for batches: threads split the batch rows and never synchronise; a row's
    step is one product [x_t, h_{t-1}, 1] @ [Wx; Wh; b] (`_step_blocks`)."""
    cdef Py_ssize_t K = D + H + 1
    cdef Py_ssize_t n_blocks = (H + _units(<floating *>NULL) - 1) // _units(<floating *>NULL)
    cdef Py_ssize_t BH = B * H, G = 4 * H
    cdef Py_ssize_t row_begin, row_end, t, row
    cdef const floating *h_prev
    cdef const floating *c_prev
    cdef floating *c
    cdef floating *g
    cdef floating *tc
    with parallel(num_threads=n_threads):
        row_begin = _bound(B, fastlstm_team_size(), threadid(), 1)
        row_end = _bound(B, fastlstm_team_size(), threadid() + 1, 1)
        for t in range(T):
            h_prev = h0 if t == 0 else y + (t - 1) * BH
            c = c_store + t * BH if keep_history else c_store
            c_prev = (c0 if t == 0 else c - BH) if keep_history else c
            g = gates + t * B * G if keep_history else gates
            tc = tanh_c + t * BH if keep_history else NULL
            for row in range(row_begin, row_end):
                memcpy(xh + row * K, x + (t * B + row) * D, D * sizeof(floating))
                memcpy(xh + row * K + D, h_prev + row * H, H * sizeof(floating))
                xh[row * K + K - 1] = 1
                if keep_history:  # the cell update runs in place, on c_t = c_{t-1}
                    memcpy(c + row * H, c_prev + row * H, H * sizeof(floating))
            _step_blocks(packed, xh + row_begin * K, g + row_begin * G, c + row_begin * H,
                         y + t * BH + row_begin * H, tc + row_begin * H if tc != NULL else NULL,
                         row_end - row_begin, K, H, 0, n_blocks)
            _keep_last_cells(c, c_last, last_steps, t, row_begin, row_end, 0, H, H)


def forward_stacked(const floating[:, :, ::1] x, const floating[::1] packed,
                    const floating[:, ::1] h0, const floating[:, ::1] c0, floating[:, ::1] xh,
                    floating[:, :, ::1] gates, floating[:, :, ::1] y,
                    floating[:, :, ::1] c_store, floating[:, :, ::1] tanh_c, int n_threads,
                    const Py_ssize_t[::1] last_steps=None, floating[:, ::1] c_last=None):
    """LSTM forward pass of a batch (threads split the rows) into preallocated arrays.

    Inputs: x (T, B, D), packed: [Wx; Wh; b] arranged by `pack_stacked_weights`, h0, c0 (B, H).
    Scratch: xh (B, D + H + 1). Outputs as `forward`, except gates: (T, B, 4H) activated gates
    when a history is kept, else (1, B, 4H) scratch. Uses no BLAS.
    """
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], D = x.shape[2], H = h0.shape[1]
    cdef bint keep_history = tanh_c.shape[0] > 0
    cdef floating *tanh_c_ptr = &tanh_c[0, 0, 0] if keep_history else NULL
    cdef const Py_ssize_t *last_steps_ptr = _last_steps(last_steps, c_last, B, H)
    cdef floating *c_last_ptr = &c_last[0, 0] if last_steps_ptr != NULL else NULL
    with nogil:
        _forward_stacked(&packed[0], &x[0, 0, 0], &h0[0, 0], &c0[0, 0], &xh[0, 0],
                         &gates[0, 0, 0], &y[0, 0, 0], &c_store[0, 0, 0], tanh_c_ptr, T, B, D,
                         H, keep_history, n_threads, last_steps_ptr, c_last_ptr)


# ---- backward --------------------------------------------------------------------------------

cdef extern from "csrc/step_kernels.h" nogil:
    void fastlstm_gemm_tile_f32(int mr, Py_ssize_t K, const float *a, Py_ssize_t lda,
                                const float *panel, float *c_lo, Py_ssize_t n_lo, float *c_hi,
                                Py_ssize_t n_hi, Py_ssize_t ldc, int accumulate)
    void fastlstm_gemm_tile_f64(int mr, Py_ssize_t K, const double *a, Py_ssize_t lda,
                                const double *panel, double *c_lo, Py_ssize_t n_lo,
                                double *c_hi, Py_ssize_t n_hi, Py_ssize_t ldc, int accumulate)



cdef inline const floating *_c_prev(const floating *c0, const floating *c_all, Py_ssize_t t,
                                    Py_ssize_t row, Py_ssize_t B, Py_ssize_t H) noexcept nogil:
    """c_{t-1} of one row: c0 at t = 0, else the stored cell state of step t-1."""
    return c0 + row * H if t == 0 else c_all + ((t - 1) * B + row) * H


cdef bint _backward_matvec(floating *packed_t, const floating *c0,
                           const floating *gates, const floating *c_all, const floating *tanh_c,
                           const floating *dy, floating *da, floating *dh, floating *dc,
                           Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, int n_threads,
                           const floating *Wh) noexcept nogil:
    """BPTT time loop for small batches: threads split the hidden units, one barrier a step.
    Returns whether it went on with thread 0 alone (a partner thread was absent). Each thread
    first arranges its own panels of Wh.T into packed_t (`_pack_transposed_blocks`).

    A thread's da entries (its units, all four gates) need only its own units of dh and dc; its
    units of dh_{t-1} need all of da_t, hence the barrier between; da_t has its own slot per
    step, so the next step may start while the other thread still reads da_t.
    """
    cdef Py_ssize_t G = 4 * H
    cdef Py_ssize_t width = 2 * _units(<floating *>NULL)
    cdef Py_ssize_t n_panels = (H + width - 1) // width
    cdef Py_ssize_t u_begin, u_end, blk_begin, blk_end, t, row, step
    cdef int team
    cdef bint went_solo
    cdef fastlstm_barrier barrier
    fastlstm_barrier_init(&barrier)
    with parallel(num_threads=n_threads):
        team = fastlstm_team_size()
        blk_begin = _bound(n_panels, team, threadid(), 1)
        blk_end = _bound(n_panels, team, threadid() + 1, 1)
        u_begin = min(H, blk_begin * width)
        u_end = min(H, blk_end * width)
        went_solo = False
        _pack_transposed_blocks(Wh, H, G, packed_t, blk_begin, blk_end)
        for t in range(T - 1, -1, -1):
            for row in range(B):
                step = t * B + row
                if floating is float:
                    fastlstm_backward_cell_f32(gates + step * G, H, _c_prev(c0, c_all, t, row, B, H),
                                               tanh_c + step * H, dy + step * H, dh + row * H,
                                               dc + row * H, da + step * G, u_begin, u_end)
                else:
                    fastlstm_backward_cell_f64(gates + step * G, H, _c_prev(c0, c_all, t, row, B, H),
                                               tanh_c + step * H, dy + step * H, dh + row * H,
                                               dc + row * H, da + step * G, u_begin, u_end)
            if fastlstm_barrier_wait(&barrier, team):
                # the cores are busy elsewhere: thread 0 finishes the sequence alone
                went_solo = True
                if threadid() != 0:
                    break
                team = 1
                u_begin = 0
                u_end = H
                blk_begin = 0
                blk_end = n_panels
            # dh[:, units] = da[t] @ Wh.T[:, units]
            if floating is float:
                fastlstm_backward_dh_panels_f32(packed_t, H, B, da + t * B * G, dh, blk_begin,
                                                blk_end)
            else:
                fastlstm_backward_dh_panels_f64(packed_t, H, B, da + t * B * G, dh, blk_begin,
                                                blk_end)
        if went_solo:
            _wait_for_solo_thread(&barrier)
    return fastlstm_barrier_solo(&barrier)


cdef void _backward_batch(const floating *packed_t, const floating *c0, const floating *gates,
                          const floating *c_all, const floating *tanh_c, const floating *dy,
                          floating *da, floating *dh, floating *dc, Py_ssize_t T, Py_ssize_t B,
                          Py_ssize_t H, int n_threads) noexcept nogil:
    """BPTT time loop for batches: threads split the batch rows and never synchronise."""
    cdef Py_ssize_t G = 4 * H
    cdef Py_ssize_t row_begin, row_end, t, row, step
    with parallel(num_threads=n_threads):
        row_begin = _bound(B, fastlstm_team_size(), threadid(), 1)
        row_end = _bound(B, fastlstm_team_size(), threadid() + 1, 1)
        for t in range(T - 1, -1, -1):
            for row in range(row_begin, row_end):
                step = t * B + row
                if floating is float:
                    fastlstm_backward_cell_f32(gates + step * G, H, _c_prev(c0, c_all, t, row, B, H),
                                               tanh_c + step * H, dy + step * H, dh + row * H,
                                               dc + row * H, da + step * G, 0, H)
                else:
                    fastlstm_backward_cell_f64(gates + step * G, H, _c_prev(c0, c_all, t, row, B, H),
                                               tanh_c + step * H, dy + step * H, dh + row * H,
                                               dc + row * H, da + step * G, 0, H)
            # dh[rows] = da[t, rows] @ Wh.T
            if floating is float:
                fastlstm_backward_dh_tiles_f32(packed_t, H, da + t * B * G, dh, row_begin,
                                               row_end)
            else:
                fastlstm_backward_dh_tiles_f64(packed_t, H, da + t * B * G, dh, row_begin,
                                               row_end)


# Rows T·B up to which the weight gradients run on the register tiles rather than BLAS, on the
# AVX2 and portable builds: OpenBLAS ran these short products (K = T·B) at 40-70 GFLOP/s on one
# thread at S1 (T·B = 100), and longer ones gained less for a scratch as large as da (forward+
# backward, 2 threads, on a Zen 4 machine: S3, 1600 rows, 22.9 -> 22.0 ms; S4, 6400 rows, 430 ->
# 418 ms). Here, on Zen 5, where OpenBLAS runs its AVX2 kernels, the AVX2 tiles at S4 took
# 1.01-1.05x BLAS's time. The AVX-512 build runs every length on the tiles: on Zen 5 (whose
# AVX-512 units are twice as wide as its AVX2 ones) forward+backward, median of 5 calls in
# separate processes, took 283-289 ms on BLAS and 195-201 ms on the tiles in chunks at S4, and
# 526-528 and 400-407 ms at S5. (The scratch comes from the caller: malloc'd per call it was
# page-faulted in every time, T·B = 500 25% slower.)
cdef enum:
    TILED_GRADIENTS_MAX_ROWS = 2048
    # Longer products run in chunks of at most this many rows, each adding to the sums of the
    # ones before, so that the scratch stays within 2048·(4H + D + H) values plus Wx.T. (Chunks
    # of 512 or 1024 rows were 2-6% slower at S4 and 1-4% at S3.)
    TILED_GRADIENTS_CHUNK_ROWS = 2048


cdef inline bint _tiled_gradients(Py_ssize_t rows) noexcept nogil:
    """Whether the weight gradients over `rows` rows (T·B) run on the register tiles."""
    return rows <= TILED_GRADIENTS_MAX_ROWS or fastlstm_isa == FASTLSTM_ISA_AVX512


cdef inline Py_ssize_t _chunk_rows(Py_ssize_t rows) noexcept nogil:
    """Rows of each chunk of the tiled weight gradients (the last may have fewer): the rows in
    the fewest chunks of at most TILED_GRADIENTS_CHUNK_ROWS, near-equal, so that the chunks
    depend on the shape alone, never on the threads."""
    cdef Py_ssize_t chunks = max(1, (rows + TILED_GRADIENTS_CHUNK_ROWS - 1)
                                 // TILED_GRADIENTS_CHUNK_ROWS)
    return (rows + chunks - 1) // chunks


cdef inline void _tile(int mr, Py_ssize_t K, const floating *a, Py_ssize_t lda,
                       const floating *panel, floating *c, Py_ssize_t n, Py_ssize_t units,
                       Py_ssize_t ldc, bint accumulate) noexcept nogil:
    """c[r·ldc + j] (+)= Σ_k a[r·lda + k] · panel[k·2U + j] for r < mr, j < n <= 2U (U = units):
    added to c's values with accumulate, else written over them."""
    if floating is float:
        fastlstm_gemm_tile_f32(mr, K, a, lda, panel, c, min(n, units), c + units,
                               max(0, n - units), ldc, accumulate)
    else:
        fastlstm_gemm_tile_f64(mr, K, a, lda, panel, c, min(n, units), c + units,
                               max(0, n - units), ldc, accumulate)


cdef void _panel_product(const floating *a, Py_ssize_t rows, Py_ssize_t K,
                         const floating *panel, floating *out, Py_ssize_t n, Py_ssize_t ldo,
                         bint accumulate) noexcept nogil:
    """out[:, :n] (+)= a (rows, K) @ panel, the panel K rows x 2U columns of which the first
    n <= 2U are wanted, out's rows ldo apart; added to out's values with accumulate."""
    cdef Py_ssize_t units = _units(<floating *>NULL)
    cdef Py_ssize_t r = 0, tiles
    cdef int mr
    while r < rows:
        tiles = (rows - r + 5) // 6
        mr = <int>((rows - r + tiles - 1) // tiles)
        _tile(mr, K, a + r * K, K, panel, out + r * ldo, n, units, ldo, accumulate)
        r += mr


cdef void _panel_products(const floating *a, Py_ssize_t rows, Py_ssize_t K,
                          const floating *panels, floating *out, Py_ssize_t N,
                          Py_ssize_t p_begin, Py_ssize_t p_end, bint accumulate) noexcept nogil:
    """out[:, panel p's columns] (+)= a (rows, K) @ P for p in [p_begin, p_end), P (K, N)
    arranged in panels of K rows x 2U columns (zero past N), out (rows, N); added to out's
    values with accumulate."""
    cdef Py_ssize_t width = 2 * _units(<floating *>NULL)
    cdef Py_ssize_t p
    for p in range(p_begin, p_end):
        _panel_product(a, rows, K, panels + p * K * width, out + p * width,
                       min(width, N - p * width), N, accumulate)


cdef inline Py_ssize_t _tiled_gradients_size(Py_ssize_t T, Py_ssize_t B, Py_ssize_t D,
                                             Py_ssize_t H, Py_ssize_t width,
                                             int n_threads) noexcept nogil:
    """Scratch values of `_weight_gradients_tiled` on up to n_threads threads: a panel of one
    chunk of rows of da per thread, that chunk of x.T and of h_prev.T; Wx.T in panels."""
    cdef Py_ssize_t rows = _chunk_rows(T * B), G = 4 * H
    return (max(1, n_threads) * rows * width + (D + H) * rows
            + (D + width - 1) // width * G * width)


def tiled_gradients_size(Py_ssize_t T, Py_ssize_t B, Py_ssize_t D, Py_ssize_t H, dtype_size,
                         int n_threads):
    """Elements of the scratch that `backward` needs to run the weight gradients on the tiles
    with up to n_threads threads (0: those shapes run them on BLAS with the kernel build in
    use)."""
    if not _tiled_gradients(T * B):
        return 0
    return _tiled_gradients_size(T, B, D, H, 2 * units_per_block(dtype_size), n_threads)


cdef void _weight_gradients_tiled(const floating *x, const floating *Wx, const floating *h0,
                                  const floating *y, const floating *da, floating *dx,
                                  floating *dWx, floating *dWh, floating *db, Py_ssize_t T,
                                  Py_ssize_t B, Py_ssize_t D, Py_ssize_t H, floating *scratch,
                                  int n_threads) noexcept nogil:
    """`_weight_gradients` by the register tiles, a chunk of rows (`_chunk_rows`) at a time:
    the chunk's x and h_{t-1} transposed into `scratch` (`tiled_gradients_size` values); then
    each thread takes its share of da's panels of 2U columns in turn, copies the panel into its
    own slot of the scratch (adding its column sums to db on the way) and adds the chunk's
    products to that panel of dWx and dWh while the panel is in L2. (All panels copied first,
    then the products: S3 backward 1.02x, forward+backward 1.015x.) dx needs no chunks: Wx.T
    packed in panels, each thread its rows. Against BLAS, forward+backward, 2
    threads, paired runs, float32: S1 0.688 -> 0.633 ms, S2 2.69 -> 2.50, (T, B, D, H) = (500,
    1, 64, 128) 2.99 -> 2.93, (64, 8, 256, 512) 28.7 -> 27.0; one thread, S1 CPU time 1.02 ->
    0.99 ms (one chunk each, on Zen 4)."""
    cdef Py_ssize_t G = 4 * H, rows = T * B, chunk = _chunk_rows(T * B)
    cdef Py_ssize_t width = 2 * _units(<floating *>NULL)
    cdef Py_ssize_t n_da = (G + width - 1) // width, n_dx = (D + width - 1) // width
    cdef floating *slots = scratch
    cdef floating *x_t = slots + max(1, n_threads) * chunk * width
    cdef floating *h_t = x_t + D * chunk
    cdef floating *wx_panels = h_t + H * chunk
    cdef floating *slot
    cdef Py_ssize_t p, n, r, r0, r1, begin, end
    cdef int team, part
    cdef fastlstm_barrier barrier
    fastlstm_barrier_init(&barrier)
    with parallel(num_threads=n_threads):
        team = fastlstm_team_size()
        part = threadid()
        r0 = 0
        while r0 < rows:
            r1 = min(rows, r0 + chunk)
            if r0 > 0:
                # every thread is done with the chunk before, whose scratch this one overwrites
                fastlstm_barrier_wait(&barrier, team)
            # x_t = x[r0:r1].T (D, r1 - r0) and h_t = h_prev[r0:r1].T (H, r1 - r0): row r of
            # h_prev is h0 (first B rows) or y of the step before
            begin = r0 + _bound(r1 - r0, team, part, 1)
            end = r0 + _bound(r1 - r0, team, part + 1, 1)
            _transpose(x + begin * D, D, end - begin, D, x_t + begin - r0, r1 - r0)
            if begin < B:
                _transpose(h0 + begin * H, H, min(end, B) - begin, H, h_t + begin - r0, r1 - r0)
            if end > B:
                r = max(begin, B)
                _transpose(y + (r - B) * H, H, end - r, H, h_t + r - r0, r1 - r0)
            # every thread's transposes are in place; (a busy machine's advice to go on alone
            # is not taken: these are the last products of the call)
            fastlstm_barrier_wait(&barrier, team)
            slot = slots + part * (r1 - r0) * width
            for p in range(_bound(n_da, team, part, 1), _bound(n_da, team, part + 1, 1)):
                n = min(width, G - p * width)
                if floating is float:
                    fastlstm_panel_with_sums_f32(da + r0 * G + p * width, G, r1 - r0, n, slot,
                                                 db + p * width, r0 > 0)
                else:
                    fastlstm_panel_with_sums_f64(da + r0 * G + p * width, G, r1 - r0, n, slot,
                                                 db + p * width, r0 > 0)
                _panel_product(x_t, D, r1 - r0, slot, dWx + p * width, n, G, r0 > 0)
                _panel_product(h_t, H, r1 - r0, slot, dWh + p * width, n, G, r0 > 0)
            r0 = r1
    if dx != NULL:
        _pack_transposed(Wx, D, G, wx_panels, n_threads)
        with parallel(num_threads=n_threads):
            team = fastlstm_team_size()
            part = threadid()
            # by rows: D is often one or two panels wide
            begin = _bound(rows, team, part, 1)
            end = _bound(rows, team, part + 1, 1)
            _panel_products(da + begin * G, end - begin, G, wx_panels, dx + begin * D, D, 0,
                            n_dx, False)


cdef void _weight_gradients(const floating *x, const floating *Wx, const floating *h0,
                            const floating *y, const floating *da, floating *dx, floating *dWx,
                            floating *dWh, floating *db, Py_ssize_t T, Py_ssize_t B,
                            Py_ssize_t D, Py_ssize_t H, floating *scratch,
                            int n_threads) noexcept nogil:
    """dx, dWx, dWh, db from all steps' da at once (dx NULL: not needed), on the tiles when the
    caller gave their scratch."""
    if scratch != NULL:
        _weight_gradients_tiled(x, Wx, h0, y, da, dx, dWx, dWh, db, T, B, D, H, scratch,
                                n_threads)
    else:
        _weight_gradients_blas(x, Wx, h0, y, da, dx, dWx, dWh, db, T, B, D, H, n_threads)


cdef void _weight_gradients_blas(const floating *x, const floating *Wx, const floating *h0,
                                 const floating *y, const floating *da, floating *dx,
                                 floating *dWx, floating *dWh, floating *db, Py_ssize_t T,
                                 Py_ssize_t B, Py_ssize_t D, Py_ssize_t H,
                                 int n_threads) noexcept nogil:
    """`_weight_gradients` by BLAS: dx split by rows (or by columns, see `_split_columns`), the
    rest by columns.

    On our threads with BLAS single-threaded, not as whole GEMMs on BLAS's own pool: OpenBLAS's
    threads spin after a call and then fight the next call's OpenMP threads for the cores
    (2 threads, forward+backward median: S1 0.69 vs 8.0 ms, S3 26-28 vs 66-73 ms).

    dx may be NULL: the caller needs no input gradient (a first layer), so its GEMM is skipped.
    """
    cdef Py_ssize_t G = 4 * H
    cdef Py_ssize_t rows = T * B
    cdef Py_ssize_t row_begin, row_end, col_begin, col_end, r, n
    cdef int team, part
    with parallel(num_threads=n_threads):
        team = fastlstm_team_size()
        part = threadid()
        row_begin = _bound(rows, team, part, 1)
        row_end = _bound(rows, team, part + 1, 1)
        if dx != NULL:
            if _split_columns(rows, team):
                # dx[:, cols] = da @ Wx[cols].T
                col_begin = _bound(D, team, part, 16)
                col_end = _bound(D, team, part + 1, 16)
                if col_end > col_begin:
                    gemm(False, True, rows, col_end - col_begin, G, 1, da, G, Wx + col_begin * G,
                         G, 0, dx + col_begin, D)
            elif row_end > row_begin:
                # dx[rows] = da[rows] @ Wx.T
                gemm(False, True, row_end - row_begin, D, G, 1, da + row_begin * G, G, Wx, G, 0,
                     dx + row_begin * D, D)
        # 16 columns = one 64-byte line of floats: threads never write the same line
        col_begin = _bound(G, team, part, 16)
        col_end = _bound(G, team, part + 1, 16)
        if col_end > col_begin:
            # dWx[:, cols] = x.reshape(T*B, D).T @ da[:, cols]
            gemm(True, False, D, col_end - col_begin, rows, 1, x, D, da + col_begin, G, 0,
                 dWx + col_begin, G)
            # dWh[:, cols] = h0.T @ da[0][:, cols] + y[:T-1].reshape(-1, H).T @ da[1:][:, cols]
            gemm(True, False, H, col_end - col_begin, B, 1, h0, H, da + col_begin, G, 0,
                 dWh + col_begin, G)
            if T > 1:
                gemm(True, False, H, col_end - col_begin, (T - 1) * B, 1, y, H,
                     da + B * G + col_begin, G, 1, dWh + col_begin, G)
            # db[cols] = da[:, cols].sum(axis=0)
            for n in range(col_begin, col_end):
                db[n] = 0
            for r in range(rows):
                for n in range(col_begin, col_end):
                    db[n] += da[r * G + n]


def backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
             const floating[:, ::1] Wx, const floating[:, ::1] Wh, const floating[:, ::1] h0,
             const floating[:, ::1] c0, const floating[:, :, ::1] y,
             const floating[:, :, ::1] gates, const floating[:, :, ::1] c_all,
             const floating[:, :, ::1] tanh_c, floating[:, :, ::1] da, floating[:, ::1] dh,
             floating[:, ::1] dc, floating[:, :, ::1] dx, floating[:, ::1] dWx,
             floating[:, ::1] dWh, floating[::1] db, floating[::1] packed_t,
             bint use_matvec, int n_threads, floating[::1] gradients_scratch=None):
    """LSTM backward pass (BPTT) into preallocated arrays.

    Inputs: dy (T, B, H); from the forward call x, Wx, Wh, h0, c0, y, gates, c_all (T, B, H)
    and tanh_c (T, B, H). In/out: dh, dc (B, H): dh_T, dc_T on entry, dh0, dc0 on exit.
    Outputs: da (T, B, 4H) scratch (gradient of the pre-activations), dx (T, B, D) or None
    (not computed), dWx (D, 4H), dWh (H, 4H), db (4H,). packed_t: scratch of
    `packed_transposed_size` values, into which the threads first arrange Wh.T
    (`_pack_transposed_blocks`; at small batches in the time loop's parallel region, each
    thread its own panels). gradients_scratch: `tiled_gradients_size` values for these
    n_threads, or None for BLAS. Caller holds BLAS to one thread. Returns whether the
    small-batch time loop went on with one thread (a partner thread was absent; always False for
    the batch loop).
    """
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], D = x.shape[2], H = Wh.shape[0]
    cdef floating *dx_ptr = NULL if dx is None else &dx[0, 0, 0]
    cdef floating *scratch = NULL
    cdef bint went_solo = False
    if gradients_scratch is not None:
        if gradients_scratch.shape[0] < _tiled_gradients_size(T, B, D, H,
                                                               2 * _units(<floating *>NULL),
                                                               n_threads):
            raise ValueError("gradients_scratch must have tiled_gradients_size(T, B, D, H, "
                             "itemsize, n_threads) elements")
        scratch = &gradients_scratch[0]
    if packed_t.shape[0] != packed_transposed_size(H, sizeof(floating)):
        raise ValueError("packed_t must have packed_transposed_size(H) elements")
    with nogil:
        if use_matvec:
            went_solo = _backward_matvec(&packed_t[0], &c0[0, 0], &gates[0, 0, 0],
                                         &c_all[0, 0, 0], &tanh_c[0, 0, 0], &dy[0, 0, 0],
                                         &da[0, 0, 0], &dh[0, 0], &dc[0, 0], T, B, H, n_threads,
                                         &Wh[0, 0])
        else:
            _pack_transposed(&Wh[0, 0], H, 4 * H, &packed_t[0], n_threads)
            _backward_batch(&packed_t[0], &c0[0, 0], &gates[0, 0, 0], &c_all[0, 0, 0],
                            &tanh_c[0, 0, 0], &dy[0, 0, 0], &da[0, 0, 0], &dh[0, 0], &dc[0, 0],
                            T, B, H, n_threads)
        _weight_gradients(&x[0, 0, 0], &Wx[0, 0], &h0[0, 0], &y[0, 0, 0], &da[0, 0, 0],
                          dx_ptr, &dWx[0, 0], &dWh[0, 0], &db[0], T, B, D, H, scratch,
                          n_threads)
    return went_solo


# ---- streaming step --------------------------------------------------------------------------

cdef void _step_blocks(const floating *packed, const floating *xh, floating *gates,
                       floating *c, floating *h, floating *tanh_c, Py_ssize_t B, Py_ssize_t K,
                       Py_ssize_t H, Py_ssize_t blk_begin, Py_ssize_t blk_end) noexcept nogil:
    """The step for the hidden units of blocks [blk_begin, blk_end): per block, its gates of
    all rows, gates[r, q·H + u] = Σ_k xh[r, k] · stacked[k, q·H + u], by register tiles (up to
    6 rows x 2 vectors, the tiles of `forward_tiles`); then each row's cell update over all
    those units. (One update per block and row, while the block's gates were in L1, was a call
    per vector of units, each loading the activations' constants again: paired, 2 threads,
    forward S3 8.35 vs 7.85 ms, S5 306 vs 275 ms; forward+backward S3 23.7 vs 23.0 ms.)"""
    cdef Py_ssize_t units = _units(<floating *>NULL)
    cdef Py_ssize_t G = 4 * H
    cdef Py_ssize_t blk, u, u_end, n, r, row, tiles
    cdef const floating *w_if
    cdef const floating *w_og
    cdef floating *g
    cdef int mr
    for blk in range(blk_begin, blk_end):
        w_if = packed + blk * K * 4 * units
        w_og = w_if + K * 2 * units
        u = blk * units
        n = min(units, H - u)
        r = 0
        while r < B:
            # the rows left spread evenly over the fewest tiles of at most 6 (next_tile_rows)
            tiles = (B - r + 5) // 6
            mr = <int>((B - r + tiles - 1) // tiles)
            g = gates + r * G + u
            if floating is float:
                fastlstm_gemm_tile_f32(mr, K, xh + r * K, K, w_if, g, n, g + H, n, G, 0)
                fastlstm_gemm_tile_f32(mr, K, xh + r * K, K, w_og, g + 2 * H, n, g + 3 * H, n,
                                       G, 0)
            else:
                fastlstm_gemm_tile_f64(mr, K, xh + r * K, K, w_if, g, n, g + H, n, G, 0)
                fastlstm_gemm_tile_f64(mr, K, xh + r * K, K, w_og, g + 2 * H, n, g + 3 * H, n,
                                       G, 0)
            r += mr
    u = blk_begin * units
    u_end = min(H, blk_end * units)
    for row in range(B):
        if floating is float:
            fastlstm_cell_update_f32(gates + row * G, H, c + row * H, c + row * H, h + row * H,
                                     tanh_c + row * H if tanh_c else NULL, u, u_end)
        else:
            fastlstm_cell_update_f64(gates + row * G, H, c + row * H, c + row * H, h + row * H,
                                     tanh_c + row * H if tanh_c else NULL, u, u_end)


cdef void _stacked_step(const char *x_data, Py_ssize_t x_row_stride, Py_ssize_t x_stride,
                        const floating *packed, floating *xh, floating *gates, floating *h,
                        floating *c, Py_ssize_t B, Py_ssize_t D, Py_ssize_t H,
                        int n_threads) noexcept nogil:
    """`stacked_step` on raw arrays; x_t's element (row, k) is at x_data + row·x_row_stride +
    k·x_stride (bytes)."""
    cdef Py_ssize_t K = D + H + 1
    cdef Py_ssize_t units = _units(<floating *>NULL)
    cdef Py_ssize_t n_blocks = (H + units - 1) // units
    cdef Py_ssize_t row, k, blk
    # xh = [x_t, h, 1]. (h_t goes to h, not into xh: the later blocks still read h_{t-1}.)
    for row in range(B):
        for k in range(D):
            xh[row * K + k] = (<const floating *>(x_data + row * x_row_stride + k * x_stride))[0]
        memcpy(xh + row * K + D, h + row * H, H * sizeof(floating))
        xh[row * K + K - 1] = 1
    if n_threads <= 1:
        _step_blocks(packed, xh, gates, c, h, NULL, B, K, H, 0, n_blocks)
    else:
        for blk in prange(n_blocks, num_threads=n_threads, schedule="dynamic"):
            _step_blocks(packed, xh, gates, c, h, NULL, B, K, H, blk, blk + 1)


cdef inline bint _is_matrix(cnp.ndarray a, int type_num, Py_ssize_t rows, Py_ssize_t cols):
    """Whether a is a writable C-contiguous (rows, cols) array of type_num."""
    return (cnp.PyArray_NDIM(a) == 2 and cnp.PyArray_TYPE(a) == type_num
            and a.shape[0] == rows and a.shape[1] == cols
            and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISWRITEABLE(a))


def stacked_step(cnp.ndarray x_t, cnp.ndarray packed, Py_ssize_t packed_units, cnp.ndarray xh,
                 cnp.ndarray gates, cnp.ndarray h, cnp.ndarray c, int n_threads):
    """One LSTM step of B rows (streaming, `fastlstm._step`): h, c (B, H) <- the step from
    (x_t, h, c), in place.

    With stacked (K, 4H) = [Wx; Wh; b] (K = D + H + 1) and xh (B, K) = [x_t, h, 1] (scratch,
    filled here), one product gives the pre-activations: gates (B, 4H, scratch) = xh @ stacked
    (= x_t @ Wx + h @ Wh + b). packed: [Wx; Wh; b] arranged by `pack_stacked_weights` under a build of
    packed_units units per block (ValueError if the build in use differs). n_threads > 1 threads
    take the blocks of hidden units one at a time (dynamic schedule: on shared cores a thread
    that runs late takes fewer blocks, rather than holding up the step with half of them).

    The arrays come as ndarrays, read through NumPy's own fields: typed memoryviews would
    allocate a memoryview object per argument and call (~1 KB), and a buffer export attaches
    ~44 bytes to each new x_t (NumPy's cache of its strides), allocation at every step. x_t may
    be strided; all other arrays are C-contiguous, of x_t's dtype, float32 or float64.
    """
    cdef int type_num = cnp.PyArray_TYPE(x_t)
    cdef Py_ssize_t B = cnp.PyArray_DIM(h, 0) if cnp.PyArray_NDIM(h) == 2 else -1
    cdef Py_ssize_t H = cnp.PyArray_DIM(h, 1) if B >= 0 else -1
    cdef Py_ssize_t D = cnp.PyArray_DIM(x_t, 1) if cnp.PyArray_NDIM(x_t) == 2 else -1
    cdef Py_ssize_t units = (fastlstm_units_f32() if type_num == cnp.NPY_FLOAT32
                             else fastlstm_units_f64())
    if packed_units != units:
        raise ValueError("the step weights were packed for another kernel build; prepare them "
                         "again")
    if not ((type_num == cnp.NPY_FLOAT32 or type_num == cnp.NPY_FLOAT64) and B >= 0 and D >= 0
            and x_t.shape[0] == B and _is_matrix(h, type_num, B, H)
            and _is_matrix(c, type_num, B, H) and _is_matrix(xh, type_num, B, D + H + 1)
            and _is_matrix(gates, type_num, B, 4 * H) and cnp.PyArray_NDIM(packed) == 1
            and cnp.PyArray_TYPE(packed) == type_num and cnp.PyArray_IS_C_CONTIGUOUS(packed)
            and packed.shape[0] == _packed_size(D + H + 1, H, units)):
        raise ValueError("stacked_step: x_t (B, D), h, c (B, H), xh (B, D + H + 1), gates "
                         "(B, 4H) and packed (packed_size(D + H + 1, H)) of one float dtype")
    cdef const char *x_data = <const char *>cnp.PyArray_DATA(x_t)
    cdef Py_ssize_t x_row_stride = cnp.PyArray_STRIDE(x_t, 0)
    cdef Py_ssize_t x_stride = cnp.PyArray_STRIDE(x_t, 1)
    if type_num == cnp.NPY_FLOAT32:
        with nogil:
            _stacked_step(x_data, x_row_stride, x_stride, <const float *>cnp.PyArray_DATA(packed),
                          <float *>cnp.PyArray_DATA(xh), <float *>cnp.PyArray_DATA(gates),
                          <float *>cnp.PyArray_DATA(h), <float *>cnp.PyArray_DATA(c), B, D, H,
                          n_threads)
    else:
        with nogil:
            _stacked_step(x_data, x_row_stride, x_stride,
                          <const double *>cnp.PyArray_DATA(packed), <double *>cnp.PyArray_DATA(xh),
                          <double *>cnp.PyArray_DATA(gates), <double *>cnp.PyArray_DATA(h),
                          <double *>cnp.PyArray_DATA(c), B, D, H, n_threads)

