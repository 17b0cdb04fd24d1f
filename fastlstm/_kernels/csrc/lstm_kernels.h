/* C helpers of the Cython backend (_lstm_cython.pyx): vectorised LSTM step kernels in a portable
 * build and, on x86-64, AVX2+FMA and AVX-512 builds chosen at run time; a spin barrier; OpenMP
 * queries.
 *
 * Every kernel is compiled from lstm_kernels_impl.h once per (float, double) x (portable, avx2,
 * avx512). The Cython code calls the names fastlstm_<kernel>_<f32|f64>, which pick the build of
 * fastlstm_isa (fastlstm_set_isa: the best the CPU has, capped by the caller's wish).
 */
#ifndef FASTLSTM_LSTM_KERNELS_H
#define FASTLSTM_LSTM_KERNELS_H

#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if !defined(_WIN32)
#include <sched.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLSTM_X86_SIMD 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define FASTLSTM_X86_SIMD 0
#endif

#if defined(__GNUC__) && !defined(__clang__)
/* 32-byte vector types in baseline-ISA functions: every such function is inlined, no ABI crosses. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

/* The x86-64-v4 set (Skylake-X, Zen 4 and later): 64-byte vectors, 32 vector registers. */
#define FASTLSTM_AVX512_ATTR __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))

/* Steps over which forward_step_projecting spreads the input projection of one tile of six rows
 * (at B = 1, the rows of six later steps): each block's [i|f] panel in thirds of D over the first
 * three, its [o|g] panel over the last three. */
#define FASTLSTM_PIPE_STEPS 6

/* ---- float ---- */
#define REAL float
#define IREAL int32_t
#define LANES 8
#define EXP_CLAMP 87.0f
#define EXP_INF_CLAMP 89.0f /* x / ln2 rounds to 128 */
#define EXP_DEGREE 7
#define MANT_BITS 23
#define EXP_BIAS 127
#define LN2_HI 0.693145751953125   /* ln 2 to 16 bits: n·LN2_HI exact for |n| <= 128 */
#define LN2_LO 1.4286068203094173e-06
#define ROUND_MAGIC 12582912.0f    /* 1.5·2^23 */

#define KERNEL_ATTR
#define SUFFIX(name) name##_f32_portable
#include "lstm_kernels_impl.h"
#undef KERNEL_ATTR
#undef SUFFIX
#if FASTLSTM_X86_SIMD
#define KERNEL_ATTR __attribute__((target("avx2,fma")))
#define SUFFIX(name) name##_f32_avx2
#define VMIN _mm256_min_ps
#define VMAX _mm256_max_ps
#include "lstm_kernels_impl.h"
#undef VMIN
#undef VMAX
#undef KERNEL_ATTR
#undef SUFFIX
#undef LANES
#define LANES 16
#define KERNEL_ATTR FASTLSTM_AVX512_ATTR
#define SUFFIX(name) name##_f32_avx512
#define VMIN _mm512_min_ps
#define VMAX _mm512_max_ps
#include "lstm_kernels_impl.h"
#undef VMIN
#undef VMAX
#undef KERNEL_ATTR
#undef SUFFIX
#endif
#undef REAL
#undef IREAL
#undef LANES
#undef EXP_CLAMP
#undef EXP_INF_CLAMP
#undef EXP_DEGREE
#undef MANT_BITS
#undef EXP_BIAS
#undef LN2_HI
#undef LN2_LO
#undef ROUND_MAGIC

/* ---- double ---- */
#define REAL double
#define IREAL int64_t
#define LANES 4
#define EXP_CLAMP 708.0
#define EXP_INF_CLAMP 710.0 /* x / ln2 rounds to 1024 */
#define EXP_DEGREE 11
#define MANT_BITS 52
#define EXP_BIAS 1023
#define LN2_HI 0.6931471803691238  /* ln 2 to 32 bits: n·LN2_HI exact for |n| <= 1024 */
#define LN2_LO 1.9082149292705877e-10
#define ROUND_MAGIC 6755399441055744.0 /* 1.5·2^52 */

