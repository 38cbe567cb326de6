"""The shared primitives, each defined exactly once, in NumPy float32 (DESIGN.md §Style 6).

    rms_norm(x, w, eps)        [..., D] -> [..., D]   the LM's norms: layer, final, kv_a / q_a (spec §8.2)
    add_rms_norm(x, a, w, eps) -> (x + a, rms_norm(x + a))   a residual add and the next pre-norm
    layer_norm(x, w, b, eps)   [..., C] -> [..., C]   MoonViT and the projector (spec §6.3, §7)
    softmax(x, axis)           max subtracted first, fp32 (spec §8.3)
    exp_rows(s)                in place s = exp(s - rowmax), returns the row sums: an unnormalised softmax (§6.3)
    sigmoid(x), silu(x)        the router's scores and SwiGLU's gate (spec §8.4)
    silu_mul(g, u)             SwiGLU's silu(g) * u (spec §8.4)
    gelu_tanh(x)               the vision MLP's GELU (spec §6.3)
    gelu_erf(x), erf, erfc     the projector's exact GELU (spec §7)
    apply_rope(x, angles)      interleaved-pair rotation, LM and vision (spec §6.4, §8.3)

Stage files (attention.py, moe.py, model.py, vision.py) call these; the fast twins in pykimi.kernels are
held to them by the tests (tests/test_kernels.py).
"""
from __future__ import annotations

import math

import numpy as np


# ---------------------------------------------------------------------------------------------------------
# norms
# ---------------------------------------------------------------------------------------------------------
def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``x · rsqrt(mean(x²) + eps) · w`` over the last axis, float32   # [..., D] -> [..., D].

    The one RMSNorm rounding (spec §8.2; HF DeepseekV3RMSNorm: ``x * torch.rsqrt(var + eps)``, then the
    weight): the mean of squares in fp32, ONE reciprocal ``1 / sqrt(var + eps)`` per row, x times that
    reciprocal, then times the weight -- not ``x / sqrt(...)``, which rounds differently. The Numba and C
    twins round the same way (their sum of squares is accumulated in f64, a different summation order).
    eps: 1e-5 for the layer / final norms, 1e-6 for kv_a_layernorm (and q_a_layernorm)."""
    x = np.asarray(x, dtype=np.float32)
    var = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)   # [..., 1]
    y = x * (np.float32(1.0) / np.sqrt(var + np.float32(eps)))
    return y * np.asarray(w, dtype=np.float32)


def add_rms_norm(x: np.ndarray, a: np.ndarray, w: np.ndarray, eps: float):
    """``(x + a, rms_norm(x + a, w, eps))``: a residual add and the next pre-norm (spec §8.2)."""
    xo = np.asarray(x, dtype=np.float32) + np.asarray(a, dtype=np.float32)
    return xo, rms_norm(xo, w, eps)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """torch LayerNorm over the last axis (biased variance), float32   # same shape as x (spec §6.3)."""
    x = np.asarray(x, dtype=np.float32)
    mu = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    d = x - mu
    var = np.mean(np.square(d), axis=-1, keepdims=True, dtype=np.float32)
    d *= 1.0 / np.sqrt(var + np.float32(eps))
    d *= w
    d += b
    return d


# ---------------------------------------------------------------------------------------------------------
# softmax and activations
# ---------------------------------------------------------------------------------------------------------
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in fp32 (max subtracted first; a row of all -inf is not expected: a causal
    row sees at least one key)."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def exp_rows(s: np.ndarray) -> np.ndarray:
    """In place ``s = exp(s - max(s))`` per row, returns the row sums   # s f32[b, n] -> f32[b, 1].

    softmax without its division: the vision attention divides P·V ([b, D], D << n) by the sums instead of the
    [b, n] probabilities (spec §6.3). In place because s is a worker's score tile, reused tile after tile."""
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    return s.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in fp32 (exp overflow for very negative x gives the correct limit 0)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def silu(x: np.ndarray) -> np.ndarray:
    """``x · sigmoid(x)`` in fp32, as ``x / (1 + exp(-x))`` (the C kernels' form; -0 for very negative x)."""
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """SwiGLU's ``silu(g) ⊙ u`` in fp32   # g, u [..., I] -> [..., I] (spec §8.4)."""
    return silu(g) * u


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (torch approximate='tanh', HF gelu_pytorch_tanh) -- the vision MLP's (§6.3)."""
    x = np.asarray(x, dtype=np.float32)
    c = np.float32(math.sqrt(2.0 / math.pi))
    inner = x * x
    inner *= np.float32(0.044715)
    inner += 1.0
    inner *= x
    inner *= c
    np.tanh(inner, out=inner)
    inner += 1.0
    inner *= x
    inner *= np.float32(0.5)
    return inner


