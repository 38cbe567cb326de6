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
# # 00 · A tour of Kimi-VL in pykimi
#
# **What it teaches.** One image and one question, end to end: the processor, the vision tower (MoonViT),
# the projector, the image tokens in the prompt, the Moonlight MoE language model and greedy decoding. Then
# the trace of the whole run: every named intermediate, with its shape.
#
# **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib, and the bundled demo
# checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes). Set the
# environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells
# on the real model (weights stay memory-mapped, so it fits in 24 GiB).
#
# **How long.** About 5 s on 2 cores with the demo checkpoint; several minutes with the real one (three
# forward passes and a short answer).

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
# ## 1. Load the model and its processor
#
# `pykimi.load` opens the checkpoint directory: it parses `config.json` and the safetensors headers and
# memory-maps the weights. Nothing is converted up front. The `Processor` holds the tokenizer, the chat
# template and the image preprocessing.

# %% tags=["timing"]
t0 = time.perf_counter()
model = pykimi.load(MODEL_DIR)
proc = pykimi.Processor.from_pretrained(MODEL_DIR)
print(f"loaded in {time.perf_counter() - t0:.2f} s")

# %% [markdown]
# The configuration in brief: the vision tower, the projector, the language model and its experts, the
# parameter counts. The demo checkpoint has the real architecture at a tiny width.

# %%
print(model.config.summary().replace(model.config.path, MODEL_DIR))     # the path as given, not absolute

# %% [markdown]
# ## 2. A picture and a question
#
# The demo checkpoint was trained on synthetic scenes from `pykimi.scenes`: one to three coloured
# circles, squares and triangles on white. We draw one with a fixed seed, so we know the right answer.

# %%
from pykimi import scenes

rng = np.random.default_rng(404)               # one of the fixed scenes of tests/test_demo.py
image, shapes = scenes.random_scene(rng)
print("image size (w, h):", image.size)
for s in shapes:
    print("  ", s)
plt.figure(figsize=(3, 2.2)); plt.imshow(image); plt.title("the scene"); plt.xticks([]); plt.yticks([]); plt.show()

# %% [markdown]
# The question goes into a chat message with an image part; the chat template turns the messages into the
# prompt text, special tokens included (notebook 02 takes it apart).

# %%
question = scenes.QUESTION_DESCRIBE
messages = scenes.messages_for(question)      # [{"role": "user", "content": [image part, text part]}]
print(messages)
prompt = proc.apply_chat_template(messages)
print(prompt)

# %% [markdown]
# ## 3. The processor turns text + image into three arrays
#
# * `input_ids`: the prompt tokens, with the single `<|media_pad|>` of the template expanded to one
#   placeholder per image token;
# * `pixel_values`: the image cut into 14×14 patches, `[N, 3, 14, 14]`;
# * `image_grid_hws`: the patch grid `(gh, gw)` of each image.

# %%
inputs = proc.prepare(messages, images=[image])
ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"]
show(input_ids=ids, pixel_values=pv, image_grid_hws=grid)
n_img = int((ids == model.config.media_placeholder_token_id).sum())
gh, gw = grid[0]
print(f"grid {gh}x{gw} = {gh * gw} patches -> {n_img} image tokens (one per 2x2 patch group)")

# %% [markdown]
# ## 4. The answer
#
# `model.generate` runs the whole pipeline and decodes greedily (temperature 0) until `[EOS]` or
# `<|im_end|>`.

# %%
new_ids = model.generate(ids, pixel_values=pv, image_grid_hws=grid, max_new_tokens=24)     # a list of ids
print("new ids:", new_ids)
print("answer :", repr(proc.decode(new_ids, skip_special=True)))
if IS_DEMO:
    print("truth  :", repr(scenes.describe_answer(shapes)))

# %% [markdown]
# `model.last_stats` says what that cost: the vision tower and projector (`encode_s`), the prompt in one
# batch (`prefill_s`), then one decode step per new token (`decode_s`). Notebook 08 looks closer.

