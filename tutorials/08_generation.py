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
# # 08 · Generation: greedy, sampling, streaming, stop tokens, timing
#
# **What it teaches.** How pykimi turns logits into an answer: greedy decoding, sampling with temperature /
# top-k / top-p (seeded, so reproducible), streaming token by token with a decoder that never splits a
# character, the two stop tokens, and where the time goes (image encoding, prefill, decode).
#
# **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib, and the bundled demo
# checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes). Set the
# environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells
# on the real model (weights stay memory-mapped, so it fits in 24 GiB).
#
# **How long.** About 8 s on 2 cores with the demo checkpoint (some twenty short answers); tens of minutes with
# the real one.

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
from pykimi.generate import filter_probs

model = pykimi.load(MODEL_DIR)
proc = pykimi.Processor.from_pretrained(MODEL_DIR)

# %%
from pykimi import scenes

rng = np.random.default_rng(404)               # one of the fixed scenes of tests/test_demo.py
image, shapes = scenes.random_scene(rng)
print("image size (w, h):", image.size)
for s in shapes:
    print("  ", s)
plt.figure(figsize=(3, 2.2)); plt.imshow(image); plt.title("the scene"); plt.xticks([]); plt.yticks([]); plt.show()


# %% [markdown]
# ## 1. Greedy decoding
#
# `temperature=0` takes the argmax at every step (the first index on ties) until a stop token. The demo
# model answers three kinds of question about its scenes; with the real model the answers are free text.

# %%
def ask(question, **kw):
    inp = proc.prepare(scenes.messages_for(question), images=[image])
    new = model.generate(inp["input_ids"], inp["pixel_values"], inp["image_grid_hws"], **kw)
    return new, proc.decode(new, skip_special=True)

for question, truth, kind in scenes.qa_pairs(shapes):
    new, text = ask(question, max_new_tokens=24)
    print(f"{question:<28} -> {text!r}" + (f"   (truth: {truth!r})" if IS_DEMO else ""))

# %% [markdown]
# ## 2. Temperature, top-k, top-p
#
# Sampling draws from `softmax(logits / T)` after filters: top-k keeps the k most likely tokens, top-p the
# smallest set whose probability reaches p. `filter_probs` shows the candidate set of one step.

# %% [markdown]
# To see the candidates, take the greedy answer and the logits of every step of it (one forward pass over
# the prompt and the answer), and find the step where the model was least sure.

# %%
inp = proc.prepare(scenes.messages_for(scenes.QUESTION_DESCRIBE), images=[image])
ids, pv, grid = inp["input_ids"], inp["pixel_values"], inp["image_grid_hws"]
answer = model.generate(ids, pv, grid, max_new_tokens=24)                 # greedy
steps = model.forward(np.concatenate([ids, answer[:-1]]), pv, grid)[len(ids) - 1:]   # [n, V] logits per answer step
top1 = np.array([filter_probs(z)[1][0] for z in steps])                  # [n] probability of the chosen token
step = int(np.argmin(top1))                                               # where the model is least sure
show(answer_step_logits=steps)
print("probability of each greedy token:", np.round(top1, 3))
print(f"least sure at step {step}: after {proc.decode(answer[:step])!r}")

# %% [markdown]
# The demo model is almost certain at every step, so the twelve most likely tokens at its least sure step
# are drawn on a log scale, at three temperatures. Dividing the logits by T < 1 sharpens the distribution,
# T > 1 flattens it: the runners-up gain probability, and more tokens are needed to reach 90 % of it.

# %% tags=["thumbnail"]
fig, axes = plt.subplots(1, 3, figsize=(11, 3), sharey=True)
for ax, T in zip(axes, [0.5, 1.0, 2.0]):
    cand, prob = filter_probs(steps[step], temperature=T)                 # sorted by probability
    kept, _ = filter_probs(steps[step], temperature=T, top_p=0.9)
    n = 12
    ax.bar(range(n), prob[:n], color=["tab:blue" if j < len(kept) else "lightgray" for j in range(n)])
    ax.set_yscale("log"); ax.set_ylim(1e-8, 1.5)
    ax.set_xticks(range(n)); ax.set_xticklabels([repr(proc.decode([int(i)]))[1:-1][:6] for i in cand[:n]],
                                                 rotation=70, fontsize=8)
    ax.set_title(f"T = {T}: {len(kept)} token(s) inside top-p 0.9", fontsize=10)
