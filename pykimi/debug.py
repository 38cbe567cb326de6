"""Compare two sets of named intermediates (pykimi traces, golden files, dumps from other engines) and say
where they part.

A dump is any safetensors file whose tensor names follow the checkpoint's module paths (DESIGN.md), e.g.
one written by ``Trace.save`` or by PyTorch forward hooks (tools/torch_dump.py). ``compare`` walks the
names in execution order and reports, per tensor, the max abs error, the scale-relative error
``max|a-b| / max|b|`` (the golden README's metric), and the first index outside ``atol + rtol*|b|``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

_LAYER = re.compile(r"\.(\d+)(?=\.|$)")


def _stage_key(name: str):
    """Execution order when no recorded order exists: vision, projector, embeds, LM layers, norm, logits."""
    if name.startswith("vision_tower.patch_embed"):
        return (0, 0, name.count("."), name)
    if name.startswith("vision_tower.encoder.blocks."):
        i = int(name.split(".")[3])
        return (1, i, 0 if name.count(".") > 3 else 1, name)
    if name.startswith("vision_tower"):
        return (2, 0 if "final_layernorm" in name else 1, 0, name)
    if name.startswith("multi_modal_projector"):
        order = {"multi_modal_projector.pre_norm": 0, "multi_modal_projector.linear_1": 1,
                 "multi_modal_projector": 2}
        return (3, order.get(name, 1), 0, name)
    if name == "inputs_embeds":
        return (4, 0, 0, name)
    if name.startswith("language_model.model.layers."):
        parts = name.split(".")
        i = int(parts[3])
        sub = ".".join(parts[4:])
        rank = 0 if sub.startswith("self_attn") else 1 if sub.startswith("mlp.") else 2 if sub == "mlp" else 3
        return (5, i, rank, name)
    if name.startswith("language_model.model.norm"):
        return (6, 0, 0, name)
    if name == "logits":
        return (7, 0, 0, name)
    return (8, 0, 0, name)


def execution_order(names) -> list[str]:
    return sorted(names, key=_stage_key)


def load_dump(path_or_mapping) -> tuple[dict, list[str] | None]:
    """A mapping name -> array from a dict, a Trace, a safetensors file or a golden case directory."""
    if hasattr(path_or_mapping, "items") and not isinstance(path_or_mapping, (str, os.PathLike)):
        order = list(path_or_mapping.keys())
        return {k: np.asarray(v) for k, v in path_or_mapping.items()}, order
    path = os.fspath(path_or_mapping)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "golden.safetensors")):
        path = os.path.join(path, "golden.safetensors")
    if not os.path.exists(path):
        raise InputError(f"{path}: no such dump file")
    from .weights import Checkpoint

    ck = Checkpoint.open(path)
    out = {}
    for n in ck.names():
        st = ck.tensor(n)
        out[n] = st.f32() if st.dtype in ("BF16", "F16") else np.array(st.data)
    order = None
    if "order" in ck.metadata:
        try:
            order = json.loads(ck.metadata["order"])
        except json.JSONDecodeError:
            order = None
    return out, order


@dataclass
class Row:
    name: str
    shape: tuple
    max_abs: float
    rel: float
    ok: bool
    first_bad: tuple | None = None
    a_value: float | None = None
    b_value: float | None = None
    note: str = ""


@dataclass
class Report:
    rows: list = field(default_factory=list)
    only_a: list = field(default_factory=list)
    only_b: list = field(default_factory=list)
    empty_reason: str = ""      # why nothing was compared, when rows is empty

    @property
    def first_divergence(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    @property
    def ok(self) -> bool:
        """Every compared tensor agrees, and at least one was compared (a check of nothing is not a pass)."""
        return bool(self.rows) and self.first_divergence is None

    def format(self, all_rows: bool = True) -> str:
        lines = [f"{'tensor':<58} {'shape':<16} {'max abs':>10} {'rel':>10}  status"]
        first = self.first_divergence
        for r in self.rows:
            if not all_rows and r.ok:
                continue
            status = "ok" if r.ok else ("FIRST DIVERGENCE" if r is first else "differs")
            lines.append(f"{r.name:<58} {str(list(r.shape)):<16} {r.max_abs:>10.3g} {r.rel:>10.3g}  {status}"
                         + (f"  {r.note}" if r.note else ""))
            if r is first and r.first_bad is not None:
                lines.append(f"    first mismatch at index {list(r.first_bad)}: a={r.a_value!r} b={r.b_value!r}")
        if self.only_a:
            lines.append(f"only in A ({len(self.only_a)}): {', '.join(self.only_a[:6])}"
                         + (" ..." if len(self.only_a) > 6 else ""))
        if self.only_b:
            lines.append(f"only in B ({len(self.only_b)}): {', '.join(self.only_b[:6])}"
                         + (" ..." if len(self.only_b) > 6 else ""))
        if not self.rows:
            lines.append(f"nothing compared: {self.empty_reason or 'no tensor in common'}")
        else:
            lines.append("all compared tensors agree" if first is None else
                         f"first divergence: {first.name} (rel {first.rel:.3g})")
        return "\n".join(lines)


def compare_arrays(name: str, a: np.ndarray, b: np.ndarray, atol: float = 0.0, rtol: float = 0.0,
                   rel_tol: float | None = 2e-5) -> Row:
    """One row: ``b`` is the reference. ok when the scale-relative error <= rel_tol (if given) and, when atol
    or rtol is set, every element is within atol + rtol*|b|."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        return Row(name, b.shape, float("inf"), float("inf"), False, note=f"shape {list(a.shape)} vs {list(b.shape)}")
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        bad = a != b
        n = int(bad.sum())
        row = Row(name, b.shape, float(np.abs(a.astype(np.int64) - b.astype(np.int64)).max(initial=0)),
                  float(n), n == 0, note="ids" + ("" if n == 0 else f": {n} differ"))
    else:
        a64 = a.astype(np.float64)
        b64 = b.astype(np.float64)
        diff = np.abs(a64 - b64)
        scale = float(np.abs(b64).max(initial=0.0))
        max_abs = float(diff.max(initial=0.0))
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        if np.isnan(a64).any() != np.isnan(b64).any():
            rel = float("inf")
        ok = True
        if rel_tol is not None:
            ok = rel <= rel_tol
        bad = np.zeros(b.shape, bool)
        if atol or rtol:
            bad = ~(diff <= atol + rtol * np.abs(b64))
            ok = ok and not bad.any()
        elif not ok:
            bad = diff > (rel_tol or 0) * scale
        row = Row(name, b.shape, max_abs, rel, ok)
    if not row.ok and bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        row.first_bad = idx
        row.a_value = a[idx].item()
        row.b_value = b[idx].item()
    return row


