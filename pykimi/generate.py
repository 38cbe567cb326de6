"""Token generation: greedy and sampled decoding over the latent KV cache, streaming, stop tokens.

Flow: prefill the prompt (expanded MLA, chunked) -> logits of the last position; then per step pick a token,
hand it out, stop on a stop id or after ``max_new_tokens``, else run one absorbed-MLA decode step.

Stop ids (spec §4): the config eos ``[EOS]`` *and* ``<|im_end|>``, which ends assistant turns. ``<|im_end|>``
comes from the checkpoint's tokenizer_config.json ``added_tokens_decoder`` when present, else from the
packaged special-token table when the checkpoint uses the real id layout, else it is taken as
``eos_token_id + 1`` (true of the real layout, 163585/163586, and of test checkpoints that keep the real
offsets, e.g. 257/258). A stop token that is generated is included in the returned ids (as HF does).

Sampling pipeline per step (the order of HF's processors/warpers):
repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw with ``np.random.default_rng(seed)``.
temperature == 0 is greedy: argmax, the first index on ties.
"""
from __future__ import annotations

import json
import os
import time
from typing import Iterator

import numpy as np

from .cache import cache_dtype_name
from .errors import InputError

IM_END = "<|im_end|>"


# ---------------------------------------------------------------------------------------------------------
# Stop ids
# ---------------------------------------------------------------------------------------------------------
def _im_end_from_tokenizer_config(path: str | None):
    if not path:
        return None
    f = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(f):
        return None
    try:
        with open(f, encoding="utf-8") as fh:
            d = json.load(fh)
        for k, v in (d.get("added_tokens_decoder") or {}).items():
            if (v.get("content") if isinstance(v, dict) else v) == IM_END:
                return int(k)
    except (OSError, ValueError, AttributeError):
        return None
    return None


def _im_end_from_packaged_table(eos: int):
    f = os.path.join(os.path.dirname(__file__), "data", "special_tokens.json")
    try:
        with open(f, encoding="utf-8") as fh:
            special = json.load(fh)["special"]
    except (OSError, ValueError, KeyError):
        return None
    by_name = {v: int(k) for k, v in special.items()}
    if by_name.get("[EOS]") == eos and IM_END in by_name:   # the table applies only to the real id layout
        return by_name[IM_END]
    return None


def default_stop_ids(model) -> list[int]:
    """[EOS] (text_config.eos_token_id) and <|im_end|> (spec §4), deduplicated, in that order."""
    eos = model.text.eos_token_id
    out = []
    if eos is not None:
        out.append(int(eos))
    path = getattr(model.ckpt, "path", None)
    im_end = _im_end_from_tokenizer_config(path)
    if im_end is None and eos is not None:
        im_end = _im_end_from_packaged_table(int(eos))
    if im_end is None and eos is not None:
        im_end = int(eos) + 1                                     # real layout: [EOS]=163585, <|im_end|>=163586
    if im_end is not None and im_end < model.text.vocab_size and im_end not in out:
        out.append(int(im_end))
    return out


# ---------------------------------------------------------------------------------------------------------
# Logit processing and sampling (pure functions on one logits row)
# ---------------------------------------------------------------------------------------------------------
def greedy(logits: np.ndarray) -> int:
    """argmax, first index on ties (np.argmax semantics)."""
    return int(np.argmax(logits))


def apply_repetition_penalty(logits: np.ndarray, seen_ids, penalty: float) -> np.ndarray:
    """HF/CTRL rule, in place: for every id already in the sequence, a positive logit is divided by
    ``penalty`` and a negative one multiplied by it   # logits f32[V]."""
    if penalty == 1.0 or seen_ids is None or len(seen_ids) == 0:
        return logits
    idx = np.fromiter(seen_ids, dtype=np.int64) if not isinstance(seen_ids, np.ndarray) else seen_ids
    v = logits[idx]
    logits[idx] = np.where(v > 0, v / np.float32(penalty), v * np.float32(penalty))
    return logits


def filter_probs(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0):
    """The candidate tokens and their probabilities after temperature, top-k, top-p and min-p.

    Returns (ids int64[n], probs f64[n]) sorted by decreasing probability (ties: lower id first), probs sum 1.
    """
    z = np.asarray(logits, dtype=np.float64) / float(temperature)          # [V]
    V = z.shape[0]
    if 0 < top_k < V:
        cand = np.argpartition(-z, top_k - 1)[:top_k]                       # the k largest, unordered
        # argpartition breaks ties arbitrarily at the boundary: keep the lowest ids among equals
        kth = z[cand].min()
        above = np.flatnonzero(z > kth)
        ties = np.flatnonzero(z == kth)[: top_k - above.size]
        cand = np.concatenate([above, ties])
    else:
        cand = np.arange(V)
    order = np.lexsort((cand, -z[cand]))                                    # by -z, then by id
    ids = cand[order]
    zc = z[ids]
    p = np.exp(zc - zc[0])
    p /= p.sum()
    if top_p < 1.0:
        cum = np.cumsum(p)
        keep = int(np.searchsorted(cum, top_p, side="left")) + 1            # smallest prefix with mass >= top_p
        ids, p = ids[:keep], p[:keep]
    if min_p > 0.0:
        keep = p >= min_p * p[0]                                             # p[0] is the max
        ids, p = ids[keep], p[keep]
    return ids, p / p.sum()


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0) -> int:
    """Draw one token id from ``logits`` f32[V] (temperature > 0) with the given filters."""
    ids, p = filter_probs(logits, temperature, top_k, top_p, min_p)
    if ids.size == 1:
        return int(ids[0])
    u = rng.random()
    j = int(np.searchsorted(np.cumsum(p), u, side="right"))
    return int(ids[min(j, ids.size - 1)])


