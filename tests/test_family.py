"""The family from one code path: variants named from their own files, the Thinking-2506 image budget read
from preprocessor_config.json, generation_config.json defaults under the flags, and Moonlight (the language model
alone, flat config, model.* names) giving the very logits of the Kimi-VL checkpoint it was cut from."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from family_helpers import make_kimi_vl_dir, to_moonlight_layout

import pykimi
from pykimi.errors import ConfigError, InputError
from pykimi.variants import detect_variant, generation_defaults


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pykimi.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    t = tmp_path_factory.mktemp("family")
    d = {
        "plain": make_kimi_vl_dir(t / "plain"),
        "instruct": make_kimi_vl_dir(t / "instruct", name="Kimi-VL-A3B-Instruct",
                                     generation={"temperature": 0.2, "max_new_tokens": 5}),
        "thinking": make_kimi_vl_dir(t / "thinking", name="Kimi-VL-A3B-Thinking"),
        "2506": make_kimi_vl_dir(t / "2506", name="Kimi-VL-A3B-Thinking-2506", in_token_limit=16384,
                                 generation={"do_sample": True, "temperature": 0.8, "top_p": 0.9,
                                             "max_new_tokens": 7, "eos_token_id": [257, 258]}),
    }
    d["moonlight"] = to_moonlight_layout(d["plain"], str(t / "moonlight"), name="Moonlight-16B-A3B-Instruct")
    d["moonlight_theta"] = to_moonlight_layout(d["plain"], str(t / "moonlight_theta"), rope_theta=50000.0,
                                               max_position_embeddings=2048)
    return d


@pytest.mark.parametrize("key, name, thinking, family, layout", [
    ("instruct", "Kimi-VL-A3B-Instruct", False, "kimi_vl", "kimi_vl"),
    ("thinking", "Kimi-VL-A3B-Thinking", True, "kimi_vl", "kimi_vl"),
    ("2506", "Kimi-VL-A3B-Thinking-2506", True, "kimi_vl", "kimi_vl"),
    ("moonlight", "Moonlight-16B-A3B-Instruct", False, "moonlight", "flat"),
])
def test_variant_named_from_its_files(dirs, key, name, thinking, family, layout):
    v = detect_variant(dirs[key])
    assert (v.name, v.thinking, v.family, v.layout) == (name, thinking, family, layout), v.summary()
    assert any("config.json _name_or_path" in e for e in v.evidence)


def test_variant_unnamed_says_so(dirs):
    v = detect_variant(dirs["plain"])
    assert "do not name" in v.name and v.thinking is None
    v = detect_variant(dirs["moonlight_theta"])
    assert v.family == "moonlight" and "base or Instruct" in v.name
    assert (v.rope_theta, v.context_length) == (50000.0, 2048)        # its own, from its config.json


def test_variant_from_cache_path_and_model_card(tmp_path, dirs):
    import shutil
    snap = tmp_path / "models--moonshotai--Kimi-VL-A3B-Thinking-2506" / "snapshots" / "0123abc"
    shutil.copytree(dirs["plain"], snap)
    assert detect_variant(str(snap)).name == "Kimi-VL-A3B-Thinking-2506"
    card = tmp_path / "card"
    shutil.copytree(dirs["plain"], card)
    (card / "README.md").write_text("---\nlicense: mit\n---\n# Kimi-VL-A3B-Thinking\n\ntext\n")
    v = detect_variant(str(card))
    assert v.name == "Kimi-VL-A3B-Thinking" and v.thinking is True and "README.md title" in v.evidence[0]


def test_2506_image_budget_from_preprocessor_config(dirs):
    """A 100x100-patch image (10,000 patches) is resized under a 4,096 budget and kept whole under 2506's file."""
    img = Image.new("RGB", (1400, 1400), (120, 30, 200))
    v_small, v_big = detect_variant(dirs["instruct"]), detect_variant(dirs["2506"])
    assert (v_small.image_token_limit, v_big.image_token_limit) == (4096, 16384)
    small = pykimi.Processor.from_pretrained(dirs["instruct"])
    big = pykimi.Processor.from_pretrained(dirs["2506"])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    g_small = small.prepare(msgs, images=[img])["image_grid_hws"][0]
    g_big = big.prepare(msgs, images=[img])["image_grid_hws"][0]
    assert int(g_small[0]) * int(g_small[1]) <= 4096 < 10000 == int(g_big[0]) * int(g_big[1])


