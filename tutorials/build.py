"""Regenerate the tutorial notebooks: execute each script NN_name.py, write NN_name.ipynb with its outputs.

    python tutorials/build.py               # every notebook, about a minute on 2 cores
    python tutorials/build.py 07 08         # only the notebooks whose names start with 07 or 08
    python tutorials/build.py --check       # no execution: is every .ipynb in sync with its .py, executed,
                                            # small enough, and is its thumbnail current?

The percent-format scripts (jupytext) are the sources; the notebooks are what a reader opens, committed with
their outputs and figures. Each build runs the script top to bottom in a fresh python3 kernel of this
interpreter, started in tutorials/, on the bundled demo checkpoint (PYKIMI_MODEL is ignored here: the
committed outputs are the demo's), then writes the notebook and its thumbnail (tutorials/figures/NN_name.png,
from the cell tagged "thumbnail"). tests/test_tutorials.py uses the same functions to re-execute every
notebook and compare its text outputs and figure counts with the committed ones.

Cell tags the build understands (in the script: `# %% tags=["timing"]`):
  timing     the cell prints wall-clock times; a number followed by ms, s or tok/s is not compared.
  thumbnail  the cell's first figure is the notebook's picture in tutorials/README.md (exactly one per notebook).
"""
from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIGURES = os.path.join(HERE, "figures")
MAX_BYTES = 400_000            # a notebook with its figures (issue 24)
THUMB_WIDTH = 320              # pixels, the README's thumbnail table
KERNEL = "pykimi-tutorials"
_NAME = re.compile(r"^\d\d_[a-z0-9_]+$")
# a timing: a number followed by a time or speed unit, compared as "<t> unit" in cells tagged "timing"
_TIMING = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[-+]?\d+)?(\s*)(tok/s|ms|µs|us|s)(?![\w/])")


def names() -> list[str]:
    """NN_name of every tutorial script, in order."""
    return sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and _NAME.match(f[:-3]))


def source(name: str):
    """The notebook as its script defines it (no outputs): cells, tags, stable cell ids, kernelspec."""
    import jupytext

    nb = jupytext.read(os.path.join(HERE, name + ".py"), fmt="py:percent")
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:02d}"                   # stable: rebuilding an unchanged script changes nothing
    return nb


@contextlib.contextmanager
def kernel():
    """A private kernelspec that runs *this* interpreter, and the environment its kernel gets."""
    with tempfile.TemporaryDirectory(prefix="pykimi-kernel-") as kdir:
        spec = os.path.join(kdir, "kernels", KERNEL)
        os.makedirs(spec)
        with open(os.path.join(spec, "kernel.json"), "w") as f:
            json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                       "display_name": "pykimi tutorials", "language": "python"}, f)
        env = dict(os.environ)
        env["JUPYTER_PATH"] = os.pathsep.join([kdir] + ([env["JUPYTER_PATH"]] if env.get("JUPYTER_PATH") else []))
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["MPLBACKEND"] = "Agg"                      # the inline backend renders with Agg; no display needed
        env["PYTHONHASHSEED"] = "0"
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]          # the kernelspec lookup happens in this process
        try:
            yield env
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def execute(nb, env: dict, timeout: float = 600, model_dir: str | None = None):
    """Run every cell of nb in place, in a fresh kernel started in tutorials/ (where a reader's Jupyter runs
    them, so the relative paths they print are the same in every checkout; they write nothing there).
    model_dir (None: the demo checkpoint) is passed as PYKIMI_MODEL. Raises nbclient's CellExecutionError
    when a cell fails, CellTimeoutError when one runs over timeout seconds."""
    from nbclient import NotebookClient

    env = dict(env)
    env.pop("PYKIMI_MODEL", None)
    if model_dir:
        env["PYKIMI_MODEL"] = model_dir
    client = NotebookClient(nb, timeout=int(timeout), kernel_name=KERNEL, record_timing=False,
                            resources={"metadata": {"path": HERE}})
    # the kernel process's own stderr only carries jupyter_client's transport warning; what the cells print
    # on stderr comes through the notebook protocol and lands in the outputs as usual
    client.execute(env=env, stderr=subprocess.DEVNULL)
    return tidy(nb)