#define KERNEL_ATTR
#define SUFFIX(name) name##_f64_portable
#include "lstm_kernels_impl.h"
#undef KERNEL_ATTR
#undef SUFFIX
#if FASTLSTM_X86_SIMD
#define KERNEL_ATTR __attribute__((target("avx2,fma")))
#define SUFFIX(name) name##_f64_avx2
#define VMIN _mm256_min_pd
#define VMAX _mm256_max_pd
#include "lstm_kernels_impl.h"
#undef VMIN
#undef VMAX
#undef KERNEL_ATTR
#undef SUFFIX
#undef LANES
#define LANES 8
#define KERNEL_ATTR FASTLSTM_AVX512_ATTR
#define SUFFIX(name) name##_f64_avx512
#define VMIN _mm512_min_pd
#define VMAX _mm512_max_pd
#include "lstm_kernels_impl.h"
#undef VMIN
#undef VMAX
#undef KERNEL_ATTR
#undef SUFFIX
#endif
#undef REAL
#undef IREAL
#undef LANES
#undef EXP_CLAMP
#undef EXP_INF_CLAMP
#undef EXP_DEGREE
#undef MANT_BITS
#undef EXP_BIAS
#undef LN2_HI
#undef LN2_LO
#undef ROUND_MAGIC

/* ---- run-time choice of the instruction set ---- */
#define FASTLSTM_ISA_PORTABLE 0
#define FASTLSTM_ISA_AVX2 1
#define FASTLSTM_ISA_AVX512 2

static int fastlstm_isa = FASTLSTM_ISA_PORTABLE;

/* The best instruction set of this CPU that the kernels have a build for. */
static int fastlstm_cpu_isa(void)
{
#if FASTLSTM_X86_SIMD
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
        return FASTLSTM_ISA_PORTABLE;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
        return FASTLSTM_ISA_AVX512;
    return FASTLSTM_ISA_AVX2;
#else
    return FASTLSTM_ISA_PORTABLE;
#endif
}

/* Whether the CPU is an AMD one of family 19h (Zen 3 and Zen 4; with AVX-512, Zen 4), whose
 * vector units are 256 bits wide: a 512-bit instruction takes two passes. (Zen 5, family 1Ah,
 * has 512-bit units.) */
static int fastlstm_cpu_amd_family_19h(void)
{
#if FASTLSTM_X86_SIMD
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx))
        return 0;
    /* the vendor string "AuthenticAMD" in ebx, edx, ecx */
    if (ebx != 0x68747541u || edx != 0x69746e65u || ecx != 0x444d4163u)
        return 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx))
        return 0;
    unsigned int family = (eax >> 8) & 0xfu;
    if (family == 0xfu)
        family += (eax >> 20) & 0xffu;
    return family == 0x19u;
#else
    return 0;
#endif
}

/* Use the best build up to `wanted` that the CPU runs; returns the one now in use. */
static int fastlstm_set_isa(int wanted)
{
    int best = fastlstm_cpu_isa();
    fastlstm_isa = wanted < best ? wanted : best;
    return fastlstm_isa;
}

/* Hidden units per block of the packed recurrent weights: one vector of the build in use. */
static int fastlstm_units_f32(void) { return fastlstm_isa == FASTLSTM_ISA_AVX512 ? 16 : 8; }
static int fastlstm_units_f64(void) { return fastlstm_isa == FASTLSTM_ISA_AVX512 ? 8 : 4; }

