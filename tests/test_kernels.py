"""Every available kernel backend against its NumPy definition on random shapes, including odd sizes, n in
{1, 2, 3, 7, 16, 33} and `in` not a multiple of 32: matmul against kernels/ref.py, the fast twins
(kernels.fast) against their stage definitions (ops.rms_norm, attention.mla_absorbed, moe.swiglu_sum,
moe.select_experts). No timing here."""
import warnings

import numpy as np
import pytest

import pykimi.kernels as K
from pykimi.kernels import linear, probe
from pykimi import attention, moe, ops
from pykimi.kernels import ref
from pykimi.quant import Q4Weight, Q8Weight, quantize_q4, quantize_q8
from pykimi import weights
from pykimi.weights import Stored, f32_to_bf16

AVAILABLE = [b for b in K.BACKENDS if K.backends()[b]["available"]]

SWIGLU = K.fast(moe.swiglu_sum)
MLA = K.fast(attention.mla_absorbed)


def swiglu_twin(x, experts, coefs):
    """The definition with every product through K.reference: the exact twin of the fast path's numerics."""
    return moe.swiglu_sum(x, experts, coefs, matmul=K.reference)


def mla_twin(*args):
    return attention.mla_absorbed(*args, matmul=K.reference)


NS = (1, 2, 3, 7, 16, 33)
SHAPES = [(1, 1), (5, 31), (37, 101), (64, 64), (50, 97), (33, 2048), (129, 160), (8, 33)]


@pytest.fixture
def use_backend(request):
    prev = K.backend()
    K.set_backend(request.param)
    yield request.param
    K.set_backend(prev)


def _forms(w, rng):
    bits = f32_to_bf16(w)
    return {
        "ndarray": w,
        "BF16": Stored("t.bf16", "BF16", bits),
        "F32": Stored("t.f32", "F32", w),
        "F16": Stored("t.f16", "F16", w.astype(np.float16)),
        "q8": quantize_q8(w, "t.q8"),
        "q4": quantize_q4(w, "t.q4"),
    }


def _relerr(y, r):
    return float(np.max(np.abs(y - r)) / max(np.max(np.abs(r)), 1e-30))


@pytest.mark.parametrize("use_backend", AVAILABLE, indirect=True)
@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_matmul_matches_ref(use_backend, out_f, in_f):
    rng = np.random.default_rng(out_f * 1000 + in_f)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    for form, W in _forms(w, rng).items():
        for n in NS:
            x = rng.standard_normal((n, in_f)).astype(np.float32)
            y, r = K.matmul(x, W), K.reference(x, W)
            assert y.dtype == np.float32 and y.shape == (n, out_f)
            err = _relerr(y, r)
            assert err < 2e-5, f"backend={use_backend} form={form} shape={(out_f, in_f)} n={n}: rel err {err:.2e}"
            # whatever the path, within the activation-quantization bound of the float product
            scale = np.abs(x).sum(1).max() * np.abs(weights.f32_of(W)).max()
            assert np.max(np.abs(y - ref.matmul(x, W))) / scale < (4e-3 if form == "q4" else 2e-5)


@pytest.mark.parametrize("use_backend", AVAILABLE, indirect=True)
def test_matmul_vector_and_leading_dims(use_backend):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 70)).astype(np.float32)
    W = Stored("v", "BF16", f32_to_bf16(w))
    x = rng.standard_normal(70).astype(np.float32)
    y = K.matmul(x, W)
    assert y.shape == (40,)
    np.testing.assert_allclose(y, ref.matmul(x, W), rtol=1e-5, atol=1e-5)
    x3 = rng.standard_normal((2, 3, 70)).astype(np.float32)
    assert K.matmul(x3, W).shape == (2, 3, 40)
    with pytest.raises(ValueError, match="features"):
        K.matmul(np.zeros((2, 71), np.float32), W)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "portable"])
def test_c_kernels_direct(scalar):
    """The C kernels on every n (also past SMALL_N) and both code paths (AVX2 and the portable loop)."""
    from pykimi.kernels import c
    c.force_scalar(scalar)
    try:
        rng = np.random.default_rng(7)
        for out_f, in_f in [(37, 101), (3, 33), (16, 64), (9, 1)]:
            w = rng.standard_normal((out_f, in_f)).astype(np.float32) * 3
            bits = f32_to_bf16(w)
            q8, q4 = quantize_q8(w), quantize_q4(w)
            for n in NS:
                x = rng.standard_normal((n, in_f)).astype(np.float32)
                scale = np.abs(x).sum(1).max() * np.abs(w).max()  # bound on |y|: scale-relative error
                checks = {
                    "f32": (c.matmul_f32(x, w), x @ w.T),
                    "bf16": (c.matmul_bf16(x, bits), x @ ref.bf16_to_f32(bits).T),
                    "q8": (c.matmul_q8(x, q8.q, q8.scales), x @ q8.f32().T),
                    "q4": (c.matmul_q4(x, q4.q, q4.scales), x @ q4.f32().T),
                }
                for name, (y, r) in checks.items():
                    err = np.max(np.abs(y - r)) / scale
                    assert err < 1e-5, f"{name} scalar={scalar} {(out_f, in_f)} n={n}: {err:.2e}"
    finally:
        c.force_scalar(False)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "portable"])
def test_c_act_quant_kernels(scalar):
    """int8-activation Q8/Q4 kernels vs their twins (ref.quantize_act + integer block dots)."""
    from pykimi.kernels import c
    c.force_scalar(scalar)
    try:
        rng = np.random.default_rng(8)
        for out_f, in_f in [(37, 101), (3, 33), (16, 64), (9, 1), (5, 2048), (4, 95)]:
            w = rng.standard_normal((out_f, in_f)).astype(np.float32)
            q8, q4 = quantize_q8(w), quantize_q4(w)
            for n in NS:
                x = rng.standard_normal((n, in_f)).astype(np.float32) * 5
                xq, xd = c.quant_act(x)
                rq, rd = ref.quantize_act(x)
                np.testing.assert_array_equal(xq, rq)
                np.testing.assert_array_equal(xd, rd)
                scale = np.abs(x).sum(1).max() * np.abs(w).max()
                xq16, xd16 = c.quant_act16(x)
                rq16, rd16 = ref.quantize_act(x, 16)
                np.testing.assert_array_equal(xq16, rq16)
                np.testing.assert_array_equal(xd16, rd16)
                for y, r in ((c.matmul_q8a(x, q8.q, q8.scales), ref.matmul_act_q8(x, q8)),
                             (c.matmul_q8w(x, q8.q, q8.scales), ref.matmul_act16_q8(x, q8)),
                             (c.matmul_q4a(x, q4.q, q4.scales), ref.matmul_act_q4(x, q4))):
                    assert np.max(np.abs(y - r)) / scale < 1e-6, (out_f, in_f, n)
                # int16 activations: numerically the float product of the dequantized weight
                y16 = c.matmul_q8w(x, q8.q, q8.scales)
                assert np.max(np.abs(y16 - x @ q8.f32().T)) / scale < 2e-5
        prev = K.act_quant()
        try:
            x = rng.standard_normal((2, 101)).astype(np.float32)
            w = rng.standard_normal((7, 101)).astype(np.float32)
            twins = {("q8_32", "i16"): ref.matmul_act16_q8, ("q8_32", "i8"): ref.matmul_act_q8,
                     ("q4_32", "i8"): ref.matmul_act_q4}
            for setting, modes in (("none", {"q8_32": "f32", "q4_32": "f32"}),
                                   ("q4", {"q8_32": "i16", "q4_32": "i8"}),
                                   ("all", {"q8_32": "i8", "q4_32": "i8"})):
                K.set_act_quant(setting)
                assert K.act_quant() == setting
                for W in (quantize_q8(w), quantize_q4(w)):
                    np.testing.assert_allclose(K.matmul(x, W), K.reference(x, W), rtol=1e-5, atol=1e-5)
                    twin = twins.get((W.kind, modes[W.kind]), ref.matmul) if K.backend() == "c" else ref.matmul
                    np.testing.assert_allclose(K.reference(x, W), twin(x, W))
            with pytest.raises(ValueError):
                K.set_act_quant("sometimes")
        finally:
            K.set_act_quant(prev)
    finally:
        c.force_scalar(False)


# --------------------------------------------------------------------- every C SIMD level (scalar/avx2/avx512)

def _c_levels():
    if "c" not in AVAILABLE:
        return []
    from pykimi.kernels import c
    return c.simd_levels()


C_LEVELS = _c_levels()
# widths that hit every branch of the vector loops: 4-block groups (128), pairs of blocks (64), one full
# block, a short last block, and widths below one block
LEVEL_SHAPES = [(37, 101), (3, 33), (16, 64), (9, 1), (5, 2048), (4, 95), (7, 128), (6, 160), (11, 257),
                (13, 384), (3, 1408), (5, 129), (2, 31), (17, 224), (4, 2816)]


