"""MoonViT + projector (spec §6-7) against the golden cases, the block-diagonal attention, and bad input."""
import json
import math
import os
import tracemalloc

import numpy as np
import pytest

import pykimi
from pykimi import vision
from pykimi.errors import InputError
from pykimi.weights import Checkpoint

from conftest import GOLDEN, TINY

VISION_CASES = ("one_image", "two_images")
PREFIXES = ("vision_tower.", "multi_modal_projector")


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------
def _load_case(case):
    inp = Checkpoint.open(os.path.join(GOLDEN, case, "inputs.safetensors"))
    gold = Checkpoint.open(os.path.join(GOLDEN, case, "golden.safetensors"))
    with open(os.path.join(GOLDEN, case, "manifest.json")) as fh:
        man = json.load(fh)
    return np.array(inp.get("pixel_values")), np.array(inp.get("image_grid_hws")), gold, man


def _convert_f32(src, dst):
    try:
        from pykimi.testing import convert_checkpoint
    except ImportError:       # the lead's converter is missing: write the f32 copy with the safetensors package
        import shutil

        from safetensors.numpy import save_file
        ck = Checkpoint.open(src)
        os.makedirs(dst, exist_ok=True)
        save_file({n: ck.f32(n) if ck.info(n).dtype in ("BF16", "F16", "F32") else np.array(ck.get(n))
                   for n in ck.names()}, os.path.join(dst, "model.safetensors"))
        shutil.copy(os.path.join(src, "config.json"), dst)
        return dst
    return convert_checkpoint(src, dst, dtype="F32")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    bf16 = Checkpoint.open(TINY)
    dst = _convert_f32(TINY, str(tmp_path_factory.mktemp("tiny_f32")))
    f32 = Checkpoint.open(dst)
    assert f32.info("vision_tower.encoder.blocks.0.wqkv.weight").dtype == "F32"
    assert bf16.info("vision_tower.encoder.blocks.0.wqkv.weight").dtype == "BF16"
    return {"bf16": bf16, "f32": f32}


@pytest.fixture(scope="module")
def tower(ckpts):
    ck = ckpts["bf16"]
    return vision.VisionTower(ck, ck.config, cache_weights=True)


