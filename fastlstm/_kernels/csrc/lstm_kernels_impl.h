/* One instantiation of the LSTM step kernels: included by lstm_kernels.h once per
 * (element type, instruction set). The includer defines
 *   REAL        float or double
 *   IREAL       the integer type of REAL's width (int32_t / int64_t), for exponent bits
 *   LANES       REALs per 32-byte vector (8 / 4)
 *   SUFFIX(n)   the instantiation's name for n, e.g. n##_f32_avx2
 *   KERNEL_ATTR the target attribute of every function here (empty for the portable build)
 *   EXP_CLAMP   |x| bound that keeps exp(x) finite and normal; EXP_DEGREE, MANT_BITS, EXP_BIAS
 *   LN2_HI, LN2_LO, ROUND_MAGIC  (see vexp)
 * The code uses GCC/Clang vector extensions rather than intrinsics, so the same text compiles
 * to AVX2+FMA inside target("avx2,fma") functions and to the baseline ISA (SSE2 on x86-64,
 * NEON elsewhere) in the portable instantiation.
 */

#define VEC SUFFIX(vec)
#define IVEC SUFFIX(ivec)

typedef REAL VEC __attribute__((vector_size(32)));
typedef IREAL IVEC __attribute__((vector_size(32)));

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
#if LANES == 8
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
    static const double inverse_factorial[] = {
        1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
        1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800};
    VEC p = SUFFIX(vbroadcast)((REAL)inverse_factorial[EXP_DEGREE]);
    for (int k = EXP_DEGREE - 1; k >= 0; k--) /* Horner: Σ r^k / k! */
        p = p * r + (REAL)inverse_factorial[k];
    IVEC n_int = (IVEC)shifted - (IVEC)magic;
    IVEC two_to_n = (n_int + EXP_BIAS) << MANT_BITS;
    return p * (VEC)two_to_n;
}

/* exp(x) for every x: vexp inside [-EXP_CLAMP, EXP_CLAMP], +inf above, 0 below (so that
 * σ(±inf) and tanh(±inf) come out exactly 1, 0, ±1), NaN for NaN. */
