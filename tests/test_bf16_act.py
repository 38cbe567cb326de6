"""bf16 activations for bf16 weights (PYKIMI_ACT_QUANT=all): the AVX512_BF16 kernel pk_matmul_bf16a against its
twin ref.matmul_act_bf16 (x rounded to bf16, then the f32 product), the rounding itself bit for bit, denormal
activations, plan() / reference() per mode, n and SIMD level, the default modes unchanged, and a prefill of
the bf16 golden checkpoint within a stated bound of the goldens. Kernel tests skip where the CPU (or the build)
has no AVX512_BF16."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pykimi.kernels as K
from pykimi.kernels import linear, ref
from pykimi.quant import quantize_q8
from pykimi.weights import Stored, f32_to_bf16

from conftest import bound_err, c_kernel_on, on_and_off

C_OK = K.backends()["c"]["available"]
if C_OK:
    from pykimi.kernels import c

NS = (8, 9, 12, 13, 16, 40, 64, 65, 200, 512)
# odd and even `in` (one element, one pair, partial 32-element packing blocks, real widths), `out` not a multiple
# of the 16 / 8 / 6 / 4 weight rows a block
SHAPES = ((13, 37), (37, 300), (70, 2048), (9, 1407), (1, 16), (17, 1), (33, 2), (23, 65))


def _has_bf16dp() -> bool:
    if not C_OK or "avx512" not in c.simd_levels():
        return False
    c.set_simd("avx512")
    try:
        return bool(c.lib.pk_avx512bf16_available())
    finally:
        c.set_simd(None)


HAS = _has_bf16dp()
needs_bf16dp = pytest.mark.skipif(not HAS, reason="needs the C backend at the AVX-512 level with AVX512_BF16")


@pytest.fixture
def bf16dp():
    """The C backend at the AVX-512 level with the AVX512_BF16 kernel on (and AMX off: AMX keeps bf16 exact)."""
    yield from c_kernel_on("avx512", c.set_avx512bf16)


# ------------------------------------------------------------------------------------------------ the twin
def test_round_bf16_is_round_to_nearest_even():
    """ref.round_bf16 on hand-made cases: ties go to the even bf16 (down from 1 + 2^-8, up from 1 + 3 * 2^-8),
    above a tie up, rounding can carry into the exponent, sign symmetry, inf / NaN kept, past the largest
    bf16 -> inf; the result is always a bf16 value (low 16 bits zero)."""
    e = np.float32(2.0 ** -8)
    x = np.array([1 + e, 1 + 3 * e, 1 + e * 1.5, 2 - 2.0 ** -23, -(1 + e), -(1 + 3 * e), np.inf, -np.inf,
                  3.4e38, 0.0, -0.0, 1.0], np.float32)
    want = np.array([1.0, 1 + 4 * e, 1 + 2 * e, 2.0, -1.0, -(1 + 4 * e), np.inf, -np.inf, np.inf, 0.0, -0.0, 1.0],
                    np.float32)
    got = ref.round_bf16(x)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.isnan(ref.round_bf16(np.array([np.nan], np.float32)))[0]
    r = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 100
    rb = ref.round_bf16(r)
    assert not np.any(rb.view(np.uint32) & 0xFFFF)
    assert np.max(np.abs(rb - r) / np.abs(r)) <= 2.0 ** -8          # half a step of 8 significant bits


# ------------------------------------------------------------------------------------------------ the kernel
@needs_bf16dp
def test_bf16a_kernel_matches_twin(bf16dp):
    """pk_matmul_bf16a == ref.matmul_act_bf16 up to f32 summation order, odd / even `in`, every group split of
    the rows of x (one to four vectors of 16, several groups of 64), `out` not a multiple of the row block;
    and it is NOT the exact product (the rounding is there: error vs x @ W.T well above the twin's)."""
    rng = np.random.default_rng(7)
    for out_f, in_f in SHAPES:
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        bits = f32_to_bf16(w)
        wf = ref.bf16_to_f32(bits)
        W = Stored("w", "BF16", bits)
        for n in NS:
            x = rng.standard_normal((n, in_f)).astype(np.float32)
            y = bf16dp.matmul_bf16a(x, bits)
            r = ref.matmul_act_bf16(x, W)
            err = bound_err(y, r, ref.round_bf16(x), wf)
            assert err < 2e-6, f"[{out_f}, {in_f}] n={n}: {err:.2e} vs ref.matmul_act_bf16"
            if in_f >= 16:
                exact = bound_err(y, x @ wf.T, x, wf)
                assert exact > 10 * err + 1e-6, f"[{out_f}, {in_f}] n={n}: x was not rounded ({exact:.2e})"


@needs_bf16dp
def test_bf16a_rounding_bit_exact(bf16dp):
    """With W = the identity in bf16 every output is one product bf16(x) * 1 plus zeros: the kernel's rounding
    (vcvtne2ps2bf16) == ref.round_bf16 bit for bit, ties and carries included, odd `in`."""
    rng = np.random.default_rng(8)
    for in_f in (31, 33, 64):
        bits = f32_to_bf16(np.eye(in_f, dtype=np.float32))
        x = (rng.standard_normal((40, in_f)) * 10.0 ** rng.integers(-30, 30, (40, 1))).astype(np.float32)
        e = np.float32(2.0 ** -8)
        x[0, :4] = [1 + e, 1 + 3 * e, -(1 + e), 2 - 2.0 ** -23]        # ties to even, carry into the exponent
        y = bf16dp.matmul_bf16a(x, bits)
        np.testing.assert_array_equal(y.view(np.uint32), ref.round_bf16(x).view(np.uint32),
                                      err_msg=f"in={in_f}")


@needs_bf16dp
def test_bf16a_denormal_activations(bf16dp):
    """vdpbf16ps takes denormal inputs as 0 and flushes denormal sums (DAZ / FTZ): activations in the denormal
    range give finite results within 2^-126 * in * max|w| of the twin (no garbage), tiny normal ones still
    count, and mixed with ordinary activations the twin's tolerance holds."""
    rng = np.random.default_rng(9)
    out_f, in_f, n = 21, 301, 40
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    bits = f32_to_bf16(w)
    W = Stored("w", "BF16", bits)
    wf = ref.bf16_to_f32(bits)
    bound = 2.0 ** -126 * in_f * np.abs(wf).max()
    for scale in (1e-39, 1e-42, 2.0 ** -130):                         # f32 denormals
        x = (rng.standard_normal((n, in_f)) * scale).astype(np.float32)
        y = bf16dp.matmul_bf16a(x, bits)
        assert np.all(np.isfinite(y)), f"scale {scale}: non-finite output"
        assert np.max(np.abs(y - ref.matmul_act_bf16(x, W))) <= bound, f"scale {scale}: {np.abs(y).max():.3g}"
    x = (rng.standard_normal((n, in_f)) * 1e-30).astype(np.float32)  # tiny but normal: products ~1e-30
    y = bf16dp.matmul_bf16a(x, bits)
    r = ref.matmul_act_bf16(x, W)
    assert np.abs(y).max() > 0 and bound_err(y, r, ref.round_bf16(x), wf) < 2e-6
    x = rng.standard_normal((n, in_f)).astype(np.float32)
    x[:, ::3] *= np.float32(1e-40)                                    # a third denormal
    y = bf16dp.matmul_bf16a(x, bits)
    assert bound_err(y, ref.matmul_act_bf16(x, W), ref.round_bf16(x), wf) < 2e-6


@needs_bf16dp
def test_bf16a_exact_where_it_does_not_run(bf16dp):
    """pk_matmul_bf16a is pk_matmul_bf16 bit for bit below C_BF16A_MIN (8) rows, with the kernel switched off
    (set_avx512bf16(False)), and at the lower SIMD levels."""
    rng = np.random.default_rng(10)
    w = rng.standard_normal((37, 301)).astype(np.float32)
    bits = f32_to_bf16(w)
    for n in (1, 5, linear.C_BF16A_MIN - 1):
        x = rng.standard_normal((n, 301)).astype(np.float32)
        np.testing.assert_array_equal(bf16dp.matmul_bf16a(x, bits), bf16dp.matmul_bf16(x, bits), err_msg=f"n={n}")
    x = rng.standard_normal((40, 301)).astype(np.float32)
    assert not bf16dp.set_avx512bf16(False)
    np.testing.assert_array_equal(bf16dp.matmul_bf16a(x, bits), bf16dp.matmul_bf16(x, bits), err_msg="switched off")
    bf16dp.set_avx512bf16(True)
    for lv in ("scalar", "avx2"):
        bf16dp.set_simd(lv)
        np.testing.assert_array_equal(bf16dp.matmul_bf16a(x, bits), bf16dp.matmul_bf16(x, bits), err_msg=lv)
    bf16dp.set_simd("avx512")


@needs_bf16dp
def test_bf16a_in_matmul_many(bf16dp):
    """bf16-activation jobs inside one pk_matmul_many call with exact bf16, int8-activation Q8 and short bf16
    jobs: each == its single call == its twin."""
    rng = np.random.default_rng(11)
    jobs, twins = [], []
    for n, out_f, in_f, act in ((40, 37, 301, "bf16"), (5, 20, 64, "bf16"), (200, 70, 2048, "bf16"),
                                (16, 9, 33, "f32"), (65, 13, 1407, "bf16")):
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        x = rng.standard_normal((n, in_f)).astype(np.float32)
        W = Stored("w", "BF16", f32_to_bf16(w))
        jobs.append((x, "bf16", W.data, None, act))
        twins.append(ref.matmul_act_bf16(x, W) if act == "bf16" and n >= linear.C_BF16A_MIN else ref.matmul(x, W))
    q8 = quantize_q8(rng.standard_normal((11, 96)).astype(np.float32))
    xq = rng.standard_normal((3, 96)).astype(np.float32)
    jobs.append((xq, "q8_32", q8.q, q8.scales, "i8"))
    twins.append(ref.matmul_act_q8(xq, q8))
    ys = bf16dp.matmul_many(jobs)
    for k, (job, twin, y) in enumerate(zip(jobs, twins, ys)):
        np.testing.assert_array_equal(y, bf16dp.matmul_many([job])[0], err_msg=f"job {k}")
        err = float(np.max(np.abs(y - twin)) / np.abs(twin).max())
        assert err < 2e-5, f"job {k} ({job[1]}/{job[4]}, n={job[0].shape[0]}): {err:.2e}"


# ----------------------------------------------------------------------------------------- plan / reference
@needs_bf16dp
def test_plan_per_mode_n_and_level(bf16dp, act_mode):
    """plan("bf16", n): with "all", ("c", "bf16") from C_BF16A_MIN rows, however many (no widened tiles), ("c", "f32")
    below; "q4" / "none" as without the new kernel; at the AVX2 / scalar level or with the kernel off, "all"
    is "q4"'s plan. The row kernels' mode (_act_mode, what decode and the fused calls use) stays f32.
    matmul and matmul_many == reference() for each n, reference() == ref.matmul_act_bf16 exactly where the
    mode is bf16."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((45, 70)).astype(np.float32)
    W = Stored("w", "BF16", f32_to_bf16(w))
    ns = (1, 2, 7, 8, 11, 12, 13, 64, 112, 113, 200, 512, 1000)
    plans = {}
    for mode in ("q4", "none"):
        act_mode(mode)
        plans[mode] = [linear.plan("bf16", n) for n in ns]
        assert all(m == "f32" for _, m in plans[mode]), plans[mode]
        assert plans[mode] == [("c" if n <= K.SMALL_N_ACT[("bf16", "f32")] else "tiles", "f32") for n in ns]
    assert plans["q4"] == plans["none"]
    act_mode("all")
    assert linear._act_mode("bf16") == "f32"
    got = [linear.plan("bf16", n) for n in ns]
    assert got == [("c", "bf16" if n >= linear.C_BF16A_MIN else "f32") for n in ns], got
    xs = []
    for n in ns:
        x = rng.standard_normal((n, 70)).astype(np.float32)
        xs.append(x)
        y, r = K.matmul(x, W), K.reference(x, W)
        if n >= linear.C_BF16A_MIN:
            np.testing.assert_array_equal(r, ref.matmul_act_bf16(x, W))
        assert bound_err(y, r, x, w) < 2e-6, f"n={n}: matmul vs reference"
    for x, y in zip(xs, K.matmul_many(xs, [W] * len(xs))):
        assert bound_err(y, K.reference(x, W), x, w) < 2e-6, f"matmul_many n={x.shape[0]}"
    bf16dp.set_avx512bf16(False)
    assert [linear.plan("bf16", n) for n in ns] == plans["q4"]
    bf16dp.set_avx512bf16(True)
    for lv in ("avx2", "scalar"):
        bf16dp.set_simd(lv)
        act_mode("all")
        all_plan = [linear.plan("bf16", n) for n in ns]
        act_mode("q4")
        assert all_plan == [linear.plan("bf16", n) for n in ns], lv
    bf16dp.set_simd("avx512")


@pytest.mark.skipif(not C_OK, reason="C extension not built")
def test_default_modes_unchanged(act_mode):
    """The default ("q4") and "none": bf16 products are the exact f32 product whatever the new kernel's switch,
    bit for bit the same with it on and off, at every n."""
    prev = K.backend()
    K.set_backend("c")
    rng = np.random.default_rng(13)
    w = rng.standard_normal((37, 300)).astype(np.float32)
    W = Stored("w", "BF16", f32_to_bf16(w))
    try:
        for mode in ("q4", "none"):
            act_mode(mode)
            for n in (1, 12, 40, 112, 200):
                x = rng.standard_normal((n, 300)).astype(np.float32)
                on, off = on_and_off(c.set_avx512bf16, lambda: K.matmul(x, W))
                np.testing.assert_array_equal(on, off, err_msg=f"{mode} n={n}")
                assert bound_err(on, ref.matmul(x, W), x, w) < 2e-6
    finally:
        c.set_avx512bf16(True)
        K.set_backend(prev)


@pytest.mark.skipif(not C_OK, reason="C extension not built")
def test_env_switch_and_info():
    """PYKIMI_AVX512BF16=0 turns the kernel off at start-up; PYKIMI_ACT_QUANT=all picks the bf16 mode for a
    batch where the kernel runs; info() reports it."""
    code = ("from pykimi.kernels import c, linear; import pykimi.kernels as K; K.set_backend('c'); "
            "print(c.get_avx512bf16(), c.info()['avx512bf16'], linear.plan('bf16', 64)[1])")
    for env, want in (({"PYKIMI_AVX512BF16": "0", "PYKIMI_ACT_QUANT": "all"}, "False False f32"),
                      ({"PYKIMI_ACT_QUANT": "all"}, f"{HAS} {HAS} {'bf16' if HAS else 'f32'}"),
                      ({}, f"{HAS} {HAS} f32")):
        e = {k: v for k, v in os.environ.items() if k not in ("PYKIMI_AVX512BF16", "PYKIMI_ACT_QUANT", "PYKIMI_SIMD",
                                                            "PYKIMI_AMX")}
        e["PYKIMI_AMX"] = "0"
        out = subprocess.run([sys.executable, "-c", code], env=dict(e, **env), capture_output=True, text=True)
        assert out.stdout.strip() == want, f"{env}: {out.stdout!r} {out.stderr[-500:]}"


# ------------------------------------------------------------------------------------ prefill, end to end
# What the mode does to a whole model: rounding x to bf16 moves each element by at most 2^-8 relative (half a
# step of 8 significant bits), and a product's error is a sum of such independent roundings, so it partly
# cancels. Measured on the bf16 golden checkpoint (3 layers, prefill of 55 / 63 / 116 tokens: every dense
# projection, the vision tower's products and the per-expert batches of >= C_BF16A_MIN tokens take bf16
# activations), against the goldens (the exact path is within 1e-6 of them): logits of positions whose routing is
# unchanged move by 2.3e-3 .. 3.1e-3 of max|logit| on average and 4.5e-3 at most (5.2e-3 with C_BF16A_MIN = 12),
# the decode steps after the prefill by 3.2e-3 at most. The bound asserted is 2^-7 = 7.8e-3 (twice the
# per-element rounding bound, 1.5x the worst measured). A re-routed position moves by O(1) and is allowed only at
# a router near-tie: measured re-routings had golden margins 2.6e-5, 2.0e-4 and 5.9e-4; NEAR_TIE = 1e-3 (the
# golden cases' margins otherwise start at 1.2e-3). The greedy ids must stay the golden ones.
BF16_ACT_BOUND = 2.0 ** -7
NEAR_TIE = 1e-3


@needs_bf16dp
def test_exact_products_and_the_vision_tower_ignore_all(bf16dp, act_mode):
    """matmul(..., exact=True) is the f32 product in every mode: under "all" it gives the bits of the default mode
    where the plain call rounds x to bf16; the vision tower (its stored matrices and the projector's, exact=True)
    encodes the same bits under "all" as by default, and differs from its f32-array form (NumPy's products) only
    by summation order."""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import TINY
    from test_vision import _load_case
    from pykimi.model import load
    from pykimi import vision
    rng = np.random.default_rng(13)
    W = Stored("w", "BF16", f32_to_bf16(rng.standard_normal((45, 70)).astype(np.float32)))
    x = rng.standard_normal((40, 70)).astype(np.float32)
    act_mode("q4")
    want = K.matmul(x, W)
    model = load(TINY)
    pv, grids, _, _ = _load_case("two_images")
    feats = model.encode_images(pv, grids)
    act_mode("all")
    assert linear.plan("bf16", 40) == ("c", "bf16")
    np.testing.assert_array_equal(K.matmul(x, W, exact=True), want)
    assert not np.array_equal(K.matmul(x, W), want)                    # the plain call rounds x to bf16 here
    np.testing.assert_array_equal(model.encode_images(pv, grids), feats)
    cached = vision.VisionTower(model.ckpt, model.config, cache_weights=True).encode(pv, grids)
    err = np.abs(cached - feats).max() / np.abs(feats).max()
    assert err < 2e-6, f"stored vs f32-array tower: {err:.2e}"


@needs_bf16dp
@pytest.mark.parametrize("case", ["text_only", "one_image", "two_images"])
def test_prefill_all_mode_within_bound(bf16dp, act_mode, case):
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import TINY
    from test_model_golden import case_data, rerouted
    from pykimi.model import load
    from pykimi.trace import Trace
    inputs, gold, _ = case_data(case)
    act_mode("all")
    model = load(TINY)
    kws = [{}]
    if "pixel_values" in inputs:
        kws = [dict(image_features=gold["multi_modal_projector"])]
        try:
            from pykimi.vision import VisionTower  # noqa: F401
            kws.append(dict(pixel_values=inputs["pixel_values"], image_grid_hws=inputs["image_grid_hws"]))
        except Exception:
            pass
    S = int(inputs["input_ids"].shape[0])
    assert linear.plan("bf16", S) == ("c", "bf16")
    scale = np.max(np.abs(gold["logits"]))
    for kw in kws:
        how = "pixels" if "pixel_values" in kw else "lm"
        with Trace(model) as t:
            logits = model.forward(inputs["input_ids"], **kw)
        flipped = rerouted(t, gold, S, NEAR_TIE, f"{case} {how}")
        keep = ~flipped
        assert keep.sum() >= S - 2, f"{case} {how}: {int(flipped.sum())} positions re-routed"
        err_pos = np.max(np.abs(logits - gold["logits"]), axis=1) / scale
        worst = int(np.argmax(np.where(keep, err_pos, -1)))
        assert err_pos[worst] <= BF16_ACT_BOUND, (f"{case} {how}: logits err {err_pos[worst]:.3g} > 2^-7 at "
                                                  f"position {worst}")
        assert err_pos[keep].max() > 1e-4, f"{case} {how}: no bf16 rounding visible -- did the mode run?"
        print(f"{case} {how}: logits err {err_pos[keep].max():.3g} (mean {err_pos[keep].mean():.3g}), "
              f"{int(flipped.sum())} re-routed at a near-tie")
    kw = kws[0]
    with Trace(model, names=["logits"]) as t2:
        ids = model.generate(inputs["input_ids"], max_new_tokens=8, stop_ids=[], **kw)
    assert ids == gold["greedy_ids"].tolist(), f"{case}: greedy ids {ids} != golden {gold['greedy_ids'].tolist()}"
    steps = np.concatenate(t2.all("logits"), axis=0)
    err = float(np.max(np.abs(steps - gold["greedy_step_logits"])) / np.max(np.abs(gold["greedy_step_logits"])))
    assert err <= BF16_ACT_BOUND, f"{case}: decode-step logits err {err:.3g} > 2^-7"
