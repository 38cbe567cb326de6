/* pykimi_kernels.h -- the one header of pykimi's C kernels (plain C99).
 *
 * Every kernel computes y = x @ W^T in float32 with W read in its STORED form:
 *   x      f32 [n, in]   row-major, contiguous (n = 1 is the decode GEMV; small n is a batch)
 *   W      [out, in]     f32, bf16 bits (uint16), Q8_32 or Q4_32 (formats below)
 *   y      f32 [n, out]  row-major, contiguous
 *
 * Weight formats (the NumPy twins are pykimi/kernels/ref.py and pykimi/quant.py):
 *   bf16   uint16 bits; value = float with those bits in its high half (a 16-bit shift, exact).
 *   Q8_32  q int8 [out, in], scales f32 [out, nb] with nb = ceil(in / 32):
 *          W[o, i] = q[o, i] * scales[o, i / 32].  The last block of a row may be short.
 *   Q4_32  q uint8 [out, ceil(in / 2)], two 4-bit codes per byte: element 2j in the LOW nibble,
 *          element 2j + 1 in the HIGH nibble (in order, so a row is a plain nibble stream);
 *          W[o, i] = (code - 8) * scales[o, i / 32], code in 0..15 (value -8..7).
 *
 * The block between the CDEF markers is also fed verbatim to cffi (pykimi/kernels/_build.py), so it
 * must stay plain declarations: no macros, no attributes.
 */
#ifndef PYKIMI_KERNELS_H
#define PYKIMI_KERNELS_H

#include <stdint.h>

/* CDEF BEGIN */
void pk_set_threads(int n);
int pk_get_threads(void);
int pk_has_openmp(void);
/* SIMD level: 0 = portable loops, 1 = AVX2+FMA, 2 = AVX-512 (F/BW/VL + VNNI). The best level the CPU
 * has runs unless PYKIMI_SIMD=scalar|avx2|avx512 or pk_set_simd(level) asks for a lower one (-1 = best);
 * a level the CPU lacks is clamped. pk_simd_level / pk_force_scalar are the older on/off knobs. */
int pk_simd_max(void);
void pk_set_simd(int level);
int pk_get_simd(void);
int pk_simd_level(void);
void pk_force_scalar(int on);
/* AMX (bf16 tile products) for bf16 batches of >= 8 rows of x and Q8_32 batches (f32 activations) of >= 32
 * at the AVX-512 level: pk_amx_available is 1 when the CPU has it and Linux granted it; pk_set_amx(0) /
 * PYKIMI_AMX=0 turns it off, pk_get_amx says whether it runs. */
int pk_amx_available(void);
void pk_set_amx(int on);
int pk_get_amx(void);
/* AVX512_BF16 (vdpbf16ps) for bf16 weights x bf16-rounded activations (act 3 below): pk_avx512bf16_available
 * is 1 when the build has the kernel and the CPU runs the AVX-512 level with AVX512_BF16; pk_set_avx512bf16(0)
 * / PYKIMI_AVX512BF16=0 turns it off (those batches then run the exact f32 product); pk_get_avx512bf16 says
 * whether it runs. */
int pk_avx512bf16_available(void);
void pk_set_avx512bf16(int on);
int pk_get_avx512bf16(void);
/* The int8 batch kernel for int8 activations (act 1) on Q8_32 / Q4_32 weights: at the AVX-512 level (which
 * includes VNNI) the VNNI kernel, jobs of >= PK_VNNI_MIN_Q8 / PK_VNNI_MIN_Q4 rows of x; at the AVX2 level its
 * vpmaddubsw twin, jobs of >= PK_AVX2B_MIN_Q8 / _Q4 rows (pk_matmul_q8a / q4a, matmul_many, the MoE batches).
 * pk_set_vnni_batch(0) / PYKIMI_VNNI_BATCH=0 turns both off (every int8-activation job then runs the per-row
 * kernels: the previous behaviour, for tests and benchmarks); pk_get_vnni_batch says whether it runs at the
 * current level; pk_vnni_min(fmt) is the row count from which it takes a job of that format at the current level
 * (2 = Q8_32, 3 = Q4_32; -1 at the portable level). */
