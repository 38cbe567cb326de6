"""pykimi batch --ray: a real 2-actor local Ray Data job gives the rows of the single-process run (issue 23)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

from pykimi.testing import free_port

pytestmark = pytest.mark.reference  # a heavy optional extra: .ci/run installs it after the README commands

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


def test_ray_data_driving_two_pykimi_serve_instances_over_http(tmp_path):
    """docs/ray_http_example.py: Ray Data actors send rows to two `pykimi serve` processes (127.0.0.1, free
    ports); its OUT rows equal `pykimi batch`'s, a refused row is an error row, and a rerun skips every row."""
    import time

    try:
        import pykimi.server.app  # noqa: F401
    except ImportError:
        pytest.skip("needs pykimi serve (pykimi.server with the 'serve' extra)")
    import httpx
    from pykimi.scenes import random_scene

    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(11)
    for i in range(4):
        random_scene(rng)[0].save(src / f"s{i}.png")
    (src / "broken.png").write_bytes(b"not an image")
    single = str(tmp_path / "single.jsonl")
    r = cli("batch", str(src), "-o", single, *GEN, "-q")
    assert r.returncode == 0, r.stderr
    want = {row["id"]: {k: v for k, v in row.items() if k != "seconds"} for row in rows_of(single)}

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ports = [free_port(), free_port()]
    servers = [subprocess.Popen([sys.executable, "-m", "pykimi.cli", "serve", "--port", str(p), "-np", "2", "-t", "1"],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for p in ports]
    try:
        for p, s in zip(ports, servers):
            t0 = time.time()
            while time.time() - t0 < 180:
                assert s.poll() is None, s.stderr.read()
                try:
                    if httpx.get(f"http://127.0.0.1:{p}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                pytest.fail(f"pykimi serve on port {p} not up within 180 s")
        out = str(tmp_path / "http.jsonl")
        cmd = [sys.executable, os.path.join(ROOT, "docs", "ray_http_example.py"), str(src), out, "-n", GEN[1],
               "--actors-per-server", "2"] + [a for p in ports for a in ("--url", f"http://127.0.0.1:{p}/v1")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().startswith("4 done, 0 skipped as already done, 1 failed"), r.stdout
        got = {row["id"]: row for row in rows_of(out)}
        assert len(got) == 5 and set(got["broken.png"]) == {"id", "error"}
        for rid in want:
            if rid != "broken.png":
                assert {k: v for k, v in got[rid].items() if k != "seconds"} == want[rid], rid
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert r.returncode == 0 and r.stdout.startswith("0 done, 5 skipped as already done"), r.stdout + r.stderr
    finally:
        for s in servers:
            s.terminate()
        for s in servers:
            try:
                s.wait(timeout=30)
            except subprocess.TimeoutExpired:
                s.kill()
                s.wait()


def test_ray_actor_with_the_engine_gives_the_same_rows(tmp_path):
    """--ray --parallel 2: the actor decodes the rows of each batch together with the engine; rows as alone."""
    from pykimi.scenes import random_scene

    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        random_scene(rng)[0].save(src / f"s{i}.png")
    single = str(tmp_path / "single.jsonl")
    r = cli("batch", str(src), "-o", single, *GEN, "-q")
    assert r.returncode == 0, r.stderr
    want = {row["id"]: {k: v for k, v in row.items() if k != "seconds"} for row in rows_of(single)}
    out = str(tmp_path / "ray.jsonl")
    r = cli("batch", str(src), "-o", out, *GEN, "--ray", "--workers", "1", "--parallel", "2", "-t", "1", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("4 done, 0 skipped as already done, 0 failed"), r.stdout
    assert {row["id"]: {k: v for k, v in row.items() if k != "seconds"} for row in rows_of(out)} == want