def _rel_err(name, got, want, tol):
    """err = max|a-g|/max|g|; on failure: name, err, first mismatching index and values (llm.c style)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, golden {want.shape}"
    scale = np.abs(want).max()
    diff = np.abs(got - want)
    err = diff.max() / scale
    if not err <= tol:
        bad = np.argwhere(diff > tol * scale)
        i = tuple(int(v) for v in bad[0])
        pytest.fail(f"{name}: err {err:.3g} > tol {tol:.3g}; {len(bad)} mismatches, first at {i}: "
                    f"pykimi {got[i]:.7g} golden {want[i]:.7g}; worst at "
                    f"{tuple(int(v) for v in np.unravel_index(diff.argmax(), diff.shape))}")
    return err


# ---------------------------------------------------------------------------------------------------------
# golden parity: every vision / projector tensor, bf16 and f32 checkpoints
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("case", VISION_CASES)
def test_golden_vision_tensors(ckpts, case, dtype, capsys):
    ck = ckpts[dtype]
    pv, grids, gold, man = _load_case(case)
    vt = vision.VisionTower(ck, ck.config)
    with pykimi.trace(None) as t:
        out = vt.encode(pv, grids)
    names = [n for n in man["tensors"] if n.startswith(PREFIXES)]
    nb = ck.config.vision.num_hidden_layers
    assert {f"vision_tower.encoder.blocks.{i}" for i in range(nb)} <= set(names)
    assert "multi_modal_projector" in names and "vision_tower.merger" in names
    report = []
    for n in names:
        tol = man["tensors"][n]["tolerance"]["rel"]
        assert n in t, f"{n} was not emitted"
        report.append((n, _rel_err(f"{case}/{dtype}/{n}", t[n], gold.get(n), tol)))
    _rel_err(f"{case}/{dtype}/encode()", out, gold.get("multi_modal_projector"),
             man["tensors"]["multi_modal_projector"]["tolerance"]["rel"])
    with capsys.disabled():
        print(f"\n[{case} {dtype}] " + "  ".join(f"{n.split('.', 1)[-1] if '.' in n else n}={e:.2e}"
                                                 for n, e in report))


def test_bf16_and_f32_checkpoints_agree(ckpts):
    pv, grids, _, _ = _load_case("one_image")
    a = vision.VisionTower(ckpts["bf16"], ckpts["bf16"].config).encode(pv, grids)
    b = vision.VisionTower(ckpts["f32"], ckpts["f32"].config).encode(pv, grids)
    assert np.array_equal(a, b)        # the widening is exact: same float32 weights, same results


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_default_path_reuses_its_widened_block_weights(ckpts, tower, backend):
    """Without cache_weights every block's vectors (and, unless the C kernels multiply bf16 batches in place, its
    matrices) are widened into one reused set of scratch arrays, and no block's arrays are kept; where they do
    (the AVX-512 level) the four matrices are the mapped bf16 tensors themselves (kernels.matmul multiplies
    them: nothing widened). The features equal the cached tower's (f32 arrays, NumPy's products) exactly on
    the widened path, image after image, and to the summation order of the C kernel's exact product on the other."""
    import pykimi.kernels as K
    if backend not in K.backends() or not K.backends()[backend]["available"]:
        pytest.skip(f"backend {backend} not available")
    ck = ckpts["bf16"]
    prev = K.backend()
    K.set_backend(backend)
    try:
        plain = vision.VisionTower(ck, ck.config)
        w0 = plain.block_weights(0)
        stored = vision._stored_products()
        assert stored == (backend == "c" and K.linear.plan("bf16", vision.MM_ROWS)[0] == "c")
        widened = [k for k in vision.BLOCK_KEYS if not stored or k not in vision.MATRIX_KEYS]
        for k in vision.BLOCK_KEYS:
            assert isinstance(w0[k], np.ndarray) == (k in widened), k
        w0_copy = {k: w0[k].copy() for k in widened}
        w1 = plain.block_weights(1)
        assert all(w1[k] is w0[k] for k in widened)                                 # the same buffers ...
        assert any(not np.array_equal(w1[k], w0_copy[k]) for k in widened)         # ... refilled
        for k in vision.BLOCK_KEYS:
            got = w1[k] if k in widened else K.widen(w1[k])
            np.testing.assert_array_equal(got, tower.block_weights(1)[k], err_msg=k)
        products, matmul = [], K.matmul

        def counted(x, w, *a, **k):                      # which products got a mapped (not widened) weight
            products.append(not isinstance(w, np.ndarray))
            return matmul(x, w, *a, **k)
        for case in ("one_image", "two_images", "one_image"):
            pv, grids, _, _ = _load_case(case)
            want = tower.encode(pv, grids)
            products.clear()
            K.matmul = counted
            try:
                got = plain.encode(pv, grids)
            finally:
                K.matmul = matmul
            if stored:
                # the C kernel's exact product sums each output in k order in one f32 chain; a BLAS may do the
                # same (OpenBLAS's AVX-512 sgemm on Intel Ice Lake gave the same bits) or not (AMD Zen 5: ~1e-7)
                blocks = vision._vcfg(ck.config).num_hidden_layers
                assert sum(products) >= 4 * blocks, f"{case}: {sum(products)} products on mapped weights"
                err = np.abs(got - want).max() / np.abs(want).max()
                assert err < 2e-6, f"{case}: {err:.2e} from the f32 tower's"
            else:
                assert not any(products), f"{case}: a product on a mapped weight without the C kernels"
                np.testing.assert_array_equal(got, want, err_msg=case)
        assert plain._cache == {}
    finally:
        K.set_backend(prev)


# ---------------------------------------------------------------------------------------------------------
# per-image attention
# ---------------------------------------------------------------------------------------------------------
def test_no_cross_image_attention(tower):
    pv, grids, gold, _ = _load_case("two_images")
    cu = vision.cu_seqlens(grids)
    t1 = int(cu[1]) // 4                                  # image 0's merged tokens
    base = tower.encode(pv, grids)
    pv2 = pv.copy()
    pv2[cu[1]:] = np.random.default_rng(0).uniform(-1, 1, pv2[cu[1]:].shape).astype(np.float32)
    pert = tower.encode(pv2, grids)
    assert np.array_equal(base[:t1], pert[:t1]), "image 0 changed when only image 1's pixels did"
    assert np.abs(base[t1:] - pert[t1:]).max() > 1e-3   # ... and image 1 itself did change
    # image 0 alone gives its features (positions restart per image), up to BLAS blocking rounding
    alone = tower.encode(pv[:cu[1]], grids[:1])
    np.testing.assert_allclose(alone, base[:t1], rtol=0, atol=1e-5 * np.abs(base).max())


