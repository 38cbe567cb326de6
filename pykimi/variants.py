"""Which member of the family a checkpoint directory holds, read from the checkpoint's own files.

One code path serves them all; what differs is read, never assumed:

* Kimi-VL-A3B-Instruct: a ``kimi_vl`` config (vision_config + text_config); tensors ``vision_tower.*``,
  ``multi_modal_projector.*``, ``language_model.model.*``.
* Kimi-VL-A3B-Thinking: the same files; it writes ``◁think▷ … ◁/think▷`` before its answer (pykimi.reasoning).
* Kimi-VL-A3B-Thinking-2506: the same; a larger image budget, ``in_token_limit`` of its preprocessor_config.json.
* Moonlight-16B-A3B(-Instruct): a flat ``deepseek_v3`` config without text_config; tensors ``model.*`` and
  ``lm_head.weight``, no vision tower; its own rope_theta, context length and chat template.

The name comes from what the directory says about itself, in this order: config.json's ``_name_or_path`` /
``name_or_path``, a Hugging Face cache path (``models--moonshotai--NAME``), the model card (README.md) title or
``base_model``, the directory's own name. No number (image budget, theta, context) is taken from a table here:
each is read from the file that holds it, and :class:`Variant` records which file said what (``evidence``).

``generation_config.json`` (when present) gives the sampling defaults: :func:`generation_defaults`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from .errors import ConfigError

KNOWN = ("Kimi-VL-A3B-Instruct", "Kimi-VL-A3B-Thinking-2506", "Kimi-VL-A3B-Thinking",
         "Moonlight-16B-A3B-Instruct", "Moonlight-16B-A3B")
_NAME_RE = re.compile(r"(kimi[-_]vl[-_]a3b[-_](?:instruct|thinking(?:[-_]2506)?)"
                      r"|moonlight[-_]16b[-_]a3b(?:[-_]instruct)?)", re.IGNORECASE)


@dataclass(frozen=True)
class Variant:
    """What a checkpoint directory is. ``name``: one of KNOWN, or a description when its files do not say;
    ``thinking``: True / False, or None when nothing says; ``image_token_limit``: preprocessor_config.json's
    in_token_limit (None: no file, the built-in reference settings apply; or no vision tower);
    ``generation``: :func:`generation_defaults`; ``evidence``: which file said what."""
    family: str                       # "kimi_vl" | "moonlight"
    name: str
    thinking: bool | None
    has_vision: bool
    layout: str                       # "kimi_vl" (language_model.model.*) | "flat" (model.*, lm_head.weight)
    image_token_limit: int | None
    rope_theta: float
    context_length: int
    generation: dict = field(default_factory=dict)
    evidence: tuple = ()

    def summary(self) -> str:
        think = {True: "yes (◁think▷ … ◁/think▷ before the answer)", False: "no", None: "not stated by its files"}
        lines = [f"variant: {self.name} ({self.family}, {self.layout} layout)",
                 f"  thinking: {think[self.thinking]}",
                 "  images: " + ("none (no vision tower)" if not self.has_vision else
                                  f"up to {self.image_token_limit} patches each" if self.image_token_limit else
                                  "built-in reference settings (no preprocessor_config.json)"),
                 f"  rope theta {self.rope_theta:g}, context {self.context_length}"]
        if self.generation:
            lines.append("  generation defaults: " + ", ".join(f"{k}={v}" for k, v in self.generation.items()))
        lines += [f"  evidence: {e}" for e in self.evidence]
        return "\n".join(lines)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None


def _canonical(found: str) -> str:
    low = found.lower().replace("_", "-")
    for k in KNOWN:                                   # longest names first in KNOWN where it matters
        if low == k.lower():
            return k
    return found


def _name_evidence(path: str, cfg_raw: dict) -> tuple[str | None, str | None]:
    for key in ("_name_or_path", "name_or_path"):
        v = cfg_raw.get(key)
        if isinstance(v, str):
            m = _NAME_RE.search(v)
            if m:
                return _canonical(m.group(1)), f"config.json {key} = {v!r}"
    ap = os.path.abspath(path)
    m = re.search(r"models--[^/\\]+--([^/\\]+)", ap)
    if m and _NAME_RE.fullmatch(m.group(1)):
        return _canonical(m.group(1)), f"Hugging Face cache path ({m.group(0)})"
    card = os.path.join(path, "README.md")
    if os.path.isfile(card):
        try:
            with open(card, encoding="utf-8", errors="replace") as f:
                head = f.read(20000)
        except OSError:
            head = ""
        for pat, what in ((r"^#\s*(.+)$", "README.md title"), (r"^base_model:\s*(.+)$", "README.md base_model")):
            for line in re.finditer(pat, head, re.MULTILINE):
                mm = _NAME_RE.search(line.group(1))
                if mm:
                    return _canonical(mm.group(1)), f"{what} {line.group(1).strip()!r}"
    base = os.path.basename(ap.rstrip("/\\"))
    mm = _NAME_RE.fullmatch(base)
    if mm:
        return _canonical(mm.group(1)), f"directory name {base!r}"
    return None, None


def _template_text(path: str) -> str:
    out = ""
    p = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(p):
        with open(p, encoding="utf-8", errors="replace") as f:
            out += f.read()
    for name in ("tokenizer_config.json", "chat_template.json"):
        d = _read_json(os.path.join(path, name))
        if isinstance(d, dict) and isinstance(d.get("chat_template"), str):
            out += d["chat_template"]
    return out


def generation_defaults(path: str) -> dict:
    """Sampling defaults from generation_config.json (``{}`` when there is none), in pykimi's option names:
    temperature (0 when do_sample is false), top_p, top_k, max_new_tokens, max_length (prompt + answer),
    repetition_penalty, stop_ids (its eos_token_id, one id or a list). Command-line flags override them."""
    f = os.path.join(path, "generation_config.json")
    d = _read_json(f)
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{f}: expected a JSON object")
    out: dict = {}

    def num(key, typ, lo, hi=None):
        v = d.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and not isinstance(v, int)):
            raise ConfigError(f"{f}: {key} = {v!r}, expected a{'n integer' if typ is int else ' number'}")
        if v < lo or (hi is not None and v > hi):
            raise ConfigError(f"{f}: {key} = {v!r}, expected a value in [{lo}, {hi if hi is not None else 'inf'}]")
        return typ(v)

    do_sample = d.get("do_sample")
    t = num("temperature", float, 0.0)
    if do_sample is False:
        out["temperature"] = 0.0
    elif t is not None:
        out["temperature"] = t
    for key, typ, lo, hi in (("top_p", float, 0.0, 1.0), ("top_k", int, 0, None),
                             ("max_new_tokens", int, 1, None), ("max_length", int, 1, None),
                             ("repetition_penalty", float, 1e-6, None)):
        v = num(key, typ, lo, hi)
        if v is not None:
            out[key] = v
    if out.get("top_p") == 0.0:
        raise ConfigError(f"{f}: top_p = 0, expected 0 < top_p <= 1")
    eos = d.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"{f}: eos_token_id = {eos!r}, expected an id or a list of ids")
        out["stop_ids"] = [int(i) for i in ids]
    return out


def detect_variant(path: str, config=None) -> Variant:
    """The :class:`Variant` of a checkpoint directory (config.json required; everything else optional)."""
    from .config import load_config

    path = os.fspath(path)
    if not os.path.isdir(path):
        path = os.path.dirname(os.path.abspath(path))
    cfg = config if config is not None else load_config(path)
    evidence = []
    name, why = _name_evidence(path, cfg.raw or {})
    if why:
        evidence.append(f"name from {why}")
    family = "kimi_vl" if cfg.has_vision else "moonlight"
    evidence.append("config.json: model_type 'kimi_vl' with vision_config and text_config" if cfg.has_vision else
                    f"config.json: flat model_type {cfg.model_type!r} without text_config (the language model alone)")
    if name is not None and name.lower().startswith("moonlight") != (family == "moonlight"):
        evidence.append(f"the name {name!r} disagrees with config.json; config.json wins")
        name = None
    thinking = None
    if name is not None:
        thinking = "thinking" in name.lower()
    tpl = _template_text(path)
    if "think" in tpl:
        thinking = True
        evidence.append("the chat template mentions think markers")
    if name is None:
        name = ("Kimi-VL-A3B (its files do not name the variant)" if cfg.has_vision
                else "Moonlight-16B-A3B (its files do not say base or Instruct)")
    limit = None
    if cfg.has_vision:
        pp = _read_json(os.path.join(path, "preprocessor_config.json"))
        if isinstance(pp, dict) and "in_token_limit" in pp:
            from .image import ImageSettings
            limit = ImageSettings.load(path).in_token_limit
            evidence.append(f"preprocessor_config.json: in_token_limit {limit}")
    gen = generation_defaults(path)
    if gen:
        evidence.append("generation_config.json: " + ", ".join(sorted(gen)))
    return Variant(family=family, name=name, thinking=thinking, has_vision=cfg.has_vision, layout=cfg.layout,
                   image_token_limit=limit, rope_theta=cfg.text.rope_theta,
                   context_length=cfg.text.max_position_embeddings, generation=gen, evidence=tuple(evidence))


# ---------------------------------------------------------------------------------------------------------
# the flat (Moonlight) layout
# ---------------------------------------------------------------------------------------------------------
FLAT_TO_KIMI_VL = (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))


def kimi_vl_name(flat_name: str) -> str | None:
    """``model.layers.3.mlp.gate.weight`` -> ``language_model.model.layers.3.mlp.gate.weight`` (None: not LM)."""
    for a, b in FLAT_TO_KIMI_VL:
        if flat_name.startswith(a):
            return b + flat_name[len(a):]
    return None


def flat_name(kimi_vl: str) -> str | None:
    """The inverse of :func:`kimi_vl_name`."""
    for a, b in FLAT_TO_KIMI_VL:
        if kimi_vl.startswith(b):
            return a + kimi_vl[len(b):]
    return None


def is_flat_layout(path: str) -> bool:
    """True when the directory's config.json is a flat language-model config (Moonlight), read without
    validating the rest (for tools that open a checkpoint without its config, e.g. the int8 / int4 repack)."""
    from .config import LM_ONLY_MODEL_TYPES

    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        cfg = _read_json(os.path.join(d, "config.json"))
    except ConfigError:
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") in LM_ONLY_MODEL_TYPES and "text_config" not in cfg


def use_kimi_vl_names(ckpt) -> None:
    """Let a flat (Moonlight) checkpoint answer to the Kimi-VL names, so the one table of names
    (pykimi.layout) and every stage serve both: ``model.X`` is read as ``language_model.model.X`` and
    ``lm_head.weight`` as ``language_model.lm_head.weight``. Only the name index changes (same file, same
    offsets); ``ckpt.stored_names`` maps each name back to the one in the file, for messages and listings.
    A checkpoint already in Kimi-VL names (e.g. a pykimi repack) is left as it is."""
    stored = {}
    for n in list(ckpt._where):
        k = kimi_vl_name(n)
        if k is None or k in ckpt._where:
            continue
        f = ckpt._files[ckpt._where[n]]
        info = f.infos[n]
        f.infos[k] = type(info)(k, info.shape, info.dtype, info.nbytes, info.file, info.offset)
        ckpt._where[k] = ckpt._where.pop(n)
        stored[k] = n
    ckpt.stored_names = stored
