/* One instantiation of the LSTM step kernels: included by lstm_kernels.h once per
 * (element type, instruction set). The includer defines
 *   REAL        float or double
 *   IREAL       the integer type of REAL's width (int32_t / int64_t), for exponent bits
 *   LANES       REALs per vector: 32 bytes (8 / 4) or, for AVX-512, 64 bytes (16 / 8)
 *   SUFFIX(n)   the instantiation's name for n, e.g. n##_f32_avx2
 *   KERNEL_ATTR the target attribute of every function here (empty for the portable build)
 *   EXP_CLAMP   |x| bound that keeps exp(x) finite and normal; EXP_DEGREE, MANT_BITS, EXP_BIAS
 *   EXP_INF_CLAMP, LN2_HI, LN2_LO, ROUND_MAGIC  (see vexp and vexp_saturating)
 *   VMIN, VMAX  the x86 min and max intrinsics of the vector width (not for the portable build)
 * The code uses GCC/Clang vector extensions rather than intrinsics (but for VMIN and VMAX), so
 * the same text compiles to AVX2+FMA inside target("avx2,fma") functions and to the baseline
 * ISA (SSE2 on x86-64, NEON elsewhere) in the portable instantiation.
 */

#define VEC SUFFIX(vec)
#define IVEC SUFFIX(ivec)

typedef REAL VEC __attribute__((vector_size(LANES * sizeof(REAL))));
typedef IREAL IVEC __attribute__((vector_size(LANES * sizeof(REAL))));

