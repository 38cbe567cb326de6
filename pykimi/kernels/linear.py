"""x @ W.T for a weight in any stored form: which kernel takes a product, and the products themselves.

    y = matmul(x, w)      # x f32 [n, in] (or [in]); w f32 ndarray | Stored | Q8Weight | Q4Weight  -> f32 [n, out]

Why the routing: decode is memory bound, so for few rows of x W is read once in its stored form by a GEMV /
small-GEMM kernel (C or Numba) that widens in registers; prefill and vision are compute bound, so for more
rows W is widened in small row tiles (TASK_ELEMS floats) that the worker threads multiply with
single-threaded BLAS (pool.parallel_for). f32 ndarrays always go to BLAS. How many rows is "few" depends on
the weight format, the activation mode and the CPU level: the crossover table below (data; the measurements
behind it are in bench/RESULTS.md, "Crossovers"). ONE function, ``plan``, makes that decision, for matmul and
for ``reference`` (the NumPy twin of exactly what matmul computes, which the tests hold every backend to).

For int8 / int4 weights the C GEMV quantizes the activation row once per call and uses integer block dot
products (set_act_quant); at the AVX-512 level int8-activation batches from C_VNNI_MIN rows run the VNNI batch
kernel instead of the row kernels (and, for Q8_32 in mode "all", instead of the exact f32 batch kernel / tiles), at
the AVX2 level from C_VNNI_MIN_AVX2 rows its vpmaddubsw twin (instead of the row kernels and the widened tiles); in the
default mode Q8_32 x int16 batches from C_VNNI16_MIN rows run the int16 batch kernel (vpdpwssd) at the AVX-512 level
(instead of the int16 row kernel, the exact f32 batch kernel and the tiles), at the AVX2 level from C_VNNI16_MIN_AVX2
rows its vpmaddwd twin (instead of the int16 row kernel and the tiles);
with PYKIMI_ACT_QUANT=all bf16 batches round x to bf16 for the AVX512_BF16 kernel. bf16 weights x f32 activations (the
exact product) run an exact batch kernel from 12 rows in C, however many rows at the AVX-512 level, up to
C_TN_ROWS_AVX2 at the AVX2 level (then the widened tiles).
matmul_many runs several products in one C call (the selected experts);
heads_vecmat / heads_matvec run per-head row blocks of one stored weight in one call (the absorbed MLA's
W_uk / W_uv on kv_b_proj, so decode never widens kv_b_proj).
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ..weights import f32_of, f32_rows, rows_of
from . import ref
from .pool import parallel_for
from .probe import _mods, backend, numba_module

# ------------------------------------------------------------------------- the crossover table (data)
SMALL_N = 32              # rows of x up to which the stored-form kernels beat widen + BLAS
# per (weight format, activation mode), C backend: quantized activations make the stored-form kernel cheaper
# per row than sgemm on widened tiles (int4 never goes to the tiles); bf16 at the AVX-512 level (x-batched)
MEASURED_SMALL_N_ACT = {("q8_32", "i16"): 96, ("q8_32", "i8"): 48, ("q4_32", "i8"): 1 << 62,
                        ("bf16", "f32"): 1 << 62, ("f32", "f32"): 1 << 62}
SMALL_N_ACT: dict = dict(MEASURED_SMALL_N_ACT)
# bf16 x f32 at the AVX-512 level: every batch on the C kernel (bf16_tn_avx512) since x is packed per group of 64
# rows: [1408, 2048] | [2048, 1408] | [11264, 2048], 2 threads, AMD EPYC Zen 5, GFLOP/s C kernel old / new at 128
# rows 280 / 421-444 | 232 / 436 | 249 / 421-426, at 512 183 / 439 | 189 / 425-427 | 179 / 414-444, against
# 207-243 for the widened tiles + sgemm that took over from 113 rows (with AMX, C_AMX_ROWS still applies). f32
# weights take the same kernel (csrc tn_takes), so a tensor stored in f32 gives the bits of its bf16 twin.
# ... at the AVX2 level (no AVX-512), where the int4 x int8 row kernel is compute-bound: from 65 rows the widened
# tiles + sgemm win (4-layer prefill, AMD EPYC Zen 3, alternating in one process, best of 3: 512 tokens 130 ->
# 156 tok/s with 64, 150 with 32; 64 / 128 tokens unchanged; bench/RESULTS.md, AVX2 class). q8 (96) and bf16
# (SMALL_N; since the AVX2 exact batch kernel: C_TN_ROWS_AVX2) measured there too and kept. (Both apply only with
# the int8 batch kernel off, PYKIMI_VNNI_BATCH=0: it keeps every int8-activation batch in C, C_VNNI_MIN_AVX2.)
SMALL_N_ACT_AVX2: dict = {("q4_32", "i8"): 64}
# bf16 x f32 at the AVX2 level: up to this many rows of x the C kernels -- the row kernel (tile_avx2) below 12 rows,
# from 12 the exact batch kernel bf16_tn_avx2 (csrc PK_TN_MIN_AVX2; the AVX-512 kernel's scheme on ymm, the same bits)
# --, past it the widened tiles + sgemm, whose OpenBLAS kernel runs closer to the FMA peak than the 6 x 2 ymm kernel
# once the widening is spread over enough rows. Measured with PYKIMI_SIMD=avx2 on an Intel Xeon Ice Lake @ 2.80GHz, 2
# threads, GFLOP/s old plan (the row kernel to SMALL_N, then the tiles) / the batch kernel, [1408, 2048] | [2048,
# 1408]: 64 rows 93-106 / 156-160 | 95-106 / 148-163, 128: 133-135 / 150-155 | 130-140 / 150-164, 160: 153 / 160 |
# 153 / 168, 192: 166 / 162 | 164 / 166, 224: 167 / 162 | 164 / 165, 256: 164-171 / 155-157 | 161-171 / 158-160, 512:
# 181-185 / 156-157 | 174-182 / 156-161 (more in csrc bf16_tn_avx2); the model's dense shapes alike at 256 / 512 rows,
# tiles / kernel: [3072, 2048] 182-195 / 151-158, [2048, 2048] 174-193 / 159-160, [4096, 512] 158-191 / 159-165,
# [11264, 2048] 176-197 / 156-157, [2048, 11264] 118-126 / 96-97. 4-layer bf16 prefill (synth-L4, bench_prefill_ab,
# best of 2, alternating) of 64 / 128 / 512 tokens: old plan 105-108 / 127-137 / 162-178, this 125-131 / 158-163 /
# 199-205 tok/s; every batch on the kernel instead (no tiles) at 512 tokens 208-211 vs 199-201 in one pair of
# alternations, 158-173 vs 162-163 in another (the host busy): not a clear win, so the per-product crossover stays.
# f32 weights keep SMALL_N (not measured).
C_TN_ROWS_AVX2 = 192
C_BATCH_ROWS_Q8 = (24, 112)   # AVX-512: Q8_32 rows run batch-vectorised as the exact f32 product (csrc PK_TN_*)
# (SMALL_N_ACT's Q8 x int16 entry and C_BATCH_ROWS_Q8 apply to the default mode only with the int16 batch kernel off,
# PYKIMI_VNNI16_BATCH=0, or at the portable level: see C_VNNI16_MIN, C_VNNI16_MIN_AVX2)
C_AMX_ROWS = 512              # AMX: bf16 batches (from 8 rows) and Q8_32 ones (from C_AMX_MIN_Q8) stay in C
C_AMX_MIN_Q8 = 32
# bf16 activations (mode "all", AVX512_BF16): every bf16 batch from this many rows of x goes to the C kernel, however
# many rows (csrc PK_BF16A_MIN; no widened tiles: [1408, 2048] at 512 rows ~850 GFLOP/s against ~220 for tiles +
# sgemm, 2 threads). Below it the exact row kernels: forced onto 1..11 rows the kernel measured 44 / 87 / 173 / 258 /
# 343 / 429 GFLOP/s at 1 / 2 / 4 / 6 / 8 / 11 rows against the row kernels' 141 / 251 / 204 / 191 / 194 / 312: a
# win from ~6 rows, none for decode (1 row). From 8 rather than 12 (PK_TN_MIN): 4-layer prefill of 64 tokens
# 272-291 -> 291-303 tok/s (3 alternations), 128 unchanged. (The serve engine's row-wise calls never take it:
# matmul_many(rowwise=True).)
C_BF16A_MIN = 8
# int8 activations for Q8_32 / Q4_32 weights (mode "i8": Q4_32 in "q4" and "all", Q8_32 in "all") at the AVX-512
# level (which includes AVX512_VNNI): from this many rows of x the VNNI batch kernel (csrc vnni_rows, PK_VNNI_MIN_Q8 /
# _Q4), however many rows -- no widened tiles, no exact f32 batch kernel for Q8_32 in mode "all" any more; below it
# the per-row kernels (tile_act_avx512), as for decode. Same twins (ref.matmul_act_q8 / _q4: the same int8 codes
# and exact block dots; only the f32 summation order differs). Measured on [1408, 2048], AMD EPYC Zen 5, 2 threads,
# GOP/s batch kernel (forced onto few rows) / row kernels: Q8 1: 48 / 173, 4: 187 / 300, 6: 279 / 317, 7: 329 / 343,
# 8: 374 / 362, 10: 455 / 299, 12: 540 / 316, 16: 723 / 315; Q4 1: 45 / 273, 4: 180 / 433, 6: 266 / 345, 7: 310 /
# 339, 8: 349 / 356, 10: 434 / 415, 12: 513 / 420, 16: 675 / 422 (one thread alike: break-even at 6-8 rows); at 64 /
# 128 / 512 rows 926-1005 against the row kernels' 328-444 and Q8 "all"'s old f32 paths (batch kernel to 112 rows,
# then tiles + sgemm) 418 / 201 / 226. Rows per expert in a prefill are few (64 tokens x 6 of 64 experts: ~6), hence
# the start at break-even rather than at the clear win (10): 4-layer int4 prefill (default mode) of 32 / 64 / 128
# tokens with the kernel from 6 / 8 / 12 rows 592 / 702 / 813, 592 / 688 / 781, 489 / 496 / 722 tok/s (a second
# alternation noisier, 6 and 8 alike again, 12 behind). The serve engine's row-wise calls ask for the row
# kernels at any n (matmul_many(rowwise=True), csrc A_ROWS, pk_swiglu_batch), so they do not follow this.
C_VNNI_MIN = {"q8_32": 8, "q4_32": 8}
# ... and at the AVX2 level (no AVX-512, no AVX-VNNI: AMD Zen 3) the same scheme on vpmaddubsw (csrc avx2b_rows,
# PK_AVX2B_MIN_Q8 / _Q4; the same switch, PYKIMI_VNNI_BATCH): from this many rows, however many -- no widened tiles
# past SMALL_N_ACT_AVX2 / SMALL_N_ACT any more; below it the per-row kernels (tile_act_avx2). Same twins. It packs 8
# rows of x to a vector, so its cost is that of ceil(n / 8) * 8 rows: the rows past the last multiple of 8 run the row
# kernels when they are fewer than this minimum (csrc avx2b_split), e.g. Q8 at 9 rows 8 + 1. Measured on [1408, 2048]
# with PYKIMI_SIMD=avx2 on an AMD EPYC Zen 5 (the AVX2 class's own CPU not at hand), ONE thread (the other core was
# busy by turns: the 2-thread runs scattered by 2-3x), GOP/s kernel forced onto every n (before the remainder
# split) / row kernels: Q4 1: 24 / 80, 2: 48 / 90, 3: 72 / 93, 4: 96 / 88, 5: 118 / 82, 6: 141 / 88, 7: 165 / 90,
# 8: 186 / 81, 9: 119 / 87, 10: 132 / 83, 12: 158 / 82, 16: 206 / 86, 32: 218 / 87, 64: 224 / 87 (widened tiles
# from 65 rows, the old plan: 78 at 65, 100 at 128, 119 at 512; the kernel 205 / 228 / 224); Q8 1: 18 / 90, 4: 67 /
# 114, 5: 87 / 109, 6: 103 / 116, 7: 122 / 119, 8: 139 / 117, 9: 86 / 115, 10: 95 / 117, 12: 115 / 117, 16: 152 /
# 117, 32: 161 / 118, 64: 165 / 119 (tiles from 49 rows in mode "all": 95 at 64, 109 at 128, 121 at 512; the kernel
# 165 / 162 / 159). Break-even Q4 at 4 rows, Q8 at 7; with the remainder split (a second run) Q4 9: 163 / 79, 10: 155 /
# 85, 11: 143 / 80, 12: 157 / 78, 17: 188 / 81; Q8 9: 125 / 102, 10: 129 / 108, 11: 130 / 110, 12: 125 / 107, 15: 140 /
# 109. Two threads, when the other core was free: Q4 8 rows 337 / 154, Q8 64-512 rows 303-313 / 231 (tiles 163-223).
# With the kernel's quad loop unrolled (csrc PK_AB_UNROLL / PK_AB_PIN; gcc 12 had kept it rolled, a register move per
# vpmaddubsw): ONE thread, [1408, 2048], before -> after, 8 / 16 / 64 / 512 rows: Q4 199-203 / 217-221 / 226-228 /
# 230-235 -> 243-246 / 280-281 / 303 / 282-286, Q8 140-142 / 156-157 / 163-168 / 165-166 -> 149-151 / 171-174 /
# 187-189 / 180-183; two threads ([1408, 2048] | [2048, 1408]) Q4 8: 299-352 -> 362-401 | 298-312 -> 364-412, 64:
# 391-404 -> 499-508 | 402-419 -> 514-515, 512: 418-438 -> 523-538 | 413-429 -> 524-543; Q8 8: 227-247 -> 243-256 |
# 222-234 -> 244-257, 64: 286-294 -> 327-329 | 287-298 -> 325-328, 512: 297-309 -> 333-337 | 291-303 -> 328-332. The
# break-even re-measured (one thread, kernel forced onto few rows after / before / row kernels): Q4 3: 88-94 / 72-76 /
# 89-92, 4: 117-124 / 94-101 / 88-91; Q8 6: 106-115 / 102-108 / 116-119, 7: 124-134 / 119-125 / 119-121: the minima
# stay. 4-layer int4 prefill (synth-L4-q4-all, default mode, PYKIMI_SIMD=avx2, 2 threads, best of 3, 4 alternating
# runs) of 64 / 128 / 512 tokens: 433-443 / 485-494 / 496-517 -> 482-518 / 563-597 / 587-605 tok/s.
C_VNNI_MIN_AVX2 = {"q8_32": 7, "q4_32": 4}
# int16 activations for Q8_32 weights (the default mode "q4": Q8 x int16) at the AVX-512 level: from this many rows of x
# the int16 batch kernel (csrc PK_VW_KERNEL, vpdpwssd; PK_VNNI16_MIN_Q8), however many rows -- no exact f32 batch kernel
# (C_BATCH_ROWS_Q8), no widened tiles past it any more; below it the int16 row kernel (tile_q8w_avx512), as for decode.
# Same twin (ref.matmul_act16_q8: the same int16 codes, exact integer block dots; only the f32 summation order differs).
# Its own switch: c.set_vnni16_batch / PYKIMI_VNNI16_BATCH=0 (off: the old plan). Not with AMX, whose exact tile product
# keeps Q8 batches from C_AMX_MIN_Q8 rows (not measured against this kernel). Rows past the last vector of 16 run the
# row kernel when fewer than 5 (csrc vnni16_split, PK_VNNI16_REM; e.g. 17 = 16 + 1). Measured on AMD EPYC Zen 5, 2
# threads, GOP/s, best of 5 alternating rounds (host shared, +-10 % between runs), [1408, 2048] then [2048, 1408]: the
# kernel forced onto few rows (-DPK_VNNI16_MIN_Q8=1) / the row kernel: 6: 182-186 / 242-249, 7: 214-219 / 233-256, 8:
# 241-253 / 234-243, 9: 273-287 / 234-244, 10: 301-320 / 233-235 (break-even at 8 rows, hence 9); the remainder split,
# rows 16k + m (split at m < REM / one vector more): 17: 393-482 / 327-349, 19: 377-433 / 366-382, 20: 368-417 /
# 385-400, 21: 346-384 / 402-424, 35: 461-519 / 434-478, 36: 457-511 / 447-491, 37: 436-489 / 461-503, 53: 428-503 /
# 461-520. The plans (bench/bench_batch_kernels.py --kinds q8_32 --switch vnni16), old (row kernel to 23 rows, exact f32
# batch kernel 24..112, then tiles + sgemm) / new, [1408, 2048] | [2048, 1408]: 9: 236 / 273 | 248 / 274, 10: 224 / 302
# | 253 / 306, 12: 240 / 363 | 231 / 370, 16: 238 / 478 | 232 / 489, 17: 232 / 399 | 230 / 439, 24: 294 / 456 | 251 /
# 470, 32: 387 / 603 | 292 / 616, 64: 407 / 576 | 269 / 609, 128: 195 / 645 | 193 / 624, 512: 222 / 595 | 217 / 618
# (1..8 rows the same kernel). 4-layer int8 prefill (synth-L4-q8-all, default mode, bench/bench_prefill_ab.py, best of 3
# alternating rounds) of 64 / 128 / 512 tokens: off 328 / 293 / 292 -> on 475 / 558 / 560 tok/s; bench/run.py --only
# prefill --modes int8 (3 runs each, alternating): off 324-331 / 301-303 / 276-288 -> on 469-496 / 576-591 / 578-590
# tok/s (llama.cpp Q8_0 in bench/RESULTS.md: 320 / 357 / 345).
C_VNNI16_MIN = {"q8_32": 9}
# ... and at the AVX2 level (AMD Zen 3) the same scheme on vpmaddwd + vpaddd, 8 rows of x per ymm (csrc PK_AW_KERNEL,
# avx2w_rows; PK_AVX2W_MIN_Q8; the same switch, PYKIMI_VNNI16_BATCH): from this many rows, however many -- no widened
# tiles past SMALL_N_ACT any more; below it the int16 row kernel (tile_q8w_avx2). Same twin. Like the AVX2 int8 kernel
# its cost is that of ceil(n / 8) * 8 rows, so the rows past the last multiple of 8 run the row kernel when fewer than
# 5 (csrc avx2w_split, PK_AVX2W_REM). Measured with PYKIMI_SIMD=avx2 on an AMD EPYC Zen 5 (bench/bench_batch_kernels.py
# --kinds q8_32 --direct --switch vnni16, a build with -DPK_AVX2W_MIN_Q8=1; best of 3 rounds x 2 runs), GOP/s kernel
# forced onto every n / the row kernel, [1408, 2048]: ONE thread 1: 18 / 69, 2: 36 / 88, 4: 72-73 / 96, 5: 90-91 / 90,
# 6: 107-108 / 93-94, 7: 126 / 96, 8: 143-144 / 96, 16: 165-168 / 97-98; two threads 4: 126 / 180, 5: 155-158 /
# 170-171, 6: 188 / 178-180, 7: 218 / 182-183, 8: 247-249 / 184-186, 16: 305 / 190 ([2048, 1408] alike: 5: 91 / 89-91
# and 158-159 / 171, 6: 109 / 92-95 and 186-187 / 177-178). Break-even at 5 rows (one thread) to 6 (two), hence 6.
# The plans (bench/bench_batch_kernels.py --kinds q8_32 --switch vnni16, PYKIMI_SIMD=avx2, 2 threads, best of 5 rounds x
# 2 runs), old (row kernel to SMALL_N_ACT, then tiles + sgemm) / new, [1408, 2048] | [2048, 1408]: 8: 186 / 238-242 |
# 182-190 / 245-246, 16: 189-193 / 292-297 | 188-197 / 299-305, 32: 193-194 / 311-324 | 192-199 / 327-332, 64: 192-195 /
# 314-323 | 192-199 / 329-349, 128: 194-198 / 330-333 | 194-195 / 344-357, 512: 222-226 / 321-330 | 220-227 / 340-353.
# 4-layer int8 prefill (synth-L4-q8-all, default mode, PYKIMI_SIMD=avx2, bench/bench_prefill_ab.py --switch vnni16, best
# of 5 alternating rounds) of 64 / 128 / 512 tokens: off 238 / 254 / 267 -> on 323 / 382 / 379 tok/s; bench/run.py
# --only prefill --modes int8 against llama.cpp Q8_0 built for AVX2 only (4 runs each, alternating; the host shared,
# load 1.1-1.6; best of 2 calls, 64 tokens the noisiest): off 225-239 / 240-258 / 256-269 (0.77-0.83x / 0.76-0.87x /
# 0.79-0.87x) -> on 212-346 / 327-384 / 339-385 tok/s (0.73-1.18x, two of four runs 1.16-1.18x / 1.07-1.26x /
# 1.08-1.26x; llama.cpp 281-303 / 297-329 / 303-329).
C_VNNI16_MIN_AVX2 = {"q8_32": 6}
TASK_ELEMS = 1 << 19          # widened tile per worker task: 2 MB of f32, within L2 between widening and sgemm

_C_KINDS = ("bf16", "q8_32", "q4_32", "f32")      # the weights.KINDS the C kernels read (a Stored F32 too)
# (kind, activation mode) -> the C function taking x [n, in] and the stored arrays
_C_MATMUL = {("bf16", "f32"): "matmul_bf16", ("f32", "f32"): "matmul_f32", ("q8_32", "f32"): "matmul_q8",
             ("q8_32", "i8"): "matmul_q8a", ("q8_32", "i16"): "matmul_q8w", ("q4_32", "f32"): "matmul_q4",
             ("q4_32", "i8"): "matmul_q4a", ("bf16", "bf16"): "matmul_bf16a"}
# ... and its NumPy twin when the activations are quantized
_ACT_TWINS = {("q8_32", "i8"): ref.matmul_act_q8, ("q8_32", "i16"): ref.matmul_act16_q8,
              ("q4_32", "i8"): ref.matmul_act_q4, ("bf16", "bf16"): ref.matmul_act_bf16}

_state = {"act_quant": None}   # int8/int16-quantized activations in the C GEMV (see set_act_quant)


# ---------------------------------------------------------------------------------- activation modes
_ACT_MODES = {
    # setting -> how the C kernels treat the activations per weight format ("bf16": batches only, see _c_mode)
    "q4": {"q8_32": "i16", "q4_32": "i8"},    # default
    "all": {"q8_32": "i8", "q4_32": "i8", "bf16": "bf16"},    # fastest, llama.cpp-like
    "none": {"q8_32": "f32", "q4_32": "f32"},  # exact twins of dequantize-then-matmul
}


def _parse_act_quant(value) -> str:
    if isinstance(value, bool):
        return "all" if value else "none"
    v = str(value).strip().lower()
    v = {"1": "all", "true": "all", "on": "all", "0": "none", "false": "none", "off": "none", "": "q4",
         "default": "q4"}.get(v, v)
    if v not in _ACT_MODES:
        raise ValueError(f"PYKIMI_ACT_QUANT={value!r}: expected one of {', '.join(_ACT_MODES)}")
    return v


def set_act_quant(value) -> None:
    """How the C kernels treat activations: the C GEMV (n <= SMALL_N) for quantized weights, and with "all" the
    batches of bf16 weights.

    Why: decoding int4/int8 to f32 in registers costs ~3 vector ops per 8 weights, which makes the quantized
    GEMVs compute bound (int4 slower per token than bf16). Quantizing the activation row once per call and
    doing integer block dot products keeps them memory bound. For bf16 weights, prefill is compute bound and
    the CPU's vdpbf16ps (AVX512_BF16) does twice the multiplies of an f32 FMA -- on bf16 inputs.
      "q4" (default): Q8 weights x int16 activations (rounding ~1e-5 relative: numerically the float
              product) -- at the AVX-512 and the AVX2 level in every batch, prefill included (the int16 batch
              kernel from C_VNNI16_MIN rows at the AVX-512 level, C_VNNI16_MIN_AVX2 at the AVX2 level; with
              PYKIMI_VNNI16_BATCH=0 batches of C_BATCH_ROWS_Q8 rows take the exact f32 batch kernel at the AVX-512
              level and batches past SMALL_N_ACT rows the widened tiles) --, Q4 weights x int8 activations (~0.5 %
              rms per matmul, small next to int4's own error); bf16 weights: the exact f32 product;
      "all":  int8 activations for Q8 and Q4 (fastest; like llama.cpp's Q8_0 x Q8_0) -- at the AVX-512 level in
              every batch, prefill included (the int8 batch kernel from C_VNNI_MIN rows at the AVX-512 level,
              C_VNNI_MIN_AVX2 at the AVX2 level; with PYKIMI_VNNI_BATCH=0 Q8 batches past SMALL_N_ACT rows take
              the exact f32 product of the widened tiles) -- and bf16 weights take
              activations rounded to bf16 (round to nearest even, 2^-8 relative per element at most; as
              llama.cpp and PyTorch do for bf16 weights): every batch of >= C_BF16A_MIN (8) rows -- prefill,
              vision, a decode batch of many sequences -- runs the AVX512_BF16 kernel (twin
              ref.matmul_act_bf16), where the C backend runs the AVX-512 level on a CPU with AVX512_BF16 (not
              turned off by PYKIMI_AVX512BF16=0, and not on AMX, which keeps its exact product). Fewer rows
              (decode, the fused decode layer) stay the exact f32 product, and so does every bf16 product
              where that kernel does not run; plan(kind, n) says which per n;
      "none": no activation quantization (dequantize in registers; exact twin of ref.matmul).
    Environment: PYKIMI_ACT_QUANT. True/False mean "all"/"none"."""
    _state["act_quant"] = _parse_act_quant(value)


def act_quant() -> str:
    if _state["act_quant"] is None:
        _state["act_quant"] = _parse_act_quant(os.environ.get("PYKIMI_ACT_QUANT", "q4"))
    return _state["act_quant"]


def _act_mode(kind: str) -> str:
    """The activation mode of the row kernels (decode rows, the fused decode calls): the setting's for Q8 / Q4;
    bf16 weights always f32 there (their bf16 activations are for batches: _c_mode)."""
    m = _ACT_MODES[act_quant()].get(kind, "f32")
    return "f32" if m == "bf16" else m


def _bf16_act() -> bool:
    """bf16 weights' batches take bf16 activations: the setting asks for it and the C kernels can (the AVX-512
    level, AVX512_BF16 on, not AMX: csrc job_prepare)."""
    if _ACT_MODES[act_quant()].get("bf16") != "bf16":
        return False
    c = _mods.get("c")
    return c is not None and c.get_simd() == "avx512" and c.get_avx512bf16() and not c.get_amx()


def _vnni(kind: str) -> bool:
    """int8-activation batches of this format run the int8 batch kernel: Q8_32 / Q4_32 in mode "i8" at the AVX-512
    level (the VNNI kernel, from C_VNNI_MIN rows) or the AVX2 level (its vpmaddubsw twin, from C_VNNI_MIN_AVX2 rows),
    the kernel on (c.set_vnni_batch, PYKIMI_VNNI_BATCH); not Q8_32 with AMX, whose exact tile product keeps its rows
    (C_AMX_MIN_Q8..C_AMX_ROWS; not measured against this kernel)."""
    c = _mods.get("c")
    if c is None or _act_mode(kind) != "i8":
        return False
    level = c.get_simd()
    if kind not in (C_VNNI_MIN if level == "avx512" else C_VNNI_MIN_AVX2 if level == "avx2" else {}):
        return False
    if kind == "q8_32" and _c_amx():
        return False
    return bool(c.get_vnni_batch())


def _vnni16(kind: str) -> bool:
    """int16-activation batches of this format run the int16 batch kernel: Q8_32 in mode "i16" (the default "q4") at
    the AVX-512 level (vpdpwssd, from C_VNNI16_MIN rows; not with AMX, whose exact tile product keeps its rows) or the
    AVX2 level (its vpmaddwd twin, from C_VNNI16_MIN_AVX2 rows), the kernel on (c.set_vnni16_batch,
    PYKIMI_VNNI16_BATCH)."""
    c = _mods.get("c")
    if c is None or _act_mode(kind) != "i16":
        return False
    level = c.get_simd()
    if kind not in (C_VNNI16_MIN if level == "avx512" else C_VNNI16_MIN_AVX2 if level == "avx2" else {}):
        return False
    if level == "avx512" and _c_amx():
        return False
    return bool(c.get_vnni16_batch())


def _small_n(kind: str) -> int:
    """Rows of x up to which matmul uses the stored-form C kernel for this weight format (C backend)."""
    if kind == "bf16" and _bf16_act():
        return 1 << 62                      # every bf16 batch on the AVX512_BF16 kernel, however many rows
    if _vnni(kind) or _vnni16(kind):
        return 1 << 62                      # every int8 / int16-activation batch on a batch kernel (or the row kernel)
    mode = _act_mode(kind)
    n = SMALL_N_ACT.get((kind, mode))
    if kind == "bf16" and _c_level() == "avx2":
        return C_TN_ROWS_AVX2               # the exact batch kernel from 12 rows, then the tiles
    if n is None or (kind in ("bf16", "f32") and not _c_avx512()):
        return SMALL_N
    if not _c_avx512() and (kind, mode) in SMALL_N_ACT_AVX2:
        return min(n, SMALL_N_ACT_AVX2[(kind, mode)])
    if kind in ("bf16", "q8_32") and _c_amx():
        return C_AMX_ROWS if kind == "bf16" else max(n, C_AMX_ROWS)
    if kind == "q8_32" and _c_avx512() and n >= C_BATCH_ROWS_Q8[0]:
        n = max(n, C_BATCH_ROWS_Q8[1])
    return n


def _c_mode(kind: str, n: int) -> str:
    """The activation mode a C call uses for n rows of x: the setting's, except Q8_32 weights with
    C_BATCH_ROWS_Q8 rows at the AVX-512 level (or C_AMX_MIN_Q8..C_AMX_ROWS with AMX), which run the exact f32
    product (batch-vectorised kernel, AMX tiles) -- unless their int8 activations go to the int8 batch kernel
    (_vnni: mode "all" at the AVX-512 level without AMX, or at the AVX2 level: "i8" at every n) or their int16 ones
    to the int16 batch kernel (_vnni16: the default mode at the AVX-512 level without AMX, or at the AVX2 level: "i16"
    at every n); bf16 weights:
    "bf16" from C_BF16A_MIN rows when _bf16_act(), else (and below that) "f32"."""
    if kind == "bf16":
        return "bf16" if n >= C_BF16A_MIN and _bf16_act() else "f32"
    if kind == "f32":
        return "f32"
    if _vnni(kind):
        return "i8"                         # below C_VNNI_MIN(_AVX2) the row kernel, from it the batch kernel
    if _vnni16(kind):
        return "i16"                        # below C_VNNI16_MIN(_AVX2) the int16 row kernel, from it the batch kernel
    if kind == "q8_32" and _c_avx512() and (C_BATCH_ROWS_Q8[0] <= n <= C_BATCH_ROWS_Q8[1]
                                            or (C_AMX_MIN_Q8 <= n <= C_AMX_ROWS and _c_amx())):
        return "f32"
    return _act_mode(kind)


def _c_level() -> str | None:
    """The C kernels' SIMD level ("scalar" | "avx2" | "avx512"), None without the C extension."""
    c = _mods.get("c")
    return None if c is None else c.get_simd()


def _c_avx512() -> bool:
    return _c_level() == "avx512"


def _c_amx() -> bool:
    """The C kernels run bf16 batches on AMX (the AVX-512 level, a CPU and kernel that grant it, not turned off)."""
    c = _mods.get("c")
    return c is not None and c.get_simd() == "avx512" and c.get_amx()


def _kind(w) -> str:
    """"dense" for an ndarray (BLAS reads it as it is), else the Weight's kind (weights.KINDS)."""
    return "dense" if isinstance(w, np.ndarray) else w.kind


def plan(kind: str, n: int) -> tuple[str, str]:
    """How matmul computes n rows of x on a weight of ``kind`` ("dense" for an ndarray) -> (path, mode):
    "blas" (an ndarray, few rows: one x @ W.T), "tiles" (widened row tiles + single-threaded sgemm on the
    worker threads), "c" / "numba" (the stored-form kernel); the mode ("f32" | "i8" | "i16" | "bf16") is the C
    kernel's."""
    if kind == "dense":
        return ("blas" if n <= SMALL_N else "tiles"), "f32"
    be = backend()
    if be == "numpy" or kind not in _C_KINDS or n == 0 or n > (_small_n(kind) if be == "c" else SMALL_N):
        return "tiles", "f32"
    if be == "c":
        return "c", _c_mode(kind, n)
    return "numba", "f32"


def reference(x, w) -> np.ndarray:
    """The NumPy twin of exactly what matmul(x, w) computes under the current settings (for tests)."""
    kind = _kind(w)
    x = np.asarray(x, dtype=np.float32)
    path, act = plan(kind, int(np.prod(x.shape[:-1], dtype=np.int64)))
    twin = _ACT_TWINS.get((kind, act)) if path == "c" else None
    if twin is None:
        return ref.matmul(x, w)              # every other path computes the f32 product of the decoded weights
    return twin(x.reshape(-1, x.shape[-1]), w).reshape(x.shape[:-1] + (w.shape[0],))


# ------------------------------------------------------------------------------------------- products
def _widen_rows(w, kind: str, r0: int, r1: int, buf: np.ndarray | None) -> np.ndarray:
    """Rows r0:r1 of W as f32 into buf (when given), single-threaded: called from the worker tasks of
    parallel_for, so it must neither fork threads of its own nor hold the GIL (Numba, nogil)."""
    if kind == "dense":
        return w[r0:r1]                                  # nothing to widen: a view
    dst = buf[: (r1 - r0) * w.shape[1]].reshape(r1 - r0, w.shape[1]) if buf is not None else None
    nb = numba_module() if kind in ("bf16", "q8_32", "q4_32") else None
    if nb is None:
        t = f32_rows(w, r0, r1)
        if dst is None:
            return t
        dst[...] = t
        return dst
    if dst is None:
        dst = np.empty((r1 - r0, w.shape[1]), dtype=np.float32)
    if kind == "bf16":
        nb.widen_bf16(np.ascontiguousarray(w.data[r0:r1]).view(np.uint16), dst)
    elif kind == "q8_32":
        nb.dequant_q8(np.ascontiguousarray(w.q[r0:r1]), np.ascontiguousarray(w.scales[r0:r1]), dst)
    else:
        nb.dequant_q4(np.ascontiguousarray(w.q[r0:r1]), np.ascontiguousarray(w.scales[r0:r1]), dst)
    return dst


def _matmul_tiled(x2: np.ndarray, w, kind: str) -> np.ndarray:
    """x2 @ W.T for many rows: W widened in row tiles of at most TASK_ELEMS floats, each tile multiplied by
    single-threaded BLAS, the tiles shared out to the worker threads (parallel_for).

    Why not one big widen + 2-thread BLAS: OpenBLAS splits every call statically between its threads, so when
    another process holds one core (the usual state of this machine) each call waits for the descheduled half,
    and its spinning idle threads steal the core from the next step (bench/RESULTS.md, "Crossovers"). Small
    tiles taken dynamically keep both cores busy when free and degrade to one core's speed, not below, when
    one is taken; a tile is still in L2 when sgemm reads it."""
    out_f, in_f = w.shape
    n = x2.shape[0]
    step = max(1, TASK_ELEMS // max(in_f, 1))
    y = np.empty((n, out_f), dtype=np.float32)
    if out_f == 0 or n == 0:
        return y if in_f else y.fill(0) or y
    tiles = [(r0, min(out_f, r0 + step)) for r0 in range(0, out_f, step)]
    bufs = threading.local()

    def task(t):
        r0, r1 = t
        buf = getattr(bufs, "buf", None)
        if buf is None:
            buf = bufs.buf = np.empty(step * in_f, dtype=np.float32)   # one scratch tile per worker
        np.matmul(x2, _widen_rows(w, kind, r0, r1, buf).T, out=y[:, r0:r1])

    parallel_for(task, tiles)
    return y


def widen(w, out: np.ndarray | None = None) -> np.ndarray:
    """W in any stored form as float32 [out, in] (or any shape for 1-D / f32 tensors), written into ``out``
    when given (same shape), else a new array. 2-D stored weights are widened in row tiles of TASK_ELEMS by
    the worker threads (parallel_for; Numba, nogil). Twin: weights.f32_of (the same exact decoding)."""
    kind = _kind(w)
    shape = tuple(int(s) for s in w.shape)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"widen: out is {out.dtype}{list(out.shape)}, expected contiguous float32{list(shape)}")
    if kind == "dense":
        out[...] = w
        return out
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        out[...] = f32_of(w)
        return out
    step = max(1, TASK_ELEMS // shape[1])

    def task(r0):
        r1 = min(shape[0], r0 + step)
        tile = out[r0:r1]
        got = _widen_rows(w, kind, r0, r1, tile.reshape(-1))
        if got is not tile and not np.shares_memory(got, tile):
            tile[...] = got

    parallel_for(task, range(0, shape[0], step))
    return out


def _stored(w, kind: str) -> tuple:
    """(data, scales or None): the arrays the C kernels read for a weight of a C kind."""
    return (w.data, None) if kind in ("bf16", "f32") else (w.q, w.scales)


def _owned(w, kind: str) -> tuple:
    """(data, scales or None, w): _stored plus the weight object, on which the C module keeps its pointers."""
    return _stored(w, kind) + (w,)


def _check_features(x: np.ndarray, w, who: str, label="W") -> tuple[int, int]:
    """(out, in) of weight w, after checking that x's last axis has `in` features."""
    out_f, in_f = (int(s) for s in w.shape)
    if x.shape[-1] != in_f:
        raise ValueError(f"{who} has {x.shape[-1]} features (shape {list(x.shape)}) but weight "
                         f"{getattr(w, 'name', '') or label} is [{out_f}, {in_f}]")
    return out_f, in_f


def matmul(x, w, exact: bool = False) -> np.ndarray:
    """x @ W.T in float32. x [n, in] or [in] (any leading dims are flattened); W [out, in] in any stored form.
    exact: the f32 product of the stored values whatever act_quant() says (the C kernels' f32 activation mode;
    the vision tower's products, which PYKIMI_ACT_QUANT=all would otherwise round to bf16 / int8)."""
    x = np.asarray(x)
    kind = _kind(w)
    out_f, in_f = _check_features(x, w, "matmul: x")
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype=np.float32)
    n = x2.shape[0]
    path, act = plan(kind, n)
    if exact and path == "c":
        act = "f32"
    if path == "blas":
        y = x2 @ np.asarray(w, dtype=np.float32).T
    elif path == "tiles":
        y = _matmul_tiled(x2, np.asarray(w, dtype=np.float32) if kind == "dense" else w, kind)
    elif path == "c":
        fn = getattr(_mods["c"], _C_MATMUL[(kind, act)])
        y = fn(x2, w.data) if kind in ("bf16", "f32") else fn(x2, w.q, w.scales)
    else:  # numba
        nm = _mods["numba"]
        y = np.empty((n, out_f), dtype=np.float32)
        if kind == "bf16":
            nm.matmul_bf16(x2, np.ascontiguousarray(w.data), y)
        elif kind == "q8_32":
            nm.matmul_q8(x2, np.ascontiguousarray(w.q), np.ascontiguousarray(w.scales), y)
        elif kind == "q4_32":
            nm.matmul_q4(x2, np.ascontiguousarray(w.q), np.ascontiguousarray(w.scales), y)
        else:
            y = x2 @ np.asarray(w.data, dtype=np.float32).T
    return y.reshape(lead + (out_f,))


def matmul_many(xs, ws, rowwise: bool = False) -> list:
    """[matmul(x, w) for x, w in zip(xs, ws)], computed together when possible.

    With the C backend every product the stored-form C kernels take (plan: "c") goes into ONE kernel call
    and one thread fork/join (e.g. all selected experts' gate and up projections of a decode step, or of a
    prefill); the rest go through matmul one by one. Same numerics as matmul.

    rowwise=True (the serve engine's batched decode step): each row of each result is bit for bit
    matmul(that row alone, w) -- the decision ``plan`` makes for ONE row, and in C the per-row kernels at any
    n (c.ROWS: never a batch kernel, whose summation order or bf16 rounding of x depends on the rows that share
    the call); products that do not go to C for one row run row by row."""
    xs, ws = list(xs), list(ws)
    if len(xs) != len(ws):
        raise ValueError(f"matmul_many: {len(xs)} inputs but {len(ws)} weights")
    if rowwise:
        return _matmul_rowwise(xs, ws)
    if backend() != "c" or len(xs) < 2:
        return [matmul(x, w) for x, w in zip(xs, ws)]
    out: list = [None] * len(xs)
    jobs, where, shapes = [], [], []
    for i, (x, w) in enumerate(zip(xs, ws)):
        x = np.asarray(x)
        kind = _kind(w)
        out_f, in_f = _check_features(x, w, f"matmul_many: x[{i}]", i)
        x2 = x.reshape(-1, in_f)
        n = x2.shape[0]
        path, act = plan(kind, n)
        if path != "c":
            out[i] = matmul(x, w)
            continue
        jobs.append((x2, kind) + _stored(w, kind) + (act, w))
        where.append(i)
        shapes.append(x.shape[:-1] + (out_f,))
    if jobs:
        for i, shp, y in zip(where, shapes, _mods["c"].matmul_many(jobs)):
            out[i] = y.reshape(shp)
    return out


def _matmul_rowwise(xs, ws) -> list:
    """matmul_many(xs, ws, rowwise=True): one C call for every product whose one-row plan is C, per-row kernels."""
    out: list = [None] * len(xs)
    jobs, where = [], []
    for i, (x, w) in enumerate(zip(xs, ws)):
        x = np.asarray(x)
        kind = _kind(w)
        out_f, in_f = _check_features(x, w, f"matmul_many: x[{i}]", i)
        x2 = x.reshape(-1, in_f)
        path, act = plan(kind, 1)
        if path != "c" or x2.shape[0] == 0:
            out[i] = (np.stack([matmul(r, w) for r in x2]) if x2.shape[0] else
                      np.zeros((0, out_f), np.float32)).reshape(x.shape[:-1] + (out_f,))
            continue
        jobs.append((x2, kind) + _stored(w, kind) + (act, w))
        where.append(i)
    if jobs:
        for i, y in zip(where, _mods["c"].matmul_many(jobs, rows=True)):
            out[i] = y.reshape(np.shape(xs[i])[:-1] + (y.shape[1],))
    return out


def _check_heads(x, w, row0: int, stride: int, rows: int, width: int, who: str) -> None:
    """The C path reads raw rows: every head's block must lie inside W and x must be [H, width]."""
    H = x.shape[0] if x.ndim == 2 else -1
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{who}: x has shape {list(x.shape)}, expected [heads, {width}]")
    if row0 < 0 or rows < 1 or stride < rows or row0 + (H - 1) * stride + rows > int(w.shape[0]):
        raise ValueError(f"{who}: {H} head blocks of {rows} rows from row {row0} every {stride} rows do not fit "
                         f"in weight {getattr(w, 'name', '')} of {int(w.shape[0])} rows")


def heads_vecmat(x, w, row0: int, stride: int, rows: int) -> np.ndarray:
    """x [H, rows] -> [H, in]: per head h, x[h] @ W[row0 + h*stride : + rows] (W in any stored form).
    The C backend decodes each row once into an accumulator (pk_vecmat_many, heads in parallel, no Python
    object per head); the others use the NumPy twin ref.vecmat on row views."""
    x = np.asarray(x, dtype=np.float32)
    _check_heads(x, w, row0, stride, rows, rows, "heads_vecmat")
    kind = _kind(w)
    if backend() == "c" and kind in _C_KINDS:
        return _mods["c"].heads("vecmat", x, kind, *_stored(w, kind), int(w.shape[1]), row0, stride, rows)
    return np.stack([ref.vecmat(x[h], rows_of(w, row0 + h * stride, row0 + h * stride + rows))
                     for h in range(x.shape[0])])


def heads_matvec(x, w, row0: int, stride: int, rows: int) -> np.ndarray:
    """x [H, in] -> [H, rows]: per head h, W[row0 + h*stride : + rows] @ x[h] -- matmul of one row of x on
    each head's row block (same numerics as matmul, activation quantization included)."""
    x = np.asarray(x, dtype=np.float32)
    _check_heads(x, w, row0, stride, rows, int(w.shape[1]), "heads_matvec")
    kind = _kind(w)
    if backend() == "c" and kind in _C_KINDS:
        return _mods["c"].heads("matvec", x, kind, *_stored(w, kind), int(w.shape[1]), row0, stride, rows,
                                _act_mode(kind))
    return np.stack([matmul(x[h], rows_of(w, row0 + h * stride, row0 + h * stride + rows))
                     for h in range(x.shape[0])])
