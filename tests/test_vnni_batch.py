"""The int8 batch kernels for int8 activations (Q8_32 / Q4_32 weights): the VNNI kernel at the AVX-512 level (csrc
vnni_rows) and its vpmaddubsw twin at the AVX2 level (csrc avx2b_rows), each against the twins ref.matmul_act_q8 /
ref.matmul_act_q4 (the same int8 codes, exact integer block dots, f32 sums in another order), the integer dots bit
for bit, the row kernels they replace, matmul_many with mixed jobs, plan() per mode / n / SIMD level, the serve
engine's row-wise calls (c.ROWS), the other formats' default modes unchanged, and a prefill of the quantized
golden checkpoint with the kernel on and off. The level-parametrized tests skip a level the CPU (or the build) cannot
run: AVX-512 (which includes AVX512_VNNI), AVX2 + FMA."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pykimi.kernels as K
from pykimi.kernels import linear, ref
from pykimi.quant import quantize_q4, quantize_q8
from pykimi.weights import Stored, f32_to_bf16

from conftest import bound_err, c_kernel_on, check_mixed_jobs, check_prefill_switch, on_and_off

C_OK = K.backends()["c"]["available"]
if C_OK:
    from pykimi.kernels import c

LEVELS = c.simd_levels() if C_OK else []
needs_avx2 = pytest.mark.skipif("avx2" not in LEVELS, reason="needs the C backend at the AVX2 level")
MINS = {"avx512": linear.C_VNNI_MIN, "avx2": linear.C_VNNI_MIN_AVX2}     # the kernel's rows, per level

MIN8, MIN4 = linear.C_VNNI_MIN["q8_32"], linear.C_VNNI_MIN["q4_32"]
A8, A4 = linear.C_VNNI_MIN_AVX2["q8_32"], linear.C_VNNI_MIN_AVX2["q4_32"]
# the crossovers, one vector of 16 rows and its edges, 49..64 rows (two passes of 32), several groups of 64; AVX2:
# vectors of 8 rows, the remainder past them on the row kernels below the minimum (8 + 1..3 / 8 + 1..6) or padded
NS = tuple(sorted({MIN8 - 1, MIN8, MIN4 - 1, MIN4, A8 - 1, A8, A4 - 1, A4, 9, 11, 12, 13, 15, 16, 17, 33, 48, 49, 64,
                   65, 71, 200, 512}))
# `in` not a multiple of 32 nor of 4 (a partial last block, a partial last 4-byte group), one element, real widths;
# `out` not a multiple of the 10 / 6 / 4 weight rows of a block (nor of 4 blocks: the result buffer)
SHAPES = ((13, 37), (37, 301), (70, 2048), (9, 1407), (1, 16), (17, 1), (33, 3), (23, 65), (41, 130))
TOL = 1e-6     # of max row sum |x| * max |w|: the int8-activation kernels' tolerance in tests/test_kernels.py


@pytest.fixture(params=["avx512", "avx2"])
def vnni(request):
    """The C backend at the AVX-512 level with the VNNI batch kernel on, or at the AVX2 level with its vpmaddubsw twin
    on (AMX off: it keeps Q8 batches exact); the level is vnni.level."""
    if request.param not in LEVELS:
        pytest.skip(f"needs the C backend at the {request.param} level")
    c.level = request.param
    yield from c_kernel_on(request.param, c.set_vnni_batch)


def _kernels(cc):
    return {"q8_32": (quantize_q8, lambda x, W: cc.matmul_q8a(x, W.q, W.scales), ref.matmul_act_q8),
            "q4_32": (quantize_q4, lambda x, W: cc.matmul_q4a(x, W.q, W.scales), ref.matmul_act_q4)}


# ------------------------------------------------------------------------------------------------ the kernel
def test_kernel_matches_twins(vnni):
    """pk_matmul_q8a / q4a with the batch kernel == ref.matmul_act_q8 / _q4 within TOL for odd `in`, n across the
    crossover and several groups of 64, `out` not a multiple of the row block; and == the row kernels (kernel
    off) within TOL too, bit for bit below the crossover."""
    rng = np.random.default_rng(41)
    for kind, (quant, kern, twin) in _kernels(vnni).items():
        for out_f, in_f in SHAPES:
            w = rng.standard_normal((out_f, in_f)).astype(np.float32)
            W = quant(w)
            wf = W.f32()
            for n in NS:
                x = (rng.standard_normal((n, in_f)) * 3).astype(np.float32)
                y, rows = on_and_off(vnni.set_vnni_batch, lambda: kern(x, W))
                err = bound_err(y, twin(x, W), x, wf)
                assert err < TOL, f"{kind} [{out_f}, {in_f}] n={n}: {err:.2e} vs the twin"
                if n < vnni.vnni_min(kind):
                    np.testing.assert_array_equal(y, rows, err_msg=f"{kind} [{out_f}, {in_f}] n={n} below the min")
                else:
                    assert bound_err(y, rows, x, wf) < TOL, f"{kind} [{out_f}, {in_f}] n={n} vs the row kernels"


def test_integer_block_dots_exact(vnni):
    """With activation scales of exactly 1 (max |x| = 127 in every block) and weight scales of 1 every float step is
    exact while the sums stay below 2^24: y == the int64 product bit for bit -- Q8 codes over the whole int8 range
    (-128 too: code ^ 0x80 is code + 128 for every byte; AVX2: |-128| = 128 as the unsigned operand), Q4 nibbles 0..15
    (offset -8), at the extremes of vpmaddubsw's int16 pair sums at the AVX2 level (x = +-127 against 15 / -128)."""
    rng = np.random.default_rng(42)
    for out_f, in_f in ((37, 101), (16, 64), (9, 1), (13, 255), (6, 160), (5, 515)):
        nb = -(-in_f // 32)
        ones = np.ones((out_f, nb), np.float32)
        for n in (min(MINS[vnni.level].values()), 8, 9, 12, 16, 40, 64, 65, 130):
            x = rng.integers(-127, 128, (n, in_f)).astype(np.float32)
            x[:, ::32] = 127 * rng.choice([-1, 1], (n, nb))
            q8 = rng.integers(-128, 128, (out_f, in_f), dtype=np.int8)
            q8[:, ::7] = -128
            q4 = rng.integers(0, 256, (out_f, -(-in_f // 2)), dtype=np.uint8)
            if n == 12:           # the largest pair sums: every x = +-127 (one sign per row), codes -128 / 15
                x = (127 * rng.choice([-1, 1], (n, 1)) * np.ones((1, in_f))).astype(np.float32)
                q8[:] = -128
                q4[:] = 0xFF
            e8 = x.astype(np.int64) @ q8.astype(np.int64).T
            e4 = x.astype(np.int64) @ ref.unpack_q4(q4, in_f).astype(np.int64).T
            assert max(np.abs(e8).max(), np.abs(e4).max()) < 2 ** 24
            np.testing.assert_array_equal(vnni.matmul_q8a(x, q8, ones), e8.astype(np.float32),
                                          err_msg=f"q8 [{out_f}, {in_f}] n={n}")
            np.testing.assert_array_equal(vnni.matmul_q4a(x, q4, ones), e4.astype(np.float32),
                                          err_msg=f"q4 [{out_f}, {in_f}] n={n}")


def test_lower_levels_and_switch_unchanged(vnni):
    """At the scalar level, and with the kernel switched off, int8-activation products are the row kernels' at every
    n (get_vnni_batch() False there); the C constants agree with linear.C_VNNI_MIN / C_VNNI_MIN_AVX2 per level."""
    for lv in ("avx512", "avx2"):
        if lv in LEVELS:
            vnni.set_simd(lv)
            assert vnni.vnni_min("q8_32") == MINS[lv]["q8_32"] and vnni.vnni_min("q4_32") == MINS[lv]["q4_32"], lv
    vnni.set_simd(vnni.level)
    rng = np.random.default_rng(43)
    w = rng.standard_normal((29, 301)).astype(np.float32)
    x = rng.standard_normal((70, 301)).astype(np.float32)
    for kind, (quant, kern, twin) in _kernels(vnni).items():
        W = quant(w)
        vnni.set_vnni_batch(False)
        assert not vnni.get_vnni_batch()
        off = kern(x, W)
        vnni.set_vnni_batch(True)
        vnni.set_simd("scalar")
        assert not vnni.get_vnni_batch() and vnni.vnni_min(kind) == -1
        assert bound_err(kern(x, W), twin(x, W), x, W.f32()) < TOL, f"{kind} scalar"
        vnni.set_simd(vnni.level)
        assert vnni.get_vnni_batch()
        assert bound_err(off, twin(x, W), x, W.f32()) < TOL


def test_in_matmul_many_mixed_jobs(vnni):
    """Batch-kernel jobs in one pk_matmul_many call with row-kernel int8 jobs, int16, exact f32 and
    bf16-activation jobs: each == its single call == its twin; the same int8 jobs asked for the row kernels
    (rows=True, csrc A_ROWS) == the row kernels bit for bit."""
    spec = ((40, 37, 301, "q4_32", "i8"), (5, 20, 64, "q8_32", "i8"), (200, 70, 2048, "q8_32", "i8"),
            (16, 9, 33, "q4_32", "i8"), (65, 13, 1407, "q4_32", "i8"), (48, 11, 97, "q8_32", "i8"),
            (30, 17, 96, "q8_32", "i16"), (12, 21, 70, "bf16", "f32"), (64, 23, 65, "q8_32", "i8"),
            (20, 19, 130, "bf16", "bf16"), (MIN4, 31, 1, "q4_32", "i8"), (9, 27, 200, "q8_32", "i8"),
            (11, 14, 99, "q4_32", "i8"), (A4, 15, 64, "q4_32", "i8"), (A8, 16, 64, "q8_32", "i8"))
    bf16a = vnni.level == "avx512" and vnni.get_avx512bf16()          # else the bf16 jobs take the exact f32 product
    check_mixed_jobs(vnni, spec, 44, lambda jobs: [j for j in jobs if j[4] == "i8"
                                                   and j[0].shape[0] >= linear.C_VNNI_MIN[j[1]]],
                     vnni.set_vnni_batch, bf16_act=bf16a)


# ----------------------------------------------------------------------------------------- plan / reference
def test_plan_per_mode_n_and_level(vnni, act_mode):
    """plan(kind, n) at the AVX-512 and the AVX2 level: Q4_32 in "q4" and "all" and Q8_32 in "all" take ("c", "i8") at
    every n (from C_VNNI_MIN / C_VNNI_MIN_AVX2 the batch kernel: no widened tiles, no exact f32 batch for Q8); Q8_32
    in "q4" (int16) and "none" as before (== the plans with the kernel off); with the kernel off, and at the scalar
    level, every plan is the old one. matmul and matmul_many == reference(), reference() == the twin where the mode
    is i8."""
    rng = np.random.default_rng(45)
    w = rng.standard_normal((45, 70)).astype(np.float32)
    ns = (1, 2, 7, 8, 9, 12, 13, 23, 24, 48, 49, 64, 112, 113, 200, 512, 1000)
    for kind, W in (("q8_32", quantize_q8(w)), ("q4_32", quantize_q4(w))):
        for mode in ("q4", "all", "none"):
            act_mode(mode)
            vnni.set_vnni_batch(False)
            old = [linear.plan(kind, n) for n in ns]
            vnni.set_vnni_batch(True)
            new = [linear.plan(kind, n) for n in ns]
            uses = linear._ACT_MODES[mode][kind] == "i8"
            if uses:
                assert new == [("c", "i8")] * len(ns), (kind, mode, new)
            else:
                assert new == old, (kind, mode, new, old)
            vnni.set_simd("scalar")
            lower = [linear.plan(kind, n) for n in ns]
            vnni.set_vnni_batch(False)
            assert lower == [linear.plan(kind, n) for n in ns], (kind, mode, "scalar")
            vnni.set_vnni_batch(True)
            vnni.set_simd(vnni.level)
            xs = []
            for n in (1, 5, 9, 64, 200):
                x = rng.standard_normal((n, 70)).astype(np.float32)
                xs.append(x)
                y, r = K.matmul(x, W), K.reference(x, W)
                if uses:
                    twin = ref.matmul_act_q8 if kind == "q8_32" else ref.matmul_act_q4
                    np.testing.assert_array_equal(r, twin(x, W))
                assert bound_err(y, r, x, W.f32()) < TOL, f"{kind} {mode} n={n}: matmul vs reference"
            for x, y in zip(xs, K.matmul_many(xs, [W] * len(xs))):
                assert bound_err(y, K.reference(x, W), x, W.f32()) < TOL, f"{kind} {mode} matmul_many n={x.shape[0]}"


@needs_avx2
def test_forced_avx2_plans(act_mode):
    """PYKIMI_SIMD=avx2 in a fresh process: the plans of Q8_32 / Q4_32 per mode at the AVX2 level -- the int8 batch
    kernel (get_vnni_batch() True): int8 activations in C at every n; with PYKIMI_VNNI_BATCH=0 the old plans (int4 to
    the tiles past SMALL_N_ACT_AVX2, Q8 x int8 past SMALL_N_ACT). Q8_32 in "q4" (int16 activations) is the int16
    batch kernel's (on by default: in C at every n, whatever this switch; tests/test_vnni16.py)."""
    code = ("import pykimi.kernels as K; from pykimi.kernels import c, linear; K.set_backend('c'); "
            "print(c.get_vnni_batch(), [linear.plan(k, n) for k in ('q8_32', 'q4_32') for n in (8, 64, 65, 200)])")
    e = {k: v for k, v in os.environ.items() if k not in ("PYKIMI_SIMD", "PYKIMI_ACT_QUANT", "PYKIMI_VNNI_BATCH",
                                                          "PYKIMI_VNNI16_BATCH")}
    for mode in ("q4", "all"):
        for on in (True, False):
            env = dict(e, PYKIMI_SIMD="avx2", PYKIMI_ACT_QUANT=mode, PYKIMI_VNNI_BATCH="1" if on else "0")
            got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            q8 = "i16" if mode == "q4" else "i8"
            if on:
                want = "True [" + ", ".join([f"('c', '{q8}')"] * 4 + ["('c', 'i8')"] * 4) + "]"
            elif mode == "q4":
                want = (f"False [('c', '{q8}'), ('c', '{q8}'), ('c', '{q8}'), ('c', '{q8}'), ('c', 'i8'), "
                        f"('c', 'i8'), ('tiles', 'f32'), ('tiles', 'f32')]")
            else:             # Q8 x int8 at the AVX2 level: the row kernels up to SMALL_N_ACT (48), then the tiles
                want = ("False [('c', 'i8'), ('tiles', 'f32'), ('tiles', 'f32'), ('tiles', 'f32'), ('c', 'i8'), "
                        "('c', 'i8'), ('tiles', 'f32'), ('tiles', 'f32')]")
            assert got.stdout.strip() == want, f"{mode} {on}: {got.stdout!r} {got.stderr[-500:]}"


@pytest.mark.skipif(not C_OK, reason="C extension not built")
def test_env_switch_and_info():
    """PYKIMI_VNNI_BATCH=0 turns the kernel off at start-up (Q8_32 in "all" then takes its old f32 batch paths);
    info() reports it."""
    code = ("from pykimi.kernels import c, linear; import pykimi.kernels as K; K.set_backend('c'); "
            "print(c.get_vnni_batch(), c.info()['vnni_batch'], linear.plan('q8_32', 64)[1])")
    has = bool(set(LEVELS) & {"avx2", "avx512"})        # the best level has a batch kernel
    for env, want in (({"PYKIMI_VNNI_BATCH": "0", "PYKIMI_ACT_QUANT": "all"}, "False False f32"),
                      ({"PYKIMI_ACT_QUANT": "all"}, f"{has} {has} {'i8' if has else 'f32'}")):
        e = {k: v for k, v in os.environ.items() if k not in ("PYKIMI_VNNI_BATCH", "PYKIMI_ACT_QUANT", "PYKIMI_SIMD",
                                                            "PYKIMI_AMX")}
        e["PYKIMI_AMX"] = "0"
        out = subprocess.run([sys.executable, "-c", code], env=dict(e, **env), capture_output=True, text=True)
        assert out.stdout.strip() == want, f"{env}: {out.stdout!r} {out.stderr[-500:]}"


@pytest.mark.skipif(not C_OK, reason="C extension not built")
@pytest.mark.parametrize("level", ["avx512", "avx2", "scalar"])
def test_rowwise_calls_give_each_row_what_it_gets_alone(level, act_mode):
    """The serve engine's row-wise products (matmul_many(..., rowwise=True), engine.rowwise_products): for every
    stored form and activation mode, at row counts past every batch kernel's start (VNNI, AVX512_BF16, the
    transposed-x bf16 / Q8 kernel, AMX) and past the tiles' (130), each row == that row alone, bit for bit."""
    from pykimi import engine
    if level not in c.simd_levels():
        pytest.skip(f"no {level} level here")
    prev = K.backend()
    K.set_backend("c")
    c.set_simd(level)
    try:
        rng = np.random.default_rng(46)
        w = rng.standard_normal((33, 200)).astype(np.float32)
        forms = (quantize_q4(w), quantize_q8(w), Stored("w", "BF16", f32_to_bf16(w)), Stored("w", "F32", w))
        for mode in ("q4", "all", "none"):
            act_mode(mode)
            for W in forms:
                for n in (9, 40, 130):
                    x = rng.standard_normal((n, 200)).astype(np.float32)
                    alone = np.concatenate([K.matmul(x[i:i + 1], W) for i in range(n)])
                    (y,) = K.matmul_many([x], [W], rowwise=True)
                    np.testing.assert_array_equal(y, alone, err_msg=f"{level} {mode} {W.kind} n={n}")
                    y2, y3 = engine.rowwise_products([x, x[:5]], [W, W])
                    np.testing.assert_array_equal(y2, alone, err_msg=f"{level} {mode} {W.kind} rowwise_products")
                    np.testing.assert_array_equal(y3, alone[:5], err_msg=f"{level} {mode} {W.kind} second product")
    finally:
        c.set_simd(None)
        K.set_backend(prev)


@pytest.mark.skipif(not C_OK, reason="C extension not built")
def test_default_modes_other_formats_unchanged(act_mode):
    """bf16 / f32 weights in every mode and Q8_32 in "q4" (int16) / "none" are bit for bit the same with the VNNI
    kernel on and off, at every n."""
    prev = K.backend()
    K.set_backend("c")
    rng = np.random.default_rng(47)
    w = rng.standard_normal((37, 300)).astype(np.float32)
    ws = {"bf16": Stored("w", "BF16", f32_to_bf16(w)), "f32": Stored("f", "F32", w), "q8": quantize_q8(w),
          "q4": quantize_q4(w)}
    try:
        for mode in ("q4", "none", "all"):
            act_mode(mode)
            for name, W in ws.items():
                if linear._ACT_MODES[mode].get(W.kind) == "i8":
                    continue
                for n in (1, 8, 12, 40, 112, 200):
                    x = rng.standard_normal((n, 300)).astype(np.float32)
                    on, off = on_and_off(c.set_vnni_batch, lambda: K.matmul(x, W))
                    np.testing.assert_array_equal(on, off, err_msg=f"{mode} {name} n={n}")
    finally:
        c.set_vnni_batch(True)
        K.set_backend(prev)


# ------------------------------------------------------------------------------------ prefill, end to end
# The kernel changes only the f32 summation order of the scaled block dots (the same int8 codes, the same exact
# integer dots), so against the row kernels at every n a whole prefill moves by rounding: measured on the golden
# checkpoint repacked to int4 / int8 ("all": every linear layer but the embeddings), golden cases text_only (55
# tokens) and two_images (116), kernel on against the row kernels: logits 3.3e-7 / 1.8e-7 of max |logit| (Q4, "q4"
# and "all" alike), 2.2e-7 / 2.0e-7 (Q8, "all"); bound PREFILL_BOUND = 1e-4, the greedy ids the same. Q8_32 in "all"
# took the exact f32 product from 24 rows before (the batch kernel, the tiles): against that old path its logits
# move by 0.11-0.14 of max |logit| on this tiny random checkpoint (int8 activations, and the routing they flip),
# while its error against the bf16 goldens (dominated by the weights' quantization: 0.24 / 0.21, int4 0.39 / 0.38)
# stays within 0.002 of the old path's: asserted within GOLDEN_SLACK = 0.01 of it. (No quantized golden tolerance
# exists to hold it to.) The AVX2 level's kernel (forced on this machine): logits vs its row kernels 3.1e-7 / 3.2e-7
# (Q4, both modes), 2.8e-7 / 2.6e-7 (Q8, "all"); vs goldens 0.385 / 0.38 (Q4) and 0.241 / 0.21 (Q8) against the old
# paths' (row kernels to 64 rows, then the exact f32 tiles) 0.385 / 0.377 and 0.238 / 0.21.
PREFILL_BOUND = 1e-4
GOLDEN_SLACK = 0.01


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import TINY
    from pykimi.quant import quantize_checkpoint
    d = tmp_path_factory.mktemp("vnni")
    out = {}
    for bits in (4, 8):
        out[bits] = str(d / f"q{bits}-all")
        quantize_checkpoint(TINY, out[bits], bits=bits, what="all", progress=False)
    return out


@pytest.mark.parametrize("bits,mode", [(4, "q4"), (4, "all"), (8, "all")])
@pytest.mark.parametrize("case", ["text_only", "two_images"])
def test_prefill_on_vs_row_kernels(vnni, act_mode, quantized, bits, mode, case, monkeypatch):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_model_golden import case_data
    from pykimi.model import load
    act_mode(mode)
    model = load(quantized[bits])
    S = int(case_data(case)[0]["input_ids"].shape[0])
    kind = "q4_32" if bits == 4 else "q8_32"
    assert S >= MINS[vnni.level][kind] and linear.plan(kind, S) == ("c", "i8")
    check_prefill_switch(model, case, vnni.set_vnni_batch,
                         {"SMALL_N_ACT": {**linear.SMALL_N_ACT, (kind, "i8"): 1 << 62},
                          "C_BATCH_ROWS_Q8": (1 << 62, 1 << 62), "SMALL_N_ACT_AVX2": {(kind, "i8"): 1 << 62}},
                         f"q{bits} {mode} {case}", PREFILL_BOUND, GOLDEN_SLACK, monkeypatch,
                         plan_check=lambda: linear.plan(kind, S) == ("c", "i8") or pytest.fail("plan"), int8_acts=True)
