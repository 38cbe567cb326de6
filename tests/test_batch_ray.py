"""pykimi batch --ray: a real 2-actor local Ray Data job gives the rows of the single-process run (issue 23)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("ray.data", reason="--ray needs the optional extra: pip install 'pykimi[ray]'")

GEN = ["-n", "24"]


def cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pykimi.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def rows_of(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_ray_two_actors_equal_single_process_and_resume(tmp_path):
    from pykimi.scenes import random_scene

    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(8):
        random_scene(rng)[0].save(src / ("sub" if i % 2 else "") / f"s{i}.png")
    (src / "broken.png").write_bytes(b"not an image")
    single = str(tmp_path / "single.jsonl")
    r = cli("batch", str(src), "-o", single, *GEN, "-q")
    assert r.returncode == 0, r.stderr
    want = {row["id"]: {k: v for k, v in row.items() if k != "seconds"} for row in rows_of(single)}
    assert len(want) == 9 and "error" in want["broken.png"]

    out = tmp_path / "ray.jsonl"
    first = [i for i in sorted(want) if i != "broken.png"][:3]     # a resumed job: three rows already there
    out.write_text("".join(json.dumps(want[i]) + "\n" for i in first))
    r = cli("batch", str(src), "-o", str(out), *GEN, "--ray", "--workers", "2", "-t", "1", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("5 done, 3 skipped as already done, 1 failed"), r.stdout
    rows = rows_of(str(out))
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == 9
    assert {row["id"]: {k: v for k, v in row.items() if k != "seconds"} for row in rows} == want
    # two actors, each with its own model; the anonymous memory each reports (RssAnon of /proc/PID/status)
    actors = re.findall(r"ray actor pid (\d+): RssAnon (\d+) MB", r.stderr)
    print("actors (pid, RssAnon MB):", actors)
    assert len({pid for pid, _ in actors}) == 2, r.stderr
    assert all(0 < int(mb) < 2000 for _, mb in actors), actors
