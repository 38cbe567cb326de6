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
