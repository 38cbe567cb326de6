"""NumPy reference twins of every kernel: the specification the fast kernels are tested against.

Every function here is plain NumPy, float32 in / float32 out, and is what a Numba or C kernel of the same
name must reproduce (up to float summation order). Weight formats are described in csrc/pykimi_kernels.h
and pykimi/quant.py:

  Q8_32: q int8 [out, in], scales f32 [out, ceil(in/32)];   W[o, i] = q[o, i] * scales[o, i // 32]
  Q4_32: q uint8 [out, ceil(in/2)] (element 2j = low nibble, 2j+1 = high nibble), scales as Q8_32;
         W[o, i] = (code - 8) * scales[o, i // 32]
"""
import dataclasses

import numpy as np

QBLOCK = 32  # quantization block along `in`


# ------------------------------------------------------------------------------------- weight decoding

def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exact: the bits become the high half of the f32 (twin of numba_kernels.widen_bf16)."""
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def dequant_q8(q: np.ndarray, scales: np.ndarray, in_features: int | None = None) -> np.ndarray:
    """Q8_32 -> float32 [rows, in] (twin of numba_kernels.dequant_q8)."""
    q = np.asarray(q)
    rows, n_in = q.shape
    scale_per_col = np.repeat(np.asarray(scales, np.float32), QBLOCK, axis=1)[:, :n_in]  # [rows, in]
    return q.astype(np.float32) * scale_per_col


def unpack_q4(q: np.ndarray, in_features: int) -> np.ndarray:
    """Q4_32 packed bytes [rows, ceil(in/2)] -> int8 values -8..7 [rows, in]."""
    q = np.asarray(q, dtype=np.uint8)
    codes = np.empty((q.shape[0], q.shape[1] * 2), dtype=np.int8)
    codes[:, 0::2] = q & 0x0F  # element 2j: low nibble
    codes[:, 1::2] = q >> 4    # element 2j+1: high nibble
    return codes[:, :in_features] - np.int8(8)


def dequant_q4(q: np.ndarray, scales: np.ndarray, in_features: int) -> np.ndarray:
    """Q4_32 -> float32 [rows, in] (twin of numba_kernels.dequant_q4)."""
    vals = unpack_q4(q, in_features)
    scale_per_col = np.repeat(np.asarray(scales, np.float32), QBLOCK, axis=1)[:, :in_features]
    return vals.astype(np.float32) * scale_per_col


def weight_kind(w) -> str:
    """'f32' | 'BF16' | 'F16' | ... | 'q8_32' | 'q4_32' -- what matmul has to decode."""
    if isinstance(w, np.ndarray):
        return "f32"
    fmt = getattr(w, "fmt", None)
    if fmt is not None:
        return fmt
    return str(w.dtype)


def weight_rows_f32(w, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of W as a new float32 array [r1-r0, in] (the bounded tile the BLAS path widens)."""
    kind = weight_kind(w)
    if kind == "f32":
        return np.asarray(w[r0:r1], dtype=np.float32)
    if kind == "q8_32":
        return dequant_q8(w.q[r0:r1], w.scales[r0:r1], w.shape[1])
    if kind == "q4_32":
        return dequant_q4(w.q[r0:r1], w.scales[r0:r1], w.shape[1])
    if kind == "BF16":
        return bf16_to_f32(w.data[r0:r1])
    return np.asarray(w.data[r0:r1], dtype=np.float32)  # F32, F16, ints


def weight_rows(w, r0: int, r1: int):
    """Rows r0:r1 of W in its stored form (a view: nothing is read or copied)."""
    if isinstance(w, np.ndarray):
        return w[r0:r1]
    if hasattr(w, "q"):                                      # Q8Weight / Q4Weight
        return dataclasses.replace(w, shape=(r1 - r0,) + tuple(w.shape[1:]), q=w.q[r0:r1],
                                   scales=w.scales[r0:r1])
    return type(w)(w.name, w.dtype, w.data[r0:r1])           # Stored


def weight_f32(w) -> np.ndarray:
    """All of W as float32 [out, in]."""
    if isinstance(w, np.ndarray):
        return w if w.dtype == np.float32 else w.astype(np.float32)
    return weight_rows_f32(w, 0, w.shape[0])


