"""bench/bench_longctx.py on the demo checkpoint with small lengths: the result rows' fields and shapes, the
attention share in (0, 1], the synthetic rows' statistics, the memory check and the one-line errors. No speed
is asserted (DESIGN.md: speed is measured by bench/, never by a test)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

import pykimi

SCRIPT = os.path.join(ROOT, "bench", "bench_longctx.py")


def _module():
    spec = importlib.util.spec_from_file_location("bench_longctx", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("cache_dtype", ["f32", "bf16"])
def test_longctx_rows_on_demo(tmp_path, cache_dtype):
    out = tmp_path / "lc.json"
    r = _cli("--lengths", "256,64", "--tokens", "3", "--warmup", "1", "--cache-dtype", cache_dtype,
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    m = pykimi.load(pykimi.demo_checkpoint(), cache_dtype=cache_dtype)
    bpt = m.new_cache(1).bytes_per_token()
    assert res["cache_dtype"] == cache_dtype and res["cache_bytes_per_token"] == bpt
    assert [row["cached"] for row in res["results"]] == [64, 256]          # sorted, one row per length
    for row in res["results"]:
        where = f"{cache_dtype} N={row['cached']}"
        assert not row["clamped"] and row["requested"] == row["cached"], where
        assert row["tokens"] == 3 and len(row["token_ids"]) == 3, where
        assert 0 < row["ms_per_token_median"] and row["ms_per_token_mean"] > 0 and row["ms_per_token_p99"] > 0
        assert 0 < row["attn_share"] <= row["attn_block_share"] <= 1, where
        assert row["attn_calls_per_token"] == m.text.num_hidden_layers, where   # the fused path, every layer
        assert row["cache_bytes"] == (row["cached"] + 3) * bpt, where           # capacity N + tokens
        assert row["peak_rss"] >= row["peak_anon"] > 0, where
    assert f"| {64:>7} |" in r.stdout and r.stdout.count("\n") == 4               # the table: header + 2 rows


def test_longctx_clamps_to_the_context_and_checks_memory():
    lc = _module()
    assert lc.plan([64, 4096], 2048, 16) == [(64, 64), (4096, 2032)]
    assert lc.check_fits(100, 62208, "f32", available=10**9) == 6220800
    with pytest.raises(lc.BenchError, match=r"131088 positions need 7.59 GiB of f32 latent cache \(62208 B/token\) "
                                            r"but MemAvailable is 4.00 GiB; try --cache-dtype bf16"):
        lc.check_fits(131072 + 16, 62208, "f32", available=4 << 30)


def test_longctx_synthetic_rows_have_the_cache_statistics():
    """c rows are kv_a_layernorm outputs (RMS of c / weight = 1), k_pe rows rotate back to the measured scale."""
    lc = _module()
    from pykimi.attention import rope_angles
    from pykimi.ops import apply_rope
    m = pykimi.load(pykimi.demo_checkpoint(), cache_absorbed=False)
    t = m.text
    std = lc.k_pe_scales(m)
    assert std.shape == (t.num_hidden_layers,) and (std > 0).all()
    cache = m.new_cache(capacity=300)
    lc.fill_cache(m, cache, 300, std)
    assert len(cache) == 300
    R = t.kv_lora_rank
    for layer in range(t.num_hidden_layers):
        rows = cache.rows_f32(layer)
        ln = m.layer_weights(layer).attn.kv_a_layernorm
        rms = np.sqrt(np.mean((rows[:, :R] / ln) ** 2, axis=1))
        np.testing.assert_allclose(rms, 1.0, rtol=1e-3, err_msg=f"layer {layer}: c is not normalised")
        k = apply_rope(rows[:, R:], -rope_angles(np.arange(300), t))
        assert abs(np.std(k) / std[layer] - 1) < 0.1, f"layer {layer}: k_pe std {np.std(k):.3g} vs {std[layer]:.3g}"
        k_rot = rows[:, R:]
        assert not np.allclose(k_rot, k), f"layer {layer}: k_pe not rotated"


@pytest.mark.parametrize("args,msg", [
    (["--cache-dtype", "f16"], "--cache-dtype f16: expected one of f32, bf16"),
    (["--lengths", "0,64"], "--lengths '0,64': expected comma-separated positive integers"),
    (["--tokens", "0"], "--tokens 0: expected an integer >= 1"),
    (["--threads", "0"], "--threads 0: expected an integer >= 1"),
])
def test_longctx_errors_are_one_line_exit_2(args, msg):
    r = _cli("--lengths", "64", *args) if "--lengths" not in args else _cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == [f"bench_longctx: error: {msg}"], r.stderr