def test_info_names_the_variant(dirs):
    r = cli("info", dirs["2506"])
    assert r.returncode == 0, r.stderr
    assert "variant: Kimi-VL-A3B-Thinking-2506" in r.stdout and "up to 16384 patches" in r.stdout
    r = cli("info", dirs["moonlight"], "--tensors")
    assert r.returncode == 0, r.stderr
    assert "variant: Moonlight-16B-A3B-Instruct" in r.stdout and "no vision tower" in r.stdout
    assert "complete: yes" in r.stdout
    listed = [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("    ")]
    assert "lm_head.weight" in listed and "model.norm.weight" in listed          # the names in the file
    assert not any(n.startswith(("language_model", "vision_tower")) for n in listed)


# ------------------------------------------------------------------------------------------ generation_config
def test_generation_defaults_read(dirs):
    g = generation_defaults(dirs["2506"])
    assert g == {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 7, "stop_ids": [257, 258]}
    assert generation_defaults(dirs["plain"]) == {}


@pytest.mark.parametrize("content, match", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 1.5}, "top_k"),
    ({"eos_token_id": "x"}, "eos_token_id"), ([1, 2], "JSON object"), ("{not json", "not valid JSON"),
])
def test_generation_config_bad_values(tmp_path, content, match):
    p = tmp_path / "generation_config.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=match) as e:
        generation_defaults(str(tmp_path))
    assert "generation_config.json" in str(e.value) and "\n" not in str(e.value)


