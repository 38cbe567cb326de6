"""pykimi batch: input reading, the exactly-once results file, the command on the demo checkpoint, and real
``kill -9`` / Ctrl-C of a running job (issue 23)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cli_helpers import sigint_as_a_terminal_leaves_it
from conftest import ROOT

N_IMAGES = 10
GEN = ["-n", "600", "--ignore-eos"]   # ~0.12 s a row on the demo (Zen 5; 100 tokens took 0.02 s once OpenBLAS stopped
#                                        spinning): long enough to kill or Ctrl-C a job mid-way


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pykimi.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def popen(*args):
    """The job as a terminal starts it: SIGINT at its default even when this test run was started in the
    background (which hands children SIGINT ignored, kept ignored by pykimi batch on purpose)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "pykimi.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=sigint_as_a_terminal_leaves_it)


def read_rows(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def strip_seconds(rows):
    return {r["id"]: {k: v for k, v in r.items() if k != "seconds"} for r in rows}


def n_lines(path):
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Ten demo scenes in a folder tree (two levels), so ids are relative paths with a slash."""
    from pykimi.scenes import random_scene

    root = tmp_path_factory.mktemp("batch") / "imgs"
    rng = np.random.default_rng(23)
    for i in range(N_IMAGES):
        d = root / ("b" if i % 3 == 0 else "a") / ("deep" if i % 4 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        random_scene(rng)[0].save(d / f"scene_{i:02d}.png")
    return str(root)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """One uninterrupted run: the rows every other run must reproduce."""
    out = str(tmp_path_factory.mktemp("ref") / "out.jsonl")
    r = cli("batch", images, "-o", out, *GEN, "-q")
    assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    assert len(rows) == N_IMAGES and all("text" in row for row in rows), rows
    return strip_seconds(rows)


# --------------------------------------------------------------------------------------------- input

def test_folder_is_recursive_sorted_with_relative_ids(images):
    from pykimi.batch import read_jobs

    jobs = read_jobs(images, prompt="How many shapes are there?")
    ids = [j.id for j in jobs]
    assert ids == sorted(ids) and len(ids) == N_IMAGES
    assert any("/" in i for i in ids) and any(i.count("/") == 2 for i in ids)   # a/deep/scene_04.png
    assert all(os.path.isfile(j.path) and j.prompt == "How many shapes are there?" for j in jobs)


def test_jsonl_rows_and_relative_images(tmp_path, images):
    from pykimi.batch import DEFAULT_PROMPT, read_jobs

    rel = os.path.relpath(os.path.join(images, "a", "scene_01.png"), tmp_path)
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"id": 7, "image": rel}) + "\n\n" +
                 json.dumps({"id": "x", "image": rel, "prompt": "What color is the circle?"}) + "\n")
    jobs = read_jobs(str(f))
    assert [(j.id, j.prompt) for j in jobs] == [("7", DEFAULT_PROMPT), ("x", "What color is the circle?")]
    assert jobs[0].image == rel and os.path.isfile(jobs[0].path)


@pytest.mark.parametrize("text,msg", [
    ("{not json\n", "in.jsonl:1: not JSON"),
    ('[1, 2]\n', "expected a JSON object"),
    ('{"image": "a.png"}\n', '"id" must be'),
    ('{"id": "a", "image": 3}\n', '"image" must be a path'),
    ('{"id": "a", "image": "a.png", "prompt": 5}\n', '"prompt" must be a string'),
    ('{"id": "a", "image": "a.png"}\n{"id": "a", "image": "b.png"}\n', "in.jsonl:2: id 'a' already used on line 1"),
    ('{"id": "v", "video": "a.mp4", "image": "x.png"}\n', 'a row has "image" or "video", not both'),
    ("\n\n", "no rows"),
])
def test_bad_jsonl_input_is_one_line_exit_2_and_out_untouched(tmp_path, text, msg):
    f = tmp_path / "in.jsonl"
    f.write_text(text)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "kept", "error": "x"}\n')
    r = cli("batch", str(f), "-o", str(out))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykimi: error:") and msg in lines[0], r.stderr
    assert out.read_text() == '{"id": "kept", "error": "x"}\n'


@pytest.mark.parametrize("case,msg", [
    ("missing", "no such file or folder"),
    ("empty_dir", "no image files"),
    ("out_dir_missing", "does not exist"),
    ("parallel0", "--parallel 0"),
])
def test_bad_arguments(tmp_path, images, case, msg):
    src, out, extra = images, str(tmp_path / "out.jsonl"), []
    if case == "missing":
        src = str(tmp_path / "nope")
    elif case == "empty_dir":
        src = str(tmp_path / "empty")
        os.mkdir(src)
    elif case == "out_dir_missing":
        out = str(tmp_path / "no" / "out.jsonl")
    else:
        extra = ["--parallel", "0"]
    r = cli("batch", src, "-o", out, *extra)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# --------------------------------------------------------------------------------------------- results file

def test_results_file_cuts_a_torn_last_line_only(tmp_path):
    from pykimi.batch import ResultsFile

    p = tmp_path / "out.jsonl"
    good = '{"id": "a", "text": "x"}\n{"id": "b", "error": "bad image"}\n'
    p.write_bytes(good.encode() + b'{"id": "c", "te')
    with ResultsFile(str(p)) as out:
        assert out.done == {"a", "b"} and out.repaired_bytes == len(b'{"id": "c", "te')
        out.write({"id": "c", "text": "é"})
    assert p.read_text(encoding="utf-8") == good + '{"id": "c", "text": "é"}\n'


def test_results_file_refuses_a_foreign_file_without_touching_it(tmp_path):
    from pykimi.batch import ResultsFile
    from pykimi.errors import InputError

    p = tmp_path / "notes.txt"
    p.write_text('{"id": "a"}\nhello world\n{"id": "b"}\npartial')
    before = p.read_bytes()
    with pytest.raises(InputError, match=r"notes.txt:2: not a pykimi batch row"):
        ResultsFile(str(p))
    assert p.read_bytes() == before


def test_results_file_is_locked_against_a_second_writer(tmp_path):
    from pykimi.batch import ResultsFile
    from pykimi.errors import InputError

    p = str(tmp_path / "out.jsonl")
    with ResultsFile(p):
        with pytest.raises(InputError, match="another pykimi batch job is writing this file"):
            ResultsFile(p)
    ResultsFile(p).close()                   # released on close


# --------------------------------------------------------------------------------------------- the command

def test_batch_rows_equal_pykimi_run(images, reference):
    """Every row is what `pykimi run` answers for that image and prompt (two through the command itself, all
    through the same chat and generate calls in-process)."""
    import pykimi
    from pykimi.batch import messages

    d = pykimi.demo_checkpoint()
    model, proc = pykimi.load(d), pykimi.Processor.from_pretrained(d)
    for rid, row in reference.items():
        assert set(row) == {"id", "image", "prompt", "text", "prompt_tokens", "completion_tokens"}
        assert row["image"] == os.path.join(images, rid) and row["prompt"] == "Describe the image."
        inputs = proc.prepare(messages(None, row["prompt"]), images=[row["image"]])
        ids = model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"],
                             max_new_tokens=int(GEN[1]), stop_ids=[])
        assert (row["text"], row["completion_tokens"], row["prompt_tokens"]) == \
            (proc.decode(ids, skip_special=True), len(ids), len(inputs["input_ids"])), rid
    for rid in sorted(reference)[:2]:
        row = reference[rid]
        r = cli("run", "--image", row["image"], "-p", row["prompt"], *GEN, "--json")
        assert r.returncode == 0, r.stderr
        run = json.loads(r.stdout)
        assert (run["text"], len(run["ids"]), run["stats"]["prompt_tokens"]) == \
            (row["text"], row["completion_tokens"], row["prompt_tokens"]), rid


def test_failing_rows_are_written_and_the_job_goes_on(tmp_path, images):
    good = os.path.join(images, "a", "scene_01.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    f = tmp_path / "in.jsonl"
    rows = [{"id": "ok", "image": good, "prompt": "How many shapes are there?"},
            {"id": "unreadable", "image": str(bad)},
            {"id": "missing", "image": str(tmp_path / "nope.png")},
            {"id": "too_long", "image": good, "prompt": "describe " * 400},
            {"id": "ok2", "image": good}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out.jsonl")
    r = cli("batch", str(f), "-o", out, "--max-context", "300", "-n", "8")
    assert r.returncode == 0, r.stderr
    got = {row["id"]: row for row in read_rows(out)}
    assert list(got) == [r["id"] for r in rows]                      # input order, one process
    assert "text" in got["ok"] and "text" in got["ok2"] and got["ok"]["prompt"] == "How many shapes are there?"
    for rid, msg in (("unreadable", "broken.png"), ("missing", "nope.png"), ("too_long", "context")):
        assert set(got[rid]) == {"id", "error"} and msg in got[rid]["error"], got[rid]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("2 done, 0 skipped as already done, 3 failed, ") and "images/s" in last, r.stdout
    assert "img/s" in r.stderr or "s/img" in r.stderr                 # the tqdm bar (rate, ETA) on stderr
    r = cli("batch", str(f), "-o", out, "--max-context", "300", "-n", "8")    # nothing left to do
    assert r.returncode == 0 and r.stdout.strip().startswith("0 done, 5 skipped as already done, 0 failed")


def test_fail_fast_stops_at_the_first_failure_without_writing_it(tmp_path, images):
    good = os.path.join(images, "a", "scene_01.png")
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "1", "image": good}, {"id": "2", "image": str(tmp_path / "nope.png")}, {"id": "3", "image": good}]))
    out = tmp_path / "out.jsonl"
    r = cli("batch", str(f), "-o", str(out), "-n", "8", "--fail-fast", "-q")
    assert r.returncode == 2 and "2: " in r.stderr and "--fail-fast" in r.stderr, r.stderr
    assert [row["id"] for row in read_rows(out)] == ["1"]          # a rerun retries row 2


def test_kill_9_three_times_then_resume_gives_every_row_once(tmp_path, images, reference):
    """Real SIGKILLs of a running job at three moments (while loading, after ~3 rows, after ~6 rows), then a
    torn last line as a power loss would leave it; each restart resumes. OUT ends with every id exactly once,
    rows identical to the uninterrupted run."""
    out = str(tmp_path / "out.jsonl")
    args = ("batch", images, "-o", out, *GEN, "-q")
    killed_at = []
    for target in (0, 3, 6):
        before = n_lines(out)
        p = popen(*args)
        t0 = time.time()
        try:
            if target == 0:
                time.sleep(0.3)                                     # inside imports / model loading
            else:
                while n_lines(out) < target and time.time() - t0 < 180 and p.poll() is None:
                    time.sleep(0.01)                                # then kill at once: inside the next row
            assert p.poll() is None, f"the job ended before the kill: {p.communicate()[1]}"
            p.send_signal(signal.SIGKILL)
        finally:
            p.wait(timeout=60)
            p.stdout.close()
            p.stderr.close()
        assert p.returncode == -signal.SIGKILL
        killed_at.append(n_lines(out))
        assert n_lines(out) >= before
        if target == 6:                                             # a torn half row, as a power loss leaves it
            ref_line = json.dumps(reference[sorted(reference)[-1]])
            with open(out, "a") as fh:
                fh.write(ref_line[: len(ref_line) // 2])
    assert killed_at[0] == 0 and 0 < killed_at[1] < N_IMAGES and killed_at[1] <= killed_at[2] < N_IMAGES, killed_at
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "cut a torn last line" in r.stdout or "cut a torn last line" in r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{N_IMAGES - killed_at[2]} done, {killed_at[2]} skipped as already done, 0 failed")
    rows = read_rows(out)
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == N_IMAGES, ids
    assert strip_seconds(rows) == reference


def test_ctrl_c_finishes_the_row_in_flight_then_resume(tmp_path, images, reference):
    out = str(tmp_path / "out.jsonl")
    args = ("batch", images, "-o", out, *GEN, "-q")
    p = popen(*args)
    t0 = time.time()
    try:
        while n_lines(out) < 2 and time.time() - t0 < 180 and p.poll() is None:
            time.sleep(0.02)
        time.sleep(0.2)
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "stopping after the rows in flight" in err
    with open(out, "rb") as fh:
        data = fh.read()
    assert data.endswith(b"\n")
    rows = read_rows(out)
    assert 2 < len(rows) < N_IMAGES                                   # the row in flight was finished, no more
    assert all(strip_seconds([row])[row["id"]] == reference[row["id"]] for row in rows)
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert strip_seconds(read_rows(out)) == reference and len(read_rows(out)) == N_IMAGES


# --------------------------------------------------------------------------------------------- engine runner

def test_parallel_1_and_4_give_identical_rows(tmp_path, images, reference):
    out = str(tmp_path / "p4.jsonl")
    r = cli("batch", images, "-o", out, *GEN, "--parallel", "4", "-q")
    assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    assert len(rows) == N_IMAGES and strip_seconds(rows) == reference


def test_a_thinking_answer_puts_its_reasoning_apart(images):
    """A row whose text starts with the thinking markers keeps the answer in "text" and the thinking in
    "reasoning"."""
    from pykimi.batch import Job, result_row

    class Proc:
        def decode(self, ids, skip_special=True):
            return "◁think▷ two shapes, both red ◁/think▷ Two red shapes."

    row = result_row(Job("a", "a.png", "q", "a.png"), Proc(), [1, 2, 3], 10, 0.5)
    assert list(row) == ["id", "image", "prompt", "text", "reasoning", "prompt_tokens", "completion_tokens",
                         "seconds"]
    assert row["text"] == "Two red shapes." and row["reasoning"] == "two shapes, both red"


def test_ray_missing_is_a_clear_error(monkeypatch, images):
    """--ray without Ray installed: one line naming the extra (Ray is hidden from the import here)."""
    from pykimi.batch import Settings, read_jobs, run_ray
    from pykimi.errors import InputError

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(InputError, match=r"--ray needs Ray Data.*pip install 'pykimi\[ray\]'"):
        next(run_ray(read_jobs(images), "unused", Settings(), {}))


def test_video_rows_equal_pykimi_run_video(tmp_path, images):
    """A JSONL row with "video": frames with timestamps fitted to the context as `pykimi run --video` does; the
    row is {"id", "video", "prompt", "text", ...} and equals run's answer. A broken video is an error row."""
    pytest.importorskip("av", reason="video rows need PyAV (the 'video' extra)")
    from PIL import Image

    from pykimi.video import write_video

    frames = [Image.open(os.path.join(images, "a", f"scene_{i:02d}.png")).convert("RGB").resize((112, 112))
              for i in (1, 2)]
    clip = str(tmp_path / "clip.mp4")
    write_video(clip, [f for f in frames for _ in range(4)], fps=4)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"id": "v", "video": "clip.mp4"}) + "\n"
                 + json.dumps({"id": "bad", "video": "broken.mp4"}) + "\n"
                 + json.dumps({"id": "i", "image": os.path.join(images, "a", "scene_01.png")}) + "\n")
    out = str(tmp_path / "out.jsonl")
    r = cli("batch", str(f), "-o", out, "-n", "12", "-q")
    assert r.returncode == 0, r.stderr
    got = {row["id"]: row for row in read_rows(out)}
    assert list(got["v"])[:4] == ["id", "video", "prompt", "text"] and got["v"]["prompt"] == "Describe the video."
    assert set(got["bad"]) == {"id", "error"} and "broken.mp4" in got["bad"]["error"], got["bad"]
    assert got["i"]["prompt"] == "Describe the image."
    r = cli("run", "--video", clip, "-n", "12", "--json")
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)
    assert (got["v"]["text"], got["v"]["completion_tokens"], got["v"]["prompt_tokens"]) == \
        (run["answer"], len(run["ids"]), run["stats"]["prompt_tokens"])
