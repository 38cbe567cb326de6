"""The web page's inspector: how the model produced one answer, as JSON (issue 21).

:func:`inspect_answer` is a pure function of (model, processor, the chat messages, the answer). It runs the
model's own stages under :func:`pykimi.trace` -- nothing here re-implements a stage -- and returns a small
JSON-able dict:

* ``image``: the picture as the model saw it (rebuilt from ``pixel_values``: resized, padded, un-normalised),
  with its 14-px patch grid and the 2x2 merged-token grid (spec §5, §6.6);
* ``tokens``: per answer token, the top-5 candidates of the step that chose it, with probabilities;
* ``routing``: per answer token, a layer x expert map of the router scores (``mlp.routing`` records), the
  chosen experts and their mixing weights; the shared experts (always on, weight 1) are listed apart;
* ``vision_attention``: one MoonViT block's attention probabilities for one head (or the mean over heads), as a
  map over the image's patches for one query patch (or the mean over the image's patches);
* ``lm_attention``: per answer token, the attention of one LM layer's MLA (probabilities summed over heads) on
  each image token, as a map over the merged-token grid, plus the share of attention mass on the image.

The answer is teacher-forced: the prompt (minus its last token) is prefilled untraced, then the last prompt
token and the answer tokens but the last are prefilled under the trace, so row i of every record is the step
whose logits chose answer token i (the same row a decode step computes, in the expanded MLA form, equal up to
float rounding, spec §8.3). Only the answer rows and one attention layer of each tower are recorded, by a
:class:`ThreadTrace`, which ignores what other threads (the server's engine) compute meanwhile.

:func:`register` adds ``POST /pykimi/inspect`` to the server's app; the ordinary OpenAI endpoints never trace.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import threading
import weakref

import numpy as np

from ..engine import call_in_own_thread
from ..errors import InputError, PykimiError
from ..image import load_image, resized_size
from ..trace import Trace

LM = "language_model.model"
VT = "vision_tower.encoder.blocks"
TOP = 5                       # candidates per answer token
MAX_ANSWER_TOKENS = 512       # teacher-forced answer tokens at most (the page inspects one answer)
MAX_MAP_SIDE = 64             # attention maps are pooled to at most this many cells a side
MAX_PREVIEW_SIDE = 448        # the image preview is downscaled to at most this many pixels a side
VISION_PROBS_BUDGET = 512 << 20   # bytes of one block's [H, L, L] probabilities we agree to record


# ---------------------------------------------------------------------------------------------------------
# Request parsing (OpenAI chat messages, data: URIs)
# ---------------------------------------------------------------------------------------------------------
def image_from_data_uri(url: str, where: str = "image"):
    """``data:image/...;base64,...`` -> a loaded PIL image (one-line InputError otherwise)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise InputError(f"{where}: the inspector takes images as data: URIs (the page sends them so)")
    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        raise InputError(f"{where}: expected a base64 data: URI (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: the data: URI is not valid base64") from None
    return load_image(_open_image(raw, where), name=where)