# ------------------------------------------------------------------------------------------- matmul

def matmul(x, w):
    """x @ W.T for x [n, in] or [in], W [out, in] (ndarray, Stored or quantized weight) -> float32."""
    return np.asarray(x, dtype=np.float32) @ weight_f32(w).T


def vecmat(x, w) -> np.ndarray:
    """x @ W for x [rows] (or [n, rows]), W [rows, in] in any stored form -> float32 [in] ([n, in]):
    a combination of W's rows (the absorbed MLA decode's q_nope · W_uk). Twin of pk_vecmat_many."""
    return np.asarray(x, dtype=np.float32) @ weight_f32(w)


def quantize_act(x: np.ndarray, bits: int = 8):
    """Activations f32 [n, in] -> (xq [n, nb*32] zero-padded, xd f32 [n, nb]) per block of 32:
    d = max|x| / qmax, q = rint(x * (1/d)) clamped to +-qmax, qmax = 127 (int8, twin of pk_quant_act) or
    32767 (bits=16: int16, twin of pk_quant_act16); all f32 arithmetic."""
    qmax = 127 if bits == 8 else 32767
    x = np.asarray(x, dtype=np.float32)
    n, in_f = x.shape
    nb = -(-in_f // QBLOCK)
    xp = np.zeros((n, nb * QBLOCK), dtype=np.float32)
    xp[:, :in_f] = x
    b = xp.reshape(n, nb, QBLOCK)
    d = (np.max(np.abs(b), axis=-1) / np.float32(qmax)).astype(np.float32)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d > 0)
    q = np.clip(np.rint(b * inv[..., None]), -qmax, qmax).astype(np.int8 if bits == 8 else np.int16)
    return q.reshape(n, nb * QBLOCK), d


