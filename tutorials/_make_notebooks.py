"""Generate the tutorial notebooks (tutorials/NN_name.ipynb) from the cell lists below.

    python tutorials/_make_notebooks.py            # (re)write every notebook, without outputs
    python tutorials/_make_notebooks.py --check    # exit 1 if a notebook differs from this script

The notebooks are written without outputs so they stay small and reviewable; tests/test_tutorials.py
executes every one of them top to bottom. Edit the cells here, not in Jupyter, then regenerate.
Style (DESIGN.md §9): import pykimi, never redefine it; one idea per cell; the shape of every array shown;
a picture where a picture says more.
"""
from __future__ import annotations

import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text: str) -> tuple:
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str) -> tuple:
    return ("code", textwrap.dedent(text).strip("\n"))


def header(title: str, teaches: str, needs: str, time: str) -> tuple:
    return md(f"""
    # {title}

    **What it teaches.** {teaches}

    **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib. By default the bundled demo
    checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes); set the
    environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells on
    the real model (weights stay memory-mapped, so it fits in 24 GiB). {needs}

    **How long.** {time}
    """)


# The first code cell of every notebook: imports, the model directory, a shape printer.
SETUP = code('''
    import os, sys, time
    import numpy as np
    import matplotlib.pyplot as plt
    %matplotlib inline
    try:
        import pykimi
    except ImportError:                      # a source checkout without `pip install -e .`
        sys.path.insert(0, os.path.abspath(".."))
        import pykimi

    MODEL_DIR = os.environ.get("PYKIMI_MODEL") or pykimi.demo_checkpoint()
    IS_DEMO = not os.environ.get("PYKIMI_MODEL")
    print("model directory:", MODEL_DIR)


    def show(**arrays):
        """Print name, shape and dtype of each array (display only)."""
        for k, v in arrays.items():
            v = np.asarray(v)
            print(f"{k:<28} {str(list(v.shape)):<20} {v.dtype}")
''')

SCENE = code('''
    from pykimi import scenes

    rng = np.random.default_rng(404)               # one of the fixed scenes of tests/test_demo.py
    image, shapes = scenes.random_scene(rng)
    print("image size (w, h):", image.size)
    for s in shapes:
        print("  ", s)
    plt.figure(figsize=(3, 3)); plt.imshow(image); plt.title("the scene"); plt.xticks([]); plt.yticks([]); plt.show()
''')


# ================================================================================================ 00_tour
def nb_tour():
    return "00_tour.ipynb", [
        header("00 · A tour of Kimi-VL in pykimi",
               "One image and one question, end to end: the processor, the vision tower (MoonViT), the projector, "
               "the image tokens in the prompt, the Moonlight MoE language model, and greedy decoding. Then the "
               "trace of the whole run: every named intermediate, with its shape.",
               "",
               "about 10 s on 2 cores with the demo checkpoint; with the real checkpoint several minutes (four "
               "forward passes and a short answer)."),
        SETUP,
        md("""
        ## 1. Load the model and its processor

        `pykimi.load` opens the checkpoint directory: it parses `config.json` and the safetensors headers and
        memory-maps the weights. Nothing is converted up front. The `Processor` holds the tokenizer, the chat
        template and the image preprocessing.
        """),
        code('''
            t0 = time.perf_counter()
            model = pykimi.load(MODEL_DIR)
            proc = pykimi.Processor.from_pretrained(MODEL_DIR)
            print(f"loaded in {time.perf_counter() - t0:.2f} s")
            print(model.config.summary())
        '''),
        md("""
        ## 2. A picture and a question

        The demo checkpoint was trained on synthetic scenes from `pykimi.scenes`: one to three coloured
        circles, squares and triangles on white. We draw one with a fixed seed, so we know the right answer.
        """),
        SCENE,
        code('''
            question = scenes.QUESTION_DESCRIBE
            messages = scenes.messages_for(question)      # [{"role": "user", "content": [image part, text part]}]
            print(messages)
            prompt = proc.apply_chat_template(messages)
            print(prompt)
        '''),
        md("""
        ## 3. The processor turns text + image into three arrays

        * `input_ids`: the prompt tokens, with the single `<|media_pad|>` of the template expanded to one
          placeholder per image token;
        * `pixel_values`: the image cut into 14×14 patches, `[N, 3, 14, 14]`;
        * `image_grid_hws`: the patch grid `(gh, gw)` of each image.
        """),
        code('''
            inputs = proc.prepare(messages, images=[image])
            ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"]
            show(input_ids=ids, pixel_values=pv, image_grid_hws=grid)
            n_img = int((ids == model.config.media_placeholder_token_id).sum())
            gh, gw = grid[0]
            print(f"grid {gh}x{gw} = {gh * gw} patches -> {n_img} image tokens (one per 2x2 patch group)")
        '''),
        md("""
        ## 4. The answer

        `model.generate` runs the whole pipeline and decodes greedily (temperature 0) until `[EOS]` or
        `<|im_end|>`.
        """),
        code('''
            new_ids = model.generate(ids, pixel_values=pv, image_grid_hws=grid, max_new_tokens=24)
            print("new ids:", new_ids)
            print("answer :", repr(proc.decode(new_ids, skip_special=True)))
            if IS_DEMO:
                print("truth  :", repr(scenes.describe_answer(shapes)))
            print("stats  :", {k: round(v, 4) if isinstance(v, float) else v for k, v in model.last_stats.items()})
        '''),
        md("""
        ## 5. The same thing, one stage at a time

        1. **Vision**: `model.encode_images` = MoonViT (patch embedding + position table, transformer blocks
           with 2-D RoPE, final LayerNorm, 2×2 patch merger) + the projector. One row per image token, in the
           width of the language model.
        2. **Merge**: the token embeddings, with those rows written at the placeholder positions.
        3. **Language model**: decoder layers (MLA attention + dense or MoE feed-forward), final norm, `lm_head`.
        """),
        code('''
            feats = model.encode_images(pv, grid)                      # [T, D]
            embeds = model.embed(ids, image_features=feats)            # [S, D]
            logits = model.forward(ids, image_features=feats)          # [S, V]
            show(image_features=feats, inputs_embeds=embeds, logits=logits)
            next_id = int(np.argmax(logits[-1]))
            print("next token from the last position:", next_id, repr(proc.decode([next_id])),
                  "| generate chose", new_ids[0])
        '''),
        md("""
        ## 6. The trace of a whole run

        Inside `with pykimi.trace(model) as t:` every stage records its output under the checkpoint's module
        name. `t` is a mapping name → array, in execution order.
        """),
        code('''
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
        '''),
        md("""
        A picture of the run: the root-mean-square size of the residual stream after every vision block and
        every decoder layer. The vision stream and the text stream are separate sequences joined at
        `inputs_embeds`.
        """),
        code('''
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
        '''),
        md("""
        The next notebooks open each stage: the checkpoint file (01), tokens and the chat template (02), pixels
        to patches (03), MoonViT (04), the merger and projector (05), MLA attention (06), MoE routing (07),
        generation (08) and debugging with traces (09).
        """),
    ]