KERNEL_ATTR static inline VEC SUFFIX(vexp_saturating)(VEC x)
{
    const VEC bound = SUFFIX(vbroadcast)(EXP_CLAMP), zero = SUFFIX(vbroadcast)(0);
    IVEC above = (IVEC)(x > bound), below = (IVEC)(x < -bound), nan = (IVEC)(x != x);
    VEC inside = SUFFIX(vselect)(above | below | nan, zero, x);
    VEC e = SUFFIX(vexp)(inside);
    e = SUFFIX(vselect)(above, SUFFIX(vbroadcast)((REAL)__builtin_inf()), e);
    e = SUFFIX(vselect)(below, zero, e);
    return SUFFIX(vselect)(nan, x, e);
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

/* Rows r, r+1:  gates[row, q·H + u + j] += Σ_{k0 <= k < k1} h_prev[row, k] · w[k][q][j].
 * The two rows share each weight load: 8 FMAs per 4 loads. */
KERNEL_ATTR static inline void SUFFIX(accumulate_two_rows)(const REAL *w, const REAL *ha,
                                                           const REAL *hb, Py_ssize_t k0,
                                                           Py_ssize_t k1, REAL *gates_a,
                                                           REAL *gates_b, Py_ssize_t H,
                                                           Py_ssize_t u, Py_ssize_t n)
{
    VEC ia = {0}, fa = {0}, oa = {0}, ga = {0}, ib = {0}, fb = {0}, ob = {0}, gb = {0};
    w += k0 * 4 * LANES;
    for (Py_ssize_t k = k0; k < k1; k++, w += 4 * LANES) {
        VEC wi = SUFFIX(vload)(w), wf = SUFFIX(vload)(w + LANES);
        VEC wo = SUFFIX(vload)(w + 2 * LANES), wg = SUFFIX(vload)(w + 3 * LANES);
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

/* One row: the same sum with k split into even and odd halves, for 8 independent chains. */
KERNEL_ATTR static inline void SUFFIX(accumulate_one_row)(const REAL *w, const REAL *hr,
                                                          Py_ssize_t k0, Py_ssize_t k1,
                                                          REAL *gates_r, Py_ssize_t H,
                                                          Py_ssize_t u, Py_ssize_t n)
{
    VEC ie = {0}, fe = {0}, oe = {0}, ge = {0}, io = {0}, fo = {0}, oo = {0}, go = {0};
    Py_ssize_t k = k0;
    w += k0 * 4 * LANES;
    for (; k + 2 <= k1; k += 2, w += 8 * LANES) {
        VEC a = SUFFIX(vbroadcast)(hr[k]), b = SUFFIX(vbroadcast)(hr[k + 1]);
        ie += a * SUFFIX(vload)(w);
        fe += a * SUFFIX(vload)(w + LANES);
        oe += a * SUFFIX(vload)(w + 2 * LANES);
        ge += a * SUFFIX(vload)(w + 3 * LANES);
        io += b * SUFFIX(vload)(w + 4 * LANES);
        fo += b * SUFFIX(vload)(w + 5 * LANES);
        oo += b * SUFFIX(vload)(w + 6 * LANES);
        go += b * SUFFIX(vload)(w + 7 * LANES);
    }
    if (k < k1) {
        VEC a = SUFFIX(vbroadcast)(hr[k]);
        ie += a * SUFFIX(vload)(w);
        fe += a * SUFFIX(vload)(w + LANES);
        oe += a * SUFFIX(vload)(w + 2 * LANES);
        ge += a * SUFFIX(vload)(w + 3 * LANES);
    }
    SUFFIX(add_to_gates)(ie + io, fe + fo, oe + oo, ge + go, gates_r, H, u, n);
}

/* k values per pass over a block's weights: KC·4·LANES values (8 KiB of float) stay in the
 * 32 KiB L1 cache while every row pair of the batch reuses them. */
#define KC 64

/* One forward step for the hidden-unit blocks [blk_begin, blk_end) of `rows` batch rows:
 *   gates[r, q·H + u] += Σ_k h_prev[r, k] · Wh[k, q·H + u]      (gates += h_prev @ Wh)
 * then the cell update of those units. Row r of every array starts at r·H (r·4H for gates).
 * `packed` is Wh arranged by pack_recurrent_weights: per block of LANES units, H rows of
 * [i|f|o|g] × LANES (zero past H), so the k loop streams one contiguous run, in passes of KC
 * values of k. Accumulators are named variables (an accumulator array went to the stack with
 * gcc, DESIGN.md §6). */
KERNEL_ATTR static void SUFFIX(forward_step)(const REAL *packed, Py_ssize_t H, Py_ssize_t rows,
                                             const REAL *h_prev, REAL *gates, const REAL *c_prev,
                                             REAL *c, REAL *h, REAL *tanh_c,
                                             Py_ssize_t blk_begin, Py_ssize_t blk_end)
{
    const Py_ssize_t G = 4 * H;
    for (Py_ssize_t blk = blk_begin; blk < blk_end; blk++) {
        const REAL *w = packed + blk * H * 4 * LANES;
        Py_ssize_t u = blk * LANES;
        Py_ssize_t n = H - u < LANES ? H - u : LANES;
        for (Py_ssize_t k0 = 0; k0 < H; k0 += KC) {
            Py_ssize_t k1 = k0 + KC < H ? k0 + KC : H;
            Py_ssize_t r = 0;
            for (; r + 2 <= rows; r += 2)
                SUFFIX(accumulate_two_rows)(w, h_prev + r * H, h_prev + (r + 1) * H, k0, k1,
                                            gates + r * G, gates + (r + 1) * G, H, u, n);
            if (r < rows)
                SUFFIX(accumulate_one_row)(w, h_prev + r * H, k0, k1, gates + r * G, H, u, n);
        }
        for (Py_ssize_t r = 0; r < rows; r++)
            SUFFIX(cell_update)(gates + r * G, H, c_prev + r * H, c + r * H, h + r * H,
                                tanh_c ? tanh_c + r * H : NULL, u, u + n);
    }
}

#undef KC

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

KERNEL_ATTR static inline REAL SUFFIX(vsum)(VEC v)
{
    REAL s = 0;
    for (int j = 0; j < LANES; j++)
        s += v[j];
    return s;
}

/* Σ_{k0 <= k < k1} w[k]·d[k] for 4 rows of Wh (w0..w3) against one row of da: two partial
 * sums per row of Wh (8 accumulators). */
#define DOT_TAIL(s, wr, d)                                                                       \
    for (Py_ssize_t k = k_vec; k < k1; k++)                                                     \
        s += (wr)[k] * (d)[k];

/* dh[r, j] (+)= Σ_{k0 <= k < k1} da[r, k] · Wh[j, k] for rows r < rows and j in [j_begin, j_end)
 * (dh = da @ Wh.T over one range of k): "=" when k0 == 0, "+=" after. Rows of Wh are read in
 * their natural layout (contiguous in k, no packing); 4 of them against 2 rows of da give 8
 * accumulators with 6 loads per 8 FMAs, and the Wh rows are reused across the rows of da. */
KERNEL_ATTR static void SUFFIX(dh_block)(const REAL *Wh, Py_ssize_t H, Py_ssize_t rows,
                                         const REAL *da, REAL *dh, Py_ssize_t j_begin,
                                         Py_ssize_t j_end, Py_ssize_t k0, Py_ssize_t k1)
{
    const Py_ssize_t G = 4 * H;
    const Py_ssize_t k_vec = k0 + (k1 - k0) / LANES * LANES;
    const int first = k0 == 0;
    Py_ssize_t j = j_begin;
    for (; j + 4 <= j_end; j += 4) {
        const REAL *w0 = Wh + j * G, *w1 = w0 + G, *w2 = w1 + G, *w3 = w2 + G;
        Py_ssize_t r = 0;
        for (; r + 2 <= rows; r += 2) {
            const REAL *da_a = da + r * G, *da_b = da_a + G;
            VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
            for (Py_ssize_t k = k0; k < k_vec; k += LANES) {
                VEC x0 = SUFFIX(vload)(w0 + k), x1 = SUFFIX(vload)(w1 + k);
                VEC x2 = SUFFIX(vload)(w2 + k), x3 = SUFFIX(vload)(w3 + k);
                VEC da_ak = SUFFIX(vload)(da_a + k), da_bk = SUFFIX(vload)(da_b + k);
                a0 += x0 * da_ak;
                a1 += x1 * da_ak;
                a2 += x2 * da_ak;
                a3 += x3 * da_ak;
                b0 += x0 * da_bk;
                b1 += x1 * da_bk;
                b2 += x2 * da_bk;
                b3 += x3 * da_bk;
            }
            REAL sums[8] = {SUFFIX(vsum)(a0), SUFFIX(vsum)(a1), SUFFIX(vsum)(a2),
                            SUFFIX(vsum)(a3), SUFFIX(vsum)(b0), SUFFIX(vsum)(b1),
                            SUFFIX(vsum)(b2), SUFFIX(vsum)(b3)};
            DOT_TAIL(sums[0], w0, da_a) DOT_TAIL(sums[1], w1, da_a)
            DOT_TAIL(sums[2], w2, da_a) DOT_TAIL(sums[3], w3, da_a)
            DOT_TAIL(sums[4], w0, da_b) DOT_TAIL(sums[5], w1, da_b)
            DOT_TAIL(sums[6], w2, da_b) DOT_TAIL(sums[7], w3, da_b)
            for (int q = 0; q < 4; q++) {
                dh[r * H + j + q] = first ? sums[q] : dh[r * H + j + q] + sums[q];
                dh[(r + 1) * H + j + q] = first ? sums[4 + q] : dh[(r + 1) * H + j + q] + sums[4 + q];
            }
        }
        if (r < rows) {
            const REAL *da_r = da + r * G;
            VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
            Py_ssize_t k = k0;
            for (; k + 2 * LANES <= k_vec; k += 2 * LANES) {
                VEC d0 = SUFFIX(vload)(da_r + k), d1 = SUFFIX(vload)(da_r + k + LANES);
                a0 += SUFFIX(vload)(w0 + k) * d0;
                b0 += SUFFIX(vload)(w0 + k + LANES) * d1;
                a1 += SUFFIX(vload)(w1 + k) * d0;
                b1 += SUFFIX(vload)(w1 + k + LANES) * d1;
                a2 += SUFFIX(vload)(w2 + k) * d0;
                b2 += SUFFIX(vload)(w2 + k + LANES) * d1;
                a3 += SUFFIX(vload)(w3 + k) * d0;
                b3 += SUFFIX(vload)(w3 + k + LANES) * d1;
            }
            if (k < k_vec) {
                VEC d0 = SUFFIX(vload)(da_r + k);
                a0 += SUFFIX(vload)(w0 + k) * d0;
                a1 += SUFFIX(vload)(w1 + k) * d0;
                a2 += SUFFIX(vload)(w2 + k) * d0;
                a3 += SUFFIX(vload)(w3 + k) * d0;
            }
            REAL sums[4] = {SUFFIX(vsum)(a0 + b0), SUFFIX(vsum)(a1 + b1), SUFFIX(vsum)(a2 + b2),
                            SUFFIX(vsum)(a3 + b3)};
            DOT_TAIL(sums[0], w0, da_r) DOT_TAIL(sums[1], w1, da_r)
            DOT_TAIL(sums[2], w2, da_r) DOT_TAIL(sums[3], w3, da_r)
            for (int q = 0; q < 4; q++)
                dh[r * H + j + q] = first ? sums[q] : dh[r * H + j + q] + sums[q];
        }
    }
    for (; j < j_end; j++) {
        const REAL *w = Wh + j * G;
        for (Py_ssize_t r = 0; r < rows; r++) {
            const REAL *da_r = da + r * G;
            VEC a = {0};
            for (Py_ssize_t k = k0; k < k_vec; k += LANES)
                a += SUFFIX(vload)(w + k) * SUFFIX(vload)(da_r + k);
            REAL sum = SUFFIX(vsum)(a);
            DOT_TAIL(sum, w, da_r)
            dh[r * H + j] = first ? sum : dh[r * H + j] + sum;
        }
    }
}

#undef DOT_TAIL

/* k values per pass: KC values of every da row (the whole batch's share, 2 KiB a row for
 * float) stay in L2 while every group of 4 Wh rows (4·KC values, in L1) goes over them. */
#define KC 512

/* dh[r, j] = Σ_k da[r, k] · Wh[j, k] for rows r < rows, j in [j_begin, j_end), k < 4H
 * (dh = da @ Wh.T for these hidden units), in passes over k (dh_block). */
KERNEL_ATTR static void SUFFIX(backward_dh)(const REAL *Wh, Py_ssize_t H, Py_ssize_t rows,
                                            const REAL *da, REAL *dh, Py_ssize_t j_begin,
                                            Py_ssize_t j_end)
{
    for (Py_ssize_t k0 = 0; k0 < 4 * H; k0 += KC)
        SUFFIX(dh_block)(Wh, H, rows, da, dh, j_begin, j_end, k0,
                         k0 + KC < 4 * H ? k0 + KC : 4 * H);
}

#undef KC

#undef VEC
#undef IVEC
