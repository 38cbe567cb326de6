"""The ``pykimi`` command: run, chat, info, trace, diff, quantize, batch.

Errors a user can cause exit with status 2 and one line (no traceback) unless ``--debug``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time

from .errors import InputError, PykimiError

DEFAULT_PROMPT = "Describe the image."
CHAT_HELP = ("commands: /image PATH attaches an image to the next message, /video PATH [FRAMES] a video (as "
             "frames), /reset forgets the history and the attached images, /help, /quit; start a line with // to "
             "send a text beginning with /")


# --------------------------------------------------------------------------------------------- helpers

def _mem() -> dict:
    """Peak resident set (includes memory-mapped weights paged in) and current anonymous memory, in MB."""
    from .procfs import status_bytes

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    anon = status_bytes("RssAnon")
    return {"peak_rss_mb": round(peak, 1), "anon_mb": None if anon is None else round(anon / 2**20, 1)}


class StreamText:
    """Token ids in, text increments out, never half a UTF-8 character (the tokenizer's stream decoder)."""

    def __init__(self, processor):
        self.dec = processor.tokenizer.stream_decoder(skip_special=True)
        self.emitted = ""

    def push(self, tok: int) -> str:
        piece = self.dec.add(int(tok))
        self.emitted += piece
        return piece

    def flush(self) -> str:
        piece = self.dec.flush()
        self.emitted += piece
        return piece


def _model_dir(args) -> str:
    if args.model:
        if os.path.isfile(args.model):
            d = os.path.dirname(os.path.abspath(args.model))
            raise InputError(f"-m {args.model}: this is a file; pass the checkpoint directory (e.g. -m {d})")
        if not os.path.exists(args.model):
            raise InputError(f"-m {args.model}: no such checkpoint directory")
        return args.model
    from . import demo_checkpoint

    d = demo_checkpoint()
    if not os.path.exists(os.path.join(d, "config.json")):
        raise PykimiError(f"{d}: the bundled demo checkpoint is missing; pass --model DIR")
    return d


def _cache_dtype(args) -> str | None:
    """--cache-dtype checked here rather than by argparse ``choices`` (whose error is a usage block, not the
    one line every other bad input gets): None when not given."""
    from .cache import CACHE_DTYPES

    v = getattr(args, "cache_dtype", None)
    if v is not None and v not in CACHE_DTYPES:
        raise InputError(f"--cache-dtype {v}: expected one of {', '.join(CACHE_DTYPES)}")
    return v


def _act_quant(args) -> str | None:
    """--act-quant checked here (one line, as --cache-dtype): None when not given."""
    from .kernels.linear import _ACT_MODES

    v = getattr(args, "act_quant", None)
    if v is not None and v not in _ACT_MODES:
        raise InputError(f"--act-quant {v}: expected one of {', '.join(_ACT_MODES)}")
    return v


def _load(args):
    from . import load
    from .processor import Processor

    t0 = time.perf_counter()
    path = _model_dir(args)
    opts = {}
    if _cache_dtype(args):
        opts["cache_dtype"] = args.cache_dtype
    if getattr(args, "backend", None):
        opts["backend"] = args.backend
    if getattr(args, "threads", None):
        opts["threads"] = args.threads
    if getattr(args, "max_context", None) is not None:
        opts["max_context"] = args.max_context
    if getattr(args, "mlock", False):
        opts["mlock"] = True
    if _act_quant(args):
        opts["act_quant"] = args.act_quant
    model = load(path, **opts)
    if model.memory_lock is not None:
        print(f"pykimi: {model.memory_lock.describe()}", file=sys.stderr, flush=True)
    proc = Processor.from_pretrained(path)
    _apply_generation_defaults(args, path)
    return model, proc, path, time.perf_counter() - t0


# built-in sampling defaults, used when neither a flag nor the checkpoint's generation_config.json gives one
GEN_DEFAULTS = {"max_new_tokens": 256, "temp": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
_GEN_CONFIG_KEYS = {"max_new_tokens": "max_new_tokens", "temp": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "repeat_penalty": "repetition_penalty"}


def _apply_generation_defaults(args, path) -> None:
    """Fill the sampling options no flag set: generation_config.json of the checkpoint first, then GEN_DEFAULTS.
    ``args.gen_sources`` says where each value came from ('flag', 'generation_config.json', 'default')."""
    from .variants import generation_defaults

    if not hasattr(args, "temp"):
        return
    gen = generation_defaults(path)
    args.gen_config = gen
    src = {}
    for key, default in GEN_DEFAULTS.items():
        if getattr(args, key, None) is not None:
            src[key] = "flag"
        elif _GEN_CONFIG_KEYS.get(key) in gen:
            setattr(args, key, gen[_GEN_CONFIG_KEYS[key]])
            src[key] = "generation_config.json"
        else:
            setattr(args, key, default)
            src[key] = "default"
    args.gen_sources = src


def _open_images(paths):
    from .image import load_image

    return [load_image(p) for p in paths]


def _messages(system, prompt, n_images):
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    msgs = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": content if n_images else prompt})
    return msgs


def _gen_kwargs(args, model=None, prompt_len: int | None = None) -> dict:
    if getattr(args, "temp", None) is None:            # options not resolved against a checkpoint (_load)
        for key, default in GEN_DEFAULTS.items():
            if getattr(args, key, None) is None:
                setattr(args, key, default)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
              min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed)
    gen = getattr(args, "gen_config", None) or {}
    srcs = getattr(args, "gen_sources", {})
    if "max_length" in gen and prompt_len is not None and srcs.get("max_new_tokens") != "flag":
        kw["max_new_tokens"] = max(0, min(kw["max_new_tokens"], gen["max_length"] - prompt_len))
    if getattr(args, "ignore_eos", False):
        kw["stop_ids"] = []
    elif gen.get("stop_ids") and model is not None:
        # generation_config.json's eos ids stop too, beside [EOS] and <|im_end|>
        kw["stop_ids"] = list(dict.fromkeys(list(model.stop_ids) + gen["stop_ids"]))
    return kw


class ReasoningView:
    """Shows an answer as it streams, with the reasoning of a thinking model kept apart (--reasoning):
    'show' prints it under a '[reasoning]' header (dimmed on a terminal) and the answer under '[answer]';
    'hide' prints the answer only; 'raw' prints the text as generated, markers included. A text without
    think markers prints as it is in every mode."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, mode: str, out, color: bool | None = None):
        self.mode = mode
        self.out = out
        self.color = (hasattr(out, "isatty") and out.isatty()) if color is None else color
        self.kind = None
        self.shown_reasoning = False

    def write_raw(self, text: str) -> None:
        if self.mode == "raw" and text:
            self.out.write(text)
            self.out.flush()

    def write(self, pieces) -> None:
        if self.mode == "raw":
            return
        for kind, text in pieces:
            if kind == "reasoning":
                if self.mode == "hide":
                    continue
                if self.kind != "reasoning":
                    self.out.write("[reasoning]\n")
                    self.shown_reasoning = True
                self.out.write(f"{self.DIM}{text}{self.RESET}" if self.color else text)
            else:
                if self.kind == "reasoning" and self.mode == "show":
                    self.out.write("\n[answer]\n")
                self.out.write(text)
            self.kind = kind
        self.out.flush()


def _generate(model, proc, inputs, args, out=None, stream=True):
    """Run one answer; returns (text, ids, stats). Prints tokens as they come when ``stream``; the reasoning
    of a thinking model is split off (``stats['reasoning']``, ``stats['answer']``) and shown per --reasoning."""
    import numpy as np

    from .reasoning import ReasoningBudget

    out = sys.stdout if out is None else out           # looked up per call (tests replace sys.stdout)

    ids = np.asarray(inputs["input_ids"])
    pv, grid = inputs.get("pixel_values"), inputs.get("image_grid_hws")
    t0 = time.perf_counter()
    rs = proc.reasoning_stream()
    view = ReasoningView(getattr(args, "reasoning", None) or "show", out)
    new = []
    t_first = None
    kw = _gen_kwargs(args, model, int(ids.shape[-1]))
    budget = getattr(args, "reasoning_budget", None)
    budget = None if budget is None else ReasoningBudget(proc.tokenizer, budget, proc.think_start, proc.think_end)
    if budget is not None:
        from .generate import generate as _gen      # the decode loop that takes forced ids
        it = _gen(model, ids, pixel_values=pv, image_grid_hws=grid, stream=True, force=budget.force, **kw)
    else:
        it = model.generate(ids, pixel_values=pv, image_grid_hws=grid, stream=True, **kw)
    try:
        for tok in it:
            if t_first is None:
                t_first = time.perf_counter()
            new.append(int(tok))
            n0 = len(rs.text)
            pieces = rs.add(tok)
            if stream:
                view.write_raw(rs.text[n0:])
                view.write(pieces)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    n0 = len(rs.text)
    pieces = rs.flush()
    if stream:
        view.write_raw(rs.text[n0:])
        view.write(pieces)
    t_end = time.perf_counter()
    text = rs.text
    stats = getattr(model, "last_stats", None) or {}
    stats = dict(stats)
    stats.setdefault("prompt_tokens", int(ids.shape[0]))
    stats["images"] = 0 if grid is None else int(np.asarray(grid).reshape(-1, 2).shape[0])
    stats.setdefault("new_tokens", len(new))
    if t_first is not None:
        stats.setdefault("first_token_s", t_first - t0)
    if stats.get("decode_s") and len(new) > 1:       # the model's own timing of the decode steps
        stats["decode_tok_s"] = (len(new) - 1) / stats["decode_s"]
    elif t_first is not None and len(new) > 1:
        stats["decode_tok_s"] = (len(new) - 1) / max(t_end - t_first, 1e-9)
    stats["total_s"] = t_end - t0
    stats["reasoning"], stats["answer"] = rs.reasoning, rs.answer
    stats["reasoning_tokens"] = rs.reasoning_tokens if rs.reasoning is not None else 0
    if budget is not None:
        stats["reasoning_budget"] = {"budget": budget.record.budget, "forced": budget.record.forced,
                                     "forced_at": budget.record.forced_at}
    return text, new, stats


def _timing_line(load_s, stats) -> str:
    parts = [f"load {load_s:.2f} s"]
    if stats.get("encode_s") is not None and stats.get("images"):
        parts.append(f"image encode {stats['encode_s']:.2f} s")
    if stats.get("prefill_s"):
        parts.append(f"prefill {stats['prompt_tokens']} tok at {stats['prompt_tokens'] / stats['prefill_s']:.1f} tok/s")
    elif stats.get("first_token_s") is not None:
        parts.append(f"prompt {stats['prompt_tokens']} tok, first token after {stats['first_token_s']:.2f} s")
    if stats.get("decode_tok_s"):
        # the first new token comes from the prefill's logits; the rest are decode steps
        parts.append(f"decode {stats['new_tokens'] - 1} tok at {stats['decode_tok_s']:.1f} tok/s")
    m = _mem()
    parts.append(f"peak RSS {m['peak_rss_mb']:.0f} MB" + (f", anon {m['anon_mb']:.0f} MB" if m["anon_mb"] else ""))
    return "[" + " | ".join(parts) + "]"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where it lands so the same cleanup as for Ctrl-C runs (then exit status 143)."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While writing files: turn SIGTERM into an exception (the code's own cleanup then removes partial
    output, as for SIGINT). Only in the main thread; the previous handler comes back afterwards."""
    try:
        prev = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:               # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def _raise_terminated(signum, frame):
    raise Terminated()


def _check_out_file(path: str, what: str) -> None:
    """Refuse an output file path that cannot work before any long computation."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path}: is a directory; pass a file name "
                         f"(e.g. {os.path.join(path, 'trace.safetensors')})")
    probe = os.path.dirname(os.path.abspath(path))     # the nearest existing ancestor: the writer creates the rest
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InputError(f"{what} {path}: {probe} is a file, not a directory")
    try:                                                # os.access is no proof (root, read-only mounts): try it
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".pykimi-probe-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise InputError(f"{what} {path}: cannot write in {probe} ({e.strerror or e})") from None


def _checked(conv, ok, expected: str):
    """An argparse type: ``conv(s)`` that must satisfy ``ok``, else a one-line error saying what was expected."""
    def parse(s: str):
        try:
            v = conv(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if conv is int else 'a number'}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{s}: expected {expected}")
        return v
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer (omit the option for the default)")
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_nonneg_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_count = _checked(int, lambda v: v >= 1, "an integer >= 1")


def _seed(s: str):
    """--seed N (N >= 0), or -1 = a random seed (llama.cpp's meaning)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v == -1:
        return None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v}: expected an integer >= 0, or -1 for a random seed")
    return v


# --------------------------------------------------------------------------------------------- commands

def _is_demo(path: str) -> bool:
    from . import demo_checkpoint

    return os.path.realpath(path) == os.path.realpath(demo_checkpoint())


def _save_scene(img, wanted: str | None):
    """Save the demo's scene: to --save-scene (an error if that fails: the user asked for it), else to
    ./pykimi_scene.png, else (read-only working directory) to the temp directory. Returns (path, note)."""
    if wanted:
        try:
            img.save(wanted)
        except (OSError, ValueError) as e:
            raise InputError(f"--save-scene {wanted}: cannot write the scene ({getattr(e, 'strerror', None) or e})") \
                from None
        return wanted, ""
    for d in (os.getcwd(), tempfile.gettempdir()):
        p = os.path.join(d, "pykimi_scene.png")
        try:
            img.save(p)
            return p, ("" if d == os.getcwd() else " (the working directory is not writable)")
        except OSError:
            continue
    return None, ""


def cmd_run(args) -> int:
    if args.save_scene and os.path.isdir(args.save_scene):
        raise InputError(f"--save-scene {args.save_scene}: is a directory; pass a file name ending in .png")
    model, proc, path, load_s = _load(args)
    images = _open_images(args.image)
    prompt = args.prompt
    scene_path = None
    if not images and _is_demo(path) and not getattr(args, "video", None):
        # the demo model only answers questions about an image (pykimi/demo/README.md): draw a fresh scene
        # rather than let it answer a question about a picture it was never shown
        from .scenes import random_scene
        import numpy as np

        rng = np.random.default_rng(args.seed)
        img, shapes = random_scene(rng)
        scene_path, why = _save_scene(img, args.save_scene)
        images = [img]
        if not args.json:
            where = f"saved to {scene_path}{why}" if scene_path else "not saved: no writable directory"
            print(f"(no --image: the demo model answers questions about an image; drew a random scene, {where})",
                  file=sys.stderr)
    fit = None
    if getattr(args, "video", None):
        # a video goes in as frames with timestamps, fitted to the context (pykimi/video.py has the choice)
        msgs = _messages(args.system, DEFAULT_VIDEO_PROMPT if prompt is None else prompt, 0)
        if images:
            msgs[-1]["content"] = ([{"type": "image", "image": im} for im in images]
                                   + [{"type": "text", "text": msgs[-1]["content"]}])
        msgs, fit = _attach_video(model, proc, msgs, args.video, args)
        inputs = proc.prepare(msgs)
    else:
        if prompt is None:
            prompt = DEFAULT_PROMPT
        msgs = _messages(args.system, prompt, len(images))
        inputs = proc.prepare(msgs, images=images or None)
    stream = not args.no_stream and not args.json
    text, ids, stats = _generate(model, proc, inputs, args, stream=stream)
    if fit is not None:
        stats["video"] = dict(vars(fit), timestamps=[round(t, 3) for t in fit.timestamps])
    reasoning, answer = stats.pop("reasoning"), stats.pop("answer")
    if args.json:
        print(json.dumps({"model": path, "prompt": prompt, "images": args.image or ([scene_path] if scene_path else []),
                          "text": text, "reasoning": reasoning, "answer": answer, "ids": ids, "stats": stats,
                          "options": {k: getattr(args, k) for k in GEN_DEFAULTS},
                          "option_sources": getattr(args, "gen_sources", {}), "load_s": load_s, **_mem()}))
    else:
        if not stream:
            view = ReasoningView(args.reasoning, sys.stdout)
            view.write_raw(text)
            view.write(([("reasoning", reasoning)] if reasoning is not None else []) + [("answer", answer)])
        sys.stdout.write("\n")
        print(_timing_line(load_s, stats), file=sys.stderr)
    return 0


DEFAULT_VIDEO_PROMPT = "Describe the video."


def _attach_video(model, proc, msgs, path, args, frames=None):
    """Load a video, sample its frames and fit them into the context (--max-context, else the model's) with room
    for --max-new-tokens; returns (messages with the frames inline, the fit record)."""
    from .video import fit_video, load_video

    video = load_video(path, frames=frames if frames is not None else getattr(args, "frames", None),
                       fps=None if frames is not None else getattr(args, "fps", None))
    ctx = getattr(args, "max_context", None) or model.context_limit
    msgs, fit = fit_video(proc, msgs, video, ctx, args.max_new_tokens)
    fit.timestamps = list(video.timestamps)
    if not getattr(args, "json", False):
        print(f"(video {path}: {len(video)} frames at " + ", ".join(f"{t:.1f}" for t in video.timestamps)
              + f" s of {video.duration:.1f} s, {fit.tokens_per_frame} image tokens each)", file=sys.stderr)
    return msgs, fit


def cmd_chat(args) -> int:
    model, proc, path, load_s = _load(args)
    print(f"pykimi chat on {path} (load {load_s:.1f} s). {CHAT_HELP}; Ctrl-C stops an answer.", file=sys.stderr)
    demo = _is_demo(path)
    pending_video = None
    history: list = []
    images: list = []
    pending: list = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    while True:
        try:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            n_img = len(images) + len(pending)
            history = history[:1] if args.system else []
            images, pending = [], []
            print(f"(conversation reset: history and {n_img} image(s) dropped"
                  + (", the system prompt kept" if args.system else "")
                  + "; /image PATH to attach one again)", file=sys.stderr)
            continue
        if line == "/help":
            print(CHAT_HELP, file=sys.stderr)
            continue
        if line == "/video" or line.startswith("/video "):
            parts = line[len("/video"):].split()
            if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
                print("error: usage: /video PATH [FRAMES]", file=sys.stderr)
                continue
            pending_video = (parts[0], int(parts[1]) if len(parts) == 2 else None)
            print(f"(video {parts[0]} goes with your next message)", file=sys.stderr)
            continue
        if line == "/image" or line.startswith("/image "):
            p = line[len("/image"):].strip()
            if not p:
                print("error: /image needs a path: /image PATH", file=sys.stderr)
                continue
            try:
                pending.extend(_open_images([p]))
                print(f"(attached {p})", file=sys.stderr)
            except PykimiError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if line.startswith("//"):
            line = line[1:]                     # "//text" sends "/text" to the model
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {CHAT_HELP}", file=sys.stderr)
            continue
        if demo and not images and not pending:
            print("(note: no image attached; the demo model answers questions about an image: /image PATH)",
                  file=sys.stderr)
        # images inline in the history, so a later video can count their tokens (pykimi.video.fit_video)
        content = [{"type": "image", "image": im} for im in pending] + [{"type": "text", "text": line}]
        history.append({"role": "user", "content": content if pending else line})
        images.extend(pending)
        pending = []
        try:
            if pending_video is not None:
                vpath, vframes = pending_video
                pending_video = None
                # on an error the history is unchanged and the except below drops this user turn
                history, _ = _attach_video(model, proc, history, vpath, args, frames=vframes)
            inputs = proc.prepare(history)
            text, ids, stats = _generate(model, proc, inputs, args, stream=True)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
            history.pop()
            continue
        except PykimiError as e:
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(_timing_line(0.0, stats), file=sys.stderr)
        # the answer goes back into the prompt; the reasoning rides along as reasoning_content, which the
        # Kimi-VL chat template does not render (it writes message['content'] only): earlier turns' thinking
        # is not shown to the model again (tests/test_reasoning.py::test_template_drops_reasoning_content)
        turn = {"role": "assistant", "content": stats["answer"]}
        if stats["reasoning"] is not None:
            turn["reasoning_content"] = stats["reasoning"]
        history.append(turn)
    return 0


def cmd_info(args) -> int:
    from . import kernels

    if args.backends or not args.dir:
        print("kernel backends:")
        for name, d in kernels.backends().items():
            if not isinstance(d, dict):
                continue
            extra = ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("available", "reason"))
            print(f"  {name:<6} {'available' if d['available'] else 'unavailable'}: {d['reason']}"
                  + (f" ({extra})" if extra else ""))
        print(f"  active: {kernels.backend()}")
        if not args.dir:
            return 0
    from .config import load_config

    from .variants import detect_variant

    cfg = load_config(args.dir)
    d = args.dir if os.path.isdir(args.dir) else os.path.dirname(args.dir)
    print(cfg.summary())
    print(detect_variant(d or ".", cfg).summary())
    has_weights = any(f.endswith(".safetensors") for f in os.listdir(d))
    if has_weights:
        from collections import Counter

        from .config import check_fits
        from .layout import expected_tensors
        from .weights import Checkpoint

        ck = Checkpoint.open(d)
        check_fits(cfg, ck)                        # sizes bounded by the files before the tensor table is built
        dt = Counter()
        by = Counter()
        for n in ck.names():
            i = ck.info(n)
            dt[i.dtype] += 1
            by[i.dtype] += i.nbytes
        need = {n for n, _ in expected_tensors(cfg)}
        missing = sorted(n for n in need if not ck.has_weight(n))
        print(f"  tensors: {len(ck)} in {len(ck._files)} file(s), {ck.total_bytes() / 1e9:.3f} GB; "
              + ", ".join(f"{k} x{dt[k]} ({by[k] / 1e6:.1f} MB)" for k in sorted(dt)))
        if ck.metadata.get("pykimi.quant"):
            print("  quantized: " + str(ck.metadata.get("pykimi.quant.summary", "yes")))
        print("  complete: yes" if not missing else f"  MISSING {len(missing)} tensors, e.g. {missing[0]}")
        if args.tensors:
            for n in ck.names():
                i = ck.info(n)
                stored = getattr(ck, "stored_names", {}).get(n, n)          # Moonlight: the name in the file
                print(f"    {stored:<70} {i.dtype:<5} {list(i.shape)}")
    else:
        print("  (no weights in this directory: config only)")
    return 0