# %% tags=["timing"]
st = model.last_stats
print(f"{st['prompt_tokens']} prompt tokens, {st['new_tokens']} new tokens")
print(f"vision {1e3 * st['encode_s']:.0f} ms, prefill {1e3 * st['prefill_s']:.0f} ms, "
      f"decode {1e3 * st['decode_s']:.0f} ms")

# %% [markdown]
# ## 5. The same thing, one stage at a time
#
# 1. **Vision**: `model.encode_images` = MoonViT (patch embedding + position table, transformer blocks
#    with 2-D RoPE, final LayerNorm, 2×2 patch merger) + the projector. One row per image token, in the
#    width of the language model.
# 2. **Merge**: the token embeddings, with those rows written at the placeholder positions.
# 3. **Language model**: decoder layers (MLA attention + dense or MoE feed-forward), final norm, `lm_head`.

# %%
feats = model.encode_images(pv, grid)                      # [T, D]
embeds = model.embed(ids, image_features=feats)            # [S, D]
logits = model.forward(ids, image_features=feats)          # [S, V]
show(image_features=feats, inputs_embeds=embeds, logits=logits)
next_id = int(np.argmax(logits[-1]))
print("next token from the last position:", next_id, repr(proc.decode([next_id])),
      "| generate chose", new_ids[0])

# %% [markdown]
# ## 6. The trace of a whole run
#
# Inside `with pykimi.trace(model) as t:` every stage records its output under the checkpoint's module
# name. `t` is a mapping name → array, in execution order.

# %%
with pykimi.trace(model) as t:
    model.forward(ids, pixel_values=pv, image_grid_hws=grid)
print(len(t), "named intermediates")
first_moe = model.config.text.first_k_dense_replace
full = ("vision_tower.encoder.blocks.0.", "language_model.model.layers.0.",
        f"language_model.model.layers.{first_moe}.")
for name in t:       # block 0, layer 0 and the first MoE layer in full, then only the outputs
    if (".blocks." in name or ".layers." in name) and name.count(".") > 3 and not name.startswith(full):
        continue
    print(f"  {name:<62} {list(t[name].shape)}")

# %% [markdown]
# A picture of the run: the root-mean-square size of the residual stream after every vision block and
# every decoder layer. The vision stream and the text stream are separate sequences joined at
# `inputs_embeds`.

# %% tags=["thumbnail"]
stages = ["vision_tower.patch_embed"]
stages += [f"vision_tower.encoder.blocks.{i}" for i in range(model.config.vision.num_hidden_layers)]
stages += ["vision_tower.encoder.final_layernorm", "multi_modal_projector", "inputs_embeds"]
stages += [f"language_model.model.layers.{i}" for i in range(model.config.text.num_hidden_layers)]
stages += ["language_model.model.norm"]
rms = [float(np.sqrt(np.mean(np.square(t[s])))) for s in stages]
labels = [s.replace("vision_tower.", "v.").replace("language_model.model.", "lm.")
          .replace("encoder.blocks.", "block ").replace("layers.", "layer ") for s in stages]
plt.figure(figsize=(9, 3))
plt.bar(range(len(stages)), rms, color=["tab:orange" if s.startswith(("vision", "multi")) else "tab:blue"
                                        for s in stages])
plt.xticks(range(len(stages)), labels, rotation=70, fontsize=8)
plt.ylabel("RMS"); plt.title("size of the stream after each stage (orange: vision side)")
plt.tight_layout(); plt.show()

# %% [markdown]
# The next notebooks open each stage: the checkpoint file ([01](01_checkpoint.ipynb)), tokens and the chat
# template ([02](02_tokens_and_chat.ipynb)), pixels to patches ([03](03_pixels_to_patches.ipynb)), MoonViT
# ([04](04_moonvit.ipynb)), the merger and projector ([05](05_merger_and_projector.ipynb)), MLA attention
# ([06](06_mla.ipynb)), MoE routing ([07](07_moe_routing.ipynb)), generation ([08](08_generation.ipynb)) and
# debugging with traces ([09](09_debugging.ipynb)).
