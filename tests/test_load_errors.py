"""pykimi.load refuses a wrong checkpoint at load time with one line naming the tensor or file."""
import json
import os
import shutil

import numpy as np
import pytest

import pykimi
from conftest import TINY
from pykimi.errors import CheckpointError, ConfigError
from pykimi.weights import Checkpoint, Stored, save_file


def rewrite_shard(d, fn):
    """Rewrite shard 2 of a copy of the tiny checkpoint through fn(name, Stored) -> Stored | None (drop)."""
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    ck = Checkpoint.open(shard)
    out = {}
    for n in ck.names():
        st = ck.tensor(n)
        new = fn(n, Stored(n, st.dtype, np.array(st.data)))
        if new is not None:
            out[n] = new
    del ck
    save_file(out, shard)
    idx_path = os.path.join(d, "model.safetensors.index.json")
    idx = json.load(open(idx_path))
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items()
                         if v != "model-00002-of-00002.safetensors" or k in out}
    json.dump(idx, open(idx_path, "w"))
    return shard


@pytest.fixture
def ck_dir(tmp_path):
    d = str(tmp_path / "ck")
    shutil.copytree(TINY, d)
    return d


def _a_shard2_name(d, pred):
    ck = Checkpoint.open(os.path.join(d, "model-00002-of-00002.safetensors"))
    return next(n for n in ck.names() if pred(n))


def test_missing_needed_tensor(ck_dir):
    victim = _a_shard2_name(ck_dir, lambda n: n.endswith("wo.weight"))
    rewrite_shard(ck_dir, lambda n, s: None if n == victim else s)
    with pytest.raises(CheckpointError, match=f"tensor '{victim}'.* is missing") as e:
        pykimi.load(ck_dir)
    assert "\n" not in str(e.value)


def test_wrong_shape(ck_dir):
    victim = _a_shard2_name(ck_dir, lambda n: n.endswith("wo.weight"))
    rewrite_shard(ck_dir, lambda n, s: Stored(n, s.dtype, s.data[:, :-1].copy()) if n == victim else s)
    with pytest.raises(CheckpointError, match=f"{victim}' has shape"):
        pykimi.load(ck_dir)


def test_wrong_dtype(ck_dir):
    victim = _a_shard2_name(ck_dir, lambda n: n.endswith("wo.weight"))
    rewrite_shard(ck_dir, lambda n, s: Stored(n, "I16", s.data.view(np.int16)) if n == victim else s)
    with pytest.raises(CheckpointError, match=f"{victim}' has dtype I16"):
        pykimi.load(ck_dir)


def test_ignored_inv_freq_is_not_required():
    from pykimi.layout import expected_tensors, is_ignored

    cfg = pykimi.load_config(TINY)
    need = [n for n, _ in expected_tensors(cfg, include_ignored=False)]
    assert need and not any(is_ignored(n) for n in need)


def test_no_config_json(ck_dir):
    os.remove(os.path.join(ck_dir, "config.json"))
    with pytest.raises((ConfigError, CheckpointError), match="config.json"):
        pykimi.load(ck_dir)


def test_config_of_another_model(ck_dir):
    p = os.path.join(ck_dir, "config.json")
    cfg = json.load(open(p))
    cfg["model_type"] = "qwen2_vl"
    json.dump(cfg, open(p, "w"))
    with pytest.raises(ConfigError, match="model_type = 'qwen2_vl', expected 'kimi_vl'"):
        pykimi.load(ck_dir)


def test_truncated_shard(ck_dir):
    shard = os.path.join(ck_dir, "model-00001-of-00002.safetensors")
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: tensor .* run past the data"):
        pykimi.load(ck_dir)