# ================================================================================================ 01_checkpoint
def nb_checkpoint():
    return "01_checkpoint.ipynb", [
        header("01 · The checkpoint: safetensors, memory mapping, bf16, parameter counts",
               "What is in a Kimi-VL checkpoint and how pykimi reads it without loading it: the safetensors "
               "header, zero-copy memory-mapped views, the bf16 → float32 trick (a 16-bit shift), and how many "
               "parameters the real model has in total versus how many one token actually uses.",
               "The parameter counts of the real model come from its config.json "
               "(`pykimi/data/reference_config.json`), so they need no download.",
               "about 10 s on 2 cores, with either checkpoint (only headers and a few small tensors are read)."),
        SETUP,
        md("""
        ## 1. Open the checkpoint

        `pykimi.Checkpoint.open` reads `config.json`, the shard index and each file's header. It reads no
        weights.
        """),
        code('''
            t0 = time.perf_counter()
            ckpt = pykimi.Checkpoint.open(MODEL_DIR)
            files = sorted({ckpt.info(n).file for n in ckpt.names()})
            print(f"opened in {1e3 * (time.perf_counter() - t0):.1f} ms: {len(ckpt)} tensors in {len(files)} file(s), "
                  f"{ckpt.total_bytes() / 1e6:.1f} MB of weights")
            for f in files:
                print("  ", os.path.basename(f), f"{os.path.getsize(f) / 1e6:.1f} MB")
        '''),
        md("""
        ## 2. The safetensors format, by hand

        A safetensors file is: 8 bytes (little-endian length `n`), `n` bytes of JSON, then the raw data. The
        JSON maps each tensor name to its dtype, shape and `[begin, end)` byte offsets in the data region.
        """),
        code('''
            import json, struct

            with open(files[0], "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            meta = header.pop("__metadata__", {})
            print(f"{os.path.basename(files[0])}: header of {n} bytes, {len(header)} tensors, metadata {meta}")
            for name in list(header)[:6]:
                print(f"  {name:<58} {header[name]}")
        '''),
        md("""
        ## 3. Memory mapping: a view, not a copy

        `ckpt.get(name)` returns a NumPy array that *is* the bytes of the file, mapped into memory by the OS.
        It owns no memory and is read-only; pages are read from disk only when touched. This is why the 32.8 GB
        real checkpoint opens instantly on a 24 GiB machine.
        """),
        code('''
            name = "language_model.model.layers.0.self_attn.kv_b_proj.weight"
            info = ckpt.info(name)
            raw = ckpt.get(name)
            show(raw=raw)
            print("stored dtype:", info.dtype, "| bytes:", info.nbytes, "| file offset:", info.offset)
            print("owns its memory:", raw.flags.owndata, "| writeable:", raw.flags.writeable)
        '''),
        md("""
        ## 4. The bf16 trick

        bfloat16 is the top half of a float32: same sign bit, same 8 exponent bits, 7 of the 23 mantissa bits.
        So widening is exact and needs no arithmetic: take the 16 bits as `uint16`, shift left by 16 into a
        `uint32`, and read those bits as `float32`. pykimi does this in tiles or inside the kernels, never for
        the whole model at once.
        """),
        code('''
            from pykimi.weights import bf16_to_f32, f32_to_bf16

            bits = np.ascontiguousarray(raw.reshape(-1)[:4])                   # uint16 if the file is bf16
            print("stored dtype:", info.dtype, "| raw view dtype:", raw.dtype)
            if info.dtype == "BF16":
                by_hand = (bits.astype(np.uint32) << 16).view(np.float32)     # [4]
                print("bits     :", [f"{b:016b}" for b in bits])
                print("by hand  :", by_hand)
                print("pykimi   :", bf16_to_f32(bits))
                print("ckpt.f32 :", ckpt.f32(name).reshape(-1)[:4])
        '''),
        md("The 32 bits of one value: what bf16 keeps (left) and what it drops (right)."),
        code('''
            x = np.float32(-0.15625 * 3.3)
            b32 = np.array([x]).view(np.uint32)[0]
            row = np.array([(b32 >> (31 - i)) & 1 for i in range(32)])[None, :]     # [1, 32]
            colors = np.array([0] + [1] * 8 + [2] * 23)[None, :]                   # sign, exponent, mantissa
            fig, ax = plt.subplots(figsize=(10, 1.4))
            ax.imshow(colors, cmap="Pastel1", aspect="auto", vmin=0, vmax=8)
            for i, bit in enumerate(row[0]):
                ax.text(i, 0, str(bit), ha="center", va="center", fontsize=9)
            ax.axvline(15.5, color="k", lw=2)
            ax.set_yticks([]); ax.set_xticks([0, 4.5, 20])
            ax.set_xticklabels(["sign", "exponent (8)", "mantissa (23): bf16 keeps 7, drops 16 ->"])
            ax.set_title(f"float32 {x:.6f}  ->  bf16 {bf16_to_f32(f32_to_bf16(np.array([x])))[0]:.6f}")
            plt.show()
        '''),
        md("""
        Going the other way (float32 → bf16, e.g. when writing a checkpoint) rounds to nearest-even. The
        relative error is at most 2⁻⁸ ≈ 0.4 %: bf16 keeps the range of float32 but only about 3 decimal digits.
        """),
        code('''
            x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)   # [100000]
            y = bf16_to_f32(f32_to_bf16(x))                                            # [100000]
            rel = np.abs(y - x) / np.abs(x)
            show(x=x, y=y)
            print(f"max relative error {rel.max():.5f} (bound 2^-8 = {2.0 ** -8:.5f})")
            plt.figure(figsize=(6, 2.5)); plt.hist(rel, bins=100); plt.yscale("log")
            plt.xlabel("|bf16(x) - x| / |x|"); plt.title("bf16 rounding error of 100k normal samples"); plt.show()
        '''),
        code('''
            w = ckpt.f32(name)                                                 # [out, in] float32 copy
            show(kv_b_proj=w)
            plt.figure(figsize=(6, 2.5)); plt.hist(w.ravel(), bins=200)
            plt.title(name.split("model.")[-1] + " values"); plt.show()
        '''),
        md("""
        ## 5. Where the bytes are

        Sum the header sizes by component. In an MoE model nearly everything is routed experts.
        """),
        code('''
            def component(n):
                if n.startswith("vision_tower."): return "vision tower"
                if n.startswith("multi_modal_projector."): return "projector"
                if ".mlp.experts." in n: return "routed experts"
                if "embed_tokens" in n or "lm_head" in n: return "embedding + lm_head"
                return "LM attention, norms, dense/shared FFN"

            by = {}
            for n in ckpt.names():
                by[component(n)] = by.get(component(n), 0) + ckpt.info(n).nbytes
            for k, v in sorted(by.items(), key=lambda kv: -kv[1]):
                print(f"  {k:<40} {v / 1e6:10.2f} MB")
            plt.figure(figsize=(5, 5)); plt.pie(list(by.values()), labels=list(by), autopct="%1.0f%%")
            plt.title("bytes by component (this checkpoint)"); plt.show()
        '''),
        md("""
        ## 6. Parameter counts of the real Kimi-VL-A3B-Instruct

        `KimiVLConfig.param_counts()` derives every count from the config alone. The released config.json
        ships with pykimi as `pykimi/data/reference_config.json`: 27 MoonViT blocks, 27 decoder layers (1
        dense + 26 MoE with 64 routed experts, top-6, and 2 shared experts).
        """),
        code('''
            ref_path = os.path.join(os.path.dirname(pykimi.__file__), "data", "reference_config.json")
            real = pykimi.load_config(ref_path)
            pc = real.param_counts()
            for k, v in pc.items():
                print(f"  {k:<16} {v / 1e9:8.3f} B")
            print()
            print(real.summary())
        '''),
        md("""
        "A3B": about 3 billion parameters active per token, out of 16.4 billion. Each token goes through the
        attention, the dense/shared FFNs and 6 of the 64 experts in each MoE layer (the embedding contributes
        one row, lm_head all of it).
        """),
        code('''
            lm_common = pc["language"] - pc["routed_experts"]          # everything in the LM but routed experts
            stored = {"vision + projector": pc["vision"] + pc["projector"], "LM (not routed experts)": lm_common,
                      "routed experts": pc["routed_experts"]}
            used = {"vision + projector": 0, "LM (not routed experts)": lm_common, "routed experts": pc["routed_active"]}
            fig, ax = plt.subplots(figsize=(6, 3))
            left = np.zeros(2)
            for k, c in zip(stored, ["tab:orange", "tab:blue", "tab:green"]):
                vals = np.array([stored[k], used[k]]) / 1e9
                ax.barh(["stored", "per text token"], vals, left=left, label=k, color=c)
                left += vals
            ax.set_xlabel("billion parameters"); ax.legend(fontsize=8); ax.set_title("total vs active")
            plt.tight_layout(); plt.show()
            V, H = real.text.vocab_size, real.text.hidden_size
            per_token = (pc["active_no_embed"] + V * H) * 2          # bf16 bytes read per decoded token
            print(f"bytes of weights read per decoded token (bf16, one embedding row): {per_token / 1e9:.2f} GB"
                  f" -> at 20 GB/s of memory bandwidth, at most {20e9 / per_token:.1f} tokens/s")
        '''),
        md("""
        ## 7. The one table of tensor names

        `pykimi.layout.expected_tensors(config)` lists every tensor name and shape the model reads, derived
        from the config. For the real config it regenerates all 5679 names of the released checkpoint; for
        this checkpoint it should match the file exactly.
        """),
        code('''
            from pykimi.layout import expected_tensors

            print("real model:", len(expected_tensors(real)), "tensors")
            want = dict(expected_tensors(ckpt.config))
            missing = sorted(set(want) - set(ckpt.names()))
            wrong = [n for n in want if n in ckpt and tuple(ckpt.info(n).shape) != tuple(want[n])]
            print(f"this checkpoint: {len(want)} expected, {len(missing)} missing, {len(wrong)} with a wrong shape")
        '''),
    ]