KERNEL_ATTR static inline VEC SUFFIX(vload)(const REAL *p)
{
    VEC v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

KERNEL_ATTR static inline void SUFFIX(vstore)(REAL *p, VEC v) { memcpy(p, &v, sizeof v); }

/* Not (VEC){0} + s, which costs an add (-0.0 + 0 is +0), nor a loop, which gcc builds lane by
 * lane: an initializer list becomes one broadcast instruction. */
KERNEL_ATTR static inline VEC SUFFIX(vbroadcast)(REAL s)
{
#if LANES == 16
    return (VEC){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
#elif LANES == 8
    return (VEC){s, s, s, s, s, s, s, s};
#else
    return (VEC){s, s, s, s};
#endif
}

/* mask ? a : b, lane by lane (mask lanes are all ones or all zeros, as comparisons give) */
KERNEL_ATTR static inline VEC SUFFIX(vselect)(IVEC mask, VEC a, VEC b)
{
    return (VEC)((mask & (IVEC)a) | (~mask & (IVEC)b));
}

/* Σ_{k <= EXP_DEGREE} r^k / k! by Estrin's scheme: pairs c_k + c_{k+1}·r, joined by r², then
 * by r⁴ (and r⁸), so that the FMAs chain 4 deep rather than EXP_DEGREE deep as in Horner's. The
 * cell update waits on two of these in a row (tanh(g), then tanh(c)). */
KERNEL_ATTR static inline VEC SUFFIX(exp_series)(VEC r)
{
#define INV(factorial) ((REAL)(1.0 / (factorial)))
    VEC r2 = r * r, r4 = r2 * r2;
    VEC low = (1 + r) + r2 * (INV(2) + INV(6) * r);
    VEC high = (INV(24) + INV(120) * r) + r2 * (INV(720) + INV(5040) * r);
#if EXP_DEGREE == 7
    return low + r4 * high;
#elif EXP_DEGREE == 11
    VEC top = (INV(40320) + INV(362880) * r) + r2 * (INV(3628800) + INV(39916800) * r);
    return (low + r4 * high) + (r4 * r4) * top;
#else
#error "exp_series is written for EXP_DEGREE 7 and 11"
#endif
#undef INV
}

/* exp(x) for x in [-EXP_CLAMP, EXP_CLAMP]: x = n·ln2 + r with |r| <= ln2/2, exp(x) = 2^n·e^r,
 * e^r by its Taylor series to degree EXP_DEGREE (truncation error < 1 ulp: 5e-9 relative for
 * float at degree 7, 7e-15 for double at degree 11). n = round(x/ln2) by adding and subtracting
 * ROUND_MAGIC = 1.5·2^mantissa_bits, whose low mantissa bits then hold n; ln2 is split into
 * LN2_HI (few bits, so n·LN2_HI is exact) + LN2_LO to keep r accurate. */
KERNEL_ATTR static inline VEC SUFFIX(vexp)(VEC x)
{
    const VEC magic = SUFFIX(vbroadcast)(ROUND_MAGIC);
    VEC shifted = x * (REAL)1.4426950408889634 + magic;
    VEC n = shifted - magic;
    VEC r = (x - n * (REAL)LN2_HI) - n * (REAL)LN2_LO;
    VEC p = SUFFIX(exp_series)(r);
    IVEC n_int = (IVEC)shifted - (IVEC)magic;
    IVEC two_to_n = (n_int + EXP_BIAS) << MANT_BITS;
    return p * (VEC)two_to_n;
}

/* x with its lanes clamped to [low, high]; a NaN lane stays NaN. Where the build names them
 * (VMIN, VMAX: x86's min and max, which return their second operand when either is NaN, hence x
 * second), one instruction a side; otherwise two comparisons and two selects. */
KERNEL_ATTR static inline VEC SUFFIX(vclamp)(VEC x, REAL low, REAL high)
{
    const VEC lo = SUFFIX(vbroadcast)(low), hi = SUFFIX(vbroadcast)(high);
#ifdef VMIN
    return (VEC)VMAX(lo, VMIN(hi, x));
#else
    return SUFFIX(vselect)((IVEC)(x < lo), lo, SUFFIX(vselect)((IVEC)(x > hi), hi, x));
#endif
}

/* exp(x) for every x: vexp of x clamped to [-EXP_CLAMP, EXP_INF_CLAMP].
 * - Below: exp(-EXP_CLAMP) (1.6e-38 for float, a normal number) stands in for smaller values:
 *   σ(+inf) = 1 / (1 + 1.6e-38) and tanh(-inf) = 1 - 2 / (1 + 1.6e-38) round to exactly 1, -1.
 * - Above: EXP_INF_CLAMP rounds n to 2^(exponent bits - 1) (128 for float, 1024 for double),
 *   whose exponent field is all ones: 2^n is +inf and so is exp, so σ(-inf) = 1 / (1 + inf)
 *   and tanh(+inf) come out exactly 0 and 1. exp(x) is +inf from x = 128·ln2 - ln2/2 (88.4)
 *   on, where it should overflow only at 128·ln2 (88.7); for double from 709.4 instead of
 *   709.8. σ and tanh lose less than 1e-38 (1e-308) there.
 * - NaN stays NaN through the clamp and vexp.
 * (Before, comparisons and selects clamped to ±EXP_CLAMP and put +inf above. With min and max
 * here and Estrin's scheme in exp_series, the float cell update of 16 units on AVX-512 takes
 * 19.4-19.7 ns against 28.8-29.0 ns (median of 300, one thread), an S3 forward step of 16 rows
 * 42.5 against 45.0 µs and a one-row step at H = 128 0.77 against 0.81 µs.) */
KERNEL_ATTR static inline VEC SUFFIX(vexp_saturating)(VEC x)
{
    return SUFFIX(vexp)(SUFFIX(vclamp)(x, -EXP_CLAMP, EXP_INF_CLAMP));
}

/* σ(x) = 1 / (1 + exp(-x)) */
KERNEL_ATTR static inline VEC SUFFIX(vsigmoid)(VEC x) { return 1 / (1 + SUFFIX(vexp_saturating)(-x)); }

/* tanh(x) = 1 - 2 / (1 + exp(2x)); abs error ~1 ulp of 1 */
KERNEL_ATTR static inline VEC SUFFIX(vtanh)(VEC x) { return 1 - 2 / (1 + SUFFIX(vexp_saturating)(2 * x)); }

KERNEL_ATTR static void SUFFIX(sigmoid_array)(const REAL *x, REAL *out, Py_ssize_t n)
{
    Py_ssize_t k = 0;
    for (; k + LANES <= n; k += LANES)
        SUFFIX(vstore)(out + k, SUFFIX(vsigmoid)(SUFFIX(vload)(x + k)));
    for (; k < n; k++) {
        VEC v = SUFFIX(vbroadcast)(x[k]);
        out[k] = SUFFIX(vsigmoid)(v)[0];
    }
}

KERNEL_ATTR static void SUFFIX(tanh_array)(const REAL *x, REAL *out, Py_ssize_t n)
{
    Py_ssize_t k = 0;
    for (; k + LANES <= n; k += LANES)
        SUFFIX(vstore)(out + k, SUFFIX(vtanh)(SUFFIX(vload)(x + k)));
    for (; k < n; k++) {
        VEC v = SUFFIX(vbroadcast)(x[k]);
        out[k] = SUFFIX(vtanh)(v)[0];
    }
}

/* LANES hidden units of one row: pre-activations gates[q·gate_stride + j] (q = i, f, o, g) become
 * the activated gates in place; c = f·c_prev + i·g, h = o·tanh(c); tanh_c (may be NULL) keeps
 * tanh(c) for the backward pass. c may alias c_prev. */
KERNEL_ATTR static inline void SUFFIX(cell_update_vec)(REAL *gates, Py_ssize_t gate_stride,
                                                       const REAL *c_prev, REAL *c, REAL *h,
                                                       REAL *tanh_c)
{
    VEC i = SUFFIX(vsigmoid)(SUFFIX(vload)(gates));
    VEC f = SUFFIX(vsigmoid)(SUFFIX(vload)(gates + gate_stride));
    VEC o = SUFFIX(vsigmoid)(SUFFIX(vload)(gates + 2 * gate_stride));
    VEC g = SUFFIX(vtanh)(SUFFIX(vload)(gates + 3 * gate_stride));
    VEC c_new = f * SUFFIX(vload)(c_prev) + i * g;
    VEC tc = SUFFIX(vtanh)(c_new);
    SUFFIX(vstore)(gates, i);
    SUFFIX(vstore)(gates + gate_stride, f);
    SUFFIX(vstore)(gates + 2 * gate_stride, o);
    SUFFIX(vstore)(gates + 3 * gate_stride, g);
    SUFFIX(vstore)(c, c_new);
    SUFFIX(vstore)(h, o * tc);
    if (tanh_c)
        SUFFIX(vstore)(tanh_c, tc);
}

/* Cell update of hidden units [u_begin, u_end) of one row whose gates (4H, pre-activation) are
 * complete; see cell_update_vec. The last partial vector goes through zero-padded copies. */
KERNEL_ATTR static void SUFFIX(cell_update)(REAL *gates, Py_ssize_t H, const REAL *c_prev,
                                            REAL *c, REAL *h, REAL *tanh_c, Py_ssize_t u_begin,
                                            Py_ssize_t u_end)
{
    Py_ssize_t u = u_begin;
    for (; u + LANES <= u_end; u += LANES)
        SUFFIX(cell_update_vec)(gates + u, H, c_prev + u, c + u, h + u, tanh_c ? tanh_c + u : NULL);
    Py_ssize_t rest = u_end - u;
    if (rest > 0) {
        REAL g4[4 * LANES] = {0}, cp[LANES] = {0}, cn[LANES], hn[LANES], tc[LANES];
        for (int q = 0; q < 4; q++)
            for (Py_ssize_t j = 0; j < rest; j++)
                g4[q * LANES + j] = gates[q * H + u + j];
        for (Py_ssize_t j = 0; j < rest; j++)
            cp[j] = c_prev[u + j];
        SUFFIX(cell_update_vec)(g4, LANES, cp, cn, hn, tc);
        for (int q = 0; q < 4; q++)
            for (Py_ssize_t j = 0; j < rest; j++)
                gates[q * H + u + j] = g4[q * LANES + j];
        for (Py_ssize_t j = 0; j < rest; j++) {
            c[u + j] = cn[j];
            h[u + j] = hn[j];
            if (tanh_c)
                tanh_c[u + j] = tc[j];
        }
    }
}

/* gates[q·H + u + j] += acc_q[j] for the n <= LANES units from u of one row */
KERNEL_ATTR static inline void SUFFIX(add_to_gates)(VEC acc_i, VEC acc_f, VEC acc_o, VEC acc_g,
                                                    REAL *gates, Py_ssize_t H, Py_ssize_t u,
                                                    Py_ssize_t n)
{
    VEC acc[4] = {acc_i, acc_f, acc_o, acc_g};
    for (int q = 0; q < 4; q++) {
        REAL *pre = gates + q * H + u;
        if (n == LANES) {
            SUFFIX(vstore)(pre, SUFFIX(vload)(pre) + acc[q]);
        } else {
            for (Py_ssize_t j = 0; j < n; j++)
                pre[j] += acc[q][j];
        }
    }
}

/* Rows r, r+1:  gates[row, q·H + u + j] += Σ_{k0 <= k < k1} h_prev[row, k] · w[k][q][j], where
 * w[k][i|f] lies in the block's panel w_if and w[k][o|g] in w_og (see forward_step).
 * The two rows share each weight load: 8 FMAs per 4 loads. */
KERNEL_ATTR static inline void SUFFIX(accumulate_two_rows)(const REAL *w_if, const REAL *w_og,
                                                           const REAL *ha, const REAL *hb,
                                                           Py_ssize_t k0, Py_ssize_t k1,
                                                           REAL *gates_a, REAL *gates_b,
                                                           Py_ssize_t H, Py_ssize_t u,
                                                           Py_ssize_t n)
{
    VEC ia = {0}, fa = {0}, oa = {0}, ga = {0}, ib = {0}, fb = {0}, ob = {0}, gb = {0};
    for (Py_ssize_t k = k0; k < k1; k++) {
        VEC wi = SUFFIX(vload)(w_if + 2 * LANES * k), wf = SUFFIX(vload)(w_if + 2 * LANES * k + LANES);
        VEC wo = SUFFIX(vload)(w_og + 2 * LANES * k), wg = SUFFIX(vload)(w_og + 2 * LANES * k + LANES);
        VEC a = SUFFIX(vbroadcast)(ha[k]), b = SUFFIX(vbroadcast)(hb[k]);
        ia += a * wi;
        fa += a * wf;
        oa += a * wo;
        ga += a * wg;
        ib += b * wi;
        fb += b * wf;
        ob += b * wo;
        gb += b * wg;
    }
    SUFFIX(add_to_gates)(ia, fa, oa, ga, gates_a, H, u, n);
    SUFFIX(add_to_gates)(ib, fb, ob, gb, gates_b, H, u, n);
}

/* The sums of accumulate_one_row (also in forward_step_projecting): the weights of k (and k + 1)
 * from the panels w_if, w_og times hr[k] (hr[k + 1]) into the even (odd) chains ie..ge (io..go) */
#define ONE_ROW_EVEN(k)                                                                            \
    const REAL *a_if = w_if + 2 * LANES * (k), *a_og = w_og + 2 * LANES * (k);                     \
    VEC h_even = SUFFIX(vbroadcast)(hr[k]);                                                        \
    ie += h_even * SUFFIX(vload)(a_if);                                                            \
    fe += h_even * SUFFIX(vload)(a_if + LANES);                                                    \
    oe += h_even * SUFFIX(vload)(a_og);                                                            \
    ge += h_even * SUFFIX(vload)(a_og + LANES);
#define ONE_ROW_PAIR(k)                                                                            \
    ONE_ROW_EVEN(k)                                                                                \
    VEC h_odd = SUFFIX(vbroadcast)(hr[(k) + 1]);                                                   \
    io += h_odd * SUFFIX(vload)(a_if + 2 * LANES);                                                 \
    fo += h_odd * SUFFIX(vload)(a_if + 3 * LANES);                                                 \
    oo += h_odd * SUFFIX(vload)(a_og + 2 * LANES);                                                 \
    go += h_odd * SUFFIX(vload)(a_og + 3 * LANES);

/* One row: the same sum with k split into even and odd halves, for 8 independent chains; with
 * `descending`, the pairs of k from the top down (see forward_step). */
KERNEL_ATTR static inline void SUFFIX(accumulate_one_row)(const REAL *w_if, const REAL *w_og,
                                                          const REAL *hr, Py_ssize_t k0,
                                                          Py_ssize_t k1, REAL *gates_r,
                                                          Py_ssize_t H, Py_ssize_t u,
                                                          Py_ssize_t n, int descending)
{
    VEC ie = {0}, fe = {0}, oe = {0}, ge = {0}, io = {0}, fo = {0}, oo = {0}, go = {0};
    const Py_ssize_t n_pairs = (k1 - k0) / 2, odd = (k1 - k0) & 1;
    if (descending && odd) {
        ONE_ROW_EVEN(k1 - 1)
    }
    for (Py_ssize_t q = 0; q < n_pairs; q++) {
        ONE_ROW_PAIR(k0 + 2 * (descending ? n_pairs - 1 - q : q))
    }
    if (!descending && odd) {
        ONE_ROW_EVEN(k1 - 1)
    }
    SUFFIX(add_to_gates)(ie + io, fe + fo, oe + oo, ge + go, gates_r, H, u, n);
}

/* k values per pass over a block's weights: KC·4·LANES values (8 KiB of float, 16 KiB with
 * AVX-512) stay in the 32 KiB L1 cache while every row pair of the batch reuses them. */
#define KC 64

/* k values per pass of forward_step (and of forward_step_projecting, whose sums must match it)
 * at `rows` rows. A single row reuses nothing, and with float32 on AVX-512 (LANES 16) passes of
 * 32 streamed faster at H >= 256. On Zen 5, 2 threads, B = 1, T = 100, median of per-pair ratios
 * of alternating processes (6-10 pairs), 32 against 64: H = 256 (S2) through `LSTM` 0.92, 0.92,
 * 0.95, 0.97 and once 1.02, through `lstm_forward` 0.93, 0.94, 0.96; H = 320 0.98, 384 1.01,
 * 512 0.94; but 192 1.01 and 1.01, and 128: S1 (D = 64) through `LSTM` 1.02 and 1.02, through
 * `lstm_forward` 1.025; D = 128 1.10. The AVX2 build at S2: 1.06; float64: 1.01. */
static inline Py_ssize_t SUFFIX(pass_length)(Py_ssize_t rows, Py_ssize_t H)
{
    return rows == 1 && H >= 256 && LANES == 16 ? KC / 2 : KC;
}

/* One forward step for the hidden-unit blocks [blk_begin, blk_end) of `rows` batch rows:
 *   gates[r, q·H + u] += Σ_k h_prev[r, k] · Wh[k, q·H + u]      (gates += h_prev @ Wh)
 * then the cell update of those units. Row r of every array starts at r·H (r·4H for gates).
 * `packed` is Wh arranged by pack_recurrent_weights: per block of LANES units, a panel of H rows
 * of [i|f] × LANES, then one of [o|g] × LANES (zero past H), so each k loop streams contiguous
 * runs, in passes of `pass_length` values of k. Accumulators are named variables (an accumulator
 * array went to the stack with gcc, DESIGN.md §6).
 * With `descending` (the caller's odd steps) the blocks, the passes and, at one row, the pairs
 * of k run in reverse, so that a step starts on the weights the step before ended on, still in
 * L1. Float32, T = 100, median of per-round ratios against always ascending, in one process on
 * a busy machine: 2 threads S1 0.955 and 0.978, S2 0.948, S1 through `LSTM` 0.985; one thread
 * S1 0.978, S2 0.968. Alternating processes, 2 threads (10-12 pairs): S1 0.982 (fastest call
 * 0.203 vs 0.226 ms), through `LSTM` 0.963; S2 0.994, through `LSTM` 0.951. */
KERNEL_ATTR static void SUFFIX(forward_step)(const REAL *packed, Py_ssize_t H, Py_ssize_t rows,
                                             const REAL *h_prev, REAL *gates, const REAL *c_prev,
                                             REAL *c, REAL *h, REAL *tanh_c,
                                             Py_ssize_t blk_begin, Py_ssize_t blk_end,
                                             int descending)
{
    const Py_ssize_t G = 4 * H;
    const Py_ssize_t kc = SUFFIX(pass_length)(rows, H);
    const Py_ssize_t n_passes = (H + kc - 1) / kc;
    for (Py_ssize_t i = blk_begin; i < blk_end; i++) {
        Py_ssize_t blk = descending ? blk_end - 1 - (i - blk_begin) : i;
        const REAL *w_if = packed + blk * H * 4 * LANES, *w_og = w_if + H * 2 * LANES;
        Py_ssize_t u = blk * LANES;
        Py_ssize_t n = H - u < LANES ? H - u : LANES;
        for (Py_ssize_t pass = 0; pass < n_passes; pass++) {
            Py_ssize_t k0 = (descending ? n_passes - 1 - pass : pass) * kc;
            Py_ssize_t k1 = k0 + kc < H ? k0 + kc : H;
            Py_ssize_t r = 0;
            for (; r + 2 <= rows; r += 2)
                SUFFIX(accumulate_two_rows)(w_if, w_og, h_prev + r * H, h_prev + (r + 1) * H,
                                            k0, k1, gates + r * G, gates + (r + 1) * G, H, u, n);
            if (r < rows)
                SUFFIX(accumulate_one_row)(w_if, w_og, h_prev + r * H, k0, k1, gates + r * G, H,
                                           u, n, descending);
        }
        for (Py_ssize_t r = 0; r < rows; r++)
            SUFFIX(cell_update)(gates + r * G, H, c_prev + r * H, c + r * H, h + r * H,
                                tanh_c ? tanh_c + r * H : NULL, u, u + n);
    }
}

/* ---- register-blocked tiles for batches ----
 * The batch time loops compute C (rows × n) (+)= A (rows × K) @ P (K × n) for a new A every step
 * (h_{t-1} forward, da_t backward) against the same weights P. P is packed ONCE per call into
 * panels of K rows × 2·LANES columns, and a tile of up to TILE_ROWS rows × one panel keeps its
 * 2·TILE_ROWS accumulators in registers for the whole k loop: per k, 2 weight loads and
 * TILE_ROWS broadcasts of A feed 2·TILE_ROWS FMAs. 6 rows: 12 accumulators + 2 weights + 1
 * broadcast = 15 of AVX2's 16 registers. (OpenBLAS sgemm per step repacked Wh at every call:
 * 24% of S3's time.) */
#define TILE_ROWS 6

/* p[0:n] (+)= v[0:n], n <= 0 writing nothing: the panel's columns past the matrix's end */
KERNEL_ATTR static inline void SUFFIX(store_partial)(REAL *p, VEC v, Py_ssize_t n, int accumulate)
{
    if (n >= LANES) {
        SUFFIX(vstore)(p, accumulate ? SUFFIX(vload)(p) + v : v);
        return;
    }
    for (Py_ssize_t j = 0; j < n; j++)
        p[j] = accumulate ? p[j] + v[j] : v[j];
}

/* For rows r < mr (mr a compile-time constant once inlined, 1 <= mr <= TILE_ROWS):
 *   c_lo[r·ldc + j] (+)= Σ_k a[r·lda + k] · panel[k·2·LANES + j]            j < n_lo
 *   c_hi[r·ldc + j] (+)= Σ_k a[r·lda + k] · panel[k·2·LANES + LANES + j]    j < n_hi
 * "+=" when accumulate. Accumulators are named variables, not an array (gcc kept an array of
 * vectors on the stack, 2-3x slower, DESIGN.md §6). */
KERNEL_ATTR static inline __attribute__((always_inline)) void SUFFIX(tile)(
    const int mr, Py_ssize_t K, const REAL *a, Py_ssize_t lda, const REAL *panel, REAL *c_lo,
    Py_ssize_t n_lo, REAL *c_hi, Py_ssize_t n_hi, Py_ssize_t ldc, int accumulate)
{
    VEC lo0 = {0}, hi0 = {0}, lo1 = {0}, hi1 = {0}, lo2 = {0}, hi2 = {0};
    VEC lo3 = {0}, hi3 = {0}, lo4 = {0}, hi4 = {0}, lo5 = {0}, hi5 = {0};
    const REAL *a0 = a, *a1 = a0 + (mr > 1 ? lda : 0), *a2 = a0 + (mr > 2 ? 2 * lda : 0);
    const REAL *a3 = a0 + (mr > 3 ? 3 * lda : 0), *a4 = a0 + (mr > 4 ? 4 * lda : 0);
    const REAL *a5 = a0 + (mr > 5 ? 5 * lda : 0);
    for (Py_ssize_t k = 0; k < K; k++, panel += 2 * LANES) {
        VEC w_lo = SUFFIX(vload)(panel), w_hi = SUFFIX(vload)(panel + LANES);
#define TILE_ROW(r)                                                                              \
    if (mr > r) {                                                                                \
        VEC s = SUFFIX(vbroadcast)(a##r[k]);                                                     \
        lo##r += s * w_lo;                                                                       \
        hi##r += s * w_hi;                                                                       \
    }
        TILE_ROW(0) TILE_ROW(1) TILE_ROW(2) TILE_ROW(3) TILE_ROW(4) TILE_ROW(5)
#undef TILE_ROW
    }
#define TILE_STORE(r)                                                                            \
    if (mr > r) {                                                                                \
        SUFFIX(store_partial)(c_lo + r * ldc, lo##r, n_lo, accumulate);                          \
        SUFFIX(store_partial)(c_hi + r * ldc, hi##r, n_hi, accumulate);                          \
    }
    TILE_STORE(0) TILE_STORE(1) TILE_STORE(2) TILE_STORE(3) TILE_STORE(4) TILE_STORE(5)
#undef TILE_STORE
}

/* tile() for a run-time mr: one register-resident instance per row count */
KERNEL_ATTR static void SUFFIX(gemm_tile)(int mr, Py_ssize_t K, const REAL *a, Py_ssize_t lda,
                                          const REAL *panel, REAL *c_lo, Py_ssize_t n_lo,
                                          REAL *c_hi, Py_ssize_t n_hi, Py_ssize_t ldc,
                                          int accumulate)
{
    switch (mr) {
#define TILE_CASE(m)                                                                             \
    case m:                                                                                      \
        SUFFIX(tile)(m, K, a, lda, panel, c_lo, n_lo, c_hi, n_hi, ldc, accumulate);              \
        break;
        TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
#undef TILE_CASE
    }
}

/* Rows of the next tile when `rows` rows are left: the rows spread evenly over the fewest tiles
 * (32 rows: 6,6,5,5,5,5 rather than 6,6,6,6,6,2, whose 2-row tile has too few accumulators to
 * hide the FMA latency). */
static inline int SUFFIX(next_tile_rows)(Py_ssize_t rows)
{
    Py_ssize_t tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
    return (int)((rows + tiles - 1) / tiles);
}

/* One forward step of rows [row_begin, row_end) and hidden-unit blocks [blk_begin, blk_end):
 *   gates[r, q·H + u] += Σ_k h_prev[r, k] · Wh[k, q·H + u]      (gates += h_prev @ Wh)
 * then the cell update (cell_update) of those rows and units, on each tile while it is in L1.
 * Arrays as in forward_step; `packed` from pack_recurrent_weights, whose [i|f] and [o|g] panels
 * of a block are the two tiles of its units. */
KERNEL_ATTR static void SUFFIX(forward_tiles)(const REAL *packed, Py_ssize_t H,
                                              const REAL *h_prev, REAL *gates,
                                              const REAL *c_prev, REAL *c, REAL *h,
                                              REAL *tanh_c, Py_ssize_t row_begin,
                                              Py_ssize_t row_end, Py_ssize_t blk_begin,
                                              Py_ssize_t blk_end)
{
    const Py_ssize_t G = 4 * H;
    for (Py_ssize_t blk = blk_begin; blk < blk_end; blk++) {
        const REAL *w_if = packed + blk * H * 4 * LANES, *w_og = w_if + H * 2 * LANES;
        Py_ssize_t u = blk * LANES;
        Py_ssize_t n = H - u < LANES ? H - u : LANES;
        for (Py_ssize_t r = row_begin; r < row_end;) {
            int mr = SUFFIX(next_tile_rows)(row_end - r);
            REAL *g = gates + r * G + u;
            SUFFIX(gemm_tile)(mr, H, h_prev + r * H, H, w_if, g, n, g + H, n, G, 1);
            SUFFIX(gemm_tile)(mr, H, h_prev + r * H, H, w_og, g + 2 * H, n, g + 3 * H, n, G, 1);
            for (Py_ssize_t row = r; row < r + mr; row++)
                SUFFIX(cell_update)(gates + row * G, H, c_prev + row * H, c + row * H,
                                    h + row * H, tanh_c ? tanh_c + row * H : NULL, u, u + n);
            r += mr;
        }
    }
}

/* The input projection of a small batch, for the hidden-unit blocks [blk_begin, blk_end):
 *   gates[r, q·H + u] = b[q·H + u] + Σ_k x[r, k] · Wx[k, q·H + u]    (gates = x @ Wx + b)
 * for all `rows` rows of x (D values each). `packed_x` is Wx arranged as pack_recurrent_weights
 * arranges Wh, with D rows a panel. The small-batch time loop runs it on each thread's own blocks
 * first, so a thread reads only the gate columns it wrote, and no barrier comes between. */
KERNEL_ATTR static void SUFFIX(project_blocks)(const REAL *packed_x, Py_ssize_t D, Py_ssize_t H,
                                               const REAL *x, Py_ssize_t rows, const REAL *b,
                                               REAL *gates, Py_ssize_t blk_begin,
                                               Py_ssize_t blk_end)
{
    const Py_ssize_t G = 4 * H;
    for (Py_ssize_t blk = blk_begin; blk < blk_end; blk++) {
        const REAL *w_if = packed_x + blk * D * 4 * LANES, *w_og = w_if + D * 2 * LANES;
        Py_ssize_t u = blk * LANES;
        Py_ssize_t n = H - u < LANES ? H - u : LANES;
        for (Py_ssize_t r = 0; r < rows;) {
            int mr = SUFFIX(next_tile_rows)(rows - r);
            REAL *g = gates + r * G + u;
            for (Py_ssize_t row = 0; row < mr; row++)
                for (int q = 0; q < 4; q++) {
                    if (n == LANES)
                        SUFFIX(vstore)(g + row * G + q * H, SUFFIX(vload)(b + q * H + u));
                    else
                        memcpy(g + row * G + q * H, b + q * H + u, n * sizeof(REAL));
                }
            SUFFIX(gemm_tile)(mr, D, x + r * D, D, w_if, g, n, g + H, n, G, 1);
            SUFFIX(gemm_tile)(mr, D, x + r * D, D, w_og, g + 2 * H, n, g + 3 * H, n, G, 1);
            r += mr;
        }
    }
}

/* ---- the B = 1 forward step carrying the input projection of later steps ----
 * A step at B = 1 streams the thread's share of Wh from L2 and leaves the FMA units partly idle;
 * the input projection is the opposite (register tiles, FMA-bound). So a step can also compute a
 * slice of the projection of six later rows, interleaved with its stream. One thread's part,
 * float32, AVX-512, TSC cycles a step (a C prototype, one core): S1 step 3,070 + projection
 * 730 = 3,820 run apart, 3,500 interleaved; S2 12,900 + 6,100 = 19,400 apart, 16,500
 * interleaved. */

#if LANES == 16 /* the float32 AVX-512 build only: see _steps_carry_projection in the .pyx */

/* *p = acc, or bias + acc (the order of project_blocks' sum) when bias is not NULL, for the
 * n <= LANES units from p */
KERNEL_ATTR static inline void SUFFIX(store_slice)(REAL *p, VEC acc, const REAL *bias, Py_ssize_t n)
{
    if (n >= LANES) {
        SUFFIX(vstore)(p, bias ? SUFFIX(vload)(bias) + acc : acc);
        return;
    }
    for (Py_ssize_t j = 0; j < n; j++)
        p[j] = bias ? bias[j] + acc[j] : acc[j];
}

/* The partial sums of n <= LANES units stored by store_slice, zero past n */
KERNEL_ATTR static inline VEC SUFFIX(load_slice)(const REAL *p, Py_ssize_t n)
{
    if (n >= LANES)
        return SUFFIX(vload)(p);
    VEC v = {0};
    for (Py_ssize_t j = 0; j < n; j++)
        v[j] = p[j];
    return v;
}

/* forward_step at one row, which also computes phase `phase` (0 <= phase < FASTLSTM_PIPE_STEPS)
 * of the input projection of six later rows for the same blocks:
 *   tile_gates[r·4H + q·H + u] = b[q·H + u] + Σ_k tile_x[r·D + k] · Wx[k, q·H + u]    (r < 6)
 * for the gates q of panel phase / 3 and k in third phase % 3 of [0, D). Between phases the
 * partial sums wait in tile_gates; the last third adds b. Each sum is the one sequential chain
 * over k of project_blocks, so the gates come out bit for bit the same. The step's own sums are
 * those of accumulate_one_row, in the order forward_step takes with `descending`. `packed_x`:
 * Wx arranged as for project_blocks. */
KERNEL_ATTR static void SUFFIX(forward_step_projecting)(
    const REAL *packed, Py_ssize_t H, const REAL *h_prev, REAL *gates, const REAL *c_prev,
    REAL *c, REAL *h, REAL *tanh_c, Py_ssize_t blk_begin, Py_ssize_t blk_end,
    const REAL *packed_x, Py_ssize_t D, const REAL *tile_x, const REAL *b, REAL *tile_gates,
    int phase, int descending)
{
    const Py_ssize_t G = 4 * H;
    const Py_ssize_t kc = SUFFIX(pass_length)(1, H);
    const Py_ssize_t n_passes = (H + kc - 1) / kc;
    const int half = phase / 3, third = phase % 3;
    const Py_ssize_t pk_begin = D * third / 3, pk_end = D * (third + 1) / 3;
    /* `burst` projection k values after every `every` pairs of step k values: a fixed pattern
     * the branch predictor learns (a running fraction, its pattern 128 pairs long at S1, made S1
     * 4% slower) */
    const Py_ssize_t share = pk_end - pk_begin, pairs = H / 2 > 0 ? H / 2 : 1;
    const Py_ssize_t every = share > 0 && pairs > share ? pairs / share : 1;
    const Py_ssize_t burst = share > pairs ? share / pairs : 1;
    const REAL *hr = h_prev; /* for ONE_ROW_PAIR */
    const REAL *x0 = tile_x, *x1 = x0 + D, *x2 = x1 + D, *x3 = x2 + D, *x4 = x3 + D, *x5 = x4 + D;
    for (Py_ssize_t i = blk_begin; i < blk_end; i++) {
        Py_ssize_t blk = descending ? blk_end - 1 - (i - blk_begin) : i;
        const REAL *w_if = packed + blk * H * 4 * LANES, *w_og = w_if + H * 2 * LANES;
        const REAL *panel = packed_x + blk * D * 4 * LANES + half * D * 2 * LANES;
        Py_ssize_t u = blk * LANES;
        Py_ssize_t n = H - u < LANES ? H - u : LANES;
        REAL *lo_gates = tile_gates + 2 * half * H + u, *hi_gates = lo_gates + H;
        VEC lo0 = {0}, hi0 = {0}, lo1 = {0}, hi1 = {0}, lo2 = {0}, hi2 = {0};
        VEC lo3 = {0}, hi3 = {0}, lo4 = {0}, hi4 = {0}, lo5 = {0}, hi5 = {0};
        if (third > 0) {
#define LOAD_ROW(r)                                                                              \
    lo##r = SUFFIX(load_slice)(lo_gates + r * G, n);                                             \
    hi##r = SUFFIX(load_slice)(hi_gates + r * G, n);
            LOAD_ROW(0) LOAD_ROW(1) LOAD_ROW(2) LOAD_ROW(3) LOAD_ROW(4) LOAD_ROW(5)
#undef LOAD_ROW
        }
        Py_ssize_t pk = pk_begin, since = 0;
#define PROJECT_K()                                                                              \
    do {                                                                                         \
        VEC w_lo = SUFFIX(vload)(panel + 2 * LANES * pk);                                        \
        VEC w_hi = SUFFIX(vload)(panel + 2 * LANES * pk + LANES);                                \
        VEC s;                                                                                   \
        s = SUFFIX(vbroadcast)(x0[pk]), lo0 += s * w_lo, hi0 += s * w_hi;                        \
        s = SUFFIX(vbroadcast)(x1[pk]), lo1 += s * w_lo, hi1 += s * w_hi;                        \
        s = SUFFIX(vbroadcast)(x2[pk]), lo2 += s * w_lo, hi2 += s * w_hi;                        \
        s = SUFFIX(vbroadcast)(x3[pk]), lo3 += s * w_lo, hi3 += s * w_hi;                        \
        s = SUFFIX(vbroadcast)(x4[pk]), lo4 += s * w_lo, hi4 += s * w_hi;                        \
        s = SUFFIX(vbroadcast)(x5[pk]), lo5 += s * w_lo, hi5 += s * w_hi;                        \
        pk++;                                                                                    \
    } while (0)
        for (Py_ssize_t pass = 0; pass < n_passes; pass++) {
            Py_ssize_t k0 = (descending ? n_passes - 1 - pass : pass) * kc;
            Py_ssize_t k1 = k0 + kc < H ? k0 + kc : H;
            VEC ie = {0}, fe = {0}, oe = {0}, ge = {0}, io = {0}, fo = {0}, oo = {0}, go = {0};
            const Py_ssize_t n_pairs = (k1 - k0) / 2, odd = (k1 - k0) & 1;
            if (descending && odd) {
                ONE_ROW_EVEN(k1 - 1)
            }
            for (Py_ssize_t q = 0; q < n_pairs; q++) {
                ONE_ROW_PAIR(k0 + 2 * (descending ? n_pairs - 1 - q : q))
                if (++since == every) {
                    since = 0;
                    for (Py_ssize_t j = 0; j < burst && pk < pk_end; j++)
                        PROJECT_K();
                }
            }
            if (!descending && odd) {
                ONE_ROW_EVEN(k1 - 1)
            }
            SUFFIX(add_to_gates)(ie + io, fe + fo, oe + oo, ge + go, gates, H, u, n);
        }
        while (pk < pk_end)
            PROJECT_K();
#undef PROJECT_K
        const REAL *b_lo = third == 2 ? b + 2 * half * H + u : NULL;
        const REAL *b_hi = third == 2 ? b_lo + H : NULL;
#define STORE_ROW(r)                                                                             \
    SUFFIX(store_slice)(lo_gates + r * G, lo##r, b_lo, n);                                       \
    SUFFIX(store_slice)(hi_gates + r * G, hi##r, b_hi, n);
        STORE_ROW(0) STORE_ROW(1) STORE_ROW(2) STORE_ROW(3) STORE_ROW(4) STORE_ROW(5)
#undef STORE_ROW
        SUFFIX(cell_update)(gates, H, c_prev, c, h, tanh_c, u, u + n);
    }
}

#endif /* LANES == 16 */

#undef ONE_ROW_PAIR
#undef ONE_ROW_EVEN
#undef KC

/* dh[r, j] = Σ_k da[r, k] · Wh[j, k] (dh = da @ Wh.T, k < 4H) for rows [row_begin, row_end) and
 * all j. `packed_t` is Wh.T arranged by _pack_transposed_blocks: per block of 2·LANES hidden
 * units, 4H rows of 2·LANES values (zero past H); each block is one tile wide. */
KERNEL_ATTR static void SUFFIX(backward_dh_tiles)(const REAL *packed_t, Py_ssize_t H,
                                                  const REAL *da, REAL *dh,
                                                  Py_ssize_t row_begin, Py_ssize_t row_end)
{
    const Py_ssize_t G = 4 * H;
    for (Py_ssize_t j = 0; j < H; j += 2 * LANES) {
        const REAL *panel = packed_t + j * G;
        for (Py_ssize_t r = row_begin; r < row_end;) {
            int mr = SUFFIX(next_tile_rows)(row_end - r);
            SUFFIX(gemm_tile)(mr, G, da + r * G, G, panel, dh + r * H + j, H - j,
                              dh + r * H + j + LANES, H - j - LANES, H, 0);
            r += mr;
        }
    }
}

/* dh[r, j] = Σ_k da[r, k] · Wh[j, k] (dh = da @ Wh.T, k < 4H) for the rows r < rows of a small
 * batch and the hidden units of panels [blk_begin, blk_end) of `packed_t` (see
 * backward_dh_tiles): a thread's share of the units in the matvec time loop. One row runs four
 * chains over k (8 accumulators, no horizontal sums); more rows go through the tiles. */
KERNEL_ATTR static void SUFFIX(backward_dh_panels)(const REAL *packed_t, Py_ssize_t H,
                                                   Py_ssize_t rows, const REAL *da, REAL *dh,
                                                   Py_ssize_t blk_begin, Py_ssize_t blk_end)
{
    const Py_ssize_t G = 4 * H, W = 2 * LANES;
    for (Py_ssize_t blk = blk_begin; blk < blk_end; blk++) {
        const REAL *panel = packed_t + blk * W * G;
        Py_ssize_t j = blk * W;
        if (rows > 1) {
            for (Py_ssize_t r = 0; r < rows;) {
                int mr = SUFFIX(next_tile_rows)(rows - r);
                SUFFIX(gemm_tile)(mr, G, da + r * G, G, panel, dh + r * H + j, H - j,
                                  dh + r * H + j + LANES, H - j - LANES, H, 0);
                r += mr;
            }
            continue;
        }
        VEC lo0 = {0}, hi0 = {0}, lo1 = {0}, hi1 = {0}, lo2 = {0}, hi2 = {0}, lo3 = {0}, hi3 = {0};
        Py_ssize_t k = 0;
        for (; k + 4 <= G; k += 4) {
            const REAL *p = panel + k * W;
            VEC a0 = SUFFIX(vbroadcast)(da[k]), a1 = SUFFIX(vbroadcast)(da[k + 1]);
            VEC a2 = SUFFIX(vbroadcast)(da[k + 2]), a3 = SUFFIX(vbroadcast)(da[k + 3]);
            lo0 += a0 * SUFFIX(vload)(p);
            hi0 += a0 * SUFFIX(vload)(p + LANES);
            lo1 += a1 * SUFFIX(vload)(p + W);
            hi1 += a1 * SUFFIX(vload)(p + W + LANES);
            lo2 += a2 * SUFFIX(vload)(p + 2 * W);
            hi2 += a2 * SUFFIX(vload)(p + 2 * W + LANES);
            lo3 += a3 * SUFFIX(vload)(p + 3 * W);
            hi3 += a3 * SUFFIX(vload)(p + 3 * W + LANES);
        }
        for (; k < G; k++) {
            VEC a0 = SUFFIX(vbroadcast)(da[k]);
            lo0 += a0 * SUFFIX(vload)(panel + k * W);
            hi0 += a0 * SUFFIX(vload)(panel + k * W + LANES);
        }
        SUFFIX(store_partial)(dh + j, (lo0 + lo1) + (lo2 + lo3), H - j, 0);
        SUFFIX(store_partial)(dh + j + LANES, (hi0 + hi1) + (hi2 + hi3), H - j - LANES, 0);
    }
}

/* Backward through the cell for hidden units [u_begin, u_end) of one row at step t:
 *   dh_t = dy + dh (dh: the gradient from step t+1),  dc_t = dc + dh_t·o·(1 - tanh_c²)
 *   da = [dc_t·g·i(1-i), dc_t·c_prev·f(1-f), dh_t·tanh_c·o(1-o), dc_t·i·(1-g²)]
 *   dc <- dc_t·f  (the gradient reaching c_{t-1})
 * gates holds the activated i, f, o, g of step t. A plain loop: the compiler vectorises it. */
KERNEL_ATTR static void SUFFIX(backward_cell)(const REAL *restrict gates, Py_ssize_t H,
                                              const REAL *restrict c_prev,
                                              const REAL *restrict tanh_c,
                                              const REAL *restrict dy, const REAL *restrict dh,
                                              REAL *restrict dc, REAL *restrict da,
                                              Py_ssize_t u_begin, Py_ssize_t u_end)
{
    for (Py_ssize_t u = u_begin; u < u_end; u++) {
        REAL i = gates[u], f = gates[H + u], o = gates[2 * H + u], g = gates[3 * H + u];
        REAL tc = tanh_c[u];
        REAL dh_t = dy[u] + dh[u];
        REAL dc_t = dc[u] + dh_t * o * (1 - tc * tc);
        da[u] = dc_t * g * i * (1 - i);
        da[H + u] = dc_t * c_prev[u] * f * (1 - f);
        da[2 * H + u] = dh_t * tc * o * (1 - o);
        da[3 * H + u] = dc_t * i * (1 - g * g);
        dc[u] = dc_t * f;
    }
}

/* A column strip of a (rows × n, row stride lda, n <= 2·LANES) as one panel of the tiles,
 *   out[k·2·LANES + j] = a[k·lda + j]   (0 for n <= j < 2·LANES)
 * and its column sums, sums[j] (+)= Σ_k a[k·lda + j] for j < n ("+=" when accumulate): the
 * weight gradients' db = da.sum(axis=0) while da passes through registers on its way to the
 * panels. (A loop of its own over the panels afterwards, scalar, took 4.6% of S3's backward.) */
KERNEL_ATTR static void SUFFIX(panel_with_sums)(const REAL *a, Py_ssize_t lda, Py_ssize_t rows,
                                                Py_ssize_t n, REAL *out, REAL *sums,
                                                int accumulate)
{
    const Py_ssize_t W = 2 * LANES;
    if (n == W) {
        /* even and odd rows in separate sums, so that two chains of adds run at once */
        VEC lo0 = {0}, hi0 = {0}, lo1 = {0}, hi1 = {0};
        Py_ssize_t k = 0;
        for (; k + 2 <= rows; k += 2) {
            VEC a_lo = SUFFIX(vload)(a + k * lda), a_hi = SUFFIX(vload)(a + k * lda + LANES);
            VEC b_lo = SUFFIX(vload)(a + (k + 1) * lda);
            VEC b_hi = SUFFIX(vload)(a + (k + 1) * lda + LANES);
            SUFFIX(vstore)(out + k * W, a_lo);
            SUFFIX(vstore)(out + k * W + LANES, a_hi);
            SUFFIX(vstore)(out + (k + 1) * W, b_lo);
            SUFFIX(vstore)(out + (k + 1) * W + LANES, b_hi);
            lo0 += a_lo;
            hi0 += a_hi;
            lo1 += b_lo;
            hi1 += b_hi;
        }
        if (k < rows) {
            VEC a_lo = SUFFIX(vload)(a + k * lda), a_hi = SUFFIX(vload)(a + k * lda + LANES);
            SUFFIX(vstore)(out + k * W, a_lo);
            SUFFIX(vstore)(out + k * W + LANES, a_hi);
            lo0 += a_lo;
            hi0 += a_hi;
        }
        SUFFIX(store_partial)(sums, lo0 + lo1, LANES, accumulate);
        SUFFIX(store_partial)(sums + LANES, hi0 + hi1, LANES, accumulate);
        return;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        REAL sum = 0;
        for (Py_ssize_t k = 0; k < rows; k++) {
            out[k * W + j] = a[k * lda + j];
            sum += a[k * lda + j];
        }
        sums[j] = accumulate ? sums[j] + sum : sum;
    }
    for (Py_ssize_t k = 0; k < rows; k++)
        for (Py_ssize_t j = n; j < W; j++)
            out[k * W + j] = 0;
}

/* ---- transposing ---- */

/* Lane lists for the shuffles of `transpose_tile`: F(k, s) for every lane k. */
#if LANES == 16
#define LANE_LIST(F, s)                                                                          \
    F(0, s), F(1, s), F(2, s), F(3, s), F(4, s), F(5, s), F(6, s), F(7, s), F(8, s), F(9, s),     \
        F(10, s), F(11, s), F(12, s), F(13, s), F(14, s), F(15, s)
#elif LANES == 8
#define LANE_LIST(F, s) F(0, s), F(1, s), F(2, s), F(3, s), F(4, s), F(5, s), F(6, s), F(7, s)
#else
#define LANE_LIST(F, s) F(0, s), F(1, s), F(2, s), F(3, s)
#endif
/* A round's pair of rows (a, b) = (row i, row i + s), bit s of i clear; the shuffles number
 * a's lanes 0 .. LANES-1 and b's LANES .. 2·LANES-1. New row i keeps a's lanes k whose bit s is
 * clear and takes b's lane k - s for the others; new row i + s takes a's lane k + s for lanes
 * with bit s clear and keeps b's others. */
#define LOW_LANE(k, s) (((k) & (s)) ? LANES + (k) - (s) : (k))
#define HIGH_LANE(k, s) (((k) & (s)) ? LANES + (k) : (k) + (s))
#if defined(__clang__)
#define SHUFFLE_PAIR(a, b, F, s) __builtin_shufflevector(a, b, LANE_LIST(F, s))
#else
#define SHUFFLE_PAIR(a, b, F, s) __builtin_shuffle(a, b, (IVEC){LANE_LIST(F, s)})
#endif
#define TRANSPOSE_ROUND(s)                                                                       \
    for (int i = 0; i < LANES; i++) {                                                            \
        if (!(i & (s))) {                                                                        \
            VEC a = r[i], b = r[i + (s)];                                                        \
            r[i] = SHUFFLE_PAIR(a, b, LOW_LANE, s);                                              \
            r[i + (s)] = SHUFFLE_PAIR(a, b, HIGH_LANE, s);                                       \
        }                                                                                        \
    }

/* dst[c·ldd + r] = src[r·lds + c] for one LANES x LANES tile, in registers. Each round swaps
 * bit s of the row number with bit s of the lane (the pairs of rows exchange their off-diagonal
 * s x s blocks); after the rounds s = LANES/2 .. 1 every element sits at its transposed place. */
KERNEL_ATTR static inline __attribute__((always_inline)) void SUFFIX(transpose_tile)(
    const REAL *src, Py_ssize_t lds, REAL *dst, Py_ssize_t ldd)
{
    VEC r[LANES];
#pragma GCC unroll 16
    for (int i = 0; i < LANES; i++)
        r[i] = SUFFIX(vload)(src + i * lds);
#if LANES == 16
#pragma GCC unroll 16
    TRANSPOSE_ROUND(8)
#endif
#if LANES >= 8
#pragma GCC unroll 16
    TRANSPOSE_ROUND(4)
#endif
#pragma GCC unroll 16
    TRANSPOSE_ROUND(2)
#pragma GCC unroll 16
    TRANSPOSE_ROUND(1)
#pragma GCC unroll 16
    for (int i = 0; i < LANES; i++)
        SUFFIX(vstore)(dst + i * ldd, r[i]);
}

/* dst[c·ldd + r] = src[r·lds + c] for r < rows, c < cols: whole tiles in registers, the edges
 * value by value. (The value-by-value loop over whole blocks wrote across cache lines at one
 * value a cycle at best: S1's Wh.T took 36 µs.) */
KERNEL_ATTR static void SUFFIX(transpose)(const REAL *restrict src, Py_ssize_t lds,
                                          Py_ssize_t rows, Py_ssize_t cols,
                                          REAL *restrict dst, Py_ssize_t ldd)
{
    Py_ssize_t r0 = 0;
    for (; r0 + LANES <= rows; r0 += LANES) {
        Py_ssize_t c0 = 0;
        for (; c0 + LANES <= cols; c0 += LANES)
            SUFFIX(transpose_tile)(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
        for (Py_ssize_t r = r0; r < r0 + LANES; r++)
            for (Py_ssize_t c = c0; c < cols; c++)
                dst[c * ldd + r] = src[r * lds + c];
    }
    for (Py_ssize_t r = r0; r < rows; r++)
        for (Py_ssize_t c = 0; c < cols; c++)
            dst[c * ldd + r] = src[r * lds + c];
}

#undef LANE_LIST
#undef LOW_LANE
#undef HIGH_LANE
#undef SHUFFLE_PAIR
#undef TRANSPOSE_ROUND
#undef TILE_ROWS
#undef VEC
#undef IVEC
