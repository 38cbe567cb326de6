"""Keep a checkpoint's memory-mapped weights in RAM (``--mlock``, ``pykimi.load(..., mlock=True)``).

Why: decode reads every chosen weight once per token straight from the page cache (weights stay mapped; nothing
copies the model). When the kernel reclaims page cache -- memory pressure, or a proactive reclaimer such as a VM
host's DAMON ``pageout`` scheme, which pages out file pages it has not seen touched for a minute -- the next token
that needs those pages waits for the disk. Measured on this project's 2-core VMs (27 layers int4, 8.25 GB of
weights, bench/RESULTS.md "Page cache and --mlock"): without the lock 67 of 192 steps took ~200 ms instead of 38
(major faults and ~2,000 minor faults each), the mean step 75.6 ms; with it 6 slow steps, mean 37.5 ms.

mlock(2) on a file mapping pins the page-cache pages (read in from disk first if needed): no anonymous memory is
added and no weight is copied, but those bytes of RAM are no longer reclaimable while the model is open. So the
lock is refused up front, with a one-line error, when the mapped files would not leave ``RESERVE`` bytes of the
machine's RAM, or when RLIMIT_MEMLOCK is too small and the process may not raise it (``ulimit -l``). It is
llama.cpp's ``--mlock``, for the same reason.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from .errors import ResourceError
from .procfs import status_bytes, status_field

RESERVE = 2 << 30          # RAM the lock must leave to the OS, the KV cache and the activations
_CAP_IPC_LOCK = 14         # linux/capability.h: may lock any amount of memory, whatever RLIMIT_MEMLOCK says


@dataclass(frozen=True)
class LockPlan:
    """What lock_mappings will do for ``need`` bytes: ``raise_soft_to`` (a new soft RLIMIT_MEMLOCK, or None to
    keep it) and why the lock may go ahead (``reason``)."""
    need: int
    raise_soft_to: int | None
    reason: str


@dataclass(frozen=True)
class MemoryLock:
    """What lock_mappings did: bytes locked over how many mappings, in how many seconds (the lock reads from
    disk whatever part of the files the page cache did not hold)."""
    bytes: int
    mappings: int
    seconds: float

    def describe(self) -> str:
        return f"locked {_gb(self.bytes)} of weights in RAM ({self.mappings} file(s), {self.seconds:.1f} s)"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _limit(n: int) -> str:
    import resource
    return "unlimited" if n == resource.RLIM_INFINITY else f"{n / 2**20:.0f} MiB"


def plan_lock(need: int, soft: int, hard: int, privileged: bool, ram: int | None,
              reserve: int = RESERVE) -> LockPlan:
    """Decide whether ``need`` bytes may be locked (pure: the tests drive every case).

    soft / hard: RLIMIT_MEMLOCK (resource.RLIM_INFINITY for unlimited); privileged: CAP_IPC_LOCK (root), which
    the kernel lets lock past the limit; ram: the machine's RAM in bytes (None: unknown, not checked).
    Raises ResourceError naming what is short and what would do."""
    import resource
    inf = resource.RLIM_INFINITY
    if ram is not None and need > ram - reserve:
        raise ResourceError(f"--mlock: the checkpoint's {_gb(need)} of weights would not leave {_gb(reserve)} of "
                            f"this machine's {_gb(ram)} RAM; use a quantized checkpoint (pykimi quantize) or run "
                            f"without --mlock")
    if soft == inf or soft >= need:
        return LockPlan(need, None, "RLIMIT_MEMLOCK allows it")
    if privileged:
        return LockPlan(need, None, "CAP_IPC_LOCK (not bound by RLIMIT_MEMLOCK)")
    if hard == inf or hard >= need:
        return LockPlan(need, inf if hard == inf else hard, "raised the soft RLIMIT_MEMLOCK")
    raise ResourceError(f"--mlock: locking {_gb(need)} of weights needs RLIMIT_MEMLOCK >= {_gb(need)}, but it is "
                        f"{_limit(soft)} (hard {_limit(hard)}); raise it (ulimit -l unlimited, or LimitMEMLOCK= in a "
                        f"systemd unit) or run without --mlock")


def _privileged() -> bool:
    """CAP_IPC_LOCK in the effective set (Linux /proc/self/status CapEff); elsewhere: euid 0."""
    caps = status_field("CapEff")
    if caps is not None:
        return bool(int(caps, 16) >> _CAP_IPC_LOCK & 1)
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _libc():
    if sys.platform == "win32":
        raise ResourceError("--mlock: not supported on Windows (no mlock); run without --mlock")
    lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    for f in (lib.mlock, lib.munlock):
        f.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        f.restype = ctypes.c_int
    return lib


def _span(buf) -> tuple[int, int]:
    """(address, length) of a mapping (a read-only mmap works: NumPy takes its buffer without copying)."""
    a = np.frombuffer(buf, dtype=np.uint8)
    return int(a.ctypes.data), int(a.size)


def lock_mappings(buffers: list) -> MemoryLock:
    """mlock every mapping in ``buffers`` (mmap objects), after plan_lock agreed; all or nothing: a failing
    call unlocks what was locked and raises ResourceError."""
    import resource
    spans = [_span(b) for b in buffers if len(b)]
    need = sum(n for _, n in spans)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    plan = plan_lock(need, soft, hard, _privileged(), _ram())
    if plan.raise_soft_to is not None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (plan.raise_soft_to, hard))
    lib = _libc()
    t0 = time.perf_counter()
    done = []
    for addr, n in spans:
        if lib.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(n)) != 0:
            err = ctypes.get_errno()
            for a, m in done:
                lib.munlock(ctypes.c_void_p(a), ctypes.c_size_t(m))
            raise ResourceError(f"--mlock: mlock of {_gb(n)} failed: {os.strerror(err)} (RLIMIT_MEMLOCK "
                                f"{_limit(resource.getrlimit(resource.RLIMIT_MEMLOCK)[0])}, {_gb(need)} asked); "
                                f"free memory or run without --mlock")
        done.append((addr, n))
    return MemoryLock(need, len(spans), time.perf_counter() - t0)


def unlock_mappings(buffers: list) -> None:
    """munlock every mapping in ``buffers`` (unmapping them unlocks too)."""
    lib = _libc()
    for b in buffers:
        if len(b):
            addr, n = _span(b)
            lib.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(n))


def locked_bytes() -> int | None:
    """This process's locked memory (VmLck of /proc/self/status) in bytes; None where there is no /proc."""
    return status_bytes("VmLck")