def cmd_trace(args) -> int:
    import numpy as np

    from .trace import trace

    _check_out_file(args.out, "--out")
    model, proc, path, load_s = _load(args)
    images = _open_images(args.image)
    if args.inputs:
        from .weights import Checkpoint

        ck = Checkpoint.open(args.inputs)
        inputs = {n: np.array(ck.get(n)) for n in ck.names()}
        if "input_ids" not in inputs:
            held = ", ".join(sorted(inputs)) or "nothing"
            raise InputError(f"--inputs {args.inputs}: has no 'input_ids' tensor (expected input_ids and, with "
                             f"images, pixel_values and image_grid_hws); it holds {held}")
    else:
        msgs = _messages(args.system, args.prompt or DEFAULT_PROMPT, len(images))
        inputs = proc.prepare(msgs, images=images or None)
    names = args.names or None
    with trace(model, names=names) as t:
        model.forward(inputs["input_ids"], pixel_values=inputs.get("pixel_values"),
                      image_grid_hws=inputs.get("image_grid_hws"))
    try:
        with _sigterm_as_interrupt():
            t.save(args.out, metadata={"model": path})
    except OSError as e:
        raise InputError(f"--out {args.out}: cannot write the dump ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(args.out + ".tmp")        # the writer's temporary file, if the final rename failed
    print(f"wrote {len(t)} tensors to {args.out}")
    return 0


def cmd_diff(args) -> int:
    from .debug import compare, golden_tolerances

    tols = None
    for p in (args.b, args.a):
        d = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
        if os.path.exists(os.path.join(d, "manifest.json")) and not args.rel:
            tols = golden_tolerances(d)
            break
    rep = compare(args.a, args.b, atol=args.atol, rtol=args.rtol, rel_tol=args.rel or 2e-5, tolerances=tols,
                  names=args.names or None)
    print(rep.format(all_rows=not args.only_bad))
    return 0 if rep.ok else 1         # nothing compared is not ok (Report.ok)


def cmd_quantize(args) -> int:
    from .quant import quantize_checkpoint

    with _sigterm_as_interrupt():   # a SIGTERM cleans DST.partial up like Ctrl-C does
        quantize_checkpoint(args.src, args.dst, bits=args.bits, what=args.what, progress=not args.quiet,
                            overwrite=args.overwrite)
    print(f"wrote {args.dst}")
    return 0


def cmd_batch(args) -> int:
    """One prompt per image over a folder or a JSONL file -> OUT.jsonl, resumable (pykimi.batch)."""
    import signal
    import threading

    from . import progress
    from .batch import Settings, run_batch

    progress.enable(False)                     # one bar for the job, not one per prefill
    if args.parallel < 1:
        raise PykimiError(f"--parallel {args.parallel}: expected an integer >= 1")
    if args.workers < 1:
        raise PykimiError(f"--workers {args.workers}: expected an integer >= 1")
    if getattr(args, "reasoning_budget", None) is not None:
        raise PykimiError("--reasoning-budget is not supported by pykimi batch (rows keep the whole reasoning)")
    model_dir = _model_dir(args)
    _apply_generation_defaults(args, model_dir)          # flags, then generation_config.json, then the defaults
    gen = getattr(args, "gen_config", None) or {}
    settings = Settings(system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temp,
                        top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                        repetition_penalty=args.repeat_penalty, seed=args.seed,
                        stop_ids=() if args.ignore_eos else None,
                        extra_stop_ids=tuple(int(i) for i in gen.get("stop_ids") or ()))
    _cache_dtype(args)
    _act_quant(args)
    opts = {k: getattr(args, k) for k in ("backend", "threads", "max_context", "cache_dtype", "mlock", "act_quant")
            if getattr(args, k, None)}
    stop = threading.Event()

    def on_sigint(signum, frame):              # first Ctrl-C: finish and write the rows in flight; second: abort
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\npykimi: stopping after the rows in flight (Ctrl-C again to abort them)", file=sys.stderr)

    def log(msg):
        print(f"pykimi: {msg}", file=sys.stderr)

    # a job started with SIGINT ignored (nohup, `cmd &` from a script) keeps ignoring it
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    old = signal.getsignal(signal.SIGINT) if ignored else signal.signal(signal.SIGINT, on_sigint)
    try:
        summary = run_batch(args.input, args.out, model_dir, settings, prompt=args.prompt,
                            parallel=args.parallel, load_options=opts, fail_fast=args.fail_fast, stop=stop,
                            show_progress=not args.quiet, ray_address=args.ray, workers=args.workers, log=log)
    finally:
        signal.signal(signal.SIGINT, old)
    if summary.actors:
        for pid, anon in sorted(summary.actors.items()):
            log(f"ray actor pid {pid}: RssAnon {anon:.0f} MB")
    print(summary.line(args.out))
    return 130 if summary.interrupted else 0


# --------------------------------------------------------------------------------------------- parser

def cmd_serve(args) -> int:
    """The OpenAI-compatible server (issue 20): one engine thread owns the model, uvicorn serves the app."""
    import logging
    import socket

    try:
        import uvicorn

        from .server.app import create_app
    except ImportError as e:
        raise PykimiError(f"pykimi serve needs the 'serve' extra (pip install 'pykimi[serve]'): {e}") from None
    from .engine import Engine, freeze_heap

    if args.parallel < 1:
        raise PykimiError(f"--parallel {args.parallel}: expected an integer >= 1")
    if not 0 <= args.port <= 65535:
        raise PykimiError(f"--port {args.port}: expected 0..65535")
    if args.cache_budget is not None and not args.cache_budget > 0:
        raise PykimiError(f"--cache-budget {args.cache_budget}: expected a positive number of MB")
    if args.media_dir is not None and not os.path.isdir(args.media_dir):
        raise PykimiError(f"--media-dir {args.media_dir}: not a directory")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise PykimiError(f"--prefill-chunk {args.prefill_chunk}: expected an integer >= 1")
    if args.max_context is not None and args.max_context < 2:
        raise PykimiError(f"--max-context {args.max_context}: expected an integer >= 2")
    _cache_dtype(args)
    _act_quant(args)
    try:                                    # a taken port is a one-line error, before the model loads
        fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host, args.port))
    except OSError as e:
        raise PykimiError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    model, proc, path, load_s = _load(args)
    engine = Engine(model, parallel=args.parallel, max_context=args.max_context, cache_budget_mb=args.cache_budget,
                    max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    model_id = args.alias or os.path.basename(os.path.normpath(path))
    app = create_app(model, proc, engine, model_id=model_id, api_key=args.api_key, media_dir=args.media_dir,
                     allow_remote=args.allow_remote_images)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    engine.start()
    engine.warmup()
    freeze_heap()                              # after the warm-up: no full collection walks the model (engine.py)
    print(f"pykimi serve: {model_id} ({path}) loaded in {load_s:.1f} s; OpenAI API at "
          f"http://{args.host}:{args.port}/v1, {args.parallel} parallel sequences", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        engine.stop()
    return 0


def _add_model_args(p):
    p.add_argument("-m", "--model", help="checkpoint directory (HF layout); default: the bundled demo checkpoint")
    p.add_argument("-t", "--threads", type=_positive_int, help="kernel threads (default: PYKIMI_THREADS or all cores)")
    p.add_argument("--backend", choices=["numpy", "numba", "c"], help="kernel backend (default: fastest available)")
    p.add_argument("-c", "--max-context", "--ctx-size", dest="max_context", type=_positive_int,
                   help="refuse prompts + answers longer than this many tokens (default: the model's "
                        "max_position_embeddings)")
    _add_cache_dtype_arg(p)
    _add_mlock_arg(p)
    _add_act_quant_arg(p)


def _add_act_quant_arg(p):
    p.add_argument("--act-quant", metavar="{q4,all,none}",
                   help="how the kernels treat activations: q4 (default) int16 for int8 weights, int8 for int4, "
                        "exact f32 for bf16; all: rounded as llama.cpp and PyTorch round them (int8; bf16 for bf16 "
                        "batches where the CPU has AVX512_BF16), fastest; none: exact f32 products everywhere "
                        "(default: PYKIMI_ACT_QUANT, README 'Kernels')")


def _add_mlock_arg(p):
    p.add_argument("--mlock", action="store_true",
                   help="keep the weights in RAM (mlock the mapped files): no stalls when the page cache is "
                        "reclaimed; refused with a clear error when RAM or RLIMIT_MEMLOCK is too small")


def _add_cache_dtype_arg(p):
    p.add_argument("--cache-dtype", metavar="{f32,bf16}",
                   help="latent KV cache storage: f32 (default) or bf16 (half the bytes per token; each cached "
                        "value rounded to 8 mantissa bits, README 'Long context')")


def _add_gen_args(p):
    # sampling options default to the checkpoint's generation_config.json, then to GEN_DEFAULTS; a flag wins
    p.add_argument("--system", help="system prompt (default: the template's 'You are a helpful assistant')")
    p.add_argument("-n", "--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=None,
                   help="default: generation_config.json's max_new_tokens, else 256")
    p.add_argument("--temp", "--temperature", dest="temp", type=float, default=None,
                   help="temperature; 0 = greedy (default: generation_config.json's, else 0)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repeat-penalty", type=float, default=None)
    p.add_argument("--seed", type=_seed, default=None, help="sampling seed; -1 or omitted = random")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop on [EOS] / <|im_end|> (benchmarks)")
    p.add_argument("--reasoning", choices=["show", "hide", "raw"], default="show",
                   help="a thinking model's ◁think▷ reasoning: under its own header, dimmed (show, default), "
                        "not printed (hide), or as generated with the markers (raw)")
    p.add_argument("--reasoning-budget", type=_nonneg_int, default=None, metavar="N",
                   help="close the thinking after N generated tokens by inserting ◁/think▷")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pykimi", description="Kimi-VL-A3B-Instruct on the CPU")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    from . import __version__
    ap.add_argument("--version", action="version", version=f"pykimi {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="answer one prompt (with images), streaming")
    _add_model_args(p)
    _add_gen_args(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", help="a video file: sampled frames go in as images with their timestamps "
                                   "(needs PyAV: pip install 'pykimi[video]')")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--frames", type=_count, help="frames sampled uniformly from --video (default 8)")
    g.add_argument("--fps", type=_positive_float, help="sample --video at this many frames per second")
    p.add_argument("-p", "--prompt", help=f"the question (default: {DEFAULT_PROMPT!r}, with --video "
                                          f"{DEFAULT_VIDEO_PROMPT!r})")
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, ids, timings)")
    p.add_argument("--save-scene", help="where the demo's random scene is saved (default ./pykimi_scene.png)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _add_model_args(p)
    _add_gen_args(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("info", help="architecture, parameter counts, tensors, backends")
    p.add_argument("dir", nargs="?", help="checkpoint directory (or config.json)")
    p.add_argument("--backends", action="store_true", help="show the kernel backends")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("trace", help="record named intermediates of a forward pass to a safetensors dump")
    _add_model_args(p)
    p.add_argument("--image", action="append", default=[])
    p.add_argument("-p", "--prompt")
    p.add_argument("--system")
    p.add_argument("--inputs", help="an inputs.safetensors (input_ids, pixel_values, image_grid_hws) instead")
    p.add_argument("--names", action="append", help="glob of names to keep (repeatable)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_trace)

    p = sub.add_parser("diff", help="compare two dumps (A under test, B reference) in execution order")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--atol", type=_nonneg_float, default=0.0)
    p.add_argument("--rtol", type=_nonneg_float, default=0.0)
    p.add_argument("--rel", type=_positive_float, help="scale-relative tolerance (default: B's manifest, else 2e-5)")
    p.add_argument("--names", action="append")
    p.add_argument("--only-bad", action="store_true")
    p.set_defaults(fn=cmd_diff)

    p = sub.add_parser("quantize",
                       help="repack a checkpoint (bf16, or an int8 / int4 repack) to int8 / int4 (streaming)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8)
    p.add_argument("--what", choices=["experts", "all"], default="experts")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(fn=cmd_quantize)

    from .bench import add_parser as add_bench
    add_bench(sub)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-np", "--parallel", type=int, default=4, help="sequences decoded together (default 4)")
    p.add_argument("--api-key", default=os.environ.get("PYKIMI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $PYKIMI_API_KEY, else none)")
    p.add_argument("--cache-budget", type=float, help="MB of latent cache for all sequences (admission waits)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503 (default 64)")
    p.add_argument("--prefill-chunk", type=int, help="prompt tokens prefilled between two decode steps "
                   "(default: the model's 512; smaller keeps running streams flowing during a long prompt)")
    p.add_argument("--media-dir", help="allow file:// image URLs inside this directory")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (size cap, timeout)")
    p.add_argument("--alias", help="the model id clients send (default: the checkpoint directory's name)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("batch", help="one prompt per image over a folder or JSONL file -> OUT.jsonl (resumable)")
    p.add_argument("input", help="a folder of images (recursive; id = relative path) or a JSONL file of "
                                 '{"id", "image", "prompt"?} rows')
    p.add_argument("-o", "--out", required=True, help="output JSONL; rows already in it are skipped (resume)")
    _add_model_args(p)
    _add_gen_args(p)
    p.add_argument("-p", "--prompt", help=f"the question for rows without one (default: {DEFAULT_PROMPT!r})")
    p.add_argument("-np", "--parallel", type=int, default=1,
                   help="sequences decoded together in this process, or in each Ray actor (> 1: the batched engine)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run as a Ray Data pipeline: alone starts a small local Ray, ADDRESS joins a cluster "
                        "(put it after INPUT, or write --ray=ADDRESS)")
    p.add_argument("--workers", type=int, default=2, help="Ray actors, each with its own memory-mapped model")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing row instead of writing "
                                                             '{"id", "error"} and going on')
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_batch)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if getattr(args, "threads", None):
        os.environ["PYKIMI_THREADS"] = str(args.threads)
    from . import progress

    progress.enable(not getattr(args, "json", False) and args.cmd != "serve")   # bars on stderr for long steps (prefill, vision)
    try:
        return args.fn(args)
    except PykimiError as e:
        if args.debug:
            raise
        print(f"pykimi: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("\npykimi: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("\npykimi: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:     # a file the user named cannot be read or written: one line, not a traceback
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"pykimi: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
