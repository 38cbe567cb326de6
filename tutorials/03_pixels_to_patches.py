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
# # 03 · From pixels to patches
#
# **What it teaches.** The image preprocessing of Kimi-VL step by step (spec §5): the resize rule that caps an
# image at 4096 patches, padding to multiples of 28, normalisation to [-1, 1], and cutting into 14×14
# patches in raster order, drawn over the image.
#
# **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib, and the bundled demo
# checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes). Set the
# environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells
# on the real model (weights stay memory-mapped, so it fits in 24 GiB).
#
# **How long.** About 8 s on 2 cores, with either checkpoint (most of it drawing the patch thumbnails).

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
from pykimi import image as kimg

proc = pykimi.Processor.from_pretrained(MODEL_DIR)
settings = proc.image_settings
print(settings)
print("pad to multiples of", settings.pad_multiple, "(patch x merge)")

# %% [markdown]
# ## 1. The resize rule
#
# Count whole patches `n = (w//14)·(h//14)`. If `n > 4096`, scale both sides by `sqrt(4096/n)` (Pillow
# bicubic); images are never enlarged. Then pad right and bottom to multiples of 28, so the patch grid
# has even sides for the 2×2 merge. One image token per 2×2 patches.

# %%
for w, h in [(123, 97), (448, 448), (1024, 768), (1920, 1080), (4000, 3000), (200, 3000)]:
    rw, rh = kimg.resized_size(w, h, settings)
    pw, ph = kimg.padded_size(rw, rh, settings)
    gh, gw = kimg.grid_hw(w, h, settings)
    print(f"{w:>5}x{h:<5} -> resized {rw:>4}x{rh:<4} -> padded {pw:>4}x{ph:<4} grid {gh:>3}x{gw:<3} "
          f"= {gh * gw:>5} patches, {kimg.num_image_tokens(w, h, settings):>5} image tokens")

# %% [markdown]
# The same rule as a curve: the number of image tokens grows with the area of the image, until the cap
# shrinks every larger image back to about 4096 patches (1024 tokens).

# %%
sides = np.arange(28, 2400, 8)
toks = [kimg.num_image_tokens(int(s), int(s * 3 / 4), settings) for s in sides]
plt.figure(figsize=(6, 3)); plt.plot(sides, toks)
plt.axhline(4096 / 4, color="gray", ls="--", label="4096 patches / 4")
plt.xlabel("width of a 4:3 image (px)"); plt.ylabel("image tokens"); plt.legend()
plt.title("image tokens grow with the area until the 4096-patch cap"); plt.show()

# %% [markdown]
# ## 2. Our image: padding
#
# The demo scenes are small, so nothing is resized; padding brings both sides up to multiples of 28.

# %%
from pykimi import scenes

rng = np.random.default_rng(404)               # one of the fixed scenes of tests/test_demo.py
image, shapes = scenes.random_scene(rng)
print("image size (w, h):", image.size)
for s in shapes:
    print("  ", s)
plt.figure(figsize=(3, 2.2)); plt.imshow(image); plt.title("the scene"); plt.xticks([]); plt.yticks([]); plt.show()

# %%
padded = kimg.resize_and_pad(image, settings)
print("original", image.size, "-> padded", padded.size)
arr = np.asarray(padded)                                           # [H, W, 3] uint8
show(padded=arr)
plt.figure(figsize=(4, 4)); plt.imshow(arr)
w, h = image.size
plt.axvline(w - 0.5, color="m", ls="--"); plt.axhline(h - 0.5, color="m", ls="--")
plt.title("black padding right and bottom to multiples of 28"); plt.show()

# %% [markdown]
# ## 3. Normalisation
#
# `uint8 / 255` in float32, then `(x - 0.5) / 0.5` per channel (mean = std = 0.5 in the released
# preprocessor config). White becomes +1 and the black padding -1. Channels first: `[3, H, W]`.

# %%
x = kimg.normalize(kimg.to_rgb_array(padded), settings.image_mean, settings.image_std)   # [3, H, W]
show(x=x)
print("min", x.min(), "max", x.max())
plt.figure(figsize=(6, 2.5))
for c, col in enumerate("rgb"):
    plt.hist(x[c].ravel(), bins=50, histtype="step", color=col, label="RGB"[c])
plt.yscale("log"); plt.legend(); plt.title("normalised values per channel"); plt.show()

# %% [markdown]
# ## 4. Patches in raster order
#
# Cut `[3, H, W]` into `(H/14)·(W/14)` patches, row by row, each laid out `(channel, ky, kx)`. Patch `k`
# is at row `k // gw`, column `k % gw`.

# %%
p = settings.patch_size
patches = kimg.patchify(x, p)                                        # [gh*gw, 3, 14, 14]
gh, gw = x.shape[1] // p, x.shape[2] // p
show(patches=patches)
k = gw + 3                                                           # row 1, column 3
r, c = divmod(k, gw)
assert np.array_equal(patches[k], x[:, r * p:(r + 1) * p, c * p:(c + 1) * p])
print(f"grid {gh}x{gw}; patch {k} is the crop at row {r}, column {c}")

# %% tags=["thumbnail"]
fig, ax = plt.subplots(figsize=(7, 7))
ax.imshow(arr)
for i in range(gh + 1):
    ax.axhline(i * p - 0.5, color="k", lw=0.4)
for j in range(gw + 1):
    ax.axvline(j * p - 0.5, color="k", lw=0.4)
for k in range(gh * gw):
    r, c = divmod(k, gw)
    ax.text(c * p + p / 2, r * p + p / 2, str(k), ha="center", va="center", fontsize=5, color="tab:blue")
ax.set_title(f"the {gh}x{gw} patch grid, patches numbered in raster order"); ax.axis("off"); plt.show()

# %% [markdown]
# The patches as the model sees them (values back in [0, 1] for display):

# %%
fig, axes = plt.subplots(gh, gw, figsize=(gw * 0.45, gh * 0.45))
for k, ax in enumerate(axes.ravel()):
    ax.imshow((patches[k].transpose(1, 2, 0) + 1) / 2); ax.axis("off")
plt.subplots_adjust(wspace=0.08, hspace=0.08); plt.show()

# %% [markdown]
# ## 5. The processor does all of this
#
# `proc(text=..., images=[...])` runs the same steps and returns the patches as `pixel_values`, with the
# grid of each image in `image_grid_hws`.

# %%
inputs = proc(text="<|media_pad|>", images=[image])
show(pixel_values=inputs["pixel_values"], image_grid_hws=inputs["image_grid_hws"])
print("identical to the step-by-step patches:", np.array_equal(inputs["pixel_values"], patches))
