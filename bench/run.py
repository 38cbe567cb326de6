"""pykimi's end-to-end benchmark: every measurement of issue 8 in one run, on the same weights.

    python bench/run.py --quick                 # a few minutes: 4-layer real-width synthetic checkpoint
    python bench/run.py                         # the full measured run (4 layers, every size, every peer)
    python bench/run.py --layers 27             # the full 32.8 GB checkpoint (checks free disk first)
    python bench/run.py --ckpt DIR              # reuse an existing checkpoint directory

What it measures (each measurement in its own subprocess, so that peak memory is that measurement's own):

* decode tok/s: bf16 in place (the checkpoint as written), int8 and int4 (copies repacked by
  ``pykimi.quant.quantize_checkpoint``), greedy, after a warm-up, with the weights pre-faulted;
* prefill tok/s for 128 and 512 prompt tokens (bf16 in place), image encode time for 448x448 and 896x896;
* peak RSS (VmHWM) and peak anonymous memory (RssAnon, sampled by a thread every few ms) of each of those;
* the machine's memory bandwidth (NumPy sum over a 2 GB array, best of N; one thread and two) and, per
  decode mode, the bound = bytes of active weights read per decoded token / bandwidth, and the fraction of it
  reached;
* the trace-off overhead: hook calls per decoded token x the cost of one inactive ``trace.emit``, and an A/B
  timing with every hook replaced by the identity;
* peers, when installed: PyTorch eager (transformers' DeepseekV3ForCausalLM on the same LM weights, fp32 and
  bf16; the MoonViT torch twin of bench/bench_vision.py in fp32) and llama.cpp (llama-cpp-python on GGUFs
  written from the same weights: bf16, Q8_0, Q4_0), with ratios pykimi / peer.

Results: a table on stdout and ``bench/out/results.json`` (bench/out/ also caches the checkpoints).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
OUT = os.path.join(BENCH, "out")
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

import pykimi  # noqa: F401,E402 -- before NumPy, as the `pykimi` command does (OPENBLAS_THREAD_TIMEOUT)
import numpy as np  # noqa: E402

LM = "language_model.model"
GIB = 1 << 30


# =========================================================================================================
# Memory: /proc/self/status, sampled by a thread (RssAnon has no kernel high-water mark of its own)
# =========================================================================================================
def proc_status() -> dict:
    """VmHWM, VmRSS, RssAnon, RssFile in bytes, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024                   # the file says kB
    return out


class MemWatch:
    """Samples RssAnon every ``period`` seconds in a daemon thread; ``peak_anon`` is the largest seen."""

    def __init__(self, period: float = 0.005):
        self.period = period
        self.peak_anon = proc_status().get("RssAnon", 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, proc_status().get("RssAnon", 0))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, proc_status().get("RssAnon", 0))
        return False

    def report(self) -> dict:
        s = proc_status()
        return {"peak_rss": s.get("VmHWM", 0), "peak_anon": self.peak_anon, "rss_file_end": s.get("RssFile", 0)}


# =========================================================================================================
# Checkpoints: the synthetic one and its int8 / int4 copies, cached under bench/out/
# =========================================================================================================
def ensure_checkpoint(layers: int) -> str:
    path = os.path.join(OUT, f"synth-L{layers}")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"[ckpt] writing the {layers}-layer real-width synthetic checkpoint to {path}", flush=True)
        # make_synthetic.py checks free disk itself and refuses (exit 2) when it does not fit
        subprocess.run([sys.executable, os.path.join(BENCH, "make_synthetic.py"), path, "--layers", str(layers),
                        "--force"], check=True)
    return path


def ensure_quantized(src: str, bits: int, what: str) -> str:
    dst = f"{src.rstrip('/')}-q{bits}-{what}"
    if not os.path.exists(os.path.join(dst, "config.json")):
        need = dir_bytes(src) * (0.6 if bits == 8 else 0.35)        # codes + block scales, the rest as stored
        check_disk(need, dst)
        print(f"[ckpt] repacking {src} -> {dst} (int{bits}, {what})", flush=True)
        code = ("import sys; sys.path.insert(0, %r); from pykimi.quant import quantize_checkpoint; "
                "print(quantize_checkpoint(%r, %r, bits=%d, what=%r, overwrite=True))" % (ROOT, src, dst, bits, what))
        subprocess.run([sys.executable, "-c", code], check=True)
    return dst


def check_disk(need: float, path: str) -> None:
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if need + GIB > free:
        raise SystemExit(f"error: {path} needs about {need / 1e9:.1f} GB + 1 GB headroom; "
                         f"only {free / 1e9:.1f} GB free")


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


# =========================================================================================================
# Bytes of active weights read per decoded token (the decode bound)
# =========================================================================================================
def stored_bytes(ck, name: str) -> int:
    """Bytes ``name`` occupies in the checkpoint in its stored form (a quantized weight: codes + scales)."""
    if name in ck:
        return ck.info(name).nbytes
    if name + ".qweight" in ck:
        return ck.info(name + ".qweight").nbytes + ck.info(name + ".scales").nbytes
    return 0


