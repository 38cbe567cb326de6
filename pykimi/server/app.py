"""The OpenAI-compatible HTTP layer (issue 20): FastAPI routes over one :class:`pykimi.engine.Engine`.

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the one model this server runs
    POST /v1/chat/completions    OpenAI chat completions (stream or not), llama-server's `timings` added
    GET  /metrics                Prometheus text: requests, tokens, running / queued sequences, decode tok/s

Everything a client can get wrong is answered in OpenAI's error shape ``{"error": {"message", "type",
"param", "code"}}`` with 400 (bad JSON, fields, images, a prompt over the context), 401 (API key), 404 (unknown
model or path), 413 (body over the limit) or 503 + Retry-After (queue full); never a 500. Images come as
``data:`` URIs (PNG, JPEG, WebP, GIF first frame), ``file://`` paths inside ``media_dir``, or http(s) URLs
only when ``allow_remote`` (size cap, timeout). SSE streams use FastAPI's EventSourceResponse and its event
formatter. One log line per request (logger ``pykimi.server``).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import EngineStopped, QueueFull, SamplingParams
from ..errors import InputError, PykimiError
from ..reasoning import REASONING, ReasoningSplitter, check_reasoning_format, message_fields
from ..video import DEFAULT_FRAMES, fit_video, load_video, video_parts

log = logging.getLogger("pykimi.server")

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
MIME = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}


@dataclass
class ServerContext:
    """What the routes (and the inspector page) share: the model, its processor, the engine, the settings."""
    model: object
    processor: object
    engine: object
    model_id: str = "pykimi"
    api_key: str | None = None
    media_dir: str | None = None
    allow_remote: bool = False
    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 16 << 20
    max_images: int = 8
    remote_timeout: float = 10.0
    default_max_tokens: int = 4096
    started: float = field(default_factory=time.time)
    counts: dict = field(default_factory=lambda: {"requests": 0, "ok": 0, "errors": {}, "prompt_tokens": 0,
                                                  "completion_tokens": 0, "disconnects": 0})


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error", 503: "server_error"}.get(status, "server_error")
        self.headers = headers


def _err_body(status: int, message: str, param=None, code=None, type_=None) -> dict:
    e = APIError(status, message, param, code, type_)
    # one line: the message names what was wrong and what was expected
    return {"error": {"message": " ".join(str(message).split()), "type": e.type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(_err_body(e.status, e.message, e.param, e.code, e.type), status_code=e.status,
                        headers=e.headers)


# ---------------------------------------------------------------------------------------------------------
# Request parsing
# ---------------------------------------------------------------------------------------------------------
def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _number(body: dict, name: str, lo: float, hi: float, default, integer: bool = False, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (not integer and v != v):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}", name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise _bad(f"'{name}'={v} is out of range: expected {lo} {'<' if lo_open else '<='} {name} <= {hi}", name)
    return v


def _decode_image_bytes(data: bytes, where: str, ctx: ServerContext):
    from PIL import Image
    if len(data) > ctx.max_image_bytes:
        raise _bad(f"{where}: image of {len(data)} bytes is over the limit of {ctx.max_image_bytes} bytes", where,
                   "image_too_large")
    if not data:
        raise _bad(f"{where}: the image is empty", where, "invalid_image")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt not in IMAGE_FORMATS:
            raise _bad(f"{where}: image format {fmt} is not supported (expected PNG, JPEG, WebP or GIF)", where,
                       "invalid_image")
        img.seek(0)                                  # GIF: the first frame
        img.load()
        img = img.convert("RGB")
    except APIError:
        raise
    except Image.DecompressionBombError as e:
        raise _bad(f"{where}: image refused by the decompression-bomb limit ({e})", where, "image_too_large") from None
    except Exception as e:  # noqa: BLE001 -- any decoder failure is the client's undecodable image
        raise _bad(f"{where}: cannot decode the image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                   where, "invalid_image") from None
    return img


def _load_image(url, where: str, ctx: ServerContext):
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}: expected an image URL string", where)
    if url.startswith("data:"):
        head, sep, payload = url[5:].partition(",")
        if not sep:
            raise _bad(f"{where}: malformed data URI (expected data:image/png;base64,...)", where, "invalid_image")
        parts = head.split(";")
        mime = parts[0].lower()
        if mime and mime not in MIME:
            raise _bad(f"{where}: data URI type {mime!r} is not supported (expected image/png, image/jpeg, "
                       f"image/webp or image/gif)", where, "invalid_image")
        if "base64" not in parts[1:]:
            raise _bad(f"{where}: data URI must be base64-encoded (data:image/png;base64,...)", where, "invalid_image")
        if len(payload) > ctx.max_image_bytes * 4 // 3 + 8:
            raise _bad(f"{where}: image is over the limit of {ctx.max_image_bytes} bytes", where, "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}: invalid base64 in the data URI", where, "invalid_image") from None
        return _decode_image_bytes(data, where, ctx)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if not ctx.media_dir:
            raise _bad(f"{where}: file:// URLs are refused (start the server with --media-dir DIR to allow files "
                       f"inside DIR)", where, "file_refused")
        path = os.path.realpath(unquote(parsed.path))
        root = os.path.realpath(ctx.media_dir)
        if os.path.commonpath([path, root]) != root:
            raise _bad(f"{where}: {unquote(parsed.path)} is outside the media directory", where, "file_refused")
        if not os.path.isfile(path):
            raise _bad(f"{where}: {unquote(parsed.path)}: no such file in the media directory", where, "file_not_found")
        if os.path.getsize(path) > ctx.max_image_bytes:
            raise _bad(f"{where}: file is over the limit of {ctx.max_image_bytes} bytes", where, "image_too_large")
        with open(path, "rb") as f:
            return _decode_image_bytes(f.read(), where, ctx)
    if parsed.scheme in ("http", "https"):
        if not ctx.allow_remote:
            raise _bad(f"{where}: remote image URLs are refused (send the image as a data: URI, or start the "
                       f"server with --allow-remote-images)", where, "remote_refused")
        return _fetch_remote(url, where, ctx)
    raise _bad(f"{where}: unsupported image URL scheme {parsed.scheme!r} (expected data:, file:// or http(s)://)",
               where, "invalid_image")


def _fetch_remote(url: str, where: str, ctx: ServerContext):
    import httpx
    buf = bytearray()
    try:
        with httpx.stream("GET", url, timeout=ctx.remote_timeout, follow_redirects=True) as r:
            if r.status_code != 200:
                raise _bad(f"{where}: fetching the image gave HTTP {r.status_code}", where, "remote_failed")
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > ctx.max_image_bytes:
                    raise _bad(f"{where}: remote image is over the limit of {ctx.max_image_bytes} bytes", where,
                               "image_too_large")
    except APIError:
        raise
    except httpx.HTTPError as e:
        raise _bad(f"{where}: cannot fetch the image ({type(e).__name__})", where, "remote_failed") from None
    return _decode_image_bytes(bytes(buf), where, ctx)


def parse_messages(messages, ctx: ServerContext, videos: list | None = None) -> list:
    """OpenAI messages -> the processor's messages (image parts carry the decoded PIL image). A ``video_url``
    part becomes its sampled frames' parts; with a ``videos`` list it is appended there as (message index,
    Video) instead, for the caller to fit into the context (pykimi.video.fit_video)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    out, n_images = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"{where}.role {json.dumps(role)[:40]} is not supported (expected system, user or assistant)",
                       f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or an array of parts", f"{where}.content")
        parts = []
        for j, p in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(p, dict):
                raise _bad(f"{pw} must be an object with a 'type'", pw)
            t = p.get("type")
            if t == "text":
                if not isinstance(p.get("text"), str):
                    raise _bad(f"{pw}.text must be a string", f"{pw}.text")
                parts.append({"type": "text", "text": p["text"]})
            elif t == "image_url":
                iu = p.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                n_images += 1
                if n_images > ctx.max_images:
                    raise _bad(f"too many images: at most {ctx.max_images} per request", pw, "too_many_images")
                parts.append({"type": "image", "image": _load_image(url, f"{pw}.image_url", ctx)})
            elif t == "video_url":             # llama-server's convention: video as a base64 data URI only
                vu = p.get("video_url")
                url = vu.get("url") if isinstance(vu, dict) else vu
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise _bad(f"{pw}.video_url must be a data: URI (base64 video); paths and remote URLs are not "
                               f"read for video", f"{pw}.video_url")
                room = ctx.max_images - n_images          # each frame counts as an image
                if room < 1:
                    raise _bad(f"too many images: at most {ctx.max_images} per request (video frames included)", pw,
                               "too_many_images")
                try:       # frames sampled uniformly (pykimi.video), '<t=..s>' before each, as `pykimi run --video`
                    video = load_video(url, frames=min(DEFAULT_FRAMES, room))
                except PykimiError as e:
                    raise _bad(f"{pw}.video_url: {str(e).splitlines()[0]}", f"{pw}.video_url") from None
                n_images += len(video)
                if videos is None:
                    parts.extend(video_parts(video))
                else:
                    videos.append((i, video))
            else:
                raise _bad(f"{pw}.type {json.dumps(t)[:40]} is not supported (expected 'text', 'image_url' or "
                           f"'video_url')", f"{pw}.type")
        out.append({"role": role, "content": parts})
    return out


