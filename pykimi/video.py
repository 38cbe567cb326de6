"""Video as frames: Kimi-VL has no video input of its own, so a clip is sent as a few of its frames, as images,
each with its timestamp written in the text before it.

There is no official Kimi-VL video template. The choice made here, and why:

* **Uniform sampling at segment centres.** The clip's duration is cut into N equal segments and the frame shown
  at the centre of each is taken (``t_i = (i + 1/2) * duration / N``): the frames cover the whole clip evenly,
  the first and last are not the often-black fade in / out frames. ``--fps F`` asks for ``N = round(duration *
  F)`` frames (at least one) the same way.
* **Timestamps in the text.** Each frame is preceded by ``"<t=1.5s>"`` and the images follow one another in
  order, after a line saying how many frames of how long a clip are shown; the model reads order and time from
  the text, since its image encoder has no notion of time.
* **The token budget is shared out.** Every frame gets the same image budget, chosen so that the whole prompt
  (text + all frames' image tokens) plus the answer's ``max_new_tokens`` fit the context (``--max-context``,
  else the model's). The budget per frame is applied as the image processor's own ``in_token_limit`` (patches,
  4 patches a token after the 2x2 merge), never above the checkpoint's: frames are resized exactly like images.
  When not even one image token per frame fits, the error says so.

Decoding uses PyAV (``pip install 'pykimi[video]'``), which reads any container / codec FFmpeg does. Every
problem -- PyAV missing, no such file, not a video, no video stream, zero frames, a codec that fails -- is a
one-line :class:`~pykimi.errors.InputError`.

For the server: :func:`load_video` takes a path, raw bytes or a ``data:video/...;base64,...`` URI (llama-server's
convention for a ``video_url`` part: base64 only), and :func:`video_inputs` turns messages + a video into model
inputs within a context budget.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import os
from dataclasses import dataclass, field

from .errors import InputError

DEFAULT_FRAMES = 8


@dataclass
class Video:
    """Sampled frames (PIL RGB images) with their times in seconds, and how they were chosen."""
    frames: list
    timestamps: list
    duration: float
    source: str
    width: int = 0
    height: int = 0
    sampling: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)


def _need_av():
    try:
        import av
    except ImportError:
        raise InputError("reading a video needs PyAV: pip install 'pykimi[video]' (or pip install av)") from None
    return av


def _open_source(source):
    """(file-like or path, name for messages) from a path, bytes, or a data URI."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(bytes(source)), "<video bytes>"
    if isinstance(source, io.IOBase):
        return source, "<video stream>"
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"video: expected a path, bytes or a data URI, got {type(source).__name__}")
    s = os.fspath(source)
    if s.startswith("data:"):
        head, sep, payload = s.partition(",")
        if not sep or ";base64" not in head:
            raise InputError("video data URI: expected 'data:video/...;base64,<data>' (base64 only)")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("video data URI: the payload is not valid base64") from None
        if not raw:
            raise InputError("video data URI: empty payload")
        return io.BytesIO(raw), "<video data URI>"
    if not os.path.exists(s):
        raise InputError(f"{s}: no such video file")
    if os.path.isdir(s):
        raise InputError(f"{s}: is a directory, expected a video file")
    return s, s


def sample_times(duration: float, frames: int | None = None, fps: float | None = None) -> list[float]:
    """The centres of N equal segments of [0, duration): N = frames, or round(duration * fps) (at least 1)."""
    if frames is not None and fps is not None:
        raise InputError("video: give the number of frames or a sampling rate (fps), not both")
    if fps is not None:
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise InputError(f"video fps={fps!r}: expected a number > 0")
        frames = max(1, int(round(duration * fps)))
    if frames is None:
        frames = DEFAULT_FRAMES
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise InputError(f"video frames={frames!r}: expected an integer >= 1")
    return [(i + 0.5) * duration / frames for i in range(frames)]