# ================================================================================================ 02_tokens_and_chat
def nb_tokens():
    return "02_tokens_and_chat.ipynb", [
        header("02 · Tokens and the chat template",
               "How text becomes ids: the pre-tokenizer regex that splits text into pieces, byte-level BPE inside "
               "each piece, the 256 special ids, the Kimi-VL chat template, and the image placeholders the "
               "processor expands to one id per image token. Also streaming decoding that never cuts a "
               "character in half.",
               "The tokenizer vocabulary `tiktoken.model` of the checkpoint directory.",
               "about 5 s on 2 cores, with either checkpoint (no model weights are read)."),
        SETUP,
        code('''
            proc = pykimi.Processor.from_pretrained(MODEL_DIR)
            tok = proc.tokenizer
            print(tok)
            print(f"{tok.n_base} base (BPE) tokens + 256 special ids = {tok.n_vocab} ids")
        '''),
        md("""
        ## 1. The pre-tokenizer

        Before BPE, a regex cuts the text into pieces; BPE never merges across pieces. Kimi's pattern has eight
        alternatives: runs of Han characters, words (with an optional leading space or punctuation mark and an
        English contraction), numbers of 1-3 digits, punctuation runs, newlines, spaces.

        Pitfall (spec §4): the pattern uses `&&`, class intersection. Python's `regex` module understands it
        only with `flags=regex.V1`; without it the letters vanish.
        """),
        code('''
            import regex
            from pykimi.tokenizer import KIMI_PAT, KIMI_PAT_ALTERNATIVES

            text = "Hello World's 12345 shapes!\\n\\n  你好世界 don't"
            print("V1:", regex.findall(KIMI_PAT, text, flags=regex.V1))
            print("V0:", regex.findall(KIMI_PAT, text), " <- wrong")
        '''),
        md("Which of the eight alternatives produced each piece:"),
        code('''
            named = regex.compile("|".join(f"(?P<a{i}>{alt})" for i, alt in enumerate(KIMI_PAT_ALTERNATIVES)),
                                  flags=regex.V1)
            labels = ["Han", "word (lower)", "word (upper)", "digits", "punct", "newlines", "spaces (!\\\\S)", "spaces"]
            for m in named.finditer(text):
                i = int(m.lastgroup[1:])
                print(f"  {m.group()!r:<14} alternative {i + 1}: {labels[i]}")
        '''),
        md("""
        ## 2. Byte-level BPE

        Inside each piece, the UTF-8 bytes start as single-byte tokens (every one of the 256 bytes has a
        rank of its own) and the adjacent pair with the lowest rank is merged, again and again.
        The result: frequent words are one token, rare strings fall back to bytes.
        """),
        code('''
            merges = sorted((r, b) for b, r in tok.mergeable_ranks.items() if len(b) > 1)
            print(f"{len(merges)} merged tokens; the first ones learned:", [b for _, b in merges[:12]])
            sentence = "A red circle and a blue square. 你好"
            ids = tok.encode(sentence)
            pieces = [tok.token_bytes(i) for i in ids]
            show(ids=ids)
            print(list(zip(ids, pieces)))
            assert tok.decode(ids) == sentence
        '''),
        code('''
            def strip(pieces, title, colors=None):
                """Draw tokens as boxes in a row (a picture of where the token boundaries are)."""
                fig, ax = plt.subplots(figsize=(12, 0.9))
                x = 0.0
                for j, p in enumerate(pieces):
                    s = p.decode("utf-8", errors="replace") if isinstance(p, bytes) else str(p)
                    w = max(len(s), 1) * 0.6 + 0.4
                    c = colors[j] if colors is not None else ("#cde" if j % 2 else "#fdc")
                    ax.add_patch(plt.Rectangle((x, 0), w, 1, color=c, ec="k", lw=0.5))
                    ax.text(x + w / 2, 0.5, s.replace(" ", "␣").replace("\\n", "⏎"), ha="center", va="center",
                            fontsize=8)
                    x += w
                ax.set_xlim(0, max(x, 1)); ax.set_ylim(0, 1); ax.axis("off"); ax.set_title(title, fontsize=9)
                plt.show()

            strip(pieces, f"{len(ids)} tokens for {len(sentence)} characters")
        '''),
        md("""
        The merge loop by hand, for one piece: start from bytes, repeatedly merge the adjacent pair whose
        concatenation has the lowest rank, stop when no adjacent pair is in the vocabulary. The result is
        exactly what the tokenizer produces.
        """),
        code('''
            def bpe_steps(piece: bytes):
                ranks = tok.mergeable_ranks
                parts = [bytes([b]) for b in piece]
                steps = [parts]
                while True:
                    cands = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                             if parts[i] + parts[i + 1] in ranks]
                    if not cands:
                        return steps
                    _, i = min(cands)                                   # the lowest rank merges first
                    parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
                    steps.append(parts)

            steps = bpe_steps(" circle".encode())
            for st in steps:
                print(st)
            assert [tok.mergeable_ranks[b] for b in steps[-1]] == tok.encode(" circle")
        '''),
        md("""
        ## 3. Special tokens

        The last 256 ids are special: `[BOS]`, `[EOS]`, the chat roles, the media markers, and reserved ids.
        In the real model they are 163584-163839; a small vocabulary keeps the same offsets after its own
        base tokens. They are recognised in text only when asked (`allow_special=True`).
        """),
        code('''
            named_specials = {n: i for n, i in tok.special_ids.items() if not n.startswith("<|reserved")}
            for n, i in sorted(named_specials.items(), key=lambda kv: kv[1]):
                print(f"  {i:>7}  {n}")
            print("as text   :", tok.encode("<|im_end|>"))
            print("as special:", tok.encode("<|im_end|>", allow_special=True))
        '''),
        md("""
        ## 4. The chat template

        No newlines, no BOS: each message is `<|im_{role}|>role<|im_middle|>content<|im_end|>`. A default
        system turn ("You are a helpful assistant", no final period) is added when the first message is not
        a system message, and the generation prompt `<|im_assistant|>assistant<|im_middle|>` ends the prompt.
        """),
        code('''
            print(proc.apply_chat_template([{"role": "user", "content": "How many shapes are there?"}]))
            print()
            print(proc.apply_chat_template([
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            ]))
        '''),
        md("""
        ## 5. Image placeholders

        An image part becomes `<|media_start|>image<|media_content|><|media_pad|><|media_end|>`. The processor
        expands that single `<|media_pad|>` into one placeholder id per image token: (gh/2)·(gw/2) for a grid of
        gh×gw patches. Later the model overwrites the embeddings at these positions with the image features.
        """),
        SCENE,
        code('''
            inputs = proc.prepare(scenes.messages_for("How many shapes are there?"), images=[image])
            ids = inputs["input_ids"]
            show(input_ids=ids, image_grid_hws=inputs["image_grid_hws"])
            pad = proc.media_placeholder_token_id
            gh, gw = inputs["image_grid_hws"][0]
            print(f"{int((ids == pad).sum())} placeholders = ({gh}/2)*({gw}/2)")
        '''),
        code('''
            kind = np.where(ids == pad, 2, np.where(ids >= tok.n_base, 1, 0))          # [S] 0 text, 1 special, 2 image
            W = 32
            grid = np.full(((len(ids) + W - 1) // W) * W, -1)
            grid[:len(ids)] = kind
            cmap = plt.matplotlib.colors.ListedColormap(["white", "#8ecae6", "#ffb703", "#e76f51"])
            plt.figure(figsize=(8, 2.5))
            plt.imshow(grid.reshape(-1, W), cmap=cmap, vmin=-1, vmax=2)
            plt.title("the prompt, 32 ids per row: blue text, yellow special, red image placeholders", fontsize=9)
            plt.xticks([]); plt.yticks([]); plt.show()
            print(proc.decode(ids[:40]), "...")
        '''),
        md("The number of placeholders must match the images: a mismatch is a one-line error, not a crash later."),
        code('''
            try:
                proc(text="<|media_pad|> and <|media_pad|>", images=[image])
            except pykimi.InputError as e:
                print("InputError:", e)
        '''),
        md("""
        ## 6. Streaming decoding

        When tokens are printed as they are generated, a character can be split across tokens (byte-level BPE:
        `中` is 3 UTF-8 bytes). The stream decoder holds incomplete bytes back until the character is whole.
        """),
        code('''
            ids = tok.encode("ok 中文")
            dec = tok.stream_decoder()
            for i in ids:
                out = dec.add(i)
                print(f"id {i:>4} bytes {tok.token_bytes(i)!r:<16} -> emits {out!r:<6} pending {dec.pending!r}")
            print("flush:", repr(dec.flush()))
            print("stop ids:", proc.stop_ids, [tok.decode([i]) for i in proc.stop_ids])
        '''),
    ]


# ================================================================================================ 03_pixels_to_patches
def nb_pixels():
    return "03_pixels_to_patches.ipynb", [
        header("03 · From pixels to patches",
               "The image preprocessing of Kimi-VL, step by step (spec §5): the resize rule that caps an image at "
               "4096 patches, padding to multiples of 28, normalisation to [-1, 1], and cutting into 14×14 "
               "patches in raster order. The patch grid is drawn over the image.",
               "",
               "about 10 s on 2 cores, with either checkpoint (most of it drawing the patch thumbnails)."),
        SETUP,
        code('''
            from pykimi import image as kimg

            proc = pykimi.Processor.from_pretrained(MODEL_DIR)
            settings = proc.image_settings
            print(settings)
            print("pad to multiples of", settings.pad_multiple, "(patch x merge)")
        '''),
        md("""
        ## 1. The resize rule

        Count whole patches `n = (w//14)·(h//14)`. If `n > 4096`, scale both sides by `sqrt(4096/n)` (Pillow
        bicubic); images are never enlarged. Then pad right and bottom to multiples of 28, so the patch grid
        has even sides for the 2×2 merge. One image token per 2×2 patches.
        """),
        code('''
            for w, h in [(123, 97), (448, 448), (1024, 768), (1920, 1080), (4000, 3000), (200, 3000)]:
                rw, rh = kimg.resized_size(w, h, settings)
                pw, ph = kimg.padded_size(rw, rh, settings)
                gh, gw = kimg.grid_hw(w, h, settings)
                print(f"{w:>5}x{h:<5} -> resized {rw:>4}x{rh:<4} -> padded {pw:>4}x{ph:<4} grid {gh:>3}x{gw:<3} "
                      f"= {gh * gw:>5} patches, {kimg.num_image_tokens(w, h, settings):>5} image tokens")
        '''),
        code('''
            sides = np.arange(28, 2400, 8)
            toks = [kimg.num_image_tokens(int(s), int(s * 3 / 4), settings) for s in sides]
            plt.figure(figsize=(6, 3)); plt.plot(sides, toks)
            plt.axhline(4096 / 4, color="gray", ls="--", label="4096 patches / 4")
            plt.xlabel("width of a 4:3 image (px)"); plt.ylabel("image tokens"); plt.legend()
            plt.title("image tokens grow with the area until the 4096-patch cap"); plt.show()
        '''),
        md("## 2. Our image: padding"),
        SCENE,
        code('''
            padded = kimg.resize_and_pad(image, settings)
            print("original", image.size, "-> padded", padded.size)
            arr = np.asarray(padded)                                           # [H, W, 3] uint8
            show(padded=arr)
            plt.figure(figsize=(4, 4)); plt.imshow(arr)
            w, h = image.size
            plt.axvline(w - 0.5, color="m", ls="--"); plt.axhline(h - 0.5, color="m", ls="--")
            plt.title("black padding right and bottom to multiples of 28"); plt.show()
        '''),
        md("""
        ## 3. Normalisation

        `uint8 / 255` in float32, then `(x - 0.5) / 0.5` per channel (mean = std = 0.5 in the released
        preprocessor config). White becomes +1 and the black padding -1. Channels first: `[3, H, W]`.
        """),
        code('''
            x = kimg.normalize(kimg.to_rgb_array(padded), settings.image_mean, settings.image_std)   # [3, H, W]
            show(x=x)
            print("min", x.min(), "max", x.max())
            plt.figure(figsize=(6, 2.5))
            for c, col in enumerate("rgb"):
                plt.hist(x[c].ravel(), bins=50, histtype="step", color=col, label="RGB"[c])
            plt.yscale("log"); plt.legend(); plt.title("normalised values per channel"); plt.show()
        '''),
        md("""
        ## 4. Patches in raster order

        Cut `[3, H, W]` into `(H/14)·(W/14)` patches, row by row, each laid out `(channel, ky, kx)`. Patch `k`
        is at row `k // gw`, column `k % gw`.
        """),
        code('''
            p = settings.patch_size
            patches = kimg.patchify(x, p)                                        # [gh*gw, 3, 14, 14]
            gh, gw = x.shape[1] // p, x.shape[2] // p
            show(patches=patches)
            k = gw + 3                                                           # row 1, column 3
            r, c = divmod(k, gw)
            assert np.array_equal(patches[k], x[:, r * p:(r + 1) * p, c * p:(c + 1) * p])
            print(f"grid {gh}x{gw}; patch {k} is the crop at row {r}, column {c}")
        '''),
        code('''
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
        '''),
        md("The patches as the model sees them (values back in [0, 1] for display):"),
        code('''
            fig, axes = plt.subplots(gh, gw, figsize=(gw * 0.45, gh * 0.45))
            for k, ax in enumerate(axes.ravel()):
                ax.imshow((patches[k].transpose(1, 2, 0) + 1) / 2); ax.axis("off")
            plt.subplots_adjust(wspace=0.08, hspace=0.08); plt.show()
        '''),
        md("## 5. The processor does all of this"),
        code('''
            inputs = proc(text="<|media_pad|>", images=[image])
            show(pixel_values=inputs["pixel_values"], image_grid_hws=inputs["image_grid_hws"])
            print("identical to the step-by-step patches:", np.array_equal(inputs["pixel_values"], patches))
        '''),
    ]



