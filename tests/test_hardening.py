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

from cli_helpers import make_tiny_model_dir, sigint_as_a_terminal_leaves_it
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


# ------------------------------------------------------------------------------- 4. quantize: no lost files

def test_quantize_into_the_parent_of_the_source_is_refused(tmp_path, model_dir):
    """Was: `pykimi quantize X/ck X --overwrite` exited 0 and deleted the source X/ck."""
    x = tmp_path / "X"
    x.mkdir()
    src = str(x / "ck")
    shutil.copytree(model_dir, src)
    before = tree_hash(str(x))
    one_line_error(cli("quantize", src, str(x), "--overwrite", "--quiet"), "contains the source")
    one_line_error(cli("quantize", src, os.path.join(src, "q8"), "--quiet"), "inside it")
    one_line_error(cli("quantize", src, src + "/", "--overwrite", "--quiet"), "is the source")
    os.symlink(str(x), str(tmp_path / "link"))                              # through a symlink
    one_line_error(cli("quantize", src, str(tmp_path / "link"), "--overwrite", "--quiet"), "contains the source")
    os.symlink(src, str(tmp_path / "srclink"))
    one_line_error(cli("quantize", str(tmp_path / "srclink"), os.path.join(src, "sub"), "--quiet"), "inside it")
    assert tree_hash(str(x)) == before


def test_quantize_refuses_when_dst_partial_is_the_source(tmp_path, model_dir):
    src = str(tmp_path / "out.partial")             # the cleanup of DST.partial would delete it
    shutil.copytree(model_dir, src)
    before = tree_hash(src)
    one_line_error(cli("quantize", src, str(tmp_path / "out"), "--quiet"), "source")
    assert tree_hash(src) == before


