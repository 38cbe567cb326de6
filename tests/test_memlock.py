"""--mlock: the mapped weights pinned in RAM (pykimi.memlock), the up-front checks and their one-line errors, and
all-or-nothing locking."""
import json
import mmap
import os
import resource
import subprocess
import sys

import pytest

import pykimi
from pykimi import memlock
from pykimi.errors import ResourceError
from conftest import ROOT

INF = resource.RLIM_INFINITY
GB = 10**9


def _can_lock(n: int) -> bool:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return memlock._privileged() or hard == INF or hard >= n


# ------------------------------------------------------------------------------------------- the plan (pure)
@pytest.mark.parametrize("need, soft, hard, priv, ram, want", [
    (8 * GB, INF, INF, False, 24 * GB, None),            # unlimited
    (8 * GB, 9 * GB, 9 * GB, False, 24 * GB, None),      # the soft limit is enough
    (8 * GB, 2**23, 2**23, True, 24 * GB, None),         # CAP_IPC_LOCK: the kernel ignores the limit
    (8 * GB, 2**23, INF, False, 24 * GB, INF),           # raise the soft limit to the hard one
    (8 * GB, 2**23, 10 * GB, False, 24 * GB, 10 * GB),
    (8 * GB, 2**23, INF, False, None, INF),              # RAM unknown: not checked
])
def test_plan_allows(need, soft, hard, priv, ram, want):
    plan = memlock.plan_lock(need, soft, hard, priv, ram)
    assert plan.need == need and plan.raise_soft_to == want, plan
    assert plan.reason


@pytest.mark.parametrize("need, soft, hard, priv, ram, words", [
    (23 * GB, INF, INF, True, 24 * GB, ["23.00 GB", "24.00 GB", "RAM", "pykimi quantize", "without --mlock"]),
    (33 * GB, INF, INF, False, 24 * GB, ["33.00 GB", "RAM"]),
    (8 * GB, 2**23, 2**23, False, 24 * GB, ["RLIMIT_MEMLOCK >= 8.00 GB", "8 MiB", "ulimit -l", "without --mlock"]),
    (8 * GB, 2**23, 4 * GB, False, 24 * GB, ["hard 3815 MiB", "ulimit -l"]),
])
def test_plan_refuses_in_one_line(need, soft, hard, priv, ram, words):
    with pytest.raises(ResourceError) as e:
        memlock.plan_lock(need, soft, hard, priv, ram)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--mlock: "), msg
    for w in words:
        assert w in msg, f"{w!r} missing from: {msg}"


# --------------------------------------------------------------------------------------- locking for real
@pytest.mark.skipif(memlock.locked_bytes() is None, reason="no /proc/self/status VmLck on this system")
def test_load_locks_every_mapped_file_and_unlock_releases():
    demo = pykimi.demo_checkpoint()
    files = [f for f in os.listdir(demo) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(demo, f)) for f in files)
    if not _can_lock(size):
        pytest.skip(f"RLIMIT_MEMLOCK below the demo checkpoint's {size} bytes and no CAP_IPC_LOCK")
    before = memlock.locked_bytes()
    m = pykimi.load(demo, mlock=True)
    try:
        lk = m.memory_lock
        assert lk is not None and lk.mappings == len(files) and lk.bytes == size, (lk, files, size)
        got = memlock.locked_bytes() - before
        # VmLck counts whole pages: the files' bytes rounded up per mapping
        page = os.sysconf("SC_PAGE_SIZE")
        assert size <= got <= size + len(files) * page, f"VmLck grew by {got}, the files hold {size}"
        assert "of weights in RAM" in lk.describe()
        m.ckpt.unlock_memory()
        assert memlock.locked_bytes() == before, "munlock left memory locked"
    finally:
        m.ckpt.close()
    assert pykimi.load(demo).memory_lock is None          # the default locks nothing


@pytest.mark.skipif(memlock.locked_bytes() is None, reason="no /proc/self/status VmLck on this system")
def test_a_failing_lock_unlocks_what_it_locked(monkeypatch):
    """All or nothing: the second mapping's mlock fails -> the first is unlocked again, one-line error."""
    n = 1 << 20
    if not _can_lock(2 * n):
        pytest.skip("RLIMIT_MEMLOCK below 2 MiB and no CAP_IPC_LOCK")
    maps = [mmap.mmap(-1, n), mmap.mmap(-1, n)]
    real = memlock._libc()

    class Flaky:
        calls = 0
        munlock = real.munlock

        def mlock(self, addr, size):
            Flaky.calls += 1
            if Flaky.calls == 2:
                import ctypes
                ctypes.set_errno(12)                      # ENOMEM
                return -1
            return real.mlock(addr, size)

    monkeypatch.setattr(memlock, "_libc", lambda: Flaky())
    before = memlock.locked_bytes()
    with pytest.raises(ResourceError) as e:
        memlock.lock_mappings(maps)
    assert Flaky.calls == 2
    assert memlock.locked_bytes() == before, "the first mapping stayed locked after the second failed"
    msg = str(e.value)
    assert "\n" not in msg and "mlock of 1.0 MB failed" in msg and os.strerror(12) in msg, msg
    for mm in maps:
        mm.close()


def test_load_refuses_when_the_limit_is_short(monkeypatch):
    """Unprivileged with RLIMIT_MEMLOCK 64 KiB (soft = hard): a one-line ResourceError, nothing locked."""
    monkeypatch.setattr(memlock, "_privileged", lambda: False)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (65536, 65536))
    before = memlock.locked_bytes()
    with pytest.raises(ResourceError, match=r"^--mlock: locking [0-9.]+ MB of weights needs RLIMIT_MEMLOCK"):
        pykimi.load(pykimi.demo_checkpoint(), mlock=True)
    assert memlock.locked_bytes() == before


def test_load_refuses_a_checkpoint_bigger_than_ram(monkeypatch):
    monkeypatch.setattr(memlock, "_ram", lambda: 3 << 30)           # a 3 GiB machine: 1 GiB after the reserve
    monkeypatch.setattr(memlock, "_span", lambda buf: (0, 2 << 30))  # ... and 2 GiB of weights
    with pytest.raises(ResourceError, match=r"would not leave 2.15 GB of this machine's 3.22 GB RAM"):
        pykimi.load(pykimi.demo_checkpoint(), mlock=True)


# ------------------------------------------------------------------------------------------------ commands
def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pykimi.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def test_run_and_bench_take_mlock(tmp_path):
    demo = pykimi.demo_checkpoint()
    size = sum(os.path.getsize(os.path.join(demo, f)) for f in os.listdir(demo) if f.endswith(".safetensors"))
    if not _can_lock(size):
        pytest.skip("RLIMIT_MEMLOCK below the demo checkpoint and no CAP_IPC_LOCK")
    r = _cli("run", "--mlock", "-n", "4", "--save-scene", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr
    assert "pykimi: locked" in r.stderr and "of weights in RAM" in r.stderr, r.stderr
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image
    Image.new("RGB", (56, 56), (200, 30, 30)).save(imgs / "red.png")
    r = _cli("batch", str(imgs), "-o", str(tmp_path / "out.jsonl"), "--mlock", "-n", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert "pykimi: locked" in r.stderr, r.stderr
    assert json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])["id"] == "red.png"
    r = _cli("bench", "--mlock", "-p", "4", "-n", "2", "-r", "1", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    assert rows and all(row["use_mlock"] is True for row in rows), rows
    r = _cli("bench", "-p", "4", "-n", "0", "-r", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0])["use_mlock"] is False, r.stderr