# ================================================================================================ 04_moonvit
def nb_moonvit():
    return "04_moonvit.ipynb", [
        header("04 · MoonViT: position table, 2-D RoPE, attention over the image",
               "The vision tower's two position signals: a learned 2-D position table resized bicubically to each "
               "image's patch grid, and 2-D rotary embeddings whose pairs alternate between the x (column) and "
               "y (row) axes. Then attention maps of each head over the image, and the block-diagonal attention "
               "that keeps several images apart in one packed sequence.",
               "",
               "about 10 s on 2 cores with the demo checkpoint; a few minutes with the real one (vision tower "
               "only)."),
        SETUP,
        code('''
            model = pykimi.load(MODEL_DIR)
            proc = pykimi.Processor.from_pretrained(MODEL_DIR)
            vc = model.config.vision
            print(f"MoonViT: {vc.num_hidden_layers} blocks, width {vc.hidden_size}, {vc.num_attention_heads} heads of "
                  f"{vc.head_dim}, position table {vc.init_pos_emb_height}x{vc.init_pos_emb_width}")
        '''),
        SCENE,
        code('''
            inputs = proc(text="<|media_pad|>", images=[image])
            pv, grid = inputs["pixel_values"], inputs["image_grid_hws"]
            gh, gw = (int(v) for v in grid[0])
            L = gh * gw
            show(pixel_values=pv, image_grid_hws=grid)
        '''),
        md("""
        ## 1. The learned position table

        `vision_tower.patch_embed.pos_emb.weight` is a `[64, 64, C]` table in the real model (rows, columns,
        channels). Every image gets its own copy resized to its patch grid `(gh, gw)` with torch's bicubic
        interpolation (A = -0.75, align_corners=False, no antialias), and added to the patch embeddings.
        """),
        code('''
            table = model.ckpt.f32("vision_tower.patch_embed.pos_emb.weight")     # [H0, W0, C]
            H0, W0, C = table.shape
            show(table=table)
            fig, axes = plt.subplots(1, 4, figsize=(11, 3))
            for ax, ch in zip(axes, [0, 1, 2, 3]):
                ax.imshow(table[:, :, ch], cmap="RdBu"); ax.set_title(f"channel {ch}"); ax.axis("off")
            plt.suptitle("the position table, a few channels"); plt.show()
        '''),
        md("""
        Bicubic resizing is linear, so it is a matrix along each axis: `bicubic_matrix(in, out)` has one row of
        weights per output position. The cubic kernel has small negative lobes.
        """),
        code('''
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
        '''),
        code('''
            pos = bicubic_resize(table, gh, gw)                                     # [gh*gw, C]
            big = bicubic_resize(table, 2 * H0, 2 * W0).reshape(2 * H0, 2 * W0, C)
            show(resized=pos, upsampled=big)
            fig, axes = plt.subplots(1, 3, figsize=(11, 3))
            axes[0].imshow(table[:, :, 0], cmap="RdBu"); axes[0].set_title(f"table {H0}x{W0}")
            axes[1].imshow(pos.reshape(gh, gw, C)[:, :, 0], cmap="RdBu"); axes[1].set_title(f"our image {gh}x{gw}")
            axes[2].imshow(big[:, :, 0], cmap="RdBu"); axes[2].set_title(f"upsampled {2 * H0}x{2 * W0}")
            for ax in axes: ax.axis("off")
            plt.suptitle("channel 0, resized"); plt.show()
        '''),
        md("The model does exactly this: the trace holds the resized table under its own name."),
        code('''
            with pykimi.trace(model, names=["vision_tower.patch_embed*", "vision_tower.encoder.rope_angles"]) as t:
                model.encode_images(pv, grid)
            show(interpolated=t["vision_tower.patch_embed.pos_emb.interpolated"])
            print("equal to bicubic_resize:",
                  np.allclose(t["vision_tower.patch_embed.pos_emb.interpolated"], pos, atol=1e-6))
        '''),
        md("""
        ## 2. 2-D RoPE

        Each head vector of D dims is D/2 complex pairs. With `f_i = 10000^(-4i/D)`:
        **pair 2i turns by column·f_i, pair 2i+1 by row·f_i** (spec §6.4: x first, y second, interleaved at
        pair granularity; the HF docstring says the opposite, the code does this). Rotating q and k makes
        their dot product depend on the *offset* between two patches, in both directions.
        """),
        code('''
            from pykimi.rope import apply_rope, vision_rope_angles, vision_rope_freqs

            f = vision_rope_freqs(vc.head_dim, vc.rope_theta)                 # [D/4]
            ang = vision_rope_angles(gh, gw, vc.head_dim, vc.rope_theta)      # [L, D/2]
            show(freqs=f, angles=ang)
            print("the model's table is the same:", np.array_equal(ang, t["vision_tower.encoder.rope_angles"]))
            plt.figure(figsize=(5, 2.5)); plt.semilogy(f, "o-"); plt.xlabel("i"); plt.ylabel("f_i")
            plt.title("the frequency ladder (shared by x and y)"); plt.show()
        '''),
        md("cos(angle) of the first pairs over the patch grid: even pairs change along x, odd pairs along y."),
        code('''
            n = 4
            fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5))
            for i in range(n):
                for row, (pair, axis) in enumerate([(2 * i, "x (column)"), (2 * i + 1, "y (row)")]):
                    axes[row, i].imshow(np.cos(ang[:, pair]).reshape(gh, gw), cmap="twilight", vmin=-1, vmax=1)
                    axes[row, i].set_title(f"pair {pair}: {axis}, f_{i}", fontsize=8); axes[row, i].axis("off")
            plt.tight_layout(); plt.show()
        '''),
        md("Relative positions: shifting both patches by the same offset leaves the q·k score unchanged."),
        code('''
            rng_q = np.random.default_rng(0)
            q, k = rng_q.standard_normal((2, vc.head_dim)).astype(np.float32)      # [D] each

            def score(t_q, t_k):
                return float(apply_rope(q, ang[t_q]) @ apply_rope(k, ang[t_k]))

            at = lambda r, c: r * gw + c                                        # patch index of (row, col)
            print("q at (1,1), k at (2,4):", round(score(at(1, 1), at(2, 4)), 5))
            print("q at (5,7), k at (6,10):", round(score(at(5, 7), at(6, 10)), 5), " same offset (+1, +3)")
            print("q at (1,1), k at (4,2):", round(score(at(1, 1), at(4, 2)), 5), " x and y swapped: different")
        '''),
        md("""
        ## 3. Attention maps over the image

        `pykimi.trace(..., attn_probs=[block names])` also records each block's attention probabilities
        `[heads, L, L]`. We pick the patch at the centre of a shape as the query and show where each head of
        the last block looks.
        """),
        code('''
            last = f"vision_tower.encoder.blocks.{vc.num_hidden_layers - 1}"
            with pykimi.trace(model, names=[last], attn_probs=[last]) as t:
                model.encode_images(pv, grid)
            probs = t[last + ".attn_probs"]                                     # [H, L, L]
            show(attn_probs=probs)
            s0 = shapes[0]
            query = at(int(s0.cy // 14), int(s0.cx // 14))
            print(f"query: patch {query}, the centre of the {s0.color} {s0.kind}")
        '''),
        code('''
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
                ax.imshow(probs[h, query].reshape(gh, gw), cmap="magma", alpha=0.6,
                          extent=(-0.5, arr.shape[1] - 0.5, arr.shape[0] - 0.5, -0.5))
                r, c = divmod(query, gw)
                ax.plot(c * 14 + 7, r * 14 + 7, "c+", ms=12, mew=2)
                ax.set_title(f"head {h}", fontsize=9)
            plt.suptitle(f"{last}: attention of the marked patch"); plt.tight_layout(); plt.show()
        '''),
        md("""
        ## 4. Several images: block-diagonal attention

        All images of a prompt are packed into one sequence of `L = Σ gh·gw` patches, but a patch only
        attends to patches of its own image (`cu_seqlens` marks the boundaries). The HF eager path gets this
        wrong (spec §11.5); here the probabilities across images are exactly zero.
        """),
        code('''
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
        '''),
        code('''
            plt.figure(figsize=(5, 5))
            plt.imshow(np.log10(p0[0] + 1e-6), cmap="viridis")
            plt.axhline(cu[1] - 0.5, color="w", lw=0.8); plt.axvline(cu[1] - 0.5, color="w", lw=0.8)
            plt.title("block 0, head 0: log10 attention probability"); plt.xlabel("key patch"); plt.ylabel("query patch")
            plt.colorbar(shrink=0.8); plt.show()
        '''),
        md("So encoding the two images together gives the same features as encoding each alone:"),
        code('''
            alone1 = model.encode_images(pv, grid)
            alone2 = model.encode_images(*(lambda d: (d["pixel_values"], d["image_grid_hws"]))(
                proc(text="<|media_pad|>", images=[image2])))
            together = np.concatenate([alone1, alone2])
            show(alone1=alone1, alone2=alone2)
            err = float(np.abs(feats_both - together).max())
            print("max |together - alone|:", err)
            assert err <= 1e-4 * float(np.abs(together).max())
        '''),
    ]


