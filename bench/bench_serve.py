"""Continuous batching in numbers (issue 20): aggregate decode tok/s and TTFT at 1, 2, 4, 8 concurrent streams,
and per decode step the weight bytes read against the bound for the batch's union of experts.

    python bench/bench_serve.py                                 # the demo and the 4-layer real-width checkpoint
    python bench/bench_serve.py --ckpt DIR [--ckpt DIR2 ...]    # given checkpoints (bf16 or repacked)
    python bench/bench_serve.py --int4                          # also the int4 (experts) repack of the 4-layer one
    python bench/bench_serve.py --streams 1,2,4 --tokens 16 --rounds 2 --reuse
    python bench/bench_serve.py --ckpt bench/out/synth-L27-q4-all \
        --llama-server PATH/llama-server --gguf bench/out/synth-L27-q4_0.gguf    # + llama.cpp's server, same weights

Per checkpoint and stream count c, ``rounds`` times, alternating the stream counts inside each round (so drift on
a shared machine hits all of them alike): one Engine(parallel=c), c requests submitted together (distinct
synthetic prompts of ``--prompt`` tokens, ``--tokens`` new tokens each, never stopping early), then

* decode tok/s: tokens produced by decode steps / seconds inside decode steps (the engine's counters) -- the
  aggregate over the c streams; and wall tok/s: all new tokens / wall time from submit to the last token;
* TTFT p50 / p95 over every request of every round (submit to first token: queueing + prefill);
* per step: bytes of every distinct weight the step read (quantized = codes + scales; the batch's union of
  routed experts + everything dense + lm_head) and its bound, bytes / bandwidth (bench/bandwidth.py's probe
  over 1 GiB, best of 5, 1 and 2 threads, sampled before and after every checkpoint; the best sample), as a
  fraction of the step's time; and "alone bytes" = c x the bytes of a one-sequence
  step, what c separate streams would read.

``--llama-server BIN --gguf FILE``: after the last checkpoint, llama.cpp's own server on the same weights (a GGUF
written from that checkpoint by bench/peers/gguf_export.py), ``-np c`` slots, the same token-id prompts, measured
the same way from the client (bench/peers/llamaserver_peer.py); pykimi's wall tok/s and TTFT are the figures
directly comparable with it.

``--reuse`` (demo): a second turn that re-sends the image and extends the first, with the image feature cache
and prefix reuse on vs off (TTFT of the second turn, alternating).

Numbers on a shared 2-core machine move by tens of percent: read ratios measured in one process, not absolutes.
Results: a table on stdout and ``bench/out/serve.json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

import pykimi  # noqa: F401,E402 -- before NumPy, as the `pykimi` command does (OPENBLAS_THREAD_TIMEOUT)
import numpy as np  # noqa: E402
from pykimi.engine import Engine, SamplingParams, decode_batch, freeze_heap  # noqa: E402


def bandwidth() -> float:
    """Read bandwidth in GB/s: bench/bandwidth.py's C probe (streams a buffer the way decode reads weights),
    best of 5 at 1 and 2 threads; the NumPy sum when that cannot be built. In a child process: the probe's
    OpenMP threads would stay in this one as a second thread team beside the engine's, and with more OpenMP
    threads than cores libgomp cuts its spinning to ~1 %, so every parallel region of the engine's step waits
    for sleeping workers (27 layers int4, one stream: 45 against 38 ms a step)."""
    import subprocess
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bandwidth.py"),
                          "--gib", "1", "--repeat", "5", "--json"], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)["gbs"])


def prompts(model, n: int, length: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(min(model.text.vocab_size, 100000)), [model.config.media_placeholder_token_id])
    return [rng.choice(pool, size=length) for _ in range(n)]


def one_round(model, c: int, prompt_len: int, tokens: int, seed: int) -> dict:
    eng = Engine(model, parallel=c, prefix_cache=False).start()
    try:
        eng.warmup()
        freeze_heap()                                  # as `pykimi serve` does after its warm-up
        step_stats = []
        orig = eng._decode

        def traced(seqs):                              # record every step's batch, time and bytes
            orig(seqs)
            step_stats.append(dict(eng.last_step))
        eng._decode = traced
        t0 = time.perf_counter()
        reqs = [eng.submit(p, params=SamplingParams(max_new_tokens=tokens, stop_ids=()))
                for p in prompts(model, c, prompt_len, seed)]
        res = [r.result(3600) for r in reqs]
        wall = time.perf_counter() - t0
    finally:
        eng.stop()
        gc.unfreeze()      # the engine is done with: its objects must be collectable again (freeze_heap's note)
    m = eng.metrics
    dec_tokens = sum(s["batch"] for s in step_stats)
    full = [s for s in step_stats if s["batch"] == c] or step_stats
    return {"streams": c, "decode_tps": dec_tokens / m["decode_seconds_total"] if m["decode_seconds_total"] else 0.0,
            "wall_tps": sum(r.completion_tokens for r in res) / wall,
            "ttft_ms": [r.timings["ttft_ms"] for r in res],
            "step_s": float(np.median([s["seconds"] for s in full])),
            "step_bytes": float(np.median([s.get("bytes_read", 0) for s in full])),
            "expert_bytes": float(np.median([s.get("expert_bytes", 0) for s in full])),
            "experts_per_layer": float(np.mean([np.mean(s.get("experts_per_layer") or [0]) for s in full]))}


def single_step_bytes(model, samples: int = 8) -> float:
    """Median bytes of a one-sequence decode step (what each stream reads alone). In a thread that then ends, so
    that its OpenMP team goes with it (see bandwidth())."""
    out = []

    def steps():
        for p in prompts(model, samples, 8, 99):
            c = model.new_cache(capacity=16)
            model.prefill(model.embed(p), c, all_logits=False)
            st = {}
            decode_batch(model, [int(p[0])], [c], st)
            out.append(st.get("bytes_read", 0))
    t = threading.Thread(target=steps)
    t.start()
    t.join()
    return float(np.median(out))


def bench_checkpoint(path: str, streams: list, args) -> dict:
    model = pykimi.load(path, mlock=args.mlock)
    alone = single_step_bytes(model)
    runs = {c: [] for c in streams}
    for r in range(args.rounds):
        for c in (streams if r % 2 == 0 else streams[::-1]):
            gbs = bandwidth() if args.sample_each else None      # the host's bandwidth right before this round
            runs[c].append(one_round(model, c, args.prompt, args.tokens, seed=1000 * r + c))
            runs[c][-1]["bandwidth_gbs"] = gbs
            print(f"  round {r} streams {c}: decode {runs[c][-1]['decode_tps']:.1f} tok/s", flush=True)
    rows = []
    for c in streams:
        rs = runs[c]
        ttft = [t for x in rs for t in x["ttft_ms"]]
        step_s = float(np.median([x["step_s"] for x in rs]))
        step_b = float(np.median([x["step_bytes"] for x in rs]))
        rows.append({"streams": c, "decode_tps": float(np.median([x["decode_tps"] for x in rs])),
                     "decode_tps_all": [round(x["decode_tps"], 2) for x in rs],
                     "wall_tps": float(np.median([x["wall_tps"] for x in rs])),
                     "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p95_ms": float(np.percentile(ttft, 95)),
                     "step_ms": 1e3 * step_s, "step_bytes": step_b, "alone_bytes": c * alone,
                     "experts_per_layer": float(np.median([x["experts_per_layer"] for x in rs]))})
        own = [x["bandwidth_gbs"] for x in rs if x.get("bandwidth_gbs")]
        if own:       # this row's bound from the samples taken right before its own rounds
            rows[-1]["own_gbs"], rows[-1]["own_samples_gbs"] = float(np.median(own)), own
            rows[-1]["own_bound_fraction"] = step_b / (rows[-1]["own_gbs"] * 1e9) / step_s
    base = rows[0]["decode_tps"] if rows else 0.0
    for row in rows:
        row["speedup"] = row["decode_tps"] / base if base else 0.0
    if model.memory_lock is not None:
        # unlock before the next server maps its own copy: two locked 27-layer models (and llama.cpp's
        # repacked weights) do not fit 24 GiB, and the kernel's OOM killer picks the peer
        model.ckpt.unlock_memory()
    return {"path": path, "layers": model.text.num_hidden_layers, "rows": rows}


def bench_reuse(rounds: int) -> dict:
    from pykimi import scenes
    path = pykimi.demo_checkpoint()
    model = pykimi.load(path)
    proc = pykimi.Processor.from_pretrained(path)
    out = {"on": [], "off": []}
    for r in range(rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            img, shapes = scenes.random_scene(np.random.default_rng(500 + r))
            on = mode == "on"
            eng = Engine(model, parallel=2, prefix_cache=on, image_cache_mb=256 if on else 0).start()
            try:
                eng.warmup()
                q1 = scenes.messages_for(scenes.QUESTION_COUNT)
                i1 = proc.prepare(q1, images=[img])
                r1 = eng.submit(i1["input_ids"], i1["pixel_values"], i1["image_grid_hws"],
                                params=SamplingParams(max_new_tokens=24)).result(600)
                msgs = q1 + [{"role": "assistant", "content": proc.decode(r1.ids, skip_special=True)},
                             {"role": "user", "content": scenes.QUESTION_DESCRIBE}]
                i2 = proc.prepare(msgs, images=[img])
                r2 = eng.submit(i2["input_ids"], i2["pixel_values"], i2["image_grid_hws"],
                                params=SamplingParams(max_new_tokens=24)).result(600)
            finally:
                eng.stop()
            out[mode].append({"ttft_ms": r2.timings["ttft_ms"], "prompt_tokens": r2.prompt_tokens,
                              "cached_tokens": r2.timings["cache_n"], "images_cached": r2.timings["images_cached"]})
    return {k: {"ttft_ms_median": float(np.median([x["ttft_ms"] for x in v])), "runs": v} for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", action="append", help="checkpoint directory (repeatable); default: demo + 4-layer")
    ap.add_argument("--layers", type=int, default=4, help="layers of the synthetic real-width checkpoint")
    ap.add_argument("--int4", action="store_true", help="also the int4 (experts) repack of the synthetic one")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=24, help="new tokens per stream")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per stream")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="also the image-cache / prefix-reuse measurement (demo)")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary: also run it on --gguf (the peer)")
    ap.add_argument("--gguf", help="the GGUF of the last --ckpt's weights, for --llama-server")
    ap.add_argument("--threads", type=int, default=2, help="llama-server's threads (pykimi uses its default)")
    ap.add_argument("--mlock", action="store_true",
                    help="both servers pin their mapped weights in RAM (pykimi --mlock, llama-server --load-mode "
                         "mmap+mlock)")
    ap.add_argument("--sample-each", action="store_true",
                    help="also sample the bandwidth right before every round, and give each row the bound of its own "
                         "samples beside the run's best (on hosts whose bandwidth jumps between states)")
    ap.add_argument("--out", default=os.path.join(BENCH, "out", "serve.json"))
    args = ap.parse_args(argv)
    if bool(args.llama_server) != bool(args.gguf):
        ap.error("--llama-server and --gguf go together")
    streams = [int(s) for s in args.streams.split(",")]
    paths = args.ckpt
    if not paths:
        import run
        synth = run.ensure_checkpoint(args.layers)
        paths = [pykimi.demo_checkpoint(), synth] + ([run.ensure_quantized(synth, 4, "experts")] if args.int4 else [])
    samples = [bandwidth()]
    load0 = os.getloadavg()[0]
    res = {"loadavg_1min_start": load0, "tokens": args.tokens, "prompt": args.prompt, "rounds": args.rounds,
           "mlock": args.mlock, "checkpoints": []}
    for p in paths:
        print(f"[{p}]", flush=True)
        res["checkpoints"].append(bench_checkpoint(p, streams, args))
        samples.append(bandwidth())
    # the bounds use the best bandwidth sample of the run (a sample taken while the host was busy would
    # make every bound look easy)
    if args.llama_server:
        from peers import llamaserver_peer
        model = pykimi.load(paths[-1])                   # for its vocabulary: the same prompts as pykimi's
        print(f"[llama-server {args.gguf}]", flush=True)
        res["llama_server"] = llamaserver_peer.bench(
            args.llama_server, args.gguf, streams, lambda c, seed: prompts(model, c, args.prompt, seed),
            args.prompt, args.tokens, args.rounds, threads=args.threads,
            extra=["--load-mode", "mmap+mlock"] if args.mlock else None)     # its --mlock in this llama.cpp
        del model
        samples.append(bandwidth())
    gbs = max(samples)
    res["bandwidth_gbs"], res["bandwidth_samples_gbs"] = gbs, samples
    for ck in res["checkpoints"]:
        for row in ck["rows"]:
            row["bound_ms"] = 1e3 * row["step_bytes"] / (gbs * 1e9)
            row["bound_fraction"] = row["bound_ms"] / row["step_ms"]
    if args.reuse:
        res["reuse"] = bench_reuse(max(2, args.rounds))
    res["loadavg_1min_end"] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nbandwidth {gbs:.1f} GB/s (best of {', '.join(f'{x:.1f}' for x in samples)}); load average {load0:.1f} -> {res['loadavg_1min_end']:.1f}")
    for ck in res["checkpoints"]:
        print(f"\n{ck['path']} ({ck['layers']} layers)")
        own = any("own_gbs" in r for r in ck["rows"])
        print("| streams | decode tok/s | x one stream | wall tok/s | TTFT p50 / p95 ms | step ms | step MB read "
              "| alone MB | bound ms | of bound |" + (" own samples GB/s | of own bound |" if own else "")
              + " experts/layer |")
        print("| ---: " * (13 if own else 11) + "|")
        for r in ck["rows"]:
            mine = (f" {r['own_gbs']:.1f} | {100 * r['own_bound_fraction']:.0f} % |" if "own_gbs" in r else
                    " | |") if own else ""
            print(f"| {r['streams']} | {r['decode_tps']:.1f} | {r['speedup']:.2f} | {r['wall_tps']:.1f} | "
                  f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} | {r['step_ms']:.1f} | {r['step_bytes'] / 1e6:.1f} | "
                  f"{r['alone_bytes'] / 1e6:.1f} | {r['bound_ms']:.1f} | {100 * r['bound_fraction']:.0f} % |{mine} "
                  f"{r['experts_per_layer']:.1f} |")
    if "llama_server" in res:
        print(f"\nllama-server on {args.gguf} (-np = streams)")
        print("| streams | decode tok/s | x one stream | wall tok/s | TTFT p50 / p95 ms | pykimi wall tok/s / llama-server |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        mine = {r["streams"]: r for r in res["checkpoints"][-1]["rows"]}
        for r in res["llama_server"]["rows"]:
            if "error" in r:
                print(f"| {r['streams']} | {r['error']} | | | | |")
                continue
            ratio = mine[r["streams"]]["wall_tps"] / r["wall_tps"] if r["wall_tps"] else 0.0
            print(f"| {r['streams']} | {r['decode_tps']:.1f} | {r['speedup']:.2f} | {r['wall_tps']:.1f} | "
                  f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} | {ratio:.2f} |")
    if "reuse" in res:
        on, off = res["reuse"]["on"], res["reuse"]["off"]
        print(f"\nsecond turn (image re-sent, conversation extended): TTFT {on['ttft_ms_median']:.0f} ms with the "
              f"image cache + prefix reuse, {off['ttft_ms_median']:.0f} ms without "
              f"({on['runs'][0]['cached_tokens']} of {on['runs'][0]['prompt_tokens']} prompt tokens reused)")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