def active_bytes_per_token(ckpt_dir: str) -> dict:
    """Weights one decoded token must read, counted from the config with each tensor's stored size.

    embedding row + per layer (norms, q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj; dense
    SwiGLU or router + top-k routed experts + shared experts) + final norm + lm_head. The KV cache (a few
    hundred kB at these lengths) is left out.
    """
    from pykimi.weights import Checkpoint

    ck = Checkpoint.open(ckpt_dir)
    t = ck.config.text
    parts = {"embedding_row": stored_bytes(ck, f"{LM}.embed_tokens.weight") // t.vocab_size,
             "attention": 0, "dense_mlp": 0, "router": 0, "routed_experts": 0, "shared_experts": 0,
             "norms": stored_bytes(ck, f"{LM}.norm.weight"),
             "lm_head": stored_bytes(ck, "language_model.lm_head.weight")}
    for i in range(t.num_hidden_layers):
        p = f"{LM}.layers.{i}"
        parts["norms"] += sum(stored_bytes(ck, f"{p}.{n}.weight") for n in
                              ("input_layernorm", "post_attention_layernorm", "self_attn.kv_a_layernorm"))
        q = ["q_proj"] if not t.q_lora_rank else ["q_a_proj", "q_a_layernorm", "q_b_proj"]
        parts["attention"] += sum(stored_bytes(ck, f"{p}.self_attn.{n}.weight")
                                  for n in q + ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"])
        swiglu = ("gate_proj", "up_proj", "down_proj")
        if t.is_moe_layer(i):
            parts["router"] += (stored_bytes(ck, f"{p}.mlp.gate.weight")
                                + stored_bytes(ck, f"{p}.mlp.gate.e_score_correction_bias"))
            one_expert = sum(stored_bytes(ck, f"{p}.mlp.experts.0.{n}.weight") for n in swiglu)
            parts["routed_experts"] += t.num_experts_per_tok * one_expert
            parts["shared_experts"] += sum(stored_bytes(ck, f"{p}.mlp.shared_experts.{n}.weight") for n in swiglu)
        else:
            parts["dense_mlp"] += sum(stored_bytes(ck, f"{p}.mlp.{n}.weight") for n in swiglu)
    parts["total"] = sum(parts.values())
    return parts


# =========================================================================================================
# Workers (each runs in a fresh subprocess: `run.py --worker JSON` prints one `RESULT {...}` line)
# =========================================================================================================
def _synthetic_prompt(n: int, vocab: int, seed: int = 1) -> np.ndarray:
    # ordinary text-token ids, away from the special ids at the top of the real vocabulary
    lo = min(1000, vocab // 2)                                  # (tiny test vocabularies: the upper half)
    return np.random.default_rng(seed).integers(lo, min(vocab, 150000), size=n).astype(np.int64)


def prefault(ckpt, prefix: str = "language_model.") -> float:
    """Touch one byte per page of every tensor under ``prefix`` so that decode runs from resident pages
    (steady state after a long generation; llama.cpp prefetches its mmap the same way). Returns seconds."""
    t0 = time.perf_counter()
    for name in ckpt.names():
        if name.startswith(prefix):
            a = np.asarray(ckpt.get(name))
            b = a.reshape(-1).view(np.uint8) if a.flags.c_contiguous else a.view(np.uint8).reshape(-1)
            int(b[::4096].sum())
    return time.perf_counter() - t0


def _hook_modules():
    """Every loaded pykimi module together with the names under which it holds the trace hooks."""
    from pykimi import trace

    hooks = {"emit": trace.emit, "emit_record": trace.emit_record, "active": trace.active}
    for modname, mod in list(sys.modules.items()):
        if not modname.startswith("pykimi") or mod is None or modname == "pykimi.trace":
            continue
        for attr, val in list(vars(mod).items()):
            for kind, fn in hooks.items():
                if val is fn:
                    yield mod, attr, kind


class HookPatch:
    """Replace the trace hooks everywhere they were imported (``from .trace import emit`` binds a name in the
    importing module, so patching pykimi.trace alone would not reach the model code).

    mode "count": count calls (and pass through); mode "identity": ``emit`` returns its value untouched and
    ``active`` is a constant False -- the code path with no hooks at all.
    """

    def __init__(self, mode: str):
        from pykimi import trace

        self.mode = mode
        self.counts = {"emit": 0, "emit_record": 0, "active": 0}
        self._saved = []
        orig = {"emit": trace.emit, "emit_record": trace.emit_record, "active": trace.active}
        counts = self.counts

        def counting(kind):
            fn = orig[kind]

            def wrapper(*a):
                counts[kind] += 1
                return fn(*a)
            return wrapper

        if mode == "count":
            self.repl = {k: counting(k) for k in orig}
        else:
            self.repl = {"emit": lambda name, value: value, "emit_record": lambda name, rec: None,
                         "active": lambda: False}

    def __enter__(self):
        for mod, attr, kind in list(_hook_modules()):
            self._saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, self.repl[kind])
        return self

    def __exit__(self, *exc):
        for mod, attr, val in self._saved:
            setattr(mod, attr, val)
        return False


def steal_ticks() -> int:
    """The guest's steal time so far (/proc/stat's cpu line, clock ticks: time the host ran something else while
    this VM's vCPUs wanted to run); 0 where there is none to read."""
    try:
        with open("/proc/stat") as fh:
            f = fh.readline().split()
        return int(f[8]) if f[0] == "cpu" and len(f) > 8 else 0
    except OSError:
        return 0


def clock_ticks() -> int:
    """Clock ticks a second (/proc/stat's unit; 100 where the OS does not say)."""
    return os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _timed_generate(model, prompt, n_new: int, steal: list | None = None):
    """Greedy decode of n_new tokens -> (seconds of each decode step, token ids, model.last_stats); with ``steal``
    a list, it gets each step's steal ticks (steal_ticks), so a slow step can be told to be the host's."""
    ids, stamps, ticks = [], [], []
    for tok in model.generate(prompt, max_new_tokens=n_new, stream=True, stop_ids=[]):
        stamps.append(time.perf_counter())
        ticks.append(steal_ticks() if steal is not None else 0)
        ids.append(int(tok))
    steps = np.diff(stamps)                                   # the first yield comes after the prefill
    if steal is not None:
        steal[:] = np.diff(ticks).tolist()
    return steps, ids, dict(model.last_stats)


def worker_decode(spec: dict) -> dict:
    import pykimi

    model = pykimi.load(spec["ckpt"], threads=spec["threads"], mlock=spec.get("mlock", False))
    from pykimi import kernels
    out = {"backend": kernels.backend(), "mlock": model.memory_lock is not None,
           "prefault_s": prefault(model.ckpt) if spec.get("prefault", True) else None}
    prompt = _synthetic_prompt(spec["prompt"], model.text.vocab_size)
    _timed_generate(model, prompt, spec["warmup"])                             # warm-up (JIT, caches)
    steal: list = []
    steps, ids, stats = _timed_generate(model, prompt, spec["tokens"] + 1, steal)
    slow = steps > 1.3 * np.median(steps)                                     # issue 25: p99 <= 1.3x the median
    out.update(slow_steps=int(slow.sum()), slow_steps_with_steal=int(sum(1 for s, t in zip(slow, steal) if s and t)),
               steal_ms=float(sum(steal) * 1e3 / clock_ticks()))
    out.update(tok_s=float(len(steps) / steps.sum()), ms_per_token=float(1e3 * steps.mean()),
               ms_per_token_median=float(1e3 * np.median(steps)),
               ms_per_token_p99=float(1e3 * np.percentile(steps, 99)), steps=len(steps), token_ids=ids,
               kv_cache_bytes=int(stats.get("cache_bytes", 0)))
    return out


def worker_prefill(spec: dict) -> dict:
    import pykimi

    model = pykimi.load(spec["ckpt"], threads=spec["threads"])
    if spec.get("prefault", True):
        prefault(model.ckpt)
    out = {}
    for n in spec["lengths"]:
        prompt = _synthetic_prompt(n, model.text.vocab_size, seed=2)
        best = None
        for _ in range(spec["repeat"]):
            model.generate(prompt, max_new_tokens=1, stop_ids=[])
            s = model.last_stats["prefill_s"]
            best = s if best is None else min(best, s)
        out[str(n)] = {"seconds": best, "tok_s": n / best}
    return out


def synthetic_image(size: int, patch: int = 14, seed: int = 0):
    g = size // patch
    pv = np.random.default_rng(seed).uniform(-1, 1, (g * g, 3, patch, patch)).astype(np.float32)
    return pv, np.array([[g, g]], dtype=np.int64)


def worker_vision(spec: dict) -> dict:
    import pykimi

    # cache_weights: keep the tower's weights widened to f32 (~1.6 GB anonymous for the real tower), as
    # torch fp32 holds them; the default widens bf16 tiles per call (anonymous memory at the working set)
    model = pykimi.load(spec["ckpt"], threads=spec["threads"], vision_cache_weights=spec.get("cache_weights", False))
    prefault(model.ckpt, "vision_tower.")
    prefault(model.ckpt, "multi_modal_projector.")
    model.encode_images(*synthetic_image(28 * 2))                 # warm-up: a 4x4-patch image reads every weight
    out = {}
    for size in spec["sizes"]:
        pv, grid = synthetic_image(size)
        times = []
        for _ in range(spec["repeat"]):
            t0 = time.perf_counter()
            feats = model.encode_images(pv, grid)
            times.append(time.perf_counter() - t0)
        out[str(size)] = {"seconds": min(times), "patches": int(pv.shape[0]), "tokens": int(feats.shape[0])}
    return out


def worker_trace(spec: dict) -> dict:
    """Trace-off overhead: hook calls per decoded token x cost of one inactive call, and A/B timings."""
    import pykimi
    from pykimi import trace

    model = pykimi.load(spec["ckpt"], threads=spec["threads"])
    prefault(model.ckpt)
    prompt = _synthetic_prompt(spec["prompt"], model.text.vocab_size)
    _timed_generate(model, prompt, spec["warmup"])
    n = spec["tokens"]
    with HookPatch("count") as hp:
        steps, _, _ = _timed_generate(model, prompt, n + 1)
    # the prefill (prompt) also went through the hooks: count a prefill alone and subtract it
    with HookPatch("count") as hp0:
        _timed_generate(model, prompt, 1)
    per_tok = {k: (hp.counts[k] - hp0.counts[k]) / n for k in hp.counts}

    x = np.zeros(4, dtype=np.float32)
    reps = 1_000_000
    t0 = time.perf_counter()
    for _ in range(reps):
        trace.emit("language_model.model.layers.0.mlp", x)
    emit_ns = (time.perf_counter() - t0) / reps * 1e9
    t0 = time.perf_counter()
    for _ in range(reps):
        trace.active()
    active_ns = (time.perf_counter() - t0) / reps * 1e9

    # A/B: alternate rounds with the hooks as shipped and with every hook replaced by the identity
    on, off = [], []
    for _ in range(spec["rounds"]):
        s, _, _ = _timed_generate(model, prompt, n + 1)
        on.append(float(s.mean()))
        with HookPatch("identity"):
            s, _, _ = _timed_generate(model, prompt, n + 1)
        off.append(float(s.mean()))
    t_tok = float(np.median(on))
    est = (per_tok["emit"] + per_tok["emit_record"]) * emit_ns * 1e-9 + per_tok["active"] * active_ns * 1e-9
    return {"calls_per_token": per_tok, "emit_ns": emit_ns, "active_ns": active_ns,
            "ms_per_token": 1e3 * t_tok, "estimated_overhead": est / t_tok,
            "ab_ms_hooks": [1e3 * v for v in on], "ab_ms_identity": [1e3 * v for v in off],
            "ab_overhead": float(np.median(on) / np.median(off) - 1.0)}


def worker_bandwidth(spec: dict) -> dict:
    """Read bandwidth as decode reads (bench/bandwidth.py: a C OpenMP streaming read over 2 GiB, best and median
    of N, at 1 and 2 threads); the NumPy sum of earlier runs rides along as `numpy_gbs`."""
    import bandwidth

    r = bandwidth.measure(gib=spec.get("bytes", 2 << 30) / 2**30, repeat=spec["repeat"],
                          threads=tuple(sorted({1, int(spec.get("threads") or 2)})))
    for t, v in r["c"].items():
        r[f"gbs_{t}t"] = v["best_gbs"]
    return r


def worker_torch(spec: dict) -> dict:
    from peers import torch_peer

    return torch_peer.run(spec)


def worker_llamacpp(spec: dict) -> dict:
    from peers import llamacpp_peer

    return llamacpp_peer.run(spec)


WORKERS = {"decode": worker_decode, "prefill": worker_prefill, "vision": worker_vision, "trace": worker_trace,
           "bandwidth": worker_bandwidth, "torch": worker_torch, "llamacpp": worker_llamacpp}


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    with MemWatch() as mw:
        t0 = time.perf_counter()
        try:
            res = WORKERS[spec["kind"]](spec)
        except Exception as e:  # reported, not fatal for the run
            import traceback
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        res["wall_s"] = time.perf_counter() - t0
    res["memory"] = mw.report()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def run_worker(spec: dict, timeout: float = 3600) -> dict:
    """Run one measurement in a fresh interpreter; returns its result dict (with "error" on failure)."""
    env = dict(os.environ)
    env.setdefault("PYKIMI_THREADS", str(spec.get("threads", 2)))
    env.setdefault("OPENBLAS_NUM_THREADS", str(spec.get("threads", 2)))
    label = spec.get("label", spec["kind"])
    print(f"[run] {label} ...", flush=True)
    t0 = time.time()
    load_before = os.getloadavg()[0]
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                           capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    res = None
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
    if res is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        res = {"error": f"worker exited {p.returncode}: " + " | ".join(tail)}
    res["loadavg_1min"] = [load_before, os.getloadavg()[0]]          # the machine is shared: keep the load
    if "error" in res:
        print(f"[run] {label}: ERROR {res['error']}", flush=True)
        if p.stderr:
            with open(os.path.join(OUT, f"worker-{label}.stderr.txt"), "w") as fh:
                fh.write(p.stderr)
    else:
        print(f"[run] {label}: done in {time.time() - t0:.0f} s", flush=True)
    return res


# =========================================================================================================
# Machine description
# =========================================================================================================
def _cmd(args) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return ""


def machine() -> dict:
    lscpu = _cmd(["lscpu"])
    field = {}
    for line in lscpu.splitlines():
        k, _, v = line.partition(":")
        field[k.strip()] = v.strip()
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    flags = field.get("Flags", "").split()
    blas = ""
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        blas = f"{b.get('name')} {b.get('version')}"
    except Exception:
        pass
    info = {"cpu": field.get("Model name", platform.processor()), "cpus": os.cpu_count(),
            "threads_per_core": field.get("Thread(s) per core"), "l2": field.get("L2 cache"),
            "l3": field.get("L3 cache"), "hypervisor": field.get("Hypervisor vendor", ""),
            "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags],
            "mem_total_gib": mem / GIB, "python": platform.python_version(), "numpy": np.__version__,
            "blas": blas, "cc": _cmd(["cc", "--version"]).splitlines()[0] if _cmd(["cc", "--version"]) else "",
            "kernel": platform.release()}
    try:
        from pykimi import kernels
        bk = kernels.backends()
        info["pykimi_backend"] = bk.get("active")
        info["pykimi_backends"] = {k: v for k, v in bk.items() if k != "active"}
        from pykimi.kernels import linear
        info["pykimi_act_quant"] = linear.act_quant()            # PYKIMI_ACT_QUANT, which the workers inherit
        info["pykimi_simd"] = os.environ.get("PYKIMI_SIMD", "best")
    except Exception as e:
        info["pykimi_backend"] = f"unavailable ({e})"
    from importlib import metadata
    for dist in ("torch", "transformers", "gguf", "llama-cpp-python", "numba", "cffi"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def load_now() -> dict:
    la = os.getloadavg()
    top = _cmd(["top", "-bn1", "-w", "200"]).splitlines()
    busy = []
    for line in top[7:]:
        cols = line.split()
        if len(cols) >= 12:
            try:
                if float(cols[8]) >= 20.0:
                    busy.append(f"{cols[11]} {cols[8]}%")
            except ValueError:
                pass
    return {"time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "loadavg": la, "busy": busy[:8]}


# =========================================================================================================
# The run
# =========================================================================================================
def fmt_bytes(n) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / (1 << 20):.0f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="pykimi end-to-end benchmark (issue 8)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the synthetic checkpoint (4; 27 = full)")
    ap.add_argument("--ckpt", help="use this bf16 checkpoint directory instead of a synthetic one")
    ap.add_argument("--quick", action="store_true", help="a few-minute run: fewer tokens, 448 px only, no 512 prefill")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--what", default="all", choices=["all", "experts"],
                    help="which weights the int8/int4 copies quantize (all = every LM linear but the embedding)")
    ap.add_argument("--modes", default="bf16,int8,int4", help="decode/prefill modes (int8/int4 are repacked copies)")
    ap.add_argument("--tokens", type=int, default=0, help="decoded tokens timed (default 48, --quick 16)")
    ap.add_argument("--warmup", type=int, default=None, help="decoded warm-up tokens (default 8, --quick 4)")
    ap.add_argument("--no-peers", action="store_true", help="skip PyTorch and llama.cpp")
    ap.add_argument("--only", default="",
                    help="comma list of sections: bandwidth,decode,prefill,vision,trace,torch,torchvision,llamacpp")
    ap.add_argument("--llamacpp-path", default="",
                    help="import llama_cpp from this directory (a build made with pip install --target DIR)")
    ap.add_argument("--llamacpp-extra-bufts", action="store_true",
                    help="let llama.cpp use its extra buffer types (AMX, REPACK); off by default (AMX crashes here)")
    ap.add_argument("--out", default=os.path.join(OUT, "results.json"))
    ap.add_argument("--update", action="store_true",
                    help="keep the other sections of an existing --out file and re-run only the --only ones")
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    os.makedirs(OUT, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    want = lambda s: not only or s in only                                      # noqa: E731
    peers = not args.no_peers
    q = args.quick
    T = args.threads
    res: dict = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "quick": q, "threads": T,
                 "machine": machine(), "load_start": load_now()}
    if args.update and os.path.exists(args.out):
        with open(args.out) as fh:
            old = json.load(fh)
        for k in ("summary", "table", "targets"):
            old.pop(k, None)
        update = {"command": res["command"], "sections": sorted(only), "load_start": res["load_start"]}
        res = dict(old, machine=res["machine"], updates=old.get("updates", []) + [update],
                   load_start=old.get("load_start", res["load_start"]))
    print(f"[run] load at start: {res['load_start']['loadavg']} {res['load_start']['busy']}", flush=True)

    src = args.ckpt or ensure_checkpoint(args.layers)
    res["checkpoint"] = {"path": src, "bytes": dir_bytes(src)}
    from pykimi.config import load_config
    cfg = load_config(src)
    res["checkpoint"].update(layers=cfg.text.num_hidden_layers, vision_blocks=cfg.vision.num_hidden_layers)
    modes = {"bf16": src}
    wanted_modes = args.modes.split(",")
    if want("decode") or want("trace") or want("llamacpp") or want("prefill"):
        for bits in (8, 4):
            if f"int{bits}" in wanted_modes:
                modes[f"int{bits}"] = ensure_quantized(src, bits, args.what)
    if "bf16" not in wanted_modes:
        modes.pop("bf16")
    # pre-fault the weights only when they fit in memory with room to spare (not the 32.8 GB checkpoint)
    prefault_ok = res["checkpoint"]["bytes"] < 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    res["checkpoint"]["prefaulted"] = prefault_ok
    res["modes"] = dict(res.get("modes", {}))              # --update keeps the modes of the sections it keeps
    res["modes"].update({m: {"path": p, "bytes": dir_bytes(p), "active_bytes": active_bytes_per_token(p)}
                         for m, p in modes.items()})

    if want("bandwidth"):
        res["bandwidth"] = run_worker({"kind": "bandwidth", "repeat": 3 if q else 8, "threads": T})
        res["bandwidth"]["gbs_first"] = res["bandwidth"].get("gbs")

    n_tok, warm = (16, 4) if q else (48, 8)
    # (after the decode section, "gbs" -- the bandwidth the bounds use -- is the best of all samples)
    n_tok, warm = args.tokens or n_tok, args.warmup if args.warmup is not None else warm
    if want("decode"):
        res.setdefault("decode", {})
        for m, p in modes.items():
            res["decode"][m] = run_worker({"kind": "decode", "label": f"decode-{m}", "ckpt": p, "threads": T,
                                           "prompt": 16, "tokens": n_tok, "warmup": warm, "prefault": prefault_ok})
            if want("bandwidth"):
                # the host's bandwidth moves by tens of % within minutes: sample it after every decode mode
                # and take the bound from the BEST sample of the run (conservative for the fraction)
                b = run_worker({"kind": "bandwidth", "label": f"bandwidth-after-{m}", "repeat": 3, "threads": T})
                bw0 = res["bandwidth"]
                if "gbs" in b:
                    bw0.setdefault("samples_gbs", [g for g in [bw0.get("gbs_first")] if g])
                    bw0["samples_gbs"].append(b["gbs"])
    if res.get("bandwidth", {}).get("samples_gbs"):
        res["bandwidth"]["gbs"] = max(res["bandwidth"]["samples_gbs"])
    if want("prefill"):
        res.setdefault("prefill", {})
        for m, p in modes.items():
            if q and m != "bf16":
                continue
            lengths = [128] if q else [64, 128, 512]                    # issue 25: 64 / 128 / 512 in every mode
            res["prefill"][m] = run_worker({"kind": "prefill", "label": f"prefill-{m}", "ckpt": p, "threads": T,
                                            "lengths": lengths, "repeat": 1 if q else 2, "prefault": prefault_ok})
    sizes = [448] if q else [448, 896]
    if want("vision"):
        res["vision"] = run_worker({"kind": "vision", "ckpt": src, "threads": T, "sizes": sizes, "repeat": 1})
        if not q:
            res["vision_cached"] = run_worker({"kind": "vision", "label": "vision-cached", "ckpt": src, "threads": T,
                                               "sizes": sizes, "repeat": 1, "cache_weights": True})
    if want("trace"):
        tmode = next(m for m in ("int4", "int8", "bf16") if m in modes)         # the fastest decode: worst case
        res["trace"] = run_worker({"kind": "trace", "ckpt": modes[tmode], "threads": T, "prompt": 16,
                                   "tokens": 8 if q else 24, "warmup": 4, "rounds": 2 if q else 4})
        res["trace"]["mode"] = tmode

    if peers and want("torch"):
        res.setdefault("torch", {})
        for dt in ("float32", "bfloat16"):
            res["torch"][dt] = run_worker({"kind": "torch", "label": f"torch-{dt}", "what": "lm", "ckpt": src,
                                           "dtype": dt, "threads": T, "prompt": 16, "tokens": 8 if q else 24,
                                           "warmup": 2, "prefill": [128] if q else [64, 128, 512]})
    if peers and want("torchvision"):
        res.setdefault("torch", {})["vision"] = run_worker({"kind": "torch", "label": "torch-vision",
                                                            "what": "vision", "ckpt": src, "threads": T,
                                                            "sizes": sizes})
    if peers and want("llamacpp"):
        lib_path = os.path.abspath(args.llamacpp_path) if args.llamacpp_path else ""
        if lib_path:
            sys.path.insert(0, lib_path)
        from peers import llamacpp_peer
        res["llamacpp"] = {k: v for k, v in res.get("llamacpp", {}).items() if k != "skipped"}
        why = llamacpp_peer.unavailable()
        if why:
            print(f"[run] llama.cpp peer skipped: {why}", flush=True)
            res["llamacpp"]["skipped"] = why
        else:
            from peers import gguf_export
            for qt in ("bf16", "q8_0", "q4_0"):
                path = os.path.join(OUT, f"{os.path.basename(src.rstrip('/'))}-{qt}.gguf")
                if not os.path.exists(path):
                    check_disk(dir_bytes(src) * {"bf16": 0.9, "q8_0": 0.5, "q4_0": 0.3}[qt], path)
                    print(f"[run] writing {path}", flush=True)
                    gguf_export.export(src, path, qt)
                res["llamacpp"][qt] = run_worker({"kind": "llamacpp", "label": f"llamacpp-{qt}", "gguf": path,
                                                  "threads": T, "prompt": 16, "tokens": n_tok, "warmup": warm,
                                                  "prefill": [128] if q else [64, 128, 512],
                                                  "path": lib_path,
                                                  "extra_bufts": args.llamacpp_extra_bufts})
                res["llamacpp"][qt]["active_bytes"] = gguf_export.active_bytes_per_token(path)

    res["load_end"] = load_now()
    summarize(res)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as fh:
        fh.write(markdown(res))
    print(f"[run] wrote {args.out} and {md}")
    return 0


def targets(res: dict) -> list:
    """(target of issue 8, measured value, met?) for every target this run could measure."""
    s = res.get("summary", {})
    out = []
    # the goals of issue 25 ("Speed, round 2"), per CPU class
    for m, peer in (("bf16", "bf16"), ("int8", "Q8_0"), ("int4", "Q4_0")):
        r = _get(s, f"decode_{m}", "ratio_llamacpp")
        if r is not None:
            out.append((f"decode {m} >= 1.0x llama.cpp {peer}", f"{r:.2f}x", r >= 1.0))
    r = _get(s, "decode_bf16", "ratio_torch_bf16")
    if r is not None:
        out.append(("decode bf16 >= 2.0x torch eager bf16", f"{r:.2f}x", r >= 2.0))
    f = _get(s, "decode_bf16", "fraction_of_bound")
    if f is not None:
        out.append(("decode bf16 >= 85% of its bandwidth bound", f"{100 * f:.1f}%", f >= 0.85))
    for m in ("int8", "int4"):
        f = _get(s, f"decode_{m}", "fraction_of_bound")
        if f is not None:   # issue 25 sets 85 % at 27 layers (bench/full_size_quant.py); 4 layers shown for reference
            out.append((f"decode {m} fraction of its bandwidth bound (4 layers; the 85 % goal is at 27)",
                        f"{100 * f:.1f}%", None))
    for m in ("bf16", "int8", "int4"):
        for n in ("64", "128", "512"):
            r = s.get(f"prefill_{m}_{n}_ratio_llamacpp")
            if r is not None:
                out.append((f"prefill {n} {m} >= 1.0x llama.cpp same bits", f"{r:.2f}x", r >= 1.0))
            r = s.get(f"prefill_{m}_{n}_ratio_torch_bf16")
            if r is not None:
                out.append((f"prefill {n} {m} >= 1.0x torch bf16", f"{r:.2f}x", r >= 1.0))
    for size in ("448", "896"):
        r = s.get(f"vision_{size}_ratio_torch")
        if r is not None:
            out.append((f"image encode {size} >= 1.0x torch fp32", f"{r:.2f}x", r >= 1.0))
        r = s.get(f"vision_cached_{size}_ratio_torch")
        if r is not None:
            out.append((f"image encode {size} >= 1.0x torch fp32 (f32 weights kept, like torch)", f"{r:.2f}x",
                        r >= 1.0))
    worst = None
    for key in ("decode", "prefill"):
        for m, d in (res.get(key) or {}).items():
            if isinstance(d, dict) and "memory" in d and "error" not in d:
                extra = d["memory"]["peak_anon"] - d.get("kv_cache_bytes", 0)
                worst = extra if worst is None else max(worst, extra)
    v = res.get("vision") or {}
    if "memory" in v and "error" not in v:
        worst = v["memory"]["peak_anon"] if worst is None else max(worst, v["memory"]["peak_anon"])
    if worst is not None:
        out.append(("peak anonymous memory <= 2 GiB + KV cache (pykimi workers)", fmt_bytes(worst), worst <= 2 * GIB))
    o = s.get("trace_overhead")
    if o is not None:
        out.append(("trace-off overhead < 2%", f"{100 * o:.3f}%", o < 0.02))
    return out


def markdown(res: dict) -> str:
    """The table of a run as Markdown (pasted into bench/RESULTS.md)."""
    m = res["machine"]
    lines = [f"Run of {res['load_start']['time_utc']} UTC: `{res['command']}`; {res['checkpoint']['layers']}-layer "
             f"checkpoint ({res['checkpoint']['bytes'] / 1e9:.2f} GB bf16), {res['threads']} threads; "
             f"{m['cpu']}, {m['cpus']} CPUs, {m['mem_total_gib']:.1f} GiB; pykimi backend {m.get('pykimi_backend')} "
             f"(SIMD {m.get('pykimi_simd', 'best')}, activations {m.get('pykimi_act_quant', 'q4')}); load average {res['load_start']['loadavg'][0]:.1f} at start, {res['load_end']['loadavg'][0]:.1f} at end.",
             ""]
    for u in res.get("updates", []):
        lines[-1:] = [f"Re-run at {u['load_start']['time_utc']} UTC (load average {u['load_start']['loadavg'][0]:.1f}): "
                      f"{', '.join(u['sections'])} -- `{u['command']}`.", ""]
    lines += ["| measurement | value | notes |", "| --- | ---: | --- |"]
    for a, b, c in res.get("table", []):
        if not a.startswith("target:"):
            lines.append(f"| {a} | {b} | {c} |")
    bw = _get(res, "bandwidth", "gbs")
    if bw:
        lines += ["", f"| mode | active bytes / token | of which lm_head | bound at {bw:.1f} GB/s | measured | fraction |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for m in ("bf16", "int8", "int4"):
            e = _get(res, "summary", f"decode_{m}")
            if e and "bound_tok_s" in e:
                ab = res["modes"][m]["active_bytes"]
                lines.append(f"| pykimi {m} | {ab['total'] / 1e9:.3f} GB | {ab['lm_head'] / 1e9:.3f} GB | "
                             f"{e['bound_tok_s']:.1f} tok/s | {e['tok_s']:.2f} tok/s | {100 * e['fraction_of_bound']:.0f}% |")
        for qt in ("bf16", "q8_0", "q4_0"):
            d = _get(res, "llamacpp", qt)
            if d and "decode_tok_s" in d and d.get("active_bytes"):
                ab = d["active_bytes"]
                bound = bw * 1e9 / ab["total"]
                lines.append(f"| llama.cpp {qt} | {ab['total'] / 1e9:.3f} GB | {ab['lm_head'] / 1e9:.3f} GB | "
                             f"{bound:.1f} tok/s | {d['decode_tok_s']:.2f} tok/s | {100 * d['decode_tok_s'] / bound:.0f}% |")
    if res.get("targets"):
        lines += ["", "| target (issue 25) | measured | |", "| --- | ---: | --- |"]
        for name, value, ok in res["targets"]:
            lines.append(f"| {name} | {value} | {'' if ok is None else 'met' if ok else '**missed**'} |")
    return "\n".join(lines) + "\n"


# =========================================================================================================
# Table, ratios, bounds, targets
# =========================================================================================================
def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def summarize(res: dict) -> None:
    rows = []                     # (what, value, note)
    bw = _get(res, "bandwidth", "gbs")
    s = res.setdefault("summary", {})
    if bw:
        smp = res["bandwidth"].get("samples_gbs") or []
        b = res["bandwidth"]
        per = " / ".join(f"{b[k]:.1f}" for k in ("gbs_1t", "gbs_2t") if k in b)
        rows.append((f"memory bandwidth ({b.get('probe', 'numpy')} probe; 1 thread / 2 threads; "
                     f"NumPy sum {b.get('numpy_gbs', 0):.1f}, median {b.get('gbs_median', bw):.1f})",
                     f"{per} GB/s",
                     f"bounds use the best of {len(smp)} samples around the decode runs: {bw:.1f} GB/s "
                     f"(samples {min(smp):.1f}-{max(smp):.1f})" if len(smp) > 1 else ""))
    peer_for = {"int8": ("llamacpp", "q8_0"), "int4": ("llamacpp", "q4_0"), "bf16": ("llamacpp", "bf16")}
    for m in ("bf16", "int8", "int4"):
        d = _get(res, "decode", m)
        if not d or "tok_s" not in d:
            if d:
                rows.append((f"decode {m}", "error", d.get("error", "")))
            continue
        ab = res["modes"][m]["active_bytes"]["total"]
        note = f"{fmt_bytes(ab)}/token"
        if "ms_per_token_p99" in d:        # stalls show as a p99 far above the median (issue 25: <= 1.3x)
            note += (f"; step mean / median / p99 {d['ms_per_token']:.1f} / {d['ms_per_token_median']:.1f} / "
                     f"{d['ms_per_token_p99']:.1f} ms")
        if "slow_steps" in d:              # how many steps over 1.3x the median, and how many of them the host stole
            note += f" ({d['slow_steps']} over 1.3x median, {d['slow_steps_with_steal']} with host steal)"
        entry = {"tok_s": d["tok_s"], "active_bytes": ab, "ms_median": d.get("ms_per_token_median"),
                 "ms_p99": d.get("ms_per_token_p99"), "peak_anon": d["memory"]["peak_anon"],
                 "peak_rss": d["memory"]["peak_rss"], "kv_cache_bytes": d.get("kv_cache_bytes")}
        if bw:
            bound = bw * 1e9 / ab
            entry.update(bound_tok_s=bound, fraction_of_bound=d["tok_s"] / bound)
            note += f"; bound {bound:.1f} tok/s; {100 * d['tok_s'] / bound:.0f}% of bound"
        lp = _get(res, *peer_for[m], "decode_tok_s")
        if lp:
            entry["ratio_llamacpp"] = d["tok_s"] / lp
            note += f"; {d['tok_s'] / lp:.2f}x llama.cpp {peer_for[m][1]}"
        if m == "bf16":
            tp = _get(res, "torch", "bfloat16", "decode_ms")
            if tp:
                entry["ratio_torch_bf16"] = tp / d["ms_per_token"]
                note += f"; {tp / d['ms_per_token']:.2f}x torch bf16"
        s[f"decode_{m}"] = entry
        rows.append((f"decode {m} (tok/s)", f"{d['tok_s']:.2f}", note))
    for m, pf in (res.get("prefill") or {}).items():
        if pf.get("error"):
            rows.append((f"prefill {m}", "error", pf["error"]))
        for n in ("64", "128", "512"):
            if n not in pf:
                continue
            v = pf[n]["tok_s"]
            notes = []
            lq = _get(res, *peer_for[m], "prefill", n, "tok_s")
            if lq:
                notes.append(f"{v / lq:.2f}x llama.cpp {peer_for[m][1]}")
                s[f"prefill_{m}_{n}_ratio_llamacpp"] = v / lq
            tb = _get(res, "torch", "bfloat16", "prefill", n, "tok_s")
            if tb:                                   # issue 25: every mode against PyTorch bf16 on the same weights
                notes.append(f"{v / tb:.2f}x torch bf16")
                s[f"prefill_{m}_{n}_ratio_torch_bf16"] = v / tb
            tp = _get(res, "torch", "float32", "prefill", n, "tok_s")
            if tp and m == "bf16":
                notes.append(f"{v / tp:.2f}x torch fp32")
            s[f"prefill_{m}_{n}_tok_s"] = v
            rows.append((f"prefill {n} tokens {m} (tok/s)", f"{v:.1f}", "; ".join(notes)))
    for key, what in (("vision", ""), ("vision_cached", " (f32 weights kept)")):
        vis = res.get(key) or {}
        for size in ("448", "896"):
            if size in vis:
                v = vis[size]["seconds"]
                note = f"{vis[size]['patches']} patches"
                tv = _get(res, "torch", "vision", size, "seconds")
                if tv:
                    note += f"; {tv / v:.2f}x torch fp32 ({tv:.1f} s)"
                    s[f"{key}_{size}_ratio_torch"] = tv / v
                s[f"{key}_{size}_s"] = v
                rows.append((f"image encode {size}x{size}{what} (s)", f"{v:.2f}", note))
        if vis.get("error"):
            rows.append((key, "error", vis["error"]))
    for key, label in (("decode", "decode"), ("prefill", "prefill"), ("vision", "vision"),
                       ("vision_cached", "vision, f32 weights kept (opt-in)")):
        block = res.get(key) or {}
        items = block.items() if not key.startswith("vision") else [("", block)]
        for m, d in items:
            if isinstance(d, dict) and "memory" in d and "error" not in d:
                rows.append((f"peak RSS / anon: {label} {m}".strip(),
                             f"{fmt_bytes(d['memory']['peak_rss'])} / {fmt_bytes(d['memory']['peak_anon'])}", ""))
    tr = res.get("trace") or {}
    if "estimated_overhead" in tr:
        c = tr["calls_per_token"]
        rows.append((f"trace-off overhead ({tr['mode']} decode)", f"{100 * tr['estimated_overhead']:.3f}%",
                     f"{c['emit'] + c['emit_record']:.0f} emit + {c['active']:.0f} active calls/token x "
                     f"{tr['emit_ns']:.0f} ns; A/B {100 * tr['ab_overhead']:+.1f}% (noise-limited)"))
        s["trace_overhead"] = tr["estimated_overhead"]
    # peers
    for dt in ("float32", "bfloat16"):
        d = _get(res, "torch", dt)
        if d and "decode_ms" in d:
            pf_ = d.get("prefill", {})
            rows.append((f"torch eager {dt}: decode ms/token", f"{d['decode_ms']:.0f}",
                         "; ".join(f"prefill {n}: {v['tok_s']:.1f} tok/s" for n, v in pf_.items())
                         + f"; peak anon {fmt_bytes(d['memory']['peak_anon'])}"))
        elif d:
            rows.append((f"torch eager {dt}", "error", d.get("error", "")))
    tv = _get(res, "torch", "vision")
    if tv:
        for size in ("448", "896"):
            if size in tv:
                rows.append((f"torch fp32 image encode {size} (s)", f"{tv[size]['seconds']:.2f}", ""))
        if "error" in tv or "skipped" in tv:
            rows.append(("torch vision", "skipped", tv.get("error") or tv.get("skipped")))
    lc = res.get("llamacpp") or {}
    if "skipped" in lc:
        rows.append(("llama.cpp", "skipped", lc["skipped"]))
    for qt in ("bf16", "q8_0", "q4_0"):
        d = lc.get(qt)
        if d and "decode_tok_s" in d:
            note = "; ".join(f"prefill {n}: {v['tok_s']:.1f} tok/s" for n, v in d.get("prefill", {}).items())
            if "decode_ms_p99" in d:       # beside pykimi's: are the stalls the machine's or pykimi's own?
                note += (f"; step mean / median / p99 {d['decode_ms']:.1f} / {d['decode_ms_median']:.1f} / "
                         f"{d['decode_ms_p99']:.1f} ms")
            if bw and d.get("active_bytes"):
                note += f"; {100 * d['decode_tok_s'] / (bw * 1e9 / d['active_bytes']['total']):.0f}% of its bound"
            rows.append((f"llama.cpp {qt}: decode tok/s", f"{d['decode_tok_s']:.2f}", note))
        elif d:
            rows.append((f"llama.cpp {qt}", "error", d.get("error", "")))
    # greedy agreement between engines (the same weights: a sanity check of the peers' weight mapping)
    ref = _get(res, "decode", "bf16", "token_ids")
    agree = {}
    for name, ids in (("torch_fp32", _get(res, "torch", "float32", "token_ids")),
                      ("torch_bf16", _get(res, "torch", "bfloat16", "token_ids")),
                      ("llamacpp_bf16", _get(res, "llamacpp", "bf16", "token_ids"))):
        if ref and ids:
            n = min(len(ref), len(ids))
            first = next((i for i in range(n) if ref[i] != ids[i]), n)
            agree[name] = f"{first}/{n}"
    if agree:
        s["greedy_agreement_with_pykimi_bf16"] = agree
        rows.append(("greedy tokens equal to pykimi bf16 (leading)", ", ".join(f"{k} {v}" for k, v in agree.items()),
                     "random weights: near-flat logits, so small numeric differences flip the argmax"))
    res["table"] = rows
    res["targets"] = targets(res)
    for name, value, ok in res["targets"]:
        rows.append((f"target: {name}", value, "" if ok is None else "met" if ok else "MISSED"))
    w = max(len(r[0]) for r in rows) if rows else 10
    print()
    print(f"pykimi bench -- {res['checkpoint']['layers']}-layer checkpoint, {res['threads']} threads, "
          f"load {res['load_start']['loadavg'][0]:.1f} -> {res['load_end']['loadavg'][0]:.1f}")
    for a, b, c in rows:
        print(f"  {a:<{w}}  {b:>16}  {c}")


if __name__ == "__main__":
    sys.exit(main())
