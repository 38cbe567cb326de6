"""NumPy twins of the matmul kernels: the specification the GEMV / GEMM kernels are tested against
(kernels.linear.reference picks the one matching a product's path). The fused ops' twins are stage
definitions (ops, attention, moe), not here.

Every function here is plain NumPy, float32 in / float32 out, and is what a Numba or C kernel of the same
name must reproduce (up to float summation order). Weight formats are described in csrc/pykimi_kernels.h
and pykimi/weights.py (their decoding is defined there):

  Q8_32: q int8 [out, in], scales f32 [out, ceil(in/32)];   W[o, i] = q[o, i] * scales[o, i // 32]
  Q4_32: q uint8 [out, ceil(in/2)] (element 2j = low nibble, 2j+1 = high nibble), scales as Q8_32;
         W[o, i] = (code - 8) * scales[o, i // 32]
"""
import numpy as np

# the formats' decodings are defined with the Weight protocol, in weights.py
from ..weights import QBLOCK, bf16_to_f32, dequant_q4, dequant_q8, f32_of, unpack_q4  # noqa: F401


# ------------------------------------------------------------------------------------------- matmul

def matmul(x, w):
    """x @ W.T for x [n, in] or [in], W [out, in] (ndarray, Stored or quantized weight) -> float32."""
    return np.asarray(x, dtype=np.float32) @ f32_of(w).T


def vecmat(x, w) -> np.ndarray:
    """x @ W for x [rows] (or [n, rows]), W [rows, in] in any stored form -> float32 [in] ([n, in]):
    a combination of W's rows (the absorbed MLA decode's q_nope · W_uk). Twin of pk_vecmat_many."""
    return np.asarray(x, dtype=np.float32) @ f32_of(w)


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


def round_bf16(x) -> np.ndarray:
    """float32 x rounded to the nearest bf16 (ties to even, as torch's .to(torch.bfloat16)), returned as float32
    (the bf16 value, exact). NaN stays NaN; values past the largest bf16 become +-inf."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    r = np.where(np.isnan(x), (u.astype(np.uint32) | 0x00400000) & 0xFFFF0000, r).astype(np.uint32)
    return r.view(np.float32)


def matmul_act_bf16(x, w) -> np.ndarray:
    """Twin of pk_matmul_bf16a (PYKIMI_ACT_QUANT=all, bf16 weights, batches on AVX512_BF16): x rounded to bf16
    (round to nearest even), then the f32 product with the decoded weights. The kernel sums in f32 in another
    order, and its vdpbf16ps takes denormal activations / weights as 0 and flushes denormal sums to 0: a result
    moves by at most ~2^-126 * in * max|w| for that (tests/test_kernels.py)."""
    return matmul(round_bf16(x), w)