def _matmul_act(x, vals: np.ndarray, scales: np.ndarray, bits: int = 8) -> np.ndarray:
    """sum over blocks of (integer dot of int8 x block with integer weight block) * dx * dw."""
    x = np.asarray(x, dtype=np.float32)
    squeeze = x.ndim == 1
    x2 = x.reshape(1, -1) if squeeze else x
    n, in_f = x2.shape
    out_f = vals.shape[0]
    nb = -(-in_f // QBLOCK)
    xq, xd = quantize_act(x2, bits)
    wv = np.zeros((out_f, nb * QBLOCK), dtype=np.int64)
    wv[:, :in_f] = vals
    dots = np.einsum("nbk,obk->nob", xq.reshape(n, nb, QBLOCK).astype(np.int64),
                     wv.reshape(out_f, nb, QBLOCK))                       # exact integers
    y = np.sum(dots.astype(np.float32) * (xd[:, None, :] * np.asarray(scales, np.float32)[None, :, :]), axis=-1)
    return y[0] if squeeze else y


def matmul_act_q8(x, w) -> np.ndarray:
    """Twin of pk_matmul_q8a: Q8_32 weights times int8-quantized activations."""
    return _matmul_act(x, np.asarray(w.q), w.scales)


def matmul_act16_q8(x, w) -> np.ndarray:
    """Twin of pk_matmul_q8w: Q8_32 weights times int16-quantized activations."""
    return _matmul_act(x, np.asarray(w.q), w.scales, bits=16)


def matmul_act_q4(x, w) -> np.ndarray:
    """Twin of pk_matmul_q4a: Q4_32 weights (values -8..7) times int8-quantized activations."""
    return _matmul_act(x, unpack_q4(w.q, w.shape[1]), w.scales)


# the small ops' definitions are the shared primitives of pykimi.ops (one rounding each, used everywhere)
from ..ops import add_rms_norm, rms_norm, silu, softmax  # noqa: E402,F401


def rope_interleaved(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """ops.apply_rope with angles [S, D//2] broadcast over the heads of x [S, H, D]."""
    a = np.asarray(angles, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    return apply_rope(x, a[:, None, :] if x.ndim == 3 and a.ndim == 2 else a)


from ..ops import apply_rope  # noqa: E402


# -------------------------------------------------------------------------------------- MoE dispatch

def topk(scores: np.ndarray, k: int):
    """Per row, the k largest scores: (ids int64 [n, k], values f32 [n, k]), largest first, ties -> lower id."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.argsort(-scores, axis=-1, kind="stable")[:, :k].astype(np.int64)
    return ids, np.take_along_axis(scores, ids, axis=-1)


def route_select(logits: np.ndarray, bias, scoring: str, k: int, n_group: int, topk_group: int,
                 group_top2: bool, norm: bool, scaling: float):
    """The router's selection from logits f32 [S, E] (spec §8.4; DeepSeek-V3 noaux_tc and the greedy rules)
    -> (scores f32 [S, E], ids i32 [S, k] ascending, weights f32 [S, k], margin f32 [S]).

    scores = sigmoid(logits) ("sigmoid") or softmax ("softmax"); choice = scores + bias (bias None: scores);
    with n_group > 1 only the topk_group best groups stay (a group's score: the sum of its top-2 choices when
    group_top2, else its max; dropped groups -inf); ids = the k best choices (stable: ties -> lower id), sorted;
    weights = their unbiased scores, normalised to sum 1 when norm (and k > 1), times scaling; margin = k-th
    minus (k+1)-th choice."""
    logits = np.asarray(logits, dtype=np.float32)
    S, E = logits.shape
    if scoring == "sigmoid":
        with np.errstate(over="ignore"):
            scores = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))                 # [S, E]
    else:
        m = logits.max(axis=-1, keepdims=True)
        e = np.exp(logits - m)
        scores = e / e.sum(axis=-1, keepdims=True)
    choice = scores + np.asarray(bias, dtype=np.float32)[None, :] if bias is not None else scores.copy()
    if n_group > 1:
        g = choice.reshape(S, n_group, E // n_group)                                      # [S, G, E/G]
        group_score = np.sort(g, axis=-1)[..., -2:].sum(axis=-1) if group_top2 else g.max(axis=-1)
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :topk_group]           # [S, topk_group]
        gmask = np.zeros((S, n_group), dtype=bool)
        np.put_along_axis(gmask, keep, True, axis=-1)
        # Dropped groups get -inf (HF fills 0.0, spec §11.6; identical whenever scores are positive).
        choice = np.where(np.repeat(gmask, E // n_group, axis=-1), choice, -np.inf).astype(np.float32)
    order = np.argsort(-choice, axis=-1, kind="stable")                                    # [S, E] best first
    ids = order[:, :k]                                                                     # [S, k]
    kth = np.take_along_axis(choice, order[:, k - 1:k], axis=-1)[:, 0]
    if k < E:
        margin = (kth - np.take_along_axis(choice, order[:, k:k + 1], axis=-1)[:, 0]).astype(np.float32)
    else:
        margin = np.full(S, np.inf, dtype=np.float32)
    ids = np.sort(ids, axis=-1)                                                            # ascending (golden)
    weights = np.take_along_axis(scores, ids, axis=-1).astype(np.float32)                  # unbiased scores
    if norm and k > 1:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + np.float32(1e-20))
    weights = weights * np.float32(scaling)
    return scores.astype(np.float32, copy=False), ids.astype(np.int32), weights.astype(np.float32), margin


def group_by_expert(ids: np.ndarray, n_experts: int):
    """Counting sort of the (token, slot) assignments by expert.

    ids int [n, k] -> (order int64 [n*k], offsets int64 [n_experts+1]): order[offsets[e]:offsets[e+1]] are
    the flat slot indices s (token = s // k) routed to expert e, in increasing s (stable)."""
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    order = np.argsort(flat, kind="stable").astype(np.int64)
    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=n_experts), out=offsets[1:])
    return order, offsets


def gather_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x[rows] as a new contiguous float32 array."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)[np.asarray(rows, dtype=np.int64)])


def scatter_add_weighted(out: np.ndarray, rows: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """out[rows[i]] += weights[i] * y[i], in order of i (in place; returns out)."""
    contrib = np.asarray(weights, dtype=np.float32)[:, None] * np.asarray(y, dtype=np.float32)
    np.add.at(out, np.asarray(rows, dtype=np.int64), contrib)
    return out