def tidy(nb):
    """Merge consecutive stream outputs of one kind (how a stream is chunked depends on timing), drop
    execution metadata: what is left depends only on what the cells print and draw."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        merged = []
        for out in cell.outputs:
            if out.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                    and merged[-1].name == out.name:
                merged[-1].text += out.text
            else:
                merged.append(out)
        cell.outputs = merged
    return nb


def _text(out) -> str:
    if out.output_type == "stream":
        return f"[{out.name}]\n{out.text}"
    if out.output_type == "error":
        return f"[error] {out.ename}: {out.evalue}"
    data = out.get("data", {})
    if "image/png" in data:
        return ""                                   # a figure: counted, its text/plain repr is not compared
    return f"[{out.output_type}]\n" + "".join(data.get("text/plain", ""))


def outputs(nb) -> list[tuple[str, int]]:
    """Per code cell: (its text outputs, timings masked in cells tagged "timing"; its number of figures)."""
    rows = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        text = "".join(_text(o) for o in cell.outputs)
        if "timing" in cell.metadata.get("tags", []):
            text = _TIMING.sub(r"<t>\1\2", text)
        figs = sum("image/png" in o.get("data", {}) for o in cell.outputs)
        rows.append((text, figs))
    return rows


def compare(committed, fresh, name: str = "") -> list[str]:
    """Where two executions of one notebook differ: one message per code cell, with both texts."""
    a, b = outputs(committed), outputs(fresh)
    if len(a) != len(b):
        return [f"{name}: {len(a)} code cells committed, {len(b)} executed"]
    bad = []
    for i, ((ta, fa), (tb, fb)) in enumerate(zip(a, b)):
        if fa != fb:
            bad.append(f"{name} code cell {i}: {fa} figure(s) committed, {fb} now")
        if ta != tb:
            la, lb = ta.splitlines(), tb.splitlines()
            j = next((k for k in range(min(len(la), len(lb))) if la[k] != lb[k]), min(len(la), len(lb)))
            bad.append(f"{name} code cell {i}, output line {j}:\n  committed: "
                       f"{la[j] if j < len(la) else '<end>'!r}\n  now:       {lb[j] if j < len(lb) else '<end>'!r}")
    return bad


def same_cells(a, b) -> list[str]:
    """Where the cells of two notebooks differ in kind, source or tags (outputs are not looked at)."""
    if len(a.cells) != len(b.cells):
        return [f"{len(a.cells)} cells vs {len(b.cells)}"]
    bad = []
    for i, (x, y) in enumerate(zip(a.cells, b.cells)):
        if x.cell_type != y.cell_type or x.source != y.source \
                or x.metadata.get("tags", []) != y.metadata.get("tags", []):
            bad.append(f"cell {i} ({x.cell_type}) differs: {x.source[:60]!r}...")
    return bad


def thumbnail(nb, name: str) -> bytes:
    """The first figure of the cell tagged "thumbnail", THUMB_WIDTH pixels wide, as PNG bytes."""
    from PIL import Image

    tagged = [c for c in nb.cells if c.cell_type == "code" and "thumbnail" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{name}: {len(tagged)} cells are tagged 'thumbnail', expected exactly 1")
    pngs = [o.data["image/png"] for o in tagged[0].outputs if "image/png" in o.get("data", {})]
    if not pngs:
        raise ValueError(f"{name}: the cell tagged 'thumbnail' drew no figure")
    img = Image.open(io.BytesIO(base64.b64decode(pngs[0]))).convert("RGB")
    h = max(1, round(img.height * THUMB_WIDTH / img.width))
    small = img.resize((THUMB_WIDTH, h), Image.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def notebook_bytes(nb) -> bytes:
    import nbformat

    return (nbformat.writes(nb) + "\n").encode("utf-8")


def build(selected: list[str]) -> int:
    import nbformat
    from nbclient.exceptions import CellExecutionError

    os.makedirs(FIGURES, exist_ok=True)
    failed = 0
    with kernel() as env:
        for name in selected:
            t0 = time.perf_counter()
            nb = source(name)
            try:
                execute(nb, env)
            except CellExecutionError as e:
                print(f"{name}: a cell failed, notebook not written\n{str(e)[-3000:]}", file=sys.stderr)
                failed += 1
                continue
            nbformat.validate(nb)
            data = notebook_bytes(nb)
            with open(os.path.join(HERE, name + ".ipynb"), "wb") as f:
                f.write(data)
            thumb = thumbnail(nb, name)
            with open(os.path.join(FIGURES, name + ".png"), "wb") as f:
                f.write(thumb)
            figs = sum(n for _, n in outputs(nb))
            warn = f"  OVER {MAX_BYTES // 1000} KB" if len(data) > MAX_BYTES else ""
            print(f"{name}: {time.perf_counter() - t0:5.1f} s, {figs} figures, {len(data) / 1e3:.0f} KB{warn}")
            failed += bool(warn)
    return 1 if failed else 0


def check(selected: list[str]) -> int:
    """Cheap staleness checks, no kernel: the problems found, printed; 0 when there are none."""
    import nbformat

    problems = []
    for name in selected:
        path = os.path.join(HERE, name + ".ipynb")
        if not os.path.exists(path):
            problems.append(f"{name}.ipynb is missing")
            continue
        committed = nbformat.read(path, as_version=4)
        problems += [f"{name}: {m}" for m in same_cells(source(name), committed)]
        code = [c for c in committed.cells if c.cell_type == "code"]
        if [c.execution_count for c in code] != list(range(1, len(code) + 1)):
            problems.append(f"{name}: not executed top to bottom in one run")
        if os.path.getsize(path) > MAX_BYTES:
            problems.append(f"{name}: {os.path.getsize(path)} bytes, over {MAX_BYTES}")
        try:
            thumb = thumbnail(committed, name)
            fig = os.path.join(FIGURES, name + ".png")
            if not os.path.exists(fig) or open(fig, "rb").read() != thumb:
                problems.append(f"{name}: figures/{name}.png is not the notebook's thumbnail figure")
        except ValueError as e:
            problems.append(str(e))
    for p in problems:
        print(p)
    if problems:
        stale = sorted({p.split(":")[0].split(".")[0] for p in problems} & set(selected))
        print("stale; to regenerate:  python tutorials/build.py", " ".join(n[:2] for n in stale))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    missing = [m for m in ("jupytext", "nbformat", "nbclient", "ipykernel", "matplotlib", "PIL")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"build.py needs {', '.join(missing)}: pip install -e \".[tutorials]\"", file=sys.stderr)
        return 2
    prefixes = [a for a in argv if not a.startswith("-")]
    selected = [n for n in names() if not prefixes or any(n.startswith(p) for p in prefixes)]
    if not selected:
        print(f"no tutorial matches {prefixes}; there are: {', '.join(names())}", file=sys.stderr)
        return 2
    return check(selected) if "--check" in argv else build(selected)


if __name__ == "__main__":
    sys.exit(main())