def test_quantize_overwrite_onto_a_file_leaves_nothing_stray(tmp_path, model_dir):
    """Was: --overwrite onto a file left `afile.old` behind."""
    f = tmp_path / "afile"
    f.write_text("x")
    r = cli("quantize", model_dir, str(f), "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert os.path.isdir(str(f)) and sorted(os.listdir(str(tmp_path))) == ["afile"]
    assert pykimi.load(str(f)) is not None
    # a directory that holds no checkpoint is never replaced, even with --overwrite (a mistyped `.` or `~`)
    d = tmp_path / "notes"
    d.mkdir()
    (d / "todo.txt").write_text("keep me")
    one_line_error(cli("quantize", model_dir, str(d), "--overwrite", "--quiet"), "without a checkpoint")
    assert (d / "todo.txt").read_text() == "keep me"


def _slow_quantize_proc(src, dst):
    """`pykimi quantize` in a subprocess with every tensor slowed down, so a signal lands mid-write."""
    code = ("import sys, time, pykimi.quant as q\n"
            "real = q._quantize\n"
            "def slow(*a, **k):\n    time.sleep(0.3)\n    return real(*a, **k)\n"
            "q._quantize = slow\n"
            "from pykimi.cli import main\n"
            f"sys.exit(main(['quantize', {src!r}, {dst!r}, '--bits', '8', '--what', 'all', '--quiet']))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT, preexec_fn=sigint_as_a_terminal_leaves_it)


@pytest.mark.parametrize("sig,status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_quantize_signal_cleans_up_partial(tmp_path, model_dir, sig, status):
    """Was: SIGTERM left DST.partial/ with a half-written shard (SIGINT was clean)."""
    import signal

    dst = str(tmp_path / "q8")
    p = _slow_quantize_proc(model_dir, dst)
    try:
        t0 = time.time()
        while not any(f.endswith(".tmp") for f in (os.listdir(dst + ".partial") if os.path.isdir(dst + ".partial")
                                                   else [])):
            assert time.time() - t0 < 120 and p.poll() is None, "the repack never started writing"
            time.sleep(0.05)
        p.send_signal(getattr(signal, sig))
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == status, err
    assert "Traceback" not in err
    assert sorted(os.listdir(str(tmp_path))) == [], os.listdir(str(tmp_path))


def test_quantize_leftover_partial_cleaned_with_a_message(tmp_path, model_dir):
    dst = str(tmp_path / "q8")
    os.makedirs(dst + ".partial")
    open(os.path.join(dst + ".partial", ".pykimi-partial"), "w").close()   # as an interrupted run leaves it
    open(os.path.join(dst + ".partial", "model-00001-of-00002.safetensors.tmp"), "wb").write(b"half")
    r = cli("quantize", model_dir, dst, "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"removing {dst}.partial, left by an interrupted repack" in r.stderr
    assert sorted(os.listdir(str(tmp_path))) == ["q8"] and ".pykimi-partial" not in os.listdir(dst)
    # a DST.partial pykimi did not make is not deleted
    dst2 = str(tmp_path / "q4")
    os.makedirs(dst2 + ".partial")
    (tmp_path / "q4.partial" / "mine.txt").write_text("keep")
    one_line_error(cli("quantize", model_dir, dst2, "--quiet"), "not made by pykimi")
    assert (tmp_path / "q4.partial" / "mine.txt").read_text() == "keep"


def test_quantize_refuses_source_with_invalid_config(tiny_copy, tmp_path):
    """Was: quantize repacked a source whose config.json was invalid."""
    _edit_config(tiny_copy, lambda c: c["text_config"].__setitem__("rope_theta", float("nan")))
    dst = str(tmp_path / "q")
    one_line_error(cli("quantize", tiny_copy, dst, "--quiet"), "rope_theta = nan")
    assert not os.path.exists(dst) and not os.path.exists(dst + ".partial")


@pytest.mark.parametrize("where", ["proc", "under_file", "readonly"])
def test_quantize_unwritable_destination_one_line(tmp_path, model_dir, where):
    """Was: a traceback (status 1) for /proc/x, a path under a file, an unwritable directory."""
    if where == "proc":
        dst = "/proc/pykimi_x"
    elif where == "under_file":
        (tmp_path / "f").write_text("x")
        dst = str(tmp_path / "f" / "q8")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories (the /proc case covers the path)")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        dst = str(ro / "q8")
    one_line_error(cli("quantize", model_dir, dst, "--quiet"), "cannot create the destination")
    if where == "under_file":
        assert sorted(os.listdir(str(tmp_path))) == ["f"]


# ------------------------------------------------------------------------------- 5. one-line errors

def test_trace_out_onto_a_directory_or_unwritable(tmp_path, model_dir):
    """Was: a traceback, and DIR.tmp left behind."""
    case = os.path.join(GOLDEN, "text_only", "inputs.safetensors")
    d = tmp_path / "dumps"
    d.mkdir()
    one_line_error(cli("trace", "-m", model_dir, "--inputs", case, "--out", str(d)), "is a directory")
    assert sorted(os.listdir(str(tmp_path))) == ["dumps"] and os.listdir(str(d)) == []
    one_line_error(cli("trace", "-m", model_dir, "--inputs", case, "--out", "/proc/pykimi.safetensors"),
                   "cannot write in /proc")
    (tmp_path / "afile").write_text("x")
    one_line_error(cli("trace", "-m", model_dir, "--inputs", case, "--out", str(tmp_path / "afile" / "t.st")),
                   "is a file, not a directory")


def test_trace_inputs_without_input_ids(tmp_path, model_dir):
    """Was: KeyError traceback."""
    p = str(tmp_path / "in.safetensors")
    save_file({"pixel_values": np.zeros((4, 3, 14, 14), np.float32)}, p)
    one_line_error(cli("trace", "-m", model_dir, "--inputs", p, "--out", str(tmp_path / "o.safetensors")),
                   "has no 'input_ids'", "in.safetensors")
    assert not os.path.exists(str(tmp_path / "o.safetensors"))


def test_run_in_a_read_only_directory_saves_the_scene_elsewhere():
    """Was: a traceback when the demo scene could not be saved in the working directory (here /proc)."""
    r = cli("run", "--json", "-n", "8", "--seed", "3", cwd="/proc")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["images"]) == 1 and out["images"][0] != "/proc/pykimi_scene.png"
    assert os.path.exists(out["images"][0])
    r = cli("run", "-n", "4", "--seed", "3", cwd="/proc")
    assert r.returncode == 0 and "the working directory is not writable" in r.stderr, r.stderr
    r = cli("run", "-n", "4", "--save-scene", "/proc/s.png")                  # asked for: an error
    one_line_error(r, "--save-scene /proc/s.png: cannot write")


def test_seed_minus_one_means_random(model_dir):
    """Was: ValueError traceback. -1 is llama.cpp's 'random'."""
    r = cli("run", "-m", model_dir, "-p", "hi", "-n", "3", "--temp", "0.9", "--seed", "-1", "--json",
            "--ignore-eos")
    assert r.returncode == 0 and len(json.loads(r.stdout)["ids"]) == 3, r.stderr
    r = cli("run", "-m", model_dir, "-p", "hi", "--seed", "-7")
    assert r.returncode == 2 and "-1 for a random seed" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------- 6. diff: nothing compared

def test_diff_with_nothing_compared_fails(tmp_path):
    """Was: 'all compared tensors agree', status 0, with no tensor in common or --names matching nothing."""
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"x": np.ones(3, np.float32)}, a)
    save_file({"y": np.ones(3, np.float32)}, b)
    r = cli("diff", a, b)
    assert r.returncode == 1 and "nothing compared: A (1 tensors) and B (1 tensors) have no tensor name in " \
        "common" in r.stdout and "agree" not in r.stdout, r.stdout
    r = cli("diff", a, a, "--names", "nomatch*")
    assert r.returncode == 1 and "--names nomatch* matched none of the 1 tensors" in r.stdout, r.stdout
    r = cli("diff", a, a)
    assert r.returncode == 0 and "all compared tensors agree" in r.stdout
    for bad in (["--rel", "-1"], ["--rel", "0"], ["--rel", "nan"], ["--atol", "-1"], ["--rtol", "inf"]):
        r = cli("diff", a, a, *bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr and bad[0] in r.stderr, (bad, r.stderr)
    from pykimi.debug import compare

    assert not compare({"x": np.ones(2)}, {"y": np.ones(2)}).ok


# ------------------------------------------------------------------------------- 7. surprises

def test_demo_question_without_image_draws_a_scene(tmp_path):
    """Was: `run -p "How many shapes are there?"` on the demo answered about no image at all."""
    scene = str(tmp_path / "s.png")
    r = cli("run", "-p", "How many shapes are there?", "-n", "12", "--seed", "5", "--save-scene", scene, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == [scene] and os.path.exists(scene) and out["stats"]["images"] == 1
    assert out["text"].startswith("There ") and out["text"].endswith("."), out["text"]
    r = cli("run", "-p", "How many shapes are there?", "-n", "12", "--seed", "5", "--save-scene", scene)
    assert "(no --image: the demo model answers questions about an image; drew a random scene" in r.stderr


def test_chat_reset_and_unknown_commands(model_dir):
    script = (f"/image {IMG}\nwhat is this?\n/frobnicate now\n//etc is a folder\n/reset\nagain\n/image\n"
              f"/help\n/quit\n")
    r = cli("chat", "-m", model_dir, "-n", "3", stdin=script)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "unknown command '/frobnicate'; commands: /image PATH" in err
    assert "(conversation reset: history and 1 image(s) dropped; /image PATH to attach one again)" in err
    assert "error: /image needs a path" in err
    assert err.count("[load") == 3     # answers to 'what is this?', '/etc is a folder' and 'again' only


def test_chat_on_demo_without_image_notes_it():
    r = cli("chat", "-n", "3", stdin="How many shapes are there?\n/quit\n")
    assert r.returncode == 0 and "(note: no image attached; the demo model answers questions about an image" \
        in r.stderr, r.stderr


def test_max_context_zero_and_model_file(model_dir):
    """Was: --max-context 0 meant 'no limit'; -m config.json gave a header-length message."""
    r = cli("run", "-m", model_dir, "-p", "hi", "--max-context", "0")
    assert r.returncode == 2 and "--max-context" in r.stderr and "expected a positive integer" in r.stderr
    cfg = os.path.join(model_dir, "config.json")
    one_line_error(cli("run", "-m", cfg, "-p", "hi"), "this is a file; pass the checkpoint directory",
                   f"-m {model_dir}")
    with pytest.raises(CheckpointError, match="this is a file; pass the checkpoint directory"):
        pykimi.load(cfg)
    shard = os.path.join(model_dir, SHARD1)
    one_line_error(cli("info", shard), "this is a file; pass the checkpoint directory")


def test_version_and_common_aliases(model_dir):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"pykimi {pykimi.__version__}"
    r = cli("run", "-m", model_dir, "-p", "hi", "--max-tokens", "3", "--temperature", "0", "-c", "200", "--json",
            "--ignore-eos")
    assert r.returncode == 0 and len(json.loads(r.stdout)["ids"]) == 3, r.stderr
    r = cli("run", "-m", model_dir, "-p", "hello there", "--ctx-size", "5")
    one_line_error(r, "context limit")


def test_16bit_png_keeps_its_range(tmp_path):
    """Was: a 16-bit PNG became all white (Pillow clips I;16 to 255 in convert('RGB'))."""
    from PIL import Image
    from pykimi.image import preprocess_image

    a = np.zeros((28, 56), np.uint16)
    a[:, 28:] = 65535                       # left half black, right half white
    a[:14, :28] = 32896                     # a mid grey: round(32896 * 255 / 65535) = 128
    p = str(tmp_path / "g16.png")
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    pv, g = preprocess_image(p)
    assert g == (2, 4)
    x = pv * 0.5 + 0.5                      # undo mean = std = 0.5
    # patches in raster order: row 0 = grey, grey, white, white; row 1 = black, black, white, white
    assert np.allclose(x[:2], 128 / 255) and np.allclose(x[4:6], 0.0) and np.allclose(x[[2, 3, 6, 7]], 1.0)


def test_image_between_bomb_limits_is_refused(tmp_path, monkeypatch):
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that and then decodes it all: refused instead."""
    from PIL import Image
    from pykimi.image import load_image

    p = str(tmp_path / "big.png")
    Image.new("RGB", (50, 30)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)          # 1500 pixels: in the warning band
    with pytest.raises(InputError, match="big.png.*decompression-bomb limit"):
        load_image(p)


def test_png_with_a_damaged_data_byte_is_refused(tmp_path):
    """Found by the fuzz: Pillow skips the image-data chunks' CRCs, so one flipped IDAT byte decoded to other
    pixels without an error. Every chunk's CRC is now checked."""
    import io

    from PIL import Image
    from pykimi.image import preprocess_image

    img = Image.fromarray(np.random.default_rng(95).integers(0, 256, (6, 21, 3), dtype=np.uint8)).convert("RGBA")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    good = buf.getvalue()
    i = 193                                            # the fuzz's case: inside IDAT, Pillow decodes other pixels
    assert good.index(b"IDAT") < i < good.index(b"IEND")
    bad = good[:i] + bytes([good[i] ^ 0x40]) + good[i + 1:]
    p = tmp_path / "flip.png"
    p.write_bytes(bad)
    with pytest.raises(InputError, match="flip.png': truncated or corrupt image .PNG chunk 'IDAT' fails its CRC"):
        preprocess_image(str(p))


def test_null_optional_config_ints_take_their_default(tiny_copy):
    """Found by the fuzz: "first_k_dense_replace": null raised a TypeError (a traceback) at load."""
    base = pykimi.load_config(tiny_copy).text
    _edit_config(tiny_copy, lambda c: c["text_config"].update(first_k_dense_replace=None, n_group=None))
    t = pykimi.load_config(tiny_copy).text
    assert t.first_k_dense_replace == 0 and t.n_group == 1 and base.first_k_dense_replace == 1
    with pytest.raises(ConfigError, match="config.json: these sizes need 146 tensors .* holds 123"):
        pykimi.load(tiny_copy)                 # layer 0 is then a MoE layer: its experts are not in the files


def test_quantize_overwrite_keeps_a_users_dst_old(tmp_path, model_dir):
    """The swap used to clear DST.old first: a user's directory of that name was deleted."""
    dst = tmp_path / "q8"
    r = cli("quantize", model_dir, str(dst), "--quiet")
    assert r.returncode == 0, r.stderr
    (tmp_path / "q8.old").mkdir()
    (tmp_path / "q8.old" / "notes.txt").write_text("mine")
    r = cli("quantize", model_dir, str(dst), "--overwrite", "--bits", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q8.old" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(str(tmp_path))) == ["q8", "q8.old"]


def test_engine_never_turns_nan_logits_into_a_token(tiny_copy):
    """The batched engine (pykimi serve, batch --parallel) fails the request with a NumericsError, as
    generate does, instead of emitting token 0; the engine goes on serving a healthy model's requests."""
    from pykimi.engine import Engine, SamplingParams

    _poison(tiny_copy, "language_model.lm_head.weight")
    eng = Engine(pykimi.load(tiny_copy), parallel=2)
    eng.start()
    try:
        req = eng.submit([5, 6, 7], params=SamplingParams(max_new_tokens=3))
        with pytest.raises(NumericsError, match=r"non-finite values \(NaN/inf\) in the logits after the prompt"):
            for _ in req:
                pass
            req.result()
        assert eng.metrics["requests_failed"] == 1
    finally:
        eng.stop()