def test_cli_uses_generation_config_and_flags_override(dirs):
    r = cli("run", "-m", dirs["2506"], "-p", "hi", "--json", "--seed", "3", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert len(j["ids"]) == 7 and j["options"]["temp"] == 0.8 and j["options"]["top_p"] == 0.9
    assert j["option_sources"]["max_new_tokens"] == "generation_config.json"
    assert j["option_sources"]["top_k"] == "default"
    r = cli("run", "-m", dirs["2506"], "-p", "hi", "--json", "-n", "3", "--temp", "0", "--ignore-eos")
    j = json.loads(r.stdout)
    assert len(j["ids"]) == 3 and j["options"]["temp"] == 0.0 and j["option_sources"]["temp"] == "flag"


def test_generation_config_stop_ids_stop(dirs, tmp_path):
    """An eos id listed only in generation_config.json stops the answer too."""
    m = pykimi.load(dirs["plain"])
    proc = pykimi.Processor.from_pretrained(dirs["plain"])
    ids = proc.prepare([{"role": "user", "content": "hi"}])["input_ids"]
    free = m.generate(ids, max_new_tokens=12, stop_ids=[])
    stop = free[4]
    d = make_kimi_vl_dir(tmp_path / "stop", generation={"eos_token_id": [int(stop)]})
    r = cli("run", "-m", d, "-p", "hi", "--json", "-n", "12")
    j = json.loads(r.stdout)
    assert j["ids"] == free[:free.index(stop) + 1]


# ------------------------------------------------------------------------------------------ Moonlight
def test_moonlight_logits_identical(dirs):
    kimi = pykimi.load(dirs["plain"])
    moon = pykimi.load(dirs["moonlight"])
    assert moon.config.vision is None and moon.config.layout == "flat"
    ids = np.array([256, 3, 77, 100, 511, 42, 9, 276, 300, 5], dtype=np.int64)
    a, b = kimi.forward(ids), moon.forward(ids)
    assert a.shape == b.shape and np.array_equal(a, b)
    assert kimi.generate(ids, max_new_tokens=8, stop_ids=[]) == moon.generate(ids, max_new_tokens=8, stop_ids=[])
    # the names in the file are Moonlight's; the model reads them under the one table of names
    assert moon.ckpt.stored_names["language_model.lm_head.weight"] == "lm_head.weight"


def test_moonlight_own_rope_theta_changes_logits(dirs):
    ids = np.arange(1, 30, dtype=np.int64)
    a = pykimi.load(dirs["plain"]).forward(ids)
    b = pykimi.load(dirs["moonlight_theta"]).forward(ids)
    # position 0 is not rotated (equal up to the rounding of the kernels' batched sums); later ones are
    assert np.abs(a[0] - b[0]).max() <= 1e-5 * np.abs(a[0]).max()
    assert np.abs(a[5:] - b[5:]).max() > 1e-2 * np.abs(a[5:]).max()


def test_moonlight_chat_and_images_refused(dirs):
    proc = pykimi.Processor.from_pretrained(dirs["moonlight"])
    text = proc.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "provided by Moonshot-AI" in text                            # its own template, from its files
    assert proc.tokenizer.media_pad_id is None
    with pytest.raises(InputError, match="cannot take images"):
        proc(text="x", images=[Image.new("RGB", (28, 28))])
    r = cli("run", "-m", dirs["moonlight"], "-p", "hello", "-n", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["ids"]) <= 4
    img = os.path.join(ROOT, "tests", "golden", "one_image", "images", "img0.png")
    r = cli("run", "-m", dirs["moonlight"], "--image", img, "-p", "hello", "-n", "4")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot take images" in r.stderr
    m = pykimi.load(dirs["moonlight"])
    with pytest.raises(InputError, match="no vision tower"):
        m.forward(np.array([1, 2]), pixel_values=np.zeros((4, 3, 14, 14), np.float32),
                  image_grid_hws=np.array([[2, 2]]))


def test_moonlight_missing_tensor_named(dirs, tmp_path):
    from pykimi.errors import CheckpointError
    from pykimi.weights import Checkpoint, SafetensorsWriter, Stored

    d = tmp_path / "cut"
    os.makedirs(d)
    for f in ("config.json", "tiktoken.model", "tokenizer_config.json"):
        with open(os.path.join(dirs["moonlight"], f), "rb") as a, open(d / f, "wb") as b:
            b.write(a.read())
    ck = Checkpoint.open(os.path.join(dirs["moonlight"], "model.safetensors"))   # a file alone: names as stored
    assert "model.norm.weight" in ck
    with SafetensorsWriter(str(d / "model.safetensors")) as w:
        for n in ck.names():
            if n != "model.norm.weight":
                t = ck.tensor(n)
                w.add(n, Stored(n, t.dtype, t.data))
    with pytest.raises(CheckpointError, match="norm.weight"):
        pykimi.load(str(d))


def test_moonlight_quantized_repack_equals_kimi_vl_repack(dirs, tmp_path):
    """int8 repacks of the two layouts give the same logits (the repack writes the one table of names)."""
    from pykimi.quant import quantize_checkpoint

    quantize_checkpoint(dirs["plain"], str(tmp_path / "k8"), bits=8, what="all", progress=False)
    quantize_checkpoint(dirs["moonlight"], str(tmp_path / "m8"), bits=8, what="all", progress=False)
    ids = np.arange(3, 40, dtype=np.int64)
    a = pykimi.load(str(tmp_path / "k8")).forward(ids)
    b = pykimi.load(str(tmp_path / "m8")).forward(ids)
    assert np.array_equal(a, b)
    assert detect_variant(str(tmp_path / "m8")).family == "moonlight"
    from pykimi.weights import Checkpoint
    q = [n for n in Checkpoint.open(str(tmp_path / "m8")).names() if n.endswith(".qweight")]
    assert len(q) == len([n for n in Checkpoint.open(str(tmp_path / "k8")).names() if n.endswith(".qweight")]) > 10
