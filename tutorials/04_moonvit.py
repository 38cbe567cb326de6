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
# # 04 · MoonViT: position table, 2-D RoPE, attention over the image
#
# **What it teaches.** The vision tower's two position signals: a learned 2-D position table resized
# bicubically to each image's patch grid, and 2-D rotary embeddings whose pairs alternate between the x
# (column) and y (row) axes. Then the attention maps of each head over the image, and the block-diagonal
# attention that keeps several images apart in one packed sequence.
#
# **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib, and the bundled demo
# checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes). Set the
# environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells
# on the real model (weights stay memory-mapped, so it fits in 24 GiB).
#
# **How long.** About 5 s on 2 cores with the demo checkpoint; a few minutes with the real one (vision tower only).

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


# %% [markdown]
# MoonViT is a ViT over 14×14 patches at the image's own resolution (no resize to a fixed square). Its
# configuration:

# %%
model = pykimi.load(MODEL_DIR)
proc = pykimi.Processor.from_pretrained(MODEL_DIR)
vc = model.config.vision
print(f"MoonViT: {vc.num_hidden_layers} blocks, width {vc.hidden_size}, {vc.num_attention_heads} heads of "
      f"{vc.head_dim}, position table {vc.init_pos_emb_height}x{vc.init_pos_emb_width}")

# %%
from pykimi import scenes

rng = np.random.default_rng(404)               # one of the fixed scenes of tests/test_demo.py
image, shapes = scenes.random_scene(rng)
print("image size (w, h):", image.size)
for s in shapes:
    print("  ", s)
plt.figure(figsize=(3, 2.2)); plt.imshow(image); plt.title("the scene"); plt.xticks([]); plt.yticks([]); plt.show()

# %% [markdown]
# The processor cuts it into patches (notebook 03): `L = gh·gw` patches on a `gh × gw` grid.

# %%
inputs = proc(text="<|media_pad|>", images=[image])
pv, grid = inputs["pixel_values"], inputs["image_grid_hws"]
gh, gw = (int(v) for v in grid[0])
L = gh * gw
show(pixel_values=pv, image_grid_hws=grid)

# %% [markdown]
# ## 1. The learned position table
#
# `vision_tower.patch_embed.pos_emb.weight` is a `[64, 64, C]` table in the real model (rows, columns,
# channels). Every image gets its own copy resized to its patch grid `(gh, gw)` with torch's bicubic
# interpolation (A = -0.75, align_corners=False, no antialias), and added to the patch embeddings.

# %%
table = model.ckpt.f32("vision_tower.patch_embed.pos_emb.weight")     # [H0, W0, C]
H0, W0, C = table.shape
show(table=table)
fig, axes = plt.subplots(1, 4, figsize=(11, 3))
for ax, ch in zip(axes, [0, 1, 2, 3]):
    ax.imshow(table[:, :, ch], cmap="RdBu"); ax.set_title(f"channel {ch}"); ax.axis("off")
plt.suptitle("the position table, a few channels"); plt.show()

# %% [markdown]
# Bicubic resizing is linear, so it is a matrix along each axis: `bicubic_matrix(in, out)` has one row of
# weights per output position. The cubic kernel has small negative lobes.

# %%
from pykimi.vision import bicubic_matrix, bicubic_resize