# erfc(z), z >= 0, as t*exp(-z^2 + P(t)) with t = 1/(1 + z/2): P is smooth on t in (0, 1], so a degree-16
# polynomial fitted (at first use, against math.erfc at Chebyshev nodes) is good to ~5e-12 relative.
_ERFC_ZMAX = 26.5                       # erfc(26.5) ~ 1e-307; beyond it P is evaluated at the clipped t
_ERFC_T0 = 1.0 / (1.0 + 0.5 * _ERFC_ZMAX)
_ERFC_POLY: np.ndarray | None = None    # power-basis coefficients in u = affine(t) in [-1, 1]


def _erfc_poly() -> np.ndarray:
    global _ERFC_POLY
    if _ERFC_POLY is None:
        from numpy.polynomial import chebyshev as cheb
        n = 400
        u = np.cos(np.pi * (np.arange(n) + 0.5) / n)            # Chebyshev nodes in [-1, 1]
        t = _ERFC_T0 + (1.0 - _ERFC_T0) * (u + 1.0) / 2.0
        z = 2.0 * (1.0 / t - 1.0)
        g = np.array([math.log(math.erfc(zz) / tt) + zz * zz for zz, tt in zip(z, t)])
        _ERFC_POLY = cheb.cheb2poly(cheb.chebfit(u, g, 16))
    return _ERFC_POLY


def _erfc_nonneg(z: np.ndarray) -> np.ndarray:
    """erfc(z) for z >= 0, float64, relative error < 1e-11."""
    coef = _erfc_poly()
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    zf, of = z.reshape(-1), out.reshape(-1)
    a, c = 2.0 / (1.0 - _ERFC_T0), (1.0 + _ERFC_T0) / (1.0 - _ERFC_T0)
    for s in range(0, zf.size, 1 << 16):            # chunks stay in cache
        zz = zf[s:s + (1 << 16)]
        t = 1.0 / (1.0 + 0.5 * zz)
        u = np.maximum(t, _ERFC_T0) * a - c
        acc = np.full_like(u, coef[-1])
        for k in coef[-2::-1]:                      # Horner
            acc *= u
            acc += k
        acc -= zz * zz
        np.exp(acc, out=acc)
        acc *= t
        of[s:s + zz.size] = acc
    return out


def erfc(x: np.ndarray) -> np.ndarray:
    """Complementary error function, float64 (numpy has none; scipy is not a dependency)."""
    x = np.asarray(x, dtype=np.float64)
    r = _erfc_nonneg(np.abs(x))
    return np.where(x < 0, 2.0 - r, r)


def erf(x: np.ndarray) -> np.ndarray:
    """Error function, float64, absolute error < 1e-11 (relative too, except near 0 where it is ~1e-16/|x|)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * (1.0 - _erfc_nonneg(np.abs(x)))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact GELU x*Phi(x) = x/2 * erfc(-x/sqrt 2) (torch GELU(approximate='none')) -- the projector's (§7).

    Computed through erfc in float64 so negative inputs keep full relative precision; returns float32."""
    x = np.asarray(x, dtype=np.float32)
    z = x.astype(np.float64) * (-1.0 / math.sqrt(2.0))       # erfc(z) with z = -x/sqrt2
    r = _erfc_nonneg(np.abs(z))
    r = np.where(z < 0, 2.0 - r, r)
    r *= 0.5
    r *= x
    return r.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------
def apply_rope(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs (x[..., 2j], x[..., 2j+1]) by angles[..., j]; returns a new float32 array.

    x: [..., D]; angles must broadcast against x[..., ::2] (e.g. [S, 1, D/2] for x [S, H, D]). Pair j is the
    complex number x[2j] + i·x[2j+1] times exp(i·angle[j]) (spec §6.4, §8.3: interleaved, not rotate-half)."""
    cos = np.cos(angles).astype(np.float32)
    sin = np.sin(angles).astype(np.float32)
    xr = x[..., 0::2]
    xi = x[..., 1::2]
    out = np.empty(np.broadcast_shapes(x.shape), dtype=np.float32)
    out[..., 0::2] = xr * cos - xi * sin
    out[..., 1::2] = xr * sin + xi * cos
    return out
