"""Ray Data driving N ``pykimi serve`` instances over HTTP (the other route Ray users take; docs/scaling.md).

Each server holds the model once and batches the requests it gets (``pykimi serve -np 4``); Ray Data only
moves rows: a pool of small actors sends each row to one server's OpenAI endpoint (``/v1/chat/completions``,
the image as a ``data:`` URI) and the driver writes OUT with pykimi.batch's exactly-once file (resumable).

    pykimi serve --port 8080 -np 4 &  pykimi serve --port 8081 -np 4 &
    python docs/ray_http_example.py photos/ out.jsonl --url http://127.0.0.1:8080/v1 --url http://127.0.0.1:8081/v1

Rows are the rows of ``pykimi batch`` (greedy: the same text and token counts). A row the server refuses
(HTTP 400 / 413 / 422: unreadable image, prompt too long) becomes ``{"id", "error"}``; any other failure (a
server down, a wrong key) stops the job (rerun to resume).
"""
from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
import time
import zlib


class ServerCaller:
    """Ray Data callable class: one HTTP client per actor; row -> the server chosen by the row id's hash."""

    def __init__(self, urls: list, settings: dict, api_key: str | None = None, timeout: float = 600):
        import httpx

        self.urls = [u.rstrip("/") for u in urls]
        self.settings = settings
        self.client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        self.models = {}                                     # each server's model id, from its /v1/models
        for u in self.urls:
            r = self.client.get(f"{u}/models")
            r.raise_for_status()
            self.models[u] = r.json()["data"][0]["id"]

    def one(self, rid: str, image: str, prompt: str, path: str) -> dict:
        t0 = time.perf_counter()
        try:
            with open(path, "rb") as fh:
                data = base64.b64encode(fh.read()).decode()
        except OSError as e:
            return {"id": rid, "error": f"image {image}: cannot read ({e.strerror})"}
        mime = mimetypes.guess_type(path)[0] or "image/png"
        msgs = [{"role": "system", "content": self.settings["system"]}] if self.settings.get("system") else []
        msgs.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
                                                 {"type": "text", "text": prompt}]})
        url = self.urls[zlib.crc32(rid.encode()) % len(self.urls)]
        body = {"model": self.models[url], "messages": msgs, "max_tokens": self.settings["max_new_tokens"],
                "temperature": self.settings.get("temperature", 0.0)}
        r = self.client.post(f"{url}/chat/completions", json=body)
        if r.status_code in (400, 413, 422):                 # this row's fault: an error row, the job goes on
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:200]
            return {"id": rid, "error": msg}
        r.raise_for_status()                                 # a server fault stops the job
        out = r.json()
        return {"id": rid, "image": image, "prompt": prompt, "text": out["choices"][0]["message"]["content"],
                "prompt_tokens": out["usage"]["prompt_tokens"], "completion_tokens": out["usage"]["completion_tokens"],
                "seconds": round(time.perf_counter() - t0, 3)}

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = [json.dumps(self.one(str(batch["id"][i]), str(batch["image"][i]), str(batch["prompt"][i]),
                                    str(batch["path"][i])), ensure_ascii=False) for i in range(len(batch["id"]))]
        return {"row": np.array(rows, dtype=object)}


def run(src: str, out_path: str, urls: list, prompt: str | None = None, system: str | None = None,
        max_new_tokens: int = 256, actors_per_server: int = 4, address: str | None = None,
        api_key: str | None = None) -> dict:
    import ray
    import ray.data

    from pykimi.batch import ResultsFile, read_jobs

    jobs = read_jobs(src, prompt)
    counts = {"done": 0, "failed": 0, "skipped": 0}
    with ResultsFile(out_path) as out:
        todo = [j for j in jobs if j.id not in out.done]
        counts["skipped"] = len(jobs) - len(todo)
        if not todo:
            return counts
        started = not ray.is_initialized()
        if started:    # a small private local Ray, or the cluster at ADDRESS
            kw = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            ray.init(address=address, **kw) if address else ray.init(num_cpus=2, _node_ip_address="127.0.0.1", **kw)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.execution_options.preserve_order = False
            items = [{"id": j.id, "image": j.image, "prompt": j.prompt, "path": os.path.abspath(j.path)} for j in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(ServerCaller, batch_size=1, batch_format="numpy", num_cpus=0.25,
                                fn_constructor_kwargs={"urls": urls, "api_key": api_key,
                                                       "settings": {"system": system, "max_new_tokens": max_new_tokens}},
                                compute=ray.data.ActorPoolStrategy(size=actors_per_server * len(urls)))
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for line in batch["row"]:
                    row = json.loads(line)
                    counts["failed" if "error" in row else "done"] += 1
                    out.write(row)
        finally:
            if started:
                ray.shutdown()
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help="a folder of images or a JSONL file of {id, image, prompt?} rows")
    ap.add_argument("out")
    ap.add_argument("--url", action="append", required=True, help="a pykimi serve base URL, .../v1 (repeatable)")
    ap.add_argument("-p", "--prompt")
    ap.add_argument("--system")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=256)
    ap.add_argument("--actors-per-server", type=int, default=4, help="requests in flight per server (= its -np)")
    ap.add_argument("--ray", help="a Ray cluster address (default: a small local Ray)")
    ap.add_argument("--api-key", default=os.environ.get("PYKIMI_API_KEY"))
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    c = run(a.input, a.out, a.url, a.prompt, a.system, a.max_new_tokens, a.actors_per_server, a.ray, a.api_key)
    dt = time.perf_counter() - t0
    print(f"{c['done']} done, {c['skipped']} skipped as already done, {c['failed']} failed, "
          f"{c['done'] / dt:.2f} images/s ({dt:.1f} s) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