#if FASTLSTM_X86_SIMD
#define FASTLSTM_PICK(name, type)                                                                \
    (fastlstm_isa == FASTLSTM_ISA_AVX512 ? name##_##type##_avx512                                 \
     : fastlstm_isa == FASTLSTM_ISA_AVX2 ? name##_##type##_avx2                                   \
                                         : name##_##type##_portable)
#else
#define FASTLSTM_PICK(name, type) (name##_##type##_portable)
#endif

#define fastlstm_sigmoid_array_f32 FASTLSTM_PICK(sigmoid_array, f32)
#define fastlstm_sigmoid_array_f64 FASTLSTM_PICK(sigmoid_array, f64)
#define fastlstm_tanh_array_f32 FASTLSTM_PICK(tanh_array, f32)
#define fastlstm_tanh_array_f64 FASTLSTM_PICK(tanh_array, f64)
#define fastlstm_cell_update_f32 FASTLSTM_PICK(cell_update, f32)
#define fastlstm_cell_update_f64 FASTLSTM_PICK(cell_update, f64)
#define fastlstm_forward_step_f32 FASTLSTM_PICK(forward_step, f32)
#define fastlstm_forward_step_f64 FASTLSTM_PICK(forward_step, f64)
#define fastlstm_backward_cell_f32 FASTLSTM_PICK(backward_cell, f32)
#define fastlstm_backward_cell_f64 FASTLSTM_PICK(backward_cell, f64)
#define fastlstm_forward_tiles_f32 FASTLSTM_PICK(forward_tiles, f32)
#define fastlstm_forward_tiles_f64 FASTLSTM_PICK(forward_tiles, f64)
#define fastlstm_project_blocks_f32 FASTLSTM_PICK(project_blocks, f32)
#define fastlstm_project_blocks_f64 FASTLSTM_PICK(project_blocks, f64)
#if FASTLSTM_X86_SIMD
#define fastlstm_forward_step_projecting_f32 forward_step_projecting_f32_avx512
#else /* never called: the steps carry the projection on the AVX-512 build only */
#define fastlstm_forward_step_projecting_f32(...) ((void)0)
#endif
#define fastlstm_backward_dh_tiles_f32 FASTLSTM_PICK(backward_dh_tiles, f32)
#define fastlstm_backward_dh_panels_f32 FASTLSTM_PICK(backward_dh_panels, f32)
#define fastlstm_backward_dh_panels_f64 FASTLSTM_PICK(backward_dh_panels, f64)
#define fastlstm_backward_dh_tiles_f64 FASTLSTM_PICK(backward_dh_tiles, f64)
#define fastlstm_panel_with_sums_f32 FASTLSTM_PICK(panel_with_sums, f32)
#define fastlstm_panel_with_sums_f64 FASTLSTM_PICK(panel_with_sums, f64)
#define fastlstm_transpose_f32 FASTLSTM_PICK(transpose, f32)
#define fastlstm_transpose_f64 FASTLSTM_PICK(transpose, f64)

/* ---- threads ---- */
static int fastlstm_team_size(void)
{
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* A barrier for the threads of one parallel region, waited at every time step. Spinning costs
 * 0.05-0.1 µs per step on 2 threads against 0.3-0.5 µs for `omp barrier` (DESIGN.md §6). But the
 * cores are shared: when the partner thread is descheduled, spinning (or sched_yield) holds the
 * core it may need and a 100-step call took 28 ms instead of 0.3 ms. So a waiter spins for
 * FASTLSTM_SPINS_BEFORE_SLEEP polls (a few µs, longer than a step) and then sleeps on a futex;
 * the last thread to arrive wakes the sleepers. Even so, lockstep threads on busy cores pay a
 * wake-up per step (measured 28 ms for S2 against 1.9 ms on one thread), so a wait that had to
 * sleep marks the barrier contended, and the next release tells every thread to go on alone
 * (fastlstm_barrier_wait returns 1 to all of them at the same step; thread 0 then takes over
 * all the work and the others leave the loop). */
#define FASTLSTM_SPINS_BEFORE_SLEEP 4000
static int fastlstm_spins_before_sleep = FASTLSTM_SPINS_BEFORE_SLEEP; /* the tests set 0 */
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <limits.h>
static void fastlstm_sleep_while_equal(int *address, int value)
{
    syscall(SYS_futex, address, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}
static void fastlstm_wake_all(int *address)
{
    syscall(SYS_futex, address, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}
#else
static void fastlstm_sleep_while_equal(int *address, int value)
{
    (void)address;
    (void)value;
#if !defined(_WIN32)
    sched_yield();
#endif
}
static void fastlstm_wake_all(int *address) { (void)address; }
#endif

/* A team of two waits on two words instead, one cache line each, that only their own thread
 * writes: (arrivals << 2) | (contended as seen at this arrival) << 1 | (seen at the one before).
 * An arrival then moves one line each way, where the counter moves its one line back and forth
 * several times. On Zen 5, 2 threads, T = 100, median of per-pair ratios of alternating
 * processes (8 pairs), against the counter: S1 forward 0.94 (`LSTM` 0.95), S2 1.00 (0.98);
 * forward+backward S1 0.985, S2 0.998, S3 0.996 (4 pairs). */
typedef struct {
    unsigned int word __attribute__((aligned(64)));
} fastlstm_arrivals;

typedef struct {
    int arrived;
    int generation;
    int sleepers;
    int contended; /* set by a waiter that had to sleep */
    int solo;      /* the decision published with the last release: 1 = go on alone */
    fastlstm_arrivals pair[2];
} fastlstm_barrier;

static void fastlstm_barrier_init(fastlstm_barrier *barrier)
{
    barrier->arrived = 0;
    barrier->generation = 0;
    barrier->sleepers = 0;
    barrier->contended = 0;
    barrier->solo = 0;
    barrier->pair[0].word = 0;
    barrier->pair[1].word = 0;
}

static inline void fastlstm_cpu_relax(void)
{
#if FASTLSTM_X86_SIMD
    __builtin_ia32_pause();
#endif
}

#define FASTLSTM_ARRIVALS(word) ((word) >> 2)
#define FASTLSTM_ARRIVALS_MASK 0x3fffffffu

/* fastlstm_barrier_wait for a team of two, thread `id` (0 or 1). The partner is at most one
 * arrival ahead (it cannot pass the next wait without this thread), so its word holds its
 * contended bit of this arrival: the newest one if it has not arrived again, else the one
 * before. Both threads OR the same two bits: the same decision, as with the counter. */
static int fastlstm_pair_wait(fastlstm_barrier *barrier, int id)
{
    unsigned int *mine = &barrier->pair[id].word, *theirs = &barrier->pair[1 - id].word;
    unsigned int old = __atomic_load_n(mine, __ATOMIC_RELAXED);
    unsigned int arrival = (FASTLSTM_ARRIVALS(old) + 1) & FASTLSTM_ARRIVALS_MASK;
    unsigned int seen = __atomic_load_n(&barrier->contended, __ATOMIC_SEQ_CST) ? 1u : 0u;
    /* sequentially consistent with the sleepers' increment and re-check below, as above */
    __atomic_store_n(mine, (arrival << 2) | (seen << 1) | ((old >> 1) & 1u), __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&barrier->sleepers, __ATOMIC_SEQ_CST) > 0)
        fastlstm_wake_all((int *)mine);
    unsigned int other;
    for (int spins = 0;;) {
        other = __atomic_load_n(theirs, __ATOMIC_ACQUIRE);
        /* the partner's arrivals are this one's minus 1 (not yet here), or equal or plus 1 */
        if (((FASTLSTM_ARRIVALS(other) - arrival + 1) & FASTLSTM_ARRIVALS_MASK) != 0)
            break;
        if (spins < fastlstm_spins_before_sleep) {
            spins++;
            fastlstm_cpu_relax();
            continue;
        }
        __atomic_store_n(&barrier->contended, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&barrier->sleepers, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(theirs, __ATOMIC_SEQ_CST) == other)
            fastlstm_sleep_while_equal((int *)theirs, (int)other);
        __atomic_sub_fetch(&barrier->sleepers, 1, __ATOMIC_SEQ_CST);
    }
    unsigned int other_seen = FASTLSTM_ARRIVALS(other) == arrival ? (other >> 1) & 1u : other & 1u;
    int solo = (int)(seen | other_seen);
    if (solo)
        __atomic_store_n(&barrier->solo, 1, __ATOMIC_RELAXED);
    return solo;
}

/* Wait for all `team` threads; returns 1 (to every thread alike) when the team should stop
 * working in lockstep, see above. A team keeps its size for the life of a barrier (a thread
 * going on alone passes team 1, which does not wait). */
static int fastlstm_barrier_wait(fastlstm_barrier *barrier, int team)
{
    if (team <= 1)
        return 0;
#ifdef _OPENMP
    if (team == 2)
        return fastlstm_pair_wait(barrier, omp_get_thread_num());
#endif
    int generation = __atomic_load_n(&barrier->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&barrier->arrived, 1, __ATOMIC_ACQ_REL) == team) {
        __atomic_store_n(&barrier->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&barrier->solo, __atomic_load_n(&barrier->contended, __ATOMIC_SEQ_CST),
                         __ATOMIC_RELAXED);
        /* sequentially consistent with the sleepers' increment and re-check below: either a
         * sleeper sees the new generation before sleeping, or this sees the sleeper */
        __atomic_store_n(&barrier->generation, generation + 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&barrier->sleepers, __ATOMIC_SEQ_CST) > 0)
            fastlstm_wake_all(&barrier->generation);
        return __atomic_load_n(&barrier->solo, __ATOMIC_RELAXED);
    }
    for (int spins = 0; __atomic_load_n(&barrier->generation, __ATOMIC_ACQUIRE) == generation;) {
        if (spins < fastlstm_spins_before_sleep) {
            spins++;
            fastlstm_cpu_relax();
            continue;
        }
        __atomic_store_n(&barrier->contended, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&barrier->sleepers, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&barrier->generation, __ATOMIC_SEQ_CST) == generation)
            fastlstm_sleep_while_equal(&barrier->generation, generation);
        __atomic_sub_fetch(&barrier->sleepers, 1, __ATOMIC_SEQ_CST);
    }
    return __atomic_load_n(&barrier->solo, __ATOMIC_RELAXED);
}

/* After the threads have left: whether a release told them to go on alone (sticky: once a
 * wait has slept, every later release repeats it). */
static int fastlstm_barrier_solo(const fastlstm_barrier *barrier)
{
    return __atomic_load_n(&barrier->solo, __ATOMIC_RELAXED);
}

#endif /* FASTLSTM_LSTM_KERNELS_H */
