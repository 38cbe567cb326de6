"""The pykimi command, driven as a subprocess on the tiny checkpoint (plus a synthetic vocabulary)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import make_tiny_model_dir, sigint_as_a_terminal_leaves_it
from conftest import GOLDEN, ROOT

IMG = os.path.join(GOLDEN, "one_image", "images", "img0.png")


def cli(*args, stdin=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pykimi.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("cli") / "tiny"))


def test_run_json_with_image(model_dir):
    r = cli("run", "-m", model_dir, "--image", IMG, "-p", "What is this?", "-n", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["ids"]) == 6 and out["stats"]["prompt_tokens"] > 20  # 20 image tokens + the template
    assert out["stats"]["encode_s"] > 0 and out["peak_rss_mb"] > 0


def test_run_streams_and_prints_timing(model_dir):
    r = cli("run", "-m", model_dir, "-p", "hello", "-n", "5", "--seed", "1", "--temp", "0.8", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    timing = r.stderr.strip().splitlines()[-1]
    assert timing.startswith("[load") and "prefill" in timing and "decode 4 tok" in timing and "peak RSS" in timing


def test_run_greedy_matches_api(model_dir):
    """The command and the Python API give the same greedy ids for the same prompt."""
    import pykimi as pk

    r = cli("run", "-m", model_dir, "-p", "abc", "-n", "7", "--json")
    ids = json.loads(r.stdout)["ids"]
    proc = pk.Processor.from_pretrained(model_dir)
    model = pk.load(model_dir)
    inputs = proc.prepare([{"role": "user", "content": "abc"}])
    assert model.generate(inputs["input_ids"], max_new_tokens=7) == ids


@pytest.mark.parametrize("args,msg", [
    (["run", "-m", "/nonexistent/dir", "-p", "x"], "/nonexistent/dir"),
    (["run", "--image", "/nonexistent.png", "-p", "x"], "nonexistent.png"),
    (["info", "/nonexistent/dir"], "no such checkpoint directory"),
    (["diff", "/nonexistent_a.safetensors", "/nonexistent_b.safetensors"], "no such dump file"),
])
def test_errors_are_one_line_exit_2(model_dir, args, msg):
    if args[0] == "run" and "-m" not in args:
        args = args[:1] + ["-m", model_dir] + args[1:]
    r = cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykimi: error:") and msg in lines[0], r.stderr


@pytest.mark.parametrize("cmd", ["run", "chat", "serve", "batch", "bench"])
@pytest.mark.parametrize("flag, value, msg", [("--cache-dtype", "f16", "expected one of f32, bf16"),
                                              ("--act-quant", "fast", "expected one of q4, all, none")])
def test_bad_cache_dtype_or_act_quant_is_one_line_exit_2(model_dir, tmp_path, cmd, flag, value, msg):
    """--cache-dtype takes f32 or bf16, --act-quant q4, all or none; anything else is the one-line error (not
    argparse's usage block), before a model is loaded or a port taken."""
    extra = {"run": ["-p", "x"], "chat": [], "serve": ["--port", "0"],
             "batch": [str(tmp_path), "-o", str(tmp_path / "out.jsonl")], "bench": ["-p", "0", "-n", "2"]}[cmd]
    r = cli(cmd, "-m", model_dir, flag, value, *extra, stdin="")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines == [f"pykimi: error: {flag} {value}: {msg}"], r.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_run_act_quant_matches_api(model_dir):
    """`pykimi run --act-quant all` answers as pykimi.load(..., act_quant="all") does (the process-wide setting;
    on this CPU's kernels "all" may round differently from the default), and `pykimi bench --json` names the mode."""
    import pykimi as pk
    from pykimi import kernels

    r = cli("run", "-m", model_dir, "-p", "abc", "-n", "7", "--json", "--act-quant", "all")
    assert r.returncode == 0, r.stderr
    prev = kernels.act_quant()
    try:
        model = pk.load(model_dir, act_quant="all")
        assert kernels.act_quant() == "all"
        inputs = pk.Processor.from_pretrained(model_dir).prepare([{"role": "user", "content": "abc"}])
        assert model.generate(inputs["input_ids"], max_new_tokens=7) == json.loads(r.stdout)["ids"]
        with pytest.raises(pk.InputError, match=r"act_quant='fast': expected one of q4, all, none"):
            pk.load(model_dir, act_quant="fast")
        assert kernels.act_quant() == "all"                 # a refused value leaves the setting alone
    finally:
        kernels.set_act_quant(prev)
    b = cli("bench", "-m", model_dir, "-p", "8", "-n", "0", "-r", "1", "--json", "--act-quant", "none")
    assert b.returncode == 0, b.stderr
    assert json.loads(b.stdout.splitlines()[0])["act_quant"] == "none"


def test_run_bf16_cache_matches_api(model_dir):
    import pykimi as pk

    r = cli("run", "-m", model_dir, "-p", "abc", "-n", "7", "--json", "--cache-dtype", "bf16")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    model = pk.load(model_dir, cache_dtype="bf16")
    inputs = pk.Processor.from_pretrained(model_dir).prepare([{"role": "user", "content": "abc"}])
    assert model.generate(inputs["input_ids"], max_new_tokens=7) == out["ids"]
    assert out["stats"]["cache_bytes"] == model.last_stats["cache_bytes"] == \
        (out["stats"]["prompt_tokens"] + 7) * model.new_cache(1, dtype="f32").bytes_per_token() // 2


def test_debug_flag_shows_traceback(model_dir):
    r = cli("--debug", "info", "/nonexistent/dir")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_info_real_config_and_backends():
    r = cli("info", os.path.join(ROOT, "pykimi", "data", "reference_config.json"))
    assert r.returncode == 0, r.stderr
    assert "total 16.41 B" in r.stdout and "active per token 2.91 B" in r.stdout
    r = cli("info", "--backends")
    assert r.returncode == 0 and "active:" in r.stdout and "numpy" in r.stdout


def test_info_tiny_lists_tensors(model_dir):
    r = cli("info", model_dir, "--tensors")
    assert r.returncode == 0, r.stderr
    assert "complete: yes" in r.stdout and "language_model.lm_head.weight" in r.stdout


def test_chat_multi_turn_with_image_and_reset(model_dir):
    script = f"hello\n/image {IMG}\nwhat is this?\n/reset\nagain\n/quit\n"
    r = cli("chat", "-m", model_dir, "-n", "4", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "(attached" in r.stderr and "(conversation reset: history and 1 image(s) dropped" in r.stderr
    assert r.stderr.count("[load") == 3  # one timing line per answer


def test_chat_bad_image_keeps_session(model_dir):
    r = cli("chat", "-m", model_dir, "-n", "2", stdin="/image /nope.png\nhi\n")
    assert r.returncode == 0 and "error:" in r.stderr and r.stderr.count("[load") == 1


def test_trace_and_diff_against_golden(model_dir, tmp_path):
    out = str(tmp_path / "dump.safetensors")
    case = os.path.join(GOLDEN, "two_images")
    r = cli("trace", "-m", model_dir, "--inputs", os.path.join(case, "inputs.safetensors"), "--out", out)
    assert r.returncode == 0, r.stderr
    r = cli("diff", out, case)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all compared tensors agree" in r.stdout and "vision_tower.encoder.blocks.1" in r.stdout
    r = cli("trace", "-m", model_dir, "--inputs", os.path.join(case, "inputs.safetensors"), "--out", out,
               "--names", "multi_modal_projector*")
    from pykimi.weights import Checkpoint

    assert Checkpoint.open(out).names() == ["multi_modal_projector", "multi_modal_projector.linear_1",
                                            "multi_modal_projector.pre_norm"]


def test_quantize_command_and_load(model_dir, tmp_path):
    dst = str(tmp_path / "q8")
    r = cli("quantize", model_dir, dst, "--bits", "8", "--what", "all", "--quiet")
    assert r.returncode == 0, r.stderr
    r = cli("info", dst)
    assert r.returncode == 0 and "complete: yes" in r.stdout and "quantized" in r.stdout, r.stdout
    r = cli("quantize", model_dir, dst, "--bits", "8", "--quiet")          # refuses to overwrite
    assert r.returncode == 2 and "already exists" in r.stderr
    r = cli("run", "-m", dst, "-p", "abc", "-n", "4", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["ids"]) == 4, r.stderr


def test_run_without_model_uses_demo_and_draws_a_scene(tmp_path):
    scene = str(tmp_path / "scene.png")
    r = cli("run", "--json", "-n", "40", "--seed", "3", "--save-scene", scene)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"].endswith(os.path.join("pykimi", "demo")) and out["prompt"] == "Describe the image."
    assert os.path.exists(scene) and out["images"] == [scene]
    assert out["text"].startswith("A ") and out["text"].endswith(".")   # the demo's description form


def test_chat_ctrl_c_stops_the_answer_not_the_session(model_dir, tmp_path):
    import shutil
    import signal
    import threading
    import time

    # The tiny model decodes its 4096-token context in about two seconds, which a loaded machine can spend
    # before this process even reads the first streamed byte: the answer must outlast any such delay, so the
    # copy here allows 131072 positions (the real model's context) and asks for 100000 tokens (over a minute).
    long_dir = str(tmp_path / "long")
    shutil.copytree(model_dir, long_dir)
    cfg_path = os.path.join(long_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["text_config"]["max_position_embeddings"] = 131072
    json.dump(cfg, open(cfg_path, "w"), indent=1)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "pykimi.cli", "chat", "-m", long_dir, "-n", "100000",
                          "--ignore-eos"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=ROOT, preexec_fn=sigint_as_a_terminal_leaves_it)
    got: list = []
    errs: list = []
    for stream, sink in ((p.stdout, got), (p.stderr, errs)):
        threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(lambda: s.read(1), "")), daemon=True).start()

    def err_text():
        return "".join(errs)

    try:
        p.stdin.write("tell me a long story\n")
        p.stdin.flush()
        t0 = time.time()
        while not got and time.time() - t0 < 120 and p.poll() is None:   # loading time varies with the machine
            time.sleep(0.05)
        assert got, "no answer text streamed within 120 s\n" + err_text()
        p.send_signal(signal.SIGINT)
        t0 = time.time()
        while time.time() - t0 < 60 and "(stopped)" not in err_text() and p.poll() is None:
            time.sleep(0.05)
        assert "decode " not in err_text(), "the answer ran to its end: " + err_text()
        p.stdin.write("/quit\n")
        p.stdin.flush()
        p.stdin.close()
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    time.sleep(0.2)
    err = err_text()
    assert p.returncode == 0, err
    assert "(stopped)" in err, err
