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
# # 05 · The patch merger, the projector, and image tokens in the text
#
# **What it teaches.** How MoonViT's patches become language-model tokens: the 2×2 merge (which four patches,
# in which order), the projector (LayerNorm on each of the four sub-vectors, linear, exact GELU, linear),
# and where the resulting rows land in the prompt.
#
# **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib, and the bundled demo
# checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes). Set the
# environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells
# on the real model (weights stay memory-mapped, so it fits in 24 GiB).
#
# **How long.** About 5 s on 2 cores with the demo checkpoint; a few minutes with the real one (vision tower and
# projector only).

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
from pykimi.vision import gelu_erf, gelu_tanh, layer_norm, patch_merger, projector

model = pykimi.load(MODEL_DIR)
proc = pykimi.Processor.from_pretrained(MODEL_DIR)
vc, tc = model.config.vision, model.config.text
kh, kw = vc.merge_kernel_size

# %%
from pykimi import scenes

rng = np.random.default_rng(404)               # one of the fixed scenes of tests/test_demo.py
image, shapes = scenes.random_scene(rng)
print("image size (w, h):", image.size)
for s in shapes:
    print("  ", s)
plt.figure(figsize=(3, 2.2)); plt.imshow(image); plt.title("the scene"); plt.xticks([]); plt.yticks([]); plt.show()

# %% [markdown]
# One traced pass through the vision side records the tensors this notebook follows: the last LayerNorm of
# MoonViT (one row per patch), the merger's output (one row of four sub-vectors per image token), the
# projector's steps and the prompt's embeddings with the image features written in.

# %%
inputs = proc.prepare(scenes.messages_for("Describe the image."), images=[image])
ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"]
gh, gw = (int(v) for v in grid[0])
names = ["vision_tower.encoder.final_layernorm", "vision_tower.merger", "multi_modal_projector*",
         "inputs_embeds"]
with pykimi.trace(model, names=names) as t:
    embeds = model.embed(ids, pv, grid)                      # vision + projector + merge, no LM
for n in t:
    show(**{n.split(".")[-1] if "." in n else n: t[n]})

# %% [markdown]
# ## 1. The 2×2 merge
#
# Per image, the `[gh·gw, C]` patches are viewed as `(gh/2, 2, gw/2, 2, C)`, permuted to
# `(gh/2, gw/2, 2, 2, C)` and reshaped to `[(gh/2)·(gw/2), 4, C]`: each merged token holds its four patches
# in the order **top-left, top-right, bottom-left, bottom-right**, and merged tokens follow raster order.
#
# Merging a column of patch *indices* shows which patches go where.

# %%
L = gh * gw
idx = patch_merger(np.arange(L, dtype=np.float32)[:, None], grid, (kh, kw))[:, :, 0].astype(int)  # [T, 4]
show(index_map=idx)
print("merged token 0 <- patches", idx[0], "| token 1 <- patches", idx[1])
merged, fin = t["vision_tower.merger"], t["vision_tower.encoder.final_layernorm"]   # [T, 4, C], [L, C]
print("merger output == final_layernorm rows at those indices:", np.array_equal(merged, fin[idx]))

# %% [markdown]
# On the patch grid: each colour is one merged token, each patch labelled with its token and its slot.

# %% tags=["thumbnail"]
fig, ax = plt.subplots(figsize=(gw * 0.55, gh * 0.55))
tok_of = np.zeros(L, int); sub_of = np.zeros(L, int)
for tkn, row in enumerate(idx):
    tok_of[row] = tkn; sub_of[row] = np.arange(kh * kw)
ax.imshow((tok_of.reshape(gh, gw) * 7919) % 17, cmap="tab20", alpha=0.8)
sub_names = ["TL", "TR", "BL", "BR"]
for k in range(L):
    r, c = divmod(k, gw)
    ax.text(c, r, f"{tok_of[k]}\n{sub_names[sub_of[k]]}", ha="center", va="center", fontsize=6)
ax.set_xticks([]); ax.set_yticks([])
ax.set_title("patch grid: merged token id and sub-token slot"); plt.show()