void pk_set_vnni_batch(int on);
int pk_get_vnni_batch(void);
int64_t pk_vnni_min(int fmt);
/* The int16 batch kernel for int16 activations (act 2, the default mode's Q8_32): at the AVX-512 level on vpdpwssd,
 * jobs of >= PK_VNNI16_MIN_Q8 rows of x; at the AVX2 level its vpmaddwd twin, jobs of >= PK_AVX2W_MIN_Q8 rows
 * (pk_matmul_q8w, matmul_many). pk_set_vnni16_batch(0) / PYKIMI_VNNI16_BATCH=0 turns both off (such jobs then run the
 * int16 row kernel at every n); pk_get_vnni16_batch says whether it runs at the current level; pk_vnni16_min is the
 * row count from which it takes a job at the current level (-1 at the portable level). */
void pk_set_vnni16_batch(int on);
int pk_get_vnni16_batch(void);
int64_t pk_vnni16_min(void);

void pk_matmul_f32(const float *x, int64_t n, int64_t in, const float *w, int64_t out, float *y);
void pk_matmul_bf16(const float *x, int64_t n, int64_t in, const uint16_t *w, int64_t out, float *y);
/* bf16 weights x activations rounded to bf16 (round to nearest even; denormals count as zero), f32 sums:
 * batches of >= 8 rows at the AVX-512 level with AVX512_BF16 (and not AMX); any other call is
 * pk_matmul_bf16's exact product. NumPy twin: ref.matmul_act_bf16. */
void pk_matmul_bf16a(const float *x, int64_t n, int64_t in, const uint16_t *w, int64_t out, float *y);
void pk_matmul_q8(const float *x, int64_t n, int64_t in, const int8_t *q, const float *scales,
                  int64_t out, float *y);
void pk_matmul_q4(const float *x, int64_t n, int64_t in, const uint8_t *q, const float *scales,
                  int64_t out, float *y);

/* Same products with the activations quantized to int8 per block of 32 (scale = max|x| / 127, round half
 * to even) and integer block dot products: ~3x less work per weight than decoding to f32, which is what
 * keeps int8/int4 decode memory bound. NumPy twin: ref.matmul_act_q8. */
void pk_matmul_q8a(const float *x, int64_t n, int64_t in, const int8_t *q, const float *scales,
                   int64_t out, float *y);
void pk_matmul_q4a(const float *x, int64_t n, int64_t in, const uint8_t *q, const float *scales,
                   int64_t out, float *y);
void pk_quant_act(const float *x, int64_t n, int64_t in, int8_t *xq, float *xd);
/* Q8_32 weights with int16 activations (scale = max|x| / 32767 per block): the activation rounding
 * (~1e-5 relative) is far below the int8 weight error, yet the block dot is still two pmaddwd.
 * NumPy twin: ref.matmul_act16_q8. */
void pk_matmul_q8w(const float *x, int64_t n, int64_t in, const int8_t *q, const float *scales,
                   int64_t out, float *y);
void pk_quant_act16(const float *x, int64_t n, int64_t in, int16_t *xq, float *xd);

/* Several products in one call (one thread fork/join for all of them). Per job k: fmts[k] 0 = f32,
 * 1 = bf16, 2 = Q8_32, 3 = Q4_32; acts[k] 0 = f32 activations, 1 = int8, 2 = int16 (Q8 only; Q4 -> int8),
 * 3 = bf16 (bf16 weights, as pk_matmul_bf16a; others -> f32), 4 = int8 on the per-row kernels only (never the
 * VNNI batch kernel: each row exactly what it gets alone, for the serve engine's row-wise calls);
 * scales[k] may be NULL for f32/bf16. Returns 0, or < 0 for a bad format / no memory. */
int pk_matmul_many(int count, const int *fmts, const int *acts, const float *const *xs, const int64_t *ns,
                   const int64_t *ins, const void *const *ws, const float *const *scales, const int64_t *outs,
                   float *const *ys);

