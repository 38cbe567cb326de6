"""Which backend runs the kernels, and with how many threads.

Backends: "c" (csrc/ via cffi, kernels/c.py), "numba" (kernels/numba_kernels.py), "numpy" (the definitions
alone). The default is the fastest one that imports; ``PYKIMI_BACKEND=numpy|numba|c`` or ``set_backend(name)``
picks one. A missing C extension falls back to Numba, then NumPy, with ONE warning saying why.
"""
from __future__ import annotations

import os
import warnings

BACKENDS = ("numpy", "numba", "c")

_state = {"backend": None, "threads": None, "warned": False}
_avail: dict[str, tuple[bool, str]] = {}
_mods: dict[str, object] = {}      # "c" / "numba" -> the imported kernel module


def _probe(name: str) -> tuple[bool, str]:
    if name in _avail:
        return _avail[name]
    ok, why = True, ""
    try:
        if name == "c":
            from . import c as mod
        elif name == "numba":
            from . import numba_kernels as mod
        else:
            from . import ref as mod
        _mods[name] = mod
    except Exception as e:  # ImportError, a broken .so, numba/llvmlite mismatch ...
        ok, why = False, f"{type(e).__name__}: {e}".splitlines()[0]
        if name == "c" and isinstance(e, ImportError):
            why = ("C extension pykimi._ckernels not built (pip install . with a C compiler, or "
                   "python -m pykimi.kernels._build)")
    _avail[name] = (ok, why)
    return ok, why


def backends() -> dict:
    """{name: {"available": bool, "reason": str, ...details}} for every backend (for `pykimi info --backends`)."""
    out = {}
    for name in BACKENDS:
        ok, why = _probe(name)
        d = {"available": ok, "reason": why or "ok"}
        if ok and name == "c":
            d.update(_mods["c"].info())
        if ok and name == "numba":
            import numba
            d.update(version=numba.__version__, threads=numba.get_num_threads())
        out[name] = d
    out["active"] = backend()
    return out


def _choose(requested: str | None) -> str:
    if requested:
        requested = requested.strip().lower()
        if requested not in BACKENDS:
            raise ValueError(f"PYKIMI_BACKEND={requested!r}: expected one of {', '.join(BACKENDS)}")
        ok, why = _probe(requested)
        if ok:
            return requested
        order = BACKENDS[:BACKENDS.index(requested)][::-1]
        first_why = why
    else:
        order = ("c", "numba", "numpy")
        first_why = None
    for name in order:
        ok, why = _probe(name)
        if ok:
            if first_why is None and name != "c":
                first_why = _avail["c"][1]
            if first_why is not None and not _state["warned"]:
                _state["warned"] = True
                warnings.warn(f"pykimi: {first_why}; using the {name} backend (slower)", RuntimeWarning,
                              stacklevel=3)
            return name
        if first_why is None:
            first_why = why
    return "numpy"


def backend() -> str:
    """The active backend name."""
    if _state["backend"] is None:
        _state["backend"] = _choose(os.environ.get("PYKIMI_BACKEND") or None)
        _apply_threads()
    return _state["backend"]


def set_backend(name: str) -> str:
    """Select a backend explicitly; raises ValueError naming the reason if it is unavailable."""
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    ok, why = _probe(name)
    if not ok:
        raise ValueError(f"backend {name!r} is unavailable: {why}")
    _state["backend"] = name
    _apply_threads()
    return name


# ---------------------------------------------------------------------------------------- threads

def get_threads() -> int:
    if _state["threads"] is None:
        try:
            n = int(os.environ.get("PYKIMI_THREADS", "0"))
        except ValueError:
            n = 0
        _state["threads"] = n if n > 0 else (os.cpu_count() or 1)
    return _state["threads"]


def set_threads(n: int) -> None:
    """Threads for the C (OpenMP) and Numba kernels (BLAS keeps its own setting)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    _state["threads"] = n
    _apply_threads()


def _apply_threads() -> None:
    n = get_threads()
    if "c" in _mods:
        _mods["c"].set_threads(n)
    if "numba" in _mods:
        import numba
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def c_module():
    """The C kernel module (kernels/c.py) when the active backend is "c", else None."""
    return _mods["c"] if backend() == "c" else None


def numba_module():
    """The Numba kernel module when the active backend wants it (not "numpy") and it imports, else None."""
    if backend() == "numpy":
        return None
    ok, _ = _probe("numba")
    return _mods["numba"] if ok else None
