"""RoPE tables and rotation (spec §6.4, §8.3), checked against direct complex-number arithmetic."""
import numpy as np

from pykimi.rope import apply_rope, lm_inv_freq, lm_rope_angles, vision_rope_angles, vision_rope_freqs


def test_vision_angles_layout():
    gh, gw, D = 3, 5, 24
    ang = vision_rope_angles(gh, gw, D)
    f = 10000.0 ** (-np.arange(0, D, 4) / D)
    assert ang.shape == (gh * gw, D // 2)
    for t in range(gh * gw):
        r, c = divmod(t, gw)
        np.testing.assert_allclose(ang[t, 0::2], c * f, rtol=1e-6)   # pair 2i: column (x)
        np.testing.assert_allclose(ang[t, 1::2], r * f, rtol=1e-6)   # pair 2i+1: row (y)
    np.testing.assert_allclose(vision_rope_freqs(72)[:2], [1.0, 10000 ** (-4 / 72)], rtol=1e-6)


def test_apply_rope_is_complex_multiplication():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3, 16)).astype(np.float32)
    ang = rng.uniform(-5, 5, (7, 1, 8)).astype(np.float32)
    got = apply_rope(x, ang)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang.astype(np.float64))
    np.testing.assert_allclose(got[..., 0::2], z.real, atol=1e-5)
    np.testing.assert_allclose(got[..., 1::2], z.imag, atol=1e-5)


def test_lm_inv_freq_from_theta_not_bf16():
    inv = lm_inv_freq(64, 800000.0)
    np.testing.assert_allclose(inv, 800000.0 ** (-np.arange(0, 64, 2) / 64), rtol=1e-6)
    assert inv.dtype == np.float32
    ang = lm_rope_angles([0, 1, 5], inv)
    np.testing.assert_allclose(ang[2], 5 * inv, rtol=1e-6)


def test_relative_position_property():
    """q(m)·k(n) depends only on m - n: the reason the cache can store rotated keys."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal(8).astype(np.float32)
    k = rng.standard_normal(8).astype(np.float32)
    inv = lm_inv_freq(8, 800000.0)

    def score(m, n):
        return float(apply_rope(q[None], lm_rope_angles([m], inv))[0] @ apply_rope(k[None], lm_rope_angles([n], inv))[0])

    assert abs(score(10, 3) - score(107, 100)) < 1e-4
