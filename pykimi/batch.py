"""Batch jobs: one prompt per image over a folder or a JSONL file, each answer written to a JSONL file once.

    jobs = read_jobs("photos/", prompt="Describe the image.")      # [Job(id, image, prompt)], sorted by id
    with ResultsFile("out.jsonl") as out:                          # torn last line repaired, done ids read
        todo = [j for j in jobs if j.id not in out.done]
        for row in SequentialRunner(model, proc, gen).run(todo):   # or EngineRunner(..., parallel=4)
            out.write(row)                                         # one whole line, flushed

Exactly once (issue 23): a row is one ``os.write`` of a whole line on an ``O_APPEND`` descriptor, so a killed
process leaves every finished row in the file (the page cache survives a process kill) and at worst, after a
power loss or a full disk, a partial last line; :class:`ResultsFile` cuts what follows the last newline before it
appends, and a restart skips the ids already in the file. The descriptor is ``flock``-ed, so two jobs never write
one file. ``fsync`` runs at most once per ``fsync_interval`` seconds and at close (a machine crash loses at most
that many seconds of rows, which the next run redoes; a process kill loses nothing written).

Row generators are pluggable: :class:`SequentialRunner` (``model.generate``, one image at a time),
:class:`EngineRunner` (``pykimi.engine``, several sequences per decode step, when it is importable) and
:func:`run_ray` (a Ray Data pipeline, one memory-mapped model per actor). Each yields finished rows in the order
they finish; the writer is the same for all of them.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from .errors import InputError, PykimiError

DEFAULT_PROMPT = "Describe the image."
DEFAULT_VIDEO_PROMPT = "Describe the video."
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


# --------------------------------------------------------------------------------------------- input

@dataclass(frozen=True)
class Job:
    """One input row: ``image`` the media as written in OUT, ``path`` the file opened (``image`` resolved against
    the JSONL file's folder); ``kind`` 'image', or 'video' for a JSONL row with "video" (frames with timestamps,
    fitted to the context as ``pykimi run --video`` does)."""
    id: str
    image: str
    prompt: str
    path: str
    kind: str = "image"


def read_jobs(src: str, prompt: str | None = None) -> list[Job]:
    """A folder of images (recursive, sorted by relative path, which is the id) or a JSONL file of
    ``{"id", "image", "prompt"?}`` rows (``prompt`` defaults to ``prompt``, then "Describe the image.")."""
    if os.path.isdir(src):
        return _folder_jobs(src, prompt if prompt is not None else DEFAULT_PROMPT)
    if os.path.isfile(src):
        return _jsonl_jobs(src, prompt)
    raise InputError(f"{src}: no such file or folder; expected a folder of images or a JSONL file of "
                     f'{{"id", "image", "prompt"?}} rows')


def _folder_jobs(root: str, prompt: str) -> list[Job]:
    rels = []
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                rels.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    if not rels:
        raise InputError(f"{root}: no image files in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
    rels.sort()
    return [Job(r, os.path.join(root, r), prompt, os.path.join(root, r)) for r in rels]


def _jsonl_jobs(path: str, prompt: str | None) -> list[Job]:
    base = os.path.dirname(os.path.abspath(path))
    jobs, seen = [], {}
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with fh:
        try:
            lines = list(fh)
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text; expected a JSONL file or a folder of images") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg}); expected one "
                             f'{{"id", "image", "prompt"?}} object per line') from None
        if not isinstance(row, dict):
            raise InputError(f'{where}: expected a JSON object {{"id", "image", "prompt"?}}, got '
                             f"{type(row).__name__}")
        rid = row.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            raise InputError(f'{where}: "id" must be a non-empty string or an integer, got {rid!r}')
        rid = str(rid)
        kind = "video" if "video" in row else "image"
        if kind == "video" and "image" in row:
            raise InputError(f'{where}: a row has "image" or "video", not both')
        img = row.get(kind)
        if not isinstance(img, str) or not img:
            raise InputError(f'{where}: "{kind}" must be a path string, got {img!r}')
        p = row.get("prompt", prompt if prompt is not None else
                    DEFAULT_VIDEO_PROMPT if kind == "video" else DEFAULT_PROMPT)
        if not isinstance(p, str):
            raise InputError(f'{where}: "prompt" must be a string, got {type(p).__name__}')
        if rid in seen:
            raise InputError(f"{where}: id {rid!r} already used on line {seen[rid]}; ids must be unique")
        seen[rid] = n
        jobs.append(Job(rid, img, p, img if os.path.isabs(img) else os.path.join(base, img), kind))
    if not jobs:
        raise InputError(f"{path}: no rows; expected one {{\"id\", \"image\", \"prompt\"?}} object per line")
    return jobs


# --------------------------------------------------------------------------------------------- output

class ResultsFile:
    """OUT.jsonl opened for appending whole rows, exactly once per id (see the module docstring)."""

    def __init__(self, path: str, fsync_interval: float = 2.0):
        self.path = path
        self.fsync_interval = fsync_interval
        self.done: set[str] = set()
        self.repaired_bytes = 0            # bytes of a torn last line cut on open
        self.written = 0
        self._fd = None
        self._last_sync = time.monotonic()
        self._open()

    def _open(self):
        import fcntl

        d = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(d):
            raise InputError(f"{self.path}: the folder {d} does not exist")
        if os.path.isdir(self.path):
            raise InputError(f"{self.path}: is a folder; expected the output JSONL file")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"{self.path}: cannot open for appending ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"{self.path}: another pykimi batch job is writing this file; wait for it or "
                             f"choose another -o") from None
        try:
            self._read_existing(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _read_existing(self, fd):
        size = os.fstat(fd).st_size
        if size == 0:
            return
        ids = set()
        good = 0                                                 # bytes up to the end of the last whole line
        with open(self.path, "rb") as fh:                        # streamed: a 1 M-row OUT is ~300 MB
            for n, line in enumerate(fh, 1):
                if not line.endswith(b"\n"):
                    break                                        # after the last newline: torn, cut below
                try:
                    row = json.loads(line)
                    rid = row["id"]
                except (ValueError, TypeError, KeyError):
                    # only the last line can be torn; damage elsewhere is not ours to repair
                    raise InputError(f"{self.path}:{n}: not a pykimi batch row (expected a JSON object with an "
                                     f'"id"); is -o pointing at the right file?') from None
                ids.add(str(rid))
                good += len(line)
        if good < size:
            self.repaired_bytes = size - good
            os.ftruncate(fd, good)
            os.fsync(fd)
        self.done = ids

    def write(self, row: dict) -> None:
        """Append one row as one whole line (one write call), flushed to the OS."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:                                                # a regular file takes it whole; loop anyway
            n = os.write(self._fd, view)
            view = view[n:]
        self.done.add(str(row["id"]))
        self.written += 1
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval:
            os.fsync(self._fd)
            self._last_sync = now

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)                               # also releases the lock
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# --------------------------------------------------------------------------------------------- one row