def load_video(source, frames: int | None = None, fps: float | None = None) -> Video:
    """Decode a video and sample frames uniformly (see the module docstring). ``source``: a path, bytes, a
    file-like object or a ``data:video/...;base64,`` URI. At most as many frames as the clip holds are returned
    (a 3-frame clip asked for 8 gives its 3 frames)."""
    av = _need_av()
    src, name = _open_source(source)
    try:
        container = av.open(src)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"{name}: not a readable video ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    try:
        if not container.streams.video:
            raise InputError(f"{name}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        times, images = [], []
        try:
            for frame in container.decode(stream):       # decode once; keep the frames' times and pictures
                t = frame.time
                if t is None:
                    t = len(times) / float(stream.average_rate or 1)
                times.append(float(t))
                images.append(frame)
                if len(images) > 20000:
                    raise InputError(f"{name}: over 20000 frames; cut the clip first")
        except av.error.FFmpegError as e:
            if not images:
                raise InputError(f"{name}: no frame could be decoded ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:120]})") from None
        if not images:
            raise InputError(f"{name}: the video stream has zero frames")
        dur = None
        if stream.duration is not None and stream.time_base is not None:
            dur = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            dur = container.duration / 1e6
        step = (times[-1] - times[0]) / max(1, len(times) - 1) if len(times) > 1 else (
            1.0 / float(stream.average_rate) if stream.average_rate else 1.0)
        if not dur or dur <= 0:
            dur = times[-1] - times[0] + step
        t0 = times[0]
        want = sample_times(dur, frames, fps)
        picked = []
        for w in want:                                    # the frame on screen at time w
            j = max((i for i, t in enumerate(times) if t - t0 <= w + 1e-9), default=0)
            if not picked or picked[-1] != j:
                picked.append(j)
        pics = []
        for j in picked:
            try:
                pics.append(images[j].to_image().convert("RGB"))
            except Exception as e:                        # a frame PyAV cannot convert
                raise InputError(f"{name}: frame {j} cannot be converted to RGB ({e})") from None
        return Video(frames=pics, timestamps=[times[j] - t0 for j in picked], duration=dur, source=name,
                     width=pics[0].width, height=pics[0].height,
                     sampling={"asked": {"frames": frames, "fps": fps}, "requested_times": want,
                               "frames_in_clip": len(times), "rule": "segment centres"})
    finally:
        container.close()


def video_parts(video: Video) -> list[dict]:
    """Message content parts for a video: one line on what is shown, then '<t=Ts>' + the frame, per frame."""
    parts = [{"type": "text", "text": f"Video of {video.duration:.1f} s, {len(video)} frames sampled uniformly:"}]
    for t, img in zip(video.timestamps, video.frames):
        parts.append({"type": "text", "text": f"<t={t:.1f}s>"})
        parts.append({"type": "image", "image": img})
    return parts


@dataclass
class VideoFit:
    """How a video was fitted into the context: tokens per frame, the in_token_limit (patches) applied per frame,
    text tokens, the total prompt and the budget it had to fit."""
    frames: int
    tokens_per_frame: int
    frame_patch_limit: int
    text_tokens: int
    prompt_tokens: int
    budget: int
    grid: tuple


def fit_video(processor, messages, video: Video, max_context: int, max_new_tokens: int = 0,
              where: int | None = None):
    """Messages + a video -> (messages with the video's parts, VideoFit). The parts go at the start of the last
    user message (or of message ``where``); every frame gets the same image budget, the largest that keeps
    prompt + max_new_tokens <= max_context, and the frames in the returned parts are already resized to it
    (with the image processor's own rule), so ``processor.prepare(messages)`` gives exactly the fitted prompt
    -- now and when the same messages come back as chat history."""
    from PIL import Image

    from .image import num_image_tokens, resized_size

    if processor.tokenizer.media_pad_id is None:
        raise InputError("this checkpoint has no vision tower / media tokens: it cannot take a video")
    msgs = [dict(m) for m in messages]
    idx = where if where is not None else max((i for i, m in enumerate(msgs) if m.get("role") == "user"),
                                              default=None)
    if idx is None:
        raise InputError("video: the messages have no user message to attach the video to")
    c = msgs[idx]["content"]
    rest = [{"type": "text", "text": c}] if isinstance(c, str) else list(c)
    n = len(video)
    pad = processor.tokenizer.media_pad_id
    msgs[idx]["content"] = video_parts(video) + rest
    text_ids = processor.tokenizer.encode(processor.apply_chat_template(msgs), allow_special=True)
    n_pads = sum(1 for t in text_ids if t == pad)
    text_tokens = len(text_ids) - n_pads                          # without the placeholders
    budget = int(max_context) - int(max_new_tokens) - text_tokens
    # other images in the conversation (inline, e.g. earlier chat turns) keep their own size and count first
    from .image import load_image
    mine = {id(f) for f in video.frames}
    for m in msgs:
        for part in (m["content"] if not isinstance(m["content"], str) else []):
            if isinstance(part, dict) and part.get("type") == "image" and id(part.get("image")) not in mine:
                if part.get("image") is None:
                    raise InputError("video: other images in the messages must be inline ({'type': 'image', "
                                     "'image': ...}) so their tokens can be counted")
                budget -= num_image_tokens(*load_image(part["image"]).size, processor.image_settings)
    base = processor.image_settings
    mh, mw = base.merge_kernel_size
    per_frame = budget // n
    if per_frame < 1:
        raise InputError(f"video: {n} frames need at least {n} image tokens but only {max(budget, 0)} of the "
                         f"context of {max_context} are left after {text_tokens} text tokens and max_new_tokens="
                         f"{max_new_tokens}; use fewer frames or a larger --max-context")
    w, h = video.width, video.height
    limit = min(base.in_token_limit, per_frame * mh * mw)
    while True:
        settings = dataclasses.replace(base, in_token_limit=limit)
        tok = num_image_tokens(w, h, settings)
        nw, nh = resized_size(w, h, settings)
        if tok <= per_frame and nw > 0 and nh > 0:
            break
        if limit <= 1:
            raise InputError(f"video: frames of {w}x{h} cannot be made small enough for {per_frame} image "
                             f"token(s) each; use fewer frames or a larger --max-context")
        limit = max(1, int(limit * 0.9))                       # padding to the merge grid can add a row
    frames = video.frames if (nw, nh) == (w, h) else [
        f.resize((nw, nh), Image.Resampling.BICUBIC) for f in video.frames]   # the processor's own resize (§5.1)
    fitted = dataclasses.replace(video, frames=frames, width=nw, height=nh)
    msgs[idx]["content"] = video_parts(fitted) + rest
    fit = VideoFit(frames=n, tokens_per_frame=tok, frame_patch_limit=limit, text_tokens=text_tokens,
                   prompt_tokens=text_tokens + n * tok, budget=int(max_context) - int(max_new_tokens),
                   grid=(nh, nw))
    return msgs, fit


def video_inputs(processor, messages, video: Video, max_context: int, max_new_tokens: int = 0,
                 where: int | None = None):
    """Messages + a video -> (model inputs, VideoFit): :func:`fit_video` then ``processor.prepare``."""
    msgs, fit = fit_video(processor, messages, video, max_context, max_new_tokens, where)
    inputs = processor.prepare(msgs)
    fit.prompt_tokens = int(len(inputs["input_ids"]))
    return inputs, fit


def write_video(path: str, images, fps: float = 4, codec: str = "mpeg4") -> None:
    """Write PIL images (one size) as a video file at ``fps`` frames per second (tests, tutorials). Needs PyAV."""
    av = _need_av()
    import numpy as np
    from fractions import Fraction

    images = list(images)
    if not images:
        raise InputError("write_video: no images")
    w, h = images[0].size
    with av.open(path, "w") as out:
        st = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        st.width, st.height = w - w % 2, h - h % 2                       # yuv420p needs even sides
        st.pix_fmt = "yuv420p"
        for img in images:
            a = np.asarray(img.convert("RGB"))[:st.height, :st.width]
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


def write_test_video(path: str, frames: int = 12, fps: int = 4, size=(96, 64), codec: str = "mpeg4") -> list:
    """Write a small synthetic clip (frame i is a flat colour that changes with i, plus a white bar whose
    position encodes i) and return the frames' RGB colours; for tests and tutorials. Needs PyAV."""
    import numpy as np
    from PIL import Image

    colours, images = [], []
    for i in range(frames):
        c = ((37 * i) % 256, (255 - 20 * i) % 256, (90 + 50 * i) % 256)
        colours.append(c)
        a = np.empty((size[1], size[0], 3), dtype=np.uint8)
        a[:] = c
        x = int(i * (size[0] - 8) / max(1, frames - 1))
        a[:, x:x + 8] = 255
        images.append(Image.fromarray(a))
    write_video(path, images, fps, codec)
    return colours
