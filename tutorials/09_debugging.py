# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: kernelspec,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · Debugging with traces: plant a bug, find it with `pykimi diff`
#
# **What it teaches.** The workflow for a wrong answer: record a reference dump of every named intermediate,
# run the suspect code on the same inputs, and compare the two in execution order; the first tensor that
# differs names the stage with the bug. We plant a classic one (the x and y pairs of MoonViT's 2-D RoPE
# swapped, the mistake the HF docstring invites) and find it with the `pykimi diff` command and with
# `pykimi.debug.compare`.
#
# **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib, and the bundled demo
# checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes). Set the
# environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells
# on the real model (weights stay memory-mapped, so it fits in 24 GiB).
# The notebook runs the `pykimi` command as `python -m pykimi.cli` and writes its dumps
# to a temporary directory.
#
# **How long.** About 8 s on 2 cores with the demo checkpoint (the command loads the model once more); tens of
# minutes with the real one.

# %%
import os, sys, time
import numpy as np
import matplotlib.pyplot as plt
# %matplotlib inline
try:
    import pykimi
except ImportError:                      # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(".."))
    import pykimi

# a downloaded Kimi-VL-A3B-Instruct directory named by $PYKIMI_MODEL, else the bundled demo checkpoint
MODEL_DIR = os.environ.get("PYKIMI_MODEL") or os.path.relpath(pykimi.demo_checkpoint())
IS_DEMO = not os.environ.get("PYKIMI_MODEL")
print("checkpoint:", MODEL_DIR)


def show(**arrays):
    """Print the name, shape and dtype of each array (display only)."""
    for k, v in arrays.items():
        v = np.asarray(v)
        print(f"{k:<28} {str(list(v.shape)):<20} {v.dtype}")


# %%
import subprocess, tempfile
import pykimi.debug
import pykimi.rope
import pykimi.vision
from PIL import Image

model = pykimi.load(MODEL_DIR)
proc = pykimi.Processor.from_pretrained(MODEL_DIR)
work = tempfile.mkdtemp(prefix="pykimi-debug-")     # the dumps go here; removed at the end
# the command runs in a fresh process: make sure it imports this same pykimi; no progress bars (they
# appear only when a step is slow, so they would make this notebook's output differ from run to run)
env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join(
    [os.path.dirname(os.path.dirname(pykimi.__file__)), os.environ.get("PYTHONPATH", "")]))


def pykimi_cmd(*args):
    """Run `pykimi ARGS...` in the work directory and print what it prints; returns the exit status."""
    r = subprocess.run([sys.executable, "-m", "pykimi.cli", *args], capture_output=True, text=True, env=env,
                       cwd=work)
    print(r.stdout + r.stderr)
    return r.returncode


# %%
from pykimi import scenes

rng = np.random.default_rng(404)               # one of the fixed scenes of tests/test_demo.py
image, shapes = scenes.random_scene(rng)
print("image size (w, h):", image.size)
for s in shapes:
    print("  ", s)
plt.figure(figsize=(3, 2.2)); plt.imshow(image); plt.title("the scene"); plt.xticks([]); plt.yticks([]); plt.show()

# %% [markdown]
# ## 1. A reference dump
#
# `pykimi trace` runs one forward pass and writes every named intermediate to a safetensors file, in
# execution order. Here the reference is pykimi itself before we break it; in real life it is a dump from
# a trusted implementation (e.g. PyTorch forward hooks with the same names, see `tools/`).

# %%
png = os.path.join(work, "scene.png")
image.save(png)
question = scenes.QUESTION_DESCRIBE
ref_path = os.path.join(work, "reference.safetensors")
status = pykimi_cmd("trace", "--model", os.path.abspath(MODEL_DIR), "--image", "scene.png", "-p", question,
                    "--out", "reference.safetensors")
assert status == 0

# %% [markdown]
# The same inputs in this notebook (the command builds them the same way: one image part, then the question):

# %%
inputs = proc.prepare(scenes.messages_for(question), images=[Image.open(png)])
ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"]
show(input_ids=ids, pixel_values=pv, image_grid_hws=grid)
answer_ok = proc.decode(model.generate(ids, pv, grid, max_new_tokens=24), skip_special=True)
print("answer:", repr(answer_ok))

# %% [markdown]
# ## 2. Plant the bug
#
# Swap the two axes of the 2-D RoPE: pair 2i should turn by the column, pair 2i+1 by the row.
#
# Where to patch matters: `pykimi/vision.py` does `from .rope import vision_rope_angles`, so the vision
# tower calls *its own* name `pykimi.vision.vision_rope_angles`. Patching `pykimi.rope.vision_rope_angles`
# changes nothing (we check), patching the name in `pykimi.vision` plants the bug.

# %%
correct = pykimi.rope.vision_rope_angles

def swapped_xy(gh, gw, head_dim, theta=10000.0):
    a = correct(gh, gw, head_dim, theta)                  # [L, D/2]
    b = a.copy()
    b[:, 0::2], b[:, 1::2] = a[:, 1::2], a[:, 0::2]       # x pairs get rows, y pairs get columns
    return b

feats_ok = model.encode_images(pv, grid)
pykimi.rope.vision_rope_angles = swapped_xy
try:
    print("patching pykimi.rope changes the features:", not np.array_equal(model.encode_images(pv, grid), feats_ok))
