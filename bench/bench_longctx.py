"""Decode speed against the length of the context (issue 25, "Long context"): ms per token with N positions
already in the latent cache, N = 1024, 8192, 32768, 131072 by default.

    python bench/bench_longctx.py --ckpt DIR                           # f32 cache
    python bench/bench_longctx.py --ckpt DIR --cache-dtype bf16 --out bench/out/longctx-bf16.json
    python bench/bench_longctx.py --lengths 64,256 --tokens 4          # the demo checkpoint, a quick look

Prefilling 128k tokens is out of reach on a small CPU, so the cache is filled synthetically and only the decode
steps are real. Rows of positions 0..N-1 are written straight into the cache (LatentCache.write, so a bf16
cache rounds them as a real prefill would), with the statistics of real rows (spec §8.3):

* c: standard normal rows through the layer's own kv_a_layernorm (RMS 1 times its weight, eps 1e-6), which is
  what the kv_a_layernorm output is whatever the input's scale;
* k_pe: normal with the per-layer standard deviation measured on a short real prefill of the same checkpoint
  (the pre-RoPE k_pe from kv_a_proj_with_mqa), rotated by RoPE at its position, as the cache holds it.

Then ``--tokens`` greedy decode steps run at positions N, N+1, ... through the normal model path
(model.decode_step: projections, the fused absorbed attention, MoE, lm_head), after ``--warmup`` steps that
are rolled back (cache.truncate(N)), with every weight page touched first (bench/run.py's prefault;
``--no-prefault`` skips it). Per length: mean / median / p99 ms per token; the attention kernel's
share of the step (the fused twin of attention.mla_absorbed_out wrapped with a timer: pk_mla_absorbed_o, the
attention and its o_proj in one call, on the C backend, the NumPy definition otherwise; ``cache_absorbed=False``
so every backend takes that path) and the attention block's (attention.mla_decode with its projections), both
measured on a second run of the same steps with the layer stack's one-call fusion off (inside pk_decode_layers
nothing can be timed from Python; the stage by stage path runs the same kernels, one call each, and its median
step is reported beside); cache bytes; peak RSS (VmHWM) and peak anonymous
memory (RssAnon sampled every 5 ms, bench/run.py's MemWatch). Each length runs in its own subprocess, so each
peak is that length's own. The cache must fit: a length whose cache exceeds MemAvailable is a one-line error
before anything is allocated. Lengths that do not fit the model's context (N + warmup + tokens positions) are
lowered to fit, and the row says so (``clamped``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)

import pykimi  # noqa: F401,E402 -- before NumPy, as the `pykimi` command does (OPENBLAS_THREAD_TIMEOUT)
import numpy as np  # noqa: E402

DEFAULT_LENGTHS = "1024,8192,32768,131072"
FILL_ROWS = 8192            # rows generated and written per step of the synthetic fill (~19 MB of f32 at 576)


def _run_helpers():
    """bench/run.py's MemWatch and prefault (loaded by path: 'run' is no package name to import by)."""
    spec = importlib.util.spec_from_file_location("pykimi_bench_run", os.path.join(BENCH, "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MemWatch, mod.prefault


class BenchError(Exception):
    """A bad option or a length that cannot run: printed as one line, exit 2."""


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (what can be allocated without swapping out others)."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BenchError("/proc/meminfo has no MemAvailable line")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def check_fits(n_rows: int, bytes_per_token: int, cache_dtype: str, available: int | None = None) -> int:
    """Bytes of a cache of n_rows positions; BenchError when that exceeds MemAvailable."""
    need = int(n_rows) * int(bytes_per_token)
    avail = mem_available() if available is None else available
    if need > avail:
        raise BenchError(f"{n_rows} positions need {_gib(need)} of {cache_dtype} latent cache ({bytes_per_token} "
                         f"B/token) but MemAvailable is {_gib(avail)}"
                         + ("; try --cache-dtype bf16" if cache_dtype == "f32" else "") + " or a smaller length")
    return need


def plan(lengths: list[int], limit: int, extra: int) -> list[tuple[int, int]]:
    """(requested, used) per length: used = min(requested, limit - extra) so that the decode fits the context."""
    room = limit - extra
    if room < 1:
        raise BenchError(f"--tokens and --warmup need {extra} positions: the model's context is {limit}")
    return [(n, min(n, room)) for n in lengths]


# ---------------------------------------------------------------------------------------------------------
# The synthetic fill
# ---------------------------------------------------------------------------------------------------------
def k_pe_scales(model, n: int = 32) -> np.ndarray:
    """Per-layer standard deviation of the pre-RoPE k_pe on a short real prefill (random ids)   -> f32[L]."""
    from pykimi.ops import apply_rope
    from pykimi.attention import rope_angles

    t = model.text
    n = min(n, model.context_limit)
    ids = np.random.default_rng(0).integers(0, min(t.vocab_size, 1000), n)
    cache = model.new_cache(capacity=n, dtype="f32")
    model.prefill(model.embed(ids), cache, all_logits=False)
    R, pos = t.kv_lora_rank, np.arange(n)
    out = np.empty(t.num_hidden_layers, np.float32)
    for layer in range(t.num_hidden_layers):
        k_rot = cache.rows_f32(layer)[:, R:]                                    # [n, dr] rotated
        k = apply_rope(k_rot, -rope_angles(pos, t))                               # rotated back (orthogonal)
        out[layer] = max(float(np.std(k)), 1e-6)
    return out


def fill_cache(model, cache, n: int, kpe_std: np.ndarray, seed: int = 0) -> float:
    """Write rows of positions 0..n-1 into every layer of ``cache`` (see the module docstring); returns seconds."""
    from pykimi.ops import apply_rope, rms_norm
    from pykimi.attention import rope_angles

    t = model.text
    R, dr = t.kv_lora_rank, t.qk_rope_head_dim
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for layer in range(t.num_hidden_layers):
        ln = model.layer_weights(layer).attn.kv_a_layernorm
        for p0 in range(0, n, FILL_ROWS):
            p1 = min(n, p0 + FILL_ROWS)
            c = rms_norm(rng.standard_normal((p1 - p0, R), dtype=np.float32), ln, t.kv_a_layernorm_eps)  # [m, R]
            k = rng.standard_normal((p1 - p0, dr), dtype=np.float32) * kpe_std[layer]                   # [m, dr]
            cache.write(layer, c, apply_rope(k, rope_angles(np.arange(p0, p1), t)))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# One length (in its own process)
# ---------------------------------------------------------------------------------------------------------
class Timed:
    """Wraps a callable and sums the seconds spent in it (``total``) and the calls (``calls``)."""

    def __init__(self, fn):
        self.fn, self.total, self.calls = fn, 0.0, 0

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.total += time.perf_counter() - t0
            self.calls += 1


def measure(spec: dict) -> dict:
    """Fill a cache of spec["n"] positions and time spec["tokens"] decode steps after it -> one result row."""
    import pykimi
    from pykimi import attention, kernels, model as model_mod
    from pykimi.kernels import fused

    MemWatch, prefault = _run_helpers()
    m = pykimi.load(spec["ckpt"], threads=spec.get("threads"), cache_dtype=spec["cache_dtype"],
                    cache_absorbed=False)
    prefault_s = prefault(m.ckpt) if spec.get("prefault", True) else None   # every expert resident, as run.py
    n, tokens, warmup = int(spec["n"]), int(spec["tokens"]), int(spec["warmup"])
    cap = n + max(tokens, warmup)
    with MemWatch() as mw:
        bpt = m.new_cache(1).bytes_per_token()
        check_fits(cap, bpt, m.cache_dtype)                    # before the allocation
        kpe_std = k_pe_scales(m)
        cache = m.new_cache(capacity=cap)
        fill_s = fill_cache(m, cache, n, kpe_std)
        assert len(cache) == n and all(cache.seq_len(l) == n for l in range(m.text.num_hidden_layers))
        # the timers: the fused attention twin (what mla_decode calls per layer: attention.mla_absorbed_out, the
        # attention with o_proj in one C call -- o_proj's GEMV is counted in, which overstates the share a
        # little and never flatters it) and the whole attention block
        att = getattr(attention, "mla_absorbed_out", attention.mla_absorbed)
        kern = Timed(kernels.fast(att))
        block = Timed(model_mod.mla_decode)
        fused._FAST[att] = kern
        model_mod.mla_decode = block
        try:
            tok = 1
            for _ in range(warmup):                            # JIT, page faults of the weights, scratch
                tok = int(np.argmax(m.decode_step(tok, cache)))
            cache.truncate(n)
            tok0 = tok
            # 1. the speed: decode steps as they run (the layer stack in one C call, pk_decode_layers)
            steps, ids = [], []
            for _ in range(tokens):
                t0 = time.perf_counter()
                tok = int(np.argmax(m.decode_step(tok, cache)))
                steps.append(time.perf_counter() - t0)
                ids.append(tok)
            # 2. the attention's share: the same steps again, the stack fusion off so that each layer's fused
            # attention call can be timed from Python (the stage by stage path: the same kernels, one call each)
            cache.truncate(n)
            tok = tok0
            stack = getattr(model_mod, "decode_layers", None)
            if stack is not None:
                fused._FAST[stack] = stack                     # kernels.fast(decode_layers) -> the definition
            kern.total = block.total = 0.0
            kern.calls = 0
            steps2, kern_s, block_s = [], [], []
            for _ in range(tokens):
                k0, b0 = kern.total, block.total
                t0 = time.perf_counter()
                tok = int(np.argmax(m.decode_step(tok, cache)))
                steps2.append(time.perf_counter() - t0)
                kern_s.append(kern.total - k0)
                block_s.append(block.total - b0)
        finally:
            fused._FAST[att] = kern.fn
            model_mod.mla_decode = block.fn
            if getattr(model_mod, "decode_layers", None) is not None:
                fused._FAST.pop(model_mod.decode_layers, None)  # bound again on the next ask
    steps = np.asarray(steps)
    mem = mw.report()
    return {"cached": n, "tokens": tokens, "ms_per_token_mean": float(1e3 * steps.mean()),
            "ms_per_token_median": float(1e3 * np.median(steps)),
            "ms_per_token_p99": float(1e3 * np.percentile(steps, 99)),
            "attn_kernel_ms_per_token": float(1e3 * np.mean(kern_s)),
            "attn_share": float(np.sum(kern_s) / np.sum(steps2)),
            "attn_block_share": float(np.sum(block_s) / np.sum(steps2)),
            "ms_per_token_stage_path": float(1e3 * np.median(steps2)),
            "attn_calls_per_token": kern.calls / tokens,
            "cache_bytes": int(cache.nbytes()), "cache_bytes_per_token": int(bpt),
            "peak_rss": int(mem["peak_rss"]), "peak_anon": int(mem["peak_anon"]),
            "fill_s": float(fill_s), "prefault_s": prefault_s, "token_ids": ids, "backend": kernels.backend(),
            "loadavg_1min": os.getloadavg()[0]}


def run_length(spec: dict, timeout: float = 7200) -> dict:
    """measure(spec) in a fresh subprocess (its own peak memory); BenchError with its one-line message."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        last = lines[-1] if lines else f"worker exited with {r.returncode}"
        raise BenchError(last.removeprefix("bench_longctx: error: ") + f" (length {spec['n']})")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"{flag} {text!r}: expected comma-separated positive integers") from None
    if not vals or any(v < 1 for v in vals):
        raise BenchError(f"{flag} {text!r}: expected comma-separated positive integers")
    return sorted(set(vals))


def _positive(v, flag: str) -> int:
    if v is None or int(v) < 1:
        raise BenchError(f"{flag} {v}: expected an integer >= 1")
    return int(v)


def run(ckpt: str, lengths: list[int], cache_dtype: str = "f32", threads: int | None = None, tokens: int = 16,
        warmup: int = 2, on_row=None, prefault: bool = True) -> dict:
    """Every length, each in its own process -> {"checkpoint", "cache_dtype", ..., "results": [row, ...]}."""
    import pykimi
    from pykimi.cache import CACHE_DTYPES

    if cache_dtype not in CACHE_DTYPES:
        raise BenchError(f"--cache-dtype {cache_dtype}: expected one of {', '.join(CACHE_DTYPES)}")
    if threads is not None:
        _positive(threads, "--threads")
    tokens, warmup = _positive(tokens, "--tokens"), int(warmup)
    m = pykimi.load(ckpt, cache_dtype=cache_dtype)                 # mmap + config: sizes and limits only
    bpt = m.new_cache(1).bytes_per_token()
    rows = plan(lengths, m.context_limit, max(tokens, warmup))
    for _, n in rows:                                              # every length checked before any runs
        check_fits(n + max(tokens, warmup), bpt, cache_dtype)
    out = {"checkpoint": os.path.abspath(ckpt), "layers": m.text.num_hidden_layers, "cache_dtype": cache_dtype,
           "threads": threads, "tokens": tokens, "warmup": warmup, "context_limit": m.context_limit,
           "cache_bytes_per_token": bpt, "results": []}
    del m
    for requested, n in rows:
        spec = {"ckpt": ckpt, "n": n, "cache_dtype": cache_dtype, "threads": threads, "tokens": tokens,
                "warmup": warmup, "prefault": prefault}
        row = dict(run_length(spec), requested=requested, clamped=n != requested)
        out["results"].append(row)
        if on_row:
            on_row(row)
    return out


def fmt_row(r: dict) -> str:
    return (f"| {r['cached']:>7} | {r['ms_per_token_mean']:8.2f} | {r['ms_per_token_median']:8.2f} | "
            f"{r['ms_per_token_p99']:8.2f} | {100 * r['attn_share']:5.1f} % | {100 * r['attn_block_share']:5.1f} % | "
            f"{_gib(r['cache_bytes']):>10} | {_gib(r['peak_rss']):>10} | {_gib(r['peak_anon']):>10} |"
            + (f" (asked {r['requested']}: context limit)" if r["clamped"] else ""))


HEADER = ("| cached  |  mean ms |   median |      p99 | attn kernel | attn block |      cache |   peak RSS |  peak anon |\n"
          "| ------: | -------: | -------: | -------: | ------: | ------: | ---------: | ---------: | ---------: |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="checkpoint directory (default: the bundled demo checkpoint)")
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"cached positions, comma-separated "
                                                               f"(default {DEFAULT_LENGTHS})")
    ap.add_argument("--cache-dtype", default="f32", help="f32 (default) or bf16")
    ap.add_argument("--threads", type=int, help="kernel threads (default: PYKIMI_THREADS or all cores)")
    ap.add_argument("--tokens", type=int, default=16, help="timed decode steps per length (default 16)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode steps before, rolled back (default 2)")
    ap.add_argument("--no-prefault", action="store_true", help="do not touch every weight page first (bench/run.py's "
                    "prefault: the timed steps then may read experts from disk)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        if args.worker:
            print(json.dumps(measure(json.loads(args.worker))))
            return 0
        import pykimi
        ckpt = args.ckpt or pykimi.demo_checkpoint()
        lengths = _int_list(args.lengths, "--lengths")
        if args.warmup < 0:
            raise BenchError(f"--warmup {args.warmup}: expected an integer >= 0")
        from pykimi.cache import CACHE_DTYPES
        if args.cache_dtype not in CACHE_DTYPES:
            raise BenchError(f"--cache-dtype {args.cache_dtype}: expected one of {', '.join(CACHE_DTYPES)}")
        _positive(args.tokens, "--tokens")
        if args.threads is not None:
            _positive(args.threads, "--threads")
        print(f"bench_longctx: {ckpt}, {args.cache_dtype} cache, {args.tokens} tokens per length", file=sys.stderr)
        print(HEADER)
        res = run(ckpt, lengths, args.cache_dtype, args.threads, args.tokens, args.warmup,
                  on_row=lambda r: print(fmt_row(r), flush=True), prefault=not args.no_prefault)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(res, fh, indent=1)
        return 0
    except BenchError as e:
        print(f"bench_longctx: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:            # a pykimi error (bad checkpoint, ...): its own one line
        from pykimi.errors import PykimiError
        if isinstance(e, PykimiError):
            print(f"bench_longctx: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
