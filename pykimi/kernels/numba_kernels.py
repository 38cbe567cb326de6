"""Numba kernels: the fallback GEMVs when the C extension is absent, the weight-tile widening of the BLAS
path, and the fused small ops (the norms, the router's selection). The GEMVs and tiles have their NumPy twins
in ref.py; the fused ops are twins of stage definitions (ops.rms_norm / add_rms_norm, moe.select_experts).
The wrappers in linear.py / fused.py reshape/convert the inputs so these see contiguous float32 arrays.

All are compiled lazily on first call (cache=True keeps the machine code across processes).
"""
import numpy as np
from numba import njit, prange

QBLOCK = 32

# ---------------------------------------------------------------------- GEMV / small GEMM (fallback)
# Same structure as csrc/: one output row per iteration (prange = threads over rows), the row decoded
# once into a small buffer, then used by every row of x. fastmath lets LLVM vectorise the reduction.


@njit(parallel=True, fastmath=True, cache=True)
def matmul_bf16(x, w, y):
    """y[n, out] = x[n, in] @ widen(w[out, in]).T with w bf16 bits (uint16)."""
    n, nin = x.shape
    for o in prange(w.shape[0]):
        row = np.empty(nin, np.uint32)
        for i in range(nin):
            row[i] = np.uint32(w[o, i]) << np.uint32(16)
        rf = row.view(np.float32)
        for t in range(n):
            acc = np.float32(0.0)
            for i in range(nin):
                acc += x[t, i] * rf[i]
            y[t, o] = acc


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q8(x, q, scales, y):
    """Q8_32: W[o, i] = q[o, i] * scales[o, i // 32]."""
    n, nin = x.shape
    for o in prange(q.shape[0]):
        row = np.empty(nin, np.float32)
        for i in range(nin):
            row[i] = np.float32(q[o, i]) * scales[o, i // QBLOCK]
        for t in range(n):
            acc = np.float32(0.0)
            for i in range(nin):
                acc += x[t, i] * row[i]
            y[t, o] = acc


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q4(x, q, scales, y):
    """Q4_32: element 2j = low nibble, 2j+1 = high nibble; W = (code - 8) * scale."""
    n, nin = x.shape
    for o in prange(q.shape[0]):
        row = np.empty(nin, np.float32)
        for i in range(nin):
            b = q[o, i >> 1]
            code = (b >> 4) if (i & 1) else (b & 15)
            row[i] = np.float32(np.int32(code) - 8) * scales[o, i // QBLOCK]
        for t in range(n):
            acc = np.float32(0.0)
            for i in range(nin):
                acc += x[t, i] * row[i]
            y[t, o] = acc


# ----------------------------------------------------------------- weight tiles for the BLAS path
# Single-threaded and nogil: kernels.linear._matmul_tiled calls them from its worker threads, one tile each
# (twins: ref.bf16_to_f32, ref.dequant_q8, ref.dequant_q4).


@njit(nogil=True, cache=True)
def widen_bf16(bits, out):
    """out[r, i] = float32 with bits[r, i] (uint16) as its high half: exact."""
    rows, nin = bits.shape
    ov = out.view(np.uint32)
    for r in range(rows):
        for i in range(nin):
            ov[r, i] = np.uint32(bits[r, i]) << np.uint32(16)


@njit(nogil=True, cache=True)
def dequant_q8(q, scales, out):
    """Q8_32: out[r, i] = q[r, i] * scales[r, i // 32] (one f32 product: exact twin). Whole blocks in a fixed
    32-wide inner loop, which LLVM vectorises (2x faster than indexing the scale per element)."""
    rows, nin = out.shape
    nfull = nin // QBLOCK
    for r in range(rows):
        for b in range(nfull):
            d = scales[r, b]
            base = b * QBLOCK
            for k in range(QBLOCK):
                out[r, base + k] = np.float32(q[r, base + k]) * d
        for i in range(nfull * QBLOCK, nin):
            out[r, i] = np.float32(q[r, i]) * scales[r, i // QBLOCK]


@njit(nogil=True, cache=True)
def dequant_q4(q, scales, out):
    """Q4_32: element 2j = low nibble, 2j+1 = high nibble; out = (code - 8) * scale (exact twin)."""
    rows, nin = out.shape
    for r in range(rows):
        for j in range(nin // 2):
            b = q[r, j]
            d = scales[r, (2 * j) // QBLOCK]
            out[r, 2 * j] = np.float32(np.int32(b & 15) - 8) * d
            out[r, 2 * j + 1] = np.float32(np.int32(b >> 4) - 8) * d
        if nin & 1:
            b = q[r, nin // 2]
            out[r, nin - 1] = np.float32(np.int32(b & 15) - 8) * scales[r, (nin - 1) // QBLOCK]


# ------------------------------------------------------------------------------------ fused small ops

@njit(fastmath=False, cache=True)
def rms_norm(x, weight, eps, out):
    """x [rows, d] -> out = x / sqrt(mean(x^2) + eps) * weight (one pass for the sum, one to write)."""
    rows, d = x.shape
    for r in range(rows):
        s = 0.0  # float64 accumulator: the mean of squares is the one place precision matters
        for i in range(d):
            s += np.float64(x[r, i]) * x[r, i]
        inv = np.float32(1.0) / np.sqrt(np.float32(s / d) + np.float32(eps))
        for i in range(d):
            out[r, i] = (x[r, i] * inv) * weight[i]


@njit(fastmath=False, cache=True)
def add_rms_norm(x, a, weight, eps, xo, out):
    """xo = x + a; out = rms_norm(xo) (rows of [rows, d]): the residual add and the next pre-norm in one pass."""
    rows, d = x.shape
    for r in range(rows):
        s = 0.0
        for i in range(d):
            v = x[r, i] + a[r, i]
            xo[r, i] = v
            s += np.float64(v) * v
        inv = np.float32(1.0) / np.sqrt(np.float32(s / d) + np.float32(eps))
        for i in range(d):
            out[r, i] = (xo[r, i] * inv) * weight[i]


# ----------------------------------------------------------------------------------- the router

@njit(cache=True)
def route_select(logits, bias, sigmoid, k, n_group, topk_group, group_top2, norm, scaling, scores, ids, weights,
                 margin):
    """moe.select_experts for every row of logits [S, E] in one call (bias: zeros when unused; outputs preallocated:
    scores [S, E], ids int32 [S, k], weights [S, k], margin [S]). Selection by k passes of argmax over the
    not-yet-taken entries (ties -> lower id, as a stable descending sort; O(k * E) beats a sort for k=6, E=64);
    groups the same way."""
    S, E = logits.shape
    per = E // n_group
    choice = np.empty(E, np.float32)
    taken = np.zeros(E, np.bool_)
    gscore = np.empty(n_group, np.float32)
    gkeep = np.zeros(n_group, np.bool_)
    for s in range(S):
        if sigmoid:
            for e in range(E):
                scores[s, e] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits[s, e]))
        else:
            m = logits[s, 0]
            for e in range(1, E):
                m = max(m, logits[s, e])
            tot = np.float32(0.0)
            for e in range(E):
                scores[s, e] = np.exp(logits[s, e] - m)
                tot += scores[s, e]
            for e in range(E):
                scores[s, e] = scores[s, e] / tot
        for e in range(E):
            choice[e] = scores[s, e] + bias[e]
        if n_group > 1:
            for g in range(n_group):
                a1 = -np.inf  # largest and second largest choice of the group
                a2 = -np.inf
                for e in range(g * per, (g + 1) * per):
                    v = choice[e]
                    if v > a1:
                        a2 = a1
                        a1 = v
                    elif v > a2:
                        a2 = v
                gscore[g] = np.float32(a2 + a1) if group_top2 and per > 1 else np.float32(a1)
                gkeep[g] = False
            for j in range(min(topk_group, n_group)):
                best = -1
                for g in range(n_group):
                    if not gkeep[g] and (best < 0 or gscore[g] > gscore[best]):
                        best = g
                gkeep[best] = True
            for e in range(E):
                if not gkeep[e // per]:
                    choice[e] = -np.inf
        taken[:] = False
        kth = np.float32(0.0)
        for j in range(min(k + 1, E)):
            best = -1
            for e in range(E):
                if not taken[e] and (best < 0 or choice[e] > choice[best]):
                    best = e
            if j < k:
                taken[best] = True
                kth = choice[best]
            else:
                margin[s] = kth - choice[best]
        if k >= E:
            margin[s] = np.inf
        j = 0
        tot = np.float32(0.0)
        for e in range(E):  # ascending ids
            if taken[e]:
                ids[s, j] = e
                weights[s, j] = scores[s, e]
                tot += scores[s, e]
                j += 1
        for j in range(k):
            if norm and k > 1:
                weights[s, j] = weights[s, j] / (tot + np.float32(1e-20))
            weights[s, j] = weights[s, j] * np.float32(scaling)