def pick_token(logits: np.ndarray, rng, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> int:
    if temperature == 0.0:
        return greedy(logits)
    return sample(logits, rng, temperature, top_k, top_p, min_p)


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------
def _check_options(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty):
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 0")
    if not np.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature={temperature!r}: expected a number >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p={top_p!r}: expected 0 < top_p <= 1")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InputError(f"top_k={top_k!r}: expected an integer >= 0 (0 = off)")
    if not 0.0 <= min_p <= 1.0:
        raise InputError(f"min_p={min_p!r}: expected 0 <= min_p <= 1")
    if not repetition_penalty > 0:
        raise InputError(f"repetition_penalty={repetition_penalty!r}: expected a number > 0 (1 = off)")


def generate(model, input_ids, pixel_values=None, image_grid_hws=None, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed=None, stream: bool = False, stop_ids=None,
             image_features=None, force=None, cache_dtype=None):
    """Generate up to ``max_new_tokens`` ids after the prompt.

    Returns the list of new ids, or (stream=True) an iterator yielding each id as soon as it is chosen.
    Input errors (ids, options, context length, images) are raised here, before any iteration.
    ``stop_ids=None`` uses :func:`default_stop_ids`; pass ``[]`` to never stop early.
    ``force``: optional ``callable(new_ids) -> id | None`` asked before each pick; an id it returns is emitted
    instead of the sampled one and decoded like any other (e.g. ``pykimi.reasoning.ReasoningBudget.force``,
    which closes the thinking after a budget).
    ``cache_dtype``: "f32" | "bf16" for this call's latent cache (default: the model's, load(cache_dtype=)).
    """
    _check_options(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty)
    if cache_dtype is not None:
        cache_dtype = cache_dtype_name(cache_dtype)
    ids = model.check_ids(input_ids)
    S = ids.size
    if S + max_new_tokens > model.context_limit:
        model.check_length(S, "prompt")
        raise InputError(f"prompt of {S} tokens + max_new_tokens={max_new_tokens} exceeds the context limit of "
                         f"{model.context_limit}; lower max_new_tokens")
    t_embed = time.perf_counter()
    x = model.embed(ids, pixel_values, image_grid_hws, image_features)     # images encoded and checked now
    t_embed = time.perf_counter() - t_embed
    stops = set(default_stop_ids(model) if stop_ids is None else (int(s) for s in stop_ids))
    def replay():   # only run when the logits went non-finite: the embedding again, under a checking trace
        return model.embed(ids, pixel_values, image_grid_hws, image_features)

    it = _generate_iter(model, ids, x, int(max_new_tokens), float(temperature), float(top_p), int(top_k),
                        float(min_p), float(repetition_penalty), seed, stops, t_embed, replay=replay, force=force,
                        cache_dtype=cache_dtype)
    return it if stream else list(it)


def _check_finite(model, logits: np.ndarray, ids: np.ndarray, new_ids: list, x: np.ndarray, replay=None) -> None:
    """Never turn NaN / inf into a token (argmax of all-NaN logits is id 0). The per-step cost is one pass over
    the V logits; only when it fails is the sequence re-run under a checking trace to name the first stage
    that went non-finite (pykimi.debug.first_nonfinite)."""
    if np.isfinite(logits).all():
        return
    from .debug import first_nonfinite
    from .errors import NumericsError

    where = "the prompt" if not new_ids else f"decode step {len(new_ids)}"
    stage = first_nonfinite(model, x, new_ids, replay_embed=replay)
    if stage is None:
        stage = "logits (a re-run through the prefill path stayed finite: the decode path diverged)"
    raise NumericsError(f"non-finite values (NaN/inf) in the logits after {where}; they first appear at "
                        f"{stage} -- check the checkpoint's weights and config.json (model {model.ckpt.path})")


def _generate_iter(model, ids, x, max_new_tokens, temperature, top_p, top_k, min_p, penalty, seed,
                   stops, embed_s: float = 0.0, replay=None, force=None, cache_dtype=None) -> Iterator[int]:
    if max_new_tokens == 0:
        return
    rng = np.random.default_rng(seed)
    # timings for the CLI / benchmarks: model.last_stats is replaced at every call and updated while streaming
    # encode_s: token embedding + image encoding (MoonViT + projector), done before the first token
    stats = {"prompt_tokens": int(ids.size), "new_tokens": 0, "encode_s": embed_s, "prefill_s": 0.0,
             "decode_s": 0.0}
    model.last_stats = stats
    t0 = time.perf_counter()
    cache = model.new_cache(capacity=ids.size + max_new_tokens, dtype=cache_dtype)   # preallocated: never grows
    logits = model.prefill(x, cache, all_logits=False)                 # f32[V], last prompt position
    _check_finite(model, logits, ids, [], x, replay)
    stats["prefill_s"] = time.perf_counter() - t0
    stats["cache_bytes"] = cache.nbytes()
    seen = set(ids.tolist()) if penalty != 1.0 else None
    new_ids: list[int] = []
    for step in range(max_new_tokens):
        forced = force(new_ids) if force is not None else None     # new_ids: the ids chosen so far
        if forced is not None:
            tok = int(forced)
        else:
            if seen:
                logits = apply_repetition_penalty(logits, np.fromiter(seen, dtype=np.int64, count=len(seen)),
                                                  penalty)
            tok = pick_token(logits, rng, temperature, top_k, top_p, min_p)
        stats["new_tokens"] = step + 1
        yield tok
        if tok in stops or step + 1 == max_new_tokens:
            return
        if seen is not None:
            seen.add(tok)
        new_ids.append(tok)
        t0 = time.perf_counter()
        logits = model.decode_step(tok, cache)
        _check_finite(model, logits, ids, new_ids, x, replay)
        stats["decode_s"] += time.perf_counter() - t0
