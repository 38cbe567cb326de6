"""The int16 batch kernels for Q8_32 weights x int16 activations (the default mode "q4"'s Q8): csrc PK_VW_KERNEL
(vpdpwssd) at the AVX-512 level and its vpmaddwd twin PK_AW_KERNEL (avx2w_rows) at the AVX2 level, each against the
twin ref.matmul_act16_q8 (the same int16 codes, exact integer block dots, f32 sums in another order) and the int16 row
kernel it replaces, the integer block dots exact at the extremes, the rows past the last vector (16 / 8 rows) on the
row kernel (csrc vnni16_split / avx2w_split), the switch (c.set_vnni16_batch / PYKIMI_VNNI16_BATCH) giving the old
paths, matmul_many with mixed jobs, plan() per mode / n / SIMD level, the plans of a forced AVX2 level, and a prefill
of the int8 golden checkpoint with the kernel on and off. The level-parametrized tests skip a level the CPU (or the
build) cannot run."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pykimi.kernels as K
from pykimi.kernels import linear, ref
from pykimi.quant import quantize_q4, quantize_q8

from conftest import bound_err, c_kernel_on, check_mixed_jobs, check_prefill_switch, on_and_off

C_OK = K.backends()["c"]["available"]
if C_OK:
    from pykimi.kernels import c

LEVELS = c.simd_levels() if C_OK else []
needs_avx512 = pytest.mark.skipif("avx512" not in LEVELS, reason="needs the C backend at the AVX-512 level")

MIN = linear.C_VNNI16_MIN["q8_32"]
MIN2 = linear.C_VNNI16_MIN_AVX2["q8_32"]
MINS = {"avx512": MIN, "avx2": MIN2}      # the kernel's first row count, per level
REM = 5        # csrc PK_VNNI16_REM: past 16 rows, fewer than this past the last multiple of 16 run the row kernel
REM2 = 5       # csrc PK_AVX2W_REM: the same past 8 rows and their multiples at the AVX2 level
TOL = 1e-6     # of max row sum |x| * max |w|: the row kernels' tolerance (tests/test_kernels.py, test_vnni_batch)
# below / at the minimum, one vector and its edges, the remainder split (16 + 1..4 on the row kernel, 16 + 5 padded),
# two / three vectors, 49..64 (two passes of <= 32), several groups of 64; AVX2: vectors of 8 rows, the rows past them
# on the row kernel below REM2 (8 + 1..4) or padded (8 + 5..7), row counts not multiples of 8 across groups of 64
NS = tuple(sorted({1, MIN - 1, MIN, MIN2 - 1, MIN2, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 22, 23, 24, 31,
                   32, 33, 36, 37, 38, 47, 48, 49, 53, 54, 63, 64, 65, 70, 71, 72, 79, 81, 100, 130}))
# `in` not a multiple of 32 (a partial last block) nor even, one element, real widths; `out` not a multiple of the
# 10 / 6 / 4 (AVX2: PK_AW_R) weight rows of a block (nor of 4 blocks: the result buffer)
SHAPES = ((13, 37), (37, 301), (70, 2048), (9, 1407), (1, 16), (17, 1), (33, 3), (23, 65), (41, 130), (11, 2047))


def nbatch(n: int, level: str) -> int:
    """Rows the batch kernel takes (csrc vnni16_split / avx2w_split); the rest run the row kernel."""
    if level == "avx2":
        return n if n < 8 or n % 8 >= REM2 else n - n % 8
    return n if n < 16 or n % 16 >= REM else n - n % 16


@pytest.fixture(params=["avx512", "avx2"])
def v16(request):
    """The C backend at the AVX-512 level (PK_VW_KERNEL) or the AVX2 level (PK_AW_KERNEL), the int16 batch kernel on,
    AMX off; restored afterwards. The level is v16.level."""
    if request.param not in LEVELS:
        pytest.skip(f"needs the C backend at the {request.param} level")
    c.level = request.param
    yield from c_kernel_on(request.param, c.set_vnni16_batch)


def q8w(cc, x, W):
    return cc.matmul_q8w(x, W.q, W.scales)


# ------------------------------------------------------------------------------------------------ the kernel
def test_kernel_matches_twin_and_row_kernel(v16):
    """pk_matmul_q8w with the batch kernel == ref.matmul_act16_q8 within TOL, and == the row kernel (switch off)
    within TOL: bit for bit below the minimum, and for the rows past the last vector of 16 that the split leaves
    to the row kernel; the batch rows differ (the kernel ran)."""
    rng = np.random.default_rng(61)
    lmin = MINS[v16.level]
    assert v16.vnni16_min() == lmin
    for out_f, in_f in SHAPES:
        W = quantize_q8(rng.standard_normal((out_f, in_f)).astype(np.float32))
        wf = W.f32()
        for n in NS:
            x = (rng.standard_normal((n, in_f)) * 3).astype(np.float32)
            y, rows = on_and_off(v16.set_vnni16_batch, lambda: q8w(v16, x, W))
            err = bound_err(y, ref.matmul_act16_q8(x, W), x, wf)
            assert err < TOL, f"[{out_f}, {in_f}] n={n}: {err:.2e} vs the twin"
            if n < lmin:
                np.testing.assert_array_equal(y, rows, err_msg=f"[{out_f}, {in_f}] n={n} below the min")
                continue
            assert bound_err(y, rows, x, wf) < TOL, f"[{out_f}, {in_f}] n={n} vs the row kernel"
            nbt = nbatch(n, v16.level)
            np.testing.assert_array_equal(y[nbt:], rows[nbt:], err_msg=f"[{out_f}, {in_f}] n={n}: the rest")
            if in_f >= 64:
                assert not np.array_equal(y[:nbt], rows[:nbt]), f"[{out_f}, {in_f}] n={n}: did the kernel run?"


def test_integer_block_dots_exact(v16):
    """Activation scales of exactly 1 (max |x| = 32767 in every block) and weight scales of 1: y == the int64 product
    bit for bit wherever every partial sum is an f32 integer -- (a) the extremes of the int32 block dot: every x =
    +-32767 (one sign per row) against codes -128 everywhere (|block dot| = 32 * 128 * 32767 = 134213632, near 2^27,
    in long rows) or 127 everywhere (short rows); (b) random int8 codes (-128 included) against x whose first
    element per block is +-32767 and the rest small (|block dot| < 2^23), rows of at most 2 blocks. At the batch
    kernel's row counts, the split's remainders and several groups of 64."""
    rng = np.random.default_rng(62)
    for n in (MINS[v16.level], 8, 15, 16, 17, 22, 23, 33, 40, 64, 65, 71, 130):
        for out_f, in_f, code in ((37, 3200, -128), (9, 1001, -128), (6, 128, 127), (5, 97, 127)):
            nb = -(-in_f // 32)
            x = (32767 * rng.choice([-1, 1], (n, 1)) * np.ones((1, in_f))).astype(np.float32)
            q8 = np.full((out_f, in_f), code, np.int8)
            e = x.astype(np.int64) @ q8.astype(np.int64).T
            assert np.abs(e).max() == 32767 * abs(code) * in_f
            y = v16.matmul_q8w(x, q8, np.ones((out_f, nb), np.float32))
            np.testing.assert_array_equal(y, e.astype(np.float32), err_msg=f"extreme {code} [{out_f}, {in_f}] n={n}")
        for out_f, in_f in ((37, 64), (16, 33), (9, 1), (13, 50), (6, 32)):
            nb = -(-in_f // 32)
            x = rng.integers(-255, 256, (n, in_f)).astype(np.float32)
            x[:, ::32] = 32767 * rng.choice([-1, 1], (n, nb))
            q8 = rng.integers(-128, 128, (out_f, in_f), dtype=np.int8)
            q8[:, ::7] = -128
            e = x.astype(np.int64) @ q8.astype(np.int64).T
            assert np.abs(e).max() < 2 ** 24
            y = v16.matmul_q8w(x, q8, np.ones((out_f, nb), np.float32))
            np.testing.assert_array_equal(y, e.astype(np.float32), err_msg=f"random [{out_f}, {in_f}] n={n}")


def test_switch_and_levels(v16, act_mode):
    """Switched off, int16-activation products are the row kernel's at every n and the plans are the old ones
    (AVX-512: the row kernel, the exact f32 batch kernel for C_BATCH_ROWS_Q8, then the tiles; AVX2: the row kernel to
    SMALL_N_ACT, then the tiles); on, ("c", "i16") at every n. The C minima agree with linear.C_VNNI16_MIN /
    C_VNNI16_MIN_AVX2 per level; at the scalar level the kernel never runs (get_vnni16_batch() False, vnni16_min()
    -1) and the plans do not change."""
    act_mode("q4")
    for lv in ("avx512", "avx2"):
        if lv in LEVELS:
            v16.set_simd(lv)
            assert v16.vnni16_min() == MINS[lv] and v16.get_vnni16_batch(), lv
    v16.set_simd(v16.level)
    rng = np.random.default_rng(63)
    W = quantize_q8(rng.standard_normal((29, 301)).astype(np.float32))
    x = rng.standard_normal((70, 301)).astype(np.float32)
    on = q8w(v16, x, W)
    v16.set_vnni16_batch(False)
    assert not v16.get_vnni16_batch()
    off = q8w(v16, x, W)
    (rows,) = v16.matmul_many([(x, "q8_32", W.q, W.scales, "i16")], rows=True)
    np.testing.assert_array_equal(off, rows)
    assert not np.array_equal(on, off)
    lo, hi = linear.C_BATCH_ROWS_Q8
    small = linear.SMALL_N_ACT[("q8_32", "i16")]
    for n in (1, MIN2, MIN, lo - 1, lo, 64, small, small + 1, hi, hi + 1, 512):
        if v16.level == "avx512":
            want = ("c", "i16") if n < lo else ("c", "f32") if n <= hi else ("tiles", "f32")
        else:
            want = ("c", "i16") if n <= small else ("tiles", "f32")
        assert linear.plan("q8_32", n) == want, n
    v16.set_vnni16_batch(True)
    assert all(linear.plan("q8_32", n) == ("c", "i16") for n in (1, MIN2, MIN, lo, 64, small + 1, hi + 1, 512, 4096))
    if "scalar" in LEVELS:
        v16.set_simd("scalar")
        assert not v16.get_vnni16_batch() and v16.vnni16_min() == -1
        plans = [linear.plan(k, n) for k in ("q8_32", "q4_32") for n in (1, MIN, 24, 64, 113, 512)]
        v16.set_vnni16_batch(False)
        assert plans == [linear.plan(k, n) for k in ("q8_32", "q4_32") for n in (1, MIN, 24, 64, 113, 512)]
        v16.set_vnni16_batch(True)
        assert bound_err(q8w(v16, x, W), ref.matmul_act16_q8(x, W), x, W.f32()) < TOL
    v16.set_simd(v16.level)


def test_in_matmul_many_mixed_jobs(v16):
    """int16 batch jobs (with and without a remainder, several groups) in one pk_matmul_many call with int16 jobs
    below the minimum, int8 (VNNI batch and row), exact f32 and bf16 jobs: each == its single call bit for bit,
    == its twin; the int16 jobs asked for the row kernels (rows=True) == the row kernel (switch off) bit for bit."""
    spec = ((MIN, 37, 301, "q8_32", "i16"), (5, 20, 64, "q8_32", "i16"), (200, 70, 2048, "q8_32", "i16"),
            (17, 9, 33, "q8_32", "i16"), (65, 13, 1407, "q8_32", "i16"), (40, 11, 97, "q8_32", "i8"),
            (30, 17, 96, "q8_32", "f32"), (12, 21, 70, "bf16", "f32"), (64, 23, 65, "q8_32", "i16"),
            (3, 19, 130, "q8_32", "i8"), (48, 31, 1, "q8_32", "i16"), (20, 27, 200, "q4_32", "i8"),
            (38, 14, 99, "q8_32", "i16"), (MIN2, 12, 100, "q8_32", "i16"), (15, 10, 250, "q8_32", "i16"),
            (MIN2 - 1, 8, 40, "q8_32", "i16"), (8, 16, 64, "q8_32", "i8"))
    lmin = MINS[v16.level]
    check_mixed_jobs(v16, spec, 64, lambda jobs: [j for j in jobs if j[4] == "i16" and j[0].shape[0] >= lmin],
                     v16.set_vnni16_batch)


# ----------------------------------------------------------------------------------------- plan / reference
def test_plan_per_mode_and_n(v16, act_mode):
    """plan(kind, n), kernel on against off, at the AVX-512 and the AVX2 level: Q8_32 in "q4" takes ("c", "i16") at
    every n (no exact f32 batch kernel, no widened tiles); Q8_32 in "all" / "none" and Q4_32 in every mode as before.
    matmul and matmul_many == reference(), reference() == ref.matmul_act16_q8 where the mode is i16."""
    rng = np.random.default_rng(65)
    w = rng.standard_normal((45, 70)).astype(np.float32)
    ns = (1, 2, MIN2 - 1, MIN2, MIN - 1, MIN, 16, 17, 23, 24, 48, 64, 96, 97, 112, 113, 200, 512, 1000)
    for kind, W in (("q8_32", quantize_q8(w)), ("q4_32", quantize_q4(w))):
        for mode in ("q4", "all", "none"):
            act_mode(mode)
            v16.set_vnni16_batch(False)
            old = [linear.plan(kind, n) for n in ns]
            v16.set_vnni16_batch(True)
            new = [linear.plan(kind, n) for n in ns]
            uses = kind == "q8_32" and mode == "q4"
            assert new == ([("c", "i16")] * len(ns) if uses else old), (kind, mode, new)
            xs = []
            for n in (1, 5, MIN2, MIN, 17, 64, 200):
                x = rng.standard_normal((n, 70)).astype(np.float32)
                xs.append(x)
                y, r = K.matmul(x, W), K.reference(x, W)
                if uses:
                    np.testing.assert_array_equal(r, ref.matmul_act16_q8(x, W))
                assert bound_err(y, r, x, W.f32()) < TOL, f"{kind} {mode} n={n}: matmul vs reference"
            for x, y in zip(xs, K.matmul_many(xs, [W] * len(xs))):
                assert bound_err(y, K.reference(x, W), x, W.f32()) < TOL, f"{kind} {mode} matmul_many n={x.shape[0]}"


def _env(**kw):
    e = {k: v for k, v in os.environ.items()
         if k not in ("PYKIMI_SIMD", "PYKIMI_ACT_QUANT", "PYKIMI_VNNI_BATCH", "PYKIMI_VNNI16_BATCH", "PYKIMI_AMX")}
    return dict(e, PYKIMI_AMX="0", **kw)


@pytest.mark.skipif("avx2" not in LEVELS, reason="needs the C backend at the AVX2 level")
def test_forced_avx2_plans():
    """PYKIMI_SIMD=avx2 in a fresh process: the kernel on (get_vnni16_batch() True, vnni16_min() C_VNNI16_MIN_AVX2),
    the default mode's Q8_32 in C with int16 activations at every n; with PYKIMI_VNNI16_BATCH=0 the old plans (the row
    kernel to SMALL_N_ACT, then the tiles)."""
    code = ("import pykimi.kernels as K; from pykimi.kernels import c, linear; K.set_backend('c'); "
            "print(c.get_vnni16_batch(), c.vnni16_min(), [linear.plan('q8_32', n) for n in (8, 64, 96, 97, 200)])")
    wants = {"1": f"True {MIN2} [" + ", ".join(["('c', 'i16')"] * 5) + "]",
             "0": f"False {MIN2} [('c', 'i16'), ('c', 'i16'), ('c', 'i16'), ('tiles', 'f32'), ('tiles', 'f32')]"}
    for on, want in wants.items():
        got = subprocess.run([sys.executable, "-c", code], env=_env(PYKIMI_SIMD="avx2", PYKIMI_VNNI16_BATCH=on),
                             capture_output=True, text=True)
        assert got.stdout.strip() == want, f"{on}: {got.stdout!r} {got.stderr[-500:]}"


@pytest.mark.parametrize("level", ["avx512", "avx2"])
def test_env_switch_and_info(level):
    """PYKIMI_VNNI16_BATCH=0 turns the kernel off at start-up (Q8_32 in the default mode then takes its old path at
    200 rows: the widened tiles); info() reports it; PYKIMI_VNNI_BATCH=0 (the int8 kernels' switch) leaves it on. At
    the AVX-512 level and at a forced AVX2 level."""
    if level not in LEVELS:
        pytest.skip(f"needs the C backend at the {level} level")
    code = ("from pykimi.kernels import c, linear; import pykimi.kernels as K; K.set_backend('c'); "
            "print(c.get_vnni16_batch(), c.info()['vnni16_batch'], linear.plan('q8_32', 200))")
    on = "True True ('c', 'i16')"
    for env, want in (({"PYKIMI_VNNI16_BATCH": "0"}, "False False ('tiles', 'f32')"), ({}, on),
                      ({"PYKIMI_VNNI_BATCH": "0"}, on)):
        out = subprocess.run([sys.executable, "-c", code], env=_env(PYKIMI_SIMD=level, **env), capture_output=True,
                             text=True)
        assert out.stdout.strip() == want, f"{env}: {out.stdout!r} {out.stderr[-500:]}"


# ------------------------------------------------------------------------------------ prefill, end to end
# The kernel changes only the f32 summation order of the scaled block dots (the same int16 codes, the same exact
# integer dots): per product ~1e-7 of max |y| against the row kernel. Through a whole prefill that grows more than
# the int8 kernel's (test_vnni_batch: 2e-7) because the next layer's int16 quantization is a step function: an input
# moved by ~1e-7 now and then lands on the other side of a rounding boundary, one code step = 2^-15 of its block's
# max (measured on the golden checkpoint repacked to int8, text_only: layer 0 o_proj input 1.8e-7 apart, its output
# 3.5e-6, the rest of the model ~3e-5 to 1e-4 per product, all tokens from the third on). Logits against the row kernel
# at every n: 7.3e-5 (text_only, 55 tokens) / 4.8e-5 (two_images, 116) of max |logit|; bound PREFILL_BOUND = 1e-4,
# the greedy ids the same. Against the old path (the exact f32 batch kernel for 24..112 rows) the error against the
# bf16 goldens (dominated by the int8 weights) is the same to 3 digits (0.24 / 0.211): asserted within GOLDEN_SLACK.
PREFILL_BOUND = 1e-4
GOLDEN_SLACK = 0.01


@pytest.fixture(scope="module")
def q8_all(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import TINY
    from pykimi.quant import quantize_checkpoint
    out = str(tmp_path_factory.mktemp("vnni16") / "q8-all")
    quantize_checkpoint(TINY, out, bits=8, what="all", progress=False)
    return out


@pytest.mark.parametrize("case", ["text_only", "two_images"])
def test_prefill_on_vs_row_kernel(v16, act_mode, q8_all, case, monkeypatch):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_model_golden import case_data
    from pykimi.model import load
    act_mode("q4")
    model = load(q8_all)
    S = int(case_data(case)[0]["input_ids"].shape[0])
    assert S >= MINS[v16.level] and linear.plan("q8_32", S) == ("c", "i16")
    check_prefill_switch(model, case, v16.set_vnni16_batch,
                         {"SMALL_N_ACT": {**linear.SMALL_N_ACT, ("q8_32", "i16"): 1 << 62},
                          "C_BATCH_ROWS_Q8": (1 << 62, 1 << 62)},
                         f"q8 q4 {case}", PREFILL_BOUND, GOLDEN_SLACK, monkeypatch,
                         plan_check=lambda: linear.plan("q8_32", S) == ("c", "i16") or pytest.fail("plan"))