up, down = bicubic_matrix(H0, 2 * H0), bicubic_matrix(H0, max(2, H0 // 2))   # [out, in]
show(upsample=up, downsample=down)
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for o in range(4, 8):
    axes[0].plot(up[o], "o-", ms=3, label=f"out {o}")
axes[0].set_title(f"weights of a few outputs ({H0} -> {2 * H0})"); axes[0].legend(fontsize=7)
axes[0].set_xlabel("input position")
axes[1].imshow(up, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
axes[1].set_title("the whole matrix"); axes[1].set_xlabel("input"); axes[1].set_ylabel("output")
plt.show()

# %%
pos = bicubic_resize(table, gh, gw)                                     # [gh*gw, C]
big = bicubic_resize(table, 2 * H0, 2 * W0).reshape(2 * H0, 2 * W0, C)
show(resized=pos, upsampled=big)
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
axes[0].imshow(table[:, :, 0], cmap="RdBu"); axes[0].set_title(f"table {H0}x{W0}")
axes[1].imshow(pos.reshape(gh, gw, C)[:, :, 0], cmap="RdBu"); axes[1].set_title(f"our image {gh}x{gw}")
axes[2].imshow(big[:, :, 0], cmap="RdBu"); axes[2].set_title(f"upsampled {2 * H0}x{2 * W0}")
for ax in axes: ax.axis("off")
plt.suptitle("channel 0, resized"); plt.show()

# %% [markdown]
# The model does exactly this: the trace holds the resized table under its own name.

# %%
with pykimi.trace(model, names=["vision_tower.patch_embed*", "vision_tower.encoder.rope_angles"]) as t:
    model.encode_images(pv, grid)
show(interpolated=t["vision_tower.patch_embed.pos_emb.interpolated"])
print("equal to bicubic_resize:",
      np.allclose(t["vision_tower.patch_embed.pos_emb.interpolated"], pos, atol=1e-6))

# %% [markdown]
# ## 2. 2-D RoPE
#
# Each head vector of D dims is D/2 complex pairs. With `f_i = 10000^(-4i/D)`:
# **pair 2i turns by column·f_i, pair 2i+1 by row·f_i** (spec §6.4: x first, y second, interleaved at
# pair granularity; the HF docstring says the opposite, the code does this). Rotating q and k makes
# their dot product depend on the *offset* between two patches, in both directions.

# %%
from pykimi.rope import apply_rope, vision_rope_angles, vision_rope_freqs

f = vision_rope_freqs(vc.head_dim, vc.rope_theta)                 # [D/4]
ang = vision_rope_angles(gh, gw, vc.head_dim, vc.rope_theta)      # [L, D/2]
show(freqs=f, angles=ang)
print("the model's table is the same:", np.array_equal(ang, t["vision_tower.encoder.rope_angles"]))
plt.figure(figsize=(5, 2.5)); plt.semilogy(f, "o-"); plt.xlabel("i"); plt.ylabel("f_i")
plt.title("the frequency ladder (shared by x and y)"); plt.show()

# %% [markdown]
# cos(angle) of the first pairs over the patch grid: even pairs change along x, odd pairs along y.

# %%
n = 4
fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5))
for i in range(n):
    for row, (pair, axis) in enumerate([(2 * i, "x (column)"), (2 * i + 1, "y (row)")]):
        axes[row, i].imshow(np.cos(ang[:, pair]).reshape(gh, gw), cmap="twilight", vmin=-1, vmax=1)
        axes[row, i].set_title(f"pair {pair}: {axis}, f_{i}", fontsize=8); axes[row, i].axis("off")
plt.tight_layout(); plt.show()

# %% [markdown]
# Relative positions: shifting both patches by the same offset leaves the q·k score unchanged.

# %%
rng_q = np.random.default_rng(0)
q, k = rng_q.standard_normal((2, vc.head_dim)).astype(np.float32)      # [D] each

def score(t_q, t_k):
    return float(apply_rope(q, ang[t_q]) @ apply_rope(k, ang[t_k]))

at = lambda r, c: r * gw + c                                        # patch index of (row, col)
print("q at (1,1), k at (2,4):", round(score(at(1, 1), at(2, 4)), 5))
print("q at (5,7), k at (6,10):", round(score(at(5, 7), at(6, 10)), 5), " same offset (+1, +3)")
print("q at (1,1), k at (4,2):", round(score(at(1, 1), at(4, 2)), 5), " x and y swapped: different")

# %% [markdown]
# ## 3. Attention maps over the image
#
# `pykimi.trace(..., attn_probs=[block names])` also records each block's attention probabilities
# `[heads, L, L]`. We pick the patch at the centre of a shape as the query and show where each head of
# the last block looks.

# %%
last = f"vision_tower.encoder.blocks.{vc.num_hidden_layers - 1}"
with pykimi.trace(model, names=[last], attn_probs=[last]) as t:
    model.encode_images(pv, grid)
probs = t[last + ".attn_probs"]                                     # [H, L, L]
show(attn_probs=probs)
s0 = shapes[0]
query = at(int(s0.cy // 14), int(s0.cx // 14))
print(f"query: patch {query}, the centre of the {s0.color} {s0.kind}")

# %% [markdown]
# Each head's attention from the marked patch, over the padded image (darker red: more attention). Heads
# differ: some look at the neighbours of the query, some at the other shape.

# %% tags=["thumbnail"]
from pykimi import image as kimg
arr = np.asarray(kimg.resize_and_pad(image, proc.image_settings))   # [H, W, 3]
H = probs.shape[0]
cols = min(H, 4)
fig, axes = plt.subplots((H + cols - 1) // cols, cols, figsize=(3 * cols, 2.8 * ((H + cols - 1) // cols)),
                         squeeze=False)
for h, ax in enumerate(axes.ravel()):
    ax.axis("off")
    if h >= H:
        continue
    ax.imshow(arr)
    ax.imshow(probs[h, query].reshape(gh, gw), cmap="Reds", alpha=0.65,
              extent=(-0.5, arr.shape[1] - 0.5, arr.shape[0] - 0.5, -0.5))
    r, c = divmod(query, gw)
    ax.plot(c * 14 + 7, r * 14 + 7, "c+", ms=12, mew=2)
    ax.set_title(f"head {h}", fontsize=9)
plt.suptitle(f"{last}: attention of the marked patch"); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 4. Several images: block-diagonal attention
#
# All images of a prompt are packed into one sequence of `L = Σ gh·gw` patches, but a patch only
# attends to patches of its own image (`cu_seqlens` marks the boundaries). The HF eager path gets this
# wrong (spec §11.5); here the probabilities across images are exactly zero.

# %%
image2, shapes2 = scenes.random_scene(np.random.default_rng(11), n_shapes=1)
both = proc(text="<|media_pad|><|media_pad|>", images=[image, image2])
pv2, grid2 = both["pixel_values"], both["image_grid_hws"]
from pykimi.vision import cu_seqlens
show(pixel_values=pv2, image_grid_hws=grid2, cu_seqlens=cu_seqlens(grid2))
first = "vision_tower.encoder.blocks.0"
with pykimi.trace(model, names=["multi_modal_projector"], attn_probs=[first]) as t2:
    feats_both = model.encode_images(pv2, grid2)                   # [T1 + T2, D]
p0 = t2[first + ".attn_probs"]                                      # [H, L1+L2, L1+L2]
show(features=feats_both, attn_probs=p0)
cu = cu_seqlens(grid2)
across = float(p0[:, :cu[1], cu[1]:].sum() + p0[:, cu[1]:, :cu[1]].sum())
print("probability mass across images:", across)
assert across == 0.0

# %%
plt.figure(figsize=(4, 4))
plt.imshow(np.log10(p0[0] + 1e-6), cmap="viridis")
plt.axhline(cu[1] - 0.5, color="w", lw=0.8); plt.axvline(cu[1] - 0.5, color="w", lw=0.8)
plt.title("block 0, head 0: log10 attention probability"); plt.xlabel("key patch"); plt.ylabel("query patch")
plt.colorbar(shrink=0.8); plt.show()

# %% [markdown]
# So encoding the two images together gives the same features as encoding each alone:

# %%
alone1 = model.encode_images(pv, grid)
alone2 = model.encode_images(*(lambda d: (d["pixel_values"], d["image_grid_hws"]))(
    proc(text="<|media_pad|>", images=[image2])))
together = np.concatenate([alone1, alone2])
show(alone1=alone1, alone2=alone2)
rel = float(np.abs(feats_both - together).max() / np.abs(together).max())     # scale-relative error
print("together == alone, up to float32 round-off (relative error < 1e-5):", rel < 1e-5)
assert rel < 1e-4