def parse_params(body: dict, ctx: ServerContext, vocab: int) -> tuple[SamplingParams, dict]:
    """The sampling fields -> (SamplingParams without max_new_tokens resolved, extras: stream, stops, ...)."""
    n = _number(body, "n", 1, 1 << 30, 1, integer=True)
    if n != 1:
        raise _bad(f"'n'={n}: only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = bool((so or {}).get("include_usage", False))
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    which = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
        raise _bad(f"'{which}' must be an integer >= 1, got {json.dumps(mt)[:40]}", which)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = list(stop)
    else:
        raise _bad("'stop' must be a string or an array of at most 16 strings", "stop")
    if any(not s for s in stops):
        raise _bad("'stop' strings must not be empty", "stop")
    logprobs = body.get("logprobs", False)
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad("'logprobs' must be true or false", "logprobs")
    top_lp = _number(body, "top_logprobs", 0, 20, 0, integer=True)
    if top_lp and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    lb = body.get("logit_bias")
    bias = None
    if lb is not None:
        if not isinstance(lb, dict):
            raise _bad("'logit_bias' must be an object mapping token ids to numbers in [-100, 100]", "logit_bias")
        bias = {}
        for k, v in lb.items():
            try:
                tid = int(k)
            except ValueError:
                raise _bad(f"'logit_bias' key {k!r} is not a token id", "logit_bias") from None
            if not 0 <= tid < vocab:
                raise _bad(f"'logit_bias' token id {tid} is outside the vocabulary [0, {vocab})", "logit_bias")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise _bad(f"'logit_bias' value for {k} must be a number in [-100, 100]", "logit_bias")
            bias[tid] = float(v)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("'seed' must be an integer", "seed")
    params = SamplingParams(
        max_new_tokens=1,
        temperature=float(_number(body, "temperature", 0.0, 2.0, 0.0)),   # greedy unless asked (like llama-server's
        top_p=float(_number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)),  # --temp 0 default of pykimi run)
        top_k=int(_number(body, "top_k", 0, 1 << 30, 0, integer=True)),
        min_p=float(_number(body, "min_p", 0.0, 1.0, 0.0)),
        seed=None if seed is None else seed % (1 << 63),
        repetition_penalty=float(_number(body, "repetition_penalty", 0.0, 10.0, 1.0, lo_open=True)),
        presence_penalty=float(_number(body, "presence_penalty", -2.0, 2.0, 0.0)),
        frequency_penalty=float(_number(body, "frequency_penalty", -2.0, 2.0, 0.0)),
        logit_bias=bias,
        logprobs=(max(1, top_lp) if logprobs else 0),
    )
    return params, {"stream": stream, "include_usage": include_usage, "max_tokens": mt, "max_tokens_field": which,
                    "stops": stops, "top_logprobs": top_lp if logprobs else None}