/* Vector x matrix, several at once: per job k, ys[k][0:ins[k]] = sum_r xs[k][r] * W_k[r, :] with W_k
 * [rows[k], ins[k]] in format fmts[k] (as above). Jobs run in parallel (one thread each). This is the
 * absorbed MLA decode's q_nope · W_uk per head, read from the stored kv_b_proj rows. Returns 0 or -2. */
int pk_vecmat_many(int count, const int *fmts, const float *const *xs, const int64_t *rows, const int64_t *ins,
                   const void *const *ws, const float *const *scales, float *const *ys);

/* One expert of an MoE FFN: its three weights in format fmt with activation mode act (as in
 * pk_matmul_many); scales NULL for f32 / bf16. */
typedef struct {
    int fmt, act;
    int64_t inter;                /* intermediate width I */
    const void *g, *u, *d;        /* gate [I, d], up [I, d], down [d, I] */
    const float *sg, *su, *sd;    /* their block scales */
} pk_expert;

/* A whole MoE FFN for ONE token: out[0:d] = sum_k coef[k] * down_k(silu(gate_k(x)) * up_k(x)), x [d], over
 * experts[0:count]. Two parallel regions (all gate + up rows, then all down rows) and no return to Python
 * between them -- the decode step's routed + shared experts of one layer. The sum runs over k in order.
 * Returns 0, or < 0 for a bad format / no memory. */
int pk_swiglu_sum(int count, const pk_expert *experts, const float *x, int64_t d, const float *coef, float *out);

/* The absorbed MLA attention of ONE decode token (spec §8.3), from its two projections:
 *   q    f32 [heads, dn + dr]  q_proj (or q_b_proj) output, q_pe not yet rotated
 *   kva  f32 [R + dr]          kv_a_proj_with_mqa output: latent before kv_a_layernorm (weight ln [R], eps),
 *                              k_pe before RoPE; angle_i = pos * inv_freq[i] (f32), i < dr / 2
 *   rows [n + 1, R + dr]       the layer's latent cache, rows 0..n-1 held; row n := [norm(c) | rope(k_pe)];
 *                              cdt 0: f32 rows, cdt 1: bf16 rows (uint16 bits, widened in registers; row n
 *                              rounded to nearest even before it is stored and read back)
 *   kvb  [heads * (dn + dv), R] kv_b_proj in format fmt (scales NULL for f32 / bf16); W_uk[h] are its rows
 *                              h*(dn+dv) .. +dn, W_uv[h] the dv after them; act: W_uv's activation mode
 *   out  f32 [heads, dv]       o[h] = W_uv[h] sum_t softmax_t(scale * [q_nope W_uk[h] | rope(q_pe)] . rows[t])
 *                              rows[t][:R], over keys t <= pos
 * One pass over the cache: its rows split between the threads in runs cut by the row count alone (online
 * softmax, the runs merged per head), so the result does not depend on the thread count. Returns 0, -1 (no
 * memory), -2 (bad format or cdt) or -3 (bad sizes). */
int pk_mla_absorbed(int64_t heads, int64_t dn, int64_t dr, int64_t dv, int64_t R, const float *q, const float *kva,
                    const float *ln, float eps, const float *inv_freq, int64_t pos, void *rows, int cdt, int64_t n,
                    int fmt, int act, const void *kvb, const float *kvb_scales, float scale, float *out);

/* The MoE FFN of B decode tokens in one call: row b gets exactly pk_swiglu_sum(x[b]) over its experts
 * experts[sel[b*kmax + j]] with coef[b*kmax + j], j < nsel[b], in that order; each expert's weights are read
 * once for all the rows that chose it (serve's batched decode step). x, out f32 [B, d].
 * Returns 0, -1 (no memory), -2 (bad format) or -3 (bad selection). */
int pk_swiglu_batch(int count, const pk_expert *experts, const float *x, int64_t B, int64_t d, int kmax,
                    const int *nsel, const int *sel, const float *coef, float *out);