@dataclass(frozen=True)
class Settings:
    """What every row shares: the system prompt and the sampling options of ``model.generate``."""
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: tuple | None = None          # None: the model's defaults; () never stops early
    extra_stop_ids: tuple = ()             # generation_config.json's eos ids, beside the model's defaults

    def stops(self, model) -> list | None:
        if self.stop_ids is not None:
            return list(self.stop_ids)
        if self.extra_stop_ids:
            return list(dict.fromkeys(list(model.stop_ids) + list(self.extra_stop_ids)))
        return None

    def gen_kwargs(self, model=None) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                  top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty, seed=self.seed)
        stops = self.stops(model) if model is not None else (list(self.stop_ids) if self.stop_ids is not None
                                                             else None)
        if stops is not None:
            kw["stop_ids"] = stops
        return kw


def messages(system: str | None, prompt: str) -> list:
    """The chat of one row: as ``pykimi run --image X -p PROMPT [--system S]`` builds it."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
    return msgs


def prepare(job: Job, proc, settings: Settings, context_limit: int | None = None) -> dict:
    """Open the image (or the video's frames) and build the model inputs (raises PykimiError on a bad image,
    video or prompt). A video is fitted into ``context_limit`` with room for the answer, as by ``pykimi run``."""
    if job.kind == "video":
        from .video import fit_video, load_video

        msgs = [{"role": "system", "content": settings.system}] if settings.system else []
        msgs.append({"role": "user", "content": job.prompt})
        msgs, _ = fit_video(proc, msgs, load_video(job.path), context_limit, settings.max_new_tokens)
        return proc.prepare(msgs)
    from .image import load_image

    img = load_image(job.path, name=job.image)
    return proc.prepare(messages(settings.system, job.prompt), images=[img])


def result_row(job: Job, proc, ids, prompt_tokens: int, seconds: float) -> dict:
    """The OUT row of an answer; a thinking model's ``◁think▷ ... ◁/think▷`` part goes to "reasoning" (when
    this pykimi has pykimi.reasoning), the answer after it to "text"."""
    ids = [int(t) for t in ids]
    text = proc.decode(ids, skip_special=True)
    row = {"id": job.id, job.kind: job.image, "prompt": job.prompt, "text": text}
    from .reasoning import split_reasoning

    split = getattr(proc, "split_reasoning", split_reasoning)         # the checkpoint's own markers if it has them
    reasoning, answer = split(text)
    if reasoning is not None:
        row["text"], row["reasoning"] = answer, reasoning
    row.update(prompt_tokens=int(prompt_tokens), completion_tokens=len(ids), seconds=round(seconds, 3))
    return row


def error_row(job: Job, e: BaseException) -> dict:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not isinstance(e, PykimiError):
        msg = f"{type(e).__name__}: {msg}"
    return {"id": job.id, "error": msg}


def run_one(model, proc, job: Job, settings: Settings) -> dict:
    """One row with ``model.generate``: the answer row, or an error row when the input is unusable."""
    t0 = time.perf_counter()
    try:
        inputs = prepare(job, proc, settings, model.context_limit)
        ids = model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"],
                             **settings.gen_kwargs(model))
    except PykimiError as e:
        return error_row(job, e)
    return result_row(job, proc, ids, len(inputs["input_ids"]), time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------- runners

class SequentialRunner:
    """One image at a time through ``model.generate`` (the reference the other runners are held to)."""
    parallel = 1

    def __init__(self, model, proc, settings: Settings):
        self.model, self.proc, self.settings = model, proc, settings

    def run(self, jobs: Iterable[Job], stop: threading.Event | None = None) -> Iterator[dict]:
        for job in jobs:
            if stop is not None and stop.is_set():
                return
            yield run_one(self.model, self.proc, job, self.settings)


class EngineRunner:
    """Up to ``parallel`` images decoded together by ``pykimi.engine.Engine`` (one weight read per step for all
    of them). Images are opened and preprocessed on the caller's thread while the engine decodes; finished rows
    come out in the order they finish."""

    def __init__(self, model, proc, settings: Settings, parallel: int = 4, engine=None):
        self.model, self.proc, self.settings, self.parallel = model, proc, settings, int(parallel)
        self._engine = engine

    def _params(self):
        from .engine import SamplingParams

        s = self.settings
        stops = s.stops(self.model)                       # [] never stops early (--ignore-eos)
        stops = tuple(stops) if stops is not None else tuple(self.model.stop_ids)
        return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k, min_p=s.min_p, seed=s.seed, stop_ids=stops,
                              repetition_penalty=s.repetition_penalty)

    def run(self, jobs: Iterable[Job], stop: threading.Event | None = None) -> Iterator[dict]:
        eng = self._engine
        own = eng is None
        if own:
            from .engine import Engine

            import inspect

            # every row is a new conversation: keeping finished caches for a continuation would only hold memory
            extra = {"prefix_cache": False} if "prefix_cache" in inspect.signature(Engine).parameters else {}
            eng = Engine(self.model, parallel=self.parallel, max_context=getattr(self.model, "max_context", None),
                         **extra)
        eng.start()
        params = self._params()
        done: queue.Queue = queue.Queue()
        in_flight = 0

        def wait(job, req, n_prompt, t0):       # one short-lived thread per request: rows leave as they finish
            try:
                res = req.result()
                done.put(result_row(job, self.proc, res.ids, n_prompt, time.perf_counter() - t0))
            except PykimiError as e:
                done.put(error_row(job, e))
            except BaseException as e:          # noqa: BLE001 -- handed to the caller's thread
                done.put(e)

        it = iter(jobs)
        exhausted = False
        try:
            while True:
                # keep `parallel` requests in the engine (and one more prepared, so a slot never waits on PIL)
                while not exhausted and in_flight < self.parallel + 1 and not (stop is not None and stop.is_set()):
                    job = next(it, None)
                    if job is None:
                        exhausted = True
                        break
                    t0 = time.perf_counter()
                    try:
                        inputs = prepare(job, self.proc, self.settings, eng.max_context
                                         if getattr(eng, "max_context", None) else self.model.context_limit)
                        req = eng.submit(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                         image_grid_hws=inputs["image_grid_hws"], params=params)
                    except PykimiError as e:
                        yield error_row(job, e)
                        continue
                    in_flight += 1
                    threading.Thread(target=wait, args=(job, req, len(inputs["input_ids"]), t0),
                                     daemon=True).start()
                if in_flight == 0:
                    return
                item = done.get()
                in_flight -= 1
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if own:
                eng.stop()


def make_runner(model, proc, settings: Settings, parallel: int = 1):
    """--parallel 1: model.generate; more: the batched engine."""
    if parallel < 1:
        raise InputError(f"--parallel {parallel}: expected an integer >= 1")
    if parallel == 1:
        return SequentialRunner(model, proc, settings)
    return EngineRunner(model, proc, settings, parallel)


# --------------------------------------------------------------------------------------------- the job

@dataclass
class Summary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    repaired_bytes: int = 0
    interrupted: bool = False
    actors: dict | None = None             # Ray: pid -> the largest RssAnon (MB) an actor reported

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self, out: str) -> str:
        s = (f"{self.done} done, {self.skipped} skipped as already done, {self.failed} failed, "
             f"{self.images_per_s:.2f} images/s ({self.seconds:.1f} s) -> {out}")
        if self.repaired_bytes:
            s += f" (cut a torn last line of {self.repaired_bytes} bytes)"
        if self.interrupted:
            s += "; interrupted: run the same command again to resume"
        return s


class FailFast(PykimiError):
    """--fail-fast: a row failed; its error is the message (the row is not written, so a rerun retries it)."""


def drive(rows: Iterator[dict], out: ResultsFile, summary: Summary, total: int, fail_fast: bool = False,
          show_progress: bool = True, on_stop=None) -> Summary:
    """Write rows as they come, with a progress bar; counts into ``summary``."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="batch", dynamic_ncols=True, disable=not show_progress,
               smoothing=0.1)
    t0 = time.perf_counter()
    try:
        for row in rows:
            if "error" in row:
                if fail_fast:
                    raise FailFast(f"{row['id']}: {row['error']} (--fail-fast: stopped; rerun to resume)")
                summary.failed += 1
            else:
                summary.done += 1
            out.write(row)
            bar.update(1)
    finally:
        summary.seconds = time.perf_counter() - t0
        bar.close()
    return summary