# %% [markdown]
# ## 2. The projector
#
# `multi_modal_projector`: LayerNorm(C) applied to **each of the four sub-vectors separately**, then concat
# to 4C, `linear_1` (4C → 4C), exact erf GELU, `linear_2` (4C → text hidden size).

# %%
parts = ["pre_norm.weight", "pre_norm.bias", "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"]
w = {n: model.ckpt.f32("multi_modal_projector." + n) for n in parts}     # float32 copies, by checkpoint name
show(**{k.replace(".", "_"): v for k, v in w.items()})

# %%
pre = layer_norm(merged, w["pre_norm.weight"], w["pre_norm.bias"])                  # [T, 4, C]
wrong = layer_norm(merged.reshape(len(merged), -1), np.tile(w["pre_norm.weight"], 4),
                   np.tile(w["pre_norm.bias"], 4)).reshape(merged.shape)          # one norm over 4C
show(pre_norm=pre)
print("per-sub-vector LayerNorm == trace:", np.allclose(pre, t["multi_modal_projector.pre_norm"], atol=1e-6))
print(f"a single LayerNorm over 4C would differ by up to {np.abs(wrong - pre).max():.2f}")

# %% [markdown]
# The projector's GELU is the exact (erf) one; MoonViT's MLP uses the tanh approximation. They differ by at
# most ~5e-4 (spec §7), small next to the spread of the values they are applied to (right).

# %%
xs = np.linspace(-5, 3, 400).astype(np.float32)
fig, axes = plt.subplots(1, 3, figsize=(13, 3))
axes[0].plot(xs, gelu_erf(xs), label="erf (projector)")
axes[0].plot(xs, gelu_tanh(xs), "--", label="tanh (ViT MLP)")
axes[0].legend(); axes[0].set_title("GELU")
axes[1].plot(xs, gelu_erf(xs) - gelu_tanh(xs)); axes[1].set_title("erf - tanh")
axes[2].hist(t["multi_modal_projector.linear_1"].ravel(), bins=100)
axes[2].set_title("linear_1 outputs: the GELU's inputs"); plt.show()

# %%
feats = projector(merged, w)                                          # [T, text hidden]
show(image_features=feats)
print("equal to the model's projector output:", np.allclose(feats, t["multi_modal_projector"], atol=1e-5))

# %% [markdown]
# ## 3. Image tokens in the text
#
# `inputs_embeds` is the token embedding of every id, except that the k-th placeholder position receives
# the k-th projector row (spec §8.1). The LM then treats them as ordinary tokens at positions 0..S-1.

# %%
pad = model.config.media_placeholder_token_id
where = np.flatnonzero(ids == pad)                                    # [T]
show(placeholder_positions=where, inputs_embeds=embeds)
print(f"placeholders at positions {where[0]}..{where[-1]} ({len(where)} of {len(ids)})")
print("rows replaced by the image features:", np.array_equal(embeds[where], t["multi_modal_projector"]))

# %%
norms = np.linalg.norm(embeds, axis=1)                                # [S]
plt.figure(figsize=(10, 2.8))
plt.bar(np.arange(len(ids)), norms, color=np.where(ids == pad, "tab:red", "tab:blue"), width=1.0)
plt.xlabel("position"); plt.ylabel("|embedding|")
plt.title("inputs_embeds: text tokens (blue) and image tokens (red)"); plt.show()

# %% [markdown]
# Each image token covers a 28×28 pixel cell. The cosine similarity of every image token to the one at the
# centre of the first shape, drawn on the merged grid: the tokens of the same shape look alike.

# %%
s0 = shapes[0]
ref = int(s0.cy // 28) * (gw // kw) + int(s0.cx // 28)
fn = feats / np.linalg.norm(feats, axis=1, keepdims=True)
sim = (fn @ fn[ref]).reshape(gh // kh, gw // kw)                      # [gh/2, gw/2]
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
axes[0].imshow(image); axes[0].set_title("image"); axes[0].axis("off")
im = axes[1].imshow(sim, cmap="viridis"); axes[1].plot(ref % (gw // kw), ref // (gw // kw), "r+", ms=12)
axes[1].set_title(f"similarity to the token on the {s0.color} {s0.kind}"); plt.colorbar(im, ax=axes[1])
plt.show()