# ================================================================================================ 05_merger_and_projector
def nb_merger():
    return "05_merger_and_projector.ipynb", [
        header("05 · The patch merger, the projector, and image tokens in the text",
               "How MoonViT's patches become language-model tokens: the 2×2 merge (which four patches, in which "
               "order), the projector (LayerNorm on each of the four sub-vectors, linear, exact GELU, linear), "
               "and where the resulting rows land in the prompt.",
               "",
               "about 10 s on 2 cores with the demo checkpoint; a few minutes with the real one (vision tower "
               "and projector only)."),
        SETUP,
        code('''
            from pykimi.vision import gelu_erf, gelu_tanh, layer_norm, patch_merger, projector

            model = pykimi.load(MODEL_DIR)
            proc = pykimi.Processor.from_pretrained(MODEL_DIR)
            vc, tc = model.config.vision, model.config.text
            kh, kw = vc.merge_kernel_size
        '''),
        SCENE,
        code('''
            inputs = proc.prepare(scenes.messages_for("Describe the image."), images=[image])
            ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"]
            gh, gw = (int(v) for v in grid[0])
            names = ["vision_tower.encoder.final_layernorm", "vision_tower.merger", "multi_modal_projector*",
                     "inputs_embeds"]
            with pykimi.trace(model, names=names) as t:
                embeds = model.embed(ids, pv, grid)                      # vision + projector + merge, no LM
            for n in t:
                show(**{n.split(".")[-1] if "." in n else n: t[n]})
        '''),
        md("""
        ## 1. The 2×2 merge

        Per image, the `[gh·gw, C]` patches are viewed as `(gh/2, 2, gw/2, 2, C)`, permuted to
        `(gh/2, gw/2, 2, 2, C)` and reshaped to `[(gh/2)·(gw/2), 4, C]`: each merged token holds its four patches
        in the order **top-left, top-right, bottom-left, bottom-right**, and merged tokens follow raster order.

        Merging a column of patch *indices* shows which patches go where.
        """),
        code('''
            L = gh * gw
            idx = patch_merger(np.arange(L, dtype=np.float32)[:, None], grid, (kh, kw))[:, :, 0].astype(int)  # [T, 4]
            show(index_map=idx)
            print("merged token 0 <- patches", idx[0], "| token 1 <- patches", idx[1])
            merged, fin = t["vision_tower.merger"], t["vision_tower.encoder.final_layernorm"]   # [T, 4, C], [L, C]
            print("merger output == final_layernorm rows at those indices:", np.array_equal(merged, fin[idx]))
        '''),
        code('''
            fig, ax = plt.subplots(figsize=(gw * 0.55, gh * 0.55))
            tok_of = np.zeros(L, int); sub_of = np.zeros(L, int)
            for tkn, row in enumerate(idx):
                tok_of[row] = tkn; sub_of[row] = np.arange(kh * kw)
            ax.imshow((tok_of.reshape(gh, gw) * 7919) % 17, cmap="tab20", alpha=0.8)
            sub_names = ["TL", "TR", "BL", "BR"]
            for k in range(L):
                r, c = divmod(k, gw)
                ax.text(c, r, f"{tok_of[k]}\\n{sub_names[sub_of[k]]}", ha="center", va="center", fontsize=6)
            ax.set_xticks([]); ax.set_yticks([])
            ax.set_title("patch grid: merged token id and sub-token slot"); plt.show()
        '''),
        md("""
        ## 2. The projector

        `multi_modal_projector`: LayerNorm(C) applied to **each of the four sub-vectors separately**, then concat
        to 4C, `linear_1` (4C → 4C), exact erf GELU, `linear_2` (4C → text hidden size).
        """),
        code('''
            w = model.vision.projector_weights()                        # float32 copies, short names
            show(**{k.replace(".", "_"): v for k, v in w.items()})
        '''),
        code('''
            pre = layer_norm(merged, w["pre_norm.weight"], w["pre_norm.bias"])                  # [T, 4, C]
            wrong = layer_norm(merged.reshape(len(merged), -1), np.tile(w["pre_norm.weight"], 4),
                               np.tile(w["pre_norm.bias"], 4)).reshape(merged.shape)          # one norm over 4C
            show(pre_norm=pre)
            print("per-sub-vector LayerNorm == trace:", np.allclose(pre, t["multi_modal_projector.pre_norm"], atol=1e-6))
            print("a single LayerNorm over 4C would differ by up to", float(np.abs(wrong - pre).max()))
        '''),
        md("The projector's GELU is the exact (erf) one; MoonViT's MLP uses the tanh approximation. They differ by at most ~5e-4 (spec §7)."),
        code('''
            xs = np.linspace(-5, 3, 400).astype(np.float32)
            fig, axes = plt.subplots(1, 3, figsize=(13, 3))
            axes[0].plot(xs, gelu_erf(xs), label="erf (projector)"); axes[0].plot(xs, gelu_tanh(xs), "--", label="tanh (ViT MLP)")
            axes[0].legend(); axes[0].set_title("GELU")
            axes[1].plot(xs, gelu_erf(xs) - gelu_tanh(xs)); axes[1].set_title("erf - tanh")
            axes[2].hist(t["multi_modal_projector.linear_1"].ravel(), bins=100)
            axes[2].set_title("linear_1 outputs: the GELU's inputs"); plt.show()
        '''),
        code('''
            feats = projector(merged, w)                                          # [T, text hidden]
            show(image_features=feats)
            print("equal to the model's projector output:", np.allclose(feats, t["multi_modal_projector"], atol=1e-5))
        '''),
        md("""
        ## 3. Image tokens in the text

        `inputs_embeds` is the token embedding of every id, except that the k-th placeholder position receives
        the k-th projector row (spec §8.1). The LM then treats them as ordinary tokens at positions 0..S-1.
        """),
        code('''
            pad = model.config.media_placeholder_token_id
            where = np.flatnonzero(ids == pad)                                    # [T]
            show(placeholder_positions=where, inputs_embeds=embeds)
            print(f"placeholders at positions {where[0]}..{where[-1]} ({len(where)} of {len(ids)})")
            print("rows replaced by the image features:", np.array_equal(embeds[where], feats))
        '''),
        code('''
            norms = np.linalg.norm(embeds, axis=1)                                # [S]
            plt.figure(figsize=(10, 2.8))
            plt.bar(np.arange(len(ids)), norms, color=np.where(ids == pad, "tab:red", "tab:blue"), width=1.0)
            plt.xlabel("position"); plt.ylabel("|embedding|")
            plt.title("inputs_embeds: text tokens (blue) and image tokens (red)"); plt.show()
        '''),
        md("Each image token covers a 28×28 pixel cell. Cosine similarity of every image token to the one at the first shape's centre, drawn on the merged grid:"),
        code('''
            s0 = shapes[0]
            ref = int(s0.cy // 28) * (gw // kw) + int(s0.cx // 28)
            fn = feats / np.linalg.norm(feats, axis=1, keepdims=True)
            sim = (fn @ fn[ref]).reshape(gh // kh, gw // kw)                      # [gh/2, gw/2]
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
            axes[0].imshow(image); axes[0].set_title("image"); axes[0].axis("off")
            im = axes[1].imshow(sim, cmap="viridis"); axes[1].plot(ref % (gw // kw), ref // (gw // kw), "r+", ms=12)
            axes[1].set_title(f"similarity to the token on the {s0.color} {s0.kind}"); plt.colorbar(im, ax=axes[1])
            plt.show()
        '''),
    ]



