"""The tutorial notebooks (issues 9 and 24): committed executed, and not stale.

Each tutorial is a percent-format script tutorials/NN_name.py (the source, paired by jupytext) and the notebook
tutorials/NN_name.ipynb that `python tutorials/build.py` writes from it, executed, with its outputs and figures.
Cheap checks run always: the pair is in sync, the notebook was executed top to bottom in one run, it is small,
its thumbnail in tutorials/figures/ is current and tutorials/README.md shows it. The slow check re-executes
every notebook (nbclient, a fresh kernel of this interpreter, on the demo checkpoint) and compares its text
outputs and its number of figures, cell by cell, with the committed ones. Only timings are tolerated: in a
cell tagged "timing", a number followed by ms, s or tok/s. With $PYKIMI_MODEL set, the notebooks run on that
checkpoint instead and only have to run (their outputs are the demo's).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(ROOT, "tutorials")
EXPECTED = ["00_tour", "01_checkpoint", "02_tokens_and_chat", "03_pixels_to_patches", "04_moonvit",
            "05_merger_and_projector", "06_mla", "07_moe_routing", "08_generation", "09_debugging", "10_thinking",
            "11_video"]
# Seconds per notebook (each takes 3-10 s on the demo checkpoint on 2 cores, kernel start included). A real
# 16B checkpoint via PYKIMI_MODEL gets a larger budget.
BUDGET_S = float(os.environ.get("PYKIMI_TUTORIAL_BUDGET", 600 if os.environ.get("PYKIMI_MODEL") else 120))


def _build():
    """tutorials/build.py as a module (the same functions write the notebooks and check them here)."""
    spec = importlib.util.spec_from_file_location("tutorials_build", os.path.join(TUTORIALS, "build.py"))
    mod = importlib.util.module_from_spec(spec)
    old, sys.dont_write_bytecode = sys.dont_write_bytecode, True     # no __pycache__ inside tutorials/
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = old
    return mod


build = _build()
NAMES = build.names()


def _committed(name):
    import nbformat

    return nbformat.read(os.path.join(TUTORIALS, name + ".ipynb"), as_version=4)


# ------------------------------------------------------------------------------------------------ cheap checks

def test_the_ten_tutorials_exist_as_pairs():
    assert NAMES[:len(EXPECTED)] == EXPECTED, f"tutorials/ has scripts {NAMES}"
    for name in NAMES:
        assert os.path.isfile(os.path.join(TUTORIALS, name + ".ipynb")), f"{name}.py has no notebook: build it"
    stray = sorted(f for f in os.listdir(TUTORIALS) if f.endswith(".ipynb") and f[:-6] not in NAMES)
    assert not stray, f"notebooks without a script (the script is the source): {stray}"
    assert not os.path.exists(os.path.join(TUTORIALS, "_make_notebooks.py")), "the old generator is back"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_in_sync_with_its_script(name):
    pytest.importorskip("jupytext", reason="jupytext is not installed (it reads the tutorial scripts)")
    pytest.importorskip("nbformat", reason="nbformat is not installed")
    bad = build.same_cells(build.source(name), _committed(name))
    assert not bad, f"{name}.ipynb differs from {name}.py (run python tutorials/build.py {name[:2]}): {bad}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_executed_and_small(name):
    pytest.importorskip("nbformat", reason="nbformat is not installed")
    nb = _committed(name)
    cells = nb.cells
    assert cells[0].cell_type == "markdown"
    for part in ("What it teaches", "What it needs", "How long"):
        assert part in cells[0].source, f"{name}: the header cell lacks {part!r}"
    code = [c for c in cells if c.cell_type == "code"]
    src = "\n".join(c.source for c in code)
    assert "import pykimi" in src
    assert 'os.environ.get("PYKIMI_MODEL") or os.path.relpath(pykimi.demo_checkpoint())' in src
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{name}: not executed top to bottom in one run: {counts}"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: committed with an error: {errors[0].ename}: {errors[0].evalue}"
    stderr = [o.text[:200] for c in code for o in c.outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, f"{name}: committed with output on stderr (warnings?): {stderr}"
    assert sum(n for _, n in build.outputs(nb)) >= 1, f"{name}: no figure"
    size = os.path.getsize(os.path.join(TUTORIALS, name + ".ipynb"))
    assert size <= build.MAX_BYTES, f"{name}.ipynb is {size} bytes, over {build.MAX_BYTES}: smaller figures"
    text = "".join(t for t, _ in build.outputs(nb))
    home = os.path.expanduser("~")
    for where in (ROOT, "/tmp/") + ((home,) if len(home) > 1 else ()):
        assert where not in text, f"{name}: an output shows the path {where!r}, which differs between checkouts"


@pytest.mark.parametrize("name", NAMES)
def test_thumbnail_is_the_notebooks_figure(name):
    pytest.importorskip("nbformat", reason="nbformat is not installed")
    pytest.importorskip("PIL", reason="Pillow is not installed")
    path = os.path.join(TUTORIALS, "figures", name + ".png")
    assert os.path.isfile(path), f"tutorials/figures/{name}.png is missing (python tutorials/build.py {name[:2]})"
    with open(path, "rb") as f:
        assert f.read() == build.thumbnail(_committed(name), name), \
            f"tutorials/figures/{name}.png is not the figure of the cell tagged 'thumbnail': rebuild"


def test_readme_links_every_notebook_and_shows_its_thumbnail():
    with open(os.path.join(TUTORIALS, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in NAMES:
        assert f"]({name}.ipynb)" in readme, f"tutorials/README.md does not link {name}.ipynb"
        assert f"(figures/{name}.png)" in readme, f"tutorials/README.md does not show figures/{name}.png"
    assert "python tutorials/build.py" in readme, "tutorials/README.md does not say how to regenerate"


def test_timing_mask_touches_only_timings():
    """The one tolerance: in a cell tagged "timing", numbers followed by a time unit; nothing else."""
    import nbformat

    def cell(text, tags):
        c = nbformat.v4.new_code_cell("", metadata={"tags": tags})
        c.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        return c

    line = "loaded in 0.18 s; vision 12.5 ms, decode 230 tok/s; 3 shapes, 48 tokens, 2e-05 rel, 1.5 s."
    nb = nbformat.v4.new_notebook(cells=[cell(line, ["timing"]), cell(line, [])])
    (masked, _), (kept, _) = build.outputs(nb)
    assert masked.endswith("loaded in <t> s; vision <t> ms, decode <t> tok/s; 3 shapes, 48 tokens, 2e-05 rel, <t> s.")
    assert kept.endswith(line)
    other = nbformat.v4.new_notebook(cells=[cell(line.replace("3 shapes", "4 shapes"), ["timing"]),
                                            cell(line.replace("12.5", "99"), [])])
    bad = build.compare(nb, other, "x")
    assert len(bad) == 2 and "cell 0" in bad[0] and "cell 1" in bad[1], bad


# ------------------------------------------------------------------------------------------------ execution

@pytest.fixture(scope="module")
def kernel_env():
    """Skip unless everything needed is there; a kernelspec that runs *this* interpreter; the kernel's env."""
    for mod in ("nbformat", "nbclient", "ipykernel", "matplotlib", "jupytext"):
        pytest.importorskip(mod, reason=f"{mod} is not installed (needed to execute the tutorials)")
    demo = os.path.join(ROOT, "pykimi", "demo")
    if not os.environ.get("PYKIMI_MODEL") and not all(
            os.path.isfile(os.path.join(demo, f)) for f in ("config.json", "model.safetensors", "tiktoken.model")):
        pytest.skip("demo checkpoint missing (pykimi/demo/ has no config.json, model.safetensors and "
                    "tiktoken.model); set PYKIMI_MODEL to run the tutorials on another checkpoint")
    with build.kernel() as env:
        yield env


