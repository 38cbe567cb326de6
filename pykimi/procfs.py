"""This process's facts from Linux /proc/self/status (anonymous memory, locked memory, capabilities)."""
from __future__ import annotations


def status_field(name: str) -> str | None:
    """The value of line ``name:`` of /proc/self/status (e.g. "RssAnon" -> "1234 kB"); None where there is no
    /proc or no such line."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key == name:
                    return value.strip()
    except OSError:
        pass
    return None


def status_bytes(name: str) -> int | None:
    """A "N kB" field of /proc/self/status in bytes (RssAnon, VmLck, VmHWM ...); None where absent."""
    v = status_field(name)
    return None if v is None else int(v.split()[0]) * 1024