# ---------------------------------------------------------------------------------------------------------
# Text assembly: stop strings, holding back what may still become one, incomplete UTF-8
# ---------------------------------------------------------------------------------------------------------
class TextStream:
    def __init__(self, processor, stops: list):
        self.processor = processor
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int, final: bool) -> str:
        """Add a token; return the new text that is safe to send (all of it when final)."""
        self.ids.append(token_id)
        self.text = self.processor.decode(self.ids, skip_special=True)
        for s in self.stops:
            k = self.text.find(s, max(0, self.sent - len(s)))
            if k >= 0:
                self.text = self.text[:k]
                self.stopped = True
                final = True
        end = len(self.text)
        if not final:
            end -= self.hold
            while end > self.sent and self.text[end - 1] == "\ufffd":     # an incomplete UTF-8 sequence
                end -= 1
        end = max(end, self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out


def _token_str(processor, tid: int) -> str:
    return processor.tokenizer.decode([int(tid)])


def _logprob_entry(processor, ev, n_top) -> dict:
    s = _token_str(processor, ev.token_id)
    return {"token": s, "logprob": ev.logprob, "bytes": list(s.encode("utf-8")),
            "top_logprobs": [{"token": (t := _token_str(processor, i)), "logprob": lp, "bytes": list(t.encode("utf-8"))}
                             for i, lp in (ev.top_logprobs or [])[:n_top]]}


# ---------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------
def create_app(model, processor, engine, model_id: str = "pykimi", api_key: str | None = None,
               media_dir: str | None = None, allow_remote: bool = False, max_body_mb: float = 32,
               max_image_mb: float = 16, max_images: int = 8, default_max_tokens: int = 4096) -> FastAPI:
    """The ASGI app over a started (or to be started) engine. The caller owns the engine's life cycle."""
    ctx = ServerContext(model=model, processor=processor, engine=engine, model_id=model_id, api_key=api_key,
                        media_dir=media_dir, allow_remote=allow_remote, max_body_bytes=int(max_body_mb * (1 << 20)),
                        max_image_bytes=int(max_image_mb * (1 << 20)), max_images=int(max_images),
                        default_max_tokens=int(default_max_tokens))
    app = FastAPI(title="pykimi", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx

    def count_error(status: int) -> None:
        ctx.counts["errors"][status] = ctx.counts["errors"].get(status, 0) + 1

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        count_error(e.status)
        log.info("%s %s -> %d %s: %s", request.method, request.url.path, e.status, e.code or e.type,
                 " ".join(e.message.split())[:200])
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        count_error(e.status_code)
        msg = {404: f"{request.url.path}: no such endpoint", 405: f"{request.method} is not allowed on "
               f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(_err_body(e.status_code, msg, None, None, "invalid_request_error" if e.status_code < 500
                                      else "server_error"), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        count_error(400)
        return JSONResponse(_err_body(400, f"invalid request: {str(e).splitlines()[0]}"), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request, e):               # a pykimi bug, not bad input: still the OpenAI shape
        count_error(500)
        log.exception("internal error")
        return JSONResponse(_err_body(500, f"internal error: {type(e).__name__}", None, None, "server_error"),
                            status_code=500)

    def check_key(request: Request) -> None:
        if ctx.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {ctx.api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", None,
                           "invalid_api_key")

    @app.get("/health")
    async def health():
        if getattr(engine, "error", None) is not None:
            return JSONResponse({"status": "error", "error": type(engine.error).__name__}, status_code=503)
        return {"status": "ok"}

    def model_card() -> dict:
        t = model.text
        return {"id": ctx.model_id, "object": "model", "created": int(ctx.started), "owned_by": "pykimi",
                "meta": {"n_ctx": engine.max_context, "n_vocab": t.vocab_size, "n_layers": t.num_hidden_layers,
                         "parallel": engine.parallel}}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        check_key(request)
        if name != ctx.model_id:
            raise APIError(404, f"the model '{name}' does not exist (this server runs '{ctx.model_id}')", "model",
                           "model_not_found")
        return model_card()

    @app.get("/metrics")
    async def metrics():
        e, c = engine, ctx.counts
        m = e.metrics
        lines = []

        def metric(name, kind, help_, value, labels=""):
            lines.append(f"# HELP pykimi_{name} {help_}")
            lines.append(f"# TYPE pykimi_{name} {kind}")
            if isinstance(value, dict):
                for lab, v in value.items():
                    lines.append(f"pykimi_{name}{{{lab}}} {v}")
            else:
                lines.append(f"pykimi_{name}{labels} {value}")

        metric("requests_total", "counter", "chat completion requests received", c["requests"])
        metric("requests_ok_total", "counter", "chat completion requests answered", c["ok"])
        metric("requests_errors_total", "counter", "requests answered with an error, by status",
               {f'status="{k}"': v for k, v in sorted(c["errors"].items())} or {'status="400"': 0})
        metric("requests_disconnected_total", "counter", "clients gone before the end (sequence freed)",
               c["disconnects"])
        metric("engine_requests_finished_total", "counter", "engine requests finished", m["requests_finished"])
        metric("engine_requests_cancelled_total", "counter", "engine requests cancelled", m["requests_cancelled"])
        metric("prompt_tokens_total", "counter", "prompt tokens prefilled", m["prompt_tokens"])
        metric("tokens_generated_total", "counter", "tokens generated", m["tokens_generated"])
        metric("prefix_reused_tokens_total", "counter", "prompt tokens taken from a kept conversation cache",
               m["prefix_reused_tokens"])
        metric("image_cache_hits_total", "counter", "images whose features came from the cache", e.images.hits)
        metric("image_cache_misses_total", "counter", "images encoded", e.images.misses)
        metric("decode_steps_total", "counter", "batched decode steps", m["decode_steps"])
        metric("decode_seconds_total", "counter", "seconds spent in decode steps", round(m["decode_seconds_total"], 6))
        metric("sequences_running", "gauge", "sequences decoding", e.running)
        metric("sequences_queued", "gauge", "requests waiting or prefilling", e.queued)
        metric("decode_tokens_per_second", "gauge", "aggregate decode tokens per second (recent steps)",
               round(e.decode_tps, 3))
        metric("last_step_batch", "gauge", "sequences in the last decode step", e.last_step.get("batch", 0))
        metric("heap_frozen_objects", "gauge", "objects the cyclic garbage collector no longer walks "
               "(pykimi serve freezes the warmed-up heap: engine.freeze_heap)", gc.get_freeze_count())
        metric("last_step_bytes_read", "gauge", "weight bytes the last decode step read",
               e.last_step.get("bytes_read", 0))
        metric("cache_reserved_bytes", "gauge", "latent cache reserved by running sequences", e.reserved)
        metric("cache_kept_bytes", "gauge", "latent cache kept for conversations that may continue", e.kept_bytes)
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def read_body(request: Request) -> dict:
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > ctx.max_body_bytes:
            raise APIError(413, f"request body of {cl} bytes is over the limit of {ctx.max_body_bytes} bytes", None,
                           "body_too_large")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > ctx.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {ctx.max_body_bytes} bytes", None,
                               "body_too_large")
        try:
            body = json.loads(bytes(buf))
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the body is not valid JSON ({str(e).splitlines()[0]})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object", None, "invalid_json")
        return body

    def prepare(body: dict):
        """Parse and tokenize (a worker thread: images are decoded and preprocessed here)."""
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise _bad("'model' must be a string", "model")
        if name not in (None, "", ctx.model_id):
            raise APIError(404, f"the model '{name}' does not exist (this server runs '{ctx.model_id}')", "model",
                           "model_not_found")
        params, extra = parse_params(body, ctx, model.text.vocab_size)
        try:          # the thinking checkpoints' ◁think▷…◁/think▷ -> reasoning_content (llama-server's convention)
            extra["reasoning_format"] = check_reasoning_format(body.get("reasoning_format"))
        except ValueError as e:
            raise _bad(str(e), "reasoning_format") from None
        videos: list = []
        msgs = parse_messages(body.get("messages"), ctx, videos)
        try:
            for i, video in videos:      # every frame the same image budget, so prompt + answer fit the context
                want = extra["max_tokens"] if extra["max_tokens"] is not None else min(ctx.default_max_tokens, 256)
                msgs, _ = fit_video(processor, msgs, video, engine.max_context, want, where=i)
            inputs = processor.prepare(msgs)
        except PykimiError as e:
            raise _bad(str(e).splitlines()[0], "messages") from None
        S = int(len(inputs["input_ids"]))
        room = engine.max_context - S
        if room < 1:
            raise _bad(f"the prompt has {S} tokens; the context limit is {engine.max_context}", "messages",
                       "context_length_exceeded")
        mt = extra["max_tokens"]
        if mt is not None and mt > room:
            raise _bad(f"prompt of {S} tokens + {extra['max_tokens_field']}={mt} exceeds the context limit of "
                       f"{engine.max_context}; lower {extra['max_tokens_field']}", extra["max_tokens_field"],
                       "context_length_exceeded")
        params.max_new_tokens = int(mt if mt is not None else min(room, ctx.default_max_tokens))
        return inputs, params, extra

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        ctx.counts["requests"] += 1
        t0 = time.perf_counter()
        body = await read_body(request)
        inputs, params, extra = await asyncio.to_thread(prepare, body)
        try:
            req = engine.submit(inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_grid_hws"),
                                params=params)
        except QueueFull as e:
            raise APIError(503, f"server busy: {e}; retry later", None, "queue_full", "server_error",
                           headers={"Retry-After": "1"}) from None
        except InputError as e:
            raise _bad(str(e).splitlines()[0], None, "invalid_request") from None
        except EngineStopped:
            raise APIError(503, "the server is shutting down", None, "shutting_down",
                           headers={"Retry-After": "5"}) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.subscribe(lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        text = TextStream(processor, extra["stops"])
        n_top = extra["top_logprobs"]

        async def next_event(poll_disconnect: bool):
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), 0.1)
                except asyncio.TimeoutError:
                    if poll_disconnect and await request.is_disconnected():
                        return None
                    continue
                if isinstance(ev, BaseException):
                    raise ev
                return ev

        def finish_fields(reason: str):
            res = req.result(30)
            timings = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.timings.items()}
            usage = {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                     "total_tokens": res.prompt_tokens + res.completion_tokens,
                     "prompt_tokens_details": {"cached_tokens": int(res.timings.get("cache_n", 0))}}
            ctx.counts["ok"] += 1
            ctx.counts["prompt_tokens"] += res.prompt_tokens
            ctx.counts["completion_tokens"] += res.completion_tokens
            tps = timings.get("predicted_per_second", 0.0)
            log.info("%s done: prompt=%d completion=%d ttft=%.0f ms decode=%.1f tok/s finish=%s total=%.0f ms",
                     cid, res.prompt_tokens, res.completion_tokens, timings.get("ttft_ms", 0.0), tps, reason,
                     1e3 * (time.perf_counter() - t0))
            return usage, timings

        def reason_of(ev) -> str:
            if text.stopped:
                return "stop"
            return ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"

        if not extra["stream"]:
            pieces, lps = [], []
            reason = None
            try:
                while reason is None:
                    ev = await next_event(True)
                    if ev is None:                               # the client left: free the sequence
                        req.cancel()
                        ctx.counts["disconnects"] += 1
                        log.info("%s client disconnected", cid)
                        return JSONResponse({}, status_code=499)
                    if ev.token_id is not None:
                        pieces.append(text.add(ev.token_id, ev.finish_reason is not None))
                        if n_top is not None:
                            lps.append(_logprob_entry(processor, ev, n_top))
                    if text.stopped and ev.finish_reason is None:
                        req.cancel()
                        reason = "stop"
                        while (await next_event(False)).finish_reason is None:
                            pass
                    elif ev.finish_reason is not None:
                        reason = reason_of(ev)
            except EngineStopped:
                raise APIError(503, "the server is shutting down", None, "shutting_down",
                               headers={"Retry-After": "5"}) from None
            except PykimiError as e:                             # bad input found by the engine
                raise _bad(str(e).splitlines()[0], None, "invalid_request") from None
            except asyncio.CancelledError:
                req.cancel()
                raise
            usage, timings = finish_fields(reason)
            return {"id": cid, "object": "chat.completion", "created": created, "model": ctx.model_id,
                    "system_fingerprint": "pykimi",
                    "choices": [{"index": 0, "message": {"role": "assistant", **message_fields(
                                     "".join(pieces), extra["reasoning_format"], processor.think_start,
                                     processor.think_end)},
                                 "logprobs": {"content": lps} if n_top is not None else None,
                                 "finish_reason": reason}],
                    "usage": usage, "timings": timings}

        def chunk(delta: dict, reason=None, logprobs=None) -> bytes:
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": ctx.model_id,
                 "system_fingerprint": "pykimi",
                 "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
            return format_sse_event(data_str=json.dumps(c, ensure_ascii=False))

        split = (None if extra["reasoning_format"] == "none"
                 else ReasoningSplitter(processor.think_start, processor.think_end))

        def deltas(piece: str, final: bool = False) -> list[dict]:
            """Text pieces -> delta dicts: reasoning_content / content (the raw text with reasoning_format none)."""
            if split is None:
                return [{"content": piece}] if piece else []
            parts = split.feed(piece) + (split.finish() if final else [])
            return [{"reasoning_content" if kind == REASONING else "content": t} for kind, t in parts if t]

        async def sse():
            finished = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    ev = await next_event(False)
                    lp = None
                    piece = ""
                    if ev.token_id is not None:
                        piece = text.add(ev.token_id, ev.finish_reason is not None)
                        if n_top is not None:
                            lp = {"content": [_logprob_entry(processor, ev, n_top)]}
                    out = deltas(piece, final=ev.finish_reason is not None or text.stopped)
                    if lp and not out:
                        out = [{"content": ""}]
                    for k, d in enumerate(out):
                        yield chunk(d, None, lp if k == 0 else None)
                    if text.stopped and ev.finish_reason is None:
                        req.cancel()
                        while (await next_event(False)).finish_reason is None:
                            pass
                        reason = "stop"
                    elif ev.finish_reason is not None:
                        reason = reason_of(ev)
                    else:
                        continue
                    break
                usage, timings = finish_fields(reason)
                finished = True
                yield chunk({}, reason)
                if extra["include_usage"]:
                    yield format_sse_event(data_str=json.dumps(
                        {"id": cid, "object": "chat.completion.chunk", "created": created, "model": ctx.model_id,
                         "choices": [], "usage": usage, "timings": timings}))
                yield format_sse_event(data_str="[DONE]")
            except EngineStopped:
                yield format_sse_event(data_str=json.dumps(_err_body(503, "the server is shutting down")))
            except PykimiError as e:
                count_error(400)
                yield format_sse_event(data_str=json.dumps(_err_body(400, str(e).splitlines()[0], None,
                                                                     "invalid_request")))
            finally:
                if not finished and not req.done:          # the client went away mid-stream: free the sequence
                    req.cancel()
                    ctx.counts["disconnects"] += 1
                    log.info("%s client disconnected mid-stream", cid)

        return EventSourceResponse(sse(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(rest: str, request: Request):
        allowed = {"chat/completions": "POST", "models": "GET"}.get(rest.rstrip("/"))
        if allowed:
            raise APIError(405, f"{request.method} is not allowed on /v1/{rest} (use {allowed})", None,
                           "method_not_allowed", "invalid_request_error", headers={"Allow": allowed})
        raise APIError(404, f"/v1/{rest}: no such endpoint", None, "not_found")

    # the web page (another helper's static/ and inspector.py), when present
    import importlib
    import importlib.util
    if importlib.util.find_spec(f"{__package__}.inspector") is not None:
        importlib.import_module(f"{__package__}.inspector").register(app, ctx)
    static = os.path.join(os.path.dirname(__file__), "static")
    if os.path.isdir(static):
        from fastapi.staticfiles import StaticFiles
        app.mount("/", StaticFiles(directory=static, html=True), name="static")
    return app