axes[0].set_ylabel("probability")
plt.suptitle(f"the next token after {proc.decode(answer[:step])!r} (blue: kept by top_p=0.9)")
plt.tight_layout(); plt.show()

# %% [markdown]
# Sampling with three seeds at three temperatures. The image does not change between samples, so we
# encode it once and pass the features (`image_features=`) instead of the pixels. At T = 1 this small
# model is so sure of itself that every seed gives the same answer; at T = 2 slips appear; at T = 3 it
# babbles.

# %%
feats = model.encode_images(pv, grid)                                     # [T, D], reused below
show(image_features=feats)
for T in (1.0, 2.0, 3.0):
    for seed in (0, 1, 2):
        new = model.generate(ids, image_features=feats, max_new_tokens=16, temperature=T, seed=seed)
        print(f"T={T:<4} seed={seed}: {proc.decode(new, skip_special=True)!r}")

# %% [markdown]
# A seed makes a sample reproducible: the same seed gives the same tokens.

# %%
a = model.generate(ids, image_features=feats, max_new_tokens=16, temperature=1.0, seed=42)
b = model.generate(ids, image_features=feats, max_new_tokens=16, temperature=1.0, seed=42)
print("same seed, same tokens:", a == b)
assert a == b

# %% [markdown]
# ## 3. Streaming
#
# `stream=True` returns an iterator: each id arrives as soon as it is chosen. The stream decoder turns ids
# into text without ever printing half a UTF-8 character. The first token waits for the image encoding
# and the prefill; the following ones each cost one decode step.

# %% tags=["timing"]
dec = proc.tokenizer.stream_decoder(skip_special=True)
stamps, t0 = [], time.perf_counter()
for tok in model.generate(ids, pv, grid, max_new_tokens=24, stream=True):
    stamps.append(time.perf_counter() - t0)
    print(dec.add(tok), end="", flush=True)
print(dec.flush())
gaps = np.diff([0.0] + stamps) * 1e3                                       # [n] ms per token
plt.figure(figsize=(7, 2.8)); plt.bar(range(len(gaps)), gaps)
plt.yscale("log"); plt.xlabel("token"); plt.ylabel("ms")
plt.title("time to each token (token 0 includes vision + prefill)"); plt.show()

# %% [markdown]
# ## 4. Stop tokens
#
# The config's `eos_token_id` is `[EOS]`, but assistant turns end with `<|im_end|>`: pykimi stops on both
# (spec §4). The stop token is part of the returned ids. With `stop_ids=[]` the model keeps going past it.

# %%
stops = model.stop_ids
print("stop ids:", stops, [proc.decode([s]) for s in stops])
new = model.generate(ids, pv, grid, max_new_tokens=24)
print("greedy ids:", new, "| ends with a stop id:", new[-1] in stops)
longer = model.generate(ids, pv, grid, max_new_tokens=len(new) + 8, stop_ids=[])
print("without stop ids:", repr(proc.decode(longer)))

# %% [markdown]
# ## 5. Where the time goes
#
# `model.last_stats` holds the timings of the last `generate`: the image encoding (MoonViT + projector),
# the prefill of the prompt, and the decode steps.

# %% tags=["timing"]
model.generate(ids, pv, grid, max_new_tokens=24, stop_ids=[])
st = dict(model.last_stats)
print(f"{st['prompt_tokens']} prompt tokens, {st['new_tokens']} new tokens")
print(f"vision {1e3 * st['encode_s']:.1f} ms, prefill {1e3 * st['prefill_s']:.1f} ms, "
      f"decode {1e3 * st['decode_s']:.1f} ms = {(st['new_tokens'] - 1) / st['decode_s']:.0f} tok/s")
parts = {k: st.get(k) or 0.0 for k in ("encode_s", "prefill_s", "decode_s")}
plt.figure(figsize=(6, 2.5))
plt.barh(list(parts), list(parts.values()), color=["tab:orange", "tab:blue", "tab:green"])
plt.xlabel("seconds")
plt.title(f"{st['prompt_tokens']} prompt tokens, {st['new_tokens']} new tokens"
          + (f", {max(st['new_tokens'] - 1, 1) / max(st['decode_s'], 1e-9):.0f} tok/s decode"
             if st.get("decode_s") else ""))
plt.show()