@pytest.fixture
def simd_level(request):
    from pykimi.kernels import c
    c.set_simd(request.param)
    assert c.get_simd() == request.param
    yield request.param
    c.set_simd(None)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_level_matches_twins(simd_level):
    """Every kernel at every SIMD level this CPU has against its NumPy twin, odd sizes included."""
    from pykimi.kernels import c
    rng = np.random.default_rng(31)
    for out_f, in_f in LEVEL_SHAPES:
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        bits = f32_to_bf16(w)
        q8, q4 = quantize_q8(w), quantize_q4(w)
        for n in (1, 2, 3, 4, 5, 7, 9):
            x = rng.standard_normal((n, in_f)).astype(np.float32) * 5
            scale = np.abs(x).sum(1).max() * np.abs(w).max()
            xq, xd = c.quant_act(x)
            rq, rd = ref.quantize_act(x)
            np.testing.assert_array_equal(xq, rq)
            np.testing.assert_array_equal(xd, rd)
            xq16, xd16 = c.quant_act16(x)
            rq16, rd16 = ref.quantize_act(x, 16)
            np.testing.assert_array_equal(xq16, rq16)
            np.testing.assert_array_equal(xd16, rd16)
            float_paths = {"f32": (c.matmul_f32(x, w), x @ w.T),
                           "bf16": (c.matmul_bf16(x, bits), x @ ref.bf16_to_f32(bits).T),
                           "q8": (c.matmul_q8(x, q8.q, q8.scales), x @ q8.f32().T),
                           "q4": (c.matmul_q4(x, q4.q, q4.scales), x @ q4.f32().T)}
            for name, (y, r) in float_paths.items():
                err = np.max(np.abs(y - r)) / scale
                assert err < 1e-5, f"{name} level={simd_level} {(out_f, in_f)} n={n}: {err:.2e}"
            int_paths = {"q8a": (c.matmul_q8a(x, q8.q, q8.scales), ref.matmul_act_q8(x, q8)),
                         "q8w": (c.matmul_q8w(x, q8.q, q8.scales), ref.matmul_act16_q8(x, q8)),
                         "q4a": (c.matmul_q4a(x, q4.q, q4.scales), ref.matmul_act_q4(x, q4))}
            for name, (y, r) in int_paths.items():
                err = np.max(np.abs(y - r)) / scale
                assert err < 1e-6, f"{name} level={simd_level} {(out_f, in_f)} n={n}: {err:.2e}"


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_jobs_on_one_x_share_its_quantization(simd_level):
    """Jobs of one pk_matmul_many call on the same x array (a decode step's gate and up of every expert on one h)
    quantize x once (csrc job_borrow): each result == its own single call bit for bit and near its NumPy twin,
    with jobs in other formats / modes, and a view of fewer rows at the same address, on that x in between --
    those must not borrow (another mode's codes, or the wrong rows, are far off)."""
    from pykimi.kernels import c
    rng = np.random.default_rng(77)
    # first a view of x's first row (same address, fewer rows), then x itself in every format and mode, the
    # int8-activation Q8 job before the Q4 ones (whose packed codes it does not make)
    kinds = [("q4_32", "i8"), ("q8_32", "i8"), ("q4_32", "i8"), ("q4_32", "i8"), ("q8_32", "i16"), ("bf16", "f32"),
             ("q8_32", "i16"), ("q8_32", "i8")]
    jobs, twins = [], []
    for n, in_f in ((1, 2048), (3, 1408), (2, 101), (4, 2048), (40, 2048)):
        x = (rng.standard_normal((n, in_f)) * 3).astype(np.float32)
        for k, (kind, act) in enumerate(kinds):
            xk = x[:1] if k == 0 else x
            w = rng.standard_normal((24 + 8 * k, in_f)).astype(np.float32)
            if kind == "bf16":
                W = Stored("w", "BF16", f32_to_bf16(w))
                jobs.append((xk, kind, W.data, None, act))
                twins.append((ref.matmul(xk, W), 1e-5, np.abs(xk).sum(1).max() * np.abs(w).max()))
                continue
            W = quantize_q8(w) if kind == "q8_32" else quantize_q4(w)
            jobs.append((xk, kind, W.q, W.scales, act))
            twin = {"i16": ref.matmul_act16_q8, "i8": ref.matmul_act_q8 if kind == "q8_32" else ref.matmul_act_q4}
            twins.append((twin[act](xk, W), 1e-6, np.abs(xk).sum(1).max() * np.abs(w).max()))
    ys = c.matmul_many(jobs)
    for k, (job, (twin, tol, scale), y) in enumerate(zip(jobs, twins, ys)):
        where = f"job {k} ({job[1]}/{job[4]}, n={job[0].shape[0]}, in={job[0].shape[1]}) level={simd_level}"
        np.testing.assert_array_equal(y, c.matmul_many([job])[0], err_msg=where)
        err = float(np.max(np.abs(y - twin)) / scale)
        assert err < tol, f"{where}: {err:.2e} of the bound"


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_level_integer_dots_exact(simd_level):
    """The integer block dots are exact at every level: with activation scales of exactly 1 (each block's
    max |x| is the format's qmax), weight scales of 1 and sums below 2^24, every float step is exact too,
    so y must equal the int64 product bit for bit -- the same on scalar, AVX2 and AVX-512."""
    from pykimi.kernels import c
    rng = np.random.default_rng(32)
    for out_f, in_f in LEVEL_SHAPES:
        nb = -(-in_f // 32)
        ones = np.ones((out_f, nb), np.float32)
        for n in (1, 2, 5):
            for qmax, lim, fns in ((127, 127, ("q8a", "q4a")), (32767, 100, ("q8w",))):
                x = rng.integers(-lim, lim + 1, (n, in_f)).astype(np.float32)
                x[:, ::32] = qmax * rng.choice([-1, 1], (n, nb))  # max |x| = qmax in every block: scale 1
                q8 = rng.integers(-7, 8, (out_f, in_f), dtype=np.int8)
                q4 = rng.integers(0, 256, (out_f, -(-in_f // 2)), dtype=np.uint8)
                exact8 = x.astype(np.int64) @ q8.astype(np.int64).T
                exact4 = x.astype(np.int64) @ ref.unpack_q4(q4, in_f).astype(np.int64).T
                for fn in fns:
                    y = {"q8a": lambda: c.matmul_q8a(x, q8, ones), "q8w": lambda: c.matmul_q8w(x, q8, ones),
                         "q4a": lambda: c.matmul_q4a(x, q4, ones)}[fn]()
                    want = exact4 if fn == "q4a" else exact8
                    assert np.abs(want).max() < 2 ** 24
                    np.testing.assert_array_equal(y, want.astype(np.float32),
                                                  err_msg=f"{fn} level={simd_level} {(out_f, in_f)} n={n}")


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_level_matmul_many(simd_level):
    """pk_matmul_many at every level: mixed formats and activation modes in one call == one call each ==
    the twins."""
    from pykimi.kernels import c
    rng = np.random.default_rng(33)
    jobs, twins = [], []
    for k, (out_f, in_f, n) in enumerate([(37, 101, 1), (64, 128, 3), (9, 33, 7), (70, 96, 2), (5, 31, 4),
                                          (128, 64, 1), (3, 2048, 16), (50, 97, 1), (20, 1408, 1),
                                          (24, 512, 2), (6, 384, 5), (8, 160, 1)]):
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        x = rng.standard_normal((n, in_f)).astype(np.float32)
        q8, q4 = quantize_q8(w), quantize_q4(w)
        forms = [(x, "bf16", f32_to_bf16(w), None, "f32", lambda x=x, w=w: x @ ref.bf16_to_f32(f32_to_bf16(w)).T),
                 (x, "q8_32", q8.q, q8.scales, "i16", lambda x=x, q=q8: ref.matmul_act16_q8(x, q)),
                 (x, "q4_32", q4.q, q4.scales, "i8", lambda x=x, q=q4: ref.matmul_act_q4(x, q)),
                 (x, "q8_32", q8.q, q8.scales, "i8", lambda x=x, q=q8: ref.matmul_act_q8(x, q)),
                 (x, "f32", w, None, "f32", lambda x=x, w=w: x @ w.T),
                 (x, "q4_32", q4.q, q4.scales, "f32", lambda x=x, q=q4: x @ q.f32().T),
                 (x, "q8_32", q8.q, q8.scales, "f32", lambda x=x, q=q8: x @ q.f32().T)]
        job = forms[k % len(forms)]
        jobs.append(job[:5])
        twins.append(job[5])
    ys = c.matmul_many(jobs)
    for k, (job, twin, y) in enumerate(zip(jobs, twins, ys)):
        single = c.matmul_many([job])[0]
        np.testing.assert_array_equal(y, single)  # same rows, same kernel: identical
        r = twin()
        err = np.max(np.abs(y - r)) / max(np.abs(r).max(), 1e-30)
        assert err < 2e-5, f"job {k} {job[1]}/{job[4]} level={simd_level}: {err:.2e}"


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_level_bf16_batches(simd_level):
    """bf16 weights x 1..300 rows of x: from 12 rows the AVX-512 level vectorises over the rows of x
    (bf16_tn_avx512: x packed per group of 64 rows by 16 x 16 transposes, weights decoded 256 columns at a
    time, 16 / 8 / 4 / 6 weight rows per block, results through a buffer of 4 blocks), and so does the AVX2 level
    from 12 rows (bf16_tn_avx2: 8 x 8 transposes into the same layout, 6 weight rows per step, passes of 2 / 1
    vectors of 8 rows); odd `in` (partial 8-, 16- and 256-column blocks), `out` not a multiple of the block, row
    counts not a multiple of 8, 16 or 64 (several groups, a partial last one), several threads' row ranges, alone
    and inside one matmul_many call."""
    from pykimi.kernels import c
    rng = np.random.default_rng(81)
    for out_f, in_f in ((13, 37), (37, 300), (70, 2048), (9, 1408), (1, 16)):
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        bits = f32_to_bf16(w)
        wf = ref.bf16_to_f32(bits)
        for n in (1, 7, 11, 12, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 76, 112, 128, 129, 200, 300):
            x = rng.standard_normal((n, in_f)).astype(np.float32)
            y, r = c.matmul_bf16(x, bits), x @ wf.T
            err = np.max(np.abs(y - r)) / (np.abs(x).sum(1).max() * np.abs(wf).max())
            assert err < 2e-6, f"{out_f}x{in_f} n={n} level={simd_level}: {err:.2e}"
            q8 = quantize_q8(w)
            ys = c.matmul_many([(x, "bf16", bits, None, "f32"), (x[:3], "q8_32", q8.q, q8.scales, "f32")])
            np.testing.assert_array_equal(ys[0], y)
            np.testing.assert_allclose(ys[1], x[:3] @ q8.f32().T, rtol=1e-4, atol=1e-4 * np.abs(ys[1]).max())
            # Q8 with f32 activations (from 24 rows batch-vectorised at the AVX-512 level): the exact product
            y8, r8 = c.matmul_q8(x, q8.q, q8.scales), x @ q8.f32().T
            err8 = np.max(np.abs(y8 - r8)) / (np.abs(x).sum(1).max() * np.abs(q8.f32()).max())
            assert err8 < 2e-6, f"q8 {out_f}x{in_f} n={n} level={simd_level}: {err8:.2e}"


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
def test_bf16_batch_kernels_same_bits_at_avx2_and_avx512():
    """The AVX2 exact bf16 batch kernel (bf16_tn_avx2) sums each (row of x, weight row) in k order in one f32 chain,
    as bf16_tn_avx512 does, so both levels give the same bits for the same inputs: from 12 rows of x (both
    kernels' minimum), `in` below, at and past a 256-column chunk and not a multiple of 8 / 16, `out` not a multiple
    of either kernel's block of weight rows, row counts not a multiple of 8 / 16 / 64 (passes of one vector, partial
    groups), 1 and 2 threads (other row ranges per thread), and through kernels.matmul where the plan keeps the rows in
    C at both levels (up to linear.C_TN_ROWS_AVX2 at the AVX2 level; past it the widened tiles)."""
    from pykimi.kernels import c
    if "avx512" not in c.simd_levels():
        pytest.skip("needs an AVX-512 (VNNI) CPU")
    prev, prev_th, prev_amx = K.backend(), K.get_threads(), c.get_amx()
    c.set_amx(False)   # AMX's tile product is another summation order
    K.set_backend("c")
    rng = np.random.default_rng(83)
    try:
        for out_f, in_f in ((13, 37), (37, 300), (70, 2048), (9, 513), (50, 256), (7, 1)):
            w = rng.standard_normal((out_f, in_f)).astype(np.float32)
            bits = f32_to_bf16(w)
            sw = Stored("t.bf16", "BF16", bits)
            for n in (12, 13, 17, 23, 24, 31, 40, 64, 65, 100, 129, 192, 200):
                x = rng.standard_normal((n, in_f)).astype(np.float32)
                for th in (1, 2):
                    K.set_threads(th)
                    got = {}
                    for lv in ("avx512", "avx2"):
                        c.set_simd(lv)
                        got[lv] = (c.matmul_bf16(x, bits), K.matmul(x, sw))
                    assert K.plan("bf16", n)[0] == ("c" if n <= linear.C_TN_ROWS_AVX2 else "tiles"), n
                    for k in range(2 if n <= linear.C_TN_ROWS_AVX2 else 1):
                        a, b = got["avx512"][k], got["avx2"][k]
                        bad = np.argwhere(a != b)
                        assert bad.size == 0, (f"{out_f}x{in_f} n={n} threads={th} {('c', 'matmul')[k]}: "
                                               f"{len(bad)} differ, first {tuple(bad[0])}: avx512 "
                                               f"{a[tuple(bad[0])]!r} avx2 {b[tuple(bad[0])]!r}")
    finally:
        c.set_simd(None)
        c.set_amx(prev_amx)
        K.set_threads(prev_th)
        K.set_backend(prev)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
def test_q8_batches_take_the_exact_path_at_avx512():
    """With the int16 batch kernel off (c.set_vnni16_batch(False), its old plan) matmul routes Q8 weights with
    C_BATCH_ROWS_Q8 rows of x to the exact batch-vectorised kernel at the AVX-512 level (int16 activations
    elsewhere), and reference() names the twin of the path taken. (On, every n keeps int16 activations:
    tests/test_vnni16.py.)"""
    from pykimi.kernels import c
    if "avx512" not in c.simd_levels():
        pytest.skip("needs an AVX-512 (VNNI) CPU")
    prev = K.backend()
    K.set_backend("c")
    c.set_vnni16_batch(False)
    try:
        rng = np.random.default_rng(82)
        w = rng.standard_normal((40, 300)).astype(np.float32)
        q8 = quantize_q8(w)
        lo, hi = linear.C_BATCH_ROWS_Q8
        for n in (lo - 1, lo, 65, hi):
            x = rng.standard_normal((n, 300)).astype(np.float32)
            y, r = K.matmul(x, q8), K.reference(x, q8)
            exact = lo <= n <= hi
            twin = ref.matmul(x, q8) if exact else ref.matmul_act16_q8(x, q8)
            np.testing.assert_array_equal(r, twin)
            scale = np.abs(x).sum(1).max() * np.abs(q8.f32()).max()
            assert np.max(np.abs(y - r)) / scale < 1e-6, n
            # the int16-activation product differs measurably, so the routing is what the test sees
            other = ref.matmul_act16_q8(x, q8) if exact else ref.matmul(x, q8)
            assert np.max(np.abs(y - other)) / scale > 1e-7, n
    finally:
        c.set_vnni16_batch(True)
        K.set_backend(prev)


def _swiglu_case(rng, d, inters, form):
    experts = []
    for inter in inters:
        ws = [(rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32) for s in ((inter, d), (inter, d), (d, inter))]
        experts.append(tuple(_forms(w, rng)[form] for w in ws))
    x = rng.standard_normal(d).astype(np.float32)
    coefs = rng.uniform(0.1, 2.0, len(inters)).astype(np.float32).tolist()
    return x, experts, coefs


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
@pytest.mark.parametrize("form", ["BF16", "F32", "q8", "q4"])
def test_c_level_swiglu_sum(simd_level, form):
    """pk_swiglu_sum (the decode step's whole MoE FFN in one call) at every level, every stored form, odd
    widths and unequal experts (shared experts are wider) == the twin (each product through reference())."""
    prev = K.backend()
    K.set_backend("c")
    try:
        rng = np.random.default_rng(71)
        for d, inters in ((64, [32]), (37, [33, 70, 5]), (160, [96, 96, 192, 31, 64, 64, 128])):
            x, experts, coefs = _swiglu_case(rng, d, inters, form)
            got = SWIGLU(x, experts, coefs)
            want = swiglu_twin(x, experts, coefs)
            err = np.max(np.abs(got - want)) / max(np.abs(want).max(), 1e-30)
            assert got.shape == (d,) and err < 2e-5, f"{form} d={d} {inters} level={simd_level}: {err:.2e}"
    finally:
        K.set_backend(prev)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_level_swiglu_extreme_gates(simd_level):
    """pk_swiglu_sum's vector silu (csrc silu_mul: e^-g by a polynomial, -g clamped at ln(FLT_MAX)) on gates from
    -120 to 120, where e^-g under- and overflows f32, and exactly 0, 70 of them (a 6-lane tail) == the twin (NumPy's
    exp, inf where it overflows) within the 2e-5 of the other SwiGLU checks."""
    prev = K.backend()
    K.set_backend("c")
    try:
        rng = np.random.default_rng(73)
        d, inter = 64, 70
        gates = np.concatenate([np.linspace(-120, 120, inter - 1), [0.0]]).astype(np.float32)
        wg = np.zeros((inter, d), np.float32)
        wg[np.arange(inter), np.arange(inter) % d] = gates                   # g = gates for x = 1
        wu = rng.standard_normal((inter, d)).astype(np.float32) / 8
        wd = rng.standard_normal((d, inter)).astype(np.float32) / 8
        x = np.ones(d, np.float32)
        experts = [(Stored("g", "F32", wg), Stored("u", "F32", wu), Stored("d", "F32", wd))]
        got, want = SWIGLU(x, experts, [1.0]), swiglu_twin(x, experts, [1.0])
        assert np.isfinite(got).all(), f"level={simd_level}: non-finite outputs {got[~np.isfinite(got)]}"
        err = np.max(np.abs(got - want)) / np.abs(want).max()
        assert err < 2e-5, f"level={simd_level}: {err:.2e}"
    finally:
        K.set_backend(prev)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_level_silu_mul_twin(simd_level):
    """kernels.fast(ops.silu_mul) (pk_silu_mul: chunks on the threads, the vector exp) == ops.silu_mul to 4 ulp-ish
    (2e-6 of each value's scale) on a prefill-sized [300, 1408] (several chunks, a tail) and small odd shapes, with
    gates from -120 to 120 (e^-g under- and overflows) and exact zeros; inputs untouched; anything else (f64, a
    shape mismatch) goes to the definition."""
    from pykimi import ops
    prev = K.backend()
    K.set_backend("c")
    try:
        rng = np.random.default_rng(74)
        fast = K.fast(ops.silu_mul)
        for shape in ((300, 1408), (3, 7), (1, 16), (0, 5)):
            g = (rng.standard_normal(shape) * 8).astype(np.float32)
            if g.size:
                g.flat[: min(g.size, 241)] = np.linspace(-120, 120, min(g.size, 241))
                g.flat[-1] = 0.0
            u = rng.standard_normal(shape).astype(np.float32)
            g0, u0 = g.copy(), u.copy()
            got, want = fast(g, u), ops.silu_mul(g, u)
            assert got.shape == want.shape and got.dtype == np.float32
            np.testing.assert_array_equal(g, g0)
            np.testing.assert_array_equal(u, u0)
            assert np.isfinite(got).all(), f"level={simd_level} {shape}: non-finite {got[~np.isfinite(got)][:4]}"
            scale = np.maximum(np.abs(g), 1.0) * np.abs(u) + 1e-30
            err = np.max(np.abs(got - want) / scale) if g.size else 0.0
            assert err < 2e-6, f"level={simd_level} {shape}: {err:.2e}"
        g64 = rng.standard_normal((4, 5))
        np.testing.assert_array_equal(fast(g64, g64), ops.silu_mul(g64, g64))
    finally:
        K.set_backend(prev)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_level_exp_rows_twin(simd_level):
    """kernels.fast(ops.exp_rows) (pk_exp_rows: max, then exp and sum, a row at a time) == ops.exp_rows in place to
    ~1 ulp of the row's largest value (1) and its sums to 1e-6 relative, on a vision-attention tile [256, 4096],
    odd widths (a tail past the last vector), a strided view of rows (a tile in a bigger buffer, as the attention's
    last tile is), rows 60 apart in scale (exp underflows to ~0) and a row of one value; anything else (f64, a
    non-unit last stride) goes to the definition."""
    from pykimi import ops
    prev = K.backend()
    K.set_backend("c")
    try:
        rng = np.random.default_rng(75)
        fast = K.fast(ops.exp_rows)
        for shape in ((256, 4096), (5, 37), (3, 1), (1, 16), (0, 8)):
            s = (rng.standard_normal(shape) * 4).astype(np.float32)
            if s.shape[0] > 2 and s.shape[1] > 1:
                s[1, : s.shape[1] // 2] -= 60.0                       # half a row ~e^-60 below the rest
                s[2] = 7.5                                            # all equal: each e^0 = 1
            got, want = s.copy(), s.copy()
            dg, dw = fast(got), ops.exp_rows(want)
            assert dg.shape == dw.shape == (shape[0], 1) and dg.dtype == np.float32
            if not s.size:
                continue
            err = np.max(np.abs(got - want))
            assert err < 3e-7, f"level={simd_level} {shape}: values differ by {err:.2e}"
            rel = np.max(np.abs(dg - dw) / dw)
            assert rel < 1e-6, f"level={simd_level} {shape}: sums differ by {rel:.2e} relative"
        big = (rng.standard_normal((8, 200)) * 4).astype(np.float32)
        before = big.copy()
        view, ref = big[::2, :131], big[::2, :131].copy()          # rows 1600 bytes apart, 131 used of each
        dg, dw = fast(view), ops.exp_rows(ref)
        np.testing.assert_allclose(view, ref, rtol=0, atol=3e-7, err_msg=f"level={simd_level}: strided rows")
        np.testing.assert_allclose(dg, dw, rtol=1e-6, err_msg=f"level={simd_level}: strided rows' sums")
        np.testing.assert_array_equal(big[1::2], before[1::2], err_msg="rows between the view's were written")
        np.testing.assert_array_equal(big[::2, 131:], before[::2, 131:], err_msg="columns past the view written")
        s64 = rng.standard_normal((3, 9))
        a, b = s64.copy(), s64.copy()
        np.testing.assert_array_equal(fast(a), ops.exp_rows(b))
        np.testing.assert_array_equal(a, b)
    finally:
        K.set_backend(prev)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_level_gelu_tanh_twin(simd_level):
    """kernels.fast(ops.gelu_tanh) (pk_gelu_tanh: x / (1 + e^(-2u)), the vector exp) == ops.gelu_tanh to 1e-6 of
    max(|x|, 1) on the vision MLP's [rows, 4304] and odd shapes, with x from -60 to 60 (e^(-2u) over- and
    underflows, the tanh form cancels), exact zeros; input untouched; f64 and non-contiguous go to the definition."""
    from pykimi import ops
    prev = K.backend()
    K.set_backend("c")
    try:
        rng = np.random.default_rng(76)
        fast = K.fast(ops.gelu_tanh)
        for shape in ((64, 4304), (3, 7), (1, 16), (0, 5)):
            x = (rng.standard_normal(shape) * 3).astype(np.float32)
            if x.size:
                x.flat[: min(x.size, 241)] = np.linspace(-60, 60, min(x.size, 241))
                x.flat[-1] = 0.0
            x0 = x.copy()
            got, want = fast(x), ops.gelu_tanh(x)
            assert got.shape == want.shape and got.dtype == np.float32
            np.testing.assert_array_equal(x, x0)
            assert np.isfinite(got).all(), f"level={simd_level} {shape}: non-finite {got[~np.isfinite(got)][:4]}"
            err = np.max(np.abs(got - want) / np.maximum(np.abs(x), 1.0)) if x.size else 0.0
            assert err < 1e-6, f"level={simd_level} {shape}: {err:.2e}"
        x64 = rng.standard_normal((4, 5))
        np.testing.assert_array_equal(fast(x64), ops.gelu_tanh(x64))
        xt = rng.standard_normal((6, 4)).astype(np.float32).T                     # not C-contiguous
        np.testing.assert_array_equal(fast(xt), ops.gelu_tanh(xt))
    finally:
        K.set_backend(prev)


@pytest.mark.parametrize("use_backend", AVAILABLE, indirect=True)
def test_swiglu_sum_matches_reference_and_checks_shapes(use_backend):
    rng = np.random.default_rng(72)
    for form in ("ndarray", "BF16", "q8", "q4"):
        x, experts, coefs = _swiglu_case(rng, 48, [40, 17, 80], form)
        got, want = SWIGLU(x, experts, coefs), swiglu_twin(x, experts, coefs)
        assert _relerr(got, want) < 2e-5, f"{use_backend} {form}: {_relerr(got, want):.2e}"
    np.testing.assert_array_equal(SWIGLU(x, [], []), np.zeros(48, np.float32))
    with pytest.raises(ValueError, match="2 coefficients"):
        SWIGLU(x, experts[:1], [1.0, 2.0])
    g, u, dn = experts[0]
    with pytest.raises(ValueError, match="expected \\[I, 48\\]"):
        SWIGLU(x, [(g, u, g)], [1.0])
    with pytest.raises(ValueError, match="x has 47 features"):
        SWIGLU(x[:47], [(g, u, dn)], [1.0])


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_level_vecmat(simd_level):
    """pk_vecmat_many (y = x W, a combination of stored rows) at every level against ref.vecmat, through
    c.heads: every format, odd widths (short last block, odd q4 width), three heads' row blocks of one
    weight at once (in parallel) and each head alone (identical)."""
    from pykimi.kernels import c
    rng = np.random.default_rng(34)
    for rows, in_f in [(1, 1), (3, 31), (7, 33), (16, 64), (128, 512), (5, 97), (64, 101), (2, 2048), (33, 160),
                       (9, 7)]:
        w = rng.standard_normal((3 * rows, in_f)).astype(np.float32)
        x = rng.standard_normal((3, rows)).astype(np.float32) * 3
        for form, W in _forms(w, rng).items():
            if form in ("ndarray", "F16"):
                continue
            kind = W.kind
            data, sc = (W.data, None) if form in ("BF16", "F32") else (W.q, W.scales)
            y = c.heads("vecmat", x, kind, data, sc, in_f, 0, rows, rows)
            assert y.shape == (3, in_f)
            for h in range(3):
                single = c.heads("vecmat", x[h:h + 1], kind, data, sc, in_f, h * rows, rows, rows)[0]
                np.testing.assert_array_equal(y[h], single)   # in parallel or alone: the same loop, identical
                part = weights.rows_of(W, h * rows, (h + 1) * rows)
                r = ref.vecmat(x[h], part)
                err = np.max(np.abs(y[h] - r)) / (np.abs(x[h]).sum() * np.abs(weights.f32_of(part)).max())
                assert err < 1e-6, f"vecmat {form} {(rows, in_f)} head {h} level={simd_level}: {err:.2e}"


@pytest.mark.parametrize("use_backend", AVAILABLE, indirect=True)
def test_heads_products(use_backend):
    """heads_vecmat / heads_matvec (per-head row blocks of one stored weight, the absorbed MLA's W_uk / W_uv
    in kv_b_proj) against the twins on row views, every stored form, odd widths included."""
    rng = np.random.default_rng(36)
    for H, dn, dv, R in ((4, 8, 6, 64), (3, 5, 7, 97), (16, 32, 32, 512)):
        w = rng.standard_normal((H * (dn + dv), R)).astype(np.float32)
        for form, W in _forms(w, rng).items():
            xq = rng.standard_normal((H, dn)).astype(np.float32)
            xo = rng.standard_normal((H, R)).astype(np.float32)
            got_q = K.heads_vecmat(xq, W, 0, dn + dv, dn)
            got_o = K.heads_matvec(xo, W, dn, dn + dv, dv)
            assert got_q.shape == (H, R) and got_o.shape == (H, dv)
            for h in range(H):
                uk = weights.rows_of(W, h * (dn + dv), h * (dn + dv) + dn)
                uv = weights.rows_of(W, h * (dn + dv) + dn, (h + 1) * (dn + dv))
                r0 = h * (dn + dv) + dn
                np.testing.assert_array_equal(weights.f32_of(uv), weights.f32_of(W)[r0:r0 + dv])  # a view of W
                rq, ro = ref.vecmat(xq[h], uk), K.reference(xo[h][None], uv)[0]
                eq = np.abs(got_q[h] - rq).max() / (np.abs(xq[h]).sum() * np.abs(weights.f32_of(uk)).max())
                eo = np.abs(got_o[h] - ro).max() / (np.abs(xo[h]).sum() * np.abs(weights.f32_of(uv)).max())
                assert eq < 1e-6 and eo < 1e-6, f"{use_backend} {form} H={H} dn={dn} R={R} head {h}: {eq:.1e} {eo:.1e}"
    with pytest.raises(ValueError, match="do not fit"):      # a block past the last row: refused, not read
        K.heads_vecmat(np.zeros((4, 8), np.float32), _forms(w, rng)["BF16"], 1, w.shape[0] // 3, 8)
    with pytest.raises(ValueError, match="expected \\[heads, 512\\]"):
        K.heads_matvec(np.zeros((16, 511), np.float32), _forms(w, rng)["q4"], 0, 64, 32)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
def test_c_simd_selection():
    """set_simd / get_simd / simd_levels, force_scalar on top of them, PYKIMI_SIMD at start-up, and the
    level in backends()."""
    import subprocess
    import sys
    from pykimi.kernels import c
    levels = c.simd_levels()
    assert levels[0] == "scalar" and levels == [lv for lv in c.SIMD_LEVELS if lv in levels]
    try:
        for lv in levels:
            assert c.set_simd(lv) == lv == c.get_simd()
            assert c.lib.pk_simd_level() == (0 if lv == "scalar" else 1)
        c.force_scalar(True)
        assert c.get_simd() == "scalar"
        c.force_scalar(False)
        assert c.get_simd() == levels[-1]
        with pytest.raises(ValueError, match="unknown"):
            c.set_simd("sse9")
        for lv in c.SIMD_LEVELS[len(levels):]:
            with pytest.raises(ValueError, match="not available"):
                c.set_simd(lv)
        assert c.set_simd(None) == levels[-1]
        assert K.backends()["c"]["simd_levels"] == levels
    finally:
        c.set_simd(None)
    for lv in levels:
        out = subprocess.run([sys.executable, "-c", "from pykimi.kernels import c; print(c.get_simd())"],
                             env=dict(__import__("os").environ, PYKIMI_SIMD=lv), capture_output=True, text=True)
        assert out.stdout.strip() == lv, out.stderr


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
def test_c_bf16_gemv_real_width_exactness():
    """bf16 GEMV at a real width (1408 x 2048) within 1e-5 of the widened reference, scale-relative."""
    from pykimi.kernels import c
    rng = np.random.default_rng(3)
    bits = f32_to_bf16(rng.standard_normal((1408, 2048)).astype(np.float32) * 0.02)
    x = rng.standard_normal((1, 2048)).astype(np.float32)
    r = x.astype(np.float64) @ ref.bf16_to_f32(bits).astype(np.float64).T
    y = c.matmul_bf16(x, bits)
    scale = np.abs(x).astype(np.float64) @ np.abs(ref.bf16_to_f32(bits)).astype(np.float64).T
    assert np.max(np.abs(y - r) / scale) < 1e-5


@pytest.mark.parametrize("use_backend", AVAILABLE, indirect=True)
def test_matmul_many_matches_matmul(use_backend):
    """One call for many products (mixed formats, widths, n, incl. one past SMALL_N) == one matmul each."""
    rng = np.random.default_rng(21)
    xs, ws = [], []
    for k, (out_f, in_f, n) in enumerate([(37, 101, 1), (64, 64, 3), (9, 33, 7), (70, 96, 2), (5, 31, 40),
                                          (128, 64, 1), (3, 2048, 16), (50, 97, 1)]):
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        forms = [Stored("b", "BF16", f32_to_bf16(w)), quantize_q8(w), quantize_q4(w), Stored("f", "F32", w), w]
        ws.append(forms[k % len(forms)])
        xs.append(rng.standard_normal((n, in_f)).astype(np.float32) if k != 7 else
                  rng.standard_normal(in_f).astype(np.float32))
    ys = K.matmul_many(xs, ws)
    for x, w, y in zip(xs, ws, ys):
        r = K.matmul(x, w)
        assert y.shape == r.shape
        np.testing.assert_allclose(y, r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        K.matmul_many([xs[0]], [ws[1]])


def test_tiled_blas_path_matches(monkeypatch):
    """Large n widens W in bounded row tiles: force several tiles and compare. (Quantized weights with
    quantized activations stay on the C kernels past SMALL_N rows; switched off here to reach the tiles.)"""
    monkeypatch.setattr(linear, "TASK_ELEMS", 100 * 37)
    monkeypatch.setattr(linear, "SMALL_N_ACT", {})
    monkeypatch.setattr(linear, "C_VNNI_MIN", {})      # ... and so do int8-activation batches on the VNNI kernel
    monkeypatch.setattr(linear, "C_VNNI_MIN_AVX2", {})  # ... and on its AVX2 twin
    monkeypatch.setattr(linear, "C_VNNI16_MIN", {})     # ... and int16-activation Q8 batches on the int16 kernel
    monkeypatch.setattr(linear, "C_VNNI16_MIN_AVX2", {})  # ... and on its AVX2 twin
    rng = np.random.default_rng(5)
    w = rng.standard_normal((250, 37)).astype(np.float32)
    x = rng.standard_normal((40, 37)).astype(np.float32)
    for W in (Stored("b", "BF16", f32_to_bf16(w)), quantize_q8(w), quantize_q4(w)):
        np.testing.assert_allclose(K.matmul(x, W), ref.matmul(x, W), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("use_backend", AVAILABLE, indirect=True)
def test_widen_matches_twin(use_backend, monkeypatch):
    """kernels.widen: every stored form decoded exactly as weights.f32_of, in several row tiles, into a new
    array or a given one; a wrong ``out`` is refused."""
    monkeypatch.setattr(linear, "TASK_ELEMS", 3 * 160)                 # several tiles on the worker threads
    rng = np.random.default_rng(11)
    for out_f, in_f in ((5, 31), (129, 160), (33, 2048), (1, 1)):
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        for form, W in _forms(w, rng).items():
            want = weights.f32_of(W)
            np.testing.assert_array_equal(K.widen(W), want, err_msg=f"{form} {out_f}x{in_f}")
            buf = np.full((out_f, in_f), np.nan, dtype=np.float32)
            assert K.widen(W, out=buf) is buf
            np.testing.assert_array_equal(buf, want, err_msg=f"{form} {out_f}x{in_f} into out")
    b = rng.standard_normal(37).astype(np.float32)
    np.testing.assert_array_equal(K.widen(Stored("b", "BF16", f32_to_bf16(b))), ref.bf16_to_f32(f32_to_bf16(b)))
    with pytest.raises(ValueError, match="widen: out is"):
        K.widen(Stored("t", "BF16", f32_to_bf16(w)), out=np.empty((2, 2), np.float32))


def test_backends_report_and_selection():
    info = K.backends()
    assert info["numpy"]["available"] and info["active"] in K.BACKENDS
    for name in K.BACKENDS:
        assert "reason" in info[name]
    with pytest.raises(ValueError):
        K.set_backend("fortran")
    prev = K.backend()
    try:
        assert K.set_backend("numpy") == "numpy" and K.backend() == "numpy"
    finally:
        K.set_backend(prev)


def test_missing_c_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(probe._avail, "c", (False, "C extension pykimi._ckernels not built (test)"))
    monkeypatch.setitem(probe._state, "warned", False)
    monkeypatch.setitem(probe._state, "backend", None)
    monkeypatch.delenv("PYKIMI_BACKEND", raising=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        name = K.backend()
        probe._state["backend"] = None
        K.backend()
    assert name in ("numba", "numpy")
    msgs = [str(r.message) for r in rec if "pykimi" in str(r.message)]
    assert len(msgs) == 1 and "not built" in msgs[0], msgs
    with pytest.raises(ValueError, match="unavailable"):
        K.set_backend("c")
    probe._state["backend"] = None  # monkeypatch restores the rest


def test_set_threads():
    prev = K.get_threads()
    try:
        K.set_threads(1)
        assert K.get_threads() == 1
        if "c" in AVAILABLE:
            from pykimi.kernels import c
            assert c.get_threads() == 1
    finally:
        K.set_threads(prev)
    with pytest.raises(ValueError):
        K.set_threads(0)


# ---------------------------------------------------------------------------------- small ops

@pytest.mark.parametrize("use_backend", AVAILABLE, indirect=True)
def test_norm_twins_match_the_definition(use_backend):
    rng = np.random.default_rng(11)
    norm, add_norm = K.fast(ops.rms_norm), K.fast(ops.add_rms_norm)
    for rows, d in [(1, 7), (5, 64), (13, 129)]:
        x = rng.standard_normal((rows, d)).astype(np.float32) * 3
        wt = rng.standard_normal(d).astype(np.float32)
        np.testing.assert_allclose(norm(x, wt, 1e-6), ops.rms_norm(x, wt, 1e-6), rtol=1e-5, atol=1e-6)
    x3 = rng.standard_normal((2, 3, 4, 10)).astype(np.float32)
    np.testing.assert_allclose(norm(x3, np.ones(10, np.float32), 1e-5),
                               ops.rms_norm(x3, np.ones(10, np.float32), 1e-5), rtol=1e-5, atol=1e-6)
    a3 = rng.standard_normal(x3.shape).astype(np.float32)
    (xo, h), (rxo, rh) = add_norm(x3, a3, wt[:10], 1e-5), ops.add_rms_norm(x3, a3, wt[:10], 1e-5)
    np.testing.assert_array_equal(xo, rxo)   # the residual add is exact
    np.testing.assert_allclose(h, rh, rtol=1e-5, atol=1e-6)
    assert xo.shape == h.shape == x3.shape


def _mla_case(rng, form, H, dn, dr, dv, R, n):
    """One decode token's inputs for mla_absorbed: projections, norm weight, a cache with n rows held."""
    kv_b = (rng.standard_normal((H * (dn + dv), R)) / np.sqrt(R)).astype(np.float32)
    q = rng.standard_normal(H * (dn + dr)).astype(np.float32)
    kva = rng.standard_normal(R + dr).astype(np.float32) * 3.0
    ln = rng.uniform(0.5, 1.5, R).astype(np.float32)
    inv_freq = (1.0 / 50000.0 ** (np.arange(0, dr, 2, dtype=np.float32) / np.float32(max(dr, 1)))).astype(np.float32)
    rows = np.zeros((n + 3, R + dr), dtype=np.float32)
    rows[:n] = rng.standard_normal((n, R + dr)).astype(np.float32)
    return q, kva, ln, inv_freq, rows, _forms(kv_b, rng)[form]


MLA_DIMS = [(1, 8, 4, 8, 32, 0), (3, 16, 8, 12, 64, 5), (16, 128, 64, 128, 512, 40), (4, 24, 6, 20, 70, 130)]


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
@pytest.mark.parametrize("form", ["BF16", "F32", "q8", "q4"])
@pytest.mark.parametrize("cache", ["f32", "bf16"])
def test_c_level_mla_absorbed(simd_level, form, cache):
    """pk_mla_absorbed (one decode token's whole absorbed attention) at every level and stored form, real and
    odd head sizes (R not a multiple of 32), an empty cache and a query before the cache's end (keys after
    it masked) == the twin: the output and the cache row it writes, nothing else written. A bf16 cache (rows
    as uint16 bits) is read widened in registers and its new row stored rounded to nearest even, as the NumPy
    definition does (weights.f32_to_bf16 / bf16_to_f32): the output to f32 rounding, the new row to at most one
    bf16 step (the f32 row before rounding may differ in its last bits)."""
    prev, prev_act = K.backend(), K.act_quant()
    K.set_backend("c")
    try:
        rng = np.random.default_rng(81 if cache == "f32" else 83)
        for H, dn, dr, dv, R, n in MLA_DIMS:
            for pos, act in ((n, "none"), (max(n - 3, 0), "none"), (n, prev_act)):
                K.set_act_quant(act)
                q, kva, ln, inv, rows, kv_b = _mla_case(rng, form, H, dn, dr, dv, R, n)
                if cache == "bf16":
                    rows = f32_to_bf16(rows)
                    rows[n:] = 0
                rows_ref = rows.copy()
                args = (q, kva, ln, 1e-6, inv, pos)
                dims = (H, dn, dr, dv, R)
                got = MLA(*args, rows, n, kv_b, 0.07, dims)
                want = mla_twin(*args, rows_ref, n, kv_b, 0.07, dims)
                where = f"{cache} cache {form} act={act} level={simd_level} H={H} dn={dn} dr={dr} dv={dv} R={R} " \
                        f"n={n} pos={pos}"
                # int8 activations of W_uv (Q4, default setting): the C and the twin sum the latent in a
                # different order, so an activation can round to the neighbouring code -- one int8 step
                tol = 4e-3 if (form == "q4" and act != "none") else 2e-5
                assert got.shape == (H * dv,) and _relerr(got, want) < tol, f"{where}: {_relerr(got, want):.2e}"
                if cache == "f32":
                    assert _relerr(rows[n], rows_ref[n]) < 2e-6, \
                        f"{where}: cache row {_relerr(rows[n], rows_ref[n]):.2e}"
                else:
                    step = np.abs(rows[n].astype(np.int32) - rows_ref[n].astype(np.int32))
                    # one step only where the two f32 rows straddle a rounding boundary: rare (a truncating or
                    # mis-rounding store moves about half of them)
                    assert step.max() <= 1 and (step > 0).mean() <= 0.01, \
                        f"{where}: new row off by {step.max()} bf16 steps at {int(step.argmax())}, " \
                        f"{int((step > 0).sum())} of {step.size} differ"
                    # the same step on an f32 cache holding the same values: differs only by the new row's
                    # rounding, so by a bf16-sized amount, not more (a misread row would be far off)
                    r32 = weights.bf16_to_f32(rows_ref)
                    r32[n:] = 0
                    f32_out = MLA(*args, r32, n, kv_b, 0.07, dims)
                    assert _relerr(got, f32_out) < 2 ** -7, f"{where}: bf16 vs f32 cache {_relerr(got, f32_out):.2e}"
                np.testing.assert_array_equal(rows[:n], rows_ref[:n], err_msg=f"{where}: held rows changed")
                assert not rows[n + 1:].any(), f"{where}: wrote past row {n}"
    finally:
        K.set_backend(prev)
        K.set_act_quant(prev_act)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
@pytest.mark.parametrize("cache", ["f32", "bf16"])
def test_c_level_mla_absorbed_long_cache(simd_level, cache):
    """The one-pass attention over long caches: enough rows that the 32 splits hold several chunks of 32 rows
    each (the online softmax rescales a split's sums when a later chunk raises a head's max: the rows' scale
    grows along the cache here, so maxima move often), row counts off every tile (16 / 6 / 4 rows) and a
    query before the cache's end; 16 heads at the real widths and 3 heads / R = 70 (a padded block of 16
    heads, column tails): == the definition to the usual tolerance, and the same bits at 1 and 2 threads
    (the splits are cut by the row count only)."""
    prev, prev_act, prev_th = K.backend(), K.act_quant(), K.get_threads()
    K.set_backend("c")
    K.set_act_quant("none")
    try:
        rng = np.random.default_rng(85)
        for H, dn, dr, dv, R, n, pos in [(16, 128, 64, 128, 512, 2093, 2093), (3, 16, 6, 12, 70, 1411, 1300),
                                         (16, 128, 64, 128, 512, 1029, 1029)]:
            q, kva, ln, inv, rows, kv_b = _mla_case(rng, "F32", H, dn, dr, dv, R, n)
            rows[:n] *= np.linspace(0.5, 2.0, n, dtype=np.float32)[:, None]      # later rows score higher
            if cache == "bf16":
                rows = f32_to_bf16(rows)
                rows[n:] = 0
            outs = []
            for th in (1, 2):
                K.set_threads(th)
                r = rows.copy()
                outs.append(MLA(q, kva, ln, 1e-6, inv, pos, r, n, kv_b, 0.07, (H, dn, dr, dv, R)))
            rows_ref = rows.copy()
            want = mla_twin(q, kva, ln, 1e-6, inv, pos, rows_ref, n, kv_b, 0.07, (H, dn, dr, dv, R))
            where = f"{cache} cache level={simd_level} H={H} R={R} n={n} pos={pos}"
            assert _relerr(outs[1], want) < 2e-5, f"{where}: {_relerr(outs[1], want):.2e}"
            np.testing.assert_array_equal(outs[0], outs[1], err_msg=f"{where}: 1 vs 2 threads")
    finally:
        K.set_backend(prev)
        K.set_act_quant(prev_act)
        K.set_threads(prev_th)


@pytest.mark.parametrize("use_backend", AVAILABLE, indirect=True)
def test_mla_absorbed_bf16_cache_every_backend(use_backend):
    """Every backend's fast twin on a bf16 cache == the definition; a cache of another dtype is a one-line
    ValueError (the C kernel writes the row in place: no converted copy)."""
    rng = np.random.default_rng(84)
    H, dn, dr, dv, R, n = 3, 16, 8, 12, 64, 9
    q, kva, ln, inv, rows32, kv_b = _mla_case(rng, "BF16", H, dn, dr, dv, R, n)
    rows = f32_to_bf16(rows32)
    rows_ref = rows.copy()
    got = MLA(q, kva, ln, 1e-6, inv, n, rows, n, kv_b, 0.1, (H, dn, dr, dv, R))
    want = mla_twin(q, kva, ln, 1e-6, inv, n, rows_ref, n, kv_b, 0.1, (H, dn, dr, dv, R))
    assert _relerr(got, want) < 2e-5, f"{use_backend}: {_relerr(got, want):.2e}"
    step = np.abs(rows[n].astype(np.int32) - rows_ref[n].astype(np.int32))
    assert step.max() <= 1 and (step > 0).mean() <= 0.02, f"{use_backend}: new row {step.tolist()}"
    with pytest.raises(ValueError, match="float32 or bf16"):
        MLA(q, kva, ln, 1e-6, inv, n, rows32.astype(np.float64), n, kv_b, 0.1, (H, dn, dr, dv, R))


@pytest.mark.parametrize("use_backend", AVAILABLE, indirect=True)
def test_mla_absorbed_matches_reference_and_checks_shapes(use_backend):
    rng = np.random.default_rng(82)
    H, dn, dr, dv, R, n = 3, 16, 8, 12, 64, 9
    for form in ("ndarray", "BF16", "q8", "q4"):
        q, kva, ln, inv, rows, kv_b = _mla_case(rng, form, H, dn, dr, dv, R, n)
        rows_ref = rows.copy()
        got = MLA(q, kva, ln, 1e-6, inv, n, rows, n, kv_b, 0.1, (H, dn, dr, dv, R))
        want = mla_twin(q, kva, ln, 1e-6, inv, n, rows_ref, n, kv_b, 0.1, (H, dn, dr, dv, R))
        tol = 4e-3 if form == "q4" else 2e-5   # int8 activations of W_uv: one rounding step (see above)
        assert _relerr(got, want) < tol, f"{use_backend} {form}: {_relerr(got, want):.2e}"
    with pytest.raises(ValueError, match="do not fit"):
        MLA(q[:-1], kva, ln, 1e-6, inv, n, rows, n, kv_b, 0.1, (H, dn, dr, dv, R))
    with pytest.raises(ValueError, match="cannot take row"):
        MLA(q, kva, ln, 1e-6, inv, n, rows[: n], n, kv_b, 0.1, (H, dn, dr, dv, R))


@pytest.mark.parametrize("use_backend", AVAILABLE, indirect=True)
def test_route_select_matches_reference(use_backend):
    """The router's selection kernel == moe.select_experts: ids exactly (ties -> lower id, also between groups),
    scores / weights / margins to float rounding, for every scoring, group rule and edge (k = E, one expert per
    group, more groups kept than exist, no bias)."""
    rng = np.random.default_rng(13)
    cases = [  # S, E, k, scoring, n_group, topk_group, group_top2, norm, scaling, bias
        (1, 64, 6, "sigmoid", 1, 1, True, True, 2.446, True), (9, 64, 6, "sigmoid", 8, 4, True, True, 2.5, True),
        (5, 16, 4, "softmax", 4, 2, False, False, 1.0, False), (3, 6, 6, "sigmoid", 1, 1, True, True, 1.0, True),
        (4, 8, 3, "sigmoid", 8, 3, True, True, 1.0, True), (2, 12, 2, "softmax", 3, 5, True, True, 16.0, False),
        (6, 10, 1, "sigmoid", 1, 1, True, True, 1.0, False)]
    for S, E, k, scoring, G, TG, top2, norm, scaling, with_bias in cases:
        logits = rng.standard_normal((S, E)).astype(np.float32) * 2
        logits[0, 3] = logits[0, 5] = logits.max() + 1          # a tie for the best choice
        if S > 1:
            logits[1] = np.round(logits[1])                       # many ties
        bias = rng.standard_normal(E).astype(np.float32) * 0.1 if with_bias else None
        args = (bias, scoring, k, G, TG, top2, norm, scaling)
        rule = moe.RouterRule(scoring, k, G, TG, top2, norm, scaling, with_bias)
        got, want = K.fast(moe.select_experts)(logits, bias, rule), moe.select_experts(logits, bias, rule)
        where = f"{use_backend} S={S} E={E} k={k} {scoring} groups={G}/{TG} top2={top2}"
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"{where}: ids")
        assert got[1].dtype == np.int32 and got[1].shape == (S, k), where
        for name, a, b in zip(("scores", "weights", "margin"), got[::2] + got[3:], want[::2] + want[3:]):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7, err_msg=f"{where}: {name}")


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
def test_c_bf16_batches_on_amx():
    """bf16 batches and Q8_32 batches (f32 activations) on AMX tiles (x split into three bf16 parts; Q8 codes
    widened per tile, each block's products scaled) == the f32 product of the decoded weights to 2e-5, for odd
    shapes (`in` not a multiple of 32, `out` not of 16) and every grouping of x tiles (7..512 rows: one, two,
    three, four tiles a group, several groups); with AMX off the FMA kernels give the same; matmul keeps
    bf16 batches on the C kernels up to C_AMX_ROWS rows with AMX, SMALL_N_ACT without, and reference() names
    the f32 product for Q8 batches that AMX takes."""
    from pykimi.kernels import c
    if not c.lib.pk_amx_available():
        pytest.skip("this CPU / kernel has no AMX-BF16 for this process")
    prev_b, prev = K.backend(), c.get_amx()
    K.set_backend("c")
    rng = np.random.default_rng(91)
    try:
        for amx in (True, False):
            assert c.set_amx(amx) == amx
            assert linear._small_n("bf16") == (linear.C_AMX_ROWS if amx and c.get_simd() == "avx512"
                                          else K.SMALL_N_ACT[("bf16", "f32")] if c.get_simd() == "avx512"
                                          else K.SMALL_N)
            for out_f, in_f in ((37, 101), (50, 97), (129, 160), (16, 32), (300, 2048)):
                w = rng.standard_normal((out_f, in_f)).astype(np.float32)
                W, Q = Stored("w", "BF16", f32_to_bf16(w)), quantize_q8(w, "q")
                for n in (7, 8, 9, 16, 17, 31, 32, 33, 48, 64, 65, 100, 129, 200, 512):
                    x = rng.standard_normal((n, in_f)).astype(np.float32)
                    err = _relerr(c.matmul_bf16(x, W.data), ref.matmul(x, W))
                    assert err < 2e-5, f"amx={amx} bf16 [{out_f}, {in_f}] n={n}: {err:.2e}"
                    err = _relerr(c.matmul_q8(x, Q.q, Q.scales), ref.matmul(x, Q))
                    assert err < 2e-5, f"amx={amx} q8 [{out_f}, {in_f}] n={n}: {err:.2e}"
                    if amx and c.get_simd() == "avx512" and linear.C_AMX_MIN_Q8 <= n <= linear.C_AMX_ROWS:
                        assert linear._c_mode("q8_32", n) == "f32"
                        assert _relerr(K.matmul(x, Q), K.reference(x, Q)) < 2e-5
                xs = [rng.standard_normal((n, in_f)).astype(np.float32) for n in (9, 40)]
                for x, y in zip(xs, K.matmul_many(xs, [W, W])):
                    assert _relerr(y, ref.matmul(x, W)) < 2e-5, f"amx={amx} matmul_many [{out_f}, {in_f}]"
    finally:
        c.set_amx(prev)
        K.set_backend(prev_b)


# ------------------------------------------------------------------ fused decode calls (issue 25 item 4)
@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
@pytest.mark.parametrize("form", ["BF16", "F32", "q8", "q4"])
def test_c_level_mla_absorbed_out(simd_level, form):
    """pk_mla_absorbed_o (the absorbed attention and o_proj in one call) == fast(mla_absorbed) followed by
    kernels.matmul bit for bit (o_proj's rows run the same job in the attention's region), at every level,
    every stored form of kv_b_proj and o_proj, odd widths; and == the definition to the mla tolerance."""
    prev, prev_act = K.backend(), K.act_quant()
    K.set_backend("c")
    OUT = K.fast(attention.mla_absorbed_out)
    try:
        rng = np.random.default_rng(91)
        for H, dn, dr, dv, R, n in MLA_DIMS:
            for act in ("none", prev_act):
                K.set_act_quant(act)
                q, kva, ln, inv, rows, kv_b = _mla_case(rng, form, H, dn, dr, dv, R, n)
                D = 3 + H * dv // 2
                wo = (rng.standard_normal((D, H * dv)) / np.sqrt(H * dv)).astype(np.float32)
                o_proj = _forms(wo, rng)[form]
                rows2, rows3 = rows.copy(), rows.copy()
                where = f"{form} act={act} level={simd_level} H={H} dv={dv} R={R} n={n} D={D}"
                got = OUT(q, kva, ln, 1e-6, inv, n, rows, n, kv_b, o_proj, 0.07, (H, dn, dr, dv, R))
                o = MLA(q, kva, ln, 1e-6, inv, n, rows2, n, kv_b, 0.07, (H, dn, dr, dv, R))
                two = K.matmul(o[None, :], o_proj)[0]
                assert got.shape == (D,), where
                diff = np.flatnonzero(got != two)
                assert diff.size == 0, f"{where}: {diff.size} outputs differ from the two calls, first at {diff[0]}"
                np.testing.assert_array_equal(rows[n], rows2[n], err_msg=f"{where}: cache row")
                want = attention.mla_absorbed_out(q, kva, ln, 1e-6, inv, n, rows3, n, kv_b, o_proj, 0.07,
                                                  (H, dn, dr, dv, R), matmul=K.reference)
                tol = 4e-3 if (form == "q4" and act != "none") else 2e-5
                assert _relerr(got, want) < tol, f"{where}: vs definition {_relerr(got, want):.2e}"
        with pytest.raises(ValueError, match="o_proj is"):
            OUT(q, kva, ln, 1e-6, inv, n, rows, n, kv_b, o_proj.T if isinstance(o_proj, np.ndarray) else wo[:, 1:],
                0.07, (H, dn, dr, dv, R))
    finally:
        K.set_backend(prev)
        K.set_act_quant(prev_act)


ROUTER_CASES = [  # S, E, D, k, scoring, n_group, topk_group, group_top2, norm, scaling, bias
    (1, 64, 96, 6, "sigmoid", 1, 1, True, True, 2.446, True), (9, 64, 40, 6, "sigmoid", 8, 4, True, True, 2.5, True),
    (5, 16, 33, 4, "softmax", 4, 2, False, False, 1.0, False), (3, 6, 8, 6, "sigmoid", 1, 1, True, True, 1.0, True),
    (4, 8, 17, 3, "sigmoid", 8, 3, True, True, 1.0, True), (2, 12, 64, 2, "softmax", 3, 5, True, True, 16.0, False)]


def _router_case(rng, S, E, D, with_bias):
    """h [S, D], gate [E, D] with exact ties: gate rows 3 and 5 equal (a tie for every token), and row 1 of h
    and every gate row small integers (logits exact, many ties)."""
    gate = rng.standard_normal((E, D)).astype(np.float32) / np.sqrt(D)
    gate[5 % E] = gate[3 % E]
    h = rng.standard_normal((S, D)).astype(np.float32) * 2
    if S > 1:
        gate = np.round(gate * 4).astype(np.float32)
        h[1] = np.round(h[1])
    bias = rng.standard_normal(E).astype(np.float32) * 0.1 if with_bias else None
    return h, gate, bias


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_level_route(simd_level):
    """pk_route (router GEMV + selection) == moe.route: logits to float rounding, and on the C logits the
    selection EXACTLY moe.select_experts' (ids, ties -> lower id, also between groups; weights and margins to
    rounding); each row's logits and decision bit for bit that row routed alone (the engine's batch)."""
    prev = K.backend()
    K.set_backend("c")
    ROUTE = K.fast(moe.route)
    try:
        rng = np.random.default_rng(92)
        for S, E, D, k, scoring, G, TG, top2, norm, scaling, with_bias in ROUTER_CASES:
            h, gate, bias = _router_case(rng, S, E, D, with_bias)
            rule = moe.RouterRule(scoring, k, G, TG, top2, norm, scaling, with_bias)
            where = f"level={simd_level} S={S} E={E} k={k} {scoring} groups={G}/{TG}"
            got, want = ROUTE(h, gate, bias, rule), moe.route(h, gate, bias, rule)
            np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5, err_msg=f"{where}: logits")
            scores, ids, weights, margin = moe.select_experts(got.logits, bias, rule)
            np.testing.assert_array_equal(got.topk_ids, ids, err_msg=f"{where}: ids")
            assert got.topk_ids.dtype == np.int32 and got.topk_ids.shape == (S, k), where
            for name, a, b in (("scores", got.scores, scores), ("weights", got.topk_weights, weights),
                               ("margin", got.topk_margin, margin)):
                np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7, err_msg=f"{where}: {name}")
            for s in range(S):
                one = ROUTE(h[s:s + 1], gate, bias, rule)
                for name in ("logits", "topk_ids", "topk_weights", "topk_margin"):
                    np.testing.assert_array_equal(getattr(one, name)[0], getattr(got, name)[s],
                                                  err_msg=f"{where}: row {s} alone, {name}")
    finally:
        K.set_backend(prev)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("form", ["BF16", "q8", "q4"])
def test_moe_decode_matches_definition(form):
    """fast(moe_decode) (pk_moe: router, chosen and shared experts in one call) == route + swiglu_sum on the same
    decision bit for bit; == the definition to rounding (ids exactly where the definition's BLAS logits agree);
    an expert is resolved only when first chosen, and the table is rebuilt when the read generation changes."""
    prev = K.backend()
    K.set_backend("c")
    MOE = K.fast(moe.moe_decode)
    try:
        rng = np.random.default_rng(93)
        E, D, I = 16, 48, 24
        experts = [_swiglu_case(rng, D, [I], form)[1][0] for _ in range(E)]
        shared = _swiglu_case(rng, D, [2 * I], form)[1][0]
        resolved = []

        def get_expert(e):
            resolved.append(e)
            return experts[e]
        gen = [0]
        get_expert.generation = lambda: gen[0]
        rule = moe.RouterRule("sigmoid", 4, 4, 2, True, True, 2.5, True)
        gate = (rng.standard_normal((E, D)) / np.sqrt(D)).astype(np.float32)
        bias = rng.standard_normal(E).astype(np.float32) * 0.1
        chosen = set()
        for step in range(6):
            h = rng.standard_normal((1, D)).astype(np.float32)
            resolved.clear()
            out, rec = MOE(h, gate, bias, rule, get_expert, shared, n_experts=E)
            ids = rec.topk_ids[0].tolist()
            assert sorted(resolved) == sorted(set(ids) - chosen), f"step {step}: resolved {resolved}, chose {ids}"
            chosen |= set(ids)
            two = K.fast(moe.swiglu_sum)(h[0], [experts[e] for e in ids] + [shared],
                                         rec.topk_weights[0].tolist() + [1.0])
            diff = np.flatnonzero(out[0] != two)
            assert out.shape == (1, D) and diff.size == 0, f"{form} step {step}: {diff.size} differ from swiglu_sum"
            ref = K.fast(moe.route)(h, gate, bias, rule)
            np.testing.assert_array_equal(rec.topk_ids, ref.topk_ids, err_msg=f"step {step}: ids vs fast(route)")
            want, wrec = moe.moe_decode(h, gate, bias, rule, get_expert, shared, n_experts=E)
            if wrec.topk_margin[0] > 1e-5:               # no near tie: the BLAS logits pick the same experts
                np.testing.assert_array_equal(rec.topk_ids, wrec.topk_ids, err_msg=f"step {step}: ids")
                assert _relerr(out, want) < 2e-5, f"{form} step {step}: vs definition {_relerr(out, want):.2e}"
        gen[0] += 1                                       # a new read generation: everything resolved again
        resolved.clear()
        out, rec = MOE(h, gate, bias, rule, get_expert, shared, n_experts=E)
        assert sorted(resolved) == sorted(rec.topk_ids[0].tolist())
    finally:
        K.set_backend(prev)


# ------------------------------------------------------------------ one decoder layer in one call (issue 25 item 4)
def _layer_cfg(D, H, dn, dr, dv, R, q_lora, E):
    from types import SimpleNamespace
    return SimpleNamespace(hidden_size=D, num_attention_heads=H, qk_nope_head_dim=dn, qk_rope_head_dim=dr,
                           v_head_dim=dv, kv_lora_rank=R, q_lora_rank=q_lora, qk_head_dim=dn + dr,
                           rms_norm_eps=1e-5, kv_a_layernorm_eps=1e-6, rope_theta=50000.0, n_routed_experts=E)


def _layer_case(rng, form, D, H, dn, dr, dv, R, q_lora=0, E=0, I=24):
    """A decoder layer's weights (every linear in ``form``, norms and the router f32) with a counting
    get_expert (its resolved list and generation knob) -> (LayerWeights, cfg, resolved, gen)."""
    from pykimi.attention import MLAWeights
    from pykimi.model import LayerWeights

    def lin(o, i):
        return _forms((rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32), rng)[form]

    def norm(n):
        return rng.uniform(0.5, 1.5, n).astype(np.float32)
    dq = H * (dn + dr)
    attn = MLAWeights(kv_a_proj_with_mqa=lin(R + dr, D), kv_a_layernorm=norm(R), kv_b_proj=lin(H * (dn + dv), R),
                      o_proj=lin(D, H * dv))
    if q_lora:
        attn.q_a_proj, attn.q_a_layernorm, attn.q_b_proj = lin(q_lora, D), norm(q_lora), lin(dq, q_lora)
    else:
        attn.q_proj = lin(dq, D)
    resolved, gen = [], [0]
    kw = dict(layer=0, input_layernorm=norm(D), post_attention_layernorm=norm(D), attn=attn)
    if E:
        experts = [(lin(I, D), lin(I, D), lin(D, I)) for _ in range(E)]

        def get_expert(e):
            resolved.append(e)
            return experts[e]
        get_expert.generation = lambda: gen[0]
        kw.update(gate_w=(rng.standard_normal((E, D)) / np.sqrt(D)).astype(np.float32),
                  gate_bias=(rng.standard_normal(E) * 0.1).astype(np.float32), get_expert=get_expert,
                  shared=(lin(2 * I, D), lin(2 * I, D), lin(D, 2 * I)),
                  router=moe.RouterRule("sigmoid", 4, 4, 2, True, True, 2.5, True))
    else:
        kw.update(mlp=(lin(5 * I, D), lin(5 * I, D), lin(D, 5 * I)))
    return LayerWeights(**kw), _layer_cfg(D, H, dn, dr, dv, R, q_lora, E), resolved, gen


LAYER_CASES = [  # D, H, dn, dr, dv, R, q_lora, E: a dense layer, MoE layers, odd widths, q-LoRA
    (64, 4, 16, 8, 16, 32, 0, 0), (72, 3, 16, 8, 12, 40, 0, 16), (40, 2, 8, 6, 10, 70, 24, 8),
    (96, 5, 24, 4, 20, 33, 0, 0)]


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
@pytest.mark.parametrize("form", ["BF16", "F32", "q8", "q4"])
def test_c_level_decode_layer(simd_level, form):
    """pk_decode_layer (model.decode_layer's twin: the whole layer of a decode token in one call) == the
    definition's stage by stage C path bit for bit -- the output and the cache row -- at every level and stored
    form, both activation settings, dense and MoE layers, q-LoRA, odd widths, a cache that grows (reallocated
    between tokens), experts resolved only when first chosen (the call's return-1 path) and again after a new
    read generation; and == the definition on the NumPy backend to the mla tolerance (exact products)."""
    from pykimi import model as M
    from pykimi.cache import LatentCache
    prev, prev_act = K.backend(), K.act_quant()
    LAYER = K.fast(M.decode_layer)
    try:
        rng = np.random.default_rng(94)
        for D, H, dn, dr, dv, R, q_lora, E in LAYER_CASES:
            for act in ("none", prev_act):
                K.set_backend("c")
                K.set_act_quant(act)
                lw, cfg, resolved, gen = _layer_case(rng, form, D, H, dn, dr, dv, R, q_lora, E)
                fast_c, def_c, def_np = (LatentCache(1, R, dr, capacity=2) for _ in range(3))
                chosen: set = set()
                for step in range(7):
                    where = f"{form} act={act} level={simd_level} D={D} H={H} R={R} q_lora={q_lora} E={E} step {step}"
                    if step == 5:
                        gen[0] += 1                       # a new read generation: every expert resolved again
                        chosen = set()
                    x = (rng.standard_normal((1, D)) * 2).astype(np.float32)
                    resolved.clear()
                    got = LAYER(x, lw, fast_c, step, cfg)
                    assert getattr(lw, "_c_layer", None) is not None, f"{where}: the fused call did not run"
                    new = set(resolved)
                    resolved.clear()
                    want = M.decode_layer(x, lw, def_c, step, cfg)
                    assert got.shape == (1, D) and got.dtype == np.float32, where
                    diff = np.flatnonzero(got != want)
                    assert diff.size == 0, (f"{where}: {diff.size} outputs differ from the stage by stage path, "
                                            f"first at {diff[0]}: {got[0, diff[0]]!r} vs {want[0, diff[0]]!r}")
                    np.testing.assert_array_equal(fast_c.rows(0), def_c.rows(0), err_msg=f"{where}: cache rows")
                    assert len(fast_c) == step + 1, where
                    if E:
                        assert new.isdisjoint(chosen) and len(new) <= 4, f"{where}: resolved {new} again"
                        chosen |= new
                    if act == "none":
                        K.set_backend("numpy")
                        ref_out = M.decode_layer(x, lw, def_np, step, cfg)
                        K.set_backend("c")
                        err = _relerr(got, ref_out)
                        assert err < 2e-5, f"{where}: vs the NumPy definition {err:.2e}"
                assert fast_c.capacity > 2, "the cache never grew"
    finally:
        K.set_backend(prev)
        K.set_act_quant(prev_act)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
def test_decode_layer_falls_back_to_the_definition():
    """Weights C does not read (F16), an f32 kv_b copy, or a backend other than C: fast(decode_layer) is the
    definition (same values); the record follows a changed weight object and activation setting."""
    from pykimi import model as M
    from pykimi.cache import LatentCache
    from pykimi.weights import f32_of
    prev, prev_act = K.backend(), K.act_quant()
    LAYER = K.fast(M.decode_layer)
    try:
        K.set_backend("c")
        rng = np.random.default_rng(95)
        D, H, dn, dr, dv, R = 48, 2, 8, 4, 8, 32
        for how in ("F16", "kv_b_f32", "numba"):
            lw, cfg, _, _ = _layer_case(rng, "F16" if how == "F16" else "BF16", D, H, dn, dr, dv, R, 0, 8)
            if how == "kv_b_f32":
                lw.attn.kv_b_f32 = f32_of(lw.attn.kv_b_proj)
            a, b = LatentCache(1, R, dr, capacity=4), LatentCache(1, R, dr, capacity=4)
            x = rng.standard_normal((1, D)).astype(np.float32)
            K.set_backend("numba" if how == "numba" else "c")
            np.testing.assert_array_equal(LAYER(x, lw, a, 0, cfg), M.decode_layer(x, lw, b, 0, cfg), err_msg=how)
            assert getattr(lw, "_c_layer", None) is None, f"{how}: a C record was made"
        K.set_backend("c")
        lw, cfg, _, _ = _layer_case(rng, "q8", D, H, dn, dr, dv, R, 0, 0)
        c1 = LatentCache(1, R, dr)
        x = rng.standard_normal((1, D)).astype(np.float32)
        K.set_act_quant("none")
        LAYER(x, lw, c1, 0, cfg)
        first = lw._c_layer
        K.set_act_quant("all")                              # another activation mode: a new record
        LAYER(x, lw, c1, 1, cfg)
        assert lw._c_layer is not first and lw._c_layer.setting == "all"
        second = lw._c_layer
        lw.attn.o_proj = _forms(rng.standard_normal((D, H * dv)).astype(np.float32), rng)["q4"]   # a new weight
        c2, c3 = LatentCache(1, R, dr), LatentCache(1, R, dr)
        got = LAYER(x, lw, c2, 0, cfg)
        assert lw._c_layer is not second
        np.testing.assert_array_equal(got, M.decode_layer(x, lw, c3, 0, cfg))
    finally:
        K.set_backend(prev)
        K.set_act_quant(prev_act)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("simd_level", C_LEVELS, indirect=True)
def test_c_rms_norm_is_the_numba_twin(simd_level):
    """pk_rms_norm / pk_add_rms_norm (what pk_decode_layer normalises with) == the Numba twins bit for bit, and
    == ops.rms_norm / add_rms_norm to rounding (odd widths, large and tiny rows)."""
    from pykimi.kernels import c
    nb = probe.numba_module()
    rng = np.random.default_rng(96)
    p = c.ffi.from_buffer
    for rows, d in ((1, 2048), (3, 33), (2, 1), (5, 70)):
        x = (rng.standard_normal((rows, d)) * rng.choice([1e-3, 1.0, 3e3], (rows, 1))).astype(np.float32)
        a = rng.standard_normal((rows, d)).astype(np.float32)
        w = rng.uniform(0.5, 1.5, d).astype(np.float32)
        out, xo, out2 = (np.empty((rows, d), np.float32) for _ in range(3))
        c.lib.pk_rms_norm(p("float[]", x), rows, d, p("float[]", w), 1e-5, p("float[]", out))
        c.lib.pk_add_rms_norm(p("float[]", x), p("float[]", a), rows, d, p("float[]", w), 1e-6, p("float[]", xo),
                              p("float[]", out2))
        where = f"rows={rows} d={d}"
        if nb is not None:
            want = np.empty_like(out)
            nb.rms_norm(x, w, 1e-5, want)
            np.testing.assert_array_equal(out, want, err_msg=f"{where}: rms_norm vs Numba")
            wx, wo = np.empty_like(out), np.empty_like(out)
            nb.add_rms_norm(x, a, w, 1e-6, wx, wo)
            np.testing.assert_array_equal(xo, wx, err_msg=f"{where}: add_rms_norm x + a vs Numba")
            np.testing.assert_array_equal(out2, wo, err_msg=f"{where}: add_rms_norm vs Numba")
        np.testing.assert_allclose(out, ops.rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-30, err_msg=where)
        wx, wo = ops.add_rms_norm(x, a, w, 1e-6)
        np.testing.assert_array_equal(xo, wx, err_msg=where)
        np.testing.assert_allclose(out2, wo, rtol=2e-6, atol=1e-30, err_msg=where)


@pytest.mark.skipif("c" not in AVAILABLE, reason="C extension not built")
@pytest.mark.parametrize("form", ["BF16", "q4"])
def test_decode_layers_stack_matches_layer_by_layer(form):
    """pk_decode_layers (the whole stack of a decode token in one call) == decode_layer after decode_layer bit
    for bit, the cache rows too, while experts are first chosen in the middle of the stack (the call stops at
    that layer, its FFN is finished in Python, the call resumes) and after; each cache row committed once."""
    from pykimi import model as M
    from pykimi.cache import LatentCache
    prev = K.backend()
    K.set_backend("c")
    STACK = K.fast(M.decode_layers)
    try:
        rng = np.random.default_rng(97)
        D, H, dn, dr, dv, R = 72, 3, 16, 8, 12, 40
        lws, cfg = [], None
        for i, E in enumerate((0, 16, 16, 0, 16)):
            lw, cfg_i, _, _ = _layer_case(rng, form, D, H, dn, dr, dv, R, 0, E)
            lw.layer = i
            lws.append(lw)
            cfg = cfg_i if E else cfg or cfg_i
        a, b = LatentCache(len(lws), R, dr, capacity=1), LatentCache(len(lws), R, dr, capacity=1)
        for step in range(6):
            x = (rng.standard_normal((1, D)) * 2).astype(np.float32)
            got = STACK(x, lws, a, step, cfg)
            want = M.decode_layers(x, lws, b, step, cfg)
            diff = np.flatnonzero(got != want)
            assert diff.size == 0, f"{form} step {step}: {diff.size} outputs differ, first at {diff[0]}"
            for i in range(len(lws)):
                assert a.seq_len(i) == step + 1, f"step {step}: layer {i} holds {a.seq_len(i)} rows"
                np.testing.assert_array_equal(a.rows(i), b.rows(i), err_msg=f"{form} step {step}: layer {i} rows")
            assert all(getattr(lw, "_c_layer", None) is not None for lw in lws)
    finally:
        K.set_backend(prev)
