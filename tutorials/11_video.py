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
# # 11 · Video as frames
#
# **What it teaches.** Kimi-VL has no video input: a clip goes in as a few of its frames, as images, each with its
# timestamp in the text. This notebook writes a small clip, samples it uniformly, shows which frames were taken
# and when, fits the frames' image budget to a context size, and runs the model on the result.
#
# **What it needs.** pykimi (this repository) with NumPy, matplotlib and PyAV (`pip install 'pykimi[video]'`).
# By default the bundled demo checkpoint (`pykimi.demo_checkpoint()`); set `PYKIMI_MODEL` to a downloaded
# Kimi-VL checkpoint to run the same cells on the real model. The clip is written to a temporary directory, removed at the end.
#
# **How long.** About 15 s on 2 cores with the demo checkpoint.

# %%
import os, sys
import numpy as np
import matplotlib.pyplot as plt
# %matplotlib inline
try:
    import pykimi
except ImportError:                      # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(".."))
    import pykimi

# a downloaded Kimi-VL checkpoint directory named by $PYKIMI_MODEL, else the bundled demo checkpoint
MODEL_DIR = os.environ.get("PYKIMI_MODEL") or os.path.relpath(pykimi.demo_checkpoint())
IS_DEMO = not os.environ.get("PYKIMI_MODEL")
print("checkpoint:", MODEL_DIR)


def show(**arrays):
    """Print the name, shape and dtype of each array (display only)."""
    for k, v in arrays.items():
        v = np.asarray(v)
        print(f"{k:<28} {str(list(v.shape)):<20} {v.dtype}")


# %%
import shutil
import tempfile

from pykimi.scenes import random_scene
from pykimi.video import fit_video, load_video, sample_times, video_inputs, write_video

proc = pykimi.Processor.from_pretrained(MODEL_DIR)
model = pykimi.load(MODEL_DIR)

# %% [markdown]
# ## A clip made of four scenes
#
# Four random scenes of the demo's shapes, each on screen for one second at 4 frames per second: 16 frames,
# 4 seconds.

# %%
rng = np.random.default_rng(7)
scenes = [random_scene(rng) for _ in range(4)]
frames = [img for img, _ in scenes for _ in range(4)]
tmp = tempfile.mkdtemp()
clip = os.path.join(tmp, "scenes.mp4")
write_video(clip, frames, fps=4)
print(os.path.basename(clip), len(frames), "frames of", frames[0].size, "at 4 frames per second")
for k, (_, shapes) in enumerate(scenes):
    print(f"second {k}:", ", ".join(f"{s.color} {s.kind}" for s in shapes))

# %% [markdown]
# ## Uniform sampling at segment centres
#
# N frames: the clip is cut into N equal segments and the frame on screen at each segment's centre is taken,
# `t_i = (i + 1/2) * duration / N`. The first and last frames (often fades) are avoided and the clip is covered
# evenly. `--fps F` asks for `round(duration * F)` frames the same way.

# %% tags=["thumbnail"]
print("requested times for 4 frames of 4 s:", sample_times(4.0, frames=4))
video = load_video(clip, frames=4)
print("taken at:", video.timestamps, "| duration", video.duration, "s |", video.sampling["frames_in_clip"],
      "frames in the clip")
fig, axes = plt.subplots(1, len(video), figsize=(10, 2.6))
for ax, img, t in zip(axes, video.frames, video.timestamps):
    ax.imshow(img)
    ax.set_title(f"t = {t:.2f} s")
    ax.axis("off")
plt.show()

# %% [markdown]
# ## The prompt: timestamps in the text
#
# There is no official Kimi-VL video template. pykimi writes one line saying what is shown, then `<t=…s>`
# before each frame's image block, then the question.

# %%
msgs = [{"role": "user", "content": "Describe the image."}]
fitted, fit = fit_video(proc, msgs, video, max_context=model.context_limit, max_new_tokens=32)
print(proc.apply_chat_template(fitted))
print(fit)

# %% [markdown]
# ## Fitting the context
#
# Every frame gets the same image budget: the largest that keeps text + all frames' image tokens + the answer's
# `max_new_tokens` within the context (`--max-context`). The budget is applied as the image processor's own
# `in_token_limit`, so frames are resized exactly like images. Tighter contexts give smaller frames.

# %%
for ctx in (2000, 400, 250, 180):
    try:
        inputs, f = video_inputs(proc, msgs, video, max_context=ctx, max_new_tokens=32)
        print(f"context {ctx:5d}: {f.tokens_per_frame:4d} tokens per frame, frames {f.grid[1]}x{f.grid[0]} px, "
              f"prompt {f.prompt_tokens} tokens + 32 new <= {ctx}")
    except pykimi.InputError as e:
        print(f"context {ctx:5d}: {e}")

# %% [markdown]
# ## Running the model
#
# The demo model was trained on one picture per question, so four frames in one prompt are new to it; each frame
# alone is described as a picture. A real Kimi-VL checkpoint answers about the whole clip.

# %%
inputs, f = video_inputs(proc, msgs, video, max_context=model.context_limit, max_new_tokens=32)
ids = model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"], max_new_tokens=32)
print("whole clip:", proc.decode(ids, skip_special=True))
for t, img in zip(video.timestamps, video.frames):
    one = proc.prepare([{"role": "user", "content": [{"type": "image", "image": img},
                                                     {"type": "text", "text": "Describe the image."}]}])
    ids = model.generate(one["input_ids"], one["pixel_values"], one["image_grid_hws"], max_new_tokens=32)
    print(f"frame at {t:.1f} s:", proc.decode(ids, skip_special=True))

# %%
shutil.rmtree(tmp)                       # the clip was only needed here