# ================================================================================================ 06_mla
def nb_mla():
    return "06_mla.ipynb", [
        header("06 · MLA: multi-head latent attention",
               "DeepSeek-V3's attention as the Moonlight LM uses it, one step at a time on layer 0: the queries, "
               "the compressed latent `c` and the shared rotary key `k_pe`; the expanded form (prefill) that "
               "rebuilds per-head keys and values; the absorbed form (decode) that folds `kv_b_proj` into the "
               "query and the output and attends directly over the latent cache, checked equal to the expanded "
               "form; and what the latent cache saves for the real model.",
               "",
               "about 10 s on 2 cores with the demo checkpoint; several minutes with the real one (two forward "
               "passes)."),
        SETUP,
        code('''
            from pykimi import attention as mla
            from pykimi import kernels
            from pykimi.cache import LatentCache

            model = pykimi.load(MODEL_DIR)
            proc = pykimi.Processor.from_pretrained(MODEL_DIR)
            tc = model.config.text
            H, dn, dr, dv, R = (tc.num_attention_heads, tc.qk_nope_head_dim, tc.qk_rope_head_dim, tc.v_head_dim,
                                tc.kv_lora_rank)
            print(f"{H} heads; q/k = {dn} (no position) + {dr} (rotary) = {dn + dr}; v = {dv}; latent rank {R}; "
                  f"hidden {tc.hidden_size}")
        '''),
        SCENE,
        code('''
            inputs = proc.prepare(scenes.messages_for("How many shapes are there?"), images=[image])
            ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"]
            x = model.embed(ids, pv, grid)                                  # [S, D] inputs_embeds
            S = len(ids)
            positions = np.arange(S)
            lw = model.layer_weights(0)
            w = lw.attn                                                     # MLAWeights of layer 0
            h = mla.rms_norm(x, lw.input_layernorm, tc.rms_norm_eps)        # [S, D] the attention's input
            show(inputs_embeds=x, h=h)
            for k in ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
                print(f"  self_attn.{k:<22} {list(np.shape(getattr(w, k)) if isinstance(getattr(w, k), np.ndarray) else getattr(w, k).shape)}")
        '''),
        md("""
        ## 1. Projections

        * `q = q_proj(h)` → `[S, H, dn + dr]`, split into `q_nope` and `q_pe` (no q-LoRA in this model);
        * `kv_a_proj_with_mqa(h)` → `[S, R + dr]`: the latent `c` (then RMSNorm with eps 1e-6) and **one**
          rotary key `k_pe` shared by all heads;
        * RoPE on `q_pe` and `k_pe` (interleaved pairs, θ from the config).

        Only `c` and `k_pe` need to be cached: `R + dr` numbers per token per layer.
        """),
        code('''
            q_nope, q_pe, c, k_pe = mla.mla_project(h, w, positions, tc)
            show(q_nope=q_nope, q_pe=q_pe, c=c, k_pe=k_pe)
        '''),
        md("""
        ## 2. The expanded form (prefill)

        `kv_b_proj` (`[H·(dn+dv), R]`) expands every cached latent into per-head `k_nope` and `v`. Scores are
        `(q_nope·k_nope + q_pe·k_pe) / sqrt(dn + dr)`, causal, softmax in fp32.
        """),
        code('''
            kvb = w.kv_b_f32 if w.kv_b_f32 is not None else w.kv_b_proj.f32()        # [H*(dn+dv), R]
            kv = (c @ kvb.T).reshape(S, H, dn + dv)                                   # [S, H, dn+dv]
            k_nope, v = kv[..., :dn], kv[..., dn:]                                    # [S, H, dn], [S, H, dv]
            scale = (dn + dr) ** -0.5
            scores = (np.einsum("shd,thd->hst", q_nope, k_nope)
                      + np.einsum("shd,td->hst", q_pe, k_pe)) * scale                # [H, S, S]
            scores[:, np.triu(np.ones((S, S), bool), 1)] = -np.inf                    # causal mask
            p = mla.softmax(scores)                                                   # [H, S, S]
            o = np.einsum("hst,thd->shd", p, v).reshape(S, H * dv)                    # [S, H*dv]
            out_expanded = kernels.matmul(o, w.o_proj)                                # [S, D]
            show(kv_b_proj=kvb, k_nope=k_nope, v=v, scores=scores, probs=p, out=out_expanded)
        '''),
        code('''
            cache = LatentCache.for_config(tc, capacity=S)
            out_lib = mla.mla_prefill(h, w, cache, 0, positions, tc)                  # [S, D]
            show(mla_prefill=out_lib, cache_rows=cache.rows(0))
            print("by hand == pykimi.attention.mla_prefill:", np.allclose(out_expanded, out_lib, atol=1e-5))
        '''),
        code('''
            pad = model.config.media_placeholder_token_id
            img = np.flatnonzero(ids == pad)
            cols = min(H, 4)
            fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.3))
            for hh, ax in enumerate(np.atleast_1d(axes)):
                ax.imshow(np.log10(p[hh] + 1e-6), cmap="viridis", vmin=-4, vmax=0)
                for xline in (img[0] - 0.5, img[-1] + 0.5):
                    ax.axvline(xline, color="r", ls="--", lw=0.8)
                ax.set_title(f"head {hh}", fontsize=9); ax.set_xlabel("key"); ax.set_ylabel("query")
            plt.suptitle("layer 0 attention (log10 p); image-token keys between the red lines"); plt.tight_layout(); plt.show()
        '''),
        md("""
        ## 3. The absorbed form (decode)

        Split `kv_b_proj` per head into `W_uk [dn, R]` and `W_uv [dv, R]`. Then
        `q_nope·k_nope = q_nope·(W_uk c) = (W_ukᵀ q_nope)·c`: map the *query* into latent space once
        (`q_lat`, R numbers per head) and score it directly against the cached latents. Likewise
        `Σ p·v = W_uv (Σ p·c)`. Nothing of size `positions × heads × (dn + dv)` is ever built.
        """),
        code('''
            Wkv = kvb.reshape(H, dn + dv, R)
            W_uk, W_uv = Wkv[:, :dn], Wkv[:, dn:]                                     # [H, dn, R], [H, dv, R]
            q_lat = np.einsum("shd,hdr->shr", q_nope, W_uk)                           # [S, H, R]
            scores_abs = (np.einsum("shr,tr->hst", q_lat, c)
                          + np.einsum("shd,td->hst", q_pe, k_pe)) * scale            # [H, S, S]
            scores_abs[:, np.triu(np.ones((S, S), bool), 1)] = -np.inf
            p_abs = mla.softmax(scores_abs)
            o_lat = np.einsum("hst,tr->shr", p_abs, c)                                # [S, H, R]
            o_abs = np.einsum("shr,hdr->shd", o_lat, W_uv).reshape(S, H * dv)         # [S, H*dv]
            show(W_uk=W_uk, W_uv=W_uv, q_lat=q_lat, o_lat=o_lat)
            finite = np.isfinite(scores)
            print("max |scores_abs - scores|:", float(np.abs(scores_abs[finite] - scores[finite]).max()))
            print("max |o_abs - o|          :", float(np.abs(o_abs - o).max()))
            assert np.abs(o_abs - o).max() <= 1e-4 * np.abs(o).max()
        '''),
        md("""
        pykimi's decode path does the same over the cache: `mla_decode` on the last token, after `mla_prefill`
        of the others, equals the last row of the expanded form. And for the whole model: prefill all but the
        last token, then one `decode_step`, gives the logits of a full forward pass.
        """),
        code('''
            cache = LatentCache.for_config(tc, capacity=S)
            mla.mla_prefill(h[:-1], w, cache, 0, positions[:-1], tc)
            last = mla.mla_decode(h[-1:], w, cache, 0, positions[-1:], tc)            # [1, D]
            show(decode_out=last)
            print("absorbed decode vs expanded, last token: max abs diff",
                  float(np.abs(last[0] - out_expanded[-1]).max()))
            assert np.abs(last[0] - out_expanded[-1]).max() <= 1e-4 * np.abs(out_expanded[-1]).max()

            full = model.forward(ids, pv, grid)                                       # [S, V]
            kv_cache = model.new_cache(capacity=S)
            model.prefill(x[:-1], kv_cache, all_logits=False)
            step = model.decode_step(int(ids[-1]), kv_cache)                          # [V]
            show(forward_logits=full, decode_step_logits=step)
            print("whole model, decode_step vs forward: max abs diff", float(np.abs(step - full[-1]).max()),
                  "| same argmax:", int(step.argmax()) == int(full[-1].argmax()))
            assert np.abs(step - full[-1]).max() <= 1e-3 * np.abs(full[-1]).max()
        '''),
        md("""
        ## 4. The latent cache vs a full KV cache (real model)

        A standard cache keeps per layer, per token, the keys `H·(dn + dr)` and values `H·dv` of every head.
        The latent cache keeps `R + dr`: for Kimi-VL, 576 instead of 5120 numbers, 8.9× less.
        """),
        code('''
            real = pykimi.load_config(os.path.join(os.path.dirname(pykimi.__file__), "data", "reference_config.json")).text
            latent = LatentCache.for_config(real, capacity=1).bytes_per_token()        # f32 bytes / token, all layers
            full_kv = real.num_hidden_layers * real.num_attention_heads * (real.qk_head_dim + real.v_head_dim) * 4
            print(f"real model, f32: latent {latent:,} B/token, full KV {full_kv:,} B/token ({full_kv / latent:.1f}x)")
            ctx = np.array([1_000, 4_000, 16_000, 32_000, 64_000, 131_072])
            plt.figure(figsize=(6, 3))
            plt.plot(ctx, ctx * latent / 2 ** 30, "o-", label="latent cache (pykimi)")
            plt.plot(ctx, ctx * full_kv / 2 ** 30, "o-", label="full K/V cache")
            plt.axhline(24, color="gray", ls="--", label="24 GiB machine")
            plt.xlabel("context (tokens)"); plt.ylabel("GiB (float32)"); plt.legend(); plt.title("KV cache size")
            plt.show()
        '''),
        md("The price of absorbing: per decoded token and layer, work that does not grow with the context vs work that does."),
        code('''
            Hr, dnr, dvr, Rr, drr = real.num_attention_heads, real.qk_nope_head_dim, real.v_head_dim, real.kv_lora_rank, real.qk_rope_head_dim
            N = np.arange(1, 32_001, 500)
            expanded = N * Rr * Hr * (dnr + dvr) + N * Hr * (dnr + drr) + N * Hr * dvr          # expand, score, mix
            absorbed = Hr * dnr * Rr + N * Hr * (Rr + drr) + N * Hr * Rr + Hr * Rr * dvr       # q_lat, score, mix, W_uv
            plt.figure(figsize=(6, 3))
            plt.plot(N, expanded / 1e6, label="expanded (re-expand the cache)")
            plt.plot(N, absorbed / 1e6, label="absorbed")
            plt.xlabel("cached tokens"); plt.ylabel("million multiply-adds"); plt.legend()
            plt.title("one decode step, one layer (real model)"); plt.show()
        '''),
    ]


