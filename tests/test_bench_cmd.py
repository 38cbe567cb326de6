"""`pykimi bench`: llama-bench's table and JSON records on the demo checkpoint, and its bad-input errors."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT


def bench(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pykimi.cli", "bench", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_json_records_are_the_samples():
    r = bench("-p", "8", "-n", "4", "--image-px", "56", "-r", "3", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    assert [row["test"] for row in rows] == ["pp8", "tg4", "img56"], rows
    for row in rows:
        assert len(row["samples_ts"]) == 3 and len(row["samples_ns"]) == 3
        units = {"pp": 8, "tg": 4, "img": 16}[row["test"].rstrip("0123456789")]   # 56 px = 4 x 4 patches
        for ts, ns in zip(row["samples_ts"], row["samples_ns"]):
            assert ts == pytest.approx(units / (ns * 1e-9), rel=1e-6)
        assert row["avg_ts"] == pytest.approx(statistics.fmean(row["samples_ts"]))
        assert row["stddev_ts"] == pytest.approx(statistics.stdev(row["samples_ts"]))
        assert row["model"] == "demo" and row["n_params"] > 2e6 and row["size_bytes"] > 5e6
        assert row["threads"] >= 1 and row["backend"]
    assert rows[0]["n_prompt"] == 8 and rows[1]["n_gen"] == 4 and rows[2]["unit"] == "patches/s"


def test_table_has_llama_bench_columns():
    r = bench("-p", "8", "-n", "2", "-r", "2", "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["model", "size", "params", "backend", "threads", "test", "t/s"]
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:4]]
    assert [b[5] for b in body] == ["pp8", "tg2"] and all(b[3] == "numpy" for b in body)
    assert all("±" in b[6] for b in body)
    assert "cpu:" in r.stdout


@pytest.mark.parametrize("args,what", [
    (["-p", "abc"], "-p 'abc': expected comma-separated whole numbers"),
    (["-p", "-5"], "expected numbers >= 0"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["-p", "100000", "-n", "0"], "over the model's context limit"),
    (["-p", "8", "-n", "0", "-r", "0"], "--repetitions 0: expected at least 1"),
    (["--image-px", "10", "-p", "0", "-n", "0"], "--image-px 10: expected at least"),
])
def test_bad_input_is_one_line(args, what):
    r = bench(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pykimi: error:") and what in err[0], r.stderr
