"""int8 / int4 block formats (round-trip error bounds) and the streaming checkpoint repack."""
import json
import os

import numpy as np
import pytest

from pykimi import quant
from pykimi.kernels import ref
from pykimi.quant import Q4Weight, Q8Weight, load_quantized, quantize_checkpoint, quantize_q4, quantize_q8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "golden", "tiny-kimi-vl")
SHAPES = [(1, 1), (3, 31), (4, 32), (5, 33), (7, 100), (16, 2048), (2, 1409)]


def _block_scales_per_col(scales, in_f):
    return np.repeat(np.abs(scales), 32, axis=1)[:, :in_f]


@pytest.mark.parametrize("shape", SHAPES)
def test_q8_round_trip(shape):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))).astype(np.float32)
    q = quantize_q8(w, "w")
    nb = -(-shape[1] // 32)
    assert isinstance(q, Q8Weight) and q.shape == shape and q.kind == "q8_32"
    assert q.q.dtype == np.int8 and q.q.shape == shape and q.scales.shape == (shape[0], nb)
    deq = q.f32()
    assert deq.dtype == np.float32 and deq.shape == shape
    bound = _block_scales_per_col(q.scales, shape[1]) * 0.5 * (1 + 1e-5) + 1e-12
    assert np.all(np.abs(w - deq) <= bound)            # round-to-nearest: half a step per element
    blocks_max = np.abs(np.pad(w, ((0, 0), (0, nb * 32 - shape[1])))).reshape(shape[0], nb, 32).max(-1)
    np.testing.assert_allclose(q.scales, blocks_max / 127, rtol=1e-6)
    assert np.abs(q.q).max() <= 127


@pytest.mark.parametrize("shape", SHAPES)
def test_q4_round_trip(shape):
    rng = np.random.default_rng(shape[0] * 11 + shape[1])
    w = rng.standard_normal(shape).astype(np.float32)
    q = quantize_q4(w, "w")
    nb = -(-shape[1] // 32)
    assert isinstance(q, Q4Weight) and q.shape == shape and q.kind == "q4_32"
    assert q.q.dtype == np.uint8 and q.q.shape == (shape[0], -(-shape[1] // 2)) and q.scales.shape == (shape[0], nb)
    deq = q.f32()
    step = _block_scales_per_col(q.scales, shape[1])
    err = np.abs(w - deq)
    assert np.all(err <= step * (1 + 1e-5) + 1e-12)      # at most one step (the clipped +8 side)
    assert np.mean(err <= step * 0.5 * (1 + 1e-5)) > 0.9  # nearly all within half a step
    # the largest-magnitude element of every block is represented exactly (it maps to code -8)
    vals = ref.unpack_q4(q.q, shape[1])
    assert vals.min() >= -8 and vals.max() <= 7
    if shape[1] >= 2:
        rel = np.sqrt(np.mean((w - deq) ** 2) / np.mean(w ** 2))
        assert rel < 0.12


def test_zero_blocks_and_nibble_layout():
    w = np.zeros((2, 40), np.float32)
    for q in (quantize_q8(w), quantize_q4(w)):
        assert np.all(q.scales == 0) and np.all(q.f32() == 0)
    # element 2j in the low nibble, 2j+1 in the high nibble, code = value + 8
    w = np.zeros((1, 32), np.float32)
    w[0, 0], w[0, 1] = -8.0, 3.0
    q = quantize_q4(w)
    assert q.scales[0, 0] == 1.0
    assert q.q[0, 0] == ((-8 + 8) | ((3 + 8) << 4))


def test_quantize_accepts_stored_bf16():
    from pykimi.weights import Stored, f32_to_bf16
    rng = np.random.default_rng(0)
    w = rng.standard_normal((9, 70)).astype(np.float32)
    st = Stored("x.weight", "BF16", f32_to_bf16(w))
    q = quantize_q8(st)
    assert q.name == "x.weight"
    np.testing.assert_allclose(q.f32(), quantize_q8(st.f32()).f32())


def test_should_quantize_selection():
    sq = quant.should_quantize
    e = "language_model.model.layers.3.mlp.experts.17.down_proj.weight"
    s = "language_model.model.layers.3.mlp.shared_experts.gate_proj.weight"
    for what in ("experts", "all"):
        assert sq(e, (2048, 1408), what) and sq(s, (2816, 2048), what)
        for never in ["language_model.model.embed_tokens.weight", "language_model.model.layers.3.mlp.gate.weight",
                      "language_model.model.layers.3.input_layernorm.weight",
                      "language_model.model.layers.3.self_attn.kv_a_layernorm.weight",
                      "vision_tower.encoder.blocks.0.wqkv.weight", "multi_modal_projector.linear_1.weight",
                      "language_model.model.layers.3.mlp.gate.e_score_correction_bias"]:
            assert not sq(never, (64, 64) if "bias" not in never else (64,), what), never
    assert not sq("language_model.lm_head.weight", (163840, 2048), "experts")
    assert sq("language_model.lm_head.weight", (163840, 2048), "all")
    assert sq("language_model.model.layers.0.self_attn.q_proj.weight", (3072, 2048), "all")
    assert sq("language_model.model.layers.0.mlp.down_proj.weight", (2048, 11264), "all")
    assert not sq("language_model.model.layers.0.self_attn.q_proj.weight", (3072, 2048), "experts")


# ----------------------------------------------------------------------------------------- repack

weights = pytest.importorskip("pykimi.weights")


@pytest.mark.parametrize("bits,what", [(8, "experts"), (4, "experts"), (8, "all"), (4, "all")])
def test_repack_round_trip(tmp_path, bits, what):
    dst = str(tmp_path / f"q{bits}-{what}")
    summary = quantize_checkpoint(TINY, dst, bits=bits, what=what, progress=False)
    assert os.path.isdir(dst) and not os.path.exists(dst + ".partial")
    assert summary["quantized"] > 0
    assert os.path.exists(os.path.join(dst, "config.json"))
    src = weights.Checkpoint.open(TINY)
    out = weights.Checkpoint.open(dst)
    cls = Q8Weight if bits == 8 else Q4Weight
    n_quant = 0
    for name in src.names():
        info = src.info(name)
        chosen = quant.should_quantize(name, info.shape, what)
        got = load_quantized(out, name)
        assert quant.is_quantized(out, name) == chosen
        if chosen:
            n_quant += 1
            assert isinstance(got, cls), name
            assert got.shape == tuple(info.shape) and got.name == name
            assert name not in out
            ref_q = (quantize_q8 if bits == 8 else quantize_q4)(src.tensor(name))
            np.testing.assert_array_equal(got.q, ref_q.q)
            np.testing.assert_array_equal(got.scales, ref_q.scales)
            w = src.f32(name)
            step = _block_scales_per_col(got.scales, w.shape[1])
            assert np.all(np.abs(got.f32() - w) <= step * (0.5 if bits == 8 else 1.0) * (1 + 1e-5) + 1e-12)
            # the checkpoint hands the quantized weight to the kernels transparently
            assert isinstance(out.weight(name), cls)
        else:
            assert got is None
            assert out.info(name).dtype == info.dtype
            np.testing.assert_array_equal(out.get(name), src.get(name))
    assert n_quant == summary["quantized"]
    if what == "all":
        assert isinstance(load_quantized(out, "language_model.lm_head.weight"), cls)
        assert load_quantized(out, "language_model.model.embed_tokens.weight") is None
    else:
        assert load_quantized(out, "language_model.lm_head.weight") is None
    meta = json.loads(out.metadata[quant.META_KEY])
    assert all(v["format"] == quant.FORMATS[bits] for v in meta.values()) and len(meta) == n_quant


def test_repack_of_a_repacked_checkpoint(tmp_path):
    """An int8 checkpoint re-packed to int4: the selected weights are re-quantized from their int8 values, the
    others keep their stored int8 codes and scales unchanged, and the metadata says which is which."""
    q8 = str(tmp_path / "q8-all")
    quantize_checkpoint(TINY, q8, bits=8, what="all", progress=False)
    q4 = str(tmp_path / "q4-experts")
    summary = quantize_checkpoint(q8, q4, bits=4, what="experts", progress=False)
    src, out = weights.Checkpoint.open(q8), weights.Checkpoint.open(q4)
    meta = json.loads(out.metadata[quant.META_KEY])
    n_re = n_kept = 0
    for name in src.names():
        if not name.endswith(".qweight"):
            if not name.endswith(".scales"):
                np.testing.assert_array_equal(out.get(name), src.get(name))
            continue
        base = name[:-len(".qweight")]
        old, new = load_quantized(src, base), load_quantized(out, base)
        assert new is not None and new.shape == old.shape, base
        if quant.should_quantize(base, old.shape, "experts"):
            n_re += 1
            assert isinstance(new, Q4Weight) and meta[base]["format"] == "q4_32", base
            ref_q = quantize_q4(old.f32(), base)
            np.testing.assert_array_equal(new.q, ref_q.q)
            np.testing.assert_array_equal(new.scales, ref_q.scales)
        else:
            n_kept += 1
            assert isinstance(new, Q8Weight) and meta[base]["format"] == "q8_32", base
            np.testing.assert_array_equal(new.q, old.q)
            np.testing.assert_array_equal(new.scales, old.scales)
    assert n_re > 0 and n_kept > 0 and len(meta) == n_re + n_kept
    assert summary["tensors"] == len(src.names())
    # and the model loads and runs on the mixed int8 / int4 checkpoint
    import pykimi
    ids = np.array([1, 5, 9, 2])
    a, b = pykimi.load(q8).forward(ids), pykimi.load(q4).forward(ids)
    assert b.shape == a.shape and np.all(np.isfinite(b)) and not np.array_equal(a, b)


def test_repack_readable_by_official_library(tmp_path):
    st = pytest.importorskip("safetensors")
    dst = str(tmp_path / "q4")
    quantize_checkpoint(TINY, dst, bits=4, what="experts", progress=False)
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        index = json.load(f)
    for shard in sorted(set(index["weight_map"].values())):
        with st.safe_open(os.path.join(dst, shard), framework="np") as f:
            assert quant.META_KEY in f.metadata()
            keys = set(f.keys())
            assert keys == {n for n, s in index["weight_map"].items() if s == shard}
            for name in keys:
                if name.endswith((".qweight", ".scales")):  # numpy has no bfloat16: read the quantized ones
                    t = f.get_tensor(name)
                    assert t.dtype == (np.uint8 if name.endswith(".qweight") else np.float32)


def test_repack_refuses_existing_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    from pykimi.errors import CheckpointError
    dst = tmp_path / "out"
    dst.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        quantize_checkpoint(TINY, str(dst), bits=8, progress=False)
    dst2 = str(tmp_path / "out2")
    calls = {"n": 0}
    real = quant._quantize

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(quant, "_quantize", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_checkpoint(TINY, dst2, bits=8, progress=False)
    assert not os.path.exists(dst2) and not os.path.exists(dst2 + ".partial")
    with pytest.raises(ValueError):
        quantize_checkpoint(TINY, str(tmp_path / "x"), bits=3, progress=False)


def test_load_quantized_rejects_bad_shapes(tmp_path):
    from pykimi.errors import CheckpointError
    path = str(tmp_path / "bad.safetensors")
    weights.save_file({"w.qweight": np.zeros((4, 64), np.int8), "w.scales": np.zeros((4, 3), np.float32)}, path)
    ck = weights.Checkpoint.open(path, load_config=False)
    with pytest.raises(CheckpointError, match="w.scales"):
        load_quantized(ck, "w")
    assert load_quantized(ck, "nothing") is None
