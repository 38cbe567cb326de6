/* pykimi_kernels.c -- y = x @ W^T with W read in its stored form (f32, bf16, Q8_32, Q4_32).
 *
 * Plain C99 (+ GNU target attributes and intrinsics on x86 for the AVX2/FMA and AVX-512 paths). Formats and
 * shapes: pykimi_kernels.h.
 * NumPy twins: pykimi/kernels/ref.py (matmul, matmul_act_q4, ...) -- the tests hold these to them.
 *
 * Why the loop nest looks like this:
 *  - Decode is a GEMV that reads every weight once, so it is bound by memory bandwidth: the weights are
 *    decoded (bf16 shift, int8/int4 * scale) in registers and never written back as f32.
 *  - For a small batch (n up to ~32 rows of x) the same weight row is reused for a tile of up to PK_NT
 *    rows of x: the row is decoded once per tile, and a block of PK_RB rows stays in L1/L2 between tiles,
 *    so memory traffic is still one pass over W.  (Large n goes to BLAS on widened tiles instead; see
 *    kernels/__init__.py.)  bf16 from 12 rows of x and Q8 with 24 to 128 at the AVX-512 level (a prefill's
 *    tokens per expert, a dense prefill) vectorise over the rows of x instead (bf16_tn_avx512; Q8 with f32
 *    activations only, the exact product -- kernels/__init__.py asks for it in that range), and so does bf16
 *    from 12 rows at the AVX2 level (bf16_tn_avx2, the same bits; kernels/linear.py sends it up to 192 rows).
 *  - OpenMP splits the output rows (by cost, across all matrices of one call -- see "the drivers"): each
 *    thread streams its own contiguous slab of W, and a call pays one fork/join however many matrices.
 *  - int8/int4 weights: the activation row is quantized once per call (int16 for Q8, int8 for Q4) and each
 *    block of 32 becomes an integer dot product; decoding every weight to f32 instead would make these
 *    GEMVs compute bound on AVX2 (int4 slower per token than bf16). The f32-decoding kernels stay as the
 *    exact path (PYKIMI_ACT_QUANT=none).
 *  - bf16 weights with bf16 activations (opt-in, PYKIMI_ACT_QUANT=all): batches of PK_BF16A_MIN or more rows
 *    on CPUs with AVX512_BF16 round x to bf16 once per call and multiply stored bf16 pairs with vdpbf16ps
 *    (bf16a_rows: twice the multiplies of an f32 FMA, no widening of the weights). The default stays the f32
 *    product of the decoded weights.
 *  - Q8 / Q4 weights with int8 activations, batches of PK_VNNI_MIN_Q8 / _Q4 or more rows at the AVX-512 level
 *    (prefill; int4 by default, int8 with PYKIMI_ACT_QUANT=all): x quantized once per call and packed 16 rows to a
 *    vector, each 4-byte group of a stored weight row broadcast against it with vpdpbusd (vnni_rows: ~1 TOP/s on
 *    2 cores against ~0.35-0.45 for the row kernels). At the AVX2 level the same scheme on vpmaddubsw + vpmaddwd
 *    (avx2b_rows: 8 rows per vector, ~2.5x the row kernels on Q4, ~1.4x on Q8). The serve engine's row-wise calls
 *    stay on the row kernels.
 *  - Q8 weights with int16 activations (the default mode's Q8), batches of PK_VNNI16_MIN_Q8 or more rows at the
 *    AVX-512 level: the same scheme on vpdpwssd, 16 rows x 2 int16 k-elements per vector, the weights widened to
 *    int16 pairs in L1 (PK_VW_KERNEL: ~600 GOP/s on 2 cores against ~250 for the int16 row kernel and 200-400 for
 *    the exact f32 batch kernel / widened tiles it replaces). At the AVX2 level the same scheme on vpmaddwd + vpaddd
 *    (PK_AW_KERNEL: 8 rows per vector, ~1.3x the int16 row kernel at 8 rows, ~1.6x from 16, ~1.5x the widened tiles
 *    at 512).
 *  - Every kernel has a portable scalar loop beside an AVX2/FMA and an AVX-512 (F/BW/VL + VNNI) version,
 *    each compiled with a per-function target attribute (no -march=native: one binary runs on any x86-64,
 *    and non-x86 builds compile only the portable loops). The level is chosen at run time with
 *    __builtin_cpu_supports -- the best one the CPU has, or PYKIMI_SIMD / pk_set_simd for tests and
 *    benchmarks. Integer block dots are exact at every level; float sums differ only in order.
 *  - Per output row the cost that is not streaming weights (call, horizontal sum, store) is paid once per
 *    block of PK_RB rows (pk_tile), and the activations are quantized with vector code: a 512-wide int4
 *    row is ~20 cycles of work, so anything per row shows.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200112L /* posix_memalign (pk_amalloc) under -std=c99 */
#endif
#include "pykimi_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(PK_NO_SIMD)
#define PK_X86 1
#include <immintrin.h>
#define PK_AVX2 __attribute__((target("avx2,fma")))
#define PK_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
/* The batch kernels (PK_VN_KERNEL, PK_VW_KERNEL, PK_AB_KERNEL, PK_AW_KERNEL) start on a 64-byte boundary, so that where
 * their hot loops fall in the fetch windows does not move with the code placed before them. Byte for byte the same int8
 * Q4 kernels (vnni_q4_*, mode "all", 2 threads, AMD EPYC Zen 5, gcc 12), only moved by a change in the AVX2 kernel,
 * measured [2048, 1408] 8 / 16 / 32 rows 377-379 / 766-771 / 941-947 GOP/s starting at 48 mod 64, 344 / 698-701 /
 * 922-931 at 32, 386-388 / 785-789 / 953-955 at 0. Aligned, the int8 and int16 kernels measured as before the move
 * (4-layer int4 prefill of 64 / 128 / 512 tokens 670-726 / 834-858 / 788-907 -> 663-731 / 810-878 / 817-904 tok/s). */
#define PK_HOT __attribute__((aligned(64)))
/* AVX-512 needs a compiler that knows the VNNI target and intrinsics: gcc >= 8, clang >= 8. */
#if (defined(__clang__) && __clang_major__ >= 8) || (!defined(__clang__) && __GNUC__ >= 8)
#define PK_HAVE_AVX512 1
#define PK_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"
#define PK_AVX512 __attribute__((target(PK_AVX512_TARGET)))
#define PK_AVX512_INLINE static inline __attribute__((always_inline, target(PK_AVX512_TARGET)))
#else
#define PK_HAVE_AVX512 0
#endif
#else
#define PK_X86 0
#define PK_HAVE_AVX512 0
#endif

/* AMX (Sapphire Rapids and later): bf16 tile products for the prefill's bf16 / Q8 batches. Needs gcc >= 11 /
 * clang >= 12 with an assembler that knows the instructions (the build probes it, else -DPK_NO_AMX) and
 * Linux, whose arch_prctl grants the tile state to a process that asks. */
#if PK_HAVE_AVX512 && defined(__x86_64__) && defined(__linux__) && !defined(PK_NO_AMX) &&             \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define PK_HAVE_AMX 1
#include <cpuid.h>
#define PK_AMX __attribute__((target("amx-tile,amx-bf16," PK_AVX512_TARGET)))
#else
#define PK_HAVE_AMX 0
#endif

/* AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4): vdpbf16ps, 32 bf16 products per instruction summed into 16
 * f32 lanes, for bf16 weights x activations rounded to bf16 (the opt-in "bf16" activation mode of bf16
 * batches, PYKIMI_ACT_QUANT=all). Needs gcc >= 10 / clang >= 9; the build probes the intrinsics and defines
 * PK_NO_AVX512BF16 when they do not compile. The CPU is asked at run time (CPUID.(7,1):EAX bit 5). */
#if PK_HAVE_AVX512 && !defined(PK_NO_AVX512BF16) &&                                                      \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define PK_HAVE_AVX512BF16 1
#include <cpuid.h>
#define PK_AVX512BF16 __attribute__((target("avx512bf16," PK_AVX512_TARGET)))
#else
#define PK_HAVE_AVX512BF16 0
#endif

/* NAME_avx512 / NAME_avx2 / NAME_scalar ARGS at SIMD level simd (the levels this build has). */
#if PK_HAVE_AVX512
#define PK_LEVEL_CALL(simd, NAME, ARGS) \
    ((simd) >= 2 ? NAME##_avx512 ARGS : (simd) == 1 ? NAME##_avx2 ARGS : NAME##_scalar ARGS)
#elif PK_X86
#define PK_LEVEL_CALL(simd, NAME, ARGS) ((simd) >= 1 ? NAME##_avx2 ARGS : NAME##_scalar ARGS)
#else
#define PK_LEVEL_CALL(simd, NAME, ARGS) ((void)(simd), NAME##_scalar ARGS)
#endif

#define PK_NT 4          /* rows of x sharing one decoded weight row */
#define PK_TN_MIN 12     /* bf16, AVX-512: from this many rows of x, the batch-vectorised kernel */
#define PK_TN_MIN_Q8 24  /* Q8 (below it the int16 row kernel is as fast); kernels/__init__.py mirrors it */
#define PK_TN_MAX 128    /* ... Q8 up to this many (bf16 however many), in groups of PK_TN_GROUP rows (4 x 16) */
#define PK_TN_GROUP 64
#ifndef PK_TN_MIN_AVX2   /* (-D for measurements only) */
#define PK_TN_MIN_AVX2 12 /* bf16, AVX2: from this many rows of x its twin bf16_tn_avx2 (below it tile_avx2) */
#endif
#define PK_BD_XPF 128  /* elements of a row of x the x packings prefetch ahead (bf16a_pack_group, tr_cols): 60
                          jobs of 64 rows from DRAM 12.6 -> 4.3 ms (256: 5.0) */
#define PK_BF16A_MIN 8   /* bf16 activations (A_BF16): the AVX512_BF16 kernel from this many rows (linear.py) */
#ifndef PK_VNNI_MIN_Q8     /* (-D for measurements only: linear.C_VNNI_MIN must agree) */
#define PK_VNNI_MIN_Q8 8  /* int8 activations (A_I8), AVX-512: the VNNI batch kernel from this many rows (linear.py */
#define PK_VNNI_MIN_Q4 8  /* C_VNNI_MIN mirrors both; below them the per-row kernels tile_act_avx512) */
#endif
#ifndef PK_VNNI16_MIN_Q8   /* (-D for measurements only: linear.C_VNNI16_MIN must agree) */
#define PK_VNNI16_MIN_Q8 9 /* int16 activations (A_I16, the default for Q8_32), AVX-512: the int16 batch kernel
                              (PK_VW_KERNEL) from this many rows; below it the row kernel tile_q8w_avx512 */
#endif
#ifndef PK_AVX2W_MIN_Q8    /* (-D for measurements only: linear.C_VNNI16_MIN_AVX2 must agree) */
#define PK_AVX2W_MIN_Q8 6 /* ... at the AVX2 level: its vpmaddwd twin (PK_AW_KERNEL) from this many rows; below it
                             (and for the rows past the last vector of 8 below it) the row kernel tile_q8w_avx2 */
#endif
#ifndef PK_AVX2B_MIN_Q8    /* (-D for measurements only: linear.C_VNNI_MIN_AVX2 must agree) */
#define PK_AVX2B_MIN_Q8 7 /* ... at the AVX2 level: the maddubs twin of the VNNI batch kernel (avx2b_rows) from this */
#define PK_AVX2B_MIN_Q4 4 /* many rows (linear.C_VNNI_MIN_AVX2; below them the per-row kernels tile_act_avx2) */
#endif
#define PK_KC 256        /* columns of weights it decodes into L1 at a time */
#define PK_BLOCK 32      /* quantization block along `in` */
#define PK_PAR_MIN 65536 /* below this many multiply-adds a thread team costs more than it saves */
#define PK_PREP_PAR_MIN 32768 /* run_jobs prepares jobs on the threads from this many elements of x to quantize */

enum { F_F32 = 0, F_BF16 = 1, F_Q8 = 2, F_Q4 = 3 };

/* One call of a row kernel ("tile"): nt (<= PK_NT) rows of x against weight rows [0, nrows) from w; each
 * weight row is read once and used for all nt rows of x. The row loop lives inside the per-level kernels
 * (PK_TILE_ROWS) so that a GEMV pays one call per block of rows, not one per output element -- that
 * per-row call cost was ~25 % of a 512-wide int4 row. */
typedef struct {
    int fmt, nt;
    int64_t in, nb, nrows, row_bytes, ystride;
    const void *w;
    const float *sc;          /* block scales of the first weight row (next row nb further); NULL for f32/bf16 */
    const float *x;           /* f32 activations [nt, in] */
    const int8_t *xq, *xqp;   /* int8 activations (row stride nb * 32): natural order / the level's Q4 layout */
    const int16_t *xq16;      /* int16 activations (row stride nb * 32) */
    const float *xd;          /* activation scale per block (row stride nb) */
    const int32_t *xs;        /* Q4 offsets, AVX2 level: block sums of x (stride nb) */
    const float *xds, *xcor;  /* Q4, AVX-512 level: xd spread over each block's 4 lanes (stride nb * 4); the
                                 nibble offset -8 * xd * sum(x block) (stride nb) */
    float *y;                 /* result of x row t, weight row r -> y[t * ystride + r] */
} pk_tile;

/* Loop over the tile's weight rows; CALL computes res[0..nt) from wr (the row) and sr (its scales). */
#define PK_TILE_ROWS(CALL)                                                              \
    do {                                                                                \
        const int64_t nrows_ = tl->nrows, rb_ = tl->row_bytes, nb_ = tl->nb, ys_ = tl->ystride; \
        const char *w_ = (const char *)tl->w;                                           \
        const float *sc_ = tl->sc;                                                      \
        float *y_ = tl->y;                                                              \
        const int nt_ = tl->nt;                                                         \
        int64_t r_;                                                                     \
        for (r_ = 0; r_ < nrows_; r_++) {                                               \
            const void *wr = w_ + r_ * rb_;                                             \
            const float *sr = sc_ ? sc_ + r_ * nb_ : NULL;                              \
            float res[PK_NT];                                                           \
            int t_;                                                                     \
            CALL;                                                                       \
            for (t_ = 0; t_ < nt_; t_++) y_[t_ * ys_ + r_] = res[t_];                   \
        }                                                                               \
    } while (0)

/* Specialise a row kernel on a compile-time nt (1..4): ROW(NT) expands to the call. */
#define PK_BY_NT(ROW)                       \
    switch (tl->nt) {                       \
    case 1: PK_TILE_ROWS(ROW(1)); break;    \
    case 2: PK_TILE_ROWS(ROW(2)); break;    \
    case 3: PK_TILE_ROWS(ROW(3)); break;    \
    default: PK_TILE_ROWS(ROW(4)); break;   \
    }

/* ------------------------------------------------------------------------------------ buffers */

/* Every activation buffer a kernel streams with full-vector loads (quantized x, its scales, packed batches, the
 * MoE's gate/up and expert outputs) starts on a 64-byte boundary: glibc's malloc gives 16, and then every
 * 64-byte load of x splits across two cache lines. Measured on the Q4 x int8 row kernel alone (AMD EPYC Zen 5,
 * one thread, [1024, 2048] in L2), cycles per 128 weights at 1 / 4 rows of x: x and its scales at a 64-byte
 * boundary 4.06 / 9.97, 16 bytes past one 5.08 / 15.91. Freed with free(). NULL when there is no memory. */
static void *pk_amalloc(size_t bytes) {
#if defined(_WIN32)
    return malloc(bytes ? bytes : 64); /* no posix_memalign: unaligned, which the kernels' loads allow */
#else
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    return p;
#endif
}

#define PK_UP64(b) (((size_t)(b) + 63) & ~(size_t)63) /* bytes rounded up to whole cache lines */

/* In a batch kernel (PK_VN_KERNEL, PK_VW_KERNEL, PK_AB_KERNEL, PK_AW_KERNEL) of job j: the step of R weight rows
 * from row o, up to row end (rows past it repeat the last one before it: read, not stored). Declares rr (the rows
 * stored), wr (the rows, as T), nx (the rows R further on, which the step prefetches; past the matrix, its last row)
 * and sr (their block scales); uses the kernel's r. */
#define PK_STEP_ROWS(T, end, R)                                                  \
    const int rr = (end) - o < (R) ? (int)((end) - o) : (R);                     \
    T wr[R];                                                                     \
    T nx[R];                                                                     \
    const float *sr[R];                                                          \
    for (r = 0; r < (R); r++) {                                                  \
        const int64_t row = o + (r < rr ? r : rr - 1);                           \
        const int64_t on = o + (R) + r < j->out ? o + (R) + r : j->out - 1;      \
        wr[r] = (T)j->w + row * j->row_bytes;                                    \
        nx[r] = (T)j->w + on * j->row_bytes;                                     \
        sr[r] = j->scales + row * j->nb;                                         \
    }

static void *pk_acalloc(size_t n, size_t size) {
    const size_t bytes = n * size;
    void *p = pk_amalloc(bytes);
    if (p && bytes > 0) memset(p, 0, bytes);
    return p;
}

/* ------------------------------------------------------------------------------------ runtime knobs */

static int pk_threads = 0;    /* 0 = not chosen yet: PYKIMI_THREADS, else every processor */
static int pk_simd_req = -2;  /* requested level: -2 = not read yet (PYKIMI_SIMD), -1 = best the CPU has */
static int pk_cpu_level = -1; /* best level this CPU + build can run; -1 = not probed yet */

void pk_set_threads(int n) { pk_threads = n > 0 ? n : 0; }

int pk_get_threads(void) {
    if (pk_threads <= 0) {
        const char *e = getenv("PYKIMI_THREADS");
        int n = e ? atoi(e) : 0;
        if (n <= 0) {
#ifdef _OPENMP
            n = omp_get_num_procs();
#else
            n = 1;
#endif
        }
        pk_threads = n;
    }
    return pk_threads;
}

int pk_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Levels: 0 = portable loops, 1 = AVX2+FMA, 2 = AVX-512 F/BW/VL + VNNI (Cascade Lake, Ice Lake and later,
 * Zen 4). Probed once with __builtin_cpu_supports, which also checks that the OS saves the zmm state.
 * An AVX-512 CPU without VNNI (Skylake-X) runs the AVX2 level: the int4 kernel is built around vpdpbusd. */
int pk_simd_max(void) {
    if (pk_cpu_level < 0) {
        int l = 0;
#if PK_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
            l = 1;
#if PK_HAVE_AVX512
            if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
                l = 2;
#endif
        }
#endif
        pk_cpu_level = l;
    }
    return pk_cpu_level;
}

/* Ask for a level (tests and benchmarks run every level on one machine); -1 = the best available.
 * A level the CPU lacks is clamped to pk_simd_max(). */
void pk_set_simd(int level) { pk_simd_req = level < 0 ? -1 : level; }

/* The level the kernels run at: the requested one (PYKIMI_SIMD=scalar|avx2|avx512 until pk_set_simd is
 * called), clamped to what the CPU has. */
int pk_get_simd(void) {
    int m = pk_simd_max();
    if (pk_simd_req == -2) {
        const char *e = getenv("PYKIMI_SIMD");
        pk_simd_req = -1;
        if (e && (!strcmp(e, "scalar") || !strcmp(e, "portable") || !strcmp(e, "0"))) pk_simd_req = 0;
        if (e && (!strcmp(e, "avx2") || !strcmp(e, "1"))) pk_simd_req = 1;
        if (e && (!strcmp(e, "avx512") || !strcmp(e, "2"))) pk_simd_req = 2;
    }
    return pk_simd_req < 0 || pk_simd_req > m ? m : pk_simd_req;
}

/* A run-time switch kept in *req: -2 = not read yet, then on unless the environment variable `env` is "0" or
 * "off" (read once, at the first call); 0 / 1 once read or set. */
static int env_switch(int *req, const char *env) {
    if (*req == -2) {
        const char *e = getenv(env);
        *req = !(e && (!strcmp(e, "0") || !strcmp(e, "off")));
    }
    return *req;
}

static int pk_amx_state = -1; /* -1 = not probed, 0 = unavailable, 1 = granted to this process */
static int pk_amx_req = -2;   /* -2 = not read yet (PYKIMI_AMX), 0 = off, 1 = on when available */

/* Probe once: the CPU has AMX-TILE and AMX-BF16 (CPUID.7.0:EDX bits 24, 22) and Linux grants this process
 * the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18). Called outside parallel
 * regions (job_prepare). */
int pk_amx_available(void) {
    if (pk_amx_state < 0) {
        int ok = 0;
#if PK_HAVE_AMX
        unsigned a, b, c, d;
        if (pk_simd_max() >= 2 && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 22 & 1)) {
            long ret;
            __asm__ volatile("syscall" : "=a"(ret) : "a"(158L), "D"(0x1023L), "S"(18L) : "rcx", "r11", "memory");
            ok = ret == 0;
        }
#endif
        pk_amx_state = ok;
    }
    return pk_amx_state;
}

/* Use AMX for bf16 batches (1, the default where available) or not (0; PYKIMI_AMX=0 before the first call). */
void pk_set_amx(int on) { pk_amx_req = on ? 1 : 0; }

int pk_get_amx(void) { return env_switch(&pk_amx_req, "PYKIMI_AMX") && pk_amx_available(); }

static int pk_bf16dp_state = -1; /* -1 = not probed, 0 = the CPU (or build) lacks AVX512_BF16, 1 = has it */
static int pk_bf16dp_req = -2;   /* -2 = not read yet (PYKIMI_AVX512BF16), 0 = off, 1 = on when available */

/* Probe once: the build has the AVX512_BF16 kernel, the CPU runs the AVX-512 level (which also means the OS
 * saves the zmm state) and has AVX512_BF16: CPUID leaf 7 subleaf 1, EAX bit 5 (subleaf 1 exists when leaf 7
 * subleaf 0 reports EAX >= 1). */
int pk_avx512bf16_available(void) {
    if (pk_bf16dp_state < 0) {
        int ok = 0;
#if PK_HAVE_AVX512BF16
        unsigned a, b, c, d;
        if (pk_simd_max() >= 2 && __get_cpuid_count(7, 0, &a, &b, &c, &d) && a >= 1 &&
            __get_cpuid_count(7, 1, &a, &b, &c, &d))
            ok = (int)(a >> 5 & 1);
#endif
        pk_bf16dp_state = ok;
    }
    return pk_bf16dp_state;
}

/* Use the AVX512_BF16 kernel for bf16-activation batches (1, the default where available) or not (0;
 * PYKIMI_AVX512BF16=0 before the first call): off, those batches run the exact f32 product. */
void pk_set_avx512bf16(int on) { pk_bf16dp_req = on ? 1 : 0; }

int pk_get_avx512bf16(void) {
    return env_switch(&pk_bf16dp_req, "PYKIMI_AVX512BF16") && pk_avx512bf16_available();
}

static int pk_vnni_req = -2; /* -2 = not read yet (PYKIMI_VNNI_BATCH), 0 = off, 1 = on */

/* Use the int8 batch kernel for int8-activation batches (1, the default) or not (0; PYKIMI_VNNI_BATCH=0 before
 * the first call): off, they run the per-row kernels at every n. One switch for both levels' kernels: at the
 * AVX-512 level (whose CPU check, pk_simd_max, includes AVX512_VNNI) the VNNI kernel (vnni_rows), at the AVX2 level
 * its vpmaddubsw twin (avx2b_rows: no AVX-VNNI, which the AVX2 class lacks). */
void pk_set_vnni_batch(int on) { pk_vnni_req = on ? 1 : 0; }

int pk_get_vnni_batch(void) {
    return env_switch(&pk_vnni_req, "PYKIMI_VNNI_BATCH") && PK_X86 && pk_get_simd() >= 1;
}

static int pk_vnni16_req = -2; /* -2 = not read yet (PYKIMI_VNNI16_BATCH), 0 = off, 1 = on */

/* Use the int16 batch kernels for int16-activation batches of Q8_32 weights (the default mode's Q8, A_I16) (1, the
 * default) or not (0; PYKIMI_VNNI16_BATCH=0 before the first call): at the AVX-512 level PK_VW_KERNEL (vpdpwssd)
 * from PK_VNNI16_MIN_Q8 rows, at the AVX2 level its vpmaddwd twin PK_AW_KERNEL from PK_AVX2W_MIN_Q8 rows. Off, they
 * run their previous paths (the int16 row kernel, the exact f32 batch kernel / widened tiles that kernels/linear.py
 * picks). A switch of its own, beside PYKIMI_VNNI_BATCH (the int8 batch kernels), so each can be compared with its
 * old path alone. */
void pk_set_vnni16_batch(int on) { pk_vnni16_req = on ? 1 : 0; }

int pk_get_vnni16_batch(void) {
    return env_switch(&pk_vnni16_req, "PYKIMI_VNNI16_BATCH") && PK_X86 && pk_get_simd() >= 1;
}

/* Rows of x from which the int16 batch kernel of level simd takes a job; -1 = no such kernel (the portable level). */
static int64_t vnni16_min_level(int simd) {
    return simd >= 2 ? PK_VNNI16_MIN_Q8 : simd == 1 ? PK_AVX2W_MIN_Q8 : -1;
}

int64_t pk_vnni16_min(void) { return vnni16_min_level(pk_get_simd()); }

/* Rows of x from which the batch kernel of level simd takes a job of format fmt; -1 = no such kernel. */
static int64_t vnni_min_level(int fmt, int simd) {
    if (simd >= 2) return fmt == F_Q8 ? PK_VNNI_MIN_Q8 : fmt == F_Q4 ? PK_VNNI_MIN_Q4 : -1;
    if (simd == 1) return fmt == F_Q8 ? PK_AVX2B_MIN_Q8 : fmt == F_Q4 ? PK_AVX2B_MIN_Q4 : -1;
    return -1;
}

int64_t pk_vnni_min(int fmt) { return vnni_min_level(fmt, pk_get_simd()); }

/* The AVX2-era knobs, kept for their callers: force_scalar(1) = level 0, force_scalar(0) = best;
 * pk_simd_level() is 1 when any vector level runs (pk_get_simd says which). */
void pk_force_scalar(int on) { pk_set_simd(on ? 0 : -1); }

int pk_simd_level(void) { return pk_get_simd() > 0 ? 1 : 0; }

/* ------------------------------------------------------------------------------- scalar decoding */

/* bf16 is the high half of an f32: widen by a 16-bit shift (exact). memcpy is the C99-clean bit cast. */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Element i of one weight row, in any format (sc = that row's block scales). */
static inline float decode1(int fmt, const void *w, const float *sc, int64_t i) {
    switch (fmt) {
    case F_F32: return ((const float *)w)[i];
    case F_BF16: return bf16_to_f32(((const uint16_t *)w)[i]);
    case F_Q8: return (float)((const int8_t *)w)[i] * sc[i / PK_BLOCK];
    default: {
        uint8_t b = ((const uint8_t *)w)[i >> 1];
        int code = (i & 1) ? (b >> 4) : (b & 15); /* element 2j low nibble, 2j+1 high nibble */
        return (float)(code - 8) * sc[i / PK_BLOCK];
    }
    }
}

/* Portable loop: nt rows of x (stride in) against one weight row; res[t] = x[t] . w. */
static inline void row_scalar(int fmt, int nt, const float *x, int64_t in, const void *w, const float *sc,
                              float *res) {
    float acc[PK_NT] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i;
    int t;
    for (i = 0; i < in; i++) {
        float wv = decode1(fmt, w, sc, i); /* decoded once, used by every row of the tile */
        for (t = 0; t < nt; t++) acc[t] += x[t * in + i] * wv;
    }
    for (t = 0; t < nt; t++) res[t] = acc[t];
}

/* --------------------------------------------------------------------------------- AVX2/FMA path */
#if PK_X86

PK_AVX2_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the largest of the 8 lanes (the halves, then pairs, as hsum8) */
PK_AVX2_INLINE float hmax8(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* 8 bf16 -> 8 f32: zero-extend to 32 bits and shift into the high half. */
PK_AVX2_INLINE __m256 bf16x8(const uint16_t *p) {
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

/* 8 int8 (low 8 bytes of v) -> 8 f32 */
PK_AVX2_INLINE __m256 i8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

/* Decode full block `blk` (32 weights) of one row into d[0..3]; scales are folded in here, once per
 * block, so the inner product per row of x is a plain FMA whatever the format. */
PK_AVX2_INLINE void decode32(int fmt, const void *w, const float *sc, int64_t blk, __m256 d[4]) {
    if (fmt == F_F32) {
        const float *p = (const float *)w + blk * 32;
        d[0] = _mm256_loadu_ps(p);
        d[1] = _mm256_loadu_ps(p + 8);
        d[2] = _mm256_loadu_ps(p + 16);
        d[3] = _mm256_loadu_ps(p + 24);
    } else if (fmt == F_BF16) {
        const uint16_t *p = (const uint16_t *)w + blk * 32;
        d[0] = bf16x8(p);
        d[1] = bf16x8(p + 8);
        d[2] = bf16x8(p + 16);
        d[3] = bf16x8(p + 24);
    } else if (fmt == F_Q8) {
        const int8_t *p = (const int8_t *)w + blk * 32;
        __m256 s = _mm256_set1_ps(sc[blk]);
        d[0] = _mm256_mul_ps(i8x8(_mm_loadl_epi64((const __m128i *)p)), s);
        d[1] = _mm256_mul_ps(i8x8(_mm_loadl_epi64((const __m128i *)(p + 8))), s);
        d[2] = _mm256_mul_ps(i8x8(_mm_loadl_epi64((const __m128i *)(p + 16))), s);
        d[3] = _mm256_mul_ps(i8x8(_mm_loadl_epi64((const __m128i *)(p + 24))), s);
    } else {
        /* 16 bytes = 32 codes. Split nibbles, then interleave lo/hi back into element order. */
        const uint8_t *p = (const uint8_t *)w + blk * 16;
        __m128i b = _mm_loadu_si128((const __m128i *)p);
        __m128i m = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
        __m128i lo = _mm_and_si128(b, m);
        __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        __m128i e0 = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight); /* elements 0..15 as int8 */
        __m128i e1 = _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight); /* elements 16..31 */
        __m256 s = _mm256_set1_ps(sc[blk]);
        d[0] = _mm256_mul_ps(i8x8(e0), s);
        d[1] = _mm256_mul_ps(i8x8(_mm_srli_si128(e0, 8)), s);
        d[2] = _mm256_mul_ps(i8x8(e1), s);
        d[3] = _mm256_mul_ps(i8x8(_mm_srli_si128(e1, 8)), s);
    }
}

/* nt (1 or 2) rows of x against one weight row. fmt and nt are compile-time constants at every call site
 * (see tile_avx2), so the accumulators live in registers. Every row of x gets 4 independent FMA chains
 * (hides the FMA latency in the GEMV), whatever nt: a row's sum must not depend on how many rows share the
 * tile (the serve engine's batched step is bit for bit a single decode's, tests/test_engine.py). 3-4 rows
 * with 4 chains each would not fit the 16 ymm registers, so tile_avx2 runs them as pairs. */
PK_AVX2_INLINE void row_avx2(int fmt, int nt, const float *x, int64_t in, const void *w, const float *sc,
                             float *res) {
    const int nacc = 4;
    __m256 acc[PK_NT][4];
    int64_t nfull = in / 32, b, i;
    int t, k;
    for (t = 0; t < nt; t++)
        for (k = 0; k < 4; k++) acc[t][k] = _mm256_setzero_ps();
    for (b = 0; b < nfull; b++) {
        __m256 d[4];
        decode32(fmt, w, sc, b, d);
        for (t = 0; t < nt; t++) {
            const float *xb = x + t * in + b * 32;
            for (k = 0; k < 4; k++)
                acc[t][k % nacc] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * k), d[k], acc[t][k % nacc]);
        }
    }
    for (t = 0; t < nt; t++) {
        __m256 s = acc[t][0];
        float r;
        for (k = 1; k < nacc; k++) s = _mm256_add_ps(s, acc[t][k]);
        r = hsum8(s);
        for (i = nfull * 32; i < in; i++) r += x[t * in + i] * decode1(fmt, w, sc, i); /* short last block */
        res[t] = r;
    }
}

/* Turn the run-time (fmt, nt) into constants so row_avx2 is specialised 16 ways. */
static PK_AVX2 void tile_avx2(const pk_tile *tl) {
    const float *x = tl->x;
    const int64_t in = tl->in;
/* 3-4 rows as a pair, then the rest (NT is a constant: the branch folds); the weight row is in L1 again */
#define PK_R_PAIRS(FMT, NT)                                                         \
    do {                                                                            \
        if ((NT) <= 2) {                                                            \
            row_avx2(FMT, (NT) <= 2 ? (NT) : 2, x, in, wr, sr, res);                \
        } else {                                                                    \
            row_avx2(FMT, 2, x, in, wr, sr, res);                                   \
            row_avx2(FMT, (NT) > 2 ? (NT) - 2 : 1, x + 2 * in, in, wr, sr, res + 2); \
        }                                                                           \
    } while (0)
#define PK_R_F32(NT) PK_R_PAIRS(F_F32, NT)
#define PK_R_BF16(NT) PK_R_PAIRS(F_BF16, NT)
#define PK_R_Q8(NT) PK_R_PAIRS(F_Q8, NT)
#define PK_R_Q4(NT) PK_R_PAIRS(F_Q4, NT)
    switch (tl->fmt) {
    case F_F32: PK_BY_NT(PK_R_F32) break;
    case F_BF16: PK_BY_NT(PK_R_BF16) break;
    case F_Q8: PK_BY_NT(PK_R_Q8) break;
    default: PK_BY_NT(PK_R_Q4) break;
    }
}
#endif /* PK_X86 */

static void tile_scalar(const pk_tile *tl) {
    /* Same trick as the AVX2 path: constant fmt lets the compiler drop the format switch per element. */
    const float *x = tl->x;
    const int64_t in = tl->in;
    const int nt = tl->nt;
    switch (tl->fmt) {
    case F_F32: PK_TILE_ROWS(row_scalar(F_F32, nt, x, in, wr, sr, res)); break;
    case F_BF16: PK_TILE_ROWS(row_scalar(F_BF16, nt, x, in, wr, sr, res)); break;
    case F_Q8: PK_TILE_ROWS(row_scalar(F_Q8, nt, x, in, wr, sr, res)); break;
    default: PK_TILE_ROWS(row_scalar(F_Q4, nt, x, in, wr, sr, res)); break;
    }
}

/* ---------------------------------------------------- int8 activations x Q8_32 / Q4_32 weights
 *
 * Why: decoding int8/int4 weights to f32 costs ~3 vector ops per 8 weights, which makes int4 compute bound
 * (slower per token than bf16). Quantizing the activation row once per call to int8 blocks of 32 turns each
 * block into one integer dot product (maddubs + madd), scaled once per block by dx * dw.
 * Twin: ref.quantize_act + ref.matmul_act_q8 / matmul_act_q4. */

/* Blocks b0.. of one x row -> int8 blocks of 32 (zero-padded to nb * 32) + one f32 scale per block:
 * d = max|x| / 127, q = round_half_even(x * (1 / d)), clamped to +-127. (The vector levels do the full
 * blocks themselves and call this for the rest: pk_quant_act below.) */
static void quant_act_row(const float *x, int64_t in, int8_t *xq, float *xd, int64_t b0) {
    const int64_t nb = (in + PK_BLOCK - 1) / PK_BLOCK;
    int64_t b, i;
    for (b = b0; b < nb; b++) {
        const int64_t i0 = b * PK_BLOCK, i1 = i0 + PK_BLOCK < in ? i0 + PK_BLOCK : in;
        float amax = 0.0f, d, id;
        for (i = i0; i < i1; i++) {
            float a = fabsf(x[i]);
            if (a > amax) amax = a;
        }
        d = amax / 127.0f;
        id = d > 0.0f ? 1.0f / d : 0.0f;
        xd[b] = d;
        for (i = i0; i < i0 + PK_BLOCK; i++) {
            long v = i < i1 ? lrintf(x[i] * id) : 0; /* lrintf rounds half to even, like np.rint */
            xq[i] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
        }
    }
}


/* Portable loops: exact integer dot per block, then * (dx * dw). Natural element order. */
static void row_act_scalar(int fmt, int nt, const int8_t *xq, const float *xd, int64_t nb, int64_t in,
                           const void *w, const float *ws, float *res) {
    int t;
    for (t = 0; t < nt; t++) {
        const int8_t *xr = xq + t * nb * PK_BLOCK;
        float acc = 0.0f;
        int64_t b, i;
        for (b = 0; b < nb; b++) {
            const int64_t i0 = b * PK_BLOCK, i1 = i0 + PK_BLOCK < in ? i0 + PK_BLOCK : in;
            int32_t s = 0;
            if (fmt == F_Q8) {
                const int8_t *q = (const int8_t *)w;
                for (i = i0; i < i1; i++) s += (int32_t)xr[i] * q[i];
            } else {
                const uint8_t *q = (const uint8_t *)w;
                for (i = i0; i < i1; i++) {
                    int code = (i & 1) ? (q[i >> 1] >> 4) : (q[i >> 1] & 15);
                    s += (int32_t)xr[i] * (code - 8);
                }
            }
            acc += (float)s * (xd[t * nb + b] * ws[b]);
        }
        res[t] = acc;
    }
}

static void tile_act_scalar(const pk_tile *tl) {
    const int8_t *xq = tl->xq;
    const float *xd = tl->xd;
    const int64_t nb = tl->nb, in = tl->in;
    const int fmt = tl->fmt, nt = tl->nt;
    PK_TILE_ROWS(row_act_scalar(fmt, nt, xq, xd, nb, in, wr, sr, res));
}

/* Exact int8 dot of the blocks [b0, nb) of one row in natural order (the few blocks that do not fill a
 * register group, and the short last block), scaled per block. */
static inline float act_tail(int fmt, const int8_t *xr, const float *xdr, int64_t b0, int64_t nb, int64_t in,
                             const void *w, const float *ws) {
    float r = 0.0f;
    int64_t b, i;
    for (b = b0; b < nb; b++) {
        const int64_t i0 = b * PK_BLOCK, i1 = i0 + PK_BLOCK < in ? i0 + PK_BLOCK : in;
        int32_t s = 0;
        for (i = i0; i < i1; i++) {
            int wv;
            if (fmt == F_Q8) {
                wv = ((const int8_t *)w)[i];
            } else {
                uint8_t byte = ((const uint8_t *)w)[i >> 1];
                wv = ((i & 1) ? (byte >> 4) : (byte & 15)) - 8;
            }
            s += (int32_t)xr[i] * wv;
        }
        r += (float)s * (xdr[b] * ws[b]);
    }
    return r;
}

/* Exact int16 x int8 dot of the short last block [i0, in) of one row, scaled by its block scale (the tail
 * the vector levels leave for the Q8 x int16 kernels). */
static inline float q8w_tail(const int16_t *xr, const int8_t *w, int64_t i0, int64_t in, float scale) {
    int32_t s = 0;
    int64_t i;
    for (i = i0; i < in; i++) s += (int32_t)xr[i] * w[i];
    return (float)s * scale;
}

#if PK_X86
/* Q8: maddubs wants unsigned x signed, so use |w| and move w's sign onto x (sign_epi8). Pair sums reach
 * at most 2 * 127 * 127 < 32767: no int16 saturation. Two accumulators (even/odd blocks) per x row. */
PK_AVX2_INLINE __m256 q8a_block(__m256i aw, __m256i wv, const int8_t *xb, float d, __m256 acc) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)xb);
    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d), acc);
}

/* Q4: the codes (0..15) are already unsigned: dot(x, code - 8) = dot(x, code) - 8 * sum(x). The 16 bytes of
 * a block become [low nibbles | high nibbles] = elements [0,2,..,30 | 1,3,..,31]; xqp holds x permuted the
 * same way (built once per call), xs the per-block sums of x. */
PK_AVX2_INLINE __m256i q4_codes(const uint8_t *p) {
    __m128i bb = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(bb, m), hi = _mm_and_si128(_mm_srli_epi16(bb, 4), m);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

PK_AVX2_INLINE __m256 q4a_block(__m256i codes, const int8_t *xb, float d, __m256 acc) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)xb);
    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d), acc);
}

PK_AVX2_INLINE void row_act_avx2(int fmt, int nt, const int8_t *xq, const int8_t *xqp, const float *xd,
                                 const int32_t *xs, int64_t nb, int64_t in, const void *w, const float *ws,
                                 float *res) {
    __m256 a0[PK_NT], a1[PK_NT];
    float corr[PK_NT];
    const int64_t nfull = in / PK_BLOCK, xstride = nb * PK_BLOCK;
    int64_t b;
    int t;
    for (t = 0; t < nt; t++) {
        a0[t] = _mm256_setzero_ps();
        a1[t] = _mm256_setzero_ps();
        corr[t] = 0.0f;
    }
    if (fmt == F_Q8) {
        const int8_t *q = (const int8_t *)w;
        for (b = 0; b + 1 < nfull; b += 2) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + b * 32));
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + b * 32 + 32));
            __m256i aw0 = _mm256_abs_epi8(w0), aw1 = _mm256_abs_epi8(w1);
            for (t = 0; t < nt; t++) {
                const int8_t *xb = xq + t * xstride + b * 32;
                a0[t] = q8a_block(aw0, w0, xb, xd[t * nb + b] * ws[b], a0[t]);
                a1[t] = q8a_block(aw1, w1, xb + 32, xd[t * nb + b + 1] * ws[b + 1], a1[t]);
            }
        }
        if (b < nfull) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + b * 32)), aw0 = _mm256_abs_epi8(w0);
            for (t = 0; t < nt; t++) a0[t] = q8a_block(aw0, w0, xq + t * xstride + b * 32, xd[t * nb + b] * ws[b], a0[t]);
        }
    } else {
        const uint8_t *q = (const uint8_t *)w;
        const __m256i m = _mm256_set1_epi8(0x0F);
        for (b = 0; b + 1 < nfull; b += 2) {
            /* two blocks (32 bytes) at once: split nibbles on the whole register, then regroup the lanes
             * into [block b even | block b odd] and [block b+1 even | block b+1 odd] */
            __m256i bb = _mm256_loadu_si256((const __m256i *)(q + b * 16));
            __m256i lo = _mm256_and_si256(bb, m), hi = _mm256_and_si256(_mm256_srli_epi16(bb, 4), m);
            __m256i c0 = _mm256_permute2x128_si256(lo, hi, 0x20), c1 = _mm256_permute2x128_si256(lo, hi, 0x31);
            for (t = 0; t < nt; t++) {
                const int8_t *xb = xqp + t * xstride + b * 32;
                const float d0 = xd[t * nb + b] * ws[b], d1 = xd[t * nb + b + 1] * ws[b + 1];
                a0[t] = q4a_block(c0, xb, d0, a0[t]);
                a1[t] = q4a_block(c1, xb + 32, d1, a1[t]);
                corr[t] += d0 * (float)xs[t * nb + b] + d1 * (float)xs[t * nb + b + 1];
            }
        }
        if (b < nfull) {
            __m256i c0 = q4_codes(q + b * 16);
            for (t = 0; t < nt; t++) {
                const float d0 = xd[t * nb + b] * ws[b];
                a0[t] = q4a_block(c0, xqp + t * xstride + b * 32, d0, a0[t]);
                corr[t] += d0 * (float)xs[t * nb + b];
            }
        }
    }
    for (t = 0; t < nt; t++) {
        float r = hsum8(_mm256_add_ps(a0[t], a1[t])) - 8.0f * corr[t];
        if (nfull < nb) /* short last block: exact integer dot in natural order */
            r += act_tail(fmt, xq + t * xstride, xd + t * nb, nfull, nb, in, w, ws);
        res[t] = r;
    }
}

static PK_AVX2 void tile_act_avx2(const pk_tile *tl) {
    const int8_t *xq = tl->xq, *xqp = tl->xqp;
    const float *xd = tl->xd;
    const int32_t *xs = tl->xs;
    const int64_t nb = tl->nb, in = tl->in;
#define PK_R_A8(NT) row_act_avx2(F_Q8, NT, xq, xqp, xd, xs, nb, in, wr, sr, res)
#define PK_R_A4(NT) row_act_avx2(F_Q4, NT, xq, xqp, xd, xs, nb, in, wr, sr, res)
    if (tl->fmt == F_Q8) {
        PK_BY_NT(PK_R_A8)
    } else {
        PK_BY_NT(PK_R_A4)
    }
}
#endif /* PK_X86 */

/* ------------------------------------------------------------ int16 activations x Q8_32 weights */

static void quant_act16_row(const float *x, int64_t in, int16_t *xq, float *xd, int64_t b0) {
    const int64_t nb = (in + PK_BLOCK - 1) / PK_BLOCK;
    int64_t b, i;
    for (b = b0; b < nb; b++) {
        const int64_t i0 = b * PK_BLOCK, i1 = i0 + PK_BLOCK < in ? i0 + PK_BLOCK : in;
        float amax = 0.0f, d, id;
        for (i = i0; i < i1; i++) {
            float a = fabsf(x[i]);
            if (a > amax) amax = a;
        }
        d = amax / 32767.0f;
        id = d > 0.0f ? 1.0f / d : 0.0f;
        xd[b] = d;
        for (i = i0; i < i0 + PK_BLOCK; i++) {
            long v = i < i1 ? lrintf(x[i] * id) : 0;
            xq[i] = (int16_t)(v > 32767 ? 32767 : (v < -32767 ? -32767 : v));
        }
    }
}


/* Portable: exact int32 block sums (32 * 32767 * 127 < 2^31), natural order. */
static void row_q8w_scalar(int nt, const int16_t *xq, const float *xd, int64_t nb, int64_t in, const int8_t *w,
                           const float *ws, float *res) {
    int t;
    for (t = 0; t < nt; t++) {
        const int16_t *xr = xq + t * nb * PK_BLOCK;
        float acc = 0.0f;
        int64_t b, i;
        for (b = 0; b < nb; b++) {
            const int64_t i0 = b * PK_BLOCK, i1 = i0 + PK_BLOCK < in ? i0 + PK_BLOCK : in;
            int32_t s = 0;
            for (i = i0; i < i1; i++) s += (int32_t)xr[i] * w[i];
            acc += (float)s * (xd[t * nb + b] * ws[b]);
        }
        res[t] = acc;
    }
}

static void tile_q8w_scalar(const pk_tile *tl) {
    const int16_t *xq = tl->xq16;
    const float *xd = tl->xd;
    const int64_t nb = tl->nb, in = tl->in;
    const int nt = tl->nt;
    PK_TILE_ROWS(row_q8w_scalar(nt, xq, xd, nb, in, (const int8_t *)wr, sr, res));
}

#if PK_X86
/* 32 weights sign-extended to int16 once (w0, w1), then per x row two pmaddwd. Each int32 lane sums 4
 * products, |.| <= 4 * 32767 * 127 < 2^24, so the conversion to float is exact. */
PK_AVX2_INLINE void row_q8w_avx2(int nt, const int16_t *xq, const float *xd, int64_t nb, int64_t in,
                                 const int8_t *w, const float *ws, float *res) {
    __m256 a0[PK_NT], a1[PK_NT];
    const int64_t nfull = in / PK_BLOCK, xstride = nb * PK_BLOCK;
    int64_t b;
    int t;
    for (t = 0; t < nt; t++) {
        a0[t] = _mm256_setzero_ps();
        a1[t] = _mm256_setzero_ps();
    }
    for (b = 0; b < nfull; b++) {
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + b * 32)));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + b * 32 + 16)));
        for (t = 0; t < nt; t++) {
            const int16_t *xb = xq + t * xstride + b * 32;
            __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xb));
            __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xb + 16)));
            __m256 d = _mm256_set1_ps(xd[t * nb + b] * ws[b]);
            /* two chains so the FMA latency overlaps between blocks */
            if (b & 1) {
                a1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), d, a1[t]);
                a1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), d, a1[t]);
            } else {
                a0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), d, a0[t]);
                a0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), d, a0[t]);
            }
        }
    }
    for (t = 0; t < nt; t++) {
        float r = hsum8(_mm256_add_ps(a0[t], a1[t]));
        if (nfull < nb) r += q8w_tail(xq + t * xstride, w, nfull * PK_BLOCK, in, xd[t * nb + nfull] * ws[nfull]);
        res[t] = r;
    }
}

static PK_AVX2 void tile_q8w_avx2(const pk_tile *tl) {
    const int16_t *xq = tl->xq16;
    const float *xd = tl->xd;
    const int64_t nb = tl->nb, in = tl->in;
#define PK_R_W(NT) row_q8w_avx2(NT, xq, xd, nb, in, (const int8_t *)wr, sr, res)
    PK_BY_NT(PK_R_W)
}
#endif

/* ----------------------------------------------------------------------------------- AVX-512 path
 *
 * Same kernels as the AVX2 path with 16 lanes per register, and the int4 block dot on VNNI:
 *  - float activations (f32 / bf16 / Q8 / Q4 weights decoded in registers): bf16 is widened to f32 with
 *    a zero-extend + shift, and products accumulate in f32 exactly as in the AVX2 and portable loops.
 *    vdpbf16ps would round x to bf16 and miss the 2e-5 golden tolerance, so it is not used.
 *  - Q8 x int16: sign-extend 32 weights to int16 once (one zmm), one vpmaddwd per row of x.
 *  - Q8 x int8 ("all" mode): vpdpbusd wants unsigned x signed: |w| times x with w's sign moved onto x
 *    (a masked negate; AVX-512 has no vpsignb).
 *  - Q4 x int8: the codes 0..15 are unsigned bytes already, so vpdpbusd(codes, x) gives dot(code, x) and
 *    the "- 8" is folded into the accumulator's start value (-8 * sum of the block's x, built once per call).
 *    64 bytes of codes = 4 blocks per register: the low nibbles of block k (its even elements) fill
 *    128-bit lane k, so x is stored per group of 4 blocks as [even elements of blocks 0..3 | odd elements
 *    of blocks 0..3] (job_prepare) and no shuffle of the weights is needed.
 * Every integer block dot is exact, so the three levels agree on it bit for bit; only the float
 * summation order differs.
 *
 * Memory: decode streams the weights once; two independent accumulators per row of x (blocks alternate)
 * keep several loads in flight, and a software prefetch PK_PF bytes ahead runs in front of the hardware
 * prefetcher, which stops at every 4 KiB page boundary (a weight row of 2048 bf16 is exactly one page). */
#if PK_HAVE_AVX512

#define PK_PF 1024    /* prefetch distance in bytes of weights: measured 15-60 % faster than none, flat to 4 KiB */
#define PK_PF_L2 4096 /* ... and a second one, a page further, into L2 only */

/* Why two: a core has ~16 line-fill buffers for L1 misses but several times as many L2 miss slots, and two
 * threads must keep enough lines in flight to cover the DRAM latency. With weights that come from DRAM (the
 * 27-layer model, ~1 GB a token; the 4-layer one largely sits in this host's L3) the L2 prefetch a page ahead
 * made the 27-layer int4 decode 10 % faster (89 -> 80 ms a token); 2, 3, 6 and 12 KiB measured alike. */
PK_AVX512_INLINE void prefetch(const void *p) {
    _mm_prefetch((const char *)p, _MM_HINT_T0);
    _mm_prefetch((const char *)p + PK_PF_L2, _MM_HINT_T1);
}

/* 16 bf16 -> 16 f32: zero-extend to 32 bits and shift into the high half (exact). */
PK_AVX512_INLINE __m512 bf16x16(const uint16_t *p) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

/* 16 int8 -> 16 f32 */
PK_AVX512_INLINE __m512 i8x16(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

/* The 16 x 16 block r (r[i] = row i) transposed in place (r[c] = column c): 32-bit interleave of row pairs, 64-bit
 * interleave of those within 128-bit lanes (u[4 q + j] = rows 4 q .. 4 q + 3 of the columns 4 L + j, lane L), then
 * the 128-bit lanes gathered per column (vshuff32x4 0x88: lanes 0, 2 of a and of b; 0xDD: lanes 1, 3). */
PK_AVX512_INLINE void tr16x16(__m512 r[16]) {
    __m512 t[16], u[16];
    int i, q, jj;
    for (i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);     /* per lane: a0 b0 a1 b1 */
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]); /* a2 b2 a3 b3 */
    }
    for (q = 0; q < 4; q++) {
        u[4 * q] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);         /* a0 b0 c0 d0 */
        u[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);     /* a1 b1 c1 d1 */
        u[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44); /* a2 b2 c2 d2 */
        u[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE); /* a3 b3 c3 d3 */
    }
    for (jj = 0; jj < 4; jj++) {
        const __m512 v = _mm512_shuffle_f32x4(u[jj], u[4 + jj], 0x88), w = _mm512_shuffle_f32x4(u[jj], u[4 + jj], 0xDD);
        const __m512 v2 = _mm512_shuffle_f32x4(u[8 + jj], u[12 + jj], 0x88);
        const __m512 w2 = _mm512_shuffle_f32x4(u[8 + jj], u[12 + jj], 0xDD);
        r[jj] = _mm512_shuffle_f32x4(v, v2, 0x88);
        r[8 + jj] = _mm512_shuffle_f32x4(v, v2, 0xDD);
        r[4 + jj] = _mm512_shuffle_f32x4(w, w2, 0x88);
        r[12 + jj] = _mm512_shuffle_f32x4(w, w2, 0xDD);
    }
}

/* dst[c * gw + t] = src[t * stride + c] (32-bit elements) for the rows t < gw (a multiple of 16; the rows from nrows
 * on as zeros) and the columns c < ncols: 16 x 16 blocks transposed in registers, each column's 16 rows stored as
 * one line (a batch kernel's packed x: the columns are k, or k-pairs / k-quads of x's codes, the rows its rows).
 * Why not element by element: the rows of x are a power of two apart (2048 int16 = 4 KiB), so a loop down one
 * column touched 64 lines of one L1 set; the int16 packing of 512 x 2048 took ~0.5 ms on 2 threads, a tenth of the
 * product. The rows are prefetched PK_BD_XPF elements ahead (x may come from DRAM). */
static PK_AVX512 void tr_cols(const uint32_t *src, int64_t stride, int64_t nrows, int64_t gw, int64_t ncols,
                              uint32_t *dst) {
    int64_t tb, c0;
    int i;
    for (tb = 0; tb < gw; tb += 16)
        for (c0 = 0; c0 < ncols; c0 += 16) {
            const int64_t left = ncols - c0, cols = left < 16 ? left : 16;
            const __mmask16 m = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u);
            __m512 r[16];
            for (i = 0; i < 16; i++) {
                const uint32_t *sr = src + (tb + i) * stride + c0;
                if (tb + i < nrows && left > 2 * PK_BD_XPF) _mm_prefetch((const char *)(sr + PK_BD_XPF), _MM_HINT_T0);
                r[i] = tb + i < nrows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, sr)) : _mm512_setzero_ps();
            }
            tr16x16(r);
            for (i = 0; i < cols; i++) _mm512_storeu_ps((float *)dst + (c0 + i) * gw + tb, r[i]);
        }
}

/* Full block `blk` (32 weights) of one row into d[0..1], scale folded in (see decode32). */
PK_AVX512_INLINE void decode32_512(int fmt, const void *w, const float *sc, int64_t blk, __m512 d[2]) {
    if (fmt == F_F32) {
        const float *p = (const float *)w + blk * 32;
        prefetch(p + PK_PF / 4);
        prefetch(p + PK_PF / 4 + 16);
        d[0] = _mm512_loadu_ps(p);
        d[1] = _mm512_loadu_ps(p + 16);
    } else if (fmt == F_BF16) {
        const uint16_t *p = (const uint16_t *)w + blk * 32;
        prefetch(p + PK_PF / 2);
        d[0] = bf16x16(p);
        d[1] = bf16x16(p + 16);
    } else if (fmt == F_Q8) {
        const int8_t *p = (const int8_t *)w + blk * 32;
        __m512 s = _mm512_set1_ps(sc[blk]);
        if (!(blk & 1)) prefetch(p + PK_PF);
        d[0] = _mm512_mul_ps(i8x16(_mm_loadu_si128((const __m128i *)p)), s);
        d[1] = _mm512_mul_ps(i8x16(_mm_loadu_si128((const __m128i *)(p + 16))), s);
    } else {
        const uint8_t *p = (const uint8_t *)w + blk * 16;
        __m128i b = _mm_loadu_si128((const __m128i *)p);
        __m128i m = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
        __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        __m512 s = _mm512_set1_ps(sc[blk]);
        if (!(blk & 3)) prefetch(p + PK_PF);
        d[0] = _mm512_mul_ps(i8x16(_mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight)), s); /* elements 0..15 */
        d[1] = _mm512_mul_ps(i8x16(_mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight)), s); /* 16..31 */
    }
}

/* nt rows of x against one weight row, float activations; fmt and nt constant at every call site.
 * Blocks go in pairs into two sets of accumulators (4 FMA chains per row of x). */
PK_AVX512_INLINE void row_avx512(int fmt, int nt, const float *x, int64_t in, const void *w, const float *sc,
                                 float *res) {
    __m512 acc[PK_NT][4];
    const int64_t nfull = in / 32;
    int64_t b, i;
    int t;
    for (t = 0; t < nt; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = _mm512_setzero_ps();
    for (b = 0; b + 1 < nfull; b += 2) {
        __m512 d0[2], d1[2];
        decode32_512(fmt, w, sc, b, d0);
        decode32_512(fmt, w, sc, b + 1, d1);
        for (t = 0; t < nt; t++) {
            const float *xb = x + t * in + b * 32;
            acc[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), d0[0], acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), d0[1], acc[t][1]);
            acc[t][2] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 32), d1[0], acc[t][2]);
            acc[t][3] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 48), d1[1], acc[t][3]);
        }
    }
    if (b < nfull) {
        __m512 d0[2];
        decode32_512(fmt, w, sc, b, d0);
        for (t = 0; t < nt; t++) {
            const float *xb = x + t * in + b * 32;
            acc[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), d0[0], acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), d0[1], acc[t][1]);
        }
    }
    for (t = 0; t < nt; t++) {
        float r = _mm512_reduce_add_ps(
            _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
        for (i = nfull * 32; i < in; i++) r += x[t * in + i] * decode1(fmt, w, sc, i); /* short last block */
        res[t] = r;
    }
}

static PK_AVX512 void tile_avx512(const pk_tile *tl) {
    const float *x = tl->x;
    const int64_t in = tl->in;
#define PK_R5_F32(NT) row_avx512(F_F32, NT, x, in, wr, sr, res)
#define PK_R5_BF16(NT) row_avx512(F_BF16, NT, x, in, wr, sr, res)
#define PK_R5_Q8(NT) row_avx512(F_Q8, NT, x, in, wr, sr, res)
#define PK_R5_Q4(NT) row_avx512(F_Q4, NT, x, in, wr, sr, res)
    switch (tl->fmt) {
    case F_F32: PK_BY_NT(PK_R5_F32) break;
    case F_BF16: PK_BY_NT(PK_R5_BF16) break;
    case F_Q8: PK_BY_NT(PK_R5_Q8) break;
    default: PK_BY_NT(PK_R5_Q4) break;
    }
}

/* Q4 x int8, 4 blocks (64 bytes of codes) per step. xqp: x in the group layout described above. vpdpbusd takes
 * the codes 0..15 as they are stored, so the 4 lanes of block k sum to the exact dot(x, code); the 16 lanes
 * are scaled by [d_k x 4] (d = dw * dx: the weight scales spread once per group, x's already spread in xds,
 * one multiply per row of x). The codes' offset of 8 is applied once per weight row instead of in every
 * block: sum_k dw_k * xcor_k with xcor_k = -8 * dx_k * sum(x block k), a 16-wide dot over the row's blocks.
 * Why: at 2-4 rows of x (the serve engine's row-wise batches, prefill experts with few tokens) the kernel is
 * bound by its loads and multiplies per row and group; the offset lanes (a load) and the per-row spread of
 * dw * dx (a multiply and a permute) were a third of them. [4096, 2048], 2 threads, AMD Zen 5, us a call at
 * 1 / 2 / 3 / 4 rows: 67.5 / 110 / 150 / 192 before, 63-65 / 96-98 / 116-120 / 140-144 after (two
 * alternations; the same per-row arithmetic at every nt, so rows stay independent of each other). */
PK_AVX512_INLINE void row_q4a_avx512(int nt, const int8_t *xq, const int8_t *xqp, const float *xd,
                                     const float *xds, const float *xcor, int64_t nb, int64_t in,
                                     const uint8_t *q, const float *ws, float *res) {
    __m512 a0[PK_NT], a1[PK_NT];
    const int64_t ng = in / 128, xstride = nb * PK_BLOCK, ostride = nb * 4;
    const __m512i m = _mm512_set1_epi8(0x0F);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    int64_t g, k;
    int t;
    for (t = 0; t < nt; t++) a0[t] = a1[t] = _mm512_setzero_ps();
    /* one group: exact block dots, then lanes * [d_k x 4] into ACC */
#define PK_Q4_GROUP(G, ACC)                                                                                   \
    do {                                                                                                      \
        __m512i bb = _mm512_loadu_si512((const void *)(q + (G) * 64));                                        \
        __m512i lo = _mm512_and_si512(bb, m), hi = _mm512_and_si512(_mm512_srli_epi16(bb, 4), m);             \
        const __m512 w16 = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(ws + (G) * 4)));  \
        prefetch(q + (G) * 64 + PK_PF);                                                                       \
        for (t = 0; t < nt; t++) {                                                                            \
            const int8_t *xb = xqp + t * xstride + (G) * 128;                                                 \
            __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xb)); \
            p = _mm512_dpbusd_epi32(p, hi, _mm512_loadu_si512((const void *)(xb + 64)));                      \
            ACC[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),                                                   \
                                     _mm512_mul_ps(w16, _mm512_loadu_ps(xds + t * ostride + (G) * 16)), ACC[t]); \
        }                                                                                                     \
    } while (0)
    for (g = 0; g + 1 < ng; g += 2) { /* two groups per step: two independent dot/FMA chains */
        PK_Q4_GROUP(g, a0);
        PK_Q4_GROUP(g + 1, a1);
    }
    if (g < ng) PK_Q4_GROUP(g, a0);
#undef PK_Q4_GROUP
    for (t = 0; t < nt; t++) {
        const float *cr = xcor + t * nb;
        __m512 c = _mm512_add_ps(a0[t], a1[t]);
        float r;
        for (k = 0; k + 16 <= ng * 4; k += 16) c = _mm512_fmadd_ps(_mm512_loadu_ps(ws + k), _mm512_loadu_ps(cr + k), c);
        r = _mm512_reduce_add_ps(c);
        for (; k < ng * 4; k++) r += ws[k] * cr[k];
        res[t] = r + act_tail(F_Q4, xq + t * xstride, xd + t * nb, ng * 4, nb, in, q, ws);
    }
}

/* Q8 x int8, 2 blocks (64 weights) per step: vpdpbusd(|w|, x * sign(w)); lanes 0-7 block b, 8-15 b+1. */
PK_AVX512_INLINE void row_q8a_avx512(int nt, const int8_t *xq, const float *xd, int64_t nb, int64_t in,
                                     const int8_t *q, const float *ws, float *res) {
    __m512 a0[PK_NT], a1[PK_NT];
    const int64_t np = in / 64, xstride = nb * PK_BLOCK;
    const __m512i zero = _mm512_setzero_si512();
    int64_t g;
    int t;
    for (t = 0; t < nt; t++) a0[t] = a1[t] = _mm512_setzero_ps();
#define PK_Q8_PAIR(G, ACC)                                                                                    \
    do {                                                                                                      \
        __m512i wv = _mm512_loadu_si512((const void *)(q + (G) * 64));                                        \
        __m512i aw = _mm512_abs_epi8(wv);                                                                     \
        __mmask64 neg = _mm512_movepi8_mask(wv);                                                              \
        const __m512 s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(ws[2 * (G)]), _mm512_set1_ps(ws[2 * (G) + 1])); \
        prefetch(q + (G) * 64 + PK_PF);                                                                       \
        for (t = 0; t < nt; t++) {                                                                            \
            __m512i xv = _mm512_loadu_si512((const void *)(xq + t * xstride + (G) * 64));                     \
            __m512i p = _mm512_dpbusd_epi32(zero, aw, _mm512_mask_sub_epi8(xv, neg, zero, xv));               \
            const float *xdr = xd + t * nb + 2 * (G);                                                         \
            __m512 d = _mm512_mul_ps(s, _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xdr[0]), _mm512_set1_ps(xdr[1]))); \
            ACC[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, ACC[t]);                                       \
        }                                                                                                     \
    } while (0)
    for (g = 0; g + 1 < np; g += 2) {
        PK_Q8_PAIR(g, a0);
        PK_Q8_PAIR(g + 1, a1);
    }
    if (g < np) PK_Q8_PAIR(g, a0);
#undef PK_Q8_PAIR
    for (t = 0; t < nt; t++)
        res[t] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t])) +
                 act_tail(F_Q8, xq + t * xstride, xd + t * nb, np * 2, nb, in, q, ws);
}

static PK_AVX512 void tile_act_avx512(const pk_tile *tl) {
    const int8_t *xq = tl->xq, *xqp = tl->xqp;
    const float *xd = tl->xd;
    const int64_t nb = tl->nb, in = tl->in;
#define PK_R5_A4(NT) row_q4a_avx512(NT, xq, xqp, xd, tl->xds, tl->xcor, nb, in, (const uint8_t *)wr, sr, res)
#define PK_R5_A8(NT) row_q8a_avx512(NT, xq, xd, nb, in, (const int8_t *)wr, sr, res)
    if (tl->fmt == F_Q4) {
        PK_BY_NT(PK_R5_A4)
    } else {
        PK_BY_NT(PK_R5_A8)
    }
}

/* Q8 x int16: one block = 32 weights sign-extended to int16 = one zmm, one vpmaddwd per row of x; each
 * int32 lane sums 2 products (|.| < 2^24: exact in f32). Blocks alternate between two accumulators. */
PK_AVX512_INLINE void row_q8w_avx512(int nt, const int16_t *xq, const float *xd, int64_t nb, int64_t in,
                                     const int8_t *w, const float *ws, float *res) {
    __m512 a0[PK_NT], a1[PK_NT];
    const int64_t nfull = in / PK_BLOCK, xstride = nb * PK_BLOCK;
    int64_t b;
    int t;
    for (t = 0; t < nt; t++) a0[t] = a1[t] = _mm512_setzero_ps();
    for (b = 0; b + 1 < nfull; b += 2) {
        __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + b * 32)));
        __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + b * 32 + 32)));
        const __m512 s0 = _mm512_set1_ps(ws[b]), s1 = _mm512_set1_ps(ws[b + 1]);
        prefetch(w + b * 32 + PK_PF);
        for (t = 0; t < nt; t++) {
            const int16_t *xb = xq + t * xstride + b * 32;
            __m512i p0 = _mm512_madd_epi16(w0, _mm512_loadu_si512((const void *)xb));
            __m512i p1 = _mm512_madd_epi16(w1, _mm512_loadu_si512((const void *)(xb + 32)));
            a0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_mul_ps(s0, _mm512_set1_ps(xd[t * nb + b])), a0[t]);
            a1[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_mul_ps(s1, _mm512_set1_ps(xd[t * nb + b + 1])),
                                    a1[t]);
        }
    }
    if (b < nfull) {
        __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + b * 32)));
        for (t = 0; t < nt; t++) {
            __m512i p0 = _mm512_madd_epi16(w0, _mm512_loadu_si512((const void *)(xq + t * xstride + b * 32)));
            a0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_set1_ps(xd[t * nb + b] * ws[b]), a0[t]);
        }
    }
    for (t = 0; t < nt; t++) {
        float r = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
        if (nfull < nb) r += q8w_tail(xq + t * xstride, w, nfull * PK_BLOCK, in, xd[t * nb + nfull] * ws[nfull]);
        res[t] = r;
    }
}

static PK_AVX512 void tile_q8w_avx512(const pk_tile *tl) {
    const int16_t *xq = tl->xq16;
    const float *xd = tl->xd;
    const int64_t nb = tl->nb, in = tl->in;
#define PK_R5_W(NT) row_q8w_avx512(NT, xq, xd, nb, in, (const int8_t *)wr, sr, res)
    PK_BY_NT(PK_R5_W)
}
#endif /* PK_HAVE_AVX512 */

/* ------------------------------------------------------------------ activation quantization, vectorized
 *
 * Why: lrintf is a libm call per element (gcc does not inline it without -fno-math-errno), ~3 us per 1000
 * activations -- as long as the GEMV of a small matrix in cache. The vector levels quantize full blocks
 * with cvtps2dq, which rounds half to even under the default MXCSR mode exactly like lrintf and np.rint;
 * d and 1/d are the same scalar f32 operations as the portable loop, so the results are bit-identical
 * (tests compare all levels with ref.quantize_act). */
#if PK_X86
/* One full block: q[0..3] = clamp(rint(x * (1/d))), returns d = max|x| / qmax. */
PK_AVX2_INLINE float quant32_avx2(const float *x, float qmax, __m256i q[4]) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 v[4], a;
    float amax, d, id;
    int k;
    for (k = 0; k < 4; k++) v[k] = _mm256_loadu_ps(x + 8 * k);
    a = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                      _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)));
    amax = hmax8(a);
    d = amax / qmax;
    id = d > 0.0f ? 1.0f / d : 0.0f;
    for (k = 0; k < 4; k++) {
        __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(id)));
        q[k] = _mm256_max_epi32(_mm256_min_epi32(r, _mm256_set1_epi32((int)qmax)), _mm256_set1_epi32(-(int)qmax));
    }
    return d;
}

static PK_AVX2 int64_t quant_full_avx2(const float *x, int64_t in, int8_t *xq, int16_t *xq16, float *xd) {
    const int64_t nfull = in / PK_BLOCK;
    int64_t b;
    for (b = 0; b < nfull; b++) {
        __m256i q[4];
        if (xq) {
            xd[b] = quant32_avx2(x + b * 32, 127.0f, q);
            /* int32 -> int16 -> int8 with saturating packs (values are within +-127); packs work per
             * 128-bit lane, so restore the element order with one 64-bit permute */
            __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
            __m256i p8 = _mm256_packs_epi16(p16a, p16b);
            p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(xq + b * 32), p8);
        } else {
            xd[b] = quant32_avx2(x + b * 32, 32767.0f, q);
            __m256i p0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
            __m256i p1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
            _mm256_storeu_si256((__m256i *)(xq16 + b * 32), p0);
            _mm256_storeu_si256((__m256i *)(xq16 + b * 32 + 16), p1);
        }
    }
    return nfull;
}
#endif

#if PK_HAVE_AVX512
static PK_AVX512 int64_t quant_full_avx512(const float *x, int64_t in, int8_t *xq, int16_t *xq16, float *xd) {
    const int64_t nfull = in / PK_BLOCK;
    const float qmax = xq ? 127.0f : 32767.0f;
    const __m512i hi = _mm512_set1_epi32((int)qmax), lo = _mm512_set1_epi32(-(int)qmax);
    int64_t b;
    for (b = 0; b < nfull; b++) {
        __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float d = amax / qmax, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m512 vid = _mm512_set1_ps(id);
        __m512i q0 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, vid)), hi), lo);
        __m512i q1 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, vid)), hi), lo);
        xd[b] = d;
        if (xq) {
            _mm_storeu_si128((__m128i *)(xq + b * 32), _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(xq + b * 32 + 16), _mm512_cvtepi32_epi8(q1));
        } else {
            _mm256_storeu_si256((__m256i *)(xq16 + b * 32), _mm512_cvtepi32_epi16(q0));
            _mm256_storeu_si256((__m256i *)(xq16 + b * 32 + 16), _mm512_cvtepi32_epi16(q1));
        }
    }
    return nfull;
}
#endif

/* Full blocks of one row at SIMD level `simd` (into xq, or xq16 when xq is NULL); returns how many. */
static int64_t quant_full(int simd, const float *x, int64_t in, int8_t *xq, int16_t *xq16, float *xd) {
    (void)x, (void)in, (void)xq, (void)xq16, (void)xd;
#if PK_HAVE_AVX512
    if (simd >= 2) return quant_full_avx512(x, in, xq, xq16, xd);
#endif
#if PK_X86
    if (simd == 1) return quant_full_avx2(x, in, xq, xq16, xd);
#endif
    (void)simd;
    return 0;
}

static void quant_act_level(int simd, const float *x, int64_t n, int64_t in, int8_t *xq, float *xd) {
    const int64_t nb = (in + PK_BLOCK - 1) / PK_BLOCK;
    int64_t t;
    for (t = 0; t < n; t++) {
        int8_t *q = xq + t * nb * PK_BLOCK;
        int64_t b0 = quant_full(simd, x + t * in, in, q, NULL, xd + t * nb);
        quant_act_row(x + t * in, in, q, xd + t * nb, b0);
    }
}

static void quant_act16_level(int simd, const float *x, int64_t n, int64_t in, int16_t *xq, float *xd) {
    const int64_t nb = (in + PK_BLOCK - 1) / PK_BLOCK;
    int64_t t;
    for (t = 0; t < n; t++) {
        int16_t *q = xq + t * nb * PK_BLOCK;
        int64_t b0 = quant_full(simd, x + t * in, in, NULL, q, xd + t * nb);
        quant_act16_row(x + t * in, in, q, xd + t * nb, b0);
    }
}

void pk_quant_act(const float *x, int64_t n, int64_t in, int8_t *xq, float *xd) {
    quant_act_level(pk_get_simd(), x, n, in, xq, xd);
}

void pk_quant_act16(const float *x, int64_t n, int64_t in, int16_t *xq, float *xd) {
    quant_act16_level(pk_get_simd(), x, n, in, xq, xd);
}

/* ------------------------------------------------------------------------------------ the drivers
 *
 * A "job" is one product y = x @ W^T. Every entry point builds jobs, prepares the activations once per
 * job (int8 / int16 quantization when asked), then runs the output rows of ALL its jobs in one OpenMP
 * region: pk_matmul_many lets the MoE hand over e.g. all selected experts' gate and up projections at once,
 * so a decode step pays one thread fork/join instead of one per matrix. Rows are split between threads by
 * cost (n * in per row), so matrices of different widths balance. */

/* A_BF16: bf16 weights x activations rounded to bf16 (batches of >= PK_BF16A_MIN rows, AVX512_BF16; any other
 * job asking for it runs A_F32, see job_prepare). */
enum { A_F32 = 0, A_I8 = 1, A_I16 = 2, A_BF16 = 3 };
/* A_ROWS, OR'd into a job's act: the job runs the per-row kernels (tile_*) at any n, never a batch kernel (the
 * VNNI and AVX512_BF16 ones, AMX tiles, the transposed-x bf16 / Q8 kernel), whose result for a row depends on
 * which rows share its call (summation order, bf16 rounding of x): each row then gets bit for bit what it gets
 * alone, with the activation treatment of one row (an A_BF16 job runs A_F32, as every job below PK_BF16A_MIN
 * rows does). The serve engine's batched decode step asks for it (kernels.matmul_many(rowwise=True),
 * pk_swiglu_batch). */
#define A_ROWS 16

typedef struct {
    int fmt, act;
    const float *x;
    int64_t n, in, out, nb, row_bytes;
    const void *w;
    const float *scales;
    float *y;
    int8_t *xq, *xqp; /* int8 activations (natural order / Q4 nibble order) */
    int16_t *xq16;    /* int16 activations */
    float *xd;        /* activation scale per block */
    int32_t *xs;      /* per-block sums of int8 activations (Q4 offset, AVX2 level) */
    float *xds;       /* per block [xd, xd, xd, xd] (Q4, AVX-512 level; see row_q4a_avx512) */
    float *xcor;      /* per block -8 * xd * sum(x block) (Q4, AVX-512 level) */
    uint16_t *xb;     /* x as AMX B tiles, bf16 high and low parts (bf16 batches, AMX; see amx_prepare) */
    uint32_t *xp;     /* x packed per group of 64 rows for a batch kernel (xpack_takes): bf16 pairs (A_BF16,
                         bf16a_pack_group), int8 / int16 lanes, f32 columns (A_F32, tn_pack_group) */
    int xp_shared;    /* ... xp is a slice of run_jobs' buffer (not freed with the job) */
    int act_asked;    /* act as job_set got it (job_prepare may change act) */
    void *abuf;       /* the one allocation xq .. xcor are slices of */
    int lent;         /* xq .. xcor are another job's (run_jobs: the same x, quantized once; not freed here) */
    int rows;         /* A_ROWS was asked: the per-row kernels only */
    int64_t mt;       /* ... tiles of 16 rows of x */
    int64_t nbatch;   /* the AVX2 batch kernels and the int16 ones (xp): rows [0, nbatch) of x run them, the rest
                         the row kernels */
} pk_job;

static void job_free(pk_job *j) {
    free(j->xb);
    j->xb = NULL;
    if (!j->xp_shared) free(j->xp);
    j->xp = NULL;
    if (!j->lent) free(j->abuf); /* xq .. xcor: slices of it (job_prepare) */
    j->abuf = NULL;
    j->lent = 0;
    j->xq = j->xqp = NULL;
    j->xq16 = NULL;
    j->xd = NULL;
    j->xs = NULL;
    j->xds = j->xcor = NULL;
}

/* Bytes of one stored weight row of `in` elements. */
static int64_t row_bytes_of(int fmt, int64_t in) {
    return fmt == F_F32 ? in * 4 : fmt == F_BF16 ? in * 2 : fmt == F_Q8 ? in : (in + 1) / 2;
}

/* A job y [n, out] = x [n, in] @ W^T, W in format fmt (scales NULL for f32 / bf16); nothing prepared yet. */
static void job_set(pk_job *j, int fmt, int act, const float *x, int64_t n, int64_t in, const void *w,
                    const float *scales, int64_t out, float *y) {
    memset(j, 0, sizeof *j);
    j->fmt = fmt;
    j->act = j->act_asked = act & ~A_ROWS;
    j->rows = (act & A_ROWS) != 0;
    j->x = x;
    j->n = n;
    j->in = in;
    j->out = out;
    j->w = w;
    j->scales = scales;
    j->y = y;
    j->row_bytes = row_bytes_of(fmt, in);
}

#if PK_HAVE_AMX
/* bf16 (and Q8_32) weights x a batch of rows of x on the AMX tile unit (prefill). Why: the FMA kernels do one multiply
 * per lane per instruction and reach ~45 % of the FMA peak at a few rows of x; a tile product does 16 x 16 x
 * 32 of them, so with the few tokens an expert gets in a prefill the weights' memory stream is the limit
 * again instead of the multiplies.
 * C[o][t] = sum_k W[o][k] x[t][k]: A = 16 weight rows x 32 k, read straight from the stored rows (the
 * checkpoint's own layout; Q8 codes widened to bf16 per tile, see q8_tile_bf16); B = x in the tile unit's
 * pair layout, made once per job. The tiles multiply bf16
 * pairs and accumulate in f32, so x is split into three bf16 parts, hi = bf16(x), mid = bf16(x - hi), lo =
 * bf16(x - hi - mid), and all three are multiplied: x - hi - mid - lo is below 2^-26 |x|, an f32 product as
 * far as the golden 2e-5 can tell (one part alone would be ~2^-9; two parts, ~2^-18, moved a router
 * margin of the golden case past its tolerance). Twin: ref.matmul (the f32 product of the decoded
 * weights). */
/* Rows of x from which bf16 batches use AMX: at 6 the FMA row kernel is as fast (92 vs 95 GFLOP/s; 8: 121
 * vs 103, 16: 244 vs 150; [1408, 2048] from DRAM, 2 threads). */
#define PK_AMX_MIN 8
/* Q8_32 (codes widened to bf16 per tile, each block's products scaled into f32 sums): from 32 rows, where
 * it passes the batch-vectorised kernel ([1408, 2048], GFLOP/s AMX vs that kernel: n=16 132 vs 138, 32 258
 * vs 231, 64 294 vs 260, 128 299 vs 212); kernels/__init__.py mirrors it. */
#define PK_AMX_MIN_Q8 32

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} pk_tilecfg;

/* 16 floats -> their bf16 bits (round to nearest even; finite values), in the low halves of 32-bit lanes. */
PK_AVX512_INLINE __m512i bf16_rne16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
}

/* j->xb = x as B tiles: [part: hi, mid, lo][tile of 16 rows of x][block of 32 k][16 k-pairs][16 rows][2],
 * zero padded; returns 0 (nothing allocated) when there is no memory. Per row of x and block of 32 k: the
 * even and odd elements in two vectors (lane p = pair p), the three parts by round to nearest even in
 * integer arithmetic, each part's 16 pairs scattered down the tile's pair rows. */
static PK_AVX512 int amx_prepare(pk_job *j) {
    const int64_t in = j->in, nk = (in + 31) / 32, mt = (j->n + 15) / 16, part = mt * nk * 512;
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i oddi = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i rowsp = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(16)); /* pair p -> u32 offset 16 p */
    const __m512i hi_mask = _mm512_set1_epi32((int)0xFFFF0000u);
    int64_t t, kb;
    j->xb = (uint16_t *)pk_acalloc((size_t)(3 * part), sizeof(uint16_t));
    if (!j->xb) return 0;
    j->mt = mt;
    for (t = 0; t < j->n; t++) {
        const float *xr = j->x + t * in;
        for (kb = 0; kb < nk; kb++) {
            const int64_t k0 = kb * 32, left = in - k0;
            const __mmask16 m0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u);
            const __mmask16 m1 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1u);
            const __m512 a = _mm512_maskz_loadu_ps(m0, xr + k0), b = _mm512_maskz_loadu_ps(m1, xr + k0 + 16);
            __m512 xe = _mm512_permutex2var_ps(a, even, b), xo = _mm512_permutex2var_ps(a, oddi, b);
            uint32_t *dst = (uint32_t *)j->xb + ((t / 16) * nk + kb) * 256 + t % 16;
            int q;
            for (q = 0; q < 3; q++) { /* hi, mid, lo: each the bf16 of what the parts before left over */
                const __m512i be = bf16_rne16(xe), bo = bf16_rne16(xo);
                const __m512i pr = _mm512_or_si512(be, _mm512_and_si512(_mm512_slli_epi32(bo, 16), hi_mask));
                _mm512_i32scatter_epi32(dst + q * (part / 2), rowsp, pr, 4);
                xe = _mm512_sub_ps(xe, _mm512_castsi512_ps(_mm512_slli_epi32(be, 16)));
                xo = _mm512_sub_ps(xo, _mm512_castsi512_ps(_mm512_slli_epi32(bo, 16)));
            }
        }
    }
    return 1;
}

#define PK_AMX_STEP(T, CH, CL)                                                                             \
    do {                                                                                                   \
        _tile_loadd(5, j->xb + ((i0 + (T)) * nk + kc) * 512, 64);                                          \
        _tile_dpbf16ps(CH, 4, 5);                                                                          \
        _tile_loadd(6, j->xb + part + ((i0 + (T)) * nk + kc) * 512, 64);                                   \
        _tile_dpbf16ps(CL, 4, 6);                                                                          \
        _tile_loadd(7, j->xb + 2 * part + ((i0 + (T)) * nk + kc) * 512, 64);                               \
        _tile_dpbf16ps(CH, 4, 7);                                                                          \
    } while (0)
/* Accumulator tile C (plus tile C2 when its index differs) into rows of y for x tile T of the group. */
#define PK_AMX_STORE(T, C, C2)                                                                             \
    do {                                                                                                   \
        _tile_stored(C, c, 64);                                                                            \
        if ((C2) != (C)) {                                                                                 \
            _tile_stored(C2, c2, 64);                                                                      \
            for (r = 0; r < 256; r++) c[r] += c2[r];                                                       \
        }                                                                                                  \
        for (r = 0; r < nr; r++)                                                                           \
            for (t = 0; t < 16 && (i0 + (T)) * 16 + t < j->n; t++)                                         \
                j->y[((i0 + (T)) * 16 + t) * j->out + o + r] = c[r * 16 + t];                              \
    } while (0)

/* Q8_32: accumulator tile C (plus C2) of x tile T, block kc, scaled by each weight row's block scale
 * (scl) into the f32 sums acc, and zeroed for the next block. */
#define PK_AMX_SCALE(T, C, C2)                                                                             \
    do {                                                                                                   \
        _tile_stored(C, c, 64);                                                                            \
        _tile_zero(C);                                                                                     \
        if ((C2) != (C)) {                                                                                 \
            _tile_stored(C2, c2, 64);                                                                      \
            _tile_zero(C2);                                                                                \
            for (r = 0; r < 256; r++) c[r] += c2[r];                                                       \
        }                                                                                                  \
        for (r = 0; r < 16; r++) {                                                                         \
            float *ar = acc + ((T) * 16 + r) * 16;                                                         \
            _mm512_store_ps(ar, _mm512_fmadd_ps(_mm512_set1_ps(scl[r]), _mm512_load_ps(c + r * 16),        \
                                                _mm512_load_ps(ar)));                                      \
        }                                                                                                  \
    } while (0)
/* Q8_32: the f32 sums of x tile T into rows of y. */
#define PK_AMX_OUT(T, C, C2)                                                                               \
    do {                                                                                                   \
        for (r = 0; r < nr; r++)                                                                           \
            for (t = 0; t < 16 && (i0 + (T)) * 16 + t < j->n; t++)                                         \
                j->y[((i0 + (T)) * 16 + t) * j->out + o + r] = acc[((T) * 16 + r) * 16 + t];              \
    } while (0)

/* Q8_32 rows [o, o + 16), block kc, as a bf16 A tile (codes are small integers: exact in bf16) and the
 * rows' block scales; rows past the end and k past `in` are zeros. */
static PK_AMX void q8_tile_bf16(const pk_job *j, int64_t o, int64_t kc, uint16_t *wpad, float *scl) {
    const int64_t left = j->in - kc * 32;
    int64_t r, k;
    for (r = 0; r < 16; r++) {
        uint16_t *dst = wpad + r * 32;
        if (o + r >= j->out) {
            memset(dst, 0, 64);
            scl[r] = 0.0f;
            continue;
        }
        {
            const int8_t *wr = (const int8_t *)j->w + (o + r) * j->row_bytes + kc * 32;
            scl[r] = j->scales[(o + r) * j->nb + kc];
            if (left >= 32) {
                int h;
                for (h = 0; h < 2; h++) { /* the float's high half: its bf16, exact for |code| <= 128 */
                    const __m128i b = _mm_loadu_si128((const __m128i *)(wr + 16 * h));
                    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
                    _mm256_storeu_si256((__m256i *)(dst + 16 * h),
                                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16)));
                }
            } else {
                for (k = 0; k < 32; k++) {
                    const float f = k < left ? (float)wr[k] : 0.0f;
                    uint32_t u;
                    memcpy(&u, &f, 4);
                    dst[k] = (uint16_t)(u >> 16);
                }
            }
        }
    }
}

/* M(T, CH, CL) for each x tile T of a group of ng: with one or two tiles each has two accumulators (tiles 0,
 * 1 and 2, 3), with three or four one each (tile T). */
#define PK_AMX_EACH(M)              \
    do {                            \
        if (ng <= 2) {              \
            M(0, 0, 1);             \
            if (ng > 1) M(1, 2, 3); \
        } else {                    \
            M(0, 0, 0);             \
            M(1, 1, 1);             \
            M(2, 2, 2);             \
            if (ng > 3) M(3, 3, 3); \
        }                           \
    } while (0)

/* Output rows [o0, o1) of a bf16 or Q8_32 job prepared by amx_prepare: x in groups of up to 4 tiles (64 rows)
 * accumulated in tiles 0-3, blocks of 16 weight rows in tile 4, x's three parts in tiles 5-7. */
static PK_AMX void amx_rows(const pk_job *j, int64_t o0, int64_t o1) {
    const int64_t in = j->in, nk = (in + 31) / 32, mt = j->mt, part = mt * nk * 512, stride = j->row_bytes;
    const int q8 = j->fmt == F_Q8; /* per block of k: tiles scaled into acc (bf16: summed in the tiles) */
    uint16_t wpad[16 * 32] __attribute__((aligned(64)));
    float c[16 * 16] __attribute__((aligned(64))), c2[16 * 16] __attribute__((aligned(64)));
    float acc[4 * 16 * 16] __attribute__((aligned(64))), scl[16];
    pk_tilecfg cfg;
    int64_t o, kc, i0, r, t, k;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (r = 0; r < 8; r++) {
        cfg.rows[r] = 16;
        cfg.colsb[r] = 64;
    }
    _tile_loadconfig(&cfg);
    /* groups of x tiles outside, weight blocks inside: a group's B tiles (3 KB per x tile and block of k)
     * stay in L2 while the weight rows stream past, instead of all of x coming back from L3 per block */
    for (i0 = 0; i0 < mt; i0 += 4) {
        const int64_t ng = mt - i0 < 4 ? mt - i0 : 4;
        for (o = o0; o < o1; o += 16) {
            const int64_t nr = o1 - o < 16 ? o1 - o : 16;
            const int full_rows = o + 16 <= j->out; /* 16 stored rows from o (past o1: computed, not kept) */
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            if (q8) memset(acc, 0, sizeof acc);
            for (kc = 0; kc < nk; kc++) {
                const char *a = (const char *)j->w + o * stride + kc * 64;
                int64_t as = stride;
                if (q8) {
                    q8_tile_bf16(j, o, kc, wpad, scl);
                    a = (const char *)wpad;
                    as = 64;
                } else if (!full_rows || (kc + 1) * 32 > in) { /* the last rows or the short last block of k */
                    for (r = 0; r < 16; r++) {
                        const uint16_t *wr = (const uint16_t *)((const char *)j->w + (o + r) * stride);
                        for (k = 0; k < 32; k++)
                            wpad[r * 32 + k] = o + r < j->out && kc * 32 + k < in ? wr[kc * 32 + k] : 0;
                    }
                    a = (const char *)wpad;
                    as = 64;
                }
                _tile_loadd(4, a, as);
                PK_AMX_EACH(PK_AMX_STEP);
                if (q8) PK_AMX_EACH(PK_AMX_SCALE);
            }
            if (q8)
                PK_AMX_EACH(PK_AMX_OUT);
            else
                PK_AMX_EACH(PK_AMX_STORE);
        }
    }
    _tile_release();
}
#undef PK_AMX_EACH
#undef PK_AMX_STEP
#undef PK_AMX_STORE
#undef PK_AMX_SCALE
#undef PK_AMX_OUT
#endif

#if PK_HAVE_AVX512
/* The accumulators acc[r][v] (weight rows o + r, r < rr; x rows 16 v + lane of the group) into the result buffer
 * yb ([row of x][4 R weight rows], the block starting at weight row ob), lanes past the group's nn rows masked. */
#define PK_YB_SCATTER(R, NV)                                                                               \
    do {                                                                                                   \
        for (v = 0; v < (NV); v++) {                                                                       \
            const int64_t left = nn - 16 * v;                                                              \
            const __mmask16 m = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u);                      \
            for (r = 0; r < rr; r++)                                                                       \
                _mm512_mask_i32scatter_ps(yb + 16 * v * 4 * (R) + (o - ob) + r, m, yi, acc[r][v], 4);     \
        }                                                                                                  \
    } while (0)

/* A kernel for one group of rows of x [t0, t0 + nn) against the weight rows [o0, o1). */
typedef void (*pk_group_kernel)(const pk_job *, int64_t, int64_t, int64_t, int64_t);

/* Rows of x in groups of up to PK_TN_GROUP (64), each group a pass over the weight rows [o0, o1) with the kernel
 * for its number of 16-row vectors (k[v - 1] for v = 1..4). */
static void rows_by_group(const pk_job *j, int64_t o0, int64_t o1, const pk_group_kernel k[4]) {
    int64_t t0;
    for (t0 = 0; t0 < j->n; t0 += PK_TN_GROUP) {
        const int64_t nn = j->n - t0 < PK_TN_GROUP ? j->n - t0 : PK_TN_GROUP;
        k[(nn + 15) / 16 - 1](j, o0, o1, t0, nn);
    }
}

#endif

#if PK_HAVE_AVX512BF16
/* bf16 weights x activations rounded to bf16 (A_BF16: the opt-in mode of bf16 batches, PYKIMI_ACT_QUANT=all;
 * twin ref.matmul_act_bf16). Why: the exact bf16 batch kernel (bf16_tn_avx512) widens every weight to f32 in
 * L1 and does one f32 multiply per lane per FMA, and past PK_TN_MAX rows the widened tiles + sgemm take over;
 * vdpbf16ps multiplies 32 bf16 pairs per instruction (two per f32 lane, summed in f32) straight from the
 * stored rows, which is what PyTorch and llama.cpp do for bf16 weights on such CPUs -- they round the
 * activations to bf16 too. The weights are never widened: each stored pair (two bf16 of consecutive k, one
 * uint32 of the mapped row) is broadcast against NV vectors of x pairs of 16 rows of x each.
 * Numerics: x is rounded to bf16 (round to nearest even, vcvtne2ps2bf16), every product of two bf16 is exact
 * in f32 and the sums are f32, so the result is bf16(x) @ W^T up to f32 summation order. vdpbf16ps and the
 * conversion treat denormal inputs as zero and flush denormal results to zero (DAZ / FTZ, whatever MXCSR
 * says): activations or weights below 2^-126 count as 0, which moves a result by at most ~2^-126 * in * max|w|
 * (tests/test_kernels.py holds tiny activations to that). */

/* j->xp = x rounded to bf16 as pairs (uint32: element 2p in the low half, 2p + 1 in the high half), per group of
 * PK_TN_GROUP (64) rows of x: group g at g * ceil(in / 2) * 64, laid out [ceil(in / 2) pairs][16 lanes per 16 rows
 * of the group], zero padded (an odd `in`'s last pair, the rows past n). Why per group: with one [pairs][all
 * rows] array the kernel's loads for consecutive pairs are 4 n bytes apart, a power of two at 512 rows (2 KiB)
 * that maps the group's x onto 1/8 of the L2 sets, so it streamed from L3: 512 rows ran at 412 GFLOP/s against
 * 826 at 64 rows ([1408, 2048], 2 threads; a group now is one contiguous block read at 256-byte steps).
 * 32 elements of a row at a time: one conversion (vcvtne2ps2bf16) gives its 16 pairs; 16 rows' worth transposed
 * in registers (tr16x16) and each pair's 16 rows stored as one line. (Rows inner, the 16 pairs scattered down the
 * group's rows: 512 x 2048 took ~0.12 ms on 2 threads, a 16-element scatter ~50 cycles on AMD Zen 5; row-outer,
 * before that, 2.4 ms, a third of the product.) Groups are shared between the threads. */
static PK_AVX512BF16 void bf16a_pack_group(const pk_job *j, int64_t g) {
    const int64_t in = j->in, np = (in + 1) / 2, t0 = g * PK_TN_GROUP;
    const int64_t nn = j->n - t0 < PK_TN_GROUP ? j->n - t0 : PK_TN_GROUP, gw = 16 * ((nn + 15) / 16);
    uint32_t *xg = j->xp + g * np * PK_TN_GROUP;
    int64_t tb, k0;
    int i;
    for (tb = 0; tb < nn; tb += 16)
        for (k0 = 0; k0 < in; k0 += 32) {
            const int64_t left = in - k0, pairs = left >= 32 ? 16 : (left + 1) / 2;
            const __mmask16 m0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u);
            const __mmask16 m1 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1u);
            __m512 r[16];
            for (i = 0; i < 16; i++) {
                const float *xr = j->x + (t0 + tb + i) * in + k0;
                if (tb + i < nn) {
                    const __m512 a = _mm512_maskz_loadu_ps(m0, xr), b = _mm512_maskz_loadu_ps(m1, xr + 16);
                    if (left > PK_BD_XPF + 32) { /* 16 rows read 128 bytes at a time: prefetch them */
                        _mm_prefetch((const char *)(xr + PK_BD_XPF), _MM_HINT_T0);
                        _mm_prefetch((const char *)(xr + PK_BD_XPF + 16), _MM_HINT_T0);
                    }
                    r[i] = (__m512)_mm512_cvtne2ps_pbh(b, a); /* words 0..15 from a, 16..31 from b */
                } else {
                    r[i] = _mm512_setzero_ps(); /* the pad rows */
                }
            }
            tr16x16(r); /* r[p] = pair k0 / 2 + p of the 16 rows */
            for (i = 0; i < pairs; i++) _mm512_storeu_ps((float *)xg + (k0 / 2 + i) * gw + tb, r[i]);
        }
}

/* uint32 elements of a job's packed x (whole groups of 64 rows). */
static int64_t bf16a_elems(const pk_job *j) {
    return (j->in + 1) / 2 * PK_TN_GROUP * ((j->n + PK_TN_GROUP - 1) / PK_TN_GROUP);
}

/* Whether job j runs the AVX512_BF16 kernel: bf16 weights with bf16 activations, PK_BF16A_MIN rows or more at
 * the AVX-512 level, AVX512_BF16 on and AMX off (AMX keeps its exact product); kernels/linear.py (_c_mode)
 * mirrors this choice, so the tests know which rows got which numerics. */
static int bf16a_takes(const pk_job *j, int simd) {
#if PK_HAVE_AMX
    if (pk_get_amx()) return 0;
#endif
    return !j->rows && j->act == A_BF16 && j->fmt == F_BF16 && simd >= 2 && j->n >= PK_BF16A_MIN && j->in > 0 &&
           pk_get_avx512bf16();
}

/* Weight rows [o0, o1) against rows t0 .. t0 + nn of x (nn <= 16 NV, all in one group of 64, t0 any multiple of 16
 * in it: its lanes start at t0 % 64): blocks of R weight rows, R x NV
 * accumulators of 16 rows of x each; per pair p, NV loads of x pairs, R broadcasts of a stored weight pair,
 * R * NV vdpbf16ps. The weight rows past o1 in the last block repeat row o1 - 1 (read, not stored): no read
 * past the matrix, no branch in the loop. An odd `in`'s last weight pair is built from its one element.
 * Prefetch: each line of the block's rows PK_PF ahead into L1, and the same line of the NEXT block's rows into L2,
 * a whole block ahead: a row of 2048 bf16 is one page, where the hardware prefetcher stops, and R rows are read
 * side by side (60 experts' [1408, 2048] weights from DRAM in one call, 12 / 16 / 32 rows each: 21.2 / 23.2 /
 * 15.6 -> 24.6 / 25.2 / 17.0 GB/s).
 * Results go through yb, 4 R weight rows x the group's rows of x (a masked scatter per accumulator), and into y
 * a row of x at a time: stored straight into y, the R values per row of x of each block landed 4 * out bytes
 * apart, for out = 2048 (8 KiB) all in one L1 set -- 64 rows of x x 2048 ran at 476 GFLOP/s against 806 for
 * out = 1408; now 877 (n = 512; 11264 x 2048: 454 -> 897). */
#define PK_BD_KERNEL(NAME, R, NV)                                                                          \
    static PK_AVX512BF16 void NAME(const pk_job *j, int64_t o0, int64_t o1, int64_t t0, int64_t nn) {     \
        const int64_t in = j->in, nfull = in / 2, gw = 16 * ((nn + 15) / 16);                             \
        const uint32_t *xg = j->xp + (t0 / PK_TN_GROUP) * ((in + 1) / 2) * PK_TN_GROUP; /* t0's group */     \
        float yb[16 * (NV) * 4 * (R)] __attribute__((aligned(64))); /* [rows of x][4 R weight rows] */     \
        const __m512i yi = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), \
                                              _mm512_set1_epi32(4 * (R)));                                \
        int64_t o, ob, oe, p, p0, t;                                                                      \
        int r, v;                                                                                         \
        for (ob = o0; ob < o1; ob += 4 * (R)) {                                                           \
        oe = o1 - ob < 4 * (R) ? o1 : ob + 4 * (R);                                                       \
        for (o = ob; o < oe; o += (R)) {                                                                  \
            const int rr = oe - o < (R) ? (int)(oe - o) : (R);                                            \
            const char *wr[R], *nx[R];                                                                    \
            __m512 acc[R][NV];                                                                            \
            for (r = 0; r < (R); r++) {                                                                   \
                const int64_t on = o + (R) + r < j->out ? o + (R) + r : j->out - 1;                       \
                wr[r] = (const char *)j->w + (o + (r < rr ? r : rr - 1)) * j->row_bytes;                  \
                nx[r] = (const char *)j->w + on * j->row_bytes;                                           \
                for (v = 0; v < (NV); v++) acc[r][v] = _mm512_setzero_ps();                               \
            }                                                                                             \
            for (p0 = 0; p0 < nfull; p0 += 16) { /* 16 pairs = one 64-byte line of each weight row */      \
                const int64_t pe = nfull - p0 < 16 ? nfull : p0 + 16;                                     \
                for (r = 0; r < (R); r++) {                                                               \
                    _mm_prefetch(wr[r] + 4 * p0 + PK_PF, _MM_HINT_T0);                                    \
                    _mm_prefetch(nx[r] + 4 * p0, _MM_HINT_T1);                                            \
                }                                                                                         \
                for (p = p0; p < pe; p++) {                                                               \
                    const uint32_t *xk = xg + p * gw;                                                     \
                    __m512i xv[NV];                                                                       \
                    for (v = 0; v < (NV); v++) xv[v] = _mm512_loadu_si512((const void *)(xk + 16 * v));   \
                    for (r = 0; r < (R); r++) {                                                           \
                        uint32_t wp;                                                                      \
                        __m512i b;                                                                        \
                        memcpy(&wp, wr[r] + 4 * p, 4);                                                    \
                        b = _mm512_set1_epi32((int)wp);                                                   \
                        for (v = 0; v < (NV); v++)                                                        \
                            acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)xv[v], (__m512bh)b);        \
                    }                                                                                     \
                }                                                                                         \
            }                                                                                             \
            if (in & 1) {                                                                                 \
                const uint32_t *xk = xg + nfull * gw;                                                     \
                for (r = 0; r < (R); r++) {                                                               \
                    uint16_t h;                                                                           \
                    __m512i b;                                                                            \
                    memcpy(&h, wr[r] + 2 * (in - 1), 2);                                                  \
                    b = _mm512_set1_epi32((int)h); /* (last element, 0): x's pad is 0 too */              \
                    for (v = 0; v < (NV); v++) {                                                          \
                        const __m512i xv = _mm512_loadu_si512((const void *)(xk + 16 * v));               \
                        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)xv, (__m512bh)b);               \
                    }                                                                                     \
                }                                                                                         \
            }                                                                                             \
            PK_YB_SCATTER(R, NV);                                                                         \
        }                                                                                                 \
        for (t = 0; t < nn; t++)                                                                          \
            memcpy(j->y + (t0 + t) * j->out + ob, yb + t * 4 * (R), sizeof(float) * (size_t)(oe - ob));   \
        }                                                                                                 \
    }
/* R x NV: 10 x 1, 8 x 2, 8 x 3, 6 x 4. Measured GFLOP/s on [1408, 2048], 2 threads, AMD EPYC with AVX512_BF16
 * (best of 20-30 calls, +-5 % between runs): one vector (12 / 16 rows of x) R = 16: 297-369 / 418-480, 12: 425-474
 * / 557-620, 10: 491-524 / 635-682, 8: 493-496 / 627-650 (per pair 1 load of x and R broadcasts for R
 * vdpbf16ps: the loads, not the 16 accumulators, set the pace); two (32 rows) 8: 809-890, 12: 809-863; three (48)
 * 6: 863-884, 8: 892-961; four (64 / 512) 4: 882-900 / 828-874, 6: 902-951 / 904-955. */
PK_BD_KERNEL(bf16a_1_avx512, 10, 1)
PK_BD_KERNEL(bf16a_2_avx512, 8, 2)
PK_BD_KERNEL(bf16a_3_avx512, 8, 3)
PK_BD_KERNEL(bf16a_4_avx512, 6, 4)
#undef PK_BD_KERNEL

static const pk_group_kernel bf16a_kernels[4] = {bf16a_1_avx512, bf16a_2_avx512, bf16a_3_avx512, bf16a_4_avx512};

static void bf16a_rows(const pk_job *j, int64_t o0, int64_t o1) { rows_by_group(j, o0, o1, bf16a_kernels); }
#endif

#if PK_X86
/* Q8_32 / Q4_32 weights x int8 activations, batches (A_I8 with >= PK_VNNI_MIN_Q8 / _Q4 rows of x at the AVX-512
 * level: prefill, the MoE's per-expert batches; twins ref.matmul_act_q8 / matmul_act_q4). Why: the per-row
 * kernels (tile_act_avx512) load a vector of x for every vpdpbusd and re-decode each weight row per 4 rows of x;
 * here, as in bf16a_rows, the batch is vectorised instead: x is quantized once per job (the same
 * quant_act_level as the row kernels: the same int8 codes and block scales) and packed per group of 64 rows
 * into lanes of 16 rows x 4 consecutive k bytes (one uint32 per row of x, the layout vpdpbusd reads), and each
 * 4-byte group of a weight row is broadcast against NV such vectors.
 * Operands: vpdpbusd multiplies UNSIGNED bytes (first operand) by SIGNED bytes (second) and adds groups of 4
 * into int32 lanes. The weight bytes go unsigned, the x codes (-127..127) signed:
 *  - Q4: the codes 0..15 are unsigned as stored; sum(code * x) = dot(code - 8, x) + 8 * sum(x), so each block's
 *    int32 accumulator starts at -8 * sum(x block) (per row of x: a packed lane vector).
 *  - Q8: code XOR 0x80 is code + 128 as an unsigned byte (every int8 code, -128 included); sum((code + 128) *
 *    x) = dot + 128 * sum(x), so the accumulator starts at -128 * sum(x block).
 * Both corrections depend only on x and are built once at packing. Every block dot is exact in int32 (|.| <
 * 32 * 255 * 127 before the correction) and, after it, below 2^24 (exact in f32); then, per block, y +=
 * float(dot) * (dx * dw) with an FMA, per row of x in block order: the twin's sum of the same f32 terms, in
 * another order (tests hold it to 1e-6 of max row sum |x| * max |w|, as the row kernels).
 * Q4 nibbles: element 2i is byte i's low nibble, 2i+1 its high one; a block's 16 bytes become its 32 codes in
 * natural order with and / shift / unpack (as decode32_512), so x is packed in natural order for both formats.
 * The weight rows are decoded PK_VN_KB blocks at a time into an L1 buffer (Q8: 1 xor per 32 codes; Q4: 5 ops per
 * 32 codes) from which the 4-byte groups are broadcast. */
#define PK_VN_KB 8 /* weight blocks (of 32) decoded per step into the L1 buffer */

/* uint32 elements of one packed group: [nb * 8 quads][gw lanes] of x, [nb][gw] f32 scales, [nb][gw] int32
 * corrections (stride 64 lanes between groups, gw = 16 * ceil(rows in the group / 16) inside one). */
static int64_t vnni_group_elems(int64_t nb) { return nb * 10 * PK_TN_GROUP; }

static int64_t vnni_elems(const pk_job *j) {
    return vnni_group_elems((j->in + PK_BLOCK - 1) / PK_BLOCK) * ((j->n + PK_TN_GROUP - 1) / PK_TN_GROUP);
}

/* Whether job j runs the int8 batch kernel: Q8_32 / Q4_32 with int8 activations, enough rows, the AVX-512 level
 * (vnni_rows) or the AVX2 level (avx2b_rows), the kernel on; kernels/linear.py (_c_mode, C_VNNI_MIN,
 * C_VNNI_MIN_AVX2) mirrors it. */
static int vnni_takes(const pk_job *j, int simd) {
    return !j->rows && j->act == A_I8 && (j->fmt == F_Q8 || j->fmt == F_Q4) && simd >= 1 && j->in > 0 &&
           j->n >= vnni_min_level(j->fmt, simd) && pk_get_vnni_batch();
}

/* The AVX2 kernel's Q4 order of the 32 codes of a block: [even elements | odd elements], i.e. the low nibbles of its
 * 16 bytes, then the high ones, so that decoding the weights is two ands and a shift (avx2b_rows); the x codes of
 * every block are packed in that order too (a permutation inside the block: the dot and the sum are unchanged). */
static void q4_even_odd(int8_t *blk) {
    int8_t tmp[PK_BLOCK];
    int e;
    for (e = 0; e < 16; e++) {
        tmp[e] = blk[2 * e];
        tmp[16 + e] = blk[2 * e + 1];
    }
    memcpy(blk, tmp, sizeof tmp);
}

/* dst[c * gw + t] = src[t * cols + c] (32-bit elements), rows t < gw, columns c < cols: the packed x of the int8 and
 * int16 batch kernels from the rows' codes; tr_cols at the AVX-512 level, else a column at a time (rows inner, the
 * writes contiguous). */
static void pack_cols(int simd, const uint32_t *src, int64_t cols, int64_t gw, uint32_t *dst) {
    int64_t c, t;
#if PK_HAVE_AVX512
    if (simd >= 2) {
        tr_cols(src, cols, gw, gw, cols, dst);
        return;
    }
#else
    (void)simd;
#endif
    for (c = 0; c < cols; c++)
        for (t = 0; t < gw; t++) memcpy(dst + c * gw + t, src + t * cols + c, 4);
}

/* Quantize and pack the rows of group g (the job's xp must be allocated): rows quantized one at a time into q /
 * d (quant_act_level: bit for bit the row kernels' codes and scales), then transposed into the group (Q4 at the
 * AVX2 level: each block in q4_even_odd order). */
static void vnni_pack_group(const pk_job *j, int64_t g, int simd) {
    const int64_t in = j->in, nb = (in + PK_BLOCK - 1) / PK_BLOCK, t0 = g * PK_TN_GROUP;
    const int64_t nn = j->n - t0 < PK_TN_GROUP ? j->n - t0 : PK_TN_GROUP, gw = 16 * ((nn + 15) / 16);
    const int32_t mult = j->fmt == F_Q4 ? -8 : -128;
    const int eo = j->fmt == F_Q4 && simd == 1;
    uint32_t *xg = j->xp + g * vnni_group_elems(nb);
    float *dg = (float *)(xg + nb * 8 * gw);
    int32_t *cg = (int32_t *)(dg + nb * gw);
    int8_t *q = (int8_t *)malloc((size_t)(nb * PK_BLOCK) * (size_t)gw + 64);
    float *d = (float *)malloc(sizeof(float) * (size_t)(nb * gw) + 64);
    int64_t t, p, b, e;
    if (!q || !d) { /* no memory for the scratch: the slow, allocation-free way, row by row */
        free(q);
        free(d);
        for (t = 0; t < gw; t++) {
            int8_t rq[PK_BLOCK];
            for (b = 0; b < nb; b++) {
                float rd = 0.0f;
                int32_t s = 0;
                if (t < nn) {
                    const int64_t i0 = b * PK_BLOCK, i1 = i0 + PK_BLOCK < in ? i0 + PK_BLOCK : in;
                    float xb[PK_BLOCK] = {0};
                    memcpy(xb, j->x + (t0 + t) * in + i0, sizeof(float) * (size_t)(i1 - i0));
                    quant_act_row(xb, i1 - i0, rq, &rd, 0);
                } else {
                    memset(rq, 0, sizeof rq);
                }
                if (eo) q4_even_odd(rq);
                for (e = 0; e < PK_BLOCK; e++) s += rq[e];
                for (p = 0; p < 8; p++) memcpy(xg + (b * 8 + p) * gw + t, rq + 4 * p, 4);
                dg[b * gw + t] = rd;
                cg[b * gw + t] = mult * s;
            }
        }
        return;
    }
    memset(q + nn * nb * PK_BLOCK, 0, (size_t)((gw - nn) * nb * PK_BLOCK));
    for (t = nn * nb; t < gw * nb; t++) d[t] = 0.0f;
    quant_act_level(simd, j->x + t0 * in, nn, in, q, d);
    if (eo)
        for (t = 0; t < nn * nb; t++) q4_even_odd(q + t * PK_BLOCK);
    pack_cols(simd, (const uint32_t *)q, nb * 8, gw, xg); /* quad p of row t -> xg[p * gw + t] */
    for (t = 0; t < gw; t++) /* rows outer: q read in order (its rows are a power of two apart) */
        for (b = 0; b < nb; b++) {
            const int8_t *src = q + t * nb * PK_BLOCK + b * PK_BLOCK;
            int32_t s = 0;
            for (e = 0; e < PK_BLOCK; e++) s += src[e];
            dg[b * gw + t] = d[t * nb + b];
            cg[b * gw + t] = mult * s;
        }
    free(q);
    free(d);
}

/* The int16 batch kernels' packed x (PK_VW_KERNEL at the AVX-512 level, PK_AW_KERNEL at the AVX2 level: one layout,
 * which the AVX2 kernel reads 8 lanes at a time). uint32 elements of one packed group: [nb * 16 pairs][gw lanes] of
 * x, [nb][gw] f32 scales (stride 64 lanes between groups, gw = 16 * ceil(rows in the group / 16) inside one). */
static int64_t vnni16_group_elems(int64_t nb) { return nb * 17 * PK_TN_GROUP; }

static int64_t vnni16_elems(const pk_job *j) {
    return vnni16_group_elems((j->in + PK_BLOCK - 1) / PK_BLOCK) * ((j->n + PK_TN_GROUP - 1) / PK_TN_GROUP);
}

/* Whether job j runs an int16 batch kernel: Q8_32 with int16 activations, enough rows for the level's kernel
 * (vnni16_min_level: PK_VW_KERNEL at the AVX-512 level, PK_AW_KERNEL at the AVX2 level), the kernels on
 * (pk_get_vnni16_batch); kernels/linear.py (_vnni16, C_VNNI16_MIN, C_VNNI16_MIN_AVX2) mirrors it. */
static int vnni16_takes(const pk_job *j, int simd) {
    const int64_t m = vnni16_min_level(simd);
    return !j->rows && j->act == A_I16 && j->fmt == F_Q8 && m > 0 && j->in > 0 && j->n >= m && pk_get_vnni16_batch();
}

/* Quantize and pack the rows of group g (the job's xp must be allocated): rows quantized one at a time into q / d
 * (quant_act16_level: bit for bit the row kernel's codes and scales), then transposed into the group. */
static void vnni16_pack_group(const pk_job *j, int64_t g, int simd) {
    const int64_t in = j->in, nb = (in + PK_BLOCK - 1) / PK_BLOCK, t0 = g * PK_TN_GROUP;
    const int64_t nn = j->n - t0 < PK_TN_GROUP ? j->n - t0 : PK_TN_GROUP, gw = 16 * ((nn + 15) / 16);
    uint32_t *xg = j->xp + g * vnni16_group_elems(nb);
    float *dg = (float *)(xg + nb * 16 * gw);
    int16_t *q = (int16_t *)malloc(sizeof(int16_t) * (size_t)(nb * PK_BLOCK) * (size_t)gw + 64);
    float *d = (float *)malloc(sizeof(float) * (size_t)(nb * gw) + 64);
    int64_t t, p, b;
    if (!q || !d) { /* no memory for the scratch: the slow, allocation-free way, block by block */
        free(q);
        free(d);
        for (t = 0; t < gw; t++)
            for (b = 0; b < nb; b++) {
                int16_t rq[PK_BLOCK] = {0};
                float rd = 0.0f;
                if (t < nn) {
                    const int64_t i0 = b * PK_BLOCK, i1 = i0 + PK_BLOCK < in ? i0 + PK_BLOCK : in;
                    quant_act16_row(j->x + (t0 + t) * in + i0, i1 - i0, rq, &rd, 0);
                }
                for (p = 0; p < 16; p++) memcpy(xg + (b * 16 + p) * gw + t, rq + 2 * p, 4);
                dg[b * gw + t] = rd;
            }
        return;
    }
    memset(q + nn * nb * PK_BLOCK, 0, sizeof(int16_t) * (size_t)((gw - nn) * nb * PK_BLOCK));
    for (t = nn * nb; t < gw * nb; t++) d[t] = 0.0f;
    quant_act16_level(simd, j->x + t0 * in, nn, in, q, d);
    pack_cols(simd, (const uint32_t *)q, nb * 16, gw, xg); /* pair p of row t -> xg[p * gw + t] */
    for (t = 0; t < gw; t++)
        for (b = 0; b < nb; b++) dg[b * gw + t] = d[t * nb + b];
    free(q);
    free(d);
}

#endif

#if PK_HAVE_AVX512

/* Weight rows [o0, o1) against rows t0 .. t0 + nn of x (nn <= 16 NV, all in one group of 64, t0 any multiple of 16
 * in it: its lanes start at t0 % 64): blocks of R weight rows, R x NV
 * f32 accumulators of 16 rows of x each, and per block R x NV int32 ones (started at the x correction). The
 * weight rows past o1 in the last block repeat row o1 - 1 (read, not stored). Per block of 32: 8 quads, each
 * NV loads of x and R broadcasts for R * NV vpdpbusd; then R * NV (convert, multiply the scales, FMA).
 * Results through yb as in PK_BD_KERNEL (4 R weight rows x the group's rows of x). FMT: F_Q8 or F_Q4. */
#define PK_VN_KERNEL(NAME, FMT, R, NV)                                                                      \
    static PK_HOT PK_AVX512 void NAME(const pk_job *j, int64_t o0, int64_t o1, int64_t t0, int64_t nn) {  \
        const int64_t in = j->in, nb = j->nb, g0 = t0 - t0 % PK_TN_GROUP, lane = t0 - g0;                 \
        const int64_t gn = j->n - g0 < PK_TN_GROUP ? j->n - g0 : PK_TN_GROUP, gw = 16 * ((gn + 15) / 16);   \
        const uint32_t *xg = j->xp + (g0 / PK_TN_GROUP) * vnni_group_elems(nb) + lane;                   \
        const float *dg = (const float *)(j->xp + (g0 / PK_TN_GROUP) * vnni_group_elems(nb) + nb * 8 * gw) + lane; \
        const int32_t *cg = (const int32_t *)(dg + nb * gw);                                              \
        float yb[16 * (NV) * 4 * (R)] __attribute__((aligned(64)));                                       \
        uint32_t wb[(R) * PK_VN_KB * 8] __attribute__((aligned(64))); /* [r][block][8 quads] */          \
        const __m512i yi = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), \
                                              _mm512_set1_epi32(4 * (R)));                                \
        const __m128i m4 = _mm_set1_epi8(0x0F);                                                           \
        const __m256i x80 = _mm256_set1_epi8((char)0x80);                                                 \
        int64_t o, ob, oe, b, b0, be, t;                                                                  \
        int r, v, qd;                                                                                     \
        for (ob = o0; ob < o1; ob += 4 * (R)) {                                                           \
        oe = o1 - ob < 4 * (R) ? o1 : ob + 4 * (R);                                                       \
        for (o = ob; o < oe; o += (R)) {                                                                  \
            __m512 acc[R][NV];                                                                            \
            PK_STEP_ROWS(const char *, oe, R);                                                            \
            for (r = 0; r < (R); r++)                                                                     \
                for (v = 0; v < (NV); v++) acc[r][v] = _mm512_setzero_ps();                               \
            for (b0 = 0; b0 < nb; b0 += PK_VN_KB) {                                                       \
                be = nb - b0 < PK_VN_KB ? nb : b0 + PK_VN_KB;                                             \
                for (r = 0; r < (R); r++) /* decode blocks b0..be of the R rows into wb */                \
                    for (b = b0; b < be; b++) {                                                           \
                        uint32_t *dst = wb + (r * PK_VN_KB + (b - b0)) * 8;                               \
                        const int64_t left = in - b * PK_BLOCK; /* elements of the block in the row */    \
                        if ((FMT) == F_Q8) {                                                              \
                            const char *p = wr[r] + b * PK_BLOCK;                                         \
                            __m256i c = left >= 32 ? _mm256_loadu_si256((const __m256i *)p)               \
                                                   : _mm256_maskz_loadu_epi8((__mmask32)((1u << left) - 1u), p); \
                            if (!(b & 1)) {                                                               \
                                _mm_prefetch(p + PK_PF, _MM_HINT_T0);                                     \
                                _mm_prefetch(nx[r] + b * PK_BLOCK, _MM_HINT_T1);                          \
                            }                                                                             \
                            _mm256_store_si256((__m256i *)dst, _mm256_xor_si256(c, x80));                 \
                        } else {                                                                          \
                            const char *p = wr[r] + b * (PK_BLOCK / 2);                                   \
                            const int64_t nby = left >= 32 ? 16 : (left + 1) / 2;                         \
                            __m128i c = nby == 16 ? _mm_loadu_si128((const __m128i *)p)                   \
                                                  : _mm_maskz_loadu_epi8((__mmask16)((1u << nby) - 1u), p); \
                            __m128i lo = _mm_and_si128(c, m4), hi = _mm_and_si128(_mm_srli_epi16(c, 4), m4); \
                            if (!(b & 3)) {                                                               \
                                _mm_prefetch(p + PK_PF, _MM_HINT_T0);                                     \
                                _mm_prefetch(nx[r] + b * (PK_BLOCK / 2), _MM_HINT_T1);                    \
                            }                                                                             \
                            _mm_store_si128((__m128i *)dst, _mm_unpacklo_epi8(lo, hi));                   \
                            _mm_store_si128((__m128i *)(dst + 4), _mm_unpackhi_epi8(lo, hi));             \
                        }                                                                                 \
                    }                                                                                     \
                for (b = b0; b < be; b++) {                                                               \
                    __m512i ai[R][NV], xv[NV];                                                            \
                    __m512 dv[NV];                                                                        \
                    for (v = 0; v < (NV); v++) xv[v] = _mm512_loadu_si512((const void *)(cg + b * gw + 16 * v)); \
                    for (r = 0; r < (R); r++)                                                             \
                        for (v = 0; v < (NV); v++) ai[r][v] = xv[v];                                      \
                    for (qd = 0; qd < 8; qd++) {                                                          \
                        const uint32_t *xk = xg + (b * 8 + qd) * gw;                                      \
                        for (v = 0; v < (NV); v++) xv[v] = _mm512_loadu_si512((const void *)(xk + 16 * v)); \
                        for (r = 0; r < (R); r++) {                                                       \
                            const __m512i bw = _mm512_set1_epi32((int)wb[(r * PK_VN_KB + (b - b0)) * 8 + qd]); \
                            for (v = 0; v < (NV); v++) ai[r][v] = _mm512_dpbusd_epi32(ai[r][v], bw, xv[v]); \
                        }                                                                                 \
                    }                                                                                     \
                    for (v = 0; v < (NV); v++) dv[v] = _mm512_loadu_ps(dg + b * gw + 16 * v);             \
                    for (r = 0; r < (R); r++) {                                                           \
                        const __m512 s = _mm512_set1_ps(sr[r][b]);                                        \
                        for (v = 0; v < (NV); v++)                                                        \
                            acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r][v]), _mm512_mul_ps(dv[v], s), \
                                                        acc[r][v]);                                       \
                    }                                                                                     \
                }                                                                                         \
            }                                                                                             \
            PK_YB_SCATTER(R, NV);                                                                         \
        }                                                                                                 \
        for (t = 0; t < nn; t++)                                                                          \
            memcpy(j->y + (t0 + t) * j->out + ob, yb + t * 4 * (R), sizeof(float) * (size_t)(oe - ob));   \
        }                                                                                                 \
    }
/* R x NV: 10 x 1, 6 x 2, 4 x 3; 49..64 rows of a group run as 32 + the rest (two passes over the weight rows, 6 x 2
 * each). Measured GOP/s on [1408, 2048], ONE thread (the other core was taken), AMD EPYC Zen 5, best of ~30
 * calls, +-5 % between runs, Q8 / Q4 alike: 16 rows R = 8: 400, 10: 435-444, 12: 377; 32 rows R = 6: 558-581,
 * 5: 549, 7: 473; 48 rows R = 4: 556-583, 3: 326, 5: 516; 64 / 512 rows as one 3 x 4 pass 311 / 308, 4 x 4 (ai
 * and acc spill) 533 / 525 as 32 + 32, 48 + 16 449 / 440, 32 + 32 with 6 x 2: 518-533 / 503-525. Per quad NV loads
 * of x and R broadcasts feed R * NV vpdpbusd, and per block R * NV convert / multiply / FMA follow: 2 R NV + NV
 * registers live, so R NV of ~12 is all the 32 zmm hold. gcc 12 unrolls the 8-quad loop by itself (objdump: 80 / 96
 * vpdpbusd per block in a straight line, ~1 register move per 5-10 of them, mostly the R NV copies of the correction
 * that start ai), so it needs no "GCC unroll" (unlike PK_VW_KERNEL, PK_AB_KERNEL): with one the same instructions. */
PK_VN_KERNEL(vnni_q8_1_avx512, F_Q8, 10, 1)
PK_VN_KERNEL(vnni_q8_2_avx512, F_Q8, 6, 2)
PK_VN_KERNEL(vnni_q8_3_avx512, F_Q8, 4, 3)
PK_VN_KERNEL(vnni_q4_1_avx512, F_Q4, 10, 1)
PK_VN_KERNEL(vnni_q4_2_avx512, F_Q4, 6, 2)
PK_VN_KERNEL(vnni_q4_3_avx512, F_Q4, 4, 3)
#undef PK_VN_KERNEL


/* Q8_32 weights x int16 activations, batches (A_I16 -- the default mode's Q8 -- with >= PK_VNNI16_MIN_Q8 rows of x
 * at the AVX-512 level: prefill, the MoE's per-expert batches; twin ref.matmul_act16_q8). Why: the int16 row kernel
 * (tile_q8w_avx512) re-reads and widens each weight row per 4 rows of x and loads a vector of x per vpmaddwd, and
 * from 24 rows the exact f32 batch kernel / widened tiles + sgemm took over: all compute bound, ~250-400 GOP/s on 2
 * cores. This is the VNNI kernel's scheme (vnni_rows) on vpdpwssd: x quantized once per job to the row kernel's
 * int16 codes and block scales (quant_act16_level, qmax 32767), packed per group of 64 rows into lanes of 16 rows x
 * 2 consecutive k (one int16 pair = one uint32 per row of x, the layout vpdpwssd reads); the weight rows decoded
 * PK_VN_KB blocks at a time into an L1 buffer as int16 (sign-extended, 1 vpmovsxbw per 32 codes) and each pair of
 * consecutive codes broadcast (32 bits) against NV such vectors: 16 vpdpwssd per block per (weight row, x vector),
 * signed x signed, so no offset correction (unlike vpdpbusd's unsigned operand).
 * Exactness: every product |code * xq| <= 128 * 32767 (weights -128..127, x codes -32767..32767), so each int32 lane
 * -- the block dot of one (weight row, row of x) -- stays within 32 * 128 * 32767 = 134213632 < 2^31 at every
 * partial sum: the int32 block dot is exact (the twin's int64 dot). Then, per block, y += float(dot) * (dx * dw) with
 * an FMA, per row of x in block order: float(dot) is the twin's dots.astype(float32) (one rounding to nearest, |dot|
 * may pass 2^24), and the rest is the twin's sum of the same f32 terms in another order (tests hold it to the row
 * kernel's tolerance, 1e-6 of max row sum |x| * max |w|). Padding: the x codes past `in` are 0 (quant_act16_row),
 * the weight codes past `in` are loaded as 0 (masked load), and padded rows of x are all 0. */

/* Weight rows [o0, o1) against rows t0 .. t0 + nn of x (as PK_VN_KERNEL: nn <= 16 NV in one group of 64, blocks of
 * R weight rows, R x NV f32 accumulators and per block R x NV int32 ones, results through yb). Per block of 32: 16
 * pairs, each NV loads of x and R broadcasts for R * NV vpdpwssd; then R * NV (convert, multiply the scales, FMA). */
#ifndef PK_VW_UNROLL
#define PK_VW_UNROLL _Pragma("GCC unroll 16")
#endif
#define PK_VW_KERNEL(NAME, R, NV)                                                                           \
    static PK_HOT PK_AVX512 void NAME(const pk_job *j, int64_t o0, int64_t o1, int64_t t0, int64_t nn) {  \
        const int64_t in = j->in, nb = j->nb, g0 = t0 - t0 % PK_TN_GROUP, lane = t0 - g0;                 \
        const int64_t gn = j->n - g0 < PK_TN_GROUP ? j->n - g0 : PK_TN_GROUP, gw = 16 * ((gn + 15) / 16);   \
        const uint32_t *xg = j->xp + (g0 / PK_TN_GROUP) * vnni16_group_elems(nb) + lane;                 \
        const float *dg = (const float *)(j->xp + (g0 / PK_TN_GROUP) * vnni16_group_elems(nb) + nb * 16 * gw) + lane; \
        float yb[16 * (NV) * 4 * (R)] __attribute__((aligned(64)));                                       \
        uint32_t wb[(R) * PK_VN_KB * 16] __attribute__((aligned(64))); /* [r][block][16 pairs] */        \
        const __m512i yi = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), \
                                              _mm512_set1_epi32(4 * (R)));                                \
        int64_t o, ob, oe, b, b0, be, t;                                                                  \
        int r, v, pr;                                                                                     \
        for (ob = o0; ob < o1; ob += 4 * (R)) {                                                           \
        oe = o1 - ob < 4 * (R) ? o1 : ob + 4 * (R);                                                       \
        for (o = ob; o < oe; o += (R)) {                                                                  \
            __m512 acc[R][NV];                                                                            \
            PK_STEP_ROWS(const char *, oe, R);                                                            \
            for (r = 0; r < (R); r++)                                                                     \
                for (v = 0; v < (NV); v++) acc[r][v] = _mm512_setzero_ps();                               \
            for (b0 = 0; b0 < nb; b0 += PK_VN_KB) {                                                       \
                be = nb - b0 < PK_VN_KB ? nb : b0 + PK_VN_KB;                                             \
                for (r = 0; r < (R); r++) /* decode blocks b0..be of the R rows into wb, as int16 */      \
                    for (b = b0; b < be; b++) {                                                           \
                        const int64_t left = in - b * PK_BLOCK; /* elements of the block in the row */    \
                        const char *p = wr[r] + b * PK_BLOCK;                                             \
                        __m256i c = left >= 32 ? _mm256_loadu_si256((const __m256i *)p)                   \
                                               : _mm256_maskz_loadu_epi8((__mmask32)((1u << left) - 1u), p); \
                        if (!(b & 1)) {                                                                   \
                            _mm_prefetch(p + PK_PF, _MM_HINT_T0);                                         \
                            _mm_prefetch(nx[r] + b * PK_BLOCK, _MM_HINT_T1);                              \
                        }                                                                                 \
                        _mm512_store_si512((void *)(wb + (r * PK_VN_KB + (b - b0)) * 16), _mm512_cvtepi8_epi16(c)); \
                    }                                                                                     \
                for (b = b0; b < be; b++) {                                                               \
                    __m512i ai[R][NV], xv[NV];                                                            \
                    __m512 dv[NV];                                                                        \
                    for (r = 0; r < (R); r++)                                                             \
                        for (v = 0; v < (NV); v++) ai[r][v] = _mm512_setzero_si512();                     \
                    PK_VW_UNROLL                                                                          \
                    for (pr = 0; pr < 16; pr++) {                                                         \
                        const uint32_t *xk = xg + (b * 16 + pr) * gw;                                     \
                        for (v = 0; v < (NV); v++) xv[v] = _mm512_loadu_si512((const void *)(xk + 16 * v)); \
                        for (r = 0; r < (R); r++) {                                                       \
                            const __m512i bw = _mm512_set1_epi32((int)wb[(r * PK_VN_KB + (b - b0)) * 16 + pr]); \
                            for (v = 0; v < (NV); v++) ai[r][v] = _mm512_dpwssd_epi32(ai[r][v], bw, xv[v]); \
                        }                                                                                 \
                    }                                                                                     \
                    for (v = 0; v < (NV); v++) dv[v] = _mm512_loadu_ps(dg + b * gw + 16 * v);             \
                    for (r = 0; r < (R); r++) {                                                           \
                        const __m512 s = _mm512_set1_ps(sr[r][b]);                                        \
                        for (v = 0; v < (NV); v++)                                                        \
                            acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r][v]), _mm512_mul_ps(dv[v], s), \
                                                        acc[r][v]);                                       \
                    }                                                                                     \
                }                                                                                         \
            }                                                                                             \
            PK_YB_SCATTER(R, NV);                                                                         \
        }                                                                                                 \
        for (t = 0; t < nn; t++)                                                                          \
            memcpy(j->y + (t0 + t) * j->out + ob, yb + t * 4 * (R), sizeof(float) * (size_t)(oe - ob));   \
        }                                                                                                 \
    }
/* R x NV: 10 x 1, 6 x 2, 4 x 3 (as the VNNI kernel; 49..64 rows as 32 + the rest), the 16 pairs of a block unrolled
 * (PK_VW_UNROLL: gcc 12 otherwise kept the loop and copied every int32 accumulator between registers each pair, 2
 * moves per vpdpwssd; unrolled +10-20 %). Measured GOP/s on [1408, 2048] and [2048, 1408], 2 threads, AMD EPYC Zen
 * 5, best of 4 calls x 2 runs, +-5 % between runs, at 10 / 12 / 16 / 32 / 48 / 64 / 512 rows: 10/6/4 295-307 /
 * 356-365 / 468-483 / 589-609 / 569-608 / 532-589 / 573-597; 12/7/5 287-308 / 342-369 / 449-484 / 581-602 / 580-635 /
 * 538-598 / 582-615; 14/6/4 288-299 / 345-358 / 453-474 / 583-612 / 565-636 / 532-591 / 572-597. Not unrolled, 10/6/4:
 * 269-279 / 317-361 / 417-477 / 471-546 / 507-589 / 461-556 / 494-559 (8/5/3: 48 rows 345). (-D for measurements.) */
#ifndef PK_VW_R1
#define PK_VW_R1 10
#define PK_VW_R2 6
#define PK_VW_R3 4
#endif
PK_VW_KERNEL(vnni16_1_avx512, PK_VW_R1, 1)
PK_VW_KERNEL(vnni16_2_avx512, PK_VW_R2, 2)
PK_VW_KERNEL(vnni16_3_avx512, PK_VW_R3, 3)
#undef PK_VW_KERNEL

/* Rows t0 .. t0 + nn (nn <= 48, inside one group) of x against the weight rows [o0, o1), NV = ceil(nn / 16): the
 * int16 kernel (Q8_32, A_I16) or the int8 one (Q8_32 / Q4_32, A_I8). */
static void vnni_part(const pk_job *j, int64_t o0, int64_t o1, int64_t t0, int64_t nn) {
    const int q8 = j->fmt == F_Q8, i16 = j->act == A_I16;
    switch ((nn + 15) / 16) {
    case 1: (i16 ? vnni16_1_avx512 : q8 ? vnni_q8_1_avx512 : vnni_q4_1_avx512)(j, o0, o1, t0, nn); break;
    case 2: (i16 ? vnni16_2_avx512 : q8 ? vnni_q8_2_avx512 : vnni_q4_2_avx512)(j, o0, o1, t0, nn); break;
    default: (i16 ? vnni16_3_avx512 : q8 ? vnni_q8_3_avx512 : vnni_q4_3_avx512)(j, o0, o1, t0, nn); break;
    }
}

/* Rows of x the int16 batch kernel runs: a vector of 16 rows costs it about the same however many of them are real,
 * so past the first vector the rows beyond the last multiple of 16 go to the row kernel when they are fewer than
 * PK_VNNI16_REM (e.g. 17 rows: 16 + 1 on the row kernel rather than two vectors). GOP/s in linear.C_VNNI16_MIN. */
#ifndef PK_VNNI16_REM
#define PK_VNNI16_REM 5
#endif
static int64_t vnni16_split(const pk_job *j) {
    const int64_t rem = j->n % 16;
    return j->n < 16 || rem >= PK_VNNI16_REM ? j->n : j->n - rem;
}

/* Rows [0, n) of x in groups of up to PK_TN_GROUP (64), each group a pass over the weight rows [o0, o1); 49..64 rows
 * of a group as two passes of <= 32 (see the int8 kernel's measurements). n: the job's rows (int8), or the rows the
 * int16 kernel takes (nbatch: vnni16_split). */
static void vnni_rows(const pk_job *j, int64_t o0, int64_t o1, int64_t n) {
    int64_t t0;
    for (t0 = 0; t0 < n; t0 += PK_TN_GROUP) {
        const int64_t nn = n - t0 < PK_TN_GROUP ? n - t0 : PK_TN_GROUP;
        if (nn > 48) {
            vnni_part(j, o0, o1, t0, 32);
            vnni_part(j, o0, o1, t0 + 32, nn - 32);
        } else {
            vnni_part(j, o0, o1, t0, nn);
        }
    }
}
#endif

#if PK_X86
/* Q8_32 / Q4_32 weights x int8 activations, batches at the AVX2 level (A_I8 with >= PK_AVX2B_MIN_Q8 / _Q4 rows of x:
 * prefill, the MoE's per-expert batches; twins ref.matmul_act_q8 / matmul_act_q4). Why: the AVX2 class (AMD Zen 3:
 * no AVX-512, no AVX-VNNI) ran prefill on the per-row kernels (tile_act_avx2), which re-decode each weight row per 4
 * rows of x and pay a vpmaddwd + convert + FMA (and a horizontal sum per output) for every 32 products, and past
 * SMALL_N_ACT_AVX2 rows on widened tiles + sgemm. This is the VNNI kernel's scheme (vnni_rows) without vpdpbusd: x
 * quantized and packed once per job by vnni_pack_group (the same codes and block scales as the row kernels), a ymm
 * holding 8 rows of x x 4 consecutive k bytes, and each 4-byte group ("quad") of a weight row broadcast against it.
 * Operands and exactness: vpmaddubsw multiplies UNSIGNED bytes (first operand) by SIGNED bytes (second) and adds
 * adjacent pairs into int16 lanes WITH SATURATION; x codes are -127..127 (quant_act_row clamps to +-127). So:
 *  - Q4: the codes 0..15 are unsigned as stored: |pair| <= 2 * 15 * 127 = 3810 (no saturation). The 8 quads of a
 *    block add into the same int16 lanes (vpaddw), each lane then summing 8 pairs: |.| <= 8 * 3810 = 30480 < 32767,
 *    so no add wraps either; one vpmaddwd by 1 widens each row's two lanes to int32 (= dot(code, x) of the block),
 *    and adding the packed correction -8 * sum(x block) gives dot(code - 8, x) exactly.
 *  - Q8: the row kernels' sign trick: |w| as the unsigned operand (vpabsb; -128 gives 0x80, read as 128) and x with
 *    w's sign applied (vpsignb: -x, 0 or x; no overflow as |x| <= 127): |pair| = |w1 x1 + w2 x2| <= 2 * 128 * 127 =
 *    32512 < 32767, each quad widened at once (vpmaddwd by 1) and summed in int32.
 * A block's dot is then the exact integer, |.| <= 32 * 128 * 127 < 2^24, so exact in f32; per block y += float(dot) *
 * (dx * dw) with an FMA, per row of x in block order, as vnni_rows: the twin's f32 terms in another order (tests hold
 * it to the row kernels' tolerance, tests/test_vnni_batch.py).
 * Weights: the R rows of a step are decoded PK_AB_KB blocks at a time into an L1 buffer, from which every pass over
 * the group's rows of x (8 at a time) broadcasts the quads: per pair of Q4 blocks [low nibbles of b | of b + 1 | high
 * nibbles of b | of b + 1] (two ands and a shift per 32 bytes; x is packed in the matching q4_even_odd order); Q8:
 * the bytes and their absolute values. The f32 accumulators of a pass are kept in ab between chunks. */
#define PK_AB_KB 32 /* weight blocks (of 32) decoded per chunk into the L1 buffer */

PK_AVX2_INLINE __m256i bcast32(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Weight rows [o0, o1) against the rows t0 .. t0 + nn (nn <= 64) of the group starting at t0 (it may hold more, which
 * the row kernels take: avx2b_split): steps of R weight rows
 * (rows past o1 repeat row o1 - 1: read, not stored), per chunk of PK_AB_KB blocks the R rows decoded into wb / wa,
 * then passes of 8 rows of x: per quad one load of x and R broadcasts for R vpmaddubsw (Q8: + R vpsignb, vpmaddwd,
 * vpaddd); per block R (widen, correct, convert, multiply the scales, FMA). FMT: F_Q8 or F_Q4. */
#ifndef PK_AB_UNROLL
#define PK_AB_UNROLL _Pragma("GCC unroll 8")
#endif
#ifndef PK_AB_PIN
#define PK_AB_PIN(x) __asm__("" : "+x"(x))
#endif
#define PK_AB_KERNEL(NAME, FMT, R, NV)                                                                       \
    static PK_HOT PK_AVX2 void NAME(const pk_job *j, int64_t o0, int64_t o1, int64_t t0, int64_t nn) {     \
        const int64_t gn = j->n - t0 < PK_TN_GROUP ? j->n - t0 : PK_TN_GROUP; /* rows packed in the group */ \
        const int64_t in = j->in, nb = j->nb, gw = 16 * ((gn + 15) / 16), nv = (nn + 7) / 8;               \
        const uint32_t *xg = j->xp + (t0 / PK_TN_GROUP) * vnni_group_elems(nb);                            \
        const float *dg = (const float *)(xg + nb * 8 * gw);                                                \
        const int32_t *cg = (const int32_t *)(dg + nb * gw);                                                \
        const int64_t wrow = PK_AB_KB * 32; /* bytes of a row in wb / wa: 32 codes a block */               \
        uint8_t wb[(R) * PK_AB_KB * 32] __attribute__((aligned(32)));                                       \
        uint8_t wa[((FMT) == F_Q8 ? (R) : 1) * PK_AB_KB * 32] __attribute__((aligned(32)));                 \
        float ab[(R) * PK_TN_GROUP] __attribute__((aligned(32)));                                           \
        const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);                             \
        int64_t o, b0, be, b, v, t;                                                                         \
        int r, u, qd;                                                                                       \
        for (o = o0; o < o1; o += (R)) {                                                                    \
            PK_STEP_ROWS(const uint8_t *, o1, R);                                                           \
            for (b0 = 0; b0 < nb; b0 += PK_AB_KB) {                                                         \
                be = nb - b0 < PK_AB_KB ? nb : b0 + PK_AB_KB;                                               \
                for (r = 0; r < (R); r++) { /* decode blocks b0..be of the R rows */                        \
                    uint8_t *dst = wb + r * wrow;                                                           \
                    if ((FMT) == F_Q4) {                                                                    \
                        for (b = b0; b < be; b += 2) {                                                      \
                            const uint8_t *p = wr[r] + b * (PK_BLOCK / 2);                                  \
                            __m256i c, lo, hi;                                                              \
                            if ((b + 2) * PK_BLOCK <= in) {                                                 \
                                c = _mm256_loadu_si256((const __m256i *)p);                                 \
                            } else { /* the last (partial) block(s): zero-padded, codes 0 against x = 0 */ \
                                uint8_t tmp[32] = {0};                                                      \
                                memcpy(tmp, p, (size_t)(j->row_bytes - b * (PK_BLOCK / 2)));                \
                                c = _mm256_loadu_si256((const __m256i *)tmp);                               \
                            }                                                                               \
                            _mm_prefetch((const char *)nx[r] + b * (PK_BLOCK / 2), _MM_HINT_T0);            \
                            lo = _mm256_and_si256(c, m4);                                                   \
                            hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m4);                             \
                            _mm256_store_si256((__m256i *)(dst + (b - b0) * 32), lo);                       \
                            _mm256_store_si256((__m256i *)(dst + (b - b0) * 32 + 32), hi);                  \
                        }                                                                                   \
                    } else {                                                                                \
                        for (b = b0; b < be; b++) {                                                         \
                            const uint8_t *p = wr[r] + b * PK_BLOCK;                                        \
                            __m256i c;                                                                      \
                            if ((b + 1) * PK_BLOCK <= in) {                                                 \
                                c = _mm256_loadu_si256((const __m256i *)p);                                 \
                            } else {                                                                        \
                                uint8_t tmp[32] = {0};                                                      \
                                memcpy(tmp, p, (size_t)(in - b * PK_BLOCK));                                \
                                c = _mm256_loadu_si256((const __m256i *)tmp);                               \
                            }                                                                               \
                            if (!(b & 1)) _mm_prefetch((const char *)nx[r] + b * PK_BLOCK, _MM_HINT_T0);    \
                            _mm256_store_si256((__m256i *)(dst + (b - b0) * 32), c);                        \
                            _mm256_store_si256((__m256i *)(wa + r * wrow + (b - b0) * 32), _mm256_abs_epi8(c)); \
                        }                                                                                   \
                    }                                                                                       \
                }                                                                                           \
                for (v = 0; v < nv; v += (NV)) { /* a pass: rows 8 v .. 8 (v + NV) - 1 of the group */     \
                    __m256 acc[R][NV];                                                                      \
                    for (r = 0; r < (R); r++)                                                               \
                        for (u = 0; u < (NV); u++)                                                          \
                            acc[r][u] = b0 == 0 ? _mm256_setzero_ps()                                       \
                                                : _mm256_load_ps(ab + r * PK_TN_GROUP + 8 * (v + u));       \
                    for (b = b0; b < be; b++) {                                                             \
                        const uint32_t *xk = xg + b * 8 * gw + 8 * v;                                       \
                        __m256i s[R][NV];                                                                   \
                        PK_AB_UNROLL                                                                        \
                        for (qd = 0; qd < 8; qd++) {                                                        \
                            __m256i xv[NV];                                                                 \
                            for (u = 0; u < (NV); u++)                                                      \
                                xv[u] = _mm256_loadu_si256((const __m256i *)(xk + qd * gw + 8 * u));        \
                            for (r = 0; r < (R); r++) {                                                     \
                                if ((FMT) == F_Q4) {                                                        \
                                    const int64_t off = ((b - b0) >> 1) * 64 + ((b - b0) & 1) * 16 +        \
                                                        (qd & 3) * 4 + (qd >> 2) * 32;                      \
                                    const __m256i bw = bcast32(wb + r * wrow + off);                        \
                                    for (u = 0; u < (NV); u++) {                                            \
                                        const __m256i p = _mm256_maddubs_epi16(bw, xv[u]);                  \
                                        s[r][u] = qd ? _mm256_add_epi16(s[r][u], p) : p;                    \
                                    }                                                                       \
                                } else {                                                                    \
                                    const int64_t off = (b - b0) * 32 + qd * 4;                             \
                                    const __m256i bw = bcast32(wb + r * wrow + off), ba = bcast32(wa + r * wrow + off); \
                                    for (u = 0; u < (NV); u++) {                                            \
                                        const __m256i p = _mm256_madd_epi16(                                \
                                            _mm256_maddubs_epi16(ba, _mm256_sign_epi8(xv[u], bw)), ones);   \
                                        s[r][u] = qd ? _mm256_add_epi32(s[r][u], p) : p;                    \
                                    }                                                                       \
                                }                                                                           \
                            }                                                                               \
                            for (r = 0; r < (R); r++)                                                       \
                                for (u = 0; u < (NV); u++) PK_AB_PIN(s[r][u]);                              \
                        }                                                                                   \
                        for (u = 0; u < (NV); u++) {                                                        \
                            const __m256 dv = _mm256_loadu_ps(dg + b * gw + 8 * (v + u));                   \
                            if ((FMT) == F_Q4) {                                                            \
                                const __m256i cv = _mm256_loadu_si256((const __m256i *)(cg + b * gw + 8 * (v + u))); \
                                for (r = 0; r < (R); r++)                                                   \
                                    s[r][u] = _mm256_add_epi32(_mm256_madd_epi16(s[r][u], ones), cv);       \
                            }                                                                               \
                            for (r = 0; r < (R); r++)                                                       \
                                acc[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][u]),                    \
                                                            _mm256_mul_ps(dv, _mm256_set1_ps(sr[r][b])), acc[r][u]); \
                        }                                                                                   \
                    }                                                                                       \
                    for (r = 0; r < (R); r++)                                                               \
                        for (u = 0; u < (NV); u++) _mm256_store_ps(ab + r * PK_TN_GROUP + 8 * (v + u), acc[r][u]); \
                }                                                                                           \
            }                                                                                               \
            for (t = 0; t < nn; t++)                                                                        \
                for (r = 0; r < rr; r++) j->y[(t0 + t) * j->out + o + r] = ab[r * PK_TN_GROUP + t];         \
        }                                                                                                   \
    }
/* R x NV (weight rows x vectors of 8 rows of x per pass): Q4 8 x 1, Q8 5 x 1. Measured GOP/s on [1408, 2048] at the
 * AVX2 level (PYKIMI_SIMD=avx2 on an AMD EPYC Zen 5, ONE thread, best of 7, two alternations, +-5 %), 16 / 64 / 512
 * rows: Q4 R = 4: 183-188 / 174-177 / 172, 6: 185-192 / 175-179 / 178, 8: 214-219 / 222-229 / 222-228, 10: 185 / 191 /
 * 185-193, 12: 168-171 / 175-179 / 174-178; 4 x 2: 211-220 / 221-222 / 221-225 (but 8 rows: 110 against 190 for 8 x
 * 1: half of each pass padding); 6 x 2: 177-189 / 178-190 / 177-184; Q8 R = 3: 139-141 / 146-152 / 147-152 (as 4),
 * 4: 153-158 / 166-171 / 166, 5: 161-165 / 178-179 / 172-179, 6: 156 / 168-170 / 166-169, 8: 153-157 / 168-171 /
 * 165-170; 3 x 2: 172-173 / 179-181 / 176-177 (8 rows 87 against 135-145), 2 x 2: 142 / 149-154 / 129-150. The
 * accumulators of R > 6 do not all fit the 16 ymm (GCC keeps some on the stack), which costs less than the
 * extra x loads and broadcasts of a smaller R. The rows of a pass are 8 (NV 1) so that no pass is padded beyond the
 * last vector: the even-NV variants lost half their speed at 8 rows. (R measured before the unroll below.)
 * The quad loop is unrolled (PK_AB_UNROLL) with each quad's sums pinned to registers (PK_AB_PIN, an empty asm; the
 * sums are exact integers, so any order gives the same bits). gcc 12 kept the loop rolled, with a register move per
 * vpmaddubsw (the "qd ? add : p" select) and one sum through the stack per quad; unrolled alone it re-associated the
 * 8-term add chains into trees, all 64 (Q4) products live and spilled, slower than rolled (Q4, [1408, 2048], 2
 * threads, 8 / 64 / 512 rows: 282-289 / 358-362 / 374-381 against 302-344 / 395-417 / 417-440); pinned, a quad is one
 * load of x and R (broadcast, vpmaddubsw, add), no moves, no spills. GOP/s rolled -> unrolled + pinned, [1408, 2048],
 * ONE thread (best of 3, 2-3 alternating runs), 8 / 16 / 64 / 512 rows: Q4 199-203 / 217-221 / 226-228 / 230-235 ->
 * 243-246 / 280-281 / 303 / 282-286, Q8 140-142 / 156-157 / 163-168 / 165-166 -> 149-151 / 171-174 / 187-189 /
 * 180-183; two threads Q4 299-352 / 349-394 / 391-404 / 418-438 -> 362-401 / 446-477 / 499-508 / 523-538, Q8 227-247 /
 * 263-273 / 286-294 / 297-309 -> 243-256 / 299-305 / 327-329 / 333-337 ([2048, 1408] alike; more in linear.py,
 * C_VNNI_MIN_AVX2). */
PK_AB_KERNEL(avx2b_q4, F_Q4, 8, 1)
PK_AB_KERNEL(avx2b_q8, F_Q8, 5, 1)
#undef PK_AB_KERNEL

/* Rows [0, nbatch) of x in groups of up to PK_TN_GROUP (64), each group a pass over the weight rows [o0, o1). */
static void avx2b_rows(const pk_job *j, int64_t o0, int64_t o1) {
    int64_t t0;
    for (t0 = 0; t0 < j->nbatch; t0 += PK_TN_GROUP) {
        const int64_t nn = j->nbatch - t0 < PK_TN_GROUP ? j->nbatch - t0 : PK_TN_GROUP;
        (j->fmt == F_Q8 ? avx2b_q8 : avx2b_q4)(j, o0, o1, t0, nn);
    }
}

/* Rows of x the AVX2 batch kernel runs: a vector of 8 rows costs it the same however many of them are real rows,
 * so the rows past the last multiple of 8 go to the row kernels when they are fewer than the format's minimum -- the
 * same break-even that decides whether a job of fewer than 8 rows runs the kernel at all (PK_AVX2B_MIN_Q8 / _Q4).
 * E.g. Q8, 9 rows: 8 + 1 row on the row kernels rather than two vectors (GOP/s in linear.C_VNNI_MIN_AVX2). */
static int64_t avx2b_split(const pk_job *j) {
    const int64_t rem = j->n % 8;
    return rem >= vnni_min_level(j->fmt, 1) ? j->n : j->n - rem;
}

/* Q8_32 weights x int16 activations, batches at the AVX2 level (A_I16 -- the default mode's Q8 -- with >=
 * PK_AVX2W_MIN_Q8 rows of x: prefill, the MoE's per-expert batches; twin ref.matmul_act16_q8). Why: the AVX2 class
 * (AMD Zen 3: no AVX-512, no AVX-VNNI) ran the default mode's Q8 batches on the int16 row kernel (tile_q8w_avx2),
 * which re-widens each weight row per 4 rows of x, loads a vector of x per vpmaddwd and pays a convert + FMA per 16
 * products and a horizontal sum per output, and past SMALL_N_ACT rows on widened tiles + sgemm. This is the AVX-512
 * int16 kernel's scheme (PK_VW_KERNEL) on AVX2 instructions: the same packed x (vnni16_pack_group: the row kernel's
 * int16 codes and block scales, one int16 pair of consecutive k per row of x in a uint32) read 8 rows to a ymm; the
 * weight rows widened to int16 PK_AW_KB blocks at a time into an L1 buffer, each pair of consecutive codes broadcast
 * (32 bits) against the vector of x: vpmaddwd (vpdpwssd without the accumulate) + vpaddd, 16 of each per block per
 * (weight row, vector of x), signed x signed as there (no offset correction).
 * Exactness, as PK_VW_KERNEL: a vpmaddwd lane is w1 x1 + w2 x2 with |.| <= 2 * 128 * 32767 = 8388352 (its one
 * saturating case, both products -32768 * -32768, cannot occur: x codes are -32767..32767), and the int32 sum of a
 * block's 16 pairs stays within 32 * 128 * 32767 = 134213632 < 2^31 at every partial sum: the block dot is the exact
 * integer (the twin's int64 dot), whatever the order of the vpaddd. Only then is it converted: per block y +=
 * float(dot) * (dx * dw) with an FMA, per row of x in block order, float(dot) the twin's dots.astype(float32) (one
 * rounding to nearest; |dot| may pass 2^24) and the rest the twin's sum of the same f32 terms in another order (tests
 * hold it to the row kernel's tolerance, tests/test_vnni16.py). Padding: the x codes past `in` are 0
 * (quant_act16_row), the codes of a partial last weight block are copied into a zeroed buffer (no read past the row),
 * padded rows of x are all 0.
 * Measured (PYKIMI_SIMD=avx2 on an AMD EPYC Zen 5, 2 threads; details below and in linear.C_VNNI16_MIN_AVX2): 240-350
 * GOP/s from 8 to 512 rows against 185-225 for the row kernel / widened tiles it replaces; 4-layer int8 prefill of 64
 * / 128 / 512 tokens 238 / 254 / 267 -> 323 / 382 / 379 tok/s. */
#ifndef PK_AW_KB
#define PK_AW_KB 16 /* weight blocks (of 32) widened per chunk into the L1 buffer: 64 bytes a block and row */
#endif
#ifndef PK_AW_UNROLL
#define PK_AW_UNROLL _Pragma("GCC unroll 16")
#endif

/* Weight rows [o0, o1) against the rows t0 .. t0 + nn (nn <= 64) of the group starting at t0 (as PK_AB_KERNEL: steps
 * of R weight rows, the rows past o1 repeating row o1 - 1, read, not stored; passes of 8 NV rows of x, whose f32
 * accumulators stay in ab between chunks): per pair NV loads of x and R broadcasts for R * NV (vpmaddwd, vpaddd);
 * per block R * NV (convert, multiply the scales, FMA). */
#define PK_AW_KERNEL(NAME, R, NV)                                                                                    \
    static PK_HOT PK_AVX2 void NAME(const pk_job *j, int64_t o0, int64_t o1, int64_t t0, int64_t nn) {               \
        const int64_t gn = j->n - t0 < PK_TN_GROUP ? j->n - t0 : PK_TN_GROUP; /* rows packed in the group */         \
        const int64_t in = j->in, nb = j->nb, gw = 16 * ((gn + 15) / 16), nv = (nn + 7) / 8;                         \
        const uint32_t *xg = j->xp + (t0 / PK_TN_GROUP) * vnni16_group_elems(nb);                                    \
        const float *dg = (const float *)(xg + nb * 16 * gw);                                                        \
        int16_t wb[(R) * PK_AW_KB * 32] __attribute__((aligned(32))); /* [r][block][32 codes] */                     \
        float ab[(R) * PK_TN_GROUP] __attribute__((aligned(32)));                                                    \
        int64_t o, b0, be, b, v, t;                                                                                  \
        int r, u, pr;                                                                                                \
        for (o = o0; o < o1; o += (R)) {                                                                             \
            PK_STEP_ROWS(const int8_t *, o1, R);                                                                     \
            for (b0 = 0; b0 < nb; b0 += PK_AW_KB) {                                                                  \
                be = nb - b0 < PK_AW_KB ? nb : b0 + PK_AW_KB;                                                        \
                for (r = 0; r < (R); r++) /* widen blocks b0..be of the R rows to int16 */                           \
                    for (b = b0; b < be; b++) {                                                                      \
                        const int8_t *p = wr[r] + b * PK_BLOCK;                                                      \
                        int16_t *dst = wb + (r * PK_AW_KB + (b - b0)) * 32;                                          \
                        __m128i c0, c1;                                                                              \
                        if ((b + 1) * PK_BLOCK <= in) {                                                              \
                            c0 = _mm_loadu_si128((const __m128i *)p);                                                \
                            c1 = _mm_loadu_si128((const __m128i *)(p + 16));                                         \
                        } else { /* the partial last block: zero-padded, codes 0 against x = 0 */                    \
                            int8_t tmp[32] = {0};                                                                    \
                            memcpy(tmp, p, (size_t)(in - b * PK_BLOCK));                                             \
                            c0 = _mm_loadu_si128((const __m128i *)tmp);                                              \
                            c1 = _mm_loadu_si128((const __m128i *)(tmp + 16));                                       \
                        }                                                                                            \
                        if (!(b & 1)) _mm_prefetch((const char *)(nx[r] + b * PK_BLOCK), _MM_HINT_T0);               \
                        _mm256_store_si256((__m256i *)dst, _mm256_cvtepi8_epi16(c0));                                \
                        _mm256_store_si256((__m256i *)(dst + 16), _mm256_cvtepi8_epi16(c1));                         \
                    }                                                                                                \
                for (v = 0; v < nv; v += (NV)) { /* a pass: rows 8 v .. 8 (v + NV) - 1 of the group */               \
                    __m256 acc[R][NV];                                                                               \
                    for (r = 0; r < (R); r++)                                                                        \
                        for (u = 0; u < (NV); u++)                                                                   \
                            acc[r][u] = b0 == 0 ? _mm256_setzero_ps()                                                \
                                                : _mm256_load_ps(ab + r * PK_TN_GROUP + 8 * (v + u));                \
                    for (b = b0; b < be; b++) {                                                                      \
                        const uint32_t *xk = xg + b * 16 * gw + 8 * v;                                               \
                        const int16_t *wk = wb + (b - b0) * 32;                                                      \
                        __m256i s[R][NV];                                                                            \
                        PK_AW_UNROLL                                                                                 \
                        for (pr = 0; pr < 16; pr++) {                                                                \
                            __m256i xv[NV];                                                                          \
                            for (u = 0; u < (NV); u++)                                                               \
                                xv[u] = _mm256_loadu_si256((const __m256i *)(xk + pr * gw + 8 * u));                 \
                            for (r = 0; r < (R); r++) {                                                              \
                                const __m256i bw = bcast32((const uint8_t *)(wk + r * PK_AW_KB * 32 + 2 * pr));      \
                                for (u = 0; u < (NV); u++) {                                                         \
                                    const __m256i p = _mm256_madd_epi16(bw, xv[u]);                                  \
                                    s[r][u] = pr ? _mm256_add_epi32(s[r][u], p) : p;                                 \
                                }                                                                                    \
                            }                                                                                        \
                            for (r = 0; r < (R); r++)                                                                \
                                for (u = 0; u < (NV); u++) PK_AB_PIN(s[r][u]);                                       \
                        }                                                                                            \
                        for (u = 0; u < (NV); u++) {                                                                 \
                            const __m256 dv = _mm256_loadu_ps(dg + b * gw + 8 * (v + u));                            \
                            for (r = 0; r < (R); r++)                                                                \
                                acc[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][u]),                             \
                                                            _mm256_mul_ps(dv, _mm256_set1_ps(sr[r][b])), acc[r][u]); \
                        }                                                                                            \
                    }                                                                                                \
                    for (r = 0; r < (R); r++)                                                                        \
                        for (u = 0; u < (NV); u++) _mm256_store_ps(ab + r * PK_TN_GROUP + 8 * (v + u), acc[r][u]);   \
                }                                                                                                    \
            }                                                                                                        \
            for (t = 0; t < nn; t++)                                                                                 \
                for (r = 0; r < rr; r++) j->y[(t0 + t) * j->out + o + r] = ab[r * PK_TN_GROUP + t];                  \
        }                                                                                                            \
    }
/* R x NV: 10 x 1, PK_AW_KB 16. Measured GOP/s on [1408, 2048] at the AVX2 level (PYKIMI_SIMD=avx2 on an AMD EPYC Zen
 * 5, gcc 12), ONE thread, best of 3 rounds x 2 runs, 8 / 16 / 64 / 512 rows: NV 1, R = 4: 139-143 / 160-166 / 157-164
 * / 153-163, 5: 141-148 / 167-172 / 168-177 / 168-176, 6: 141-147 / 167-173 / 176-184 / 175-184, 7: 145-150 / 169-176 /
 * 185-186 / 180-187, 8: 144-148 / 169-174 / 179-183 / 177-186, 10: 152-153 / 178 / 188-189 / 187; NV 2: 3 x 2 88-92 /
 * 174-183 / 186-194 / 184-194, 4 x 2 89-93 / 176-184 / 191-200 / 190-200 (8 rows: half of each pass padding, as in
 * PK_AB_KERNEL). Two threads, [1408, 2048] | [2048, 1408]: R = 5: 239-260 / 293-308 / 297-310 / 306-330 | 242-266 /
 * 286-310 / 312-326 / 318-329; 7 (KB 32): 265 / 313-314 / 328-334 / 350-361 | 267-269 / 313-315 / 343-344 / 348-356;
 * 10: 266-268 / 318-319 / 332-334 / 348-354 | 272 / 323 / 354-356 / 365; 10 (KB 32): 265-280 / 313-330 / 330-343 /
 * 349-368 | 267-284 / 320-335 / 354-371 / 364-376; 12 (KB 32): 244-256 / 291-305 / 306-321 / 320-331 | 263-269 /
 * 311-323 / 351-360 / 356-368. The int16 row kernel it replaces: ~95 GOP/s on one thread, ~185 on two (more in
 * linear.C_VNNI16_MIN_AVX2). At R = 10 the 10 int32 sums, x and the broadcast stay in registers through the 16
 * unrolled pairs (objdump: 160 vpmaddwd, 150 vpaddd a block, no vector spill); 6 of the 10 f32 accumulators sit on the
 * stack, touched once per block (a memory-operand FMA), which costs less than the x loads a smaller R repeats per
 * weight row. KB 16 rather than 32 (alike here): a chunk's weights (10 rows x 16 blocks x 64 bytes) and x (8 KB per
 * pass) stay within the 32 KB L1d of Zen 3, the AVX2 class's own CPU. (-D for measurements.) */
#ifndef PK_AW_R
#define PK_AW_R 10
#define PK_AW_NV 1
#endif
PK_AW_KERNEL(avx2w_q8, PK_AW_R, PK_AW_NV)
#undef PK_AW_KERNEL

/* Rows [0, nbatch) of x in groups of up to PK_TN_GROUP (64), each group a pass over the weight rows [o0, o1). */
static void avx2w_rows(const pk_job *j, int64_t o0, int64_t o1) {
    int64_t t0;
    for (t0 = 0; t0 < j->nbatch; t0 += PK_TN_GROUP)
        avx2w_q8(j, o0, o1, t0, j->nbatch - t0 < PK_TN_GROUP ? j->nbatch - t0 : PK_TN_GROUP);
}

/* Rows of x the AVX2 int16 kernel runs: a vector of 8 rows costs it the same however many of them are real, so past
 * the first vector the rows beyond the last multiple of 8 go to the row kernel when they are fewer than PK_AVX2W_REM
 * (e.g. 12 rows: 8 + 4 on the row kernel rather than two vectors). Measured GOP/s (as PK_AW_KERNEL's R x NV; [1408,
 * 2048] | [2048, 1408]), rows 8k + m split at m < 4 / 5 / 6: ONE thread 12: 129-133 / 127 / 127-131 | 128-132 /
 * 126-128 / 127, 13: 138-144 / 139 / 121-126 | 138-143 / 139-140 / 121-122, 21: 151-156 / 151-152 / 137-139 |
 * 153-158 / 154-155 / 140-143, 29: 162-167 / 162-163 / 151-157 | 163-164 / 163-169 / 157-158; two threads 12: 230-238 /
 * 233-238 / 234 | 234-243 / 236-240 / 235-236, 13: 251-258 / 255-260 / 222-224 | 254-263 / 256-261 / 225-227, 21:
 * 268-274 / 273-278 / 250-254 | 279-290 / 282-289 / 262-264: 5 rows are cheaper as a padded vector, 4 a tie. (The
 * minimum for a job, PK_AVX2W_MIN_Q8, is the break-even of one vector alone against the row kernel.) */
#ifndef PK_AVX2W_REM
#define PK_AVX2W_REM 5
#endif
static int64_t avx2w_split(const pk_job *j) {
    const int64_t rem = j->n % 8;
    return j->n < 8 || rem >= PK_AVX2W_REM ? j->n : j->n - rem;
}
#endif

#if PK_X86
/* Whether job j runs an exact batch kernel (f32 activations): at the AVX-512 level bf16_tn_avx512 for bf16 and f32
 * weights from PK_TN_MIN rows of x, Q8_32 from PK_TN_MIN_Q8 to PK_TN_MAX, unless AMX takes it (amx_prepare,
 * job_prepare); at the AVX2 level its twin bf16_tn_avx2 for bf16 weights from PK_TN_MIN_AVX2 rows. f32 weights take
 * the AVX-512 kernel so that a checkpoint stored in f32 gives the bits of the same values stored in bf16 (the vision
 * tower multiplies its mapped weights with it); at the AVX2 level they (and Q8_32) keep the row kernels / widened
 * tiles (not measured against the kernel). */
static int tn_takes(const pk_job *j, int simd) {
    if (simd < 1 || j->rows || j->act != A_F32 || j->in <= 0) return 0;
    if (simd == 1) return j->fmt == F_BF16 && j->n >= PK_TN_MIN_AVX2;
#if PK_HAVE_AMX
    if (j->n >= PK_AMX_MIN && (j->fmt == F_BF16 || (j->fmt == F_Q8 && j->n >= PK_AMX_MIN_Q8)) && pk_get_amx())
        return 0;
#endif
    if (j->fmt == F_BF16 || j->fmt == F_F32) return j->n >= PK_TN_MIN;
    return j->fmt == F_Q8 && j->n >= PK_TN_MIN_Q8 && j->n <= PK_TN_MAX;
}

/* floats of a job's packed x: in columns of 64 rows per group (the last group padded to 64 too) */
static int64_t tn_elems(const pk_job *j) { return j->in * PK_TN_GROUP * ((j->n + PK_TN_GROUP - 1) / PK_TN_GROUP); }

/* The 8 x 8 block r[i] (row i) transposed in place: r[c] = column c. */
PK_AVX2_INLINE void tr8x8(__m256 r[8]) {
    __m256 t[8], u[8];
    int i;
    for (i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);     /* per 128-bit lane: a0 b0 a1 b1 */
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]); /* a2 b2 a3 b3 */
    }
    for (i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);         /* a0 b0 c0 d0 */
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);     /* a1 b1 c1 d1 */
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44); /* a2 b2 c2 d2 */
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE); /* a3 b3 c3 d3 */
    }
    for (i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);     /* columns 0..3: the low lanes of rows 0-3, 4-7 */
        r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31); /* columns 4..7: the high lanes */
    }
}

/* tr_cols at the AVX2 level: dst[c * gw + t] = src[t * stride + c] (32-bit elements) for the rows t < gw (a multiple
 * of 8; the rows from nrows on as zeros) and the columns c < ncols, by 8 x 8 blocks transposed in registers (the
 * last columns' block by masked loads). The rows are prefetched PK_BD_XPF elements ahead. Why not a column at a time
 * (pack_cols' portable loop): x's rows are a power of two apart (2048 floats = 8 KiB), so a loop down one column
 * touches one L1 set for every row. */
static PK_AVX2 void tr8_cols(const uint32_t *src, int64_t stride, int64_t nrows, int64_t gw, int64_t ncols,
                             uint32_t *dst) {
    int64_t tb, c0;
    int i;
    for (tb = 0; tb < gw; tb += 8)
        for (c0 = 0; c0 < ncols; c0 += 8) {
            const int64_t left = ncols - c0, cols = left < 8 ? left : 8;
            const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)cols), /* lanes c < cols */
                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            __m256 r[8];
            for (i = 0; i < 8; i++) {
                const float *sr = (const float *)src + (tb + i) * stride + c0;
                if (tb + i < nrows && left > 2 * PK_BD_XPF) _mm_prefetch((const char *)(sr + PK_BD_XPF), _MM_HINT_T0);
                r[i] = tb + i >= nrows ? _mm256_setzero_ps()
                       : cols == 8     ? _mm256_loadu_ps(sr)
                                       : _mm256_maskload_ps(sr, m);
            }
            tr8x8(r);
            for (i = 0; i < cols; i++) _mm256_storeu_ps((float *)dst + (c0 + i) * gw + tb, r[i]);
        }
}

/* j->xp as floats = x per group of PK_TN_GROUP (64) rows: group g at g * in * 64, laid out [in][16 lanes per 16 rows
 * of the group], rows past n zero (the AVX2 kernel reads each 16 rows as two ymm). Why per group (it was one
 * [in][16 * ceil(n / 16)] array, transposed by a scalar loop before the threads started): the kernel's loads for
 * consecutive k were 4 * 16 ceil(n / 16) bytes apart, 512 at 128 rows, and the group's x spread over twice the lines;
 * [1408, 2048] on 2 threads ran 407 GFLOP/s at 64 rows but 276 at 128 (and the widened tiles + sgemm, 210-220, took
 * over from 113 rows). tr_cols / tr8_cols: rows past n as zeros (the pad). (Scattering each row's 16 elements down
 * the columns instead took ~0.9 ms for 512 x 2048 on 2 threads, 12 % of the product: a 16-element scatter costs ~50
 * cycles on AMD Zen 5.) */
static void tn_pack_group(const pk_job *j, int64_t g, int simd) {
    const int64_t in = j->in, t0 = g * PK_TN_GROUP;
    const int64_t nn = j->n - t0 < PK_TN_GROUP ? j->n - t0 : PK_TN_GROUP, gw = 16 * ((nn + 15) / 16);
#if PK_HAVE_AVX512
    if (simd >= 2) {
        tr_cols((const uint32_t *)(j->x + t0 * in), in, nn, gw, in, j->xp + g * in * PK_TN_GROUP);
        return;
    }
#endif
    (void)simd;
    tr8_cols((const uint32_t *)(j->x + t0 * in), in, nn, gw, in, j->xp + g * in * PK_TN_GROUP);
}
#endif

#if PK_X86
/* Jobs whose x is packed per group of 64 rows (xp): the AVX512_BF16 kernel's, the exact bf16 / Q8 batch kernel's
 * (f32 columns) and the int8 and int16 batch kernels'. */
static int xpack_takes(const pk_job *j, int simd) {
#if PK_HAVE_AVX512BF16
    if (bf16a_takes(j, simd)) return 1;
#endif
    if (tn_takes(j, simd)) return 1;
    if (vnni16_takes(j, simd)) return 1;
    return vnni_takes(j, simd);
}

static int64_t xpack_elems(const pk_job *j) {
    if (j->act == A_F32) return tn_elems(j);
#if PK_HAVE_AVX512BF16
    if (j->fmt == F_BF16) return bf16a_elems(j);
#endif
    if (j->act == A_I16) return vnni16_elems(j);
    return vnni_elems(j);
}

static void xpack_group(const pk_job *j, int64_t g, int simd) {
    if (j->act == A_F32) {
        tn_pack_group(j, g, simd);
        return;
    }
#if PK_HAVE_AVX512BF16
    if (j->fmt == F_BF16) {
        bf16a_pack_group(j, g);
        return;
    }
#endif
    if (j->act == A_I16) {
        vnni16_pack_group(j, g, simd);
        return;
    }
    vnni_pack_group(j, g, simd);
}

/* Pack x into j->xp (a slice run_jobs handed over, else its own allocation) for the batch kernel xpack_takes names;
 * 0 when there is no memory. */
static int xpack_prepare(pk_job *j, int simd) {
    const int64_t ng = (j->n + PK_TN_GROUP - 1) / PK_TN_GROUP;
    int64_t g;
    if (!j->xp) j->xp = (uint32_t *)pk_amalloc(sizeof(uint32_t) * (size_t)xpack_elems(j));
    if (!j->xp) return 0;
#pragma omp parallel for schedule(static) num_threads(pk_get_threads()) if (ng > 1)
    for (g = 0; g < ng; g++) xpack_group(j, g, simd);
    return 1;
}
#endif

#if PK_HAVE_AVX512
/* One row of x in row_q4a_avx512's order: per group g of 4 blocks, the even elements of blocks 0..3 (16 bytes
 * each) then their odd ones, and xcor[b] = -8 * sum(block b) * xd[b]. Why vector code: the byte loop it replaces
 * was ~1 us per job at in = 2048, paid serially before the parallel region by each of the ~25 one-row jobs a
 * decoder layer runs (the MoE's gate, up and down of 8 experts). Same bytes and the same floats as that loop:
 * a shuffle per 16 bytes ([evens | odds]) and a 64-bit permute gather the blocks' halves; the block sums are
 * exact integer sums (vpsadbw of x + 128, less 32 * 128). */
static PK_AVX512 void q4a_pack_avx512(const int8_t *xr, const float *xd, int64_t ng, int8_t *pr, float *xcor) {
    const __m512i eo = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    const __m512i qidx = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    int64_t g, k;
    int h;
    for (g = 0; g < ng; g++)
        for (h = 0; h < 2; h++) { /* blocks 4g + 2h and 4g + 2h + 1: 64 bytes */
            const __m512i v = _mm512_loadu_si512((const void *)(xr + g * 128 + h * 64));
            const __m512i p = _mm512_permutexvar_epi64(qidx, _mm512_shuffle_epi8(v, eo));
            int64_t q[8]; /* per 8 bytes: sum of (x + 128) */
            _mm512_storeu_si512((void *)q, _mm512_sad_epu8(_mm512_xor_si512(v, bias), _mm512_setzero_si512()));
            _mm256_storeu_si256((__m256i *)(pr + g * 128 + h * 32), _mm512_castsi512_si256(p));
            _mm256_storeu_si256((__m256i *)(pr + g * 128 + 64 + h * 32), _mm512_extracti64x4_epi64(p, 1));
            for (k = 0; k < 2; k++) {
                const int32_t sum = (int32_t)(q[4 * k] + q[4 * k + 1] + q[4 * k + 2] + q[4 * k + 3]) - 32 * 128;
                const int64_t b = 4 * g + 2 * h + k;
                xcor[b] = (float)(-8 * sum) * xd[b];
            }
        }
}
#endif

/* Quantize the activations the job's mode needs, in the layout the level's Q4 kernel reads; on allocation
 * failure fall back to the f32 path. */
static void job_prepare(pk_job *j, int simd) {
    const int64_t nb = j->nb, len = j->n * nb * PK_BLOCK;
    int64_t r0 = 0; /* the first row of x the row kernels take (> 0: the rest of an AVX2 int8 batch job) */
    if (j->act == A_BF16) {
        /* bf16 activations where the AVX512_BF16 kernel takes the job (bf16a_takes); otherwise -- or without
         * memory -- the exact f32 product */
#if PK_HAVE_AVX512BF16
        if (bf16a_takes(j, simd) && (j->xp_shared || xpack_prepare(j, simd))) return; /* xp_shared: packed by run_jobs */
#endif
        j->act = A_F32;
    }
    if (j->fmt != F_Q8 && j->fmt != F_Q4) j->act = A_F32;
    if (j->fmt == F_Q4 && j->act == A_I16) j->act = A_I8; /* no int16 x int4 kernel: int8 it is */
#if PK_X86
    if (vnni_takes(j, simd) && (j->xp_shared || xpack_prepare(j, simd))) { /* xp_shared: packed by run_jobs */
        if (simd >= 2) return;
        j->nbatch = avx2b_split(j);
        if (j->nbatch == j->n) return;
        r0 = j->nbatch; /* AVX2: the rows past nbatch on the row kernels, their activations quantized below */
    }
    if (vnni16_takes(j, simd) && (j->xp_shared || xpack_prepare(j, simd))) { /* xp_shared: run_jobs packed it */
#if PK_HAVE_AVX512
        j->nbatch = simd >= 2 ? vnni16_split(j) : avx2w_split(j);
#else
        j->nbatch = avx2w_split(j);
#endif
        if (j->nbatch == j->n) return;
        r0 = j->nbatch; /* the rows past nbatch on the int16 row kernel, their activations quantized below */
    }
#endif
#if PK_HAVE_AMX
    if (simd >= 2 && !j->rows && (j->fmt == F_BF16 || (j->fmt == F_Q8 && j->act == A_F32 && j->n >= PK_AMX_MIN_Q8)) &&
        j->n >= PK_AMX_MIN && j->in > 0 && pk_get_amx() && amx_prepare(j))
        return;
#endif
#if PK_X86
    if (tn_takes(j, simd) && (j->xp_shared || xpack_prepare(j, simd))) return; /* no memory: the row kernels */
#endif
    if (j->act == A_F32) return;
    {
        /* every buffer of the row kernels' activations in one allocation, each on a 64-byte boundary (a decoder
         * layer runs ~40 one-row jobs: 5 allocations and frees each were ~15 us a layer) */
        const int q4 = j->fmt == F_Q4 && j->act == A_I8 && simd >= 1, wide = q4 && simd >= 2;
        const size_t nbk = (size_t)(j->n * nb), sd = PK_UP64(nbk * sizeof(float) + 4),
                     sq = PK_UP64(j->act == A_I16 ? (size_t)len * sizeof(int16_t) + 4 : (size_t)len + 4),
                     sp = q4 ? PK_UP64((size_t)len + 4) : 0,
                     ss = q4 && !wide ? PK_UP64(nbk * sizeof(int32_t) + 4) : 0,
                     sds = wide ? PK_UP64(sizeof(float) * (nbk * 4 + 1)) : 0,
                     scor = wide ? PK_UP64(sizeof(float) * (nbk + 1)) : 0;
        char *b = (char *)pk_amalloc(sd + sq + sp + ss + sds + scor);
        if (!b) goto fail;
        j->abuf = b;
        j->xd = (float *)b;
        if (j->act == A_I16)
            j->xq16 = (int16_t *)(b + sd);
        else
            j->xq = (int8_t *)(b + sd);
        if (sp) j->xqp = (int8_t *)(b + sd + sq);
        if (ss) j->xs = (int32_t *)(b + sd + sq + sp);
        if (sds) j->xds = (float *)(b + sd + sq + sp);
        if (scor) {
            j->xcor = (float *)(b + sd + sq + sp + sds);
            memset(j->xcor, 0, scor);
        }
    }
    if (j->act == A_I16) {
        quant_act16_level(simd, j->x + r0 * j->in, j->n - r0, j->in, j->xq16 + r0 * nb * PK_BLOCK, j->xd + r0 * nb);
        return;
    }
    quant_act_level(simd, j->x + r0 * j->in, j->n - r0, j->in, j->xq + r0 * nb * PK_BLOCK, j->xd + r0 * nb);
    if (j->fmt == F_Q4 && simd == 1) {
        int64_t r, k;
        for (r = r0 * nb; r < j->n * nb; r++) { /* block r of all rows of x */
            const int8_t *src = j->xq + r * PK_BLOCK;
            int8_t *dst = j->xqp + r * PK_BLOCK;
            int32_t s = 0;
            for (k = 0; k < 16; k++) {
                dst[k] = src[2 * k];          /* even elements meet the low nibbles */
                dst[16 + k] = src[2 * k + 1]; /* odd elements meet the high nibbles */
                s += src[2 * k] + src[2 * k + 1];
            }
            j->xs[r] = s;
        }
    } else if (j->fmt == F_Q4 && simd >= 2) {
        /* Per group of 4 full blocks of each row of x: [even elements of blocks 0..3 | odd elements of
         * blocks 0..3], 16 bytes each (see row_q4a_avx512); blocks past the last full group are not read. */
        const int64_t ng = j->in / 128;
        int64_t t, k;
        for (k = 0; k < j->n * nb * 4; k++) j->xds[k] = j->xd[k / 4];
        for (t = 0; t < j->n; t++) {
            const int8_t *xr = j->xq + t * nb * PK_BLOCK;
            int8_t *pr = j->xqp + t * nb * PK_BLOCK;
#if PK_HAVE_AVX512
            q4a_pack_avx512(xr, j->xd + t * nb, ng, pr, j->xcor + t * nb);
#else
            int64_t g, e;
            for (g = 0; g < ng; g++)
                for (k = 0; k < 4; k++) {
                    const int8_t *src = xr + (4 * g + k) * PK_BLOCK;
                    int32_t s = 0;
                    for (e = 0; e < 16; e++) {
                        pr[g * 128 + k * 16 + e] = src[2 * e];
                        pr[g * 128 + 64 + k * 16 + e] = src[2 * e + 1];
                        s += src[2 * e] + src[2 * e + 1];
                    }
                    j->xcor[t * nb + 4 * g + k] = (float)(-8 * s) * j->xd[t * nb + 4 * g + k];
                }
#endif
        }
    }
    return;
fail:
    job_free(j);
    j->act = A_F32;
}

#define PK_RB 16 /* weight rows per tile: amortises the call, and stays in L1/L2 for the next x tile */

#if PK_HAVE_AVX512
/* bf16 or f32 (from 12 rows of x) or Q8_32 (24..128) weights x a batch (prefill: the tokens one expert got, or a dense
 * projection's). The row kernels above load a vector of x for every FMA and decode each weight row once per 4 rows
 * of x; here the batch is vectorised instead: x is packed once per call (tn_pack_group: per group of 64 rows,
 * [in][16 lanes per 16 rows]), a block of R weight rows is decoded to f32 KC columns at a time into an L1 buffer,
 * and each weight is broadcast against 16 rows of x per FMA, with R x NV accumulators of 16 lanes (NV = rows of x
 * / 16, at most 4 per group of 64 rows).
 * Per (row of x, weight row) the products are summed in k order in one f32 chain.
 * Results go through yb as in PK_BD_KERNEL (4 R weight rows x the group's rows of x, a masked scatter per
 * accumulator, then into y a row of x at a time): stored straight into y, a block's values for one row of x
 * landed 4 * out bytes apart, for out = 2048 all in one L1 set ([2048, 1408] ran 270 GFLOP/s at 64 rows against
 * 407 for [1408, 2048]). */

#define PK_TN_KERNEL(NAME, R, NV)                                                                          \
    static PK_AVX512 void NAME(const pk_job *j, int64_t o0, int64_t o1, int64_t t0, int64_t nn) {         \
        const int64_t in = j->in, gw = 16 * ((nn + 15) / 16);                                             \
        const float *xg = (const float *)j->xp + (t0 / PK_TN_GROUP) * in * PK_TN_GROUP; /* t0's group */  \
        float wbuf[(R) * PK_KC] __attribute__((aligned(64)));                                             \
        float yb[16 * (NV) * 4 * (R)] __attribute__((aligned(64))); /* [rows of x][4 R weight rows] */     \
        const __m512i yi = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), \
                                              _mm512_set1_epi32(4 * (R)));                                \
        int64_t o, ob, oe, k0, k, t;                                                                      \
        int r, v;                                                                                         \
        for (ob = o0; ob < o1; ob += 4 * (R)) {                                                           \
        oe = o1 - ob < 4 * (R) ? o1 : ob + 4 * (R);                                                       \
        for (o = ob; o < oe; o += (R)) {                                                                  \
            const int rr = oe - o < (R) ? (int)(oe - o) : (R);                                            \
            __m512 acc[R][NV];                                                                            \
            for (r = 0; r < (R); r++)                                                                     \
                for (v = 0; v < (NV); v++) acc[r][v] = _mm512_setzero_ps();                               \
            for (k0 = 0; k0 < in; k0 += PK_KC) {                                                          \
                const int64_t kc = in - k0 < PK_KC ? in - k0 : PK_KC;                                     \
                for (r = 0; r < (R); r++) {                                                               \
                    float *dst = wbuf + r * PK_KC;                                                        \
                    if (r < rr && j->fmt == F_BF16) {                                                     \
                        const uint16_t *wr = (const uint16_t *)((const char *)j->w + (o + r) * j->row_bytes) + k0; \
                        for (k = 0; k + 16 <= kc; k += 16) {                                              \
                            prefetch(wr + k + PK_PF / 2);                                                 \
                            _mm512_store_ps(dst + k, bf16x16(wr + k));                                    \
                        }                                                                                 \
                        for (; k < kc; k++) {                                                             \
                            const uint32_t u = (uint32_t)wr[k] << 16;                                     \
                            memcpy(dst + k, &u, 4);                                                       \
                        }                                                                                 \
                    } else if (r < rr && j->fmt == F_F32) {                                               \
                        const char *wf = (const char *)j->w + (o + r) * j->row_bytes + 4 * k0;            \
                        memcpy(dst, wf, sizeof(float) * (size_t)kc);                                      \
                    } else if (r < rr) { /* Q8_32: code * block scale, as decode1 */                      \
                        const int8_t *wr = (const int8_t *)j->w + (o + r) * j->row_bytes + k0;            \
                        const float *sr = j->scales + (o + r) * j->nb + k0 / PK_BLOCK;                    \
                        for (k = 0; k + 16 <= kc; k += 16) {                                              \
                            prefetch(wr + k + PK_PF);                                                     \
                            _mm512_store_ps(dst + k, _mm512_mul_ps(i8x16(_mm_loadu_si128((const __m128i *)(wr + k))), \
                                                                   _mm512_set1_ps(sr[k / PK_BLOCK])));    \
                        }                                                                                 \
                        for (; k < kc; k++) dst[k] = (float)wr[k] * sr[k / PK_BLOCK];                     \
                    } else {                                                                              \
                        for (k = 0; k < kc; k++) dst[k] = 0.0f;                                           \
                    }                                                                                     \
                }                                                                                         \
                for (k = 0; k < kc; k++) {                                                                \
                    const float *xk = xg + (k0 + k) * gw;                                                 \
                    __m512 xv[NV];                                                                        \
                    for (v = 0; v < (NV); v++) xv[v] = _mm512_load_ps(xk + 16 * v);                       \
                    for (r = 0; r < (R); r++) {                                                           \
                        const __m512 b = _mm512_set1_ps(wbuf[r * PK_KC + k]);                             \
                        for (v = 0; v < (NV); v++) acc[r][v] = _mm512_fmadd_ps(b, xv[v], acc[r][v]);      \
                    }                                                                                     \
                }                                                                                         \
            }                                                                                             \
            PK_YB_SCATTER(R, NV);                                                                         \
        }                                                                                                 \
        for (t = 0; t < nn; t++)                                                                          \
            memcpy(j->y + (t0 + t) * j->out + ob, yb + t * 4 * (R), sizeof(float) * (size_t)(oe - ob));   \
        }                                                                                                 \
    }
/* R x NV: 16 x 1 (16 accumulators; 8 x 1 measured 89-96 GFLOP/s at 12 rows of x and 118-128 at 16, 16 x 1
 * 108-117 and 147-156, [1408, 2048] on 2 threads), 8 x 2 (12 x 2 no faster), 4 x 3, 6 x 4; 3 x 5 and 2 x 6
 * ran below the widened tiles, hence groups of at most 64 rows of x. With x packed per group (AMD Zen 5, 2 threads,
 * GFLOP/s at 64 / 512 rows): 6 x 4 383-388 / 401-431 against 4 x 4's 373-374 / 390-406 on [1408, 2048]; 24 x 1
 * (16 / 12 rows: 200-226 / 148-166 against 289-317 / 211-239) and 12 x 2 no better; 8 x 3 within 4 %. */
PK_TN_KERNEL(bf16_tn1_avx512, 16, 1)
PK_TN_KERNEL(bf16_tn2_avx512, 8, 2)
PK_TN_KERNEL(bf16_tn3_avx512, 4, 3)
PK_TN_KERNEL(bf16_tn4_avx512, 6, 4)
#undef PK_TN_KERNEL

static const pk_group_kernel bf16_tn_kernels[4] = {bf16_tn1_avx512, bf16_tn2_avx512, bf16_tn3_avx512,
                                                   bf16_tn4_avx512};

static void bf16_tn_avx512(const pk_job *j, int64_t o0, int64_t o1) { rows_by_group(j, o0, o1, bf16_tn_kernels); }
#endif

#if PK_X86
/* bf16 weights x a batch at the AVX2 level (from PK_TN_MIN_AVX2 rows of x; f32 activations, the exact product): the
 * twin of bf16_tn_avx512 on 8-lane ymm and 16 registers. Why: the AVX2 class ran these batches on the row kernel
 * (tile_avx2: a weight row decoded per 4 rows of x, a load of x per FMA, a horizontal sum per output) and past
 * SMALL_N rows on widened tiles + sgemm (a pass widening every weight to f32 in memory, then OpenBLAS). Here, as at
 * the AVX-512 level, x is packed once per call (tn_pack_group: per group of 64 rows, [in][16 lanes per 16 rows],
 * read as two ymm per 16 rows), the R weight rows of a step are widened PK_TA_KC columns at a time into an L1
 * buffer, and each weight is broadcast against 8 rows of x per FMA. A group's up to 8 vectors of rows do not fit the
 * registers with the weight rows, so they run as passes of NV vectors (R x NV accumulators, NV loads of x and R
 * broadcasts per k) whose accumulators stay in ab between chunks of columns.
 * Numerics: per (row of x, weight row) the products are summed in k order in ONE f32 chain (an FMA per k, from 0,
 * stored and reloaded exactly between chunks), as bf16_tn_avx512 does: the same bits as the AVX-512 level
 * (tests/test_kernels.py checks it).
 * Measured (PYKIMI_SIMD=avx2 on an Intel Xeon Ice Lake @ 2.80GHz, 2 cores, gcc 12; the host shared, best of 3-6
 * alternating runs; bench/bench_batch_kernels.py --kinds bf16), GFLOP/s [1408, 2048] | [2048, 1408], the old plan
 * (row kernel tile_avx2 to SMALL_N rows, then widened tiles + sgemm) / this kernel: 12 rows 92-100 / 105 | 89-98 /
 * 104, 16: 97 / 124 | 76 / 124, 32: 75 / 142 | 73 / 142, 64: 93-106 / 156-160 | 95-106 / 148-163, 128: 133-135 /
 * 150-155 | 130-140 / 150-164, 160: 153 / 160 | 153 / 168, 192: 166 / 162 | 164 / 166, 224: 167 / 162 | 164 / 165,
 * 256: 164-171 / 155-157 | 161-171 / 158-160, 512: 181-185 / 156-157 | 174-182 / 156-161: sgemm's kernel wins from
 * ~200 rows (linear.C_TN_ROWS_AVX2). Forced onto few rows (-DPK_TN_MIN_AVX2=1) against the row kernel: 8 rows 81 /
 * 73-98, 10: 86-89 / 73-96, 12: 100-105 / 89-100, hence 12 (a vector of 8 rows costs the same however many are
 * real). One thread: 68-84 at 16-512 rows. R x NV: 6 x 2 (12 accumulators, 2 x, a broadcast: 15 ymm; per k 8 loads
 * for 12 FMAs); 4 x 3 (7 loads) ran 10-25 % slower (a group's 8 vectors as passes of 3 + 3 + 2), and unrolling the k
 * loop by 4 no faster. PK_TA_KC 64 rather than the AVX-512 kernel's 256: a group's x chunk (64 rows x 64 columns,
 * 16 KiB) stays in L1 across the passes and steps, also on Zen 3's 32 KiB: 1-3 % faster here (128: alike). */
#ifndef PK_TA_KC
#define PK_TA_KC 64 /* columns of weights widened into the L1 buffer at a time */
#endif
#ifndef PK_TA_R
#define PK_TA_R 6  /* weight rows per step */
#define PK_TA_NV 2 /* vectors of 8 rows of x per pass */
#endif

/* One pass: the weight rows widened in wb (R rows, PK_TA_KC apart) against NV vectors of 8 rows of x (xk: the first
 * column's, a column every gw floats), kc columns, the accumulators from / into ab ([R][PK_TN_GROUP]; first: from
 * 0). */
#define PK_TA_PASS(NAME, R, NV)                                                                                      \
    PK_AVX2_INLINE void NAME(const float *xk, int64_t gw, const float *wb, int64_t kc, float *ab, int first) {       \
        __m256 acc[R][NV];                                                                                           \
        int64_t k;                                                                                                   \
        int r, u;                                                                                                    \
        for (r = 0; r < (R); r++)                                                                                    \
            for (u = 0; u < (NV); u++)                                                                               \
                acc[r][u] = first ? _mm256_setzero_ps() : _mm256_load_ps(ab + r * PK_TN_GROUP + 8 * u);              \
        for (k = 0; k < kc; k++) {                                                                                   \
            __m256 xv[NV];                                                                                           \
            for (u = 0; u < (NV); u++) xv[u] = _mm256_load_ps(xk + k * gw + 8 * u);                                  \
            for (r = 0; r < (R); r++) {                                                                              \
                const __m256 b = _mm256_broadcast_ss(wb + r * PK_TA_KC + k);                                         \
                for (u = 0; u < (NV); u++) acc[r][u] = _mm256_fmadd_ps(b, xv[u], acc[r][u]);                         \
            }                                                                                                        \
        }                                                                                                            \
        for (r = 0; r < (R); r++)                                                                                    \
            for (u = 0; u < (NV); u++) _mm256_store_ps(ab + r * PK_TN_GROUP + 8 * u, acc[r][u]);                     \
    }
PK_TA_PASS(ta_pass_full, PK_TA_R, PK_TA_NV)
#if PK_TA_NV > 1
PK_TA_PASS(ta_pass_1, PK_TA_R, 1)
#endif
#if PK_TA_NV > 2
PK_TA_PASS(ta_pass_2, PK_TA_R, 2)
#endif
#undef PK_TA_PASS

/* Weight rows [o0, o1) against the rows t0 .. t0 + nn (nn <= 64) of the group starting at t0: steps of R rows (rows
 * past o1 widened as zeros, not stored), per chunk of PK_TA_KC columns the R rows widened into wb, then the passes. */
static PK_HOT PK_AVX2 void bf16_tn_group_avx2(const pk_job *j, int64_t o0, int64_t o1, int64_t t0, int64_t nn) {
    const int64_t in = j->in, gw = 16 * ((nn + 15) / 16), nv = (nn + 7) / 8;
    const float *xg = (const float *)j->xp + (t0 / PK_TN_GROUP) * in * PK_TN_GROUP; /* t0's group */
    float wb[PK_TA_R * PK_TA_KC] __attribute__((aligned(32)));
    float ab[PK_TA_R * PK_TN_GROUP] __attribute__((aligned(32))); /* [weight row][row of the group] */
    int64_t o, k0, k, v, t;
    int r;
    for (o = o0; o < o1; o += PK_TA_R) {
        const int rr = o1 - o < PK_TA_R ? (int)(o1 - o) : PK_TA_R;
        for (k0 = 0; k0 < in; k0 += PK_TA_KC) {
            const int64_t kc = in - k0 < PK_TA_KC ? in - k0 : PK_TA_KC;
            for (r = 0; r < PK_TA_R; r++) {
                float *dst = wb + r * PK_TA_KC;
                if (r < rr) {
                    const uint16_t *wr = (const uint16_t *)((const char *)j->w + (o + r) * j->row_bytes) + k0;
                    for (k = 0; k + 8 <= kc; k += 8) {
                        if (!(k & 31)) _mm_prefetch((const char *)(wr + k) + 1024, _MM_HINT_T0);
                        _mm256_store_ps(dst + k, bf16x8(wr + k));
                    }
                    for (; k < kc; k++) {
                        const uint32_t u = (uint32_t)wr[k] << 16;
                        memcpy(dst + k, &u, 4);
                    }
                } else {
                    for (k = 0; k < kc; k++) dst[k] = 0.0f;
                }
            }
            for (v = 0; v + PK_TA_NV <= nv; v += PK_TA_NV)
                ta_pass_full(xg + k0 * gw + 8 * v, gw, wb, kc, ab + 8 * v, k0 == 0);
#if PK_TA_NV == 2
            if (v < nv) ta_pass_1(xg + k0 * gw + 8 * v, gw, wb, kc, ab + 8 * v, k0 == 0);
#elif PK_TA_NV == 3
            if (nv - v == 2) ta_pass_2(xg + k0 * gw + 8 * v, gw, wb, kc, ab + 8 * v, k0 == 0);
            if (nv - v == 1) ta_pass_1(xg + k0 * gw + 8 * v, gw, wb, kc, ab + 8 * v, k0 == 0);
#endif
        }
        for (t = 0; t < nn; t++)
            for (r = 0; r < rr; r++) j->y[(t0 + t) * j->out + o + r] = ab[r * PK_TN_GROUP + t];
    }
}

/* Rows of x in groups of up to PK_TN_GROUP (64), each group a pass over the weight rows [o0, o1). */
static void bf16_tn_avx2(const pk_job *j, int64_t o0, int64_t o1) {
    int64_t t0;
    for (t0 = 0; t0 < j->n; t0 += PK_TN_GROUP)
        bf16_tn_group_avx2(j, o0, o1, t0, j->n - t0 < PK_TN_GROUP ? j->n - t0 : PK_TN_GROUP);
}
#endif

/* Output rows [o0, o1) of one job at SIMD level `simd`: blocks of PK_RB weight rows, each block against
 * every x tile of PK_NT rows in turn (the block is still in cache for the second tile). */
static void job_rows(const pk_job *j, int64_t o0, int64_t o1, int simd) {
    const int64_t nb = j->nb, in = j->in, xs_stride = nb * PK_BLOCK;
    void (*kernel)(const pk_tile *) = NULL;
    int64_t o, t0, tb = 0;
    pk_tile tl;
    if (j->act == A_F32) kernel = tile_scalar;
    else if (j->act == A_I16) kernel = tile_q8w_scalar;
    else kernel = tile_act_scalar;
#if PK_X86
    if (simd == 1) kernel = j->act == A_F32 ? tile_avx2 : j->act == A_I16 ? tile_q8w_avx2 : tile_act_avx2;
#endif
#if PK_HAVE_AVX512
    if (simd >= 2) kernel = j->act == A_F32 ? tile_avx512 : j->act == A_I16 ? tile_q8w_avx512 : tile_act_avx512;
#endif
    (void)simd;
#if PK_HAVE_AMX
    if (j->xb) {
        amx_rows(j, o0, o1);
        return;
    }
#endif
#if PK_X86
    if (j->xp && simd == 1 && j->act == A_F32) { /* packed x, f32 activations: the exact batch kernel (bf16) */
        bf16_tn_avx2(j, o0, o1);
        return;
    }
    if (j->xp && simd == 1) { /* packed x at the AVX2 level: the int16 (Q8_32) or the int8 batch kernel */
        (j->act == A_I16 ? avx2w_rows : avx2b_rows)(j, o0, o1);
        if (j->nbatch >= j->n) return;
        tb = j->nbatch; /* the rest (fewer than 8 rows) on the row kernels below */
    }
#endif
#if PK_HAVE_AVX512
    if (j->xp && simd >= 2 && j->act == A_F32) { /* packed x, f32 activations: the exact batch kernel */
        bf16_tn_avx512(j, o0, o1);
        return;
    }
    if (j->xp && simd >= 2) { /* packed x: the AVX512_BF16 kernel (bf16 weights) or a VNNI one (Q8_32 / Q4_32) */
#if PK_HAVE_AVX512BF16
        if (j->fmt == F_BF16) bf16a_rows(j, o0, o1);
#endif
        if (j->fmt == F_Q8 && j->act == A_I16) { /* the int16 one (Q8_32): rows [0, nbatch) */
            vnni_rows(j, o0, o1, j->nbatch);
            if (j->nbatch >= j->n) return;
            tb = j->nbatch; /* the rest (a few rows past the last vector of 16) on the row kernel below */
        } else {
            if (j->fmt == F_Q8 || j->fmt == F_Q4) vnni_rows(j, o0, o1, j->n);
            return;
        }
    }
#endif
    memset(&tl, 0, sizeof tl);
    tl.fmt = j->fmt;
    tl.in = in;
    tl.nb = nb;
    tl.row_bytes = j->row_bytes;
    tl.ystride = j->out;
    for (o = o0; o < o1; o += PK_RB) {
        tl.nrows = o1 - o < PK_RB ? o1 - o : PK_RB;
        tl.w = (const char *)j->w + o * j->row_bytes;
        tl.sc = j->scales ? j->scales + o * nb : NULL;
        for (t0 = tb; t0 < j->n; t0 += PK_NT) {
            tl.nt = (int)(j->n - t0 < PK_NT ? j->n - t0 : PK_NT);
            tl.x = j->x + t0 * in;
            tl.xq = j->xq ? j->xq + t0 * xs_stride : NULL;
            tl.xqp = j->xqp ? j->xqp + t0 * xs_stride : NULL;
            tl.xq16 = j->xq16 ? j->xq16 + t0 * xs_stride : NULL;
            tl.xd = j->xd ? j->xd + t0 * nb : NULL;
            tl.xs = j->xs ? j->xs + t0 * nb : NULL;
            tl.xds = j->xds ? j->xds + t0 * nb * 4 : NULL;
            tl.xcor = j->xcor ? j->xcor + t0 * nb : NULL;
            tl.y = j->y + t0 * j->out + o;
            kernel(&tl);
        }
    }
}

/* The rows of every job whose cost interval [P_j + o*c_j, P_j + (o+1)*c_j) starts in [a, b):
 * consecutive [a, b) ranges partition all rows exactly once. */
static void jobs_cost_range(const pk_job *jobs, int count, double a, double b, int simd) {
    double p = 0.0;
    int k;
    for (k = 0; k < count; k++) {
        const pk_job *j = &jobs[k];
        const double c = (double)(j->n > 0 ? j->n : 1) * (double)(j->in > 0 ? j->in : 1);
        const double end = p + c * (double)j->out;
        if (end > a && p < b) {
            int64_t o0 = a <= p ? 0 : (int64_t)ceil((a - p) / c);
            int64_t o1 = b >= end ? j->out : (int64_t)ceil((b - p) / c);
            if (o0 < 0) o0 = 0;
            if (o1 > j->out) o1 = j->out;
            if (o1 > o0) job_rows(j, o0, o1, simd);
        }
        p = end;
    }
}


/* Give jobs[k] the quantized activations of an earlier job prepared from the same x (the same rows, width, format
 * and mode: job_prepare's result depends on nothing else) that took the row kernels; 1 when it did. Why: a decode
 * step's MoE runs gate and up of 8 experts as 16 one-row jobs on the same h, and each quantized and packed h
 * again (~1 us a job, serially before the parallel region: ~25 us a layer with the packing below). The shared
 * buffers are only read by the kernels; the owner frees them. */
static int same_x(const pk_job *o, const pk_job *j) {
    return o->x == j->x && o->n == j->n && o->in == j->in && o->fmt == j->fmt && o->act_asked == j->act_asked &&
           o->rows == j->rows;
}

static int job_borrow(pk_job *jobs, int k) {
    pk_job *j = &jobs[k];
    int p;
    if (j->act_asked == A_F32) return 0;
    for (p = 0; p < k; p++) {
        const pk_job *o = &jobs[p];
        if (o->lent || !same_x(o, j)) continue;
        if (o->act == A_F32 || o->xb || o->xp || o->nbatch) return 0; /* batch kernels: its own */
        j->act = o->act;
        j->xq = o->xq, j->xqp = o->xqp, j->xq16 = o->xq16, j->xd = o->xd, j->xs = o->xs;
        j->xds = o->xds, j->xcor = o->xcor, j->abuf = o->abuf;
        j->lent = 1;
        return 1;
    }
    return 0;
}

static void run_jobs(pk_job *jobs, int count) {
    const int simd = pk_get_simd();
    const int nth = pk_get_threads();
    double total = 0.0;
    int64_t rows = 0;
    uint32_t *xp_all = NULL;
    int k;
#if PK_X86
    {
        /* All packed jobs' x (bf16a, VNNI / AVX2 int8 batch) in ONE buffer: a buffer per job (60 experts' gate
         * and up in a prefill) came fresh from the OS every call, its page faults ~30 % of such a call (9k faults,
         * 36 vs 26 ms for 60 jobs of 64 rows); one allocation is reused by malloc from the second call on. */
        int64_t need = 0, off = 0;
        for (k = 0; k < count; k++) {
            jobs[k].nb = (jobs[k].in + PK_BLOCK - 1) / PK_BLOCK;
            if (xpack_takes(&jobs[k], simd)) need += xpack_elems(&jobs[k]);
        }
        xp_all = need > 0 ? (uint32_t *)pk_amalloc(sizeof(uint32_t) * (size_t)need) : NULL;
        int64_t ng_all = 0, i;
        for (k = 0; k < count && xp_all; k++)
            if (xpack_takes(&jobs[k], simd)) {
                jobs[k].xp = xp_all + off;
                jobs[k].xp_shared = 1;
                off += xpack_elems(&jobs[k]);
                ng_all += (jobs[k].n + PK_TN_GROUP - 1) / PK_TN_GROUP;
            }
        /* every group of 64 rows of every such job packed here, shared between the threads (job_prepare then
         * finds them packed): one after the other, 128 experts' 7168 rows took ~5 ms a call */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth) if (ng_all > 1)
        for (i = 0; i < ng_all; i++) {
            int64_t g = i;
            int kk;
            for (kk = 0; kk < count; kk++) {
                const int64_t ng = (jobs[kk].n + PK_TN_GROUP - 1) / PK_TN_GROUP;
                if (!jobs[kk].xp_shared) continue;
                if (g < ng) break;
                g -= ng;
            }
            xpack_group(&jobs[kk], g, simd);
        }
    }
#endif
    {
        /* Prepare the jobs: first those that quantize their own x (no earlier job on the same x: see job_borrow), on
         * the threads when there is enough of that work, then the others, which take an earlier job's. Why: a
         * batched decode step's MoE runs one job per chosen expert with its own rows of x; at 4 sequences ~45 x
         * quantized a layer took ~60 us on one thread while the other waited. */
        char fstack[256], *own = count <= 256 ? fstack : (char *)malloc((size_t)count);
        double work = 0.0;
        int nown = 0;
        for (k = 0; k < count; k++) {
            int p = 0;
            jobs[k].nb = (jobs[k].in + PK_BLOCK - 1) / PK_BLOCK;
            if (jobs[k].act_asked != A_F32 && own)
                for (p = 0; p < k; p++)
                    if (own[p] && same_x(&jobs[p], &jobs[k])) break; /* an earlier job on the same x */
            if (own) own[k] = jobs[k].act_asked == A_F32 || p == k;
            if (!own || own[k]) nown++, work += (double)jobs[k].n * (double)jobs[k].in;
        }
        if (own && nth > 1 && nown > 1 && work >= (double)PK_PREP_PAR_MIN) {
            /* the switches job_prepare reads, read once before the threads (each caches its environment variable) */
            (void)pk_get_vnni_batch(), (void)pk_get_vnni16_batch(), (void)pk_get_avx512bf16(), (void)pk_get_amx();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth)
            for (k = 0; k < count; k++)
                if (own[k]) job_prepare(&jobs[k], simd);
        } else {
            for (k = 0; k < count; k++)
                if (!own || own[k]) job_prepare(&jobs[k], simd);
        }
        for (k = 0; k < count; k++) /* in order: an earlier job is prepared (or lent) when a later one looks */
            if (own && !own[k] && !job_borrow(jobs, k)) job_prepare(&jobs[k], simd);
        if (own != fstack) free(own);
    }
    for (k = 0; k < count; k++) {
        total += (double)(jobs[k].n > 0 ? jobs[k].n : 1) * (double)(jobs[k].in > 0 ? jobs[k].in : 1) * (double)jobs[k].out;
        rows += jobs[k].out;
    }
    if (nth > 1 && rows > 1 && total >= (double)PK_PAR_MIN) {
        /* 8 chunks per thread, handed out dynamically: on a shared machine a thread that is descheduled
         * for a while leaves its chunks to the others instead of holding up the whole call. */
        const int nchunks = (int)(rows < 8 * nth ? rows : 8 * nth);
        int c;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth)
        for (c = 0; c < nchunks; c++)
            jobs_cost_range(jobs, count, total * c / nchunks, c == nchunks - 1 ? total * 2 : total * (c + 1) / nchunks,
                            simd);
    } else {
        jobs_cost_range(jobs, count, 0.0, total * 2 + 1.0, simd);
    }
    for (k = 0; k < count; k++) job_free(&jobs[k]);
    free(xp_all);
}

static void run_one(int fmt, int act, const float *x, int64_t n, int64_t in, const void *w, const float *scales,
                    int64_t out, float *y) {
    pk_job j;
    job_set(&j, fmt, act, x, n, in, w, scales, out, y);
    run_jobs(&j, 1);
}

void pk_matmul_f32(const float *x, int64_t n, int64_t in, const float *w, int64_t out, float *y) {
    run_one(F_F32, A_F32, x, n, in, w, NULL, out, y);
}

void pk_matmul_bf16(const float *x, int64_t n, int64_t in, const uint16_t *w, int64_t out, float *y) {
    run_one(F_BF16, A_F32, x, n, in, w, NULL, out, y);
}

void pk_matmul_bf16a(const float *x, int64_t n, int64_t in, const uint16_t *w, int64_t out, float *y) {
    run_one(F_BF16, A_BF16, x, n, in, w, NULL, out, y);
}

void pk_matmul_q8(const float *x, int64_t n, int64_t in, const int8_t *q, const float *scales, int64_t out,
                  float *y) {
    run_one(F_Q8, A_F32, x, n, in, q, scales, out, y);
}

void pk_matmul_q4(const float *x, int64_t n, int64_t in, const uint8_t *q, const float *scales, int64_t out,
                  float *y) {
    run_one(F_Q4, A_F32, x, n, in, q, scales, out, y);
}

void pk_matmul_q8a(const float *x, int64_t n, int64_t in, const int8_t *q, const float *scales, int64_t out,
                   float *y) {
    run_one(F_Q8, A_I8, x, n, in, q, scales, out, y);
}

void pk_matmul_q4a(const float *x, int64_t n, int64_t in, const uint8_t *q, const float *scales, int64_t out,
                   float *y) {
    run_one(F_Q4, A_I8, x, n, in, q, scales, out, y);
}

void pk_matmul_q8w(const float *x, int64_t n, int64_t in, const int8_t *q, const float *scales, int64_t out,
                   float *y) {
    run_one(F_Q8, A_I16, x, n, in, q, scales, out, y);
}

int pk_matmul_many(int count, const int *fmts, const int *acts, const float *const *xs, const int64_t *ns,
                   const int64_t *ins, const void *const *ws, const float *const *scales, const int64_t *outs,
                   float *const *ys) {
    pk_job stack[64], *jobs = count <= 64 ? stack : (pk_job *)malloc(sizeof(pk_job) * (size_t)count);
    int k;
    if (!jobs) return -1;
    for (k = 0; k < count; k++) {
        pk_job *j = &jobs[k];
        job_set(j, fmts[k], acts[k], xs[k], ns[k], ins[k], ws[k], scales[k], outs[k], ys[k]);
        if (j->fmt < F_F32 || j->fmt > F_Q4) {
            if (jobs != stack) free(jobs);
            return -2;
        }
    }
    run_jobs(jobs, count);
    if (jobs != stack) free(jobs);
    return 0;
}

static void silu_mul(int simd, float *g, const float *u, int64_t n);

/* The decode step's MoE FFN in one call (see the header): why -- between the gate/up products and the down
 * products the Python path computed silu(g) * u per expert and built a second call, and at 27 layers that
 * glue was a large part of the time a token spends outside the kernels. NumPy twin: ref.swiglu_sum. */
int pk_swiglu_sum(int count, const pk_expert *experts, const float *x, int64_t d, const float *coef, float *out) {
    pk_job stack[128], *jobs;
    int64_t total = 0, off, i;
    float *gu, *ys;
    int k, rc = 0;
    if (count <= 0) {
        for (i = 0; i < d; i++) out[i] = 0.0f;
        return 0;
    }
    for (k = 0; k < count; k++) {
        if (experts[k].fmt < F_F32 || experts[k].fmt > F_Q4) return -2;
        total += experts[k].inter;
    }
    jobs = 2 * count <= 128 ? stack : (pk_job *)malloc(sizeof(pk_job) * (size_t)(2 * count));
    gu = (float *)pk_amalloc(sizeof(float) * (size_t)(2 * total + 1));
    ys = (float *)pk_amalloc(sizeof(float) * (size_t)(count * d + 1));
    if (!jobs || !gu || !ys) {
        rc = -1;
        goto done;
    }
    /* gate and up of every expert: g_k = gu[off, off + I_k), u_k = gu[total + off, ...) */
    for (k = 0, off = 0; k < count; off += experts[k].inter, k++) {
        const pk_expert *e = &experts[k];
        job_set(&jobs[2 * k], e->fmt, e->act, x, 1, d, e->g, e->sg, e->inter, gu + off);
        job_set(&jobs[2 * k + 1], e->fmt, e->act, x, 1, d, e->u, e->su, e->inter, gu + total + off);
    }
    run_jobs(jobs, 2 * count);
    silu_mul(pk_get_simd(), gu, gu + total, total); /* silu(g) * u, in place over g */
    for (k = 0, off = 0; k < count; off += experts[k].inter, k++) {
        const pk_expert *e = &experts[k];
        job_set(&jobs[k], e->fmt, e->act, gu + off, 1, e->inter, e->d, e->sd, d, ys + k * d);
    }
    run_jobs(jobs, count);
    for (i = 0; i < d; i++) out[i] = 0.0f;
    for (k = 0; k < count; k++) { /* weighted sum in expert order (as the Python scatter-add) */
        const float c = coef[k], *y = ys + k * d;
        for (i = 0; i < d; i++) out[i] += c * y[i];
    }
done:
    if (jobs != stack) free(jobs);
    free(gu);
    free(ys);
    return rc;
}

/* ----------------------------------------------------------------------------- the MoE router (spec §8.4)
 * route_row: the selection of ONE token from its logits, moe.select_experts' rule exactly (the Numba
 * route_select is the same loop): scores = sigmoid(logits) (or softmax), choice = scores + bias (bias only
 * for the selection, NULL = none); with n_group > 1 only the topk_group best groups stay selectable (a
 * group's score: the sum of its two best choices when group_top2, else its best; the others -inf); the k
 * best choices by k passes of "largest not yet taken", ties to the LOWER id (what a stable descending sort
 * gives -- the NumPy definition's argsort(kind="stable")), groups the same way; ids ascending; weights =
 * the chosen UNBIASED scores, divided by their sum (+1e-20) when norm and k > 1, times scaling; margin = k-th
 * minus (k+1)-th choice (inf when k = E). scratch: 2 * E + 2 * n_group floats. */
static void route_row(const float *logits, const float *bias, int E, int k, int n_group, int topk_group,
                      int group_top2, int norm, float scaling, int sigmoid, float *scores, int *ids,
                      float *weights, float *margin, float *scratch) {
    float *choice = scratch, *taken = scratch + E, *gscore = scratch + 2 * E, *gkeep = gscore + n_group;
    const int per = E / n_group;
    float kth = 0.0f, tot = 0.0f;
    int e, g, j;
    if (sigmoid) {
        for (e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + expf(-logits[e]));
    } else {
        float m = logits[0], sum = 0.0f;
        for (e = 1; e < E; e++) m = logits[e] > m ? logits[e] : m;
        for (e = 0; e < E; e++) {
            scores[e] = expf(logits[e] - m);
            sum += scores[e];
        }
        for (e = 0; e < E; e++) scores[e] = scores[e] / sum;
    }
    for (e = 0; e < E; e++) choice[e] = bias ? scores[e] + bias[e] : scores[e];
    if (n_group > 1) {
        for (g = 0; g < n_group; g++) {
            float a1 = -INFINITY, a2 = -INFINITY; /* the group's largest and second largest choice */
            for (e = g * per; e < (g + 1) * per; e++) {
                const float v = choice[e];
                if (v > a1) {
                    a2 = a1;
                    a1 = v;
                } else if (v > a2) {
                    a2 = v;
                }
            }
            gscore[g] = group_top2 && per > 1 ? a2 + a1 : a1;
            gkeep[g] = 0.0f;
        }
        for (j = 0; j < (topk_group < n_group ? topk_group : n_group); j++) {
            int best = -1;
            for (g = 0; g < n_group; g++)
                if (gkeep[g] == 0.0f && (best < 0 || gscore[g] > gscore[best])) best = g;
            gkeep[best] = 1.0f;
        }
        for (e = 0; e < E; e++)
            if (gkeep[e / per] == 0.0f) choice[e] = -INFINITY;
    }
    for (e = 0; e < E; e++) taken[e] = 0.0f;
    for (j = 0; j < (k + 1 < E ? k + 1 : E); j++) {
        int best = -1;
        for (e = 0; e < E; e++)
            if (taken[e] == 0.0f && (best < 0 || choice[e] > choice[best])) best = e;
        if (j < k) {
            taken[best] = 1.0f;
            kth = choice[best];
        } else {
            *margin = kth - choice[best];
        }
    }
    if (k >= E) *margin = INFINITY;
    for (e = 0, j = 0; e < E; e++) /* ascending ids */
        if (taken[e] != 0.0f) {
            ids[j] = e;
            weights[j] = scores[e];
            tot += scores[e];
            j++;
        }
    for (j = 0; j < k; j++) {
        if (norm && k > 1) weights[j] = weights[j] / (tot + 1e-20f);
        weights[j] = weights[j] * scaling;
    }
}

static int route_check(const pk_linear *gate, int64_t d, int E, int k, int n_group) {
    if (!gate || gate->fmt < F_F32 || gate->fmt > F_Q4) return -2;
    if (E < 1 || k < 1 || k > E || n_group < 1 || E % n_group || gate->n_out != E || gate->n_in != d) return -3;
    return 0;
}

/* Router logits of B tokens, one job of one row each (kernels.matmul of that row alone: a row's logits do
 * not depend on the batch), then route_row per token. */
static int route_rows(int64_t B, const float *x, int64_t d, const pk_linear *gate, const float *bias, int E, int k,
                      int n_group, int topk_group, int group_top2, int norm, float scaling, int sigmoid,
                      float *logits, float *scores, int *ids, float *weights, float *margin) {
    pk_job stack[16], *jobs = B <= 16 ? stack : (pk_job *)malloc(sizeof(pk_job) * (size_t)(B + 1));
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(2 * E + 2 * n_group + 1));
    int64_t b;
    if (!jobs || !scratch) {
        if (jobs != stack) free(jobs);
        free(scratch);
        return -1;
    }
    for (b = 0; b < B; b++)
        job_set(&jobs[b], gate->fmt, gate->act, x + b * d, 1, d, gate->w, gate->scales, E, logits + b * E);
    run_jobs(jobs, (int)B);
    for (b = 0; b < B; b++)
        route_row(logits + b * E, bias, E, k, n_group, topk_group, group_top2, norm, scaling, sigmoid, scores + b * E,
                  ids + b * k, weights + b * k, margin + b, scratch);
    if (jobs != stack) free(jobs);
    free(scratch);
    return 0;
}

int pk_route(int64_t B, const float *x, int64_t d, const pk_linear *gate, const float *bias, int E, int k,
             int n_group, int topk_group, int group_top2, int norm, float scaling, int sigmoid, float *logits,
             float *scores, int *ids, float *weights, float *margin) {
    const int rc = route_check(gate, d, E, k, n_group);
    if (rc) return rc;
    if (B < 0) return -3;
    return route_rows(B, x, d, gate, bias, E, k, n_group, topk_group, group_top2, norm, scaling, sigmoid, logits,
                      scores, ids, weights, margin);
}

/* See the header. Why: between the router GEMV, the selection and the expert sum a decode step came back to
 * Python three times a layer (BLAS, the Numba selection, the expert list and coefficients built per token). */
int pk_moe(const float *x, int64_t d, const pk_linear *gate, const float *bias, int E, int k, int n_group,
           int topk_group, int group_top2, int norm, float scaling, int sigmoid, const pk_expert *table,
           int n_shared, const pk_expert *shared, float *logits, float *scores, int *ids, float *weights,
           float *margin, float *out) {
    pk_expert stack[72], *list;
    float cstack[72], *coef;
    int j, rc = route_check(gate, d, E, k, n_group);
    if (rc) return rc;
    if (n_shared < 0) return -3;
    rc = route_rows(1, x, d, gate, bias, E, k, n_group, topk_group, group_top2, norm, scaling, sigmoid, logits,
                    scores, ids, weights, margin);
    if (rc) return rc;
    for (j = 0; j < k; j++)
        if (!table[ids[j]].g) return 1; /* not resolved yet: the caller fills its record and calls again */
    list = k + n_shared <= 72 ? stack : (pk_expert *)malloc(sizeof(pk_expert) * (size_t)(k + n_shared));
    coef = k + n_shared <= 72 ? cstack : (float *)malloc(sizeof(float) * (size_t)(k + n_shared));
    if (!list || !coef) {
        rc = -1;
        goto done;
    }
    /* the routed experts in ascending id order with their weights, then the shared experts with weight 1:
     * moe_forward's one-token order */
    for (j = 0; j < k; j++) {
        list[j] = table[ids[j]];
        coef[j] = weights[j];
    }
    for (j = 0; j < n_shared; j++) {
        list[k + j] = shared[j];
        coef[k + j] = 1.0f;
    }
    rc = pk_swiglu_sum(k + n_shared, list, x, d, coef, out);
done:
    if (list != stack) free(list);
    if (coef != cstack) free(coef);
    return rc;
}

/* ------------------------------------------------------------------------- vector x matrix (y = x W) */
/* The absorbed MLA decode (spec §8.3) needs q_lat[h] = q_nope[h] · W_uk[h], a combination of the ROWS of
 * a stored weight block W [rows, in] (rows = qk_nope_head_dim, in = kv_lora_rank): y[0:in] = sum_r x[r] W[r].
 * Each row is decoded once and added into y, which stays in L1 (in <= a few thousand floats), so the
 * stored bytes are read once, as in the GEMV, instead of keeping a transposed f32 copy of W_uk.
 * NumPy twin: ref.vecmat. */
static void vecmat_scalar(int fmt, const float *x, int64_t rows, int64_t in, const char *w, int64_t row_bytes,
                          const float *sc, int64_t nb, float *y) {
    int64_t r, i;
    for (i = 0; i < in; i++) y[i] = 0.0f;
    for (r = 0; r < rows; r++) {
        const void *wr = w + r * row_bytes;
        const float *sr = sc ? sc + r * nb : NULL;
        const float xr = x[r];
        for (i = 0; i < in; i++) y[i] += xr * decode1(fmt, wr, sr, i);
    }
}

#if PK_X86
static PK_AVX2 void vecmat_avx2(int fmt, const float *x, int64_t rows, int64_t in, const char *w,
                                int64_t row_bytes, const float *sc, int64_t nb, float *y) {
    const int64_t nfull = in / 32;
    int64_t r, b, i;
    int k;
    for (i = 0; i < in; i++) y[i] = 0.0f;
    for (r = 0; r < rows; r++) {
        const void *wr = w + r * row_bytes;
        const float *sr = sc ? sc + r * nb : NULL;
        const __m256 xr = _mm256_set1_ps(x[r]);
        for (b = 0; b < nfull; b++) {
            __m256 d[4];
            decode32(fmt, wr, sr, b, d);
            for (k = 0; k < 4; k++) {
                float *yb = y + b * 32 + 8 * k;
                _mm256_storeu_ps(yb, _mm256_fmadd_ps(xr, d[k], _mm256_loadu_ps(yb)));
            }
        }
        for (i = nfull * 32; i < in; i++) y[i] += x[r] * decode1(fmt, wr, sr, i); /* short last block */
    }
}
#endif

#if PK_HAVE_AVX512
#define PK_VM_NS 8 /* sequences sharing one decoded weight block in vecmat_multi_avx512, at most */

/* decode32_512 for vecmat_cols_avx512: the same values, Q4 through a table. The 16 values (q - 8) * scale are
 * one multiply, the codes pick from them (vpermps reads the low 4 bits of an index: a byte's low nibble as it
 * is, its high one shifted down), and two two-source permutes interleave the even and odd elements: 7 vector
 * instructions a block instead of 14 (and / shift / unpack / subtract / widen / convert / multiply). Each value is
 * the product (float)(q - 8) * scale of decode32_512, so the same bits. */
PK_AVX512_INLINE void vm_decode32_512(int fmt, const void *w, const float *sc, int64_t blk, __m512 d[2]) {
    if (fmt == F_Q4) {
        const uint8_t *p = (const uint8_t *)w + blk * 16;
        const __m512 tbl = _mm512_mul_ps(_mm512_setr_ps(-8.0f, -7.0f, -6.0f, -5.0f, -4.0f, -3.0f, -2.0f, -1.0f, 0.0f,
                                                        1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f),
                                         _mm512_set1_ps(sc[blk]));
        const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); /* byte i in lane i */
        const __m512 ev = _mm512_permutexvar_ps(c, tbl);                       /* element 2i: low nibble */
        const __m512 od = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), tbl); /* element 2i + 1: high */
        if (!(blk & 3)) prefetch(p + PK_PF);
        d[0] = _mm512_permutex2var_ps(ev, lo, od); /* elements 0..15 */
        d[1] = _mm512_permutex2var_ps(ev, hi, od); /* 16..31 */
    } else {
        decode32_512(fmt, w, sc, blk, d);
    }
}

/* Columns [32 * b0, 32 * (b0 + nblk)) of y[s] = x[s] W for ns sequences (ns <= PK_VM_NS and nblk <= 2 constant
 * at every call site): those columns of every y stay in registers (ns * 2 * nblk zmm) while the rows go by, each
 * row's blocks decoded once for all ns. Each element sees vecmat_avx512's operations -- 0, then
 * fma(x[r], w[r][i], y) for r in order -- so the bits do not depend on ns nor on the column blocking. */
PK_AVX512_INLINE void vecmat_cols_avx512(int fmt, int ns, int nblk, const float *const *x, int64_t rows,
                                         const char *w, int64_t row_bytes, const float *sc, int64_t nb, int64_t b0,
                                         float *const *y) {
    __m512 acc[PK_VM_NS][4];
    int64_t r;
    int s, k;
    for (s = 0; s < ns; s++)
        for (k = 0; k < 2 * nblk; k++) acc[s][k] = _mm512_setzero_ps();
    for (r = 0; r < rows; r++) {
        const void *wr = w + r * row_bytes;
        const float *sr = sc ? sc + r * nb : NULL;
        __m512 d[4];
        vm_decode32_512(fmt, wr, sr, b0, d);
        if (nblk == 2) vm_decode32_512(fmt, wr, sr, b0 + 1, d + 2);
        for (s = 0; s < ns; s++) {
            const __m512 xr = _mm512_set1_ps(x[s][r]);
            for (k = 0; k < 2 * nblk; k++) acc[s][k] = _mm512_fmadd_ps(xr, d[k], acc[s][k]);
        }
    }
    for (s = 0; s < ns; s++)
        for (k = 0; k < 2 * nblk; k++) _mm512_storeu_ps(y[s] + b0 * 32 + 16 * k, acc[s][k]);
}

/* y[s] [in] = x[s] [rows] W for ns <= PK_VM_NS sequences, in % 32 == 0: per 64 columns (up to 4 sequences) or
 * 32 (5 to 8), register-blocked (vecmat_cols_avx512); one sequence (vecmat_avx512) is ns = 1. Why: the batched
 * absorbed decode ran vecmat_avx512 per (sequence, head), decoding each head's W_uk B times and loading /
 * storing y once per row and block (see pk_mla_absorbed_batch for the numbers). At 4 sequences the FMAs
 * bound the loop now (16 per row, the decode 14 instructions a row). */
static PK_AVX512 void vecmat_multi_avx512(int fmt, int ns, const float *const *x, int64_t rows, int64_t in,
                                          const char *w, int64_t row_bytes, const float *sc, int64_t nb,
                                          float *const *y) {
    const int64_t nfull = in / 32;
    int64_t b;
    int two; /* this step's columns: 2 blocks (up to 4 sequences, but the last block) or 1 */
#define PK_VMC(NS, NBLK) vecmat_cols_avx512(fmt, NS, NBLK, x, rows, w, row_bytes, sc, nb, b, y)
#define PK_VMC2(NS)   \
    if (two)          \
        PK_VMC(NS, 2); \
    else              \
        PK_VMC(NS, 1)
    for (b = 0; b < nfull; b += 1 + two) {
        two = ns <= 4 && b + 1 < nfull;
        switch (ns) {
        case 1: PK_VMC2(1); break;
        case 2: PK_VMC2(2); break;
        case 3: PK_VMC2(3); break;
        case 4: PK_VMC2(4); break;
        case 5: PK_VMC(5, 1); break;
        case 6: PK_VMC(6, 1); break;
        case 7: PK_VMC(7, 1); break;
        default: PK_VMC(8, 1); break;
        }
    }
#undef PK_VMC2
#undef PK_VMC
}

static PK_AVX512 void vecmat_avx512(int fmt, const float *x, int64_t rows, int64_t in, const char *w,
                                    int64_t row_bytes, const float *sc, int64_t nb, float *y) {
    const int64_t nfull = in / 32;
    int64_t r, b, i;
    if (in % 32 == 0) { /* whole blocks: the register-blocked loop (the same operations per element) */
        vecmat_multi_avx512(fmt, 1, &x, rows, in, w, row_bytes, sc, nb, &y);
        return;
    }
    for (i = 0; i < in; i++) y[i] = 0.0f;
    for (r = 0; r < rows; r++) {
        const void *wr = w + r * row_bytes;
        const float *sr = sc ? sc + r * nb : NULL;
        const __m512 xr = _mm512_set1_ps(x[r]);
        for (b = 0; b < nfull; b++) {
            __m512 d[2];
            decode32_512(fmt, wr, sr, b, d);
            _mm512_storeu_ps(y + b * 32, _mm512_fmadd_ps(xr, d[0], _mm512_loadu_ps(y + b * 32)));
            _mm512_storeu_ps(y + b * 32 + 16, _mm512_fmadd_ps(xr, d[1], _mm512_loadu_ps(y + b * 32 + 16)));
        }
        for (i = nfull * 32; i < in; i++) y[i] += x[r] * decode1(fmt, wr, sr, i); /* short last block */
    }
}
#endif

static void vecmat_level(int simd, int fmt, const float *x, int64_t rows, int64_t in, const void *w,
                         const float *sc, float *y) {
    const int64_t nb = (in + PK_BLOCK - 1) / PK_BLOCK;
    PK_LEVEL_CALL(simd, vecmat, (fmt, x, rows, in, (const char *)w, row_bytes_of(fmt, in), sc, nb, y));
}

int pk_vecmat_many(int count, const int *fmts, const float *const *xs, const int64_t *rows, const int64_t *ins,
                   const void *const *ws, const float *const *scales, float *const *ys) {
    const int simd = pk_get_simd();
    const int nth = pk_get_threads();
    double total = 0.0;
    int k;
    for (k = 0; k < count; k++) {
        if (fmts[k] < F_F32 || fmts[k] > F_Q4) return -2;
        total += (double)rows[k] * (double)ins[k];
    }
    if (nth > 1 && count > 1 && total >= (double)PK_PAR_MIN) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth)
        for (k = 0; k < count; k++) vecmat_level(simd, fmts[k], xs[k], rows[k], ins[k], ws[k], scales[k], ys[k]);
    } else {
        for (k = 0; k < count; k++) vecmat_level(simd, fmts[k], xs[k], rows[k], ins[k], ws[k], scales[k], ys[k]);
    }
    return 0;
}

/* ------------------------------------------------------------ the absorbed MLA decode of one token */
/* Kernels over rows of the latent cache. Heads go in blocks of PK_HB = 16, the lanes of one AVX-512 vector
 * (two at AVX2): a block's query is stored transposed, qT [W][16] (heads past H zero), and a chunk's scores /
 * probabilities as p [rows][16]. Every kernel body exists once per level (its target changes the speed and
 * FMA contraction) and once per cache dtype: LD(v) reads one cached element as f32 -- itself for an f32
 * cache, the 16-bit shift of bf16_to_f32 for a bf16 one (exact, in registers: the cache is never widened in
 * memory). The two dtypes share every summation order, so a bf16 cache gives bit for bit what an f32 cache
 * holding the same (rounded) values gives. */
#define PK_HB 16
#define PK_LD_F32(v) (v)
#define PK_LD_BF16(v) bf16_to_f32(v)

/* Scores as an outer-product GEMM, lanes = heads: p[t][0:16] = scale * sum_k qT[k][0:16] r_t[k] for nt rows
 * r_t = r + t * stride, one chain per (row, head) with k in order. Each cached element is broadcast once
 * for the 16 heads and each qT[k] loaded once per tile of rows; nothing to reduce across lanes. Why: the
 * earlier form (lanes along k, 4 rows x 4 heads per block, then a reduction of each of the 16 sums) ran at
 * ~60 % of the FMA peak from L2 (312 TSC ticks a row at 16 heads x 576) and ~40 % streaming from memory
 * (471); this one at ~97 % (183-209, tiles of 16 rows, f32 and bf16 alike: /tmp microbenchmark on Zen 5). */
#if defined(__GNUC__)
/* The portable level's tiles in GCC / clang vector extensions (4 lanes: SSE2, NEON): with plain arrays GCC kept
 * the 32 sums of a 2-row tile in memory (5.3 G multiply-adds a second a core at 4k rows, Zen 5, against
 * main's 16 for its dot products); as pk_v4 registers 12.8. Other compilers: the plain loops below. */
typedef float pk_v4 __attribute__((vector_size(16)));
#define PK_V4_LOAD(v, ptr) memcpy(&(v), (ptr), sizeof(pk_v4))
#define PK_V4_STORE(ptr, v) memcpy((ptr), &(v), sizeof(pk_v4))
#define PK_SCORES16_BODY(LD)                                                                  \
    {                                                                                         \
        int64_t t = 0, k, h;                                                                  \
        (void)avail, (void)ahead;                                                             \
        for (; t < nt; t += 2) { /* two rows a tile (the last one alone when nt is odd) */    \
            const int two = t + 1 < nt;                                                       \
            pk_v4 a0[4] = {{0}}, a1[4] = {{0}}, q, v;                                         \
            for (k = 0; k < W; k++) {                                                         \
                const float x0 = LD(r[t * stride + k]), x1 = two ? LD(r[(t + 1) * stride + k]) : 0.0f; \
                for (h = 0; h < 4; h++) {                                                     \
                    PK_V4_LOAD(q, qT + k * PK_HB + 4 * h);                                    \
                    a0[h] += q * x0;                                                          \
                    a1[h] += q * x1;                                                          \
                }                                                                             \
            }                                                                                 \
            for (h = 0; h < 4; h++) {                                                         \
                v = a0[h] * scale;                                                            \
                PK_V4_STORE(p + t * PK_HB + 4 * h, v);                                        \
                v = a1[h] * scale;                                                            \
                if (two) PK_V4_STORE(p + (t + 1) * PK_HB + 4 * h, v);                         \
            }                                                                                 \
        }                                                                                     \
    }
#else
#define PK_SCORES16_BODY(LD)                                                                  \
    {                                                                                         \
        int64_t t = 0, k, h;                                                                  \
        (void)avail, (void)ahead;                                                             \
        for (; t + 2 <= nt; t += 2) { /* two rows a tile: 32 sums, in registers (SSE: 8) */  \
            float a0[PK_HB], a1[PK_HB];                                                       \
            for (h = 0; h < PK_HB; h++) a0[h] = a1[h] = 0.0f;                                 \
            for (k = 0; k < W; k++) {                                                         \
                const float x0 = LD(r[t * stride + k]), x1 = LD(r[(t + 1) * stride + k]);     \
                for (h = 0; h < PK_HB; h++) {                                                 \
                    a0[h] += qT[k * PK_HB + h] * x0;                                          \
                    a1[h] += qT[k * PK_HB + h] * x1;                                          \
                }                                                                             \
            }                                                                                 \
            for (h = 0; h < PK_HB; h++) {                                                     \
                p[t * PK_HB + h] = a0[h] * scale;                                             \
                p[(t + 1) * PK_HB + h] = a1[h] * scale;                                       \
            }                                                                                 \
        }                                                                                     \
        for (; t < nt; t++) {                                                                 \
            float a0[PK_HB];                                                                  \
            for (h = 0; h < PK_HB; h++) a0[h] = 0.0f;                                         \
            for (k = 0; k < W; k++) {                                                         \
                const float x0 = LD(r[t * stride + k]);                                       \
                for (h = 0; h < PK_HB; h++) a0[h] += qT[k * PK_HB + h] * x0;                  \
            }                                                                                 \
            for (h = 0; h < PK_HB; h++) p[t * PK_HB + h] = a0[h] * scale;                     \
        }                                                                                     \
    }
#endif
/* Probabilities of one block of 16 heads over a chunk of nt rows, online (spec §8.3's softmax, one chunk at a
 * time): cm = max(m, the chunk's scores), p = exp(p - cm), corr = exp(m - cm) (1 where the max held, 0 on the
 * first chunk), l = l corr + sum_t p, m = cm. The caller scales the value sums by corr where it is not 1. */
#define PK_SOFTMAX16_BODY(EXP)                                                \
    {                                                                         \
        int64_t t, h;                                                         \
        for (h = 0; h < PK_HB; h++) {                                         \
            float cm = m[h], s = 0.0f;                                        \
            for (t = 0; t < nt; t++) cm = p[t * PK_HB + h] > cm ? p[t * PK_HB + h] : cm; \
            corr[h] = EXP(m[h] - cm);                                         \
            for (t = 0; t < nt; t++) {                                        \
                const float e = EXP(p[t * PK_HB + h] - cm);                   \
                p[t * PK_HB + h] = e;                                         \
                s += e;                                                       \
            }                                                                 \
            l[h] = l[h] * corr[h] + s;                                        \
            m[h] = cm;                                                        \
        }                                                                     \
    }
/* The value sums as an outer-product GEMM too, lanes = heads: o[c][0:16] += sum_t p[t][0:16] r_t[c] for the
 * columns c < R of nt rows (o: a block's o_lat transposed, [R][16]); o starts as 0 when fresh (the split's
 * first chunk: no zeroing pass), else is scaled by corr[0:16] unless that is NULL (the online softmax's
 * rescaling, free on the accumulators' load); each (column, head) sum is one chain over the rows in order.
 * Why: the earlier blocking inside the one pass (4 heads x 64 columns, rows as vectors, p broadcast) ran at
 * ~84 % of the FMA peak (195 TSC ticks a row at 16 heads x 512), this one at ~90 % (184). The scalar level
 * tiles 2 columns (GCC keeps 32 sums in SSE registers; it did not vectorise wider tiles well). */
#if defined(__GNUC__)
#define PK_VALUES16_BODY(LD)                                                                  \
    {                                                                                         \
        int64_t t, c = 0, h;                                                                  \
        pk_v4 cv[4], pv;                                                                      \
        for (h = 0; h < 4; h++) cv[h] = (pk_v4){1.0f, 1.0f, 1.0f, 1.0f};                      \
        if (corr)                                                                             \
            for (h = 0; h < 4; h++) PK_V4_LOAD(cv[h], corr + 4 * h);                          \
        for (; c < R; c += 2) { /* two columns a tile (the last one alone when R is odd) */   \
            const int two = c + 1 < R;                                                        \
            pk_v4 a0[4], a1[4];                                                               \
            for (h = 0; h < 4; h++) {                                                         \
                a0[h] = a1[h] = (pk_v4){0.0f, 0.0f, 0.0f, 0.0f};                              \
                if (!fresh) {                                                                 \
                    PK_V4_LOAD(a0[h], o + c * PK_HB + 4 * h);                                 \
                    if (two) PK_V4_LOAD(a1[h], o + (c + 1) * PK_HB + 4 * h);                  \
                    if (corr) a0[h] *= cv[h], a1[h] *= cv[h];                                 \
                }                                                                             \
            }                                                                                 \
            for (t = 0; t < nt; t++) {                                                        \
                const float x0 = LD(r[t * stride + c]), x1 = two ? LD(r[t * stride + c + 1]) : 0.0f; \
                for (h = 0; h < 4; h++) {                                                     \
                    PK_V4_LOAD(pv, p + t * PK_HB + 4 * h);                                    \
                    a0[h] += pv * x0;                                                         \
                    a1[h] += pv * x1;                                                         \
                }                                                                             \
            }                                                                                 \
            for (h = 0; h < 4; h++) {                                                         \
                PK_V4_STORE(o + c * PK_HB + 4 * h, a0[h]);                                    \
                if (two) PK_V4_STORE(o + (c + 1) * PK_HB + 4 * h, a1[h]);                     \
            }                                                                                 \
        }                                                                                     \
    }
#else
#define PK_VALUES16_BODY(LD)                                                                  \
    {                                                                                         \
        int64_t t, c = 0, h;                                                                  \
        for (; c < R; c += 2) { /* two columns a tile (the last one alone when R is odd) */   \
            const int two = c + 1 < R;                                                        \
            float a0[PK_HB], a1[PK_HB];                                                       \
            for (h = 0; h < PK_HB; h++) {                                                     \
                a0[h] = fresh ? 0.0f : corr ? o[c * PK_HB + h] * corr[h] : o[c * PK_HB + h];  \
                a1[h] = !two || fresh ? 0.0f : corr ? o[(c + 1) * PK_HB + h] * corr[h]        \
                                                    : o[(c + 1) * PK_HB + h];                 \
            }                                                                                 \
            for (t = 0; t < nt; t++) {                                                        \
                const float x0 = LD(r[t * stride + c]), x1 = two ? LD(r[t * stride + c + 1]) : 0.0f; \
                for (h = 0; h < PK_HB; h++) {                                                 \
                    a0[h] += p[t * PK_HB + h] * x0;                                           \
                    a1[h] += p[t * PK_HB + h] * x1;                                           \
                }                                                                             \
            }                                                                                 \
            for (h = 0; h < PK_HB; h++) {                                                     \
                o[c * PK_HB + h] = a0[h];                                                     \
                if (two) o[(c + 1) * PK_HB + h] = a1[h];                                      \
            }                                                                                 \
        }                                                                                     \
    }
#endif
static void values16_scalar(const float *p, const float *r, int64_t stride, int64_t nt, int64_t R, float *o,
                            const float *corr, int fresh)
    PK_VALUES16_BODY(PK_LD_F32)
static void values16h_scalar(const float *p, const uint16_t *r, int64_t stride, int64_t nt, int64_t R, float *o,
                             const float *corr, int fresh)
    PK_VALUES16_BODY(PK_LD_BF16)
static void scores16_scalar(const float *qT, const float *r, int64_t stride, int64_t W, int64_t nt, float *p,
                            float scale, int64_t avail, int64_t ahead) PK_SCORES16_BODY(PK_LD_F32)
static void scores16h_scalar(const float *qT, const uint16_t *r, int64_t stride, int64_t W, int64_t nt, float *p,
                             float scale, int64_t avail, int64_t ahead) PK_SCORES16_BODY(PK_LD_BF16)
static void softmax16_scalar(float *p, int64_t nt, float *m, float *l, float *corr) PK_SOFTMAX16_BODY(expf)

/* exp for the probabilities (arguments <= 0 but for rounding): Cephes' expf polynomial (degree 6 on
 * |r| <= ln2 / 2 after removing k ln2 in two parts: ~1 ulp, as glibc's expf) on 16 / 8 lanes; x is clamped
 * below (-104 at AVX-512, whose scalef then gives the denormal or 0 as expf does; -87.3 at AVX2, the
 * smallest normal 2^k: a probability <= 1.2e-38 is off by at most that, beside a sum >= 1). Why: glibc's
 * expf one element at a time was ~7 % of a 32k layer's attention (0.5 M exps: 16 heads x 32,768 rows). */
#define PK_EXP_C1 0.693359375f /* ln2 = C1 - C2, C1 exact in 10 bits: k C1 is exact for |k| < 2^14 */
#define PK_EXP_C2 -2.12194440e-4f
#define PK_EXP_POLY(FMA, SET1, y, r) /* (((((p0 r + p1) r + p2) r + p3) r + p4) r + p5) */ \
    y = SET1(1.9875691500e-4f);                                                           \
    y = FMA(y, r, SET1(1.3981999507e-3f));                                                \
    y = FMA(y, r, SET1(8.3334519073e-3f));                                                \
    y = FMA(y, r, SET1(4.1665795894e-2f));                                                \
    y = FMA(y, r, SET1(1.6666665459e-1f));                                                \
    y = FMA(y, r, SET1(5.0000001201e-1f))

#if PK_X86
#define PK_LDV8_F32(x) _mm256_loadu_ps(x)
#define PK_LDV8_BF16(x) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x))), 16))
/* acc2 (two ymm: the 16 heads) += (qa, qb) * x */
#define PK_FMA2(acc2, qa, qb, x)                                                                             \
    ((acc2)[0] = _mm256_fmadd_ps((qa), (x), (acc2)[0]), (acc2)[1] = _mm256_fmadd_ps((qb), (x), (acc2)[1]))
/* a score tile's NR rows, scaled, into p */
#define PK_SC_AVX2_STORE(NR)                                                                                 \
    for (j = 0; j < NR; j++)                                                                                 \
    _mm256_storeu_ps(p + PK_HB * j, _mm256_mul_ps(acc[j][0], sc)),                                           \
        _mm256_storeu_ps(p + PK_HB * j + 8, _mm256_mul_ps(acc[j][1], sc))
/* Scores at AVX2: the 16 heads are two ymm, so a tile of NR rows keeps 2 NR accumulators (f32: 6 rows, 12
 * ymm + 2 query vectors + the broadcast; bf16: 4 rows, the pair trick of the AVX-512 tile below needing 4
 * query vectors). */
#define PK_SC_AVX2_F32(NR)                                                                                   \
    PK_AVX2_INLINE void sc_avx2_##NR(const float *qT, const float *r, int64_t stride, int64_t W, float *p,   \
                                     __m256 sc) {                                                            \
        __m256 acc[NR][2];                                                                                   \
        int64_t k, j;                                                                                        \
        for (j = 0; j < NR; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();                                \
        for (k = 0; k < W; k++) {                                                                            \
            const __m256 q0 = _mm256_loadu_ps(qT + PK_HB * k), q1 = _mm256_loadu_ps(qT + PK_HB * k + 8);    \
            for (j = 0; j < NR; j++) {                                                                       \
                const __m256 x = _mm256_broadcast_ss(r + j * stride + k);                                    \
                PK_FMA2(acc[j], q0, q1, x);                                                                  \
            }                                                                                                \
        }                                                                                                    \
        PK_SC_AVX2_STORE(NR);                                                                                \
    }
#define PK_SC_AVX2_BF16(NR)                                                                                  \
    PK_AVX2_INLINE void sch_avx2_##NR(const float *qT, const uint16_t *r, int64_t stride, int64_t W,        \
                                      float *p, __m256 sc) {                                                 \
        const __m256i hm = _mm256_set1_epi32((int)0xFFFF0000u);                                              \
        __m256 acc[NR][2];                                                                                   \
        int64_t k, j;                                                                                        \
        for (j = 0; j < NR; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();                                \
        for (k = 0; k + 2 <= W; k += 2) {                                                                    \
            const __m256 q0 = _mm256_loadu_ps(qT + PK_HB * k), q1 = _mm256_loadu_ps(qT + PK_HB * k + 8);    \
            const __m256 q2 = _mm256_loadu_ps(qT + PK_HB * k + 16), q3 = _mm256_loadu_ps(qT + PK_HB * k + 24); \
            for (j = 0; j < NR; j++) {                                                                       \
                uint32_t d;                                                                                  \
                __m256i v;                                                                                   \
                __m256 x;                                                                                    \
                memcpy(&d, r + j * stride + k, sizeof d);                                                    \
                v = _mm256_set1_epi32((int)d);                                                               \
                x = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); /* element k */                          \
                PK_FMA2(acc[j], q0, q1, x);                                                                  \
                x = _mm256_castsi256_ps(_mm256_and_si256(v, hm)); /* element k + 1 */                       \
                PK_FMA2(acc[j], q2, q3, x);                                                                  \
            }                                                                                                \
        }                                                                                                    \
        if (k < W) {                                                                                         \
            const __m256 q0 = _mm256_loadu_ps(qT + PK_HB * k), q1 = _mm256_loadu_ps(qT + PK_HB * k + 8);    \
            for (j = 0; j < NR; j++) {                                                                       \
                const __m256 x = _mm256_set1_ps(bf16_to_f32(r[j * stride + k]));                            \
                PK_FMA2(acc[j], q0, q1, x);                                                                  \
            }                                                                                                \
        }                                                                                                    \
        PK_SC_AVX2_STORE(NR);                                                                                \
    }
/* Values at AVX2: a tile of NC columns keeps 2 NC accumulators (f32: 6 columns; bf16: 4, two pairs), loaded from
 * o (or zero for a split's first chunk) and rescaled by the online softmax's corr, stored back at the end. */
#define PK_VA_AVX2_LOAD(NC)                                                                                  \
    do {                                                                                                     \
        for (j = 0; j < NC; j++)                                                                             \
            acc[j][0] = fresh ? _mm256_setzero_ps() : _mm256_loadu_ps(o + PK_HB * j),                        \
            acc[j][1] = fresh ? _mm256_setzero_ps() : _mm256_loadu_ps(o + PK_HB * j + 8);                    \
        if (corr && !fresh)                                                                                  \
            for (j = 0; j < NC; j++) {                                                                       \
                acc[j][0] = _mm256_mul_ps(acc[j][0], _mm256_loadu_ps(corr));                                 \
                acc[j][1] = _mm256_mul_ps(acc[j][1], _mm256_loadu_ps(corr + 8));                             \
            }                                                                                                \
    } while (0)
#define PK_VA_AVX2_STORE(NC)                                                                                 \
    for (j = 0; j < NC; j++) _mm256_storeu_ps(o + PK_HB * j, acc[j][0]), _mm256_storeu_ps(o + PK_HB * j + 8, acc[j][1])
#define PK_VA_AVX2_F32(NC)                                                                                   \
    PK_AVX2_INLINE void va_avx2_##NC(const float *p, const float *r, int64_t stride, int64_t nt, float *o,  \
                                     const float *corr, int fresh) {                                         \
        __m256 acc[NC][2];                                                                                   \
        int64_t t, j;                                                                                        \
        PK_VA_AVX2_LOAD(NC);                                                                                 \
        for (t = 0; t < nt; t++) {                                                                           \
            const __m256 p0 = _mm256_loadu_ps(p + PK_HB * t), p1 = _mm256_loadu_ps(p + PK_HB * t + 8);      \
            for (j = 0; j < NC; j++) {                                                                       \
                const __m256 x = _mm256_broadcast_ss(r + t * stride + j);                                    \
                PK_FMA2(acc[j], p0, p1, x);                                                                  \
            }                                                                                                \
        }                                                                                                    \
        PK_VA_AVX2_STORE(NC);                                                                                \
    }
#define PK_VA_AVX2_BF16(NC)                                                                                  \
    PK_AVX2_INLINE void vah_avx2_##NC(const float *p, const uint16_t *r, int64_t stride, int64_t nt,        \
                                      float *o, const float *corr, int fresh) {                              \
        const __m256i hm = _mm256_set1_epi32((int)0xFFFF0000u);                                              \
        __m256 acc[NC][2];                                                                                   \
        int64_t t, j;                                                                                        \
        PK_VA_AVX2_LOAD(NC);                                                                                 \
        for (t = 0; t < nt; t++) {                                                                           \
            const __m256 p0 = _mm256_loadu_ps(p + PK_HB * t), p1 = _mm256_loadu_ps(p + PK_HB * t + 8);      \
            for (j = 0; j + 2 <= NC; j += 2) {                                                               \
                uint32_t d;                                                                                  \
                __m256i v;                                                                                   \
                __m256 x;                                                                                    \
                memcpy(&d, r + t * stride + j, sizeof d);                                                    \
                v = _mm256_set1_epi32((int)d);                                                               \
                x = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); /* column j */                           \
                PK_FMA2(acc[j], p0, p1, x);                                                                  \
                x = _mm256_castsi256_ps(_mm256_and_si256(v, hm)); /* column j + 1 */                        \
                PK_FMA2(acc[j + 1], p0, p1, x);                                                              \
            }                                                                                                \
            if (NC % 2) {                                                                                    \
                const __m256 x = _mm256_set1_ps(bf16_to_f32(r[t * stride + NC - 1]));                        \
                PK_FMA2(acc[NC - 1], p0, p1, x);                                                             \
            }                                                                                                \
        }                                                                                                    \
        PK_VA_AVX2_STORE(NC);                                                                                \
    }
PK_VA_AVX2_F32(6)
PK_VA_AVX2_F32(1)
PK_VA_AVX2_BF16(4)
PK_VA_AVX2_BF16(1)
/* A block of 16 heads' value sums over the R columns: tiles of NC columns (VA##_##NC), then one at a time; per
 * level and cache dtype T (f32 / bf16 bits). */
#define PK_VALUES16(NAME, ATTR, T, VA, NC)                                                                   \
    static ATTR void NAME(const float *p, const T *r, int64_t stride, int64_t nt, int64_t R, float *o,       \
                          const float *corr, int fresh) {                                                    \
        int64_t c = 0;                                                                                       \
        for (; c + NC <= R; c += NC) VA##_##NC(p, r + c, stride, nt, o + PK_HB * c, corr, fresh);             \
        for (; c < R; c++) VA##_1(p, r + c, stride, nt, o + PK_HB * c, corr, fresh);                         \
    }
PK_VALUES16(values16_avx2, PK_AVX2, float, va_avx2, 6)
PK_VALUES16(values16h_avx2, PK_AVX2, uint16_t, vah_avx2, 4)

PK_SC_AVX2_F32(6)
PK_SC_AVX2_F32(1)
PK_SC_AVX2_BF16(4)
PK_SC_AVX2_BF16(1)
/* A chunk's scores: tiles of NR rows (SC##_##NR), then one at a time (no prefetch at this level). */
#define PK_SCORES16_AVX2(NAME, T, SC, NR)                                                                    \
    static PK_AVX2 void NAME(const float *qT, const T *r, int64_t stride, int64_t W, int64_t nt, float *p,     \
                             float scale, int64_t avail, int64_t ahead) {                                    \
        const __m256 sc = _mm256_set1_ps(scale);                                                             \
        int64_t t = 0;                                                                                       \
        (void)avail, (void)ahead;                                                                            \
        for (; t + NR <= nt; t += NR) SC##_##NR(qT, r + t * stride, stride, W, p + PK_HB * t, sc);            \
        for (; t < nt; t++) SC##_1(qT, r + t * stride, stride, W, p + PK_HB * t, sc);                        \
    }
PK_SCORES16_AVX2(scores16_avx2, float, sc_avx2, 6)
PK_SCORES16_AVX2(scores16h_avx2, uint16_t, sch_avx2, 4)

PK_AVX2_INLINE __m256 exp_avx2(__m256 x) {
    __m256 n, r, y;
    __m256i e;
    x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x); /* NaN stays NaN */
    n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(PK_EXP_C1), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(PK_EXP_C2), r);
    PK_EXP_POLY(_mm256_fmadd_ps, _mm256_set1_ps, y, r);
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23); /* 2^n */
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* silu_mul_avx512 on 8 lanes (exp_avx2: below -87.3 it gives the smallest normal, 1 + e^-g is 1 either way) */
static PK_AVX2 void silu_mul_avx2(float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), hi = _mm256_set1_ps(88.7228394f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp_avx2(_mm256_min_ps(hi, _mm256_sub_ps(_mm256_setzero_ps(), x)));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
static PK_AVX2 void softmax16_avx2(float *p, int64_t nt, float *m, float *l, float *corr) {
    int64_t t, g;
    for (g = 0; g < PK_HB; g += 8) { /* the two halves of the block */
        const __m256 mo = _mm256_loadu_ps(m + g);
        __m256 cm = mo, s = _mm256_setzero_ps(), c;
        for (t = 0; t < nt; t++) cm = _mm256_max_ps(cm, _mm256_loadu_ps(p + PK_HB * t + g));
        for (t = 0; t < nt; t++) {
            const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + PK_HB * t + g), cm));
            _mm256_storeu_ps(p + PK_HB * t + g, e);
            s = _mm256_add_ps(s, e);
        }
        c = exp_avx2(_mm256_sub_ps(mo, cm));
        _mm256_storeu_ps(corr + g, c);
        _mm256_storeu_ps(l + g, _mm256_fmadd_ps(_mm256_loadu_ps(l + g), c, s));
        _mm256_storeu_ps(m + g, cm);
    }
}
#endif

#if PK_HAVE_AVX512
#define PK_LDV16_F32(x) _mm512_loadu_ps(x)
#define PK_LDV16_BF16(x) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x))), 16))
/* Scores at AVX-512: a tile of NR rows keeps NR zmm accumulators (16 heads each); per k one query vector and
 * NR broadcasts. bf16 rows: one 32-bit broadcast holds elements k and k + 1 (little endian: k in the low
 * half), shifted left 16 / masked to the high half they are the two widened values -- 2 integer operations per
 * 2 FMAs instead of a scalar widening per element. pf (or NULL): rows to prefetch into L1, a line of each of
 * the NR rows per 64 bytes read of this tile's. */
#define PK_SC_AVX512_F32(NR)                                                                                 \
    PK_AVX512_INLINE void sc_avx512_##NR(const float *qT, const float *r, int64_t stride, int64_t W, float *p, \
                                         __m512 sc, const float *pf) {                                       \
        __m512 acc[NR];                                                                                      \
        int64_t k, j;                                                                                        \
        for (j = 0; j < NR; j++) acc[j] = _mm512_setzero_ps();                                               \
        for (k = 0; k < W; k++) {                                                                            \
            const __m512 q = _mm512_loadu_ps(qT + PK_HB * k);                                                \
            if (pf && (k & 15) == 0)                                                                         \
                for (j = 0; j < NR; j++) _mm_prefetch((const char *)(pf + j * stride + k), _MM_HINT_T0);    \
            for (j = 0; j < NR; j++) acc[j] = _mm512_fmadd_ps(q, _mm512_set1_ps(r[j * stride + k]), acc[j]); \
        }                                                                                                    \
        for (j = 0; j < NR; j++) _mm512_storeu_ps(p + PK_HB * j, _mm512_mul_ps(acc[j], sc));                 \
    }
#define PK_SC_AVX512_BF16(NR)                                                                                \
    PK_AVX512_INLINE void sch_avx512_##NR(const float *qT, const uint16_t *r, int64_t stride, int64_t W,    \
                                          float *p, __m512 sc, const uint16_t *pf) {                         \
        const __m512i hm = _mm512_set1_epi32((int)0xFFFF0000u);                                              \
        __m512 acc[NR];                                                                                      \
        int64_t k, j;                                                                                        \
        for (j = 0; j < NR; j++) acc[j] = _mm512_setzero_ps();                                               \
        for (k = 0; k + 2 <= W; k += 2) {                                                                    \
            const __m512 q0 = _mm512_loadu_ps(qT + PK_HB * k), q1 = _mm512_loadu_ps(qT + PK_HB * k + PK_HB); \
            if (pf && (k & 31) == 0)                                                                         \
                for (j = 0; j < NR; j++) _mm_prefetch((const char *)(pf + j * stride + k), _MM_HINT_T0);    \
            for (j = 0; j < NR; j++) {                                                                       \
                uint32_t d;                                                                                  \
                __m512i v;                                                                                   \
                memcpy(&d, r + j * stride + k, sizeof d);                                                    \
                v = _mm512_set1_epi32((int)d);                                                               \
                acc[j] = _mm512_fmadd_ps(q0, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), acc[j]);        \
                acc[j] = _mm512_fmadd_ps(q1, _mm512_castsi512_ps(_mm512_and_si512(v, hm)), acc[j]);         \
            }                                                                                                \
        }                                                                                                    \
        if (k < W) {                                                                                         \
            const __m512 q0 = _mm512_loadu_ps(qT + PK_HB * k);                                               \
            for (j = 0; j < NR; j++)                                                                         \
                acc[j] = _mm512_fmadd_ps(q0, _mm512_set1_ps(bf16_to_f32(r[j * stride + k])), acc[j]);       \
        }                                                                                                    \
        for (j = 0; j < NR; j++) _mm512_storeu_ps(p + PK_HB * j, _mm512_mul_ps(acc[j], sc));                 \
    }
/* Values at AVX-512: a tile of NC columns keeps NC zmm accumulators (16 heads each); per row one probability
 * vector and NC broadcasts (bf16: NC / 2 pairs, as the scores). */
#define PK_VA_AVX512_F32(NC)                                                                                 \
    PK_AVX512_INLINE void va_avx512_##NC(const float *p, const float *r, int64_t stride, int64_t nt,        \
                                         float *o, const float *corr, int fresh) {                           \
        __m512 acc[NC];                                                                                      \
        int64_t t, j;                                                                                        \
        for (j = 0; j < NC; j++) acc[j] = fresh ? _mm512_setzero_ps() : _mm512_loadu_ps(o + PK_HB * j);      \
        if (corr && !fresh)                                                                                  \
            for (j = 0; j < NC; j++) acc[j] = _mm512_mul_ps(acc[j], _mm512_loadu_ps(corr));                  \
        for (t = 0; t < nt; t++) {                                                                           \
            const __m512 pt = _mm512_loadu_ps(p + PK_HB * t);                                                \
            for (j = 0; j < NC; j++) acc[j] = _mm512_fmadd_ps(pt, _mm512_set1_ps(r[t * stride + j]), acc[j]); \
        }                                                                                                    \
        for (j = 0; j < NC; j++) _mm512_storeu_ps(o + PK_HB * j, acc[j]);                                    \
    }
#define PK_VA_AVX512_BF16(NC)                                                                                \
    PK_AVX512_INLINE void vah_avx512_##NC(const float *p, const uint16_t *r, int64_t stride, int64_t nt,    \
                                          float *o, const float *corr, int fresh) {                          \
        const __m512i hm = _mm512_set1_epi32((int)0xFFFF0000u);                                              \
        __m512 acc[NC];                                                                                      \
        int64_t t, j;                                                                                        \
        for (j = 0; j < NC; j++) acc[j] = fresh ? _mm512_setzero_ps() : _mm512_loadu_ps(o + PK_HB * j);      \
        if (corr && !fresh)                                                                                  \
            for (j = 0; j < NC; j++) acc[j] = _mm512_mul_ps(acc[j], _mm512_loadu_ps(corr));                  \
        for (t = 0; t < nt; t++) {                                                                           \
            const __m512 pt = _mm512_loadu_ps(p + PK_HB * t);                                                \
            for (j = 0; j + 2 <= NC; j += 2) {                                                               \
                uint32_t d;                                                                                  \
                __m512i v;                                                                                   \
                memcpy(&d, r + t * stride + j, sizeof d);                                                    \
                v = _mm512_set1_epi32((int)d);                                                               \
                acc[j] = _mm512_fmadd_ps(pt, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), acc[j]);         \
                acc[j + 1] = _mm512_fmadd_ps(pt, _mm512_castsi512_ps(_mm512_and_si512(v, hm)), acc[j + 1]); \
            }                                                                                                \
            if (NC % 2)                                                                                      \
                acc[NC - 1] = _mm512_fmadd_ps(pt, _mm512_set1_ps(bf16_to_f32(r[t * stride + NC - 1])),       \
                                              acc[NC - 1]);                                                  \
        }                                                                                                    \
        for (j = 0; j < NC; j++) _mm512_storeu_ps(o + PK_HB * j, acc[j]);                                    \
    }
PK_VA_AVX512_F32(16)
PK_VA_AVX512_F32(1)
PK_VA_AVX512_BF16(16)
PK_VA_AVX512_BF16(1)
PK_VALUES16(values16_avx512, PK_AVX512, float, va_avx512, 16)
PK_VALUES16(values16h_avx512, PK_AVX512, uint16_t, vah_avx512, 16)

PK_SC_AVX512_F32(16)
PK_SC_AVX512_F32(4)
PK_SC_AVX512_F32(1)
PK_SC_AVX512_BF16(16)
PK_SC_AVX512_BF16(4)
PK_SC_AVX512_BF16(1)
/* A chunk's rows in tiles of 16 (NR 16: 16 accumulators, NR 24 spilled and ran at half the speed), then 4,
 * then 1. avail: rows readable from r (the visible rows left), ahead: the prefetch distance in rows. */
#define PK_SCORES16_AVX512(SC, T)                                                                     \
    {                                                                                                 \
        const __m512 sc = _mm512_set1_ps(scale);                                                      \
        int64_t t = 0;                                                                                \
        for (; t + 16 <= nt; t += 16)                                                                 \
            SC##_16(qT, r + t * stride, stride, W, p + PK_HB * t, sc,                                 \
                    t + ahead + 16 <= avail ? r + (t + ahead) * stride : (const T *)NULL);            \
        for (; t + 4 <= nt; t += 4) SC##_4(qT, r + t * stride, stride, W, p + PK_HB * t, sc, NULL);   \
        for (; t < nt; t++) SC##_1(qT, r + t * stride, stride, W, p + PK_HB * t, sc, NULL);           \
    }
static PK_AVX512 void scores16_avx512(const float *qT, const float *r, int64_t stride, int64_t W, int64_t nt,
                                      float *p, float scale, int64_t avail, int64_t ahead)
    PK_SCORES16_AVX512(sc_avx512, float)
static PK_AVX512 void scores16h_avx512(const float *qT, const uint16_t *r, int64_t stride, int64_t W, int64_t nt,
                                       float *p, float scale, int64_t avail, int64_t ahead)
    PK_SCORES16_AVX512(sch_avx512, uint16_t)

PK_AVX512_INLINE __m512 exp_avx512(__m512 x) {
    __m512 n, r, y;
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x); /* NaN stays NaN */
    n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(PK_EXP_C1), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(PK_EXP_C2), r);
    PK_EXP_POLY(_mm512_fmadd_ps, _mm512_set1_ps, y, r);
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n); /* y 2^n, to the denormal / 0 below 2^-126 */
}

/* g[i] = g[i] / (1 + e^-g[i]) * u[i], i < n: moe.silu(g) * u, the MoE's SwiGLU, with exp_avx512 (~1 ulp, as glibc's
 * expf). -g is clamped above at ln(FLT_MAX) (NaN stays NaN): e^-g is then inf where expf overflows, and g / inf the
 * -0 it gives. Why: one token's 8 experts are 11264 values a layer, 18-22 us with expf one at a time between the
 * MoE's two parallel calls (4 sequences: 45k, ~130 us). */
static PK_AVX512 void silu_mul_avx512(float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f), hi = _mm512_set1_ps(88.7228394f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 e = exp_avx512(_mm512_min_ps(hi, _mm512_sub_ps(_mm512_setzero_ps(), x)));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
static PK_AVX512 void softmax16_avx512(float *p, int64_t nt, float *m, float *l, float *corr) {
    const __m512 mo = _mm512_loadu_ps(m);
    __m512 cm = mo, s = _mm512_setzero_ps(), c;
    int64_t t;
    for (t = 0; t < nt; t++) cm = _mm512_max_ps(cm, _mm512_loadu_ps(p + PK_HB * t));
    for (t = 0; t < nt; t++) {
        const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(p + PK_HB * t), cm));
        _mm512_storeu_ps(p + PK_HB * t, e);
        s = _mm512_add_ps(s, e);
    }
    c = exp_avx512(_mm512_sub_ps(mo, cm));
    _mm512_storeu_ps(corr, c);
    _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), c, s));
    _mm512_storeu_ps(m, cm);
}
#endif

static void silu_mul_scalar(float *g, const float *u, int64_t n) {
    int64_t i;
    for (i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* silu(g) * u in place over g (moe.silu's x / (1 + e^-x)) at SIMD level simd; see silu_mul_avx512 */
static void silu_mul(int simd, float *g, const float *u, int64_t n) { PK_LEVEL_CALL(simd, silu_mul, (g, u, n)); }

/* ------------------------------------------------------------------- the vision attention's softmax (spec §6.3)
 * One row of scores in place: s = e^(s - max(s)), returns the sum (ops.exp_rows, unnormalised: vision_attention
 * divides P.V by it). Two passes over the row (max; exp, store and sum) instead of NumPy's four (max, subtract,
 * exp, sum), the exp the decode's vector one (~1 ulp). Why: at 896 px (4096 patches) NumPy's four passes over a
 * [256, 4096] tile took 366 of 948 ms of a block's attention on one thread (Intel Ice Lake); the two products
 * around it are BLAS. The sum is in f64 (lanes, then across them), rounded once: in f32 lanes a 4096-wide row's sum
 * was 3e-6 (one lane: 1.6e-5) from NumPy's pairwise one; converting costs little next to the exp. */
#if PK_HAVE_AVX512
static PK_AVX512 float exp_row_avx512(float *s, int64_t n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    float mx;
    double sum;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + i));
    mx = _mm512_reduce_max_ps(m);
    for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    m = _mm512_set1_ps(mx);
    for (i = 0; i + 16 <= n; i += 16) {
        const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
        _mm512_storeu_ps(s + i, e);
        a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    sum = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
    for (; i < n; i++) sum += (double)(s[i] = expf(s[i] - mx));
    return (float)sum;
}
#endif
#if PK_X86
static PK_AVX2 float exp_row_avx2(float *s, int64_t n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    float mx;
    double sum, dl[4];
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + i));
    mx = hmax8(m);
    for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    m = _mm256_set1_ps(mx);
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
        _mm256_storeu_ps(s + i, e);
        a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    _mm256_storeu_pd(dl, _mm256_add_pd(a0, a1));
    sum = (dl[0] + dl[1]) + (dl[2] + dl[3]);
    for (; i < n; i++) sum += (double)(s[i] = expf(s[i] - mx));
    return (float)sum;
}
#endif
static float exp_row_scalar(float *s, int64_t n) {
    float mx = -INFINITY;
    double sum = 0.0;
    int64_t i;
    for (i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    for (i = 0; i < n; i++) sum += (double)(s[i] = expf(s[i] - mx));
    return (float)sum;
}

/* The vision MLP's GELU, tanh form (spec §6 item 3, ops.gelu_tanh): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715
 * x^3), computed as x / (1 + e^(-2u)) (the same function: 1 + tanh(u) = 2 / (1 + e^(-2u))) with the vector exp,
 * -2u clamped at ln(FLT_MAX) as silu_mul does (e^(-2u) = inf: x / inf, the -0 or 0 the limit is). Why: NumPy's
 * definition makes eight passes and a tanh over the [rows, 4304] activations, 84 ms a block at 896 px on one thread
 * (Intel Ice Lake). */
#define PK_GELU_C 0.7978845608028654f /* sqrt(2 / pi) */
static float gelu_tanh1(float x) { return x / (1.0f + expf(-2.0f * PK_GELU_C * (x + 0.044715f * x * x * x))); }
#if PK_HAVE_AVX512
static PK_AVX512 void gelu_tanh_avx512(const float *x, int64_t n, float *out) {
    const __m512 one = _mm512_set1_ps(1.0f), hi = _mm512_set1_ps(88.7228394f), k = _mm512_set1_ps(0.044715f);
    const __m512 m2c = _mm512_set1_ps(-2.0f * PK_GELU_C);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        const __m512 u = _mm512_mul_ps(m2c, _mm512_fmadd_ps(_mm512_mul_ps(k, v), _mm512_mul_ps(v, v), v));
        _mm512_storeu_ps(out + i, _mm512_div_ps(v, _mm512_add_ps(one, exp_avx512(_mm512_min_ps(hi, u)))));
    }
    for (; i < n; i++) out[i] = gelu_tanh1(x[i]);
}
#endif
#if PK_X86
static PK_AVX2 void gelu_tanh_avx2(const float *x, int64_t n, float *out) {
    const __m256 one = _mm256_set1_ps(1.0f), hi = _mm256_set1_ps(88.7228394f), k = _mm256_set1_ps(0.044715f);
    const __m256 m2c = _mm256_set1_ps(-2.0f * PK_GELU_C);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 u = _mm256_mul_ps(m2c, _mm256_fmadd_ps(_mm256_mul_ps(k, v), _mm256_mul_ps(v, v), v));
        _mm256_storeu_ps(out + i, _mm256_div_ps(v, _mm256_add_ps(one, exp_avx2(_mm256_min_ps(hi, u)))));
    }
    for (; i < n; i++) out[i] = gelu_tanh1(x[i]);
}
#endif
static void gelu_tanh_scalar(const float *x, int64_t n, float *out) {
    int64_t i;
    for (i = 0; i < n; i++) out[i] = gelu_tanh1(x[i]);
}

void pk_gelu_tanh(const float *x, int64_t n, float *out) { PK_LEVEL_CALL(pk_get_simd(), gelu_tanh, (x, n, out)); }

void pk_exp_rows(float *s, int64_t rows, int64_t n, int64_t stride, float *den) {
    const int simd = pk_get_simd();
    int64_t r;
    for (r = 0; r < rows; r++) den[r] = PK_LEVEL_CALL(simd, exp_row, (s + r * stride, n));
}

static void values16_level(int simd, const float *p, const float *r, int64_t W, int64_t nt, int64_t R, float *o,
                           const float *corr, int fresh) {
    PK_LEVEL_CALL(simd, values16, (p, r, W, nt, R, o, corr, fresh));
}

static void values16h_level(int simd, const float *p, const uint16_t *r, int64_t W, int64_t nt, int64_t R,
                            float *o, const float *corr, int fresh) {
    PK_LEVEL_CALL(simd, values16h, (p, r, W, nt, R, o, corr, fresh));
}

static void scores16_level(int simd, const float *qT, const float *r, int64_t W, int64_t nt, float *p, float scale,
                           int64_t avail, int64_t ahead) {
    PK_LEVEL_CALL(simd, scores16, (qT, r, W, W, nt, p, scale, avail, ahead));
}

static void scores16h_level(int simd, const float *qT, const uint16_t *r, int64_t W, int64_t nt, float *p,
                            float scale, int64_t avail, int64_t ahead) {
    PK_LEVEL_CALL(simd, scores16h, (qT, r, W, W, nt, p, scale, avail, ahead));
}

static void softmax16_level(int simd, float *p, int64_t nt, float *m, float *l, float *corr) {
    PK_LEVEL_CALL(simd, softmax16, (p, nt, m, l, corr));
}

/* f32 -> bf16 bits, round to nearest even, NaN -> the quiet 0x7FC0: weights.f32_to_bf16 element for element
 * (the bf16 cache stores rows with it; the NumPy definition of the decode rounds with that function). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Interleaved RoPE (spec §8.3): pairs (x[2i], x[2i+1]) rotated by the angle whose cos / sin are cs[i] /
 * cs[half + i]. */
static void rope_pairs(const float *x, const float *cs, int64_t half, float *y) {
    int64_t i;
    for (i = 0; i < half; i++) {
        const float x0 = x[2 * i], x1 = x[2 * i + 1], c = cs[i], s = cs[half + i];
        y[2 * i] = x0 * c - x1 * s;
        y[2 * i + 1] = x0 * s + x1 * c;
    }
}

typedef struct {
    int64_t H, G, dn, dr, dv, R, W, N, nvis, nbk, rb, nsplit, nchunk, ss;
    const float *q, *cs, *rows, *sc;
    const uint16_t *rows16; /* a bf16 cache: rows16 set, rows NULL (and the other way round for f32) */
    const char *kvb;
    float scale, *out;
    /* scratch: qc [H][W] = [q_lat | rope(q_pe)] per head; qT [G][W][16] the same per block of 16 heads,
     * transposed (mla_transpose); o_lat [H][R]; the splits' states [nsplit][ss] (mla_split) */
    float *qc, *qT, *ol, *st;
    int fmt, act, simd;
} pk_mla;

/* One pass over the cache (flash-decoding): the visible rows are cut into chunks of PK_MLA_CHUNK rows and the
 * chunks into at most PK_MLA_SPLITS splits (contiguous runs of chunks, the parallel tasks). A split walks its
 * chunks in order: the chunk's scores for every head, then at once those rows' value sums with an online
 * softmax (running max m and sum l per head; the split's o_lat rescaled when m grows), so each row is read
 * from memory once and reused from L1 / L2. The splits' (m, l, o) are then merged per head. The cuts depend
 * on the number of visible rows only -- not on the threads, nor on the batch -- so a sequence's result is
 * the same bits alone, in a batch and at any thread count. Why: the two-pass form (all scores, softmax, then
 * all values) read the f32 cache twice and ran at ~52-65 G multiply-adds a second at 32k on Zen 5 (2 cores).
 * At most PK_MLA_SPLITS states (o_lat [H][R] each) are merged: 32 x 16 heads x 512 = 0.26 M multiply-adds,
 * 2 % of a 1k-row attention, nothing at 32k; a short cache still gets up to 32 tasks for the threads. */
#define PK_MLA_CHUNK 32  /* cache rows per chunk (a multiple of 16, the score tile): 74 KB of f32 rows */
#define PK_MLA_SPLITS 32 /* parallel tasks (and merged states) per sequence at most */
#define PK_MLA_AHEAD 32  /* rows between the score tile and the rows it prefetches */

static int64_t mla_align16(int64_t n) { return (n + 15) & ~(int64_t)15; } /* floats: 64-byte multiples */

/* Head h's query in latent space: qc[h] = [q_nope W_uk[h] | rope(q_pe)] (W_uk[h] rows decoded once). */
static void mla_query(const pk_mla *m, int64_t h) {
    const float *qh = m->q + h * (m->dn + m->dr);
    const int64_t uk = h * (m->dn + m->dv); /* W_uk[h] = kv_b_proj rows uk .. uk + dn */
    float *qc = m->qc + h * m->W;
    vecmat_level(m->simd, m->fmt, qh, m->dn, m->R, m->kvb + uk * m->rb, m->sc ? m->sc + uk * m->nbk : NULL, qc);
    rope_pairs(qh + m->dn, m->cs, m->dr / 2, qc + m->R);
}

/* Line i of qT (element i % W of the queries of head block i / W, heads past H zero), once every qc is done.
 * Why a phase of its own: each head's task writing its lane of every line made the two cores share all of
 * qT's lines (~20 us a layer at short caches); a copy per split cost ~2.5 us per split. */
static void mla_transpose(const pk_mla *m, int64_t i) {
    const int64_t g = i / m->W, k = i % m->W;
    float *qT = m->qT + i * PK_HB;
    int64_t h;
    for (h = 0; h < PK_HB; h++) qT[h] = g * PK_HB + h < m->H ? m->qc[(g * PK_HB + h) * m->W + k] : 0.0f;
}

/* Scaled scores of cache rows [t0, t0 + nt) for every block of 16 heads into p [G][PK_MLA_CHUNK][16]; the
 * first block prefetches the rows PK_MLA_AHEAD ahead (the later blocks find the chunk in L1 / L2). */
static void mla_chunk_scores(const pk_mla *m, const float *qT0, int64_t t0, int64_t nt, float *p) {
    const int64_t W = m->W;
    int64_t g;
    for (g = 0; g < m->G; g++) {
        const float *qT = qT0 + g * W * PK_HB;
        float *pg = p + g * PK_MLA_CHUNK * PK_HB;
        const int64_t avail = g ? 0 : m->nvis - t0;
        if (m->rows16)
            scores16h_level(m->simd, qT, m->rows16 + t0 * W, W, nt, pg, m->scale, avail, PK_MLA_AHEAD);
        else
            scores16_level(m->simd, qT, m->rows + t0 * W, W, nt, pg, m->scale, avail, PK_MLA_AHEAD);
    }
}

/* Split k: its chunks in order, each scored for every head, its probabilities exp(s - m) against the running
 * max m (softmax16: when a chunk raises m, the split's sum l and -- in values16 -- its o_lat are scaled by
 * exp(m_old - m_new), as the definition's softmax subtracts the max), then its rows' value sums (values16:
 * the chunk's rows are still in L1 / L2). State k: o [G][R][16] (o_lat of each block of 16 heads,
 * transposed) | m [G * 16] | l [G * 16] | corr [G * 16] | p [G][PK_MLA_CHUNK][16]. */
static void mla_split(const pk_mla *m, int64_t k) {
    const int64_t R = m->R, G = m->G, W = m->W, c0 = m->nchunk * k / m->nsplit;
    const int64_t c1 = m->nchunk * (k + 1) / m->nsplit, ob = R * PK_HB; /* one block's o */
    float *o = m->st + k * m->ss, *mx = o + G * ob, *l = mx + G * PK_HB, *corr = l + G * PK_HB;
    float *p = corr + G * PK_HB;
    int64_t c, g, h;
    for (h = 0; h < G * PK_HB; h++) mx[h] = -INFINITY, l[h] = 0.0f;
    for (c = c0; c < c1; c++) {
        const int64_t t0 = c * PK_MLA_CHUNK, nt = m->nvis - t0 < PK_MLA_CHUNK ? m->nvis - t0 : PK_MLA_CHUNK;
        mla_chunk_scores(m, m->qT, t0, nt, p);
        for (g = 0; g < G; g++) {
            float *pg = p + g * PK_MLA_CHUNK * PK_HB, *og = o + g * ob, *cg = corr + g * PK_HB;
            int any = 0;
            softmax16_level(m->simd, pg, nt, mx + g * PK_HB, l + g * PK_HB, cg);
            for (h = 0; h < PK_HB; h++) any |= cg[h] != 1.0f;
            if (c == c0 || !any) /* nothing to rescale: o starts fresh at the first chunk, or no max moved */
                cg = NULL;
            if (m->rows16)
                values16h_level(m->simd, pg, m->rows16 + t0 * W, W, nt, R, og, cg, c == c0);
            else
                values16_level(m->simd, pg, m->rows + t0 * W, W, nt, R, og, cg, c == c0);
        }
    }
}

/* ol [R] = o_lat[h] = sum_k e^(m_k - M) o_k[h] / sum_k e^(m_k - M) l_k[h] over the splits in order (M: their
 * max); ol is m->ol + h * R, or the batch's gathered row (mla_output_batch). */
static void mla_merge(const pk_mla *m, int64_t h, float *ol) {
    const int64_t R = m->R, om = m->G * R * PK_HB, ol_ = om + m->G * PK_HB; /* offsets of m and l in a state */
    const int64_t oh = (h / PK_HB) * R * PK_HB + h % PK_HB;                 /* head h's column 0 in o */
    float big = -INFINITY, L = 0.0f;
    int64_t k, i;
    for (k = 0; k < m->nsplit; k++) {
        const float mk = m->st[k * m->ss + om + h];
        big = mk > big ? mk : big;
    }
    for (i = 0; i < R; i++) ol[i] = 0.0f;
    for (k = 0; k < m->nsplit; k++) {
        const float *st = m->st + k * m->ss, *ok = st + oh;
        const float wk = expf(st[om + h] - big);
        L += wk * st[ol_ + h];
        for (i = 0; i < R; i++) ol[i] += wk * ok[i * PK_HB];
    }
    for (i = 0; i < R; i++) ol[i] /= L;
}

/* o[h] = W_uv[h] o_lat[h]: one row of x through the matmul path (activation mode included). */
static void mla_output(const pk_mla *m, int64_t h) {
    const int64_t uv = h * (m->dn + m->dv) + m->dn; /* W_uv[h] = kv_b_proj rows uv .. uv + dv */
    pk_job j;
    job_set(&j, m->fmt, m->act, m->ol + h * m->R, 1, m->R, m->kvb + uv * m->rb, m->sc ? m->sc + uv * m->nbk : NULL,
            m->dv, m->out + h * m->dv);
    j.nb = m->nbk;
    job_prepare(&j, m->simd);
    job_rows(&j, 0, m->dv, m->simd);
    job_free(&j);
}

/* mla_query for head h of the B sequences ms[0 .. B) (one batch: the same weights, level and shapes): at the
 * AVX-512 level with R % 32 == 0 the head's W_uk rows are decoded once per group of up to PK_VM_NS sequences
 * (vecmat_multi_avx512), otherwise vecmat_level per sequence -- the same bits either way. */
static void mla_query_batch(const pk_mla *ms, int64_t B, int64_t h) {
    const pk_mla *m = &ms[0];
    const int64_t uk = h * (m->dn + m->dv), qo = h * (m->dn + m->dr); /* W_uk[h]; head h's q in a sequence */
    const char *w = m->kvb + uk * m->rb;
    const float *sc = m->sc ? m->sc + uk * m->nbk : NULL;
    int64_t b;
#if PK_HAVE_AVX512
    if (m->simd >= 2 && m->R % 32 == 0) {
        const int64_t ng = (B + PK_VM_NS - 1) / PK_VM_NS; /* groups of (nearly) equal size */
        int64_t g;
        for (g = 0; g < ng; g++) {
            const int64_t b0 = B * g / ng, b1 = B * (g + 1) / ng;
            const float *x[PK_VM_NS];
            float *y[PK_VM_NS];
            for (b = b0; b < b1; b++) {
                x[b - b0] = ms[b].q + qo;
                y[b - b0] = ms[b].qc + h * m->W;
            }
            vecmat_multi_avx512(m->fmt, (int)(b1 - b0), x, m->dn, m->R, w, m->rb, sc, m->nbk, y);
        }
    } else
#endif
    {
        for (b = 0; b < B; b++) vecmat_level(m->simd, m->fmt, ms[b].q + qo, m->dn, m->R, w, sc, ms[b].qc + h * m->W);
    }
    for (b = 0; b < B; b++) rope_pairs(ms[b].q + qo + m->dn, ms[b].cs, m->dr / 2, ms[b].qc + h * m->W + m->R);
}

/* mla_merge and mla_output for head h of the B sequences ms[0 .. B): their o_lat rows merged into ol [B][R],
 * then ONE job of B rows of x asking for the row kernels (A_ROWS: a row gets what it gets alone, i.e. the 1-row
 * job of mla_output), into y [B][dv], copied to each sequence's out. Why: per (sequence, head) a 1-row job
 * quantized its row, allocated 4-5 buffers and ran the row kernel on the head's 128 W_uv rows alone; the Q4 x
 * int8 row kernel takes 4.06 / 9.97 cycles per 128 weights at 1 / 4 rows of x (Zen 5). */
static void mla_output_batch(const pk_mla *ms, int64_t B, int64_t h, float *ol, float *y) {
    const pk_mla *m = &ms[0];
    const int64_t uv = h * (m->dn + m->dv) + m->dn; /* W_uv[h] = kv_b_proj rows uv .. uv + dv */
    pk_job j;
    int64_t b;
    for (b = 0; b < B; b++) mla_merge(&ms[b], h, ol + b * m->R);
    job_set(&j, m->fmt, m->act | A_ROWS, ol, B, m->R, m->kvb + uv * m->rb, m->sc ? m->sc + uv * m->nbk : NULL,
            m->dv, y);
    j.nb = m->nbk;
    job_prepare(&j, m->simd);
    job_rows(&j, 0, m->dv, m->simd);
    job_free(&j);
    for (b = 0; b < B; b++) memcpy(ms[b].out + h * m->dv, y + b * m->dv, sizeof(float) * (size_t)m->dv);
}

/* One sequence's scratch, in floats (mla_prepare's layout; the batch puts all of theirs in one allocation):
 * qc [H][W] | qT [G][W][16] | ol [H][R] | cos, sin [dr] | the new row [W] | the splits' states, each region
 * 64-byte aligned. o[0..4]: the offsets of qT, ol, cos, the new row and the states; returns the total, a
 * multiple of 16. */
static int64_t mla_layout(int64_t heads, int64_t dr, int64_t R, int64_t pos, int64_t n, int64_t o[5]) {
    const int64_t W = R + dr, N = n + 1, nvis = pos + 1 < N ? pos + 1 : N;
    const int64_t nchunk = (nvis + PK_MLA_CHUNK - 1) / PK_MLA_CHUNK;
    const int64_t nsplit = nchunk < PK_MLA_SPLITS ? nchunk : PK_MLA_SPLITS;
    const int64_t G = (heads + PK_HB - 1) / PK_HB;
    o[0] = mla_align16(heads * W);
    o[1] = o[0] + G * W * PK_HB;
    o[2] = o[1] + mla_align16(heads * R);
    o[3] = o[2] + mla_align16(dr);
    o[4] = o[3] + mla_align16(W);
    return o[4] + nsplit * mla_align16(G * PK_HB * (R + 3 + PK_MLA_CHUNK));
}

static int64_t mla_scratch_floats(int64_t heads, int64_t dr, int64_t R, int64_t pos, int64_t n) {
    int64_t o[5];
    return mla_layout(heads, dr, R, pos, n, o);
}

/* One sequence's setup, shared by pk_mla_absorbed and pk_mla_absorbed_batch (so the batch is bit for bit the
 * single calls): the pk_mla record over the caller's scratch buf (mla_scratch_floats floats, 64-byte aligned)
 * and the new cache row n.
 * The row is built in f32 -- the kv_a_layernorm'ed latent (f32 statistics, spec §8.2) | the rotated k_pe
 * (spec §8.3) -- then stored as it is (f32 cache) or rounded to nearest even (bf16 cache, cdt 1); the scores
 * read it back from the cache like every other row, so the new token sees its own key as cached. */
static void mla_prepare(pk_mla *m, int64_t heads, int64_t dn, int64_t dr, int64_t dv, int64_t R, const float *q,
                       const float *kva, const float *ln, float eps, const float *inv_freq, int64_t pos,
                       void *rows, int cdt, int64_t n, int fmt, int act, const void *kvb, const float *kvb_scales,
                       float scale, float *out, float *buf) {
    const int64_t W = R + dr, N = n + 1, half = dr / 2, nvis = pos + 1 < N ? pos + 1 : N;
    const int64_t nchunk = (nvis + PK_MLA_CHUNK - 1) / PK_MLA_CHUNK;
    const int64_t nsplit = nchunk < PK_MLA_SPLITS ? nchunk : PK_MLA_SPLITS;
    const int64_t G = (heads + PK_HB - 1) / PK_HB; /* blocks of 16 heads */
    const int64_t sts = mla_align16(G * PK_HB * (R + 3 + PK_MLA_CHUNK)); /* one split's state */
    int64_t o[5]; /* offsets in buf of qT, ol, cos / sin, the new row, the states (qc at 0) */
    float *cs, *nr;
    double ss = 0.0;
    int64_t i;
    mla_layout(heads, dr, R, pos, n, o);
    m->H = heads, m->G = G, m->dn = dn, m->dr = dr, m->dv = dv, m->R = R, m->W = W, m->N = N;
    m->nvis = nvis; /* causal: keys after the query's position are masked */
    m->nchunk = nchunk, m->nsplit = nsplit, m->ss = sts;
    m->nbk = (R + PK_BLOCK - 1) / PK_BLOCK, m->rb = row_bytes_of(fmt, R);
    m->q = q, m->sc = kvb_scales, m->kvb = (const char *)kvb;
    m->rows = cdt ? NULL : (const float *)rows;
    m->rows16 = cdt ? (const uint16_t *)rows : NULL;
    m->scale = scale, m->out = out, m->fmt = fmt, m->act = act, m->simd = pk_get_simd();
    m->qc = buf, m->qT = buf + o[0], m->ol = buf + o[1], m->st = buf + o[4];
    cs = buf + o[2]; /* cos [half] | sin [half] of angle_i = pos * inv_freq_i (f32) */
    nr = buf + o[3];
    for (i = 0; i < half; i++) {
        const float a = (float)pos * inv_freq[i];
        cs[i] = cosf(a);
        cs[half + i] = sinf(a);
    }
    m->cs = cs;
    for (i = 0; i < R; i++) ss += (double)kva[i] * (double)kva[i];
    {
        const float inv = 1.0f / sqrtf((float)(ss / (double)R) + eps);
        for (i = 0; i < R; i++) nr[i] = kva[i] * inv * ln[i];
    }
    rope_pairs(kva + R, cs, half, nr + R);
    if (cdt) {
        uint16_t *row = (uint16_t *)rows + n * W;
        for (i = 0; i < W; i++) row[i] = f32_to_bf16(nr[i]);
    } else {
        memcpy((float *)rows + n * W, nr, sizeof(float) * (size_t)W);
    }
}

/* See the header. Why: the absorbed decode was ~15 NumPy calls per layer and token around two kernel calls
 * (norm, RoPE twice, concatenation, scores, softmax, the value sum); at 27 layers that glue cost more than
 * the attention's arithmetic. One parallel region, four phases split between the threads: queries (per
 * head), their transposition (per line of qT), the one pass over the cache (per split of the rows,
 * mla_split), the merge of the splits and the output (per head). Why one pass: 27 layers int4 on Zen 5 (2
 * cores, f32 cache, bench_longctx, the same minutes) went from 104-114 / 287 ms a token at 8k / 32k cached to
 * 64-70 / 128-131 ms; one layer's attention alone (32k, /tmp kernel timing) 8.7 -> 3.0 ms. NumPy twin:
 * attention.mla_absorbed. */
static int mla_absorbed_run(int64_t heads, int64_t dn, int64_t dr, int64_t dv, int64_t R, const float *q,
                            const float *kva, const float *ln, float eps, const float *inv_freq, int64_t pos,
                            void *rows, int cdt, int64_t n, int fmt, int act, const void *kvb,
                            const float *kvb_scales, float scale, float *out, const pk_linear *o_proj, float *y) {
    const int nth = pk_get_threads();
    pk_job oj; /* o_proj: y [out] = out [heads * dv] @ W_o^T (only with o_proj) */
    float *scratch = NULL;
    pk_mla m;
    if (fmt < F_F32 || fmt > F_Q4 || cdt < 0 || cdt > 1) return -2;
    if (heads < 1 || R < 1 || dn < 1 || dv < 1 || dr < 0 || dr % 2 || pos < 0 || n < 0) return -3;
    if (o_proj && (o_proj->fmt < F_F32 || o_proj->fmt > F_Q4)) return -2;
    if (o_proj && (o_proj->n_in != heads * dv || o_proj->n_out < 0)) return -3;
    scratch = (float *)pk_amalloc(sizeof(float) * (size_t)mla_scratch_floats(heads, dr, R, pos, n));
    if (!scratch) return -1;
    mla_prepare(&m, heads, dn, dr, dv, R, q, kva, ln, eps, inv_freq, pos, rows, cdt, n, fmt, act, kvb, kvb_scales,
                scale, out, scratch);
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        int64_t k;
#pragma omp for schedule(static)
        for (k = 0; k < heads; k++) mla_query(&m, k);
#pragma omp for schedule(static)
        for (k = 0; k < m.G * m.W; k++) mla_transpose(&m, k);
#pragma omp for schedule(dynamic, 1)
        for (k = 0; k < m.nsplit; k++) mla_split(&m, k);
#pragma omp for schedule(static)
        for (k = 0; k < heads; k++) {
            mla_merge(&m, k, m.ol + k * m.R);
            mla_output(&m, k);
        }
        if (o_proj) {
            /* o_proj in the same region: the job is kernels.matmul's for one row of x (run_jobs: prepared
             * once -- the activation quantization of its mode --, then its rows in chunks), so y equals
             * matmul(out, o_proj) bit for bit; each output row's sum does not depend on the chunking. */
            const int64_t nch = o_proj->n_out < 8 * (int64_t)nth ? o_proj->n_out : 8 * (int64_t)nth;
#pragma omp single
            {
                job_set(&oj, o_proj->fmt, o_proj->act, out, 1, o_proj->n_in, o_proj->w, o_proj->scales,
                        o_proj->n_out, y);
                oj.nb = (oj.in + PK_BLOCK - 1) / PK_BLOCK;
                job_prepare(&oj, m.simd);
            }
#pragma omp for schedule(dynamic, 1)
            for (k = 0; k < nch; k++) job_rows(&oj, o_proj->n_out * k / nch, o_proj->n_out * (k + 1) / nch, m.simd);
        }
    }
    if (o_proj) job_free(&oj);
    (void)nth; /* unused without OpenMP */
    free(scratch);
    return 0;
}

int pk_mla_absorbed(int64_t heads, int64_t dn, int64_t dr, int64_t dv, int64_t R, const float *q, const float *kva,
                    const float *ln, float eps, const float *inv_freq, int64_t pos, void *rows, int cdt, int64_t n,
                    int fmt, int act, const void *kvb, const float *kvb_scales, float scale, float *out) {
    return mla_absorbed_run(heads, dn, dr, dv, R, q, kva, ln, eps, inv_freq, pos, rows, cdt, n, fmt, act, kvb,
                            kvb_scales, scale, out, NULL, NULL);
}

/* pk_mla_absorbed, then o_proj in the same parallel region (see the header). Why: the separate o_proj GEMV
 * was one more Python call, argument conversion and thread fork/join per layer and token. */
int pk_mla_absorbed_o(int64_t heads, int64_t dn, int64_t dr, int64_t dv, int64_t R, const float *q, const float *kva,
                      const float *ln, float eps, const float *inv_freq, int64_t pos, void *rows, int cdt,
                      int64_t n, int fmt, int act, const void *kvb, const float *kvb_scales, float scale,
                      const pk_linear *o_proj, float *out, float *y) {
    if (!o_proj) return -3;
    return mla_absorbed_run(heads, dn, dr, dv, R, q, kva, ln, eps, inv_freq, pos, rows, cdt, n, fmt, act, kvb,
                            kvb_scales, scale, out, o_proj, y);
}

/* --------------------------------------------------------------- MoE FFN of a decode batch (serve engine)
 * pk_swiglu_sum for B tokens at once, each chosen expert's weights read once per call (continuous batching:
 * decode is bound by reading weights, so B sequences that share an expert share its bytes). Row b's result
 * is bit for bit pk_swiglu_sum of row b with its experts in the order sel[b][0..nsel[b]): the rows that chose
 * an expert are gathered into one job per projection that asks for the row kernels (A_ROWS), whose result for
 * one row of x does not depend on the other rows. silu and the weighted sum are pk_swiglu_sum's expressions in
 * the same order. */
int pk_swiglu_batch(int count, const pk_expert *experts, const float *x, int64_t B, int64_t d, int kmax,
                    const int *nsel, const int *sel, const float *coef, float *out) {
    int64_t *nrows = NULL, *first = NULL, *slot = NULL, *goff = NULL;
    float *xg = NULL, *gu = NULL, *ys = NULL;
    pk_job *jobs = NULL;
    int64_t b, tot_rows = 0, tot_gu = 0, njobs = 0;
    int k, j, rc = 0;
    if (count < 0 || B < 0 || d < 0 || kmax < 0) return -3;
    nrows = (int64_t *)calloc((size_t)count + 1, sizeof(int64_t));
    first = (int64_t *)calloc((size_t)count + 1, sizeof(int64_t));
    goff = (int64_t *)calloc((size_t)count + 1, sizeof(int64_t));
    slot = (int64_t *)malloc(sizeof(int64_t) * (size_t)(B * kmax + 1));
    if (!nrows || !first || !goff || !slot) {
        rc = -1;
        goto done;
    }
    for (k = 0; k < count; k++)
        if (experts[k].fmt < F_F32 || experts[k].fmt > F_Q4) {
            rc = -2;
            goto done;
        }
    /* rows per expert; slot[b][j] = the position of row b among the rows of its j-th expert */
    for (b = 0; b < B; b++) {
        if (nsel[b] < 0 || nsel[b] > kmax) {
            rc = -3;
            goto done;
        }
        for (j = 0; j < nsel[b]; j++) {
            const int e = sel[b * kmax + j];
            if (e < 0 || e >= count) {
                rc = -3;
                goto done;
            }
            slot[b * kmax + j] = nrows[e]++;
        }
    }
    for (k = 0; k < count; k++) {
        first[k] = tot_rows;                   /* the expert's rows in xg / ys start here */
        goff[k] = tot_gu;                      /* its gate (then up) block in gu */
        tot_rows += nrows[k];
        tot_gu += 2 * nrows[k] * experts[k].inter;
        njobs += nrows[k] > 0;
    }
    xg = (float *)pk_amalloc(sizeof(float) * (size_t)(tot_rows * d + 1));
    ys = (float *)pk_amalloc(sizeof(float) * (size_t)(tot_rows * d + 1));
    gu = (float *)pk_amalloc(sizeof(float) * (size_t)(tot_gu + 1));
    jobs = (pk_job *)malloc(sizeof(pk_job) * (size_t)(2 * njobs + 1));
    if (!xg || !ys || !gu || !jobs) {
        rc = -1;
        goto done;
    }
    for (b = 0; b < B; b++) /* gather: row b into the block of each of its experts */
        for (j = 0; j < nsel[b]; j++) {
            const int e = sel[b * kmax + j];
            const int64_t r = first[e] + slot[b * kmax + j];
            memcpy(xg + r * d, x + b * d, sizeof(float) * (size_t)d);
        }
    /* gate and up: expert k's rows in one job each; g [n_k, I_k] at gu + goff, u right after it */
    {
        int64_t nj = 0;
        for (k = 0; k < count; k++) {
            const pk_expert *e = &experts[k];
            float *g = gu + goff[k], *u = g + nrows[k] * e->inter;
            const float *xk = xg + first[k] * d;
            if (nrows[k] == 0) continue;
            job_set(&jobs[nj++], e->fmt, e->act | A_ROWS, xk, nrows[k], d, e->g, e->sg, e->inter, g);
            job_set(&jobs[nj++], e->fmt, e->act | A_ROWS, xk, nrows[k], d, e->u, e->su, e->inter, u);
        }
        run_jobs(jobs, (int)nj);
        /* silu(g) * u, in place over g, as pk_swiglu_sum; per expert on the threads from 4 sequences' worth (32
         * expert rows: 45k values a layer) */
#pragma omp parallel for schedule(dynamic, 1) num_threads(pk_get_threads()) if (tot_gu >= 65536 && pk_get_threads() > 1)
        for (k = 0; k < count; k++) {
            float *g = gu + goff[k];
            silu_mul(pk_get_simd(), g, g + nrows[k] * experts[k].inter, nrows[k] * experts[k].inter);
        }
        nj = 0;
        for (k = 0; k < count; k++) {
            const pk_expert *e = &experts[k];
            if (nrows[k] == 0) continue;
            job_set(&jobs[nj++], e->fmt, e->act | A_ROWS, gu + goff[k], nrows[k], e->inter, e->d, e->sd, d,
                    ys + first[k] * d);
        }
        run_jobs(jobs, (int)nj);
    }
    /* weighted sum per row in its experts' order (as pk_swiglu_sum); the rows on the threads (12-19 us a layer at
     * 4 sequences on one) */
#pragma omp parallel for schedule(static) num_threads(pk_get_threads()) if (B > 1 && pk_get_threads() > 1)
    for (b = 0; b < B; b++) {
        float *o = out + b * d;
        int64_t q;
        int jj;
        for (q = 0; q < d; q++) o[q] = 0.0f;
        for (jj = 0; jj < nsel[b]; jj++) {
            const float c = coef[b * kmax + jj];
            const float *y = ys + (first[sel[b * kmax + jj]] + slot[b * kmax + jj]) * d;
            for (q = 0; q < d; q++) o[q] += c * y[q];
        }
    }
done:
    free(nrows);
    free(first);
    free(goff);
    free(slot);
    free(xg);
    free(ys);
    free(gu);
    free(jobs);
    return rc;
}

/* ------------------------------------------------------ absorbed MLA attention of a decode batch (serve engine)
 * pk_mla_absorbed for B sequences, each against its own cache, in ONE parallel region, so a layer pays one fork
 * and four barriers instead of B of each (on a shared 2-core machine a barrier waits for a descheduled thread,
 * which made 8 single calls cost ~25x their arithmetic). The queries and the outputs go per head for all B
 * sequences (mla_query_batch: W_uk[h] decoded once per up to 8 sequences; mla_output_batch: one job of B rows
 * on W_uv[h]), the transposition and the splits per (sequence, item); every item computes each sequence's
 * values with the single call's operations and the per-sequence setup is pk_mla_absorbed's, so each
 * sequence's cache row and output are bit for bit those of pk_mla_absorbed (tests/test_engine.py compares
 * whole decode steps and the kernel at B = 1..10). Why per head: per (sequence, head) each head's W_uk was
 * decoded B times and B * heads 1-row jobs (quantization, 4-5 allocations each) ran; 27 layers int4, mode all,
 * 40-row caches, AMD EPYC Zen 5, 2 threads (bench/profile_decode.py, two runs each): 6.0-7.7 -> 3.9-4.1 ms a
 * step at 4 sequences, 11.4-11.8 -> 6.7-7.0 ms at 8. q [B][heads*(dn+dr)], kva [B][R+dr],
 * pos[b], rows[b] (that sequence's cache buffer, n[b] rows held, row n[b] written), out [B][heads*dv]. */
int pk_mla_absorbed_batch(int64_t B, int64_t heads, int64_t dn, int64_t dr, int64_t dv, int64_t R, const float *q,
                          const float *kva, const float *ln, float eps, const float *inv_freq, const int64_t *pos,
                          void *const *rows, int cdt, const int64_t *n, int fmt, int act, const void *kvb,
                          const float *kvb_scales, float scale, float *out) {
    const int nth = pk_get_threads();
    const int64_t W = R + dr, per = B * (mla_align16(R) + mla_align16(dv)); /* a thread's ol [B][R] | y [B][dv] */
    pk_mla *ms;
    float *tmp = NULL, *all = NULL;
    int64_t *sp0, b, nsp_all = 0, nall = 0;
    int rc = 0;
    if (fmt < F_F32 || fmt > F_Q4 || cdt < 0 || cdt > 1) return -2;
    if (B < 0 || heads < 1 || R < 1 || dn < 1 || dv < 1 || dr < 0 || dr % 2) return -3;
    for (b = 0; b < B; b++)
        if (pos[b] < 0 || n[b] < 0) return -3;
    if (B == 0) return 0;
    ms = (pk_mla *)calloc((size_t)B + 1, sizeof(pk_mla));
    sp0 = (int64_t *)calloc((size_t)B + 1, sizeof(int64_t)); /* first split of each sequence */
    tmp = (float *)pk_amalloc(sizeof(float) * (size_t)(per * nth));
    for (b = 0; b < B; b++) nall += mla_scratch_floats(heads, dr, R, pos[b], n[b]);
    /* the sequences' scratch in ONE allocation: B of ~180 KB each (16 heads, R 512, short caches) were trimmed
     * from the heap and faulted in again every call -- one layer at 8 sequences, 1 thread: 0.77 -> 0.41 ms */
    all = (float *)pk_amalloc(sizeof(float) * (size_t)nall);
    if (!ms || !sp0 || !tmp || !all) {
        rc = -1;
        goto done;
    }
    nall = 0;
    for (b = 0; b < B; b++) { /* pk_mla_absorbed's setup, per sequence */
        mla_prepare(&ms[b], heads, dn, dr, dv, R, q + b * heads * (dn + dr), kva + b * W, ln, eps, inv_freq, pos[b],
                    rows[b], cdt, n[b], fmt, act, kvb, kvb_scales, scale, out + b * heads * dv, all + nall);
        nall += mla_scratch_floats(heads, dr, R, pos[b], n[b]);
        sp0[b] = nsp_all;
        nsp_all += ms[b].nsplit;
    }
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        int64_t k;
#ifdef _OPENMP
        float *ol = tmp + per * omp_get_thread_num(); /* this thread's rows */
#else
        float *ol = tmp;
#endif
#pragma omp for schedule(static)
        for (k = 0; k < heads; k++) mla_query_batch(ms, B, k);
#pragma omp for schedule(static)
        for (k = 0; k < B * ms[0].G * W; k++) mla_transpose(&ms[k / (ms[0].G * W)], k % (ms[0].G * W));
#pragma omp for schedule(dynamic, 1)
        for (k = 0; k < nsp_all; k++) {
            int64_t s = 0;
            while (s + 1 < B && sp0[s + 1] <= k) s++;
            mla_split(&ms[s], k - sp0[s]);
        }
#pragma omp for schedule(static)
        for (k = 0; k < heads; k++) mla_output_batch(ms, B, k, ol, ol + B * mla_align16(R));
    }
    (void)nth;
done:
    free(ms);
    free(sp0);
    free(tmp);
    free(all);
    return rc;
}

/* ------------------------------------------------------------------- RMSNorm (spec §8.2) and one decoder layer
 * rms_row: ops.rms_norm's rounding -- ONE reciprocal 1 / sqrt(mean(x^2) + eps) per row, x times it, then times
 * the weight -- with the sum of squares accumulated in f64 in index order, which is exactly the Numba twin
 * (kernels/numba_kernels.rms_norm: same order, same f64 -> f32 steps), so a row normalised here, by Numba or
 * by pk_rms_norm is the same bits (the engine's batched step normalises with the twin, a single decode step
 * inside pk_decode_layer; tests/test_engine.py needs them equal). Plain loops, no SIMD: a sum reordered for
 * vectors would round differently, and 2 x 2048 floats a layer are nothing next to the weights. */
static void rms_row(const float *x, int64_t d, const float *w, float eps, float *out) {
    double s = 0.0;
    int64_t i;
    float inv;
    for (i = 0; i < d; i++) s += (double)x[i] * (double)x[i];
    inv = 1.0f / sqrtf((float)(s / (double)d) + eps);
    for (i = 0; i < d; i++) out[i] = (x[i] * inv) * w[i];
}

/* xo = x + a, out = rms_row(xo): the residual add and the next pre-norm (ops.add_rms_norm; the Numba twin's
 * order). */
static void add_rms_row(const float *x, const float *a, int64_t d, const float *w, float eps, float *xo, float *out) {
    double s = 0.0;
    int64_t i;
    float inv;
    for (i = 0; i < d; i++) {
        const float v = x[i] + a[i];
        xo[i] = v;
        s += (double)v * (double)v;
    }
    inv = 1.0f / sqrtf((float)(s / (double)d) + eps);
    for (i = 0; i < d; i++) out[i] = (xo[i] * inv) * w[i];
}

void pk_rms_norm(const float *x, int64_t rows, int64_t d, const float *w, float eps, float *out) {
    int64_t r;
    for (r = 0; r < rows; r++) rms_row(x + r * d, d, w, eps, out + r * d);
}

/* See the header. Chunks of PK_SILU_CHUNK values on the threads from PK_PAR_MIN values: a prefill's experts are
 * [tokens, 1408] each, 64 of them a layer (33 ms of a 512-token 4-layer prefill in NumPy's exp, one thread). */
#define PK_SILU_CHUNK 16384
void pk_silu_mul(const float *g, const float *u, int64_t n, float *out) {
    const int simd = pk_get_simd();
    const int64_t nch = (n + PK_SILU_CHUNK - 1) / PK_SILU_CHUNK;
    int64_t c;
#pragma omp parallel for schedule(static) num_threads(pk_get_threads()) if (n >= PK_PAR_MIN && nch > 1)
    for (c = 0; c < nch; c++) {
        const int64_t i0 = c * PK_SILU_CHUNK, len = n - i0 < PK_SILU_CHUNK ? n - i0 : PK_SILU_CHUNK;
        if (out + i0 != g + i0) memcpy(out + i0, g + i0, sizeof(float) * (size_t)len);
        silu_mul(simd, out + i0, u + i0, len);
    }
}

void pk_add_rms_norm(const float *x, const float *a, int64_t rows, int64_t d, const float *w, float eps, float *xo,
                     float *out) {
    int64_t r;
    for (r = 0; r < rows; r++) add_rms_row(x + r * d, a + r * d, d, w, eps, xo + r * d, out + r * d);
}

static int linear_ok(const pk_linear *l, int64_t n_out, int64_t n_in) {
    return l->fmt >= F_F32 && l->fmt <= F_Q4 && l->w && l->n_out == n_out && l->n_in == n_in;
}

/* One job of one row of x on a pk_linear: kernels.matmul's product for that row (same job, same result). */
static void linear_job(pk_job *j, const pk_linear *l, const float *x, float *y) {
    job_set(j, l->fmt, l->act, x, 1, l->n_in, l->w, l->scales, l->n_out, y);
}

/* See the header. Why: with the kernels fused per stage a decode token still went through ~300 Python calls a
 * layer between them (norms, the projections' argument lists, the cache row, two fused calls and their
 * records, the residual adds); at 27 layers that was ~10 ms a token. Here the same stages run in the same
 * order on the same kernels, so the result is bit for bit model.decode_layer's on the C backend: the two
 * input projections as ONE pk_matmul_many-style call (kernels.matmul_many), mla_absorbed_run with o_proj
 * (pk_mla_absorbed_o), the FFN as pk_moe / pk_swiglu_sum (the dense layer: one expert of weight 1, which is
 * dense_mlp's sum exactly). */
int pk_decode_layer(const pk_layer *L, const float *x, int64_t pos, void *rows, int cdt, int64_t n, float *xo,
                    float *h, float *logits, float *scores, int *ids, float *weights, float *margin) {
    const int64_t D = L->D, H = L->H, dq = L->H * (L->dn + L->dr), W = L->R + L->dr;
    const int64_t nq = L->q_lora > 0 ? L->q_lora : dq;
    float *scr, *h1, *q, *qa, *kva, *o, *a, *m;
    pk_job jobs[2];
    int64_t i;
    int rc = 0;
    if (D < 1 || H < 1 || L->R < 1 || pos < 0 || n < 0) return -3;
    if (!linear_ok(&L->kv_a, W, D) || !linear_ok(&L->o, D, H * L->dv)) return -3;
    if (L->q_lora > 0 ? !linear_ok(&L->q_a, L->q_lora, D) || !linear_ok(&L->q, dq, L->q_lora)
                      : !linear_ok(&L->q, dq, D))
        return -3;
    if (L->moe ? route_check(&L->gate, D, L->E, L->k, L->n_group) != 0 || L->n_shared < 0
               : L->mlp.fmt < F_F32 || L->mlp.fmt > F_Q4 || L->mlp.inter < 1)
        return -3;
    scr = (float *)pk_amalloc(sizeof(float) * (size_t)(3 * D + nq + dq + W + H * L->dv + D + 1));
    if (!scr) return -1;
    h1 = scr, a = h1 + D, m = a + D, qa = m + D, q = L->q_lora > 0 ? qa + nq : qa, kva = q + dq, o = kva + W;
    /* input RMSNorm, then q (or q_a) and kv_a_proj_with_mqa in one call (spec §8.3) */
    rms_row(x, D, L->in_ln, L->eps, h1);
    linear_job(&jobs[0], L->q_lora > 0 ? &L->q_a : &L->q, h1, qa);
    linear_job(&jobs[1], &L->kv_a, h1, kva);
    run_jobs(jobs, 2);
    if (L->q_lora > 0) { /* q-LoRA: q_b(RMSNorm(q_a(h))), q_a_layernorm with kv_a_layernorm's eps (spec §8.3) */
        rms_row(qa, L->q_lora, L->q_ln, L->kv_eps, qa);
        linear_job(&jobs[0], &L->q, qa, q);
        run_jobs(jobs, 1);
    }
    /* absorbed attention over the latent cache (writes rows[n]) and o_proj */
    rc = mla_absorbed_run(H, L->dn, L->dr, L->dv, L->R, q, kva, L->kv_ln, L->kv_eps, L->inv_freq, pos, rows, cdt,
                          n, L->kvb_fmt, L->kvb_act, L->kvb, L->kvb_scales, L->scale, o, &L->o, a);
    if (rc) goto done;
    /* residual add + post-attention RMSNorm; then the FFN on h */
    add_rms_row(x, a, D, L->post_ln, L->eps, xo, h);
    if (L->moe) {
        rc = pk_moe(h, D, &L->gate, L->bias, L->E, L->k, L->n_group, L->topk_group, L->group_top2, L->norm,
                    L->scaling, L->sigmoid, L->table, L->n_shared, L->shared, logits, scores, ids, weights, margin, m);
    } else {
        const float one = 1.0f;
        rc = pk_swiglu_sum(1, &L->mlp, h, D, &one, m);
    }
    if (rc) goto done; /* 1: an expert is not resolved yet -- xo, h and the routing stay for the caller */
    for (i = 0; i < D; i++) xo[i] = xo[i] + m[i];
done:
    free(scr);
    return rc;
}

/* See the header. Why: even at one call a layer, the Python between the calls ran with its data evicted by
 * the weight stream (each layer reads tens of MB), ~0.1 ms a layer; one call for the stack pays it once a
 * token. x and xo may be the same buffer: pk_decode_layer reads x[i] before writing xo[i]. */
int pk_decode_layers(int count, const pk_layer *const *layers, const float *x, int64_t pos, void *const *rows,
                     int cdt, const int64_t *ns, float *xo, float *h, float *logits, float *scores, int *ids, float *weights,
                     float *margin, int *done) {
    int l, rc = 0;
    if (count < 1) return -3;
    if (xo != x) memcpy(xo, x, sizeof(float) * (size_t)layers[0]->D);
    for (l = 0; l < count; l++) {
        if (layers[l]->D != layers[0]->D) {
            rc = -3;
            break;
        }
        rc = pk_decode_layer(layers[l], xo, pos, rows[l], cdt, ns[l], xo, h, logits, scores, ids, weights, margin);
        if (rc) break;
    }
    *done = l;
    return rc;
}