def compare(a, b, atol: float = 0.0, rtol: float = 0.0, rel_tol: float | None = 2e-5,
            tolerances: dict | None = None, names=None) -> Report:
    """Compare dumps ``a`` (under test) and ``b`` (reference) name by name in execution order.

    ``tolerances`` maps name -> scale-relative tolerance (e.g. from a golden manifest); others use rel_tol.
    """
    da, order_a = load_dump(a)
    db, order_b = load_dump(b)
    common = [n for n in (order_a or execution_order(da)) if n in db]
    if order_a is None and order_b is not None:
        common = [n for n in order_b if n in da]
    if not (order_a or order_b):
        common = execution_order(set(da) & set(db))
    rep = Report()
    if not common:
        rep.empty_reason = f"A ({len(da)} tensors) and B ({len(db)} tensors) have no tensor name in common"
    if names is not None:
        import fnmatch

        pats = [names] if isinstance(names, str) else list(names)
        n_before = len(common)
        common = [n for n in common if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        if n_before and not common:
            rep.empty_reason = (f"--names {' '.join(pats)} matched none of the {n_before} tensors A and B have "
                                f"in common")
    for n in common:
        tol = (tolerances or {}).get(n, rel_tol)
        rep.rows.append(compare_arrays(n, da[n], db[n], atol, rtol, tol))
    rep.only_a = [n for n in da if n not in db]
    rep.only_b = [n for n in db if n not in da]
    return rep


def golden_tolerances(case_dir: str) -> dict:
    """name -> scale-relative tolerance from a golden case's manifest.json."""
    with open(os.path.join(case_dir, "manifest.json")) as fh:
        m = json.load(fh)
    out = {}
    for name, ent in m.get("tensors", {}).items():
        tol = ent.get("tolerance") if isinstance(ent, dict) else None
        if isinstance(tol, dict) and "rel" in tol:
            out[name] = float(tol["rel"])
    return out


# --------------------------------------------------------------------------------------------- non-finite

class _Found(Exception):
    pass


def first_nonfinite(model, inputs_embeds: np.ndarray, new_ids=(), replay_embed=None) -> str | None:
    """The name of the first intermediate (execution order, checkpoint module path) that holds NaN or inf
    when the prompt ``inputs_embeds`` [S, D] plus the generated ``new_ids`` run through the model's prefill
    path; None when everything stays finite. When inputs_embeds itself is not finite, ``replay_embed()``
    (the embedding + image encoding) is re-run under the check to find the vision stage. Used by generation
    only after the cheap per-step check on the logits failed, so the normal path pays nothing for it."""
    from .model import embed_rows
    from .trace import Trace

    class _Check(Trace):
        def _emit(self, name, value):
            value = super()._emit(name, value)
            a = value if isinstance(value, np.ndarray) else None
            if a is not None and a.dtype.kind == "f" and not np.isfinite(a).all():
                self.found = name
                raise _Found(name)
            return value

    chk = _Check(model, names=[], record=False)
    chk.found = None
    try:
        with chk:
            if not np.isfinite(inputs_embeds).all():
                if replay_embed is not None:
                    replay_embed()
                return chk.found or "inputs_embeds"
            x = inputs_embeds
            if len(new_ids):
                x = np.concatenate([x, embed_rows(model.embed_table(), np.asarray(new_ids, dtype=np.int64))])
            cache = model.new_cache(capacity=x.shape[0])
            model.prefill(x, cache, all_logits=False)
    except _Found:
        pass
    return chk.found
