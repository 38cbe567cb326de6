"""Video as frames, on a small clip the test writes itself with PyAV: uniform sampling at segment centres, the
frames' timestamps in the text, the per-frame budget fitted to the context, data URIs, bad videos in one line."""
import base64
import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest

av = pytest.importorskip("av", reason="video support needs PyAV (the optional 'video' extra)")

from cli_helpers import make_tiny_model_dir  # noqa: E402
from conftest import ROOT  # noqa: E402

from pykimi.errors import InputError  # noqa: E402
from pykimi.video import fit_video, load_video, sample_times, video_inputs, write_test_video  # noqa: E402

FPS, N = 4, 12          # a 3-second clip: frame i is shown from i/4 s


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("video") / "clip.mp4")
    colours = write_test_video(p, frames=N, fps=FPS)
    return p, colours


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("vtiny") / "tiny"))


@pytest.fixture(scope="module")
def proc(tiny):
    import pykimi
    return pykimi.Processor.from_pretrained(tiny)


def _close(a, b, tol=14):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))     # mpeg4 is lossy


def test_sample_times_are_segment_centres():
    assert sample_times(3.0, frames=4) == [0.375, 1.125, 1.875, 2.625]
    assert sample_times(3.0, fps=1) == [0.5, 1.5, 2.5]
    assert sample_times(0.2, fps=1) == [0.1]                             # at least one frame
    with pytest.raises(InputError, match="not both"):
        sample_times(3.0, frames=2, fps=1.0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="frames"):
            sample_times(3.0, frames=bad)


def test_load_video_uniform_frames(clip):
    path, colours = clip
    v = load_video(path, frames=4)
    assert v.duration == pytest.approx(N / FPS)
    # the frame on screen at 0.375, 1.125, 1.875, 2.625 s is frame 1, 4, 7, 10
    want = [1, 4, 7, 10]
    assert v.timestamps == pytest.approx([i / FPS for i in want])
    for img, i in zip(v.frames, want):
        assert img.mode == "RGB" and img.size == (96, 64)
        assert _close(img.getpixel((2, 2)), colours[i]), (i, img.getpixel((2, 2)), colours[i])
        x = int(i * (96 - 8) / (N - 1))                                  # the white bar marks the frame
        assert _close(img.getpixel((x + 4, 32)), (255, 255, 255), tol=30)
    v = load_video(path, fps=2.0)
    assert len(v) == 6 and v.sampling["rule"] == "segment centres"
    assert len(load_video(path, frames=50)) == N                        # never more frames than the clip has


def test_data_uri_and_bytes_equal_path(clip):
    path, _ = clip
    raw = open(path, "rb").read()
    a = load_video(path, frames=3)
    b = load_video("data:video/mp4;base64," + base64.b64encode(raw).decode(), frames=3)
    c = load_video(raw, frames=3)
    for x in (b, c):
        assert x.timestamps == a.timestamps
        assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(a.frames, x.frames))


def _wav(p):
    with wave.open(p, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)


def _no_frames(p):
    with av.open(p, "w") as out:
        st = out.add_stream("mpeg4", rate=4)
        st.width, st.height, st.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()                       # a header and a stream, never a frame


@pytest.mark.parametrize("make, match", [
    (lambda p: open(p, "w").write("this is not a video\n" * 20), "not a readable video"),
    (lambda p: open(p, "wb").write(b""), "not a readable video"),
    (_wav, "no video stream"),
    (_no_frames, "zero frames|not a readable video"),
])
def test_bad_video_one_line(tmp_path, make, match):
    p = str(tmp_path / "bad.mkv")
    make(p)
    with pytest.raises(InputError, match=match) as e:
        load_video(p)
    assert "\n" not in str(e.value)


def test_truncated_video_one_line_or_its_frames(tmp_path, clip):
    raw = open(clip[0], "rb").read()
    p = str(tmp_path / "cut.mp4")
    open(p, "wb").write(raw[:len(raw) // 3])       # the index (moov) is at the end: unreadable
    with pytest.raises(InputError) as e:
        load_video(p)
    assert "\n" not in str(e.value) and "cut.mp4" in str(e.value)


@pytest.mark.parametrize("src, match", [
    ("/no/such/clip.mp4", "no such video file"), ("data:video/mp4,abc", "base64 only"),
    ("data:video/mp4;base64,@@@", "not valid base64"), ("data:video/mp4;base64,", "empty payload"),
    (3, "expected a path"),
])
def test_bad_sources(src, match):
    with pytest.raises(InputError, match=match):
        load_video(src)


def test_fit_to_context(clip, proc):
    v = load_video(clip[0], frames=4)
    msgs = [{"role": "user", "content": "What changes?"}]
    inputs, fit = video_inputs(proc, msgs, v, max_context=10_000, max_new_tokens=10)
    assert fit.tokens_per_frame == 12 and fit.grid == (64, 96)          # native size fits: 6 x 8 patches / 4
    text = proc.apply_chat_template(fit_video(proc, msgs, v, 10_000, 10)[0])
    for t in v.timestamps:
        assert f"<t={t:.1f}s>" in text
    assert text.index("<t=0.2s>") < text.index("<t=1.0s>") < text.index("What changes?")
    # a tight context: frames shrink until the whole prompt + the answer fit
    ctx, new = fit.text_tokens + 4 * 5 + 10, 10
    inputs, fit2 = video_inputs(proc, msgs, v, max_context=ctx, max_new_tokens=new)
    assert fit2.tokens_per_frame <= 5 and len(inputs["input_ids"]) + new <= ctx
    assert inputs["image_grid_hws"].shape == (4, 2)
    with pytest.raises(InputError, match="fewer frames or a larger --max-context") as e:
        video_inputs(proc, msgs, v, max_context=fit.text_tokens + 3 + new, max_new_tokens=new)
    assert "\n" not in str(e.value)


def cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pykimi.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def test_cli_run_video(clip, tiny):
    r = cli("run", "-m", tiny, "--video", clip[0], "--frames", "3", "-n", "4", "--json", "--max-context", "400")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    v = j["stats"]["video"]
    assert v["frames"] == 3 and len(v["timestamps"]) == 3 and j["stats"]["images"] == 3
    assert j["stats"]["prompt_tokens"] + 4 <= 400
    r = cli("run", "-m", tiny, "--video", clip[0], "--fps", "1", "-n", "2")
    assert r.returncode == 0, r.stderr
    assert "3 frames at 0.5, 1.5, 2.5 s" in r.stderr


def test_cli_bad_video(tmp_path, tiny, clip):
    p = tmp_path / "x.mp4"
    p.write_text("nope")
    r = cli("run", "-m", tiny, "--video", str(p), "-n", "2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a readable video" in r.stderr
    r = cli("run", "-m", tiny, "--video", clip[0], "--frames", "2", "--fps", "1")
    assert r.returncode == 2 and "not allowed with" in r.stderr
    r = cli("run", "-m", tiny, "--video", clip[0], "--frames", "0")
    assert r.returncode == 2 and "integer >= 1" in r.stderr


def test_chat_video(clip, tiny):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "pykimi.cli", "chat", "-m", tiny, "-n", "3"],
                       input=f"/video {clip[0]} 2\nWhat happens?\nAnd then?\n/video nowhere.mp4\nhi\n",
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "2 frames at" in r.stderr and "no such video file" in r.stderr
    assert r.stderr.count("[") >= 3                                       # timing lines of the three answers