# ================================================================================================ 07_moe_routing
def nb_moe():
    return "07_moe_routing.ipynb", [
        header("07 · MoE routing: which experts each token uses",
               "The Moonlight router on real activations: sigmoid scores per expert, the selection-only correction "
               "bias, the top-k choices per token as a heat map, the load of each expert, the fact that unchosen "
               "experts are never read, and an intervention that forces an expert through a trace edit.",
               "",
               "about 20 s on 2 cores with the demo checkpoint (a dozen short answers); with the real one the "
               "sweep over experts is skipped and it takes tens of minutes."),
        SETUP,
        code('''
            from pykimi.moe import route_logits

            model = pykimi.load(MODEL_DIR)
            proc = pykimi.Processor.from_pretrained(MODEL_DIR)
            tc = model.config.text
            E, k = tc.n_routed_experts, tc.num_experts_per_tok
            moe_layers = [i for i in range(tc.num_hidden_layers) if tc.is_moe_layer(i)]
            print(f"{E} routed experts, top-{k}, {tc.n_shared_experts} shared; MoE layers {moe_layers}; "
                  f"scoring {tc.scoring_func}, method {tc.topk_method}, scale {tc.routed_scaling_factor}")
        '''),
        SCENE,
        code('''
            inputs = proc.prepare(scenes.messages_for("Describe the image."), images=[image])
            ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"]
            is_img = ids == model.config.media_placeholder_token_id                     # [S]
            names = ["*.mlp.gate.router_logits", "*.mlp.topk_ids", "*.mlp.topk_weights", "*.mlp.routing"]
            with pykimi.trace(model, names=names) as t:
                logits = model.forward(ids, pv, grid)                                   # [S, V]
            L1 = moe_layers[0]
            p = f"language_model.model.layers.{L1}.mlp"
            rec = t.records[p + ".routing"][0]                                          # the router's RoutingRecord
            show(router_logits=t[p + ".gate.router_logits"], topk_ids=t[p + ".topk_ids"],
                 topk_weights=t[p + ".topk_weights"], scores=rec.scores, margin=rec.topk_margin)
        '''),
        md("""
        ## 1. Router scores

        `logits = h·W_gᵀ` in fp32, `scores = sigmoid(logits)`: an independent yes/no score per expert (not a
        softmax). The image tokens and the text tokens use the experts differently.
        """),
        code('''
            fig, ax = plt.subplots(figsize=(11, 3))
            im = ax.imshow(rec.scores.T, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_xlabel("token position"); ax.set_ylabel("expert"); plt.colorbar(im, label="sigmoid score")
            idx = np.flatnonzero(is_img)
            for xline in (idx[0] - 0.5, idx[-1] + 0.5):
                ax.axvline(xline, color="w", ls="--", lw=1.5)
            ax.set_title(f"layer {L1}: router scores (image tokens between the dashed lines)"); plt.show()
        '''),
        md("""
        ## 2. The correction bias

        `e_score_correction_bias` (aux-loss-free load balancing) is added to the scores **for choosing only**;
        the weights use the unbiased scores, normalised to sum 1 and multiplied by `routed_scaling_factor`.
        Routing again with a zero bias shows what it changes.
        """),
        code('''
            bias = model.ckpt.f32(p + ".gate.e_score_correction_bias")                  # [E]
            no_bias = route_logits(rec.logits, np.zeros(E, np.float32), tc)
            changed = (np.sort(no_bias.topk_ids, 1) != rec.topk_ids).any(axis=1)       # [S]
            show(bias=bias)
            print(f"tokens whose expert set changes without the bias: {int(changed.sum())} of {len(ids)}")
            print("weights per token sum to", np.unique(rec.topk_weights.sum(1).round(3)))
            fig, axes = plt.subplots(1, 2, figsize=(11, 3))
            axes[0].bar(range(E), bias); axes[0].set_title("e_score_correction_bias"); axes[0].set_xlabel("expert")
            axes[1].bar(np.arange(E) - 0.2, rec.expert_counts(E), 0.4, label="with bias (the model)")
            axes[1].bar(np.arange(E) + 0.2, no_bias.expert_counts(E), 0.4, label="without")
            axes[1].set_title("tokens per expert"); axes[1].legend(); axes[1].set_xlabel("expert"); plt.show()
        '''),
        md("## 3. The choices per token: a heat map of the routing weights"),
        code('''
            fig, axes = plt.subplots(len(moe_layers), 1, figsize=(11, 2.2 * len(moe_layers)), squeeze=False)
            for ax, l in zip(axes[:, 0], moe_layers):
                r = t.records[f"language_model.model.layers.{l}.mlp.routing"][0]
                M = np.zeros((len(ids), E), np.float32)                                 # [S, E]
                np.put_along_axis(M, r.topk_ids.astype(np.int64), r.topk_weights, axis=1)
                ax.imshow(M.T, aspect="auto", cmap="Greys", interpolation="nearest")
                for xline in (idx[0] - 0.5, idx[-1] + 0.5):
                    ax.axvline(xline, color="tab:red", ls="--", lw=1)
                ax.set_ylabel(f"layer {l}\\nexpert")
            axes[-1, 0].set_xlabel("token position")
            plt.suptitle("routing weight of each chosen expert (white: not chosen; image tokens between the red lines)")
            plt.tight_layout(); plt.show()
        '''),
        md("## 4. Expert load, text vs image tokens"),
        code('''
            fig, axes = plt.subplots(1, len(moe_layers), figsize=(3.5 * len(moe_layers), 2.8), squeeze=False)
            for ax, l in zip(axes[0], moe_layers):
                r = t.records[f"language_model.model.layers.{l}.mlp.routing"][0]
                img_load = np.bincount(r.topk_ids[is_img].ravel(), minlength=E)
                txt_load = np.bincount(r.topk_ids[~is_img].ravel(), minlength=E)
                ax.bar(range(E), txt_load, label="text"); ax.bar(range(E), img_load, bottom=txt_load, label="image")
                ax.set_title(f"layer {l}"); ax.set_xlabel("expert")
            axes[0, 0].legend(); axes[0, 0].set_ylabel("tokens"); plt.tight_layout(); plt.show()
        '''),
        md("""
        ## 5. Experts nobody chose are never read

        The checkpoint counts reads per tensor. Decode one token: each MoE layer reads exactly the k experts
        that token chose (that is what makes a 16B model usable from a memory-mapped file).
        """),
        code('''
            cache = model.new_cache(capacity=len(ids) + 1)
            model.prefill(model.embed(ids, pv, grid), cache, all_logits=False)
            model.ckpt.read_counter.clear()
            with pykimi.trace(model, names=["*.mlp.topk_ids"]) as td:
                model.decode_step(int(np.argmax(logits[-1])), cache)
            for l in moe_layers:
                read = sorted(e for e in range(E)
                              if model.ckpt.read_counter.get(f"language_model.model.layers.{l}.mlp.experts.{e}.gate_proj.weight"))
                chose = td[f"language_model.model.layers.{l}.mlp.topk_ids"][0].tolist()
                print(f"layer {l}: chose {chose}, read {read}")
                assert read == sorted(chose)
        '''),
        md("""
        ## 6. An intervention: force an expert

        `pykimi.trace(model, edit={name: fn})` replaces an intermediate with `fn(value)` and lets the new value
        flow on; names may be glob patterns. Editing `mlp.topk_ids` changes the decision itself: the experts run
        are exactly the ids given (with the weights of their slots). We put one expert into every token's
        choices, in the last slot, first in the first MoE layer alone, then in every MoE layer.

        (Editing `mlp.gate.router_logits` instead re-runs the selection; but a boosted logit can only push the
        sigmoid score to 1, and a negative correction bias can still keep that expert out.)
        """),
        code('''
            def force(e):
                """An edit of mlp.topk_ids [S, k]: tokens whose choices lack expert e get it in their last slot."""
                def fn(chosen):
                    chosen = chosen.copy()
                    chosen[~(chosen == e).any(axis=1), -1] = e
                    return chosen
                return fn

            forced = int(np.argmin(rec.expert_counts(E)))                              # the least used expert
            edit = {p + ".topk_ids": force(forced)}                                    # layer L1 only
            with pykimi.trace(model, names=[p + ".topk_ids"], edit=edit) as te:
                logits_forced = model.forward(ids, pv, grid)                            # [S, V]
            ids_forced = te[p + ".topk_ids"]                                            # recorded after the edit
            show(topk_ids_edited=ids_forced)
            print(f"expert {forced} was chosen by {rec.expert_counts(E)[forced]} tokens; "
                  f"now by {int((ids_forced == forced).any(1).sum())} of {len(ids)}")
            print("edited:", sorted(set(te.edited)))
            assert (ids_forced == forced).any(1).all()
        '''),
        code('''
            def log_softmax(z):
                z = z - z.max(-1, keepdims=True)
                return z - np.log(np.exp(z).sum(-1, keepdims=True))

            lp, lq = log_softmax(logits), log_softmax(logits_forced)
            kl = (np.exp(lp) * (lp - lq)).sum(-1)                                       # [S]
            plt.figure(figsize=(10, 2.8)); plt.bar(range(len(ids)), kl, color=np.where(is_img, "tab:red", "tab:blue"))
            plt.ylabel("KL(before || after)"); plt.xlabel("position (red: image tokens)")
            plt.title(f"how much forcing expert {forced} in layer {L1} moves each next-token distribution"); plt.show()
        '''),
        md("""
        The answer unedited, with the expert forced in the first MoE layer only, and forced in every MoE layer
        (the glob `language_model.model.layers.*.mlp.topk_ids`). With a small model it is quick to try every
        expert in turn: some of them change what the model says it sees.
        """),
        code('''
            feats = model.encode_images(pv, grid)                                       # encode once, reuse

            def answer(edit=None):
                with pykimi.trace(model, edit=edit or {}, record=False):
                    return proc.decode(model.generate(ids, image_features=feats, max_new_tokens=24), skip_special=True)

            every = "language_model.model.layers.*.mlp.topk_ids"
            print(f"{'unedited':<28} {answer()!r}")
            print(f"{f'expert {forced} in layer {L1}':<28} {answer({p + '.topk_ids': force(forced)})!r}")
            for e in (range(E) if E <= 16 else [forced]):
                print(f"{f'expert {e} in every layer':<28} {answer({every: force(e)})!r}")
        '''),
    ]



