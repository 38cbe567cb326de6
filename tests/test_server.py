"""`pykimi serve` (issue 20): the OpenAI API over the engine, on 127.0.0.1 and a free port.

The official openai client (non-streaming + streaming, a demo scene as a data URI); 16 requests 8 at a time,
each equal to its sequential greedy answer; a client killed mid-stream does not disturb the others; /metrics
counts; every bad input -> its status and a one-line OpenAI-shaped error, and the server answers normally after.
"""
import base64
import concurrent.futures as cf
import io
import json
import re
import socket
import threading
import time

import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (fastapi)")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra (uvicorn)")
httpx = pytest.importorskip("httpx", reason="the server tests talk to it with httpx")

import pykimi  # noqa: E402
from pykimi import scenes  # noqa: E402
from pykimi.engine import Engine  # noqa: E402
from pykimi.server.app import create_app  # noqa: E402
from pykimi.testing import free_port  # noqa: E402

TIMEOUT = 120


class ServerThread:
    """uvicorn on a socket bound to 127.0.0.1:0 (a free port), in a thread; stop() ends it."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 30 and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive()


def data_uri(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text, *images):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in images]
             + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def demo():
    path = pykimi.demo_checkpoint()
    return pykimi.load(path), pykimi.Processor.from_pretrained(path)


@pytest.fixture(scope="module")
def served(demo, tmp_path_factory):
    model, proc = demo
    media = tmp_path_factory.mktemp("media")
    img, _ = scenes.random_scene(np.random.default_rng(101))
    img.save(media / "scene.png")
    eng = Engine(model, parallel=8).start()
    app = create_app(model, proc, eng, model_id="demo", media_dir=str(media), max_body_mb=2, max_image_mb=1,
                     max_images=8)
    with ServerThread(app) as srv:
        srv.engine, srv.media, srv.model, srv.proc = eng, media, model, proc
        yield srv
    eng.stop()


def greedy_text(model, proc, img, question, max_new=32):
    ids = model.generate(**{k: v for k, v in proc.prepare(scenes.messages_for(question), images=[img]).items()},
                         max_new_tokens=max_new)
    return proc.decode(ids, skip_special=True)


def test_openai_client_nonstreaming_and_streaming(served):
    openai = pytest.importorskip("openai", reason="the official openai client")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["demo"]
    img, shapes = scenes.random_scene(np.random.default_rng(101))
    msgs = user(scenes.QUESTION_COUNT, data_uri(img))
    r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=32)
    text = r.choices[0].message.content
    assert text == scenes.count_answer(shapes) == "There are 3 shapes."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 50 and r.usage.completion_tokens == r.usage.total_tokens - r.usage.prompt_tokens
    timings = r.model_extra["timings"]
    assert timings["predicted_n"] == r.usage.completion_tokens and timings["prompt_ms"] > 0
    chunks = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=32, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and chunks[-1].choices == []


def _expected(served, seeds):
    out = []
    for seed in seeds:
        img, shapes = scenes.random_scene(np.random.default_rng(seed))
        q = [scenes.QUESTION_COUNT, scenes.QUESTION_DESCRIBE, scenes.qa_pairs(shapes)[0][0]][seed % 3]
        out.append((img, q, greedy_text(served.model, served.proc, img, q)))
    return out


def _ask(url, img, q, stream, **extra):
    body = {"model": "demo", "messages": user(q, data_uri(img)), "max_tokens": 32, "stream": stream, **extra}
    with httpx.Client(timeout=TIMEOUT) as c:
        if not stream:
            r = c.post(url + "/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
        text = ""
        with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ch = json.loads(line[6:])
                    if ch["choices"]:
                        text += ch["choices"][0]["delta"].get("content") or ""
        return text


def _metric(url, name) -> float:
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    m = re.search(rf"^pykimi_{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"pykimi_{name} not in /metrics"
    return float(m.group(1))


def test_16_requests_8_at_a_time_equal_sequential_greedy(served):
    cases = _expected(served, range(300, 316))
    before = {k: _metric(served.url, k) for k in ("requests_total", "requests_ok_total", "tokens_generated_total",
                                                  "decode_steps_total")}
    with cf.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(_ask, served.url, img, q, i % 2 == 0) for i, (img, q, _) in enumerate(cases)]
        got = [f.result(TIMEOUT) for f in futs]
    for i, ((_, q, want), g) in enumerate(zip(cases, got)):
        assert g == want, f"request {i} ({q!r}): {g!r} != sequential {want!r}"
    after = {k: _metric(served.url, k) for k in before}
    assert after["requests_total"] - before["requests_total"] == 16
    assert after["requests_ok_total"] - before["requests_ok_total"] == 16
    n_tok = after["tokens_generated_total"] - before["tokens_generated_total"]
    assert n_tok >= 16 * 5
    assert after["decode_steps_total"] - before["decode_steps_total"] < n_tok - 16   # steps were shared
    text = httpx.get(served.url + "/metrics").text
    for name in ("sequences_running", "sequences_queued", "decode_tokens_per_second", "prompt_tokens_total"):
        assert f"pykimi_{name} " in text


def test_client_killed_mid_stream_does_not_disturb_the_others(served):
    cases = _expected(served, range(400, 404))
    stops = [int(t) for t in served.model.stop_ids]
    body = {"model": "demo", "messages": user(scenes.QUESTION_DESCRIBE, data_uri(cases[0][0])), "stream": True,
            "max_tokens": 1000, "logit_bias": {str(t): -100 for t in stops}}
    cancelled0 = served.engine.metrics["requests_cancelled"]
    with cf.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(_ask, served.url, img, q, True) for img, q, _ in cases[1:]]
        with httpx.Client(timeout=TIMEOUT) as c:
            with c.stream("POST", served.url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                n = 0
                for line in r.iter_lines():
                    n += line.startswith("data: ")
                    if n >= 4:
                        break                            # the client goes away mid-stream
        got = [f.result(TIMEOUT) for f in others]
    assert got == [w for _, _, w in cases[1:]]
    t0 = time.time()
    while served.engine.metrics["requests_cancelled"] == cancelled0 and time.time() - t0 < 30:
        time.sleep(0.05)
    assert served.engine.metrics["requests_cancelled"] == cancelled0 + 1
    while (served.engine.running or served.engine.queued) and time.time() - t0 < 30:
        time.sleep(0.05)
    assert served.engine.reserved == 0
    assert _metric(served.url, "requests_disconnected_total") >= 1


def _small_png():
    from PIL import Image
    return data_uri(Image.new("RGB", (40, 40), (200, 30, 30)))


def _err(r, status, param_or_code=None):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    assert e["message"] and "\n" not in e["message"] and len(e["message"]) < 400, e["message"]
    if param_or_code is not None:
        assert param_or_code in (str(e["param"]) + " " + str(e["code"])), e
    return e


def test_bad_inputs_get_their_status_and_one_line(served):
    from PIL import Image
    url = served.url + "/v1/chat/completions"
    ok_msgs = user("How many shapes are there?", _small_png())
    small = _small_png()
    bmp = data_uri(scenes.random_scene(np.random.default_rng(1))[0], "BMP")
    cases = [
        ("bad json", dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json"),
        ("array body", dict(json=[1, 2]), 400, "invalid_json"),
        ("no messages", dict(json={"model": "demo"}), 400, "messages"),
        ("empty messages", dict(json={"messages": []}), 400, "messages"),
        ("bad role", dict(json={"messages": [{"role": "tool", "content": "x"}]}), 400, "role"),
        ("content number", dict(json={"messages": [{"role": "user", "content": 5}]}), 400, "content"),
        ("unknown part", dict(json={"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400, "type"),
        ("text part no text", dict(json={"messages": [{"role": "user", "content": [{"type": "text"}]}]}), 400,
         "text"),
        ("bad base64", dict(json={"messages": user("q", "data:image/png;base64,!!!notbase64")}), 400,
         "invalid_image"),
        ("not an image", dict(json={"messages": user("q", "data:image/png;base64,"
                                                     + base64.b64encode(b"hello world").decode())}), 400,
         "invalid_image"),
        ("bmp mime", dict(json={"messages": user("q", bmp)}), 400, "invalid_image"),
        ("bmp as png", dict(json={"messages": user("q", bmp.replace("image/bmp", "image/png"))}), 400,
         "invalid_image"),
        ("no base64", dict(json={"messages": user("q", "data:image/png,abc")}), 400, "invalid_image"),
        ("oversized image", dict(json={"messages": user("q", "data:image/png;base64,"
                                                        + base64.b64encode(b"\0" * (1 << 20 | 10)).decode())}),
         400, "image_too_large"),
        ("too many images", dict(json={"messages": user("q", *[small] * 9)}), 400, "too_many_images"),
        ("remote url", dict(json={"messages": user("q", "http://example.com/cat.png")}), 400, "remote_refused"),
        ("file outside media", dict(json={"messages": user("q", "file:///etc/passwd")}), 400, "file_refused"),
        ("file missing", dict(json={"messages": user("q", f"file://{served.media}/nope.png")}), 400,
         "file_not_found"),
        ("ftp url", dict(json={"messages": user("q", "ftp://x/y.png")}), 400, "invalid_image"),
        ("image too wide", dict(json={"messages": user("q", data_uri(Image.new("RGB", (8000, 14))))}), 400,
         "messages"),
        ("null content", dict(json={"messages": [{"role": "assistant", "content": None}]}), 400, "content"),
        ("message not object", dict(json={"messages": ["hi"]}), 400, "messages[0]"),
        ("image_url no url", dict(json={"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                      "image_url": {}}]}]}), 400,
         "image_url"),
        ("prompt over context", dict(json={"messages": [{"role": "user", "content": "red blue " * 3000}]}), 400,
         "context_length_exceeded"),
        ("max_tokens over context", dict(json={"messages": ok_msgs, "max_tokens": 10 ** 6}), 400, "max_tokens"),
        ("max_tokens 0", dict(json={"messages": ok_msgs, "max_tokens": 0}), 400, "max_tokens"),
        ("temperature -1", dict(json={"messages": ok_msgs, "temperature": -1}), 400, "temperature"),
        ("temperature str", dict(json={"messages": ok_msgs, "temperature": "hot"}), 400, "temperature"),
        ("top_p 0", dict(json={"messages": ok_msgs, "top_p": 0}), 400, "top_p"),
        ("top_k -1", dict(json={"messages": ok_msgs, "top_k": -1}), 400, "top_k"),
        ("min_p 2", dict(json={"messages": ok_msgs, "min_p": 2}), 400, "min_p"),
        ("presence 5", dict(json={"messages": ok_msgs, "presence_penalty": 5}), 400, "presence_penalty"),
        ("repetition 0", dict(json={"messages": ok_msgs, "repetition_penalty": 0}), 400, "repetition_penalty"),
        ("n 2", dict(json={"messages": ok_msgs, "n": 2}), 400, "n"),
        ("stop int", dict(json={"messages": ok_msgs, "stop": 5}), 400, "stop"),
        ("logit_bias key", dict(json={"messages": ok_msgs, "logit_bias": {"abc": 1}}), 400, "logit_bias"),
        ("logit_bias value", dict(json={"messages": ok_msgs, "logit_bias": {"5": 500}}), 400, "logit_bias"),
        ("top_logprobs alone", dict(json={"messages": ok_msgs, "top_logprobs": 3}), 400, "top_logprobs"),
        ("top_logprobs 30", dict(json={"messages": ok_msgs, "logprobs": True, "top_logprobs": 30}), 400,
         "top_logprobs"),
        ("seed str", dict(json={"messages": ok_msgs, "seed": "x"}), 400, "seed"),
        ("stream str", dict(json={"messages": ok_msgs, "stream": "yes"}), 400, "stream"),
        ("unknown model", dict(json={"messages": ok_msgs, "model": "gpt-9"}), 404, "model_not_found"),
        ("body over limit", dict(content=b"{" + b" " * (3 << 20) + b"}", headers={"content-type":
                                                                                  "application/json"}), 413,
         "body_too_large"),
    ]
    with httpx.Client(timeout=TIMEOUT) as c:
        for name, kw, status, what in cases:
            r = c.post(url, **kw)
            try:
                _err(r, status, what)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
        _err(c.get(served.url + "/v1/nope"), 404)
        _err(c.get(served.url + "/v1/models/gpt-9"), 404, "model_not_found")
        _err(c.get(url), 405)
        # the server is fine afterwards, and file:// inside the media dir works
        assert c.get(served.url + "/health").json() == {"status": "ok"}
        r = c.post(url, json={"model": "demo", "messages": user(scenes.QUESTION_COUNT,
                                                                 f"file://{served.media}/scene.png"), "max_tokens": 32})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "There are 3 shapes."
    assert _metric(served.url, "requests_errors_total") >= 30


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "GIF"])
def test_image_formats(served, fmt):
    img, shapes = scenes.random_scene(np.random.default_rng(102))
    r = httpx.post(served.url + "/v1/chat/completions", timeout=TIMEOUT,
                   json={"messages": user(scenes.QUESTION_COUNT, data_uri(img, fmt)), "max_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == scenes.count_answer(shapes)


def test_stop_strings_logprobs_and_timings(served):
    img, shapes = scenes.random_scene(np.random.default_rng(103))
    full = greedy_text(served.model, served.proc, img, scenes.QUESTION_DESCRIBE)
    cut = full.split(" ")[1]                       # stop at the second word
    body = {"messages": user(scenes.QUESTION_DESCRIBE, data_uri(img)), "max_tokens": 32, "stop": [cut],
            "logprobs": True, "top_logprobs": 2}
    r = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=TIMEOUT).json()
    ch = r["choices"][0]
    assert ch["message"]["content"] == full[:full.index(cut)] and ch["finish_reason"] == "stop"
    lps = ch["logprobs"]["content"]
    assert lps and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in lps)
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in lps)       # greedy
    text = _ask(served.url, img, scenes.QUESTION_DESCRIBE, True, stop=[cut])
    assert text == ch["message"]["content"]
    r = httpx.post(served.url + "/v1/chat/completions", timeout=TIMEOUT,
                   json={"messages": user(scenes.QUESTION_DESCRIBE, data_uri(img)), "max_tokens": 3}).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3
    assert {"prompt_ms", "prompt_per_second", "predicted_ms", "predicted_per_second"} <= set(r["timings"])


def test_api_key_and_queue_full(demo):
    model, proc = demo
    eng = Engine(model, parallel=1, max_queue=1)           # not started yet: the first request waits
    app = create_app(model, proc, eng, model_id="demo", api_key="sekret")
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    with ServerThread(app) as srv:
        url = srv.url + "/v1/chat/completions"
        _err(httpx.post(url, json=body, timeout=TIMEOUT), 401, "invalid_api_key")
        _err(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=TIMEOUT), 401)
        _err(httpx.get(srv.url + "/v1/models", timeout=TIMEOUT), 401)
        auth = {"Authorization": "Bearer sekret"}
        with cf.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url, json=body, headers=auth, timeout=TIMEOUT)
            t0 = time.time()
            while eng.queued == 0 and time.time() - t0 < 30:
                time.sleep(0.01)
            r = httpx.post(url, json=body, headers=auth, timeout=TIMEOUT)
            _err(r, 503, "queue_full")
            assert r.headers["retry-after"] == "1"
            eng.start()
            assert first.result(TIMEOUT).status_code == 200
        assert httpx.post(url, json=body, headers=auth, timeout=TIMEOUT).status_code == 200
    eng.stop()


def test_cli_serve_answers_and_logs_one_line_per_request(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    port = free_port()
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "pykimi.cli", "serve", "--port", str(port), "-np", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            assert proc.poll() is None, open(tmp_path / "stderr.txt").read()
            assert time.time() - t0 < 120, "pykimi serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        img, shapes = scenes.random_scene(np.random.default_rng(104))
        r = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                       json={"messages": user(scenes.QUESTION_COUNT, data_uri(img)), "max_tokens": 16})
        assert r.json()["choices"][0]["message"]["content"] == scenes.count_answer(shapes)
        assert httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT, json={"messages": []}).status_code == 400
        frozen = [ln for ln in httpx.get(url + "/metrics", timeout=TIMEOUT).text.splitlines()
                  if ln.startswith("pykimi_heap_frozen_objects ")]
        assert len(frozen) == 1 and int(frozen[0].split()[1]) > 10000, frozen    # the warmed-up heap (freeze_heap)
        # a second server on the same port: one line, exit status 2
        busy = subprocess.run([sys.executable, "-m", "pykimi.cli", "serve", "--port", str(port)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and busy.stderr.strip().count("\n") == 0 and "cannot listen" in busy.stderr
    finally:
        proc.terminate()
        proc.wait(30)
        err.close()
    log = open(tmp_path / "stderr.txt").read()
    done = [ln for ln in log.splitlines() if " done: prompt=" in ln]
    assert len(done) == 1 and "completion=" in done[0] and "ttft=" in done[0] and "tok/s" in done[0], log
    assert sum("-> 400" in ln for ln in log.splitlines()) == 1, log


@pytest.mark.parametrize("args, what", [(["--parallel", "0"], "--parallel"), (["--media-dir", "/nonexistent/x"],
                                         "--media-dir"), (["--port", "70000"], "--port"),
                                        (["--cache-budget", "-1"], "--cache-budget")])
def test_cli_serve_bad_flags(args, what):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pykimi.cli", "serve", *args], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert r.returncode == 2 and what in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_reasoning_content_fields(demo):
    """reasoning_format (llama-server's convention): the text between the think markers goes to
    message.reasoning_content / delta.reasoning_content, the rest to content; 'none' keeps the raw text.
    The demo model writes no ◁think▷, so this server's processor takes markers from the demo's own answer
    ("There are 3 shapes.": start "There", end "3"): the plumbing is what is tested, the splitter itself is
    tests/test_reasoning.py's."""
    import copy

    model, proc = demo
    proc = copy.copy(proc)
    proc.think_start, proc.think_end = "There", "3"
    img, _ = scenes.random_scene(np.random.default_rng(7))
    raw = greedy_text(model, proc, img, "How many shapes are there?")
    reasoning, answer = proc.split_reasoning(raw)
    assert reasoning is not None, raw
    eng = Engine(model, parallel=2).start()
    app = create_app(model, proc, eng, model_id="demo")
    try:
        with ServerThread(app) as srv:
            url = srv.url + "/v1/chat/completions"
            q = "How many shapes are there?"
            for fmt in (None, "deepseek"):
                body = {"model": "demo", "messages": user(q, data_uri(img)), "max_tokens": 32}
                if fmt:
                    body["reasoning_format"] = fmt
                m = httpx.post(url, json=body, timeout=TIMEOUT).json()["choices"][0]["message"]
                assert (m["reasoning_content"], m["content"]) == (reasoning, answer), m
                got = {"reasoning_content": "", "content": ""}
                with httpx.Client(timeout=TIMEOUT) as c:
                    with c.stream("POST", url, json=dict(body, stream=True)) as r:
                        for line in r.iter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                ch = json.loads(line[6:])
                                for k in got:
                                    got[k] += (ch["choices"][0]["delta"].get(k) or "") if ch["choices"] else ""
                assert (got["reasoning_content"], got["content"]) == (reasoning, answer), got
            body = {"model": "demo", "messages": user(q, data_uri(img)), "max_tokens": 32, "reasoning_format": "none"}
            m = httpx.post(url, json=body, timeout=TIMEOUT).json()["choices"][0]["message"]
            assert m["content"] == raw and "reasoning_content" not in m
            _err(httpx.post(url, json=dict(body, reasoning_format="html"), timeout=TIMEOUT), 400, "reasoning_format")
    finally:
        eng.stop()


def test_video_url_part(served, tmp_path):
    """A video as a base64 data URI (llama-server's convention): frames sampled uniformly with their times in
    the text, as `pykimi run --video` sends them; anything but a data URI, or bytes that are no video, is a 400."""
    pytest.importorskip("av", reason="video needs PyAV (the optional 'video' extra)")
    from pykimi.video import load_video, video_inputs, write_test_video

    clip = tmp_path / "clip.mp4"
    write_test_video(str(clip), frames=12, fps=4)
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    parts = [{"type": "video_url", "video_url": {"url": uri}}, {"type": "text", "text": "Describe the image."}]
    body = {"model": "demo", "messages": [{"role": "user", "content": parts}], "max_tokens": 8}
    r = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    video = load_video(str(clip), frames=8)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe the image."}]}]
    inputs, fit = video_inputs(served.proc, msgs, video, served.engine.max_context, 8, where=0)
    assert r.json()["usage"]["prompt_tokens"] == len(inputs["input_ids"]) == fit.prompt_tokens
    # a context too small for the frames as they are: every frame gets a smaller budget, prompt + answer fit
    model, proc = served.model, served.proc
    assert fit.tokens_per_frame >= 4, fit
    eng = Engine(model, parallel=1, max_context=fit.text_tokens + 8 + 8 * (fit.tokens_per_frame // 2)).start()
    try:
        with ServerThread(create_app(model, proc, eng, model_id="demo")) as small:
            r = httpx.post(small.url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
            assert r.status_code == 200, r.text
            used = r.json()["usage"]
            assert used["prompt_tokens"] + 8 <= eng.max_context < fit.prompt_tokens, used
    finally:
        eng.stop()
    url = served.url + "/v1/chat/completions"
    bad = lambda u: {"model": "demo", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": u}}, {"type": "text", "text": "hi"}]}]}
    _err(httpx.post(url, json=bad("file:///etc/passwd"), timeout=TIMEOUT), 400)
    _err(httpx.post(url, json=bad("https://example.com/a.mp4"), timeout=TIMEOUT), 400)
    _err(httpx.post(url, json=bad("data:video/mp4;base64," + base64.b64encode(b"not a video").decode()),
                    timeout=TIMEOUT), 400)