def test_attention_probs_are_block_diagonal(tower):
    pv, grids, _, _ = _load_case("two_images")
    cu = vision.cu_seqlens(grids)
    with pykimi.trace(None, names=["vision_tower.encoder.blocks.1*"],
                      attn_probs=["vision_tower.encoder.blocks.1"]) as t:
        tower.encode(pv, grids)
    p = t["vision_tower.encoder.blocks.1.attn_probs"]     # [H, L, L]
    H = tower.vcfg.num_attention_heads
    L = int(cu[-1])
    assert p.shape == (H, L, L)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert not p[:, :cu[1], cu[1]:].any() and not p[:, cu[1]:, :cu[1]].any()
    assert "vision_tower.encoder.blocks.0.attn_probs" not in t       # only the block asked for
    assert t["vision_tower.encoder.blocks.1.q_rope"].shape == (L, H, tower.vcfg.head_dim)


def test_attention_query_blocks_equal_one_block():
    rng = np.random.default_rng(0)
    L, H, D = 37 + 50, 3, 8
    q, k, v = (rng.standard_normal((L, H, D)).astype(np.float32) for _ in range(3))
    cu = [0, 37, L]
    full = vision.vision_attention(q, k, v, cu, block_q=10 ** 6)
    for bq in (1, 7, 16):
        np.testing.assert_allclose(vision.vision_attention(q, k, v, cu, block_q=bq), full, atol=1e-6)
    # the dense per-image reference
    for s, e in zip(cu[:-1], cu[1:]):
        sc = np.einsum("qhd,khd->hqk", q[s:e], k[s:e]).astype(np.float64) / math.sqrt(D)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ref = np.einsum("hqk,khd->qhd", pr, v[s:e]).reshape(e - s, H * D)
        np.testing.assert_allclose(full[s:e], ref, atol=1e-5)


