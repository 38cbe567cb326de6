"""llama.cpp's own server (``llama-server``) as the peer of ``pykimi serve`` (issue 20): the same GGUF weights,
``-np c`` parallel slots (its continuous batching), c streaming requests at once, greedy, a fixed number of new
tokens each.

The GGUF's vocabulary is a placeholder (bench/peers/gguf_export.py), so requests go to llama-server's native
``/completion`` endpoint with the prompt as token ids (``"prompt": [ids]``), ``ignore_eos`` and
``cache_prompt: false`` -- the same token-level work as bench_serve.py's pykimi requests.

Measured per stream count c, like bench_serve.py measures pykimi:

* wall tok/s: all new tokens / wall time from the first submit to the last token;
* decode tok/s: all tokens made after each request's first token / the union of the requests' decode windows
  (first token -> last token, measured on the client from the SSE chunks), i.e. the aggregate rate while
  streams are decoding, the analogue of pykimi's "tokens made by decode steps / seconds inside decode steps";
* TTFT: submit -> first streamed token (queueing + prefill), p50 / p95;
* llama-server's own ``timings`` per request (predicted_per_second, prompt_ms) are kept in the JSON.

llama-server is built from the llama.cpp sources that the llama-cpp-python sdist vendors
(``vendor/llama.cpp``): see bench/README.md. It is started with its defaults (weights in its default buffer
types, REPACK included; its own warm-up run), on 127.0.0.1 and a free port, and stopped after each c.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request

import numpy as np

from pykimi.testing import free_port, http_get


class Server:
    """llama-server on 127.0.0.1:<free port> with ``-np parallel``; ``with Server(...) as s: s.url``."""

    def __init__(self, binary: str, gguf: str, parallel: int, ctx_per_slot: int, threads: int,
                 start_timeout: float = 600.0, extra: list | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port), "-np", str(parallel),
                    "-c", str(ctx_per_slot * parallel), "-t", str(threads), "-tb", str(threads),
                    "--no-webui"] + list(extra or [])
        self.start_timeout = start_timeout
        self.proc = None
        self.log_path = os.path.join(os.path.dirname(os.path.abspath(gguf)), f"llama-server-{self.port}.log")

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.start_timeout:           # bounded: the model load + warm-up
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                status, _ = http_get(self.url + "/health", timeout=2.0)
                if status == 200:
                    self.load_s = time.monotonic() - t0
                    return self
            except Exception:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"llama-server not healthy after {self.start_timeout:.0f} s; log: {self.log_path}")

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _stream_completion(url: str, prompt_ids, n_predict: int, t_submit: float, out: dict, timeout: float) -> None:
    """One streaming /completion request; fills out with ttft, token arrival times and llama-server's timings."""
    body = json.dumps({"prompt": [int(i) for i in prompt_ids], "n_predict": int(n_predict), "stream": True,
                       "ignore_eos": True, "cache_prompt": False, "temperature": 0.0, "top_k": 1,
                       "samplers": ["top_k"], "seed": 0}).encode()
    req = urllib.request.Request(url + "/completion", data=body, headers={"Content-Type": "application/json"})
    times, timings = [], None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                now = time.perf_counter()
                if msg.get("content") is not None and not msg.get("stop"):
                    times.append(now)
                if msg.get("tokens"):                               # newer servers send the ids too
                    out.setdefault("ids", []).extend(int(t) for t in msg["tokens"])
                if msg.get("stop"):
                    timings = msg.get("timings")
                    if msg.get("content"):
                        times.append(now)
                    break
    except Exception as e:                                          # the error goes into the row, not a crash
        out["error"] = f"{type(e).__name__}: {e}"
    out["times"] = times
    out["ttft_ms"] = 1e3 * (times[0] - t_submit) if times else None
    out["timings"] = timings


def one_round(url: str, prompts: list, tokens: int, timeout: float = 3600.0) -> dict:
    """c = len(prompts) requests submitted together (one thread each); returns the round's figures."""
    outs = [dict() for _ in prompts]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=_stream_completion, args=(url, p, tokens, t0, o, timeout), daemon=True)
               for p, o in zip(prompts, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    wall = time.perf_counter() - t0
    errors = [o["error"] for o in outs if o.get("error")]
    n_tok = [len(o.get("times") or []) for o in outs]
    if errors or min(n_tok) == 0:
        return {"streams": len(prompts), "error": errors[0] if errors else "no tokens streamed"}
    # the union of the decode windows (first -> last token of each request)
    spans = sorted((o["times"][0], o["times"][-1]) for o in outs)
    covered, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > cur_e:
            covered += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    covered += cur_e - cur_s
    dec_tokens = sum(n - 1 for n in n_tok)
    return {"streams": len(prompts), "wall_tps": sum(n_tok) / wall,
            "decode_tps": dec_tokens / covered if covered > 0 else 0.0,
            "ttft_ms": [o["ttft_ms"] for o in outs], "tokens": n_tok,
            "server_tps": [(o.get("timings") or {}).get("predicted_per_second") for o in outs],
            "server_prompt_ms": [(o.get("timings") or {}).get("prompt_ms") for o in outs]}


def bench(binary: str, gguf: str, streams: list, prompts_for, prompt_len: int, tokens: int, rounds: int,
          threads: int = 2, extra: list | None = None) -> dict:
    """llama-server at each stream count (a fresh server with -np c per count), ``rounds`` rounds alternating
    the order as bench_serve.py does; ``prompts_for(c, seed)`` gives the c token-id prompts (the same ones
    pykimi gets); ``extra``: more llama-server flags (e.g. --mlock). Returns {"rows": [...], "binary", "gguf"}."""
    runs = {c: [] for c in streams}
    load_s = {}
    ctx = prompt_len + tokens + 64
    for r in range(rounds):
        for c in (streams if r % 2 == 0 else streams[::-1]):
            with Server(binary, gguf, parallel=c, ctx_per_slot=ctx, threads=threads, extra=extra) as srv:
                load_s[c] = srv.load_s
                one_round(srv.url, prompts_for(c, 7), 4)                      # warm the slots once
                res = one_round(srv.url, prompts_for(c, 1000 * r + c), tokens)
            runs[c].append(res)
            print(f"  llama-server round {r} streams {c}: " + (res.get("error") or
                  f"decode {res['decode_tps']:.1f} tok/s, wall {res['wall_tps']:.1f}"), flush=True)
    rows = []
    for c in streams:
        ok = [x for x in runs[c] if not x.get("error")]
        if not ok:
            rows.append({"streams": c, "error": runs[c][0].get("error")})
            continue
        ttft = [t for x in ok for t in x["ttft_ms"]]
        rows.append({"streams": c, "decode_tps": float(np.median([x["decode_tps"] for x in ok])),
                     "decode_tps_all": [round(x["decode_tps"], 2) for x in ok],
                     "wall_tps": float(np.median([x["wall_tps"] for x in ok])),
                     "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p95_ms": float(np.percentile(ttft, 95)),
                     "server_tps": [t for x in ok for t in x["server_tps"]], "load_s": load_s.get(c)})
    base = next((row["decode_tps"] for row in rows if "decode_tps" in row), 0.0)
    for row in rows:
        if "decode_tps" in row:
            row["speedup"] = row["decode_tps"] / base if base else 0.0
    return {"binary": binary, "gguf": gguf, "rows": rows}
