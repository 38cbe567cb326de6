"""The position-table resize: torch bicubic (A=-0.75, align_corners=False, no antialias) in NumPy (spec §6.2)."""
import math

import numpy as np
import pytest

from pykimi.vision import bicubic_matrix, bicubic_resize

A = -0.75


def _near(x):  # |x| <= 1
    return ((A + 2) * x - (A + 3)) * x * x + 1


def _far(x):   # 1 < |x| < 2
    return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A


def _resize_1d_scalar(v, out):
    """A literal, scalar transcription of the rule: the oracle for the vectorized version. The source
    coordinate is computed in float32 as torch does (scale = in/out rounded to float32 moves src by up to
    ~in*6e-8, visible at 64 -> 33); the weights and the sum in float64."""
    n = len(v)
    scale = np.float32(n) / np.float32(out)
    res = []
    for o in range(out):
        src = float(scale * np.float32(o + 0.5) - np.float32(0.5))
        f = math.floor(src)
        t = src - f
        w = [_far(t + 1), _near(t), _near(1 - t), _far(2 - t)]
        res.append(sum(wk * v[min(max(f - 1 + k, 0), n - 1)] for k, wk in enumerate(w)))
    return np.array(res)


def test_identity_at_equal_size_is_exact():
    assert np.array_equal(bicubic_matrix(8, 8), np.eye(8, dtype=np.float32))
    table = np.random.default_rng(0).standard_normal((5, 7, 3)).astype(np.float32)
    assert np.array_equal(bicubic_resize(table, 5, 7), table.reshape(35, 3))


def test_hand_computed_downsample_4_to_2():
    # src = 2*(o+0.5)-0.5 = 0.5, 2.5; t = 0.5 -> weights (-0.09375, 0.59375, 0.59375, -0.09375);
    # taps -1,0,1,2 clamp to 0,0,1,2 (row 0) and 1,2,3,4 clamp to 1,2,3,3 (row 1)
    want = np.array([[0.5, 0.59375, -0.09375, 0.0],
                     [0.0, -0.09375, 0.59375, 0.5]], dtype=np.float32)
    assert np.array_equal(bicubic_matrix(4, 2), want)


def test_hand_computed_upsample_2_to_4():
    # o=0: src = 0.5*0.5-0.5 = -0.25 -> floor -1, t = 0.75; weights far(1.75)=-0.03515625, near(0.75)=0.26171875,
    # near(0.25)=0.87890625, far(1.25)=-0.10546875 on taps -2,-1,0,1 -> clamped 0,0,0,1
    m = bicubic_matrix(2, 4)
    assert m[0, 0] == np.float32(-0.03515625 + 0.26171875 + 0.87890625) == np.float32(1.10546875)
    assert m[0, 1] == np.float32(-0.10546875)
    # symmetric: the last row is the first one mirrored
    assert np.array_equal(m[3], m[0][::-1])
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)   # a partition of unity


@pytest.mark.parametrize("n_in,n_out", [(8, 10), (8, 6), (8, 14), (8, 18), (7, 13), (13, 5), (1, 3), (3, 1),
                                        (64, 33), (64, 100)])
def test_matches_scalar_transcription(n_in, n_out):
    v = np.random.default_rng(n_in * 100 + n_out).standard_normal(n_in)
    got = bicubic_matrix(n_in, n_out).astype(np.float64) @ v
    np.testing.assert_allclose(got, _resize_1d_scalar(v, n_out), rtol=0, atol=2e-6 * np.abs(v).max())


def test_constant_table_stays_constant_and_bounded_overshoot():
    # the weights sum to 1 (clamped taps accumulate), so a constant is kept; with A = -0.75 a step overshoots
    m = bicubic_matrix(16, 23).astype(np.float64)
    np.testing.assert_allclose(m @ np.full(16, 3.0), 3.0, rtol=1e-6)
    step = m @ (np.arange(16) >= 8).astype(np.float64)
    assert step.min() < 0 and step.max() > 1          # negative lobes: not a convex (bilinear-like) rule


def test_2d_is_rows_then_columns():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((6, 9, 4)).astype(np.float32)
    got = bicubic_resize(table, 11, 5).reshape(11, 5, 4)
    mh, mw = bicubic_matrix(6, 11).astype(np.float64), bicubic_matrix(9, 5).astype(np.float64)
    want = np.einsum("oh,pw,hwc->opc", mh, mw, table.astype(np.float64))
    np.testing.assert_allclose(got, want, atol=1e-6)
    # a table that varies only along rows stays constant along columns (axes not swapped)
    rows_only = np.repeat(np.arange(6, dtype=np.float32)[:, None, None], 9, axis=1)
    r = bicubic_resize(rows_only, 11, 5).reshape(11, 5)
    assert np.allclose(r, r[:, :1])


SIZES = [((8, 8), (8, 10)), ((8, 8), (6, 4)), ((8, 8), (14, 18)), ((7, 5), (11, 13)), ((13, 9), (5, 4)),
         ((64, 64), (33, 17)), ((64, 64), (128, 70)), ((5, 3), (3, 7)), ((1, 4), (3, 2)), ((9, 11), (9, 11))]


@pytest.mark.reference
@pytest.mark.parametrize("src,dst", SIZES)
def test_against_torch(src, dst):
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch cross-check is skipped")
    F = torch.nn.functional
    rng = np.random.default_rng(sum(src) * 31 + sum(dst))
    table = rng.standard_normal(src + (5,)).astype(np.float32)     # [H0, W0, C]
    ref = F.interpolate(torch.from_numpy(table).permute(2, 0, 1)[None], size=dst, mode="bicubic",
                        align_corners=False)                       # [1, C, oh, ow]
    ref = ref[0].permute(1, 2, 0).reshape(-1, 5).numpy()
    got = bicubic_resize(table, *dst)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    # torch rounds src, the weights and the 16-term sum in float32 (with FMAs); we sum in float64: a few ulps
    assert err <= 3e-6, f"bicubic {src}->{dst}: err {err:.3g}"


@pytest.mark.reference
@pytest.mark.parametrize("n_in,n_out", [(8, 10), (8, 6), (7, 13), (13, 5), (64, 17), (3, 3), (1, 5)])
def test_matrix_against_torch(n_in, n_out):
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch cross-check is skipped")
    # interpolating one-hot rows (channels = inputs, height 1) reads torch's weight matrix out directly
    eye = torch.eye(n_in, dtype=torch.float32).reshape(1, n_in, 1, n_in)
    m = torch.nn.functional.interpolate(eye, size=(1, n_out), mode="bicubic", align_corners=False)
    m = m[0, :, 0, :].T.numpy()                                     # [out, in]
    np.testing.assert_allclose(bicubic_matrix(n_in, n_out), m, rtol=0, atol=2e-6)   # float32 ulps of ~1