/* pk_mla_absorbed for B sequences in one parallel region, each against its own cache: q [B][heads*(dn+dr)],
 * kva [B][R+dr], pos[b], rows[b] (n[b] rows held; row n[b] written; every cache of dtype cdt as in
 * pk_mla_absorbed), out [B][heads*dv]. Each sequence's row and output are bit for bit pk_mla_absorbed's. Returns 0, -1, -2 or -3 as pk_mla_absorbed. */
int pk_mla_absorbed_batch(int64_t B, int64_t heads, int64_t dn, int64_t dr, int64_t dv, int64_t R, const float *q,
                          const float *kva, const float *ln, float eps, const float *inv_freq, const int64_t *pos,
                          void *const *rows, int cdt, const int64_t *n, int fmt, int act, const void *kvb,
                          const float *kvb_scales, float scale, float *out);

/* One stored weight [out, in] for a fused call: format and activation mode as in pk_matmul_many, scales NULL
 * for f32 / bf16 (o_proj in pk_mla_absorbed_o, the router in pk_route / pk_moe). */
typedef struct {
    int fmt, act;
    int64_t n_out, n_in;          /* logical shape [n_out, n_in] */
    const void *w;
    const float *scales;
} pk_linear;

/* pk_mla_absorbed (out [heads * dv] as there), then y [o_proj.n_out] = out @ o_proj^T in the same parallel
 * region, bit for bit pk_matmul_many of that one row (o_proj.n_in must be heads * dv). Returns as
 * pk_mla_absorbed. */
int pk_mla_absorbed_o(int64_t heads, int64_t dn, int64_t dr, int64_t dv, int64_t R, const float *q, const float *kva,
                      const float *ln, float eps, const float *inv_freq, int64_t pos, void *rows, int cdt,
                      int64_t n, int fmt, int act, const void *kvb, const float *kvb_scales, float scale,
                      const pk_linear *o_proj, float *out, float *y);

/* The MoE router of B tokens x [B, d] (spec §8.4): logits [B, E] = x @ gate^T (each row alone), then per
 * token moe.select_experts' rule: scores [B, E] (sigmoid = 1, else softmax), ids [B, k] ascending, weights
 * [B, k], margin [B]; bias [E] (e_score_correction_bias, selection only) or NULL; E % n_group == 0.
 * Returns 0, -1 (no memory), -2 (bad format) or -3 (bad sizes). */
int pk_route(int64_t B, const float *x, int64_t d, const pk_linear *gate, const float *bias, int E, int k,
             int n_group, int topk_group, int group_top2, int norm, float scaling, int sigmoid, float *logits,
             float *scores, int *ids, float *weights, float *margin);

/* One decode token's whole MoE FFN: pk_route of x [d] (outputs as there, B = 1), then out [d] =
 * pk_swiglu_sum over table[ids[0..k)] (ascending ids, coefficients = weights) followed by shared[0..n_shared)
 * (coefficient 1). table: the records of all E routed experts; a record whose g is NULL is not resolved yet:
 * then the routing outputs are written, out is not, and 1 is returned (the caller resolves those experts and
 * calls again). Returns 0, 1, or < 0 as pk_route / pk_swiglu_sum. */
int pk_moe(const float *x, int64_t d, const pk_linear *gate, const float *bias, int E, int k, int n_group,
           int topk_group, int group_top2, int norm, float scaling, int sigmoid, const pk_expert *table,
           int n_shared, const pk_expert *shared, float *logits, float *scores, int *ids, float *weights,
           float *margin, float *out);

/* RMSNorm of rows x [rows, d] (spec §8.2): out = x * (1 / sqrt(mean(x^2) + eps)) * w, the mean of squares
 * summed in f64 in index order -- bit for bit the Numba twin. pk_add_rms_norm: xo = x + a, out = that of xo. */
void pk_rms_norm(const float *x, int64_t rows, int64_t d, const float *w, float eps, float *out);
void pk_add_rms_norm(const float *x, const float *a, int64_t rows, int64_t d, const float *w, float eps, float *xo,
                     float *out);