def _open_image(raw: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
    except Image.DecompressionBombError:
        raise InputError(f"{where}: refused by Pillow's decompression-bomb limit") from None
    except UnidentifiedImageError:
        raise InputError(f"{where}: the data: URI does not hold a readable image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{where}: truncated or corrupt image ({str(e).splitlines()[0] if str(e) else e})") from None
    return im


def chat_inputs(messages) -> tuple[list, list]:
    """OpenAI chat messages -> (messages for Processor.prepare, PIL images in order).

    ``image_url`` parts stay image parts (the chat template renders them as the media block); their data:
    URIs are decoded here. Text parts and string contents pass through unchanged."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages: expected a non-empty list of {role, content} objects")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"messages[{i}]: expected an object with 'role' and 'content'")
        c = m["content"]
        if isinstance(c, str) or c is None:
            out.append({"role": m["role"], "content": c or ""})
            continue
        if not isinstance(c, list):
            raise InputError(f"messages[{i}].content: expected a string or a list of parts")
        parts = []
        for j, p in enumerate(c):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(p, dict):
                raise InputError(f"{where}: expected a part object")
            if p.get("type") == "text":
                if not isinstance(p.get("text"), str):
                    raise InputError(f"{where}: a text part needs a 'text' string")
                parts.append({"type": "text", "text": p["text"]})
            elif p.get("type") == "image_url":
                iu = p.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                images.append(image_from_data_uri(url, where))
                parts.append({"type": "image"})
            else:
                raise InputError(f"{where}: unknown part type {p.get('type')!r} (expected 'text' or 'image_url')")
        out.append({"role": m["role"], "content": parts})
    return out, images


# ---------------------------------------------------------------------------------------------------------
# Small helpers (payload shaping only)
# ---------------------------------------------------------------------------------------------------------
def _r(a, nd: int = 4) -> list:
    """Rounded nested lists (the JSON payload)."""
    return np.round(np.asarray(a, dtype=np.float64), nd).tolist()


def _pool(m: np.ndarray, max_side: int = MAX_MAP_SIDE) -> tuple[np.ndarray, int]:
    """Block-mean a [h, w] map so both sides are <= max_side -> (map, factor)."""
    h, w = m.shape
    f = max(1, -(-max(h, w) // max_side))
    if f == 1:
        return m, 1
    H, W = -(-h // f) * f, -(-w // f) * f
    pad = np.zeros((H, W), dtype=np.float64)
    cnt = np.zeros((H, W), dtype=np.float64)
    pad[:h, :w] = m
    cnt[:h, :w] = 1
    s = pad.reshape(H // f, f, W // f, f).sum(axis=(1, 3))
    n = cnt.reshape(H // f, f, W // f, f).sum(axis=(1, 3))
    return s / np.maximum(n, 1), f


def _sig(x: float) -> float:
    """A probability to 4 significant digits (small candidates stay visible, unlike a fixed rounding)."""
    return float(f"{float(x):.4g}")


def _token_text(tok, i: int) -> str:
    return tok.token_bytes(int(i)).decode("utf-8", errors="replace")


def seen_image(pixel_values: np.ndarray, gh: int, gw: int, mean, std) -> np.ndarray:
    """The pixels the vision tower saw: un-patchify and un-normalise one image's pixel_values (spec §5 steps
    4-5 inverted)   # [gh*gw, 3, p, p] -> uint8 [gh*p, gw*p, 3]."""
    p = pixel_values.shape[-1]
    x = pixel_values.reshape(gh, gw, 3, p, p).transpose(0, 3, 1, 4, 2).reshape(gh * p, gw * p, 3)
    x = x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _preview_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    im = Image.fromarray(rgb)
    f = max(im.size) / MAX_PREVIEW_SIDE
    if f > 1:
        im = im.resize((max(1, round(im.size[0] / f)), max(1, round(im.size[1] / f))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    if max(im.size) <= 256:
        im.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        im.save(buf, format="JPEG", quality=85)
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _int_or(v, default, name: str, lo: int, hi: int):
    """An integer request field in [lo, hi) (None -> default)."""
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InputError(f"{name}: expected an integer, got {v!r}")
    if not lo <= int(v) < hi:
        raise InputError(f"{name}={v}: expected {lo} <= {name} < {hi}")
    return int(v)


# ---------------------------------------------------------------------------------------------------------
# The inspector
# ---------------------------------------------------------------------------------------------------------
class Memo:
    """What :func:`inspect_answer` may reuse for the same prompt (ids + pixels): the image features, the
    latent cache of the prompt but its last token (truncated back after each answer), that token's embedding,
    and a few blocks' attention probabilities of one image. One conversation at a time (bounded memory)."""

    MAX_VISION = 4

    def __init__(self):
        self.key = None
        self.feats = self.cache = self.last = None
        self.vision: dict = {}

    def reset(self, key, feats, cache, last) -> None:
        self.key, self.feats, self.cache, self.last = key, feats, cache, last
        self.vision = {}

    def keep_vision(self, k, probs) -> None:
        self.vision.pop(k, None)
        self.vision[k] = probs
        while len(self.vision) > self.MAX_VISION:
            self.vision.pop(next(iter(self.vision)))


def _key(prompt: np.ndarray, pv, grid) -> str:
    import hashlib

    h = hashlib.sha1(np.ascontiguousarray(prompt, dtype=np.int64).tobytes())
    if pv is not None:
        h.update(np.ascontiguousarray(grid, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(pv, dtype=np.float32).tobytes())
    return h.hexdigest()


_TOWERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TOWERS_LOCK = threading.Lock()


def own_tower(model):
    """(tower, lock): the inspector's own :class:`pykimi.vision.VisionTower` on ``model``'s checkpoint (the
    same class and weights as ``model.vision``) and the lock its users hold. A tower widens each block into
    scratch arrays it reuses, so two threads must not run one at once, and the engine may encode an image
    with ``model.vision`` while the page inspects."""
    from ..vision import VisionTower

    with _TOWERS_LOCK:
        t = _TOWERS.get(model)
        if t is None:
            t = _TOWERS[model] = (VisionTower(model.ckpt, model.config,
                                              cache_weights=getattr(model, "vision_cache_weights", False)),
                                  threading.Lock())
        return t


class ThreadTrace(Trace):
    """A :class:`pykimi.trace.Trace` that sees only the thread that made it.

    Traces are process-wide: while one is open every ``emit`` in the process passes through it. The server's
    engine decodes other requests in its own thread meanwhile; their intermediates must neither land in
    this record nor be touched by it, so every hook answers "not wanted" outside the owner thread."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owner = threading.get_ident()

    def _mine(self) -> bool:
        return threading.get_ident() == self._owner

    def _wanted(self, name: str) -> bool:
        return self._mine() and super()._wanted(name)

    def wants_attn_probs(self, layer_name: str) -> bool:
        return self._mine() and super().wants_attn_probs(layer_name)

    def _emit(self, name: str, value):
        return super()._emit(name, value) if self._mine() else value


def inspect_answer(model, processor, messages, answer=None, answer_ids=None, *, image: int = -1,
                   vision_block: int | None = None, vision_head: int | None = None,
                   vision_patch: int | None = None, lm_layer: int | None = None, top: int = TOP,
                   memo: "Memo | None" = None) -> dict:
    """How ``model`` produced ``answer`` to ``messages``, as a JSON-able dict (see the module docstring).

    messages: chat messages for ``processor.prepare`` (images inline as {"type": "image", "image": PIL}) or
    OpenAI messages with ``image_url`` data: URIs; answer: the answer text (tokenized without special tokens)
    or answer_ids; image: which image of the conversation (default the last); vision_block / lm_layer:
    which block / layer's attention (default the last); vision_head: a head, or None for the mean over heads;
    vision_patch: a query patch of the image (row * gw + col), or None for the mean over its patches;
    memo: a :class:`Memo` that keeps the last conversation's prompt work (image features, the latent cache of
    the prompt, vision probabilities per block), so that looking at another layer, block, head or patch of the
    same answer runs only the answer rows.
    """
    tok = processor.tokenizer
    vc, tc = model.config.vision, model.config.text
    if messages and any(isinstance(m, dict) and isinstance(m.get("content"), list)
                        and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
                        for m in messages):
        messages, images = chat_inputs(messages)
        inputs = processor.prepare(messages, images=images)
    else:
        inputs = processor.prepare(messages)
        images = [p.get("image") for m in messages if isinstance(m.get("content"), list)
                  for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]
    prompt = model.check_ids(inputs["input_ids"])                              # [S]
    pv, grid = inputs["pixel_values"], inputs["image_grid_hws"]
    if answer_ids is None:
        if not isinstance(answer, str):
            raise InputError("answer: expected the answer text (a string) or answer_ids")
        answer_ids = tok.encode(answer)
    ans = np.asarray([int(i) for i in answer_ids], dtype=np.int64)            # [n]
    if ans.size == 0:
        raise InputError("answer: empty; there is nothing to inspect")
    truncated = ans.size > MAX_ANSWER_TOKENS
    if truncated:                                   # a long answer: its first MAX_ANSWER_TOKENS tokens
        ans = ans[:MAX_ANSWER_TOKENS]
    model.check_ids(ans)
    model.check_length(prompt.size + ans.size, "prompt + answer")
    n = int(ans.size)

    # -- the vision tower: one block's attention probabilities (all images; block-diagonal across them)
    n_img = 0 if grid is None else len(grid)
    vblock = _int_or(vision_block, vc.num_hidden_layers - 1, "vision_block", 0, vc.num_hidden_layers)
    layer = _int_or(lm_layer, tc.num_hidden_layers - 1, "lm_layer", 0, tc.num_hidden_layers)
    vhead = _int_or(vision_head, None, "vision_head", 0, vc.num_attention_heads)
    out: dict = {"prompt_tokens": int(prompt.size), "answer_tokens": n, "truncated": bool(truncated),
                 "n_images": n_img}
    key = _key(prompt, pv, grid)
    keep = memo if memo is not None and memo.key == key else None            # the same conversation as before
    feats = keep.feats if keep is not None else None
    if n_img:
        img = _int_or(image if image >= 0 else n_img + image, None, "image", 0, n_img)
        grid = np.asarray(grid, dtype=np.int64).reshape(-1, 2)
        cu = np.concatenate([[0], np.cumsum(grid[:, 0] * grid[:, 1])])        # patch offsets per image
        L = int(cu[-1])
        gh, gw = int(grid[img, 0]), int(grid[img, 1])
        qpatch = _int_or(vision_patch, None, "vision_patch", 0, gh * gw)
        vname = f"{VT}.{vblock}"
        want_probs = vc.num_attention_heads * L * L * 4 <= VISION_PROBS_BUDGET
        probs = keep.vision.get((img, vblock)) if keep is not None else None
        tower, busy = own_tower(model)
        if feats is None:
            # the features the answer was made from: an untraced run (recording a block's probabilities
            # takes the step-by-step attention, whose rounding differs, and would move what follows)
            with busy:
                feats = np.asarray(tower.encode(pv, grid), dtype=np.float32)      # [T, D]
        if want_probs and probs is None:
            with ThreadTrace(model, names=[], attn_probs=[vname]) as tv, busy:
                tower.encode(pv, grid)
            probs = tv[vname + ".attn_probs"][:, cu[img]:cu[img + 1], cu[img]:cu[img + 1]]       # [H, l, l]
        out["image"] = _image_payload(processor, images[img] if img < len(images) else None, img,
                                      pv[cu[img]:cu[img + 1]], gh, gw)
        out["config_vision"] = {"blocks": vc.num_hidden_layers, "heads": vc.num_attention_heads}
        if want_probs:
            ph = probs.mean(axis=0) if vhead is None else probs[vhead]                        # [l, l]
            row = ph.mean(axis=0) if qpatch is None else ph[qpatch]                            # [l] keys
            m, f = _pool(row.reshape(gh, gw).astype(np.float64))
            out["vision_attention"] = {"block": vblock, "head": vhead, "patch": qpatch, "grid": [gh, gw],
                                       "pool": f, "shape": list(m.shape), "map": _r(m, 5),
                                       "max": float(m.max())}
        else:
            out["vision_attention"] = {"block": vblock, "head": vhead, "patch": qpatch, "map": None,
                                       "note": f"{L} patches: the [H, L, L] probabilities would exceed "
                                               f"{VISION_PROBS_BUDGET >> 20} MiB"}
    else:
        out["image"] = None
        out["vision_attention"] = None

    # -- the language model: prefill the prompt but its last token untraced (or take it from the memo),
    #    then the answer rows under the trace
    if keep is not None:
        cache, last = keep.cache, keep.last
        cache.truncate(prompt.size - 1)                                          # drop the previous answer
    else:
        x = model.embed(prompt, image_features=feats)                            # [S, D]
        cache = model.new_cache(capacity=prompt.size + n)
        if prompt.size > 1:
            model.prefill(x[:-1], cache, all_logits=False)
        last = x[-1:]                                                            # [1, D]
    if memo is not None:
        if keep is None:
            memo.reset(key, feats, cache, last)
        if n_img and want_probs:
            memo.keep_vision((img, vblock), probs)
    xa = np.concatenate([last, model.embed(ans[:-1])], axis=0) if n > 1 else last   # [n, D]
    lname = f"{LM}.layers.{layer}.self_attn"
    with ThreadTrace(model, names=[f"{LM}.layers.*.mlp.routing"], attn_probs=[lname]) as tl:
        logits = model.prefill(xa, cache, all_logits=True)                     # [n, V]
    logits = np.asarray(logits, dtype=np.float64).reshape(n, -1)

    # top-k candidates of each step (softmax in float64 of the step's logits)
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)                                            # [n, V]
    k = min(int(top), p.shape[1])
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]                         # [n, k]
    tokens = []
    for i in range(n):
        t = int(ans[i])
        tokens.append({"id": t, "text": _token_text(tok, t), "p": _sig(p[i, t]),
                       "rank": int((p[i] > p[i, t]).sum()) + 1,
                       "top": [{"id": int(j), "text": _token_text(tok, j), "p": _sig(p[i, j])}
                               for j in order[i]]})
    out["tokens"] = tokens

    # routing: per token, a [moe layers, E] map of router scores, the chosen experts and their weights
    moe_layers = [l for l in range(tc.num_hidden_layers) if tc.is_moe_layer(l)]
    scores, chosen, weights = [], [], []
    for l in moe_layers:
        recs = tl.records.get(f"{LM}.layers.{l}.mlp.routing", [])
        scores.append(np.concatenate([r.scores for r in recs], axis=0))         # [n, E]
        chosen.append(np.concatenate([r.topk_ids for r in recs], axis=0))       # [n, k]
        weights.append(np.concatenate([r.topk_weights for r in recs], axis=0))  # [n, k]
    out["routing"] = {
        "layers": moe_layers,
        "dense_layers": [l for l in range(tc.num_hidden_layers) if not tc.is_moe_layer(l)],
        "n_experts": int(tc.n_routed_experts or 0), "k": int(tc.num_experts_per_tok or 0),
        "n_shared": int(tc.n_shared_experts or 0), "scoring": tc.scoring_func,
        # [n][layer][E] / [n][layer][k]
        "scores": [_r([s[i] for s in scores], 4) for i in range(n)] if moe_layers else [],
        "chosen": [[c[i].tolist() for c in chosen] for i in range(n)] if moe_layers else [],
        "weights": [_r([w[i] for w in weights], 4) for i in range(n)] if moe_layers else [],
    }

    # LM attention on the chosen image's tokens, summed over heads
    chunks = tl.all(lname + ".attn_probs")                                       # [H, s, N] per prefill chunk
    att = np.concatenate([c.sum(axis=0)[:, :prompt.size] for c in chunks], axis=0)   # [n, S] prompt keys
    lm = {"layer": layer, "layers": tc.num_hidden_layers, "heads": tc.num_attention_heads}
    if n_img:
        where = np.flatnonzero(prompt == model.config.media_placeholder_token_id)  # image tokens, image order
        mh, mw = vc.merge_kernel_size
        per = (grid[:, 0] * grid[:, 1]) // (mh * mw)
        t0 = int(np.sum(per[:img]))
        cols = where[t0:t0 + int(per[img])]                                    # this image's token positions
        th, tw = gh // mh, gw // mw
        maps, tops = [], []
        for i in range(n):
            m, f = _pool(att[i, cols].reshape(th, tw))
            maps.append(_r(m, 4))
            best = np.argsort(-att[i, cols], kind="stable")[:5]
            tops.append([{"token": int(b), "row": int(b // tw), "col": int(b % tw),
                          "w": round(float(att[i, cols[b]]), 4)} for b in best])
        lm.update(grid=[th, tw], pool=f, maps=maps, top=tops,
                  image_mass=_r(att[:, cols].sum(axis=1) / tc.num_attention_heads, 4),
                  heads_sum=tc.num_attention_heads)
    else:
        lm.update(maps=None)
    out["lm_attention"] = lm
    return out


def _image_payload(processor, picture, img: int, pv: np.ndarray, gh: int, gw: int) -> dict:
    """Geometry of image ``img`` as the model saw it: original, resized and padded sizes (width, height), the
    patch grid and the merged-token grid, and a preview of the pixels the tower saw (padding included)."""
    s = processor.image_settings
    p = s.patch_size
    rgb = seen_image(pv, gh, gw, s.image_mean, s.image_std)                     # [gh*p, gw*p, 3]
    d = {"index": img, "patch": p, "merge": list(s.merge_kernel_size), "grid": [gh, gw],
         "padded": [gw * p, gh * p], "merged_grid": [gh // s.merge_kernel_size[0], gw // s.merge_kernel_size[1]],
         "preview": _preview_uri(rgb)}
    size = getattr(picture, "size", None)
    if size is not None:
        d["original"] = [int(size[0]), int(size[1])]
        d["resized"] = list(resized_size(int(size[0]), int(size[1]), s))
    else:
        d["resized"] = d["padded"]
    return d


# ---------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------
def register(app, ctx) -> None:
    """Add ``POST /pykimi/inspect`` to a Starlette/FastAPI ``app``. ctx (pykimi.server.app.ServerContext, or a
    dict) gives model, processor, engine, and optionally api_key, max_body_bytes.

    Body: {"messages": [...the OpenAI chat messages of the answered request...], "answer": "text" (or
    "answer_ids": [...]), and optionally "image", "vision_block", "vision_head", "vision_patch", "lm_layer"}
    -> the :func:`inspect_answer` dict. Errors in OpenAI's shape: 400 bad input, 401 wrong key, 413 body over
    the limit. The model runs in a worker thread, one inspection at a time, only when this is called; images
    are parsed by the server's own ``parse_messages`` when it has one (same formats and limits as the chat)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    lock = threading.Lock()
    memo = Memo()                                               # guarded by lock
    limit = int(_get(ctx, "max_body_bytes", None) or (32 << 20))
    try:
        from .app import parse_messages as server_parse         # the serve helper's parser, when present
    except ImportError:
        server_parse = None

    def err(status: int, msg: str, param=None):
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "param": param,
                                       "code": None}}, status_code=status)

    def run(body: dict) -> dict:
        model, processor = _get(ctx, "model"), _get(ctx, "processor")
        messages = body.get("messages")
        if server_parse is not None and not isinstance(ctx, dict):
            messages = server_parse(messages, ctx)
        # ThreadTrace keeps the engine's concurrent steps out of the record (and the record out of them). An
        # open trace still turns the engine's fused decode off for its duration (trace.active() is
        # process-wide); an engine that can pause between steps (``engine.exclusive()``) avoids even that.
        engine = _get(ctx, "engine", None)
        pause = getattr(engine, "exclusive", None)
        # in a thread that ends with the call: the server's worker threads live on, and the kernels' OpenMP team
        # of one of them would stay beside the engine's and slow every later decode step (engine docstring)
        with lock, (pause() if callable(pause) else contextlib.nullcontext()):
            return call_in_own_thread(
                inspect_answer, model, processor, messages, answer=body.get("answer"),
                answer_ids=body.get("answer_ids"), image=_field(body, "image", -1),
                vision_block=body.get("vision_block"), vision_head=body.get("vision_head"),
                vision_patch=body.get("vision_patch"), lm_layer=body.get("lm_layer"), memo=memo)

    async def inspect(request: Request):
        key = _get(ctx, "api_key", None)
        if key is not None and request.headers.get("authorization", "") != f"Bearer {key}":
            return err(401, "invalid or missing API key (send 'Authorization: Bearer KEY')")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                return err(413, f"request body is over the limit of {limit} bytes")
        try:
            body = json.loads(bytes(buf))
        except (ValueError, UnicodeDecodeError):
            return err(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return err(400, "the request body must be a JSON object")
        try:
            return JSONResponse(await run_in_threadpool(run, body))
        except PykimiError as e:                                # InputError, ConfigError, ...: bad input
            return err(400, str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001
            status = getattr(e, "status", None)                 # the server's APIError (bad image, ...)
            if isinstance(status, int) and 400 <= status < 500:
                return err(status, str(getattr(e, "message", e)), getattr(e, "param", None))
            raise

    app.add_route("/pykimi/inspect", inspect, methods=["POST"])


def _field(body: dict, key: str, default):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputError(f"{key}: expected an integer, got {v!r}")
    return v


def _get(ctx, name: str, *default):
    if isinstance(ctx, dict):
        return ctx.get(name, *default) if default else ctx[name]
    return getattr(ctx, name, *default)
