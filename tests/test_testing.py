"""The random-checkpoint writer: exact HF layout for any config, sharded, bf16/f32, loadable and runnable."""
import json
import os

import numpy as np
import pytest

import pykimi
from conftest import TINY
from pykimi.layout import expected_tensors
from pykimi.testing import convert_checkpoint, reference_config, write_random_checkpoint
from pykimi.weights import Checkpoint


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_random_tiny_checkpoint_layout(tmp_path, dtype):
    cfg = json.load(open(os.path.join(TINY, "config.json")))
    d = write_random_checkpoint(str(tmp_path / "r"), cfg, dtype=dtype, seed=3, shard_bytes=200_000)
    files = sorted(os.listdir(d))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 3
    ck = Checkpoint.open(d)
    exp = dict(expected_tensors(ck.config))
    assert sorted(exp) == ck.names()
    for n, shape in exp.items():
        i = ck.info(n)
        assert i.shape == shape
        assert i.dtype == ("F32" if n.endswith("e_score_correction_bias") else dtype), n
    inv = ck.f32("language_model.model.layers.0.self_attn.rotary_emb.inv_freq")
    np.testing.assert_allclose(inv, 800000.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-2)  # present, bf16-rounded
    # deterministic in (seed, name)
    d2 = write_random_checkpoint(str(tmp_path / "r2"), cfg, dtype=dtype, seed=3)
    n = "language_model.model.layers.1.mlp.experts.5.up_proj.weight"
    np.testing.assert_array_equal(Checkpoint.open(d2).get(n), ck.get(n))
    # it runs
    logits = pykimi.load(d).forward(np.array([1, 2, 3, 277 - 277 + 4]))
    assert logits.shape == (4, 512) and np.isfinite(logits).all()


@pytest.mark.reference
def test_official_library_reads_random_checkpoint(tmp_path):
    torch = pytest.importorskip("torch", reason="bf16 through safetensors needs torch")
    from safetensors import safe_open

    cfg = json.load(open(os.path.join(TINY, "config.json")))
    d = write_random_checkpoint(str(tmp_path / "r"), cfg, shard_bytes=300_000)
    ck = Checkpoint.open(d)
    seen = 0
    for f in sorted(x for x in os.listdir(d) if x.endswith(".safetensors")):
        with safe_open(os.path.join(d, f), "pt") as fh:
            for n in fh.keys():
                t = fh.get_tensor(n).float().numpy()
                np.testing.assert_array_equal(t, ck.f32(n))
                seen += 1
    assert seen == len(ck)


def test_large_tensors_stream_in_row_blocks(tmp_path, monkeypatch):
    """Tensors bigger than one chunk are written block by block; the result is the same as any chunking."""
    import pykimi.testing as T

    cfg = json.load(open(os.path.join(TINY, "config.json")))
    monkeypatch.setattr(T, "CHUNK", 1000)
    d = write_random_checkpoint(str(tmp_path / "small_chunks"), cfg, seed=1)
    ck = Checkpoint.open(d)
    w = ck.f32("language_model.lm_head.weight")          # 512 x 64 = 32768 elements > CHUNK: many blocks
    assert w.shape == (512, 64) and np.isfinite(w).all() and 0.005 < w.std() < 0.05


def test_convert_checkpoint_exact(tmp_path):
    d = convert_checkpoint(TINY, str(tmp_path / "f32"), "F32")
    a, b = Checkpoint.open(TINY), Checkpoint.open(d)
    assert a.names() == b.names()
    for n in a.names():
        np.testing.assert_array_equal(a.f32(n), b.f32(n))
        assert b.info(n).dtype == "F32"
    assert os.path.exists(os.path.join(d, "preprocessor_config.json"))


def test_reference_config_overrides():
    cfg = reference_config(num_hidden_layers=2)
    c = pykimi.KimiVLConfig.from_dict(cfg)
    assert c.text.num_hidden_layers == 2 and c.text.hidden_size == 2048
    assert len(expected_tensors(c)) == 5679 - 25 * (64 * 3 + 2 + 3 + 8)