def run_batch(src: str, out_path: str, model_dir: str, settings: Settings, prompt: str | None = None,
              parallel: int = 1, load_options: dict | None = None, fail_fast: bool = False,
              stop: threading.Event | None = None, show_progress: bool = True, ray_address: str | None = None,
              workers: int = 1, log=None) -> Summary:
    """The whole job (``pykimi batch``): read INPUT, skip what OUT holds, run the rest, append each row."""
    jobs = read_jobs(src, prompt)
    summary = Summary(total=len(jobs))
    with ResultsFile(out_path) as out:
        summary.repaired_bytes = out.repaired_bytes
        todo = [j for j in jobs if j.id not in out.done]
        summary.skipped = len(jobs) - len(todo)
        if log and summary.repaired_bytes:
            log(f"{out_path}: cut a torn last line of {summary.repaired_bytes} bytes (a killed run); its row is redone")
        if not todo:
            return summary
        if ray_address is not None:
            rows = run_ray(todo, model_dir, settings, load_options or {}, workers=workers, address=ray_address,
                           stop=stop, summary=summary, log=log, parallel=parallel)
        else:
            from . import load
            from .processor import Processor

            model = load(model_dir, **(load_options or {}))
            if model.memory_lock is not None and log:
                log(model.memory_lock.describe())
            proc = Processor.from_pretrained(model_dir)
            rows = make_runner(model, proc, settings, parallel).run(todo, stop)
        try:
            drive(rows, out, summary, len(todo), fail_fast=fail_fast, show_progress=show_progress)
        finally:
            close = getattr(rows, "close", None)
            if close:
                close()
        summary.interrupted = bool(stop is not None and stop.is_set()) and summary.done + summary.failed < len(todo)
    return summary