def _repo_snapshot():
    """Files at the top of the repository and everything in tutorials/ (where a notebook could write)."""
    top = {n for n in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, n))}
    return top, {n for n in os.listdir(TUTORIALS) if n not in ("__pycache__", ".ipynb_checkpoints")}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_reexecutes_to_its_committed_outputs(name, kernel_env):
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = build.source(name)
    real = os.environ.get("PYKIMI_MODEL")
    before = _repo_snapshot()
    t0 = time.perf_counter()
    try:
        build.execute(nb, kernel_env, timeout=BUDGET_S, model_dir=real)
    except CellTimeoutError as e:
        pytest.fail(f"{name}: a cell ran over the {BUDGET_S:.0f} s budget:\n{str(e)[-2000:]}")
    except CellExecutionError as e:
        pytest.fail(f"{name}: a cell failed:\n{str(e)[-4000:]}")
    elapsed = time.perf_counter() - t0
    print(f"{name}: {elapsed:.1f} s")
    assert elapsed < BUDGET_S, f"{name} took {elapsed:.0f} s, over its {BUDGET_S:.0f} s budget"
    assert _repo_snapshot() == before, f"{name} wrote files into the repository"
    if real:
        return                                  # the committed outputs are the demo checkpoint's
    stale = build.compare(_committed(name), nb, name)
    assert not stale, (f"{name}.ipynb is stale: re-executed, its outputs differ from the committed ones "
                       f"(run python tutorials/build.py {name[:2]} and review the diff):\n" + "\n".join(stale[:5]))