# ================================================================================================ 08_generation
def nb_generation():
    return "08_generation.ipynb", [
        header("08 · Generation: greedy, sampling, streaming, stop tokens, timing",
               "How pykimi turns logits into an answer: greedy decoding, sampling with temperature / top-k / "
               "top-p (seeded, so reproducible), streaming token by token with a decoder that never splits a "
               "character, the two stop tokens, and where the time goes (image encoding, prefill, decode).",
               "",
               "about 30 s on 2 cores with the demo checkpoint (some fifteen short answers); tens of minutes with "
               "the real one."),
        SETUP,
        code('''
            from pykimi.generate import filter_probs

            model = pykimi.load(MODEL_DIR)
            proc = pykimi.Processor.from_pretrained(MODEL_DIR)
        '''),
        SCENE,
        md("""
        ## 1. Greedy decoding

        `temperature=0` takes the argmax at every step (the first index on ties) until a stop token. The demo
        model answers three kinds of question about its scenes; with the real model the answers are free text.
        """),
        code('''
            def ask(question, **kw):
                inp = proc.prepare(scenes.messages_for(question), images=[image])
                new = model.generate(inp["input_ids"], inp["pixel_values"], inp["image_grid_hws"], **kw)
                return new, proc.decode(new, skip_special=True)

            for question, truth, kind in scenes.qa_pairs(shapes):
                new, text = ask(question, max_new_tokens=24)
                print(f"{question:<28} -> {text!r}" + (f"   (truth: {truth!r})" if IS_DEMO else ""))
        '''),
        md("""
        ## 2. Temperature, top-k, top-p

        Sampling draws from `softmax(logits / T)` after filters: top-k keeps the k most likely tokens, top-p the
        smallest set whose probability reaches p. `filter_probs` shows the candidate set of one step.
        """),
        code('''
            inp = proc.prepare(scenes.messages_for(scenes.QUESTION_DESCRIBE), images=[image])
            ids, pv, grid = inp["input_ids"], inp["pixel_values"], inp["image_grid_hws"]
            first = model.forward(ids, pv, grid)[-1]                                 # [V] logits of the first answer token
            show(first_step_logits=first)
            fig, axes = plt.subplots(1, 3, figsize=(13, 3), sharey=True)
            for ax, T in zip(axes, [0.5, 1.0, 2.0]):
                cand, prob = filter_probs(first, temperature=T)                       # sorted by probability
                kept, _ = filter_probs(first, temperature=T, top_p=0.9)
                n = 12
                ax.bar(range(n), prob[:n], color=["tab:blue" if j < len(kept) else "lightgray" for j in range(n)])
                ax.set_xticks(range(n)); ax.set_xticklabels([repr(proc.decode([int(i)]))[1:-1][:6] for i in cand[:n]],
                                                             rotation=70, fontsize=7)
                ax.set_title(f"T = {T}: {len(kept)} tokens inside top-p 0.9")
            axes[0].set_ylabel("probability"); plt.suptitle("the first answer token (blue: kept by top_p=0.9)")
            plt.tight_layout(); plt.show()
        '''),
        md("""
        Samples are reproducible with a seed; different seeds give different answers when the temperature is
        high enough. The image does not change between samples, so we encode it once and pass the features
        (`image_features=`) instead of the pixels.
        """),
        code('''
            feats = model.encode_images(pv, grid)                                     # [T, D], reused below
            show(image_features=feats)
            for T in (0.3, 1.0, 1.5):
                for seed in (0, 1, 2):
                    new = model.generate(ids, image_features=feats, max_new_tokens=16, temperature=T, top_p=0.95,
                                         seed=seed)
                    print(f"T={T:<4} seed={seed}: {proc.decode(new, skip_special=True)!r}")
            a = model.generate(ids, image_features=feats, max_new_tokens=16, temperature=1.0, seed=42)
            b = model.generate(ids, image_features=feats, max_new_tokens=16, temperature=1.0, seed=42)
            print("same seed, same tokens:", a == b)
            assert a == b
        '''),
        md("""
        ## 3. Streaming

        `stream=True` returns an iterator: each id arrives as soon as it is chosen. The stream decoder turns ids
        into text without ever printing half a UTF-8 character. The first token waits for the image encoding
        and the prefill; the following ones each cost one decode step.
        """),
        code('''
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
        '''),
        md("""
        ## 4. Stop tokens

        The config's `eos_token_id` is `[EOS]`, but assistant turns end with `<|im_end|>`: pykimi stops on both
        (spec §4). The stop token is part of the returned ids. With `stop_ids=[]` the model keeps going past it.
        """),
        code('''
            stops = model.stop_ids
            print("stop ids:", stops, [proc.decode([s]) for s in stops])
            new = model.generate(ids, pv, grid, max_new_tokens=24)
            print("greedy ids:", new, "| ends with a stop id:", new[-1] in stops)
            longer = model.generate(ids, pv, grid, max_new_tokens=len(new) + 8, stop_ids=[])
            print("without stop ids:", repr(proc.decode(longer)))
        '''),
        md("""
        ## 5. Where the time goes

        `model.last_stats` holds the timings of the last `generate`: the image encoding (MoonViT + projector),
        the prefill of the prompt, and the decode steps.
        """),
        code('''
            model.generate(ids, pv, grid, max_new_tokens=24, stop_ids=[])
            st = dict(model.last_stats)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in st.items()})
            parts = {k: st.get(k) or 0.0 for k in ("encode_s", "prefill_s", "decode_s")}
            plt.figure(figsize=(6, 2.5))
            plt.barh(list(parts), list(parts.values()), color=["tab:orange", "tab:blue", "tab:green"])
            plt.xlabel("seconds")
            plt.title(f"{st['prompt_tokens']} prompt tokens, {st['new_tokens']} new tokens"
                      + (f", {max(st['new_tokens'] - 1, 1) / max(st['decode_s'], 1e-9):.0f} tok/s decode"
                         if st.get("decode_s") else ""))
            plt.show()
            from pykimi import kernels
            print("kernel backend:", kernels.backend())
        '''),
    ]


# ================================================================================================ 09_debugging
def nb_debugging():
    return "09_debugging.ipynb", [
        header("09 · Debugging with traces: plant a bug, find it with `pykimi diff`",
               "The workflow for a wrong answer: record a reference dump of every named intermediate, run the "
               "suspect code on the same inputs, and compare the two in execution order; the first tensor that "
               "differs names the stage with the bug. We plant a classic one (the x and y pairs of MoonViT's 2-D "
               "RoPE swapped, the mistake the HF docstring invites) and find it with the `pykimi diff` command and "
               "with `pykimi.debug.compare`.",
               "Runs the `pykimi` command as `python -m pykimi.cli`; writes its dumps to a temporary directory.",
               "about 25 s on 2 cores with the demo checkpoint (the command loads the model once more); tens of "
               "minutes with the real one."),
        SETUP,
        code('''
            import subprocess, tempfile
            import pykimi.debug
            import pykimi.rope
            import pykimi.vision
            from PIL import Image

            model = pykimi.load(MODEL_DIR)
            proc = pykimi.Processor.from_pretrained(MODEL_DIR)
            work = tempfile.mkdtemp(prefix="pykimi-debug-")
            print("dumps go to", work)
            # the command runs in a fresh process: make sure it imports this same pykimi
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [os.path.dirname(os.path.dirname(pykimi.__file__)), os.environ.get("PYTHONPATH", "")]))

            def pykimi_cmd(*args):
                """Run `pykimi ARGS...` and print what it prints; returns the exit status."""
                r = subprocess.run([sys.executable, "-m", "pykimi.cli", *args], capture_output=True, text=True, env=env)
                print(r.stdout + r.stderr)
                return r.returncode
        '''),
        SCENE,
        md("""
        ## 1. A reference dump

        `pykimi trace` runs one forward pass and writes every named intermediate to a safetensors file, in
        execution order. Here the reference is pykimi itself before we break it; in real life it is a dump from
        a trusted implementation (e.g. PyTorch forward hooks with the same names, see `tools/`).
        """),
        code('''
            png = os.path.join(work, "scene.png")
            image.save(png)
            question = scenes.QUESTION_DESCRIBE
            ref_path = os.path.join(work, "reference.safetensors")
            status = pykimi_cmd("trace", "--model", MODEL_DIR, "--image", png, "-p", question, "--out", ref_path)
            assert status == 0
        '''),
        md("The same inputs in this notebook (the command builds them the same way: one image part, then the question):"),
        code('''
            inputs = proc.prepare(scenes.messages_for(question), images=[Image.open(png)])
            ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"]
            show(input_ids=ids, pixel_values=pv, image_grid_hws=grid)
            answer_ok = proc.decode(model.generate(ids, pv, grid, max_new_tokens=24), skip_special=True)
            print("answer:", repr(answer_ok))
        '''),
        md("""
        ## 2. Plant the bug

        Swap the two axes of the 2-D RoPE: pair 2i should turn by the column, pair 2i+1 by the row.

        Where to patch matters: `pykimi/vision.py` does `from .rope import vision_rope_angles`, so the vision
        tower calls *its own* name `pykimi.vision.vision_rope_angles`. Patching `pykimi.rope.vision_rope_angles`
        changes nothing (we check), patching the name in `pykimi.vision` plants the bug.
        """),
        code('''
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
        '''),
        code('''
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
        '''),
        md("""
        Whether the answer changes depends on the model and the picture: a small model on an easy scene may still
        answer right. That is the point of comparing intermediates instead of answers: the numbers change either
        way.
        """),
        md("""
        ## 3. Find it: `pykimi diff`

        `pykimi diff A B` walks the tensors in execution order and prints, for each, the max abs error and the
        scale-relative error `max|a-b| / max|b|` against B, the reference. The first row over the tolerance is
        the **first divergence**: everything after it differs only because its input did. Exit status 1 when
        something differs.
        """),
        code('''
            status = pykimi_cmd("diff", bug_path, ref_path)
            print("exit status:", status)
        '''),
        md("""
        The first divergence is `vision_tower.encoder.rope_angles`, the 2-D RoPE table: the patch embedding and
        the position table before it agree exactly. The bug is in how the angles are built, not in the weights or
        the attention. The same comparison from Python, as a picture:
        """),
        code('''
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
        '''),
        md("## 4. Fix and confirm\n\nWith the correct function back in place, a new dump agrees with the reference everywhere."),
        code('''
            fixed_path = os.path.join(work, "fixed.safetensors")
            with pykimi.trace(model) as t:
                model.forward(ids, pv, grid)
            t.save(fixed_path)
            status = pykimi_cmd("diff", fixed_path, ref_path, "--only-bad")
            print("exit status:", status)
            assert status == 0
        '''),
        md("""
        ## 5. A subtler bug: an epsilon

        Spec §11.4: vLLM and SGLang build `kv_a_layernorm` with eps 1e-5, HF with 1e-6. We make the same
        change (the config is a frozen dataclass, so we replace it) and diff only the language-model tensors.
        Whether it crosses the tolerance depends on the size of the latent rows of the checkpoint at hand:
        this is why the comparison reports the size of each error, not just equal / not equal.
        """),
        code('''
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
            for r in rep.rows[:8]:
                print(f"  {r.name:<56} rel {r.rel:.2e}  {'ok' if r.ok else 'DIFFERS'}")
            worst = max(rep.rows, key=lambda r: r.rel)
            print(f"largest relative error: {worst.rel:.2e} at {worst.name}")
            print("first divergence:", rep.first_divergence.name if rep.first_divergence else "none at 2e-5")
        '''),
        md("Remove the temporary dumps (for the real model they are hundreds of megabytes)."),
        code('''
            import shutil
            shutil.rmtree(work, ignore_errors=True)
        '''),
    ]



NOTEBOOKS = [nb_tour, nb_checkpoint, nb_tokens, nb_pixels, nb_moonvit, nb_merger, nb_mla, nb_moe,
             nb_generation, nb_debugging]


# ================================================================================================ writer
def build(fn):
    import nbformat

    name, cells = fn()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, src) in enumerate(cells):
        c = nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
        c["id"] = f"{name.split('_')[0]}-{i:02d}"       # stable ids: regenerating changes nothing
        nb.cells.append(c)
    return name, nb


def main(argv=None) -> int:
    import nbformat

    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    out_dir = HERE
    bad = []
    for fn in NOTEBOOKS:
        name, nb = build(fn)
        path = os.path.join(out_dir, name)
        text = nbformat.writes(nb) + "\n"
        if check:
            old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
            if old != text:
                bad.append(name)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print("wrote", os.path.relpath(path))
    if bad:
        print("out of date (run python tutorials/_make_notebooks.py):", ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
