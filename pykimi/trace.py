"""Recording and editing named intermediates.

Every stage of the model calls ``x = emit(name, x)`` with its checkpoint module path as the name
(DESIGN.md, Public API). With no trace active, ``emit`` is one global check and returns ``x``. Inside
``with pykimi.trace(model) as t:`` it records a copy of each matching tensor in execution order, and an
``edit={name: fn}`` replaces the value, which then flows onward.

A traced run executes the same code as an untraced one, with two documented exceptions, each taken only for the
layer or block whose hidden name a trace records or edits (``wants``), each giving the same values up to float
rounding:
* the fused decode attention (one C call per layer and token) cannot report ``...self_attn.q_rope``, ``.k_rope``
  or ``.attn_probs``: that layer's decode runs step by step instead (tests/test_trace.py shows both);
* the vision tower's tiled attention never forms the probabilities: a block whose ``.attn_probs`` is asked runs
  the attention that materializes them (``vision_attention(..., return_probs=True)``; the block output moved by
  about 6e-6 on the demo), so the web page's inspector takes the features from an untraced run.
A trace is process-wide: while one is active, other threads' forward passes (the server's engine) see it too and
leave their fused paths (same values up to rounding, slower).
"""
from __future__ import annotations

import fnmatch
import json
from collections import OrderedDict
from typing import Callable, Iterable

import numpy as np

_ACTIVE: list["Trace"] = []  # the innermost trace is last; the hot path only tests truthiness


def active() -> bool:
    """True when some trace is recording (guard expensive optional captures with it)."""
    return bool(_ACTIVE)


def wants(*names: str) -> bool:
    """True when an active trace records or edits one of ``names``. A fused kernel that cannot report an
    intermediate asks this, and runs the step by step form only when someone looks (the names a fused path
    hides are listed beside it, e.g. attention.FUSED_DECODE_HIDES)."""
    return bool(_ACTIVE) and any(t._touches(n) for t in _ACTIVE for n in names)


def emit(name: str, value):
    """Record / edit the intermediate ``name``; always use the returned value."""
    if not _ACTIVE:
        return value
    for t in _ACTIVE:
        value = t._emit(name, value)
    return value


def emit_record(name: str, record) -> None:
    """Record a non-array decision record (e.g. a MoE routing record) under ``name``."""
    if not _ACTIVE:
        return
    for t in _ACTIVE:
        if t._wanted(name):
            t.records.setdefault(name, []).append(record)


def _match_any(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Trace:
    """A mapping name -> np.ndarray of recorded intermediates, in execution order.

    A name emitted several times in one trace (e.g. a decoder layer during prefill, then at every decode
    step) keeps every value: ``t[name]`` is the first, ``t.all(name)`` the list, ``t.concat(name)`` them
    concatenated along the sequence axis.
    """

    def __init__(self, model=None, names: Iterable[str] | str | None = None,
                 edit: dict[str, Callable] | None = None, attn_probs: Iterable[str] | str | None = None,
                 record: bool = True):
        self.model = model
        if isinstance(names, str):
            names = [names]
        self.names = list(names) if names is not None else None
        self.edit = dict(edit or {})
        if isinstance(attn_probs, str):
            attn_probs = [attn_probs]
        self.attn_probs = list(attn_probs or [])
        self.record = record
        self._values: "OrderedDict[str, list[np.ndarray]]" = OrderedDict()
        self.records: dict[str, list] = {}
        self.edited: list[str] = []

    # -- the hook -------------------------------------------------------------------------------
    def _wanted(self, name: str) -> bool:
        if name.endswith(".attn_probs"):
            return _match_any(name[: -len(".attn_probs")], self.attn_probs)
        return self.names is None or _match_any(name, self.names)

    def _edit_of(self, name: str):
        fn = self.edit.get(name)
        if fn is None:
            for pat, f in self.edit.items():
                if any(c in pat for c in "*?[") and fnmatch.fnmatchcase(name, pat):
                    return f
        return fn

    def _touches(self, name: str) -> bool:
        """This trace records or edits ``name``."""
        return (self.record and self._wanted(name)) or self._edit_of(name) is not None

    def _emit(self, name: str, value):
        fn = self._edit_of(name)
        if fn is not None:
            new = fn(value)
            if new is not None:
                value = new
            self.edited.append(name)
        if self.record and self._wanted(name):
            self._values.setdefault(name, []).append(np.array(value, copy=True))
        return value

    def wants_attn_probs(self, layer_name: str) -> bool:
        return bool(self.attn_probs) and _match_any(layer_name, self.attn_probs)

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self):
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return False

    # -- mapping --------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        return self._values[name][0]

    def __contains__(self, name) -> bool:
        return name in self._values

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self):
        return self._values.keys()

    def items(self):
        return ((k, v[0]) for k, v in self._values.items())

    def all(self, name: str) -> list:
        return list(self._values.get(name, []))

    def concat(self, name: str, axis: int = 0) -> np.ndarray:
        return np.concatenate(self._values[name], axis=axis)

    def save(self, path: str, metadata: dict | None = None) -> None:
        """Write every recorded tensor to a safetensors dump, in execution order (kept in the metadata under
        "order"). A name recorded several times (e.g. a layer during prefill and then at every decode step)
        is stored as ``name`` (the first value) and ``name@1``, ``name@2``, ... for the later ones."""
        from .weights import save_file

        tensors = OrderedDict()
        for k, vals in self._values.items():
            for i, v in enumerate(vals):
                tensors[k if i == 0 else f"{k}@{i}"] = np.ascontiguousarray(v)
        meta = {"producer": "pykimi", "order": json.dumps(list(tensors))}
        if metadata:
            meta.update({k: str(v) for k, v in metadata.items()})
        save_file(tensors, path, metadata=meta)


def trace(model=None, names=None, edit=None, attn_probs=None, record=True) -> Trace:
    """``with pykimi.trace(model, names=["vision_tower.*"]) as t: model.forward(...)``."""
    return Trace(model, names=names, edit=edit, attn_probs=attn_probs, record=record)


# ``pykimi.trace`` is both this module (``trace.emit`` in the model code) and the public context-manager
# factory (``with pykimi.trace(model): ...``): make the module itself callable so the two names never clash.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, model=None, names=None, edit=None, attn_probs=None, record=True) -> Trace:
        return trace(model, names=names, edit=edit, attn_probs=attn_probs, record=record)


_sys.modules[__name__].__class__ = _CallableModule