def test_attention_memory_is_blocked(monkeypatch):
    # a 4096-token image with 2 heads: full scores would be 2*4096^2*4 B = 128 MiB; blocked to <= 4 MiB
    rng = np.random.default_rng(0)
    L, H, D = 4096, 2, 8
    q, k, v = (rng.standard_normal((L, H, D)).astype(np.float32) for _ in range(3))
    monkeypatch.setattr(vision, "ATTN_BLOCK_BYTES", 4 << 20)
    tracemalloc.start()
    try:
        vision.vision_attention(q, k, v, [0, L])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"vision attention peak {peak / 2**20:.1f} MiB"
    # and at the real size (16,384 patches, 16 heads of 72) the default block keeps scores well under 1 GiB
    monkeypatch.undo()
    n, Hr = 16384, 16
    bq = max(1, vision.ATTN_BLOCK_BYTES // (4 * Hr * n))
    scores = 4 * Hr * bq * n
    qkv_out = 4 * n * 1152 * 6            # q, k, v, the two transposed copies and the output
    assert scores + qkv_out < 1 << 30


# ---------------------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------------------
def test_patch_merger_order():
    gh, gw, C = 4, 6, 1
    x = np.arange(gh * gw, dtype=np.float32).reshape(-1, 1)       # token id = row*gw + col
    m = vision.patch_merger(x, [[gh, gw]])[..., 0]                # [T, 4]
    assert m.shape == (6, 4)
    assert m[0].tolist() == [0, 1, 6, 7]                          # TL, TR, BL, BR of merged token (0, 0)
    assert m[1].tolist() == [2, 3, 8, 9]                          # raster order: (0, 1) next
    assert m[3].tolist() == [12, 13, 18, 19]                      # second merged row


def test_patch_embed_is_the_conv():
    rng = np.random.default_rng(0)
    pv = rng.standard_normal((5, 3, 14, 14)).astype(np.float32)
    w = rng.standard_normal((7, 3, 14, 14)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    want = np.einsum("lcyx,ocyx->lo", pv.astype(np.float64), w.astype(np.float64)) + b
    np.testing.assert_allclose(vision.patch_embed(pv, w, b), want, atol=1e-4)


def test_erf_and_gelus():
    x = np.linspace(-9, 9, 20001)
    ref = np.array([math.erf(v) for v in x])
    assert np.abs(vision.erf(x) - ref).max() < 1e-11
    refc = np.array([math.erfc(v) for v in x])
    assert (np.abs(vision.erfc(x) - refc) / refc).max() < 1e-10
    xf = x.astype(np.float32)
    g = vision.gelu_erf(xf)
    want = np.array([0.5 * float(v) * math.erfc(-float(v) / math.sqrt(2)) for v in xf])
    assert g.dtype == np.float32
    assert (np.abs(g - want) <= 1.5 * np.spacing(np.abs(want).astype(np.float32)) + 1e-30).all()
    t = vision.gelu_tanh(xf).astype(np.float64)
    xd = xf.astype(np.float64)
    want_t = 0.5 * xd * (1 + np.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    assert np.abs(t - want_t).max() < 1e-5
    assert np.abs(g - vision.gelu_tanh(xf)).max() > 1e-4          # the two GELUs are not interchangeable


def test_layer_norm_matches_float64():
    rng = np.random.default_rng(0)
    x = (0.01 * rng.standard_normal((9, 96)) + 0.3).astype(np.float32)
    w, b = rng.standard_normal(96).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    xd = x.astype(np.float64)
    want = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(vision.layer_norm(x, w, b), want, atol=2e-5 * np.abs(want).max())


def test_trace_edit_flows_onward(tower):
    pv, grids, _, _ = _load_case("one_image")
    base = tower.encode(pv, grids)
    with pykimi.trace(None, names=[], edit={"vision_tower.merger": lambda m: np.zeros_like(m)}):
        edited = tower.encode(pv, grids)
    assert not np.array_equal(base, edited)
    assert np.allclose(edited, edited[0])          # every token now sees the same (zero) merged input


# ---------------------------------------------------------------------------------------------------------
# bad input: one-line InputError naming the image
# ---------------------------------------------------------------------------------------------------------
def _bad(tower, pv, grids, *needles):
    with pytest.raises(InputError) as ei:
        tower.encode(pv, grids)
    msg = str(ei.value)
    assert "\n" not in msg
    for s in needles:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


def test_bad_inputs(tower):
    pv, grids, _, _ = _load_case("two_images")          # grids (6, 4) and (14, 18)
    n0 = int(grids[0].prod())
    # grid not divisible by the 2x2 merge kernel (pixel count kept consistent)
    _bad(tower, pv[:n0 + 15 * 18], np.array([[6, 4], [15, 18]]), "image 1", "merge kernel")
    _bad(tower, pv[:3 * 8], np.array([[3, 8]]), "image 0", "merge kernel")
    # pixel count disagrees with the grids
    _bad(tower, pv[:-1], grids, "image 1", "patches")
    _bad(tower, np.concatenate([pv, pv[:4]]), grids, "image 1", "extra")
    _bad(tower, pv[:10], grids, "image 0")
    # wrong channel count or patch size
    _bad(tower, np.repeat(pv, 2, axis=1)[:, :4], grids, "image 0", "channels")
    _bad(tower, np.zeros((pv.shape[0], 3, 16, 16), np.float32), grids, "image 0", "patch size")
    _bad(tower, pv.reshape(pv.shape[0], -1), grids, "image 0", "shape")
    # the 512 x 512 RoPE table
    _bad(tower, np.zeros((2 * 512, 3, 14, 14), np.float32), np.array([[2, 512]]), "image 0", "512")
    # non-finite pixels, malformed grids
    pv_nan = pv.copy()
    pv_nan[n0 + 3, 0, 0, 0] = np.nan
    _bad(tower, pv_nan, grids, "image 1", "NaN")
    _bad(tower, pv, np.array([6, 4, 14, 18]), "image_grid_hws")
    _bad(tower, pv, np.array([[6, 4], [0, 18]]), "image 1")


def test_no_images_gives_empty_features(tower):
    out = tower.encode(np.zeros((0, 3, 14, 14), np.float32), np.zeros((0, 2), np.int64))
    assert out.shape == (0, tower.cfg.text.hidden_size)