finally:
    pykimi.rope.vision_rope_angles = correct

# %% [markdown]
# Now plant it where the vision tower looks it up, record a dump of the buggy run with the same inputs,
# and ask the question again.

# %%
bug_path = os.path.join(work, "buggy.safetensors")
pykimi.vision.vision_rope_angles = swapped_xy              # the bug
try:
    with pykimi.trace(model) as t:
        model.forward(ids, pv, grid)
    answer_bug = proc.decode(model.generate(ids, pv, grid, max_new_tokens=24), skip_special=True)
finally:
    pykimi.vision.vision_rope_angles = correct             # always undo a monkeypatch
t.save(bug_path)
print(f"recorded {len(t)} tensors")
print("answer with the bug:", repr(answer_bug), "| without:", repr(answer_ok))

# %% [markdown]
# Whether the answer changes depends on the model and the picture: a small model on an easy scene may still
# answer right. That is the point of comparing intermediates instead of answers: the numbers change either
# way.

# %% [markdown]
# ## 3. Find it: `pykimi diff`
#
# `pykimi diff A B` walks the tensors in execution order and prints, for each, the max abs error and the
# scale-relative error `max|a-b| / max|b|` against B, the reference. The first row over the tolerance is
# the **first divergence**: everything after it differs only because its input did. Exit status 1 when
# something differs.

# %%
status = pykimi_cmd("diff", "buggy.safetensors", "reference.safetensors")
print("exit status:", status)

# %% [markdown]
# The first divergence is `vision_tower.encoder.rope_angles`, the 2-D RoPE table: the patch embedding and
# the position table before it agree exactly. The bug is in how the angles are built, not in the weights or
# the attention. The same comparison from Python, as a picture:

# %% tags=["thumbnail"]
rep = pykimi.debug.compare(bug_path, ref_path)
first = rep.first_divergence
print("first divergence:", first.name, "| rel error", f"{first.rel:.3g}", "| first bad index", first.first_bad)
assert first.name == "vision_tower.encoder.rope_angles"
rel = np.array([r.rel for r in rep.rows])
fig, ax = plt.subplots(figsize=(11, 3.2))
ax.semilogy(np.arange(len(rel)), np.maximum(rel, 1e-12), "o-", ms=3)
ax.axhline(2e-5, color="gray", ls="--", label="tolerance 2e-5")
j = [r.name for r in rep.rows].index(first.name)
ax.plot(j, max(rel[j], 1e-12), "r*", ms=14, label="first divergence")
ax.set_xticks(range(len(rel)))
ax.set_xticklabels([r.name.replace("language_model.model.", "lm.").replace("vision_tower.", "v.")
                    for r in rep.rows], rotation=90, fontsize=5)
ax.set_ylabel("max|a-b| / max|b|"); ax.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 4. Fix and confirm
#
# With the correct function back in place, a new dump agrees with the reference everywhere.

# %%
fixed_path = os.path.join(work, "fixed.safetensors")
with pykimi.trace(model) as t:
    model.forward(ids, pv, grid)
t.save(fixed_path)
status = pykimi_cmd("diff", "fixed.safetensors", "reference.safetensors", "--only-bad")
print("exit status:", status)
assert status == 0

# %% [markdown]
# ## 5. A subtler bug: an epsilon
#
# Spec §11.4: vLLM and SGLang build `kv_a_layernorm` with eps 1e-5, HF with 1e-6. We make the same
# change (the config is a frozen dataclass, so we replace it) and diff only the language-model tensors.
# Whether it crosses the tolerance depends on the size of the latent rows of the checkpoint at hand:
# this is why the comparison reports the size of each error, not just equal / not equal. Here, with the
# demo checkpoint, every error stays below the tolerance (the picture shows by how much).

# %%
import dataclasses

eps_path = os.path.join(work, "eps.safetensors")
good_text = model.text
model.text = dataclasses.replace(good_text, kv_a_layernorm_eps=1e-5)
try:
    with pykimi.trace(model, names=["inputs_embeds", "language_model.*", "logits"]) as t:
        model.forward(ids, pv, grid)
finally:
    model.text = good_text
t.save(eps_path)
rep = pykimi.debug.compare(eps_path, ref_path)
rel = np.array([r.rel for r in rep.rows])                                   # [tensors]
print(f"{len(rep.rows)} tensors compared, {sum(r.ok for r in rep.rows)} within the tolerance 2e-5")
print("first divergence:", rep.first_divergence.name if rep.first_divergence else "none")
fig, ax = plt.subplots(figsize=(9, 2.8))
ax.semilogy(np.arange(len(rel)), np.maximum(rel, 1e-12), "o-", ms=3)
ax.axhline(2e-5, color="gray", ls="--", label="tolerance 2e-5")
ax.set_xlabel("tensor, in execution order (inputs_embeds first, logits last)"); ax.set_ylabel("max|a-b| / max|b|")
ax.set_title("kv_a_layernorm eps 1e-5 instead of 1e-6"); ax.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# Remove the temporary dumps (for the real model they are hundreds of megabytes).

# %%
import shutil
shutil.rmtree(work, ignore_errors=True)
