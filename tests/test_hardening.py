"""Issue 19: bad inputs found by an adversarial probe. Each test reproduces one original failure (silent
garbage, lost files, tracebacks) and checks the one-line error (CLI status 2) or the sensible behaviour."""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from cli_helpers import make_tiny_model_dir
from conftest import GOLDEN, ROOT, TINY

import pykimi
from pykimi.errors import CheckpointError, ConfigError, InputError, NumericsError
from pykimi.weights import Checkpoint, SafetensorsFile, Stored, save_file

IMG = os.path.join(GOLDEN, "one_image", "images", "img0.png")


def cli(*args, stdin=None, timeout=300, cwd=ROOT, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "pykimi.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def one_line_error(r, *needles):
    """Status 2, exactly one stderr line starting 'pykimi: error:' holding every needle."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("pykimi: error:"), r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree_hash(path):
    """sha256 of every file under path (or of the file), keyed by relative path."""
    out = {}
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("hard") / "tiny"))


@pytest.fixture
def tiny_copy(model_dir, tmp_path):
    d = str(tmp_path / "ck")
    shutil.copytree(model_dir, d)
    return d


SHARD1 = "model-00001-of-00002.safetensors"


def _set_header_len(path, delta):
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(0)
        fh.write(struct.pack("<Q", n + delta))


# ------------------------------------------------------------------------------- 1. data-region coverage

def test_header_one_byte_short_is_refused_not_garbage(tiny_copy):
    """Was: a header length N-1 read every tensor one byte off; `run` printed NULs and `info` said complete."""
    shard = os.path.join(tiny_copy, SHARD1)
    _set_header_len(shard, -1)
    with pytest.raises(CheckpointError, match=f"{SHARD1}: the tensors cover .* but the file holds") as e:
        pykimi.load(tiny_copy)
    assert "\n" not in str(e.value)
    one_line_error(cli("info", tiny_copy), SHARD1)
    one_line_error(cli("run", "-m", tiny_copy, "-p", "hi", "-n", "4"), SHARD1)


@pytest.mark.parametrize("layout,msg", [
    ({"a": [0, 8], "b": [12, 20]}, "gap of 4 bytes"),          # hole between tensors
    ({"a": [4, 12], "b": [12, 20]}, "gap of 4 bytes after offset 0"),  # does not start at 0
    ({"a": [0, 8], "b": [4, 12]}, "'a' and 'b' overlap"),
    ({"a": [0, 8], "b": [8, 16]}, "cover 16 bytes of data but the file holds 24"),  # trailing bytes
])
def test_data_region_must_be_tiled_exactly(tmp_path, layout, msg):
    p = str(tmp_path / "x.safetensors")
    header = {n: {"dtype": "F32", "shape": [2], "data_offsets": o} for n, o in layout.items()}
    hb = json.dumps(header).encode()
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb + b"\0" * 24 if "24" in msg else
                 struct.pack("<Q", len(hb)) + hb + b"\0" * max(o[1] for o in layout.values()))
    with pytest.raises(CheckpointError, match=msg) as e:
        SafetensorsFile(p)
    assert str(e.value).startswith("x.safetensors:")


def test_zero_size_tensors_and_padding_still_read(tmp_path):
    """What the format allows still opens: empty tensors anywhere, header padded with spaces."""
    p = str(tmp_path / "ok.safetensors")
    save_file({"a": np.arange(3, dtype=np.float32), "e": np.zeros((0, 4), np.float32),
               "b": np.arange(5, dtype=np.int64)}, p)
    ck = Checkpoint.open(p)
    assert ck.get("e").shape == (0, 4) and ck.get("b").tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------- 2. config values finite

def _edit_config(d, fn):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    fn(cfg)
    with open(p, "w") as fh:
        json.dump(cfg, fh)          # json.dump writes NaN / Infinity as Python's json reads them
    return p


@pytest.mark.parametrize("field,value,msg", [
    ("rope_theta", float("nan"), "rope_theta = nan, expected a finite number"),
    ("rope_theta", float("inf"), "rope_theta = inf, expected a finite number"),
    ("rope_theta", -5.0, "rope_theta = -5.0, expected > 0"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps = nan"),
    ("rms_norm_eps", 3.0, "rms_norm_eps = 3.0, expected <= 1.0"),
    ("routed_scaling_factor", float("nan"), "routed_scaling_factor = nan"),
    ("routed_scaling_factor", "2", "routed_scaling_factor = '2'"),
    ("norm_topk_prob", "false", "norm_topk_prob = 'false', expected true or false"),
    ("moe_intermediate_size", 1.5, "moe_intermediate_size = 1.5"),
    ("eos_token_id", 10 ** 6, "eos_token_id = 1000000, expected an id below vocab_size"),
    ("hidden_size", True, "hidden_size = True, expected int"),
    ("num_hidden_layers", 10 ** 12, "num_hidden_layers = 1000000000000, expected <= 4096"),
    ("vocab_size", 10 ** 9, "vocab_size = 1000000000, expected <= 16777216"),
])
def test_config_numbers_finite_and_in_range(tiny_copy, field, value, msg):
    p = _edit_config(tiny_copy, lambda c: c["text_config"].__setitem__(field, value))
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")) as e:
        pykimi.load(tiny_copy)
    assert str(e.value).startswith(p) and "\n" not in str(e.value)


def test_rope_theta_nan_cli_is_an_error_not_nul_tokens(tiny_copy):
    """Was: rope_theta NaN ran and printed NUL characters (argmax of NaN logits = id 0)."""
    _edit_config(tiny_copy, lambda c: c["text_config"].__setitem__("rope_theta", float("nan")))
    one_line_error(cli("run", "-m", tiny_copy, "-p", "hi", "-n", "3"), "rope_theta = nan", "config.json")


def _poison(d, suffix):
    """Set one element of the tensor ending in `suffix` to NaN (bf16 quiet NaN bits)."""
    ck = Checkpoint.open(d)
    victim = next(n for n in ck.names() if n.endswith(suffix))
    f = ck.info(victim).file
    del ck
    sub = Checkpoint.open(f)
    out = {}
    for n in sub.names():
        st = sub.tensor(n)
        a = np.array(st.data)
        if n == victim:
            assert st.dtype == "BF16"
            a.flat[3] = 0x7FC0
        out[n] = Stored(n, st.dtype, a)
    del sub
    save_file(out, f)
    return victim


@pytest.mark.parametrize("suffix,stage", [
    ("layers.1.self_attn.o_proj.weight", "language_model.model.layers.1.self_attn"),
    ("layers.0.mlp.down_proj.weight", "language_model.model.layers.0.mlp"),
    ("language_model.lm_head.weight", "logits"),
    ("vision_tower.encoder.blocks.0.wo.weight", "vision_tower.encoder.blocks.0"),
])
def test_nonfinite_logits_name_the_first_stage(tiny_copy, suffix, stage):
    """Non-finite logits are a NumericsError naming where NaN first appears, never token 0."""
    _poison(tiny_copy, suffix)
    model = pykimi.load(tiny_copy)
    proc = pykimi.Processor.from_pretrained(tiny_copy)
    imgs = [IMG] if suffix.startswith("vision") else None
    content = [{"type": "image"}, {"type": "text", "text": "hi"}] if imgs else "hi"
    inputs = proc.prepare([{"role": "user", "content": content}], images=imgs)
    with pytest.raises(NumericsError, match="non-finite") as e:
        model.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                       image_grid_hws=inputs["image_grid_hws"], max_new_tokens=3)
    msg = str(e.value)
    print(msg)
    assert f"first appear at {stage}" in msg and (f"{stage}." not in msg.split("first appear at ")[1].split()[0])


def test_finite_run_unchanged_by_the_check(model_dir):
    """The per-step check does not change a normal run (ids equal to the golden greedy ids path)."""
    model = pykimi.load(model_dir)
    ids = model.generate([5, 6, 7], max_new_tokens=5, stop_ids=[])
    assert len(ids) == 5 and all(isinstance(i, int) for i in ids)


# ------------------------------------------------------------------------------- 3. sizes bounded first

def test_info_huge_layer_count_answers_at_once(tiny_copy, tmp_path):
    """Was: num_hidden_layers 1e12 made `pykimi info` run for minutes (1e7: 2.7 GB and growing)."""
    for n in (10 ** 12, 10 ** 7):
        _edit_config(tiny_copy, lambda c: c["text_config"].__setitem__("num_hidden_layers", n))
        t0 = time.time()
        one_line_error(cli("info", tiny_copy, timeout=60), "num_hidden_layers")
        assert time.time() - t0 < 30
    # within the absolute bound but more than the files hold: refused from the headers, before any table
    _edit_config(tiny_copy, lambda c: c["text_config"].__setitem__("num_hidden_layers", 4000))
    one_line_error(cli("info", tiny_copy, timeout=60), "need", "tensors", "checkpoint holds")
    with pytest.raises(ConfigError, match="checkpoint holds"):
        pykimi.load(tiny_copy)
    # sizes that keep the tensor count but need more bytes than stored (hidden size 100x)
    _edit_config(tiny_copy, lambda c: c["text_config"].update(num_hidden_layers=2, vocab_size=10 ** 6))
    with pytest.raises(ConfigError, match="bytes"):
        pykimi.load(tiny_copy)
    # config only (no weights): the summary is closed-form, so a large but valid count is instant
    cfg_only = str(tmp_path / "cfg")
    os.makedirs(cfg_only)
    shutil.copy(os.path.join(TINY, "config.json"), cfg_only)
    _edit_config(cfg_only, lambda c: c["text_config"].__setitem__("num_hidden_layers", 4096))
    r = cli("info", cfg_only, timeout=60)
    assert r.returncode == 0 and "4096 layers" in r.stdout, r.stderr


def test_moe_layer_count_closed_form():
    import dataclasses

    t = pykimi.load_config(TINY).text
    for L in range(0, 10):
        for a in range(0, 11):
            for f in range(1, 4):
                u = dataclasses.replace(t, num_hidden_layers=L, first_k_dense_replace=a, moe_layer_freq=f)
                assert u.n_moe_layers == sum(u.is_moe_layer(i) for i in range(L)), (L, a, f)


@pytest.mark.parametrize("path", [TINY, os.path.join(ROOT, "pykimi", "demo"),
                                  os.path.join(ROOT, "pykimi", "data", "reference_config.json")])
def test_tensor_count_formula_matches_layout(path):
    from pykimi.layout import expected_tensors

    c = pykimi.load_config(path)
    assert c.n_tensors() == len(expected_tensors(c, include_ignored=False))