# --------------------------------------------------------------------------------------------- Ray Data

def rss_anon_mb(pid: int | str = "self") -> float | None:
    """Anonymous resident memory (RssAnon of /proc/PID/status) in MB: what a process holds beside the
    page cache it shares with others mapping the same weights."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RayPredictor:
    """The callable class of ``map_batches``: each Ray actor opens the memory-mapped model once in its
    constructor and answers the rows of the batches it is given (``run_one``, as one process does).

    Returns one JSON-encoded OUT row per input row (a column of strings, so answer and error rows need no
    common schema), and the actor's pid and RssAnon for the driver's memory report."""

    def __init__(self, model_dir: str, settings: dict, load_options: dict, parallel: int = 1):
        from . import load
        from .processor import Processor

        self.model = load(model_dir, **load_options)
        self.proc = Processor.from_pretrained(model_dir)
        self.settings = Settings(**settings)
        self.runner = make_runner(self.model, self.proc, self.settings, parallel)   # the engine when parallel > 1

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        jobs = [Job(str(batch["id"][i]), str(batch["image"][i]), str(batch["prompt"][i]), str(batch["path"][i]),
                    str(batch["kind"][i])) for i in range(len(batch["id"]))]
        rows = [json.dumps(row, ensure_ascii=False) for row in self.runner.run(jobs)]
        n = len(rows)
        return {"row": np.array(rows, dtype=object), "pid": np.full(n, os.getpid(), dtype=np.int64),
                "anon_mb": np.full(n, rss_anon_mb() or 0.0, dtype=np.float64)}


def _ray_init(ray, address: str, workers: int, log=None) -> bool:
    """Start a small local Ray (address 'local') or join ``address``; False when Ray was already running."""
    if ray.is_initialized():
        return False
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PYTHONPATH": os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH", "")) if p)}
    kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    if address == "local":
        # small and private: two CPUs (or one per worker), loopback only, no dashboard
        ray.init(num_cpus=max(2, workers), _node_ip_address="127.0.0.1", runtime_env={"env_vars": env}, **kw)
    else:
        # on a cluster pykimi must be importable on every node (installed, or this runtime_env's path shared)
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise InputError(f"--ray {address}: cannot join a Ray cluster there ({str(e).splitlines()[0]})") from None
    if log:
        log(f"ray {ray.__version__} {'started locally' if address == 'local' else 'joined ' + address}")
    return True


def run_ray(todo: list[Job], model_dir: str, settings: Settings, load_options: dict, workers: int = 2,
            address: str = "local", stop: threading.Event | None = None, summary: Summary | None = None,
            log=None, parallel: int = 1) -> Iterator[dict]:
    """The rows of ``todo`` through a Ray Data pipeline, yielded to the driver as they come (any order).

    dataset of rows -> ``map_batches(RayPredictor, concurrency=workers)`` -> ``iter_batches`` on the driver,
    whose caller writes OUT (one writer: the exactly-once rules of one process hold). Each actor asks Ray for
    ``threads`` CPUs (``-t``, default 1) and runs its kernels on as many threads; with ``parallel`` > 1 it
    decodes the ``parallel`` rows of each batch together with the engine (one weight read per step for all)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError("--ray needs Ray Data, which is not installed: pip install 'pykimi[ray]'") from None
    from dataclasses import asdict

    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)   # Ray Data's plan and timing lines: not for the user
    started = _ray_init(ray, address, workers, log)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False                  # the driver's own bar counts written rows
        ctx.execution_options.preserve_order = False      # rows leave as they finish
        threads = int(load_options.get("threads") or 1)
        opts = dict(load_options, threads=threads)
        n = len(todo)
        # small blocks: every actor busy, rows back early (a block's rows reach the driver when the block is done)
        per_block = max(parallel, min(16 * parallel, n // (4 * workers)))
        items = [{"id": j.id, "image": j.image, "prompt": j.prompt, "path": os.path.abspath(j.path), "kind": j.kind}
                 for j in todo]
        ds = ray.data.from_items(items, override_num_blocks=-(-n // per_block))
        ds = ds.map_batches(RayPredictor, fn_constructor_kwargs={"model_dir": os.path.abspath(model_dir),
                                                                 "settings": asdict(settings),
                                                                 "load_options": opts, "parallel": parallel},
                            compute=ray.data.ActorPoolStrategy(size=workers),   # = concurrency=workers
                            num_cpus=threads, batch_size=parallel, batch_format="numpy")
        if summary is not None and summary.actors is None:
            summary.actors = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for row, pid, anon in zip(batch["row"], batch["pid"], batch["anon_mb"]):
                if summary is not None:
                    summary.actors[int(pid)] = max(float(anon), summary.actors.get(int(pid), 0.0))
                yield json.loads(row)
            if stop is not None and stop.is_set():
                return                                    # rows still inside actors are redone on resume
    finally:
        if started:
            ray.shutdown()
