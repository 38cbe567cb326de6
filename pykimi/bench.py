"""``pykimi bench``: the prompt-processing / text-generation table users know from llama.cpp's llama-bench.

Each test runs ``-r`` times after one warm-up (Numba's JIT, first page faults) and reports tokens per second as
mean ± sample standard deviation over the repetitions, like llama-bench:

* ``pp{N}``: prefill of N prompt tokens into an empty latent cache (expanded MLA, chunked as ``pykimi.load``
  sets it), the logits of the last position only -- llama-bench's prompt processing;
* ``tg{N}``: N decode steps, one token each (absorbed MLA against the cache), starting after a one-token prompt,
  greedy; llama-bench's text generation;
* ``img{P}`` (``--image-px P``): the vision tower and projector on one P x P image (patches per second;
  a VLM's third cost, which llama-bench has no column for).

Prompts are random ids drawn below the first special token, with a fixed seed, so runs compare. Nothing here
is a correctness check: ``bench/`` holds the peer comparisons (PyTorch, llama.cpp) and the bandwidth bound.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from .errors import InputError


def add_parser(sub) -> None:
    """Register ``pykimi bench`` on the command line's sub-parsers."""
    p = sub.add_parser("bench", help="prompt processing / generation / image speed (llama-bench style table)")
    p.add_argument("-m", "--model", help="checkpoint directory; default: the bundled demo checkpoint")
    p.add_argument("-p", "--n-prompt", default="512", help="prompt lengths, comma-separated (0 skips; default 512)")
    p.add_argument("-n", "--n-gen", default="128", help="generated tokens, comma-separated (0 skips; default 128)")
    p.add_argument("--image-px", default="0", help="square image sizes in pixels for the vision test (default off)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions per test (default 5)")
    p.add_argument("-t", "--threads", type=int, help="kernel threads (default: all cores)")
    p.add_argument("--backend", choices=["numpy", "numba", "c"], help="kernel backend (default: fastest available)")
    from .cli import _add_act_quant_arg, _add_cache_dtype_arg, _add_mlock_arg
    _add_cache_dtype_arg(p)
    _add_act_quant_arg(p)
    _add_mlock_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    p.set_defaults(fn=cmd_bench)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated whole numbers, e.g. 128,512") from None
    if any(v < 0 for v in vals):
        raise InputError(f"{flag} {text!r}: expected numbers >= 0")
    return [v for v in vals if v > 0]


def _prompt(n: int, model, seed: int = 1) -> np.ndarray:
    """n random ids below the first special token (ids the tokenizer would produce from text)."""
    hi = model.text.vocab_size
    special = [i for i in model.stop_ids if i > 0]
    if special:
        hi = min(hi, min(special))
    return np.random.default_rng(seed).integers(0, max(2, hi), size=n).astype(np.int64)


def time_prefill(model, n: int) -> float:
    """Seconds for one prefill of n tokens into a fresh cache."""
    ids = _prompt(n, model)
    cache = model.new_cache(n + 1)
    x = model.embed(ids)
    t0 = time.perf_counter()
    model.prefill(x, cache, all_logits=False)
    return time.perf_counter() - t0


def time_generate(model, n: int) -> float:
    """Seconds for n greedy decode steps after a one-token prompt (the prompt's prefill not counted)."""
    ids = _prompt(1, model)
    cache = model.new_cache(n + 2)
    logits = model.prefill(model.embed(ids), cache, all_logits=False)
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(model.decode_step(tok, cache)))
    return time.perf_counter() - t0


def time_image(model, px: int) -> tuple[float, int]:
    """(seconds, patches) of the vision tower + projector on one px x px image of random pixels."""
    v = model.config.vision
    g = px // v.patch_size
    merge = v.merge_kernel_size
    g -= g % merge[0]
    if g < merge[0]:
        raise InputError(f"--image-px {px}: expected at least {merge[0] * v.patch_size} pixels")
    pv = np.random.default_rng(0).uniform(-1, 1, (g * g, 3, v.patch_size, v.patch_size)).astype(np.float32)
    grid = np.array([[g, g]], dtype=np.int64)
    t0 = time.perf_counter()
    model.encode_images(pv, grid)
    return time.perf_counter() - t0, g * g


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
         "amx_int8")