/* out[i] = g[i] / (1 + e^-g[i]) * u[i], i < n: SwiGLU's silu(g) * u (ops.silu_mul), with the vector exp the decode
 * MoE uses (~1 ulp); out may be g. */
void pk_silu_mul(const float *g, const float *u, int64_t n, float *out);

/* Rows of scores in place, row r at s + r * stride, n values each: s = e^(s - max over the row), den[r] = the row's
 * sum (ops.exp_rows: the vision attention's unnormalised softmax), with the decode's vector exp (~1 ulp). One
 * thread (the vision attention calls it from its own worker threads); a NaN in a row makes its sum NaN. */
void pk_exp_rows(float *s, int64_t rows, int64_t n, int64_t stride, float *den);

/* out[i] = gelu_tanh(x[i]), i < n (ops.gelu_tanh, the vision MLP's), as x / (1 + e^(-2u)) with the vector exp; one
 * thread (the vision block calls it from its worker threads); out may be x. */
void pk_gelu_tanh(const float *x, int64_t n, float *out);

/* Everything one decoder layer needs for a decode token (spec §8.2-8.4), made once per layer by the caller
 * (kernels/fused.py) and kept: dims, norms, each linear's record, kv_b_proj, and the FFN -- a dense SwiGLU
 * (moe = 0: mlp, one expert of weight 1) or the router + the table of routed experts + the shared experts as
 * in pk_moe (moe = 1). q is q_proj [H*(dn+dr), D], or q_b_proj [H*(dn+dr), q_lora] when q_lora > 0 (then q_a
 * [q_lora, D] and q_ln, normalised with kv_eps). */
typedef struct {
    int64_t D, H, dn, dr, dv, R, q_lora;
    float eps, kv_eps, scale;
    const float *in_ln, *post_ln, *kv_ln, *q_ln, *inv_freq;
    pk_linear q, q_a, kv_a, o;
    int kvb_fmt, kvb_act;
    const void *kvb;
    const float *kvb_scales;
    int moe;
    pk_expert mlp;
    pk_linear gate;
    const float *bias;
    int E, k, n_group, topk_group, group_top2, norm, sigmoid;
    float scaling;
    const pk_expert *table;
    int n_shared;
    const pk_expert *shared;
} pk_layer;

/* One decode token x [D] through one decoder layer: input RMSNorm -> q / kv_a projections -> absorbed
 * attention over rows (the layer's cache, f32 or bf16 bits as cdt in pk_mla_absorbed: n rows held, row n
 * written; causal at pos) + o_proj -> residual add
 * + post-attention RMSNorm (h [D]) -> dense SwiGLU or pk_moe (routing outputs as there) -> residual add into
 * xo [D]. Returns 0 (xo = the layer's output), 1 (pk_moe met an unresolved expert: xo = x + attention, h and
 * the routing are written; the caller resolves, runs pk_moe on h and adds), or < 0 as the kernels inside
 * (-3: a record does not fit the dims). */
int pk_decode_layer(const pk_layer *L, const float *x, int64_t pos, void *rows, int cdt, int64_t n, float *xo,
                    float *h, float *logits, float *scores, int *ids, float *weights, float *margin);

/* pk_decode_layer through layers[0..count) in order (the whole stack of a decode token): xo [D] = the last
 * layer's output; layer l uses rows[l] with ns[l] rows held. Returns 0 (*done = count), or layer *done's
 * return code: 1 -- that layer met an unresolved expert, xo = its input plus its attention, h and the routing
 * as pk_decode_layer leaves them, the layers before it complete (the caller finishes layer *done and calls
 * again from *done + 1) -- or < 0. x may be xo. */
int pk_decode_layers(int count, const pk_layer *const *layers, const float *x, int64_t pos, void *const *rows,
                     int cdt, const int64_t *ns, float *xo, float *h, float *logits, float *scores, int *ids, float *weights,
                     float *margin, int *done);

/* CDEF END */

#endif
