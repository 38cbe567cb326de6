"""Progress bars (tqdm, on stderr) for long steps -- prefill, the vision tower, repacking.

Off in the library by default (a notebook or a server should not print), switched on by the ``pykimi``
command. A bar appears only when its step takes longer than ``delay`` seconds, so short runs stay quiet.
"""
from __future__ import annotations

_state = {"enabled": False}


def enable(on: bool = True) -> None:
    _state["enabled"] = bool(on)


def enabled() -> bool:
    return _state["enabled"]


class _Null:
    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bar(total: int, desc: str, unit: str = "it", delay: float = 1.0):
    """A tqdm bar when progress is enabled, else an object with the same update/close that does nothing."""
    if not _state["enabled"] or total <= 1:
        return _Null()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, delay=delay, leave=False, dynamic_ncols=True)