def _cpu_flags() -> str:
    """The SIMD features the kernels care about, as /proc/cpuinfo names them (what a result depends on)."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in FLAGS if f in have)
    except OSError:
        pass
    return ""


def _commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=5)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def describe(model, path: str) -> dict:
    """The row prefix: model name, bytes on disk, parameters, backend with its SIMD level, threads."""
    from . import kernels

    cfg = model.config
    quant = model.ckpt.metadata.get("pykimi.quant") if hasattr(model.ckpt, "metadata") else None
    name = os.path.basename(os.path.normpath(path)) or path
    backend = kernels.backend()
    simd = ""
    if backend == "c":
        from .kernels import c as ck
        simd = ck.get_simd()
    threads = kernels.get_threads()
    return {"model": name + (f" {quant}" if quant else ""), "model_path": os.path.abspath(path),
            "size_bytes": int(model.ckpt.total_bytes()), "n_params": int(cfg.param_counts()["total"]),
            "backend": backend + (f"-{simd}" if simd else ""), "threads": int(threads),
            "cache_dtype": getattr(model, "cache_dtype", "f32"), "act_quant": kernels.act_quant(),
            "use_mlock": getattr(model, "memory_lock", None) is not None}      # llama.cpp's model parameter


def run(model, path: str, n_prompt: list[int], n_gen: list[int], image_px: list[int], repetitions: int,
        on_row=None) -> list[dict]:
    """Run every test; returns one record per test (llama-bench's JSON fields where they exist)."""
    if repetitions < 1:
        raise InputError(f"--repetitions {repetitions}: expected at least 1")
    limit = model.context_limit
    for n in n_prompt:
        if n + 1 > limit:
            raise InputError(f"-p {n}: over the model's context limit of {limit} tokens")
    for n in n_gen:
        if n + 2 > limit:
            raise InputError(f"-n {n}: over the model's context limit of {limit} tokens")
    if image_px and model.config.vision is None:
        raise InputError(f"--image-px: {path} has no vision tower")
    base = describe(model, path)
    base.update(cpu_info=_cpu(), cpu_flags=_cpu_flags(), build_commit=_commit())
    tests = ([("pp", n, lambda n=n: (time_prefill(model, n), n)) for n in n_prompt]
             + [("tg", n, lambda n=n: (time_generate(model, n), n)) for n in n_gen]
             + [("img", px, lambda px=px: time_image(model, px)) for px in image_px])
    rows = []
    for kind, n, fn in tests:
        fn()                                                     # warm-up: JIT, page faults, scratch
        samples = [fn() for _ in range(repetitions)]
        # the rates from the integer nanoseconds the record keeps (as llama-bench derives ts from ns): from
        # float seconds they disagreed with samples_ns by up to 1 / ns -- 1.4e-6 for a 0.7 ms tg4 sample
        ns = [max(1, int(s * 1e9)) for s, _ in samples]
        rates = [units / (t * 1e-9) for t, (_, units) in zip(ns, samples)]
        row = dict(base, test=f"{kind}{n}", n_prompt=n if kind == "pp" else (1 if kind == "tg" else 0),
                   n_gen=n if kind == "tg" else 0, image_px=n if kind == "img" else 0,
                   unit="patches/s" if kind == "img" else "tok/s",
                   avg_ts=statistics.fmean(rates), stddev_ts=statistics.stdev(rates) if len(rates) > 1 else 0.0,
                   samples_ts=rates, samples_ns=ns)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


COLUMNS = ("model", "size", "params", "backend", "threads", "test", "t/s")


def table_row(r: dict) -> list[str]:
    unit = "" if r["unit"] == "tok/s" else f" {r['unit']}"
    test = r["test"] + (f" kv={r['cache_dtype']}" if r.get("cache_dtype", "f32") != "f32" else "") \
        + (f" act={r['act_quant']}" if r.get("act_quant", "q4") != "q4" else "")
    return [r["model"], _size(r["size_bytes"]), _params(r["n_params"]), r["backend"], str(r["threads"]), test,
            f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}{unit}"]


def markdown(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [table_row(r) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    right = {1, 2, 4, 6}
    fmt = [("| " + " | ".join(c[i].rjust(w[i]) if i in right else c[i].ljust(w[i]) for i in range(len(c))) + " |")
           for c in cells]
    sep = "| " + " | ".join(("-" * (w[i] - 1) + ":") if i in right else "-" * w[i] for i in range(len(w))) + " |"
    return "\n".join([fmt[0], sep] + fmt[1:])


def cmd_bench(args) -> int:
    from . import demo_checkpoint, load

    path = args.model or demo_checkpoint()
    n_prompt = _int_list(args.n_prompt, "-p")
    n_gen = _int_list(args.n_gen, "-n")
    image_px = _int_list(args.image_px, "--image-px")
    if not (n_prompt or n_gen or image_px):
        raise InputError("nothing to measure: give -p, -n or --image-px a number above 0")
    from .cli import _act_quant, _cache_dtype
    model = load(path, backend=args.backend, threads=args.threads, cache_dtype=_cache_dtype(args) or "f32",
                 mlock=args.mlock, act_quant=_act_quant(args))
    if model.memory_lock is not None:
        print(f"pykimi bench: {model.memory_lock.describe()}", file=sys.stderr, flush=True)
    if args.json:
        run(model, path, n_prompt, n_gen, image_px, args.repetitions,
            on_row=lambda r: (print(json.dumps(r)), sys.stdout.flush()))
    else:
        rows = run(model, path, n_prompt, n_gen, image_px, args.repetitions)
        print(markdown(rows))
        r = rows[0]
        print(f"\ncpu: {r['cpu_info']} [{r['cpu_flags']}]" + (f", build {r['build_commit']}" if r["build_commit"]
                                                                else ""))
    return 0
