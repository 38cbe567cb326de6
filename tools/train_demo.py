#!/usr/bin/env python
"""Train and export pykimi's bundled demo checkpoint (issue 7).

A tiny model with the exact Kimi-VL architecture (MoonViT + 2x2 merger + projector +
DeepSeek-V3-style MLA/MoE language model; spec §6-8) is trained from scratch on the
synthetic shapes task of ``pykimi.scenes`` and exported to the Hugging Face layout that
pykimi loads like any checkpoint:

    pykimi/demo/config.json               same schema as the real config.json (tiny sizes)
    pykimi/demo/model.safetensors         bf16 tensors, e_score_correction_bias in f32,
                                          self_attn.rotary_emb.inv_freq in every LM layer
    pykimi/demo/tiktoken.model            a small byte-level BPE (this script trains it)
    pykimi/demo/tokenizer_config.json     the 256 special tokens + chat template
    pykimi/demo/preprocessor_config.json  spec §5 settings
    pykimi/demo/chat_template.jinja       the chat template (spec §4), verbatim

PyTorch (``torch==2.13.0``, CPU) is needed only here, never by pykimi. Everything is
seeded: the same command reproduces the same checkpoint (up to torch's CPU kernels).

    python tools/train_demo.py --seed 0                 # the bundled checkpoint's recipe
    python tools/train_demo.py --vision-steps 5 --steps 20 --out /tmp/x   # a smoke run
    python tools/train_demo.py --export-only --state S --out DIR   # export a saved state

The recipe (the defaults): phase 1 trains the vision tower + projector alone on dense
training-only targets (aux_labels: which shape covers each merged token, each shape's rank
from the left, the number of shapes); phase 2 trains everything on the answers (loss on answer
tokens only, each image's questions packed into one row that computes the shared prefix once,
see pack_rows) while the auxiliary targets stay on, on scenes drawn with three shapes 5/8 of the time
(--shape-mix) and with the color and kind words weighing 3x inside each answer (--content-weight).
pykimi/demo/README.md has the numbers.

The model code below is an independent implementation written from
/work/shared/spec/kimi_vl_spec.md; comments cite its sections.
"""
from __future__ import annotations

import argparse
import base64
import collections
import itertools
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pykimi import scenes  # noqa: E402  (NumPy/Pillow only)

# ============================================================================ tokenizer
# Spec §4: tiktoken byte-level BPE, "base64(bytes) rank" per line, then 256 special ids.
# The demo vocabulary has N_BASE base tokens; special id = real id - 163584 + N_BASE.

REAL_SPECIAL_BASE = 163584
# Named specials of the real tokenizer, by offset from its first special id (spec §4).
SPECIAL_NAMES = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    17: "<|im_middle|>", 18: "<|media_start|>", 19: "<|media_content|>", 20: "<|media_end|>",
    21: "<|media_pad|>", 254: "[UNK]", 255: "[PAD]",
}
# The pre-tokenizer regex (spec §4; tiktoken's engine supports the '&&' intersections).
PAT_ALTERNATIVES = [
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
]
PAT_STR = "|".join(PAT_ALTERNATIVES)

SYSTEM_PROMPT = "You are a helpful assistant"  # the template's default, no final period

# Generic English the BPE also sees (after the task text), so that free-form prompts
# typed into `pykimi run` do not fall apart into single bytes. Written for this file.
GENERIC_TEXT = """
This small model was trained to look at simple pictures. Each picture has a white
background and one, two or three shapes on it. The shapes can be circles, squares or
triangles, and they can be red, green, blue or yellow. Ask the model how many shapes
there are, what color a shape is, or ask it to describe the image from left to right.
The model reads the image with a vision transformer, merges each two by two block of
patches into one token, projects it into the language model and then writes the answer
one token at a time. It was not trained on anything else, so other questions will get
strange answers. What is in the picture? Where is the shape? Which shape is on the left
and which one is on the right? Is there a red square at the top or at the bottom of the
image? The answer should be short and exact. Hello, world! Please tell me about this
picture. Thank you very much. What do you see here? Can you count the objects for me?
How many circles, squares and triangles are in this photo? One, two, three, four, five,
six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 12 16 24 32 64 100 128 256 512 1024.
The quick brown fox jumps over the lazy dog. A model, a token, a layer, an expert, a
router, an attention head, a position, an embedding, a vocabulary and a checkpoint.
"""


def task_texts() -> list[tuple[str, int]]:
    """Every text string of the task with a weight (how often it should count in BPE)."""
    out = [(SYSTEM_PROMPT, 50), ("system", 50), ("user", 50), ("assistant", 50), ("image", 50),
           (scenes.QUESTION_COUNT, 50), (scenes.QUESTION_DESCRIBE, 50)]
    out += [(scenes.color_question(k), 30) for k in scenes.SHAPES]
    out += [("There is 1 shape.", 30), ("There are 2 shapes.", 30), ("There are 3 shapes.", 30)]
    out += [(f"The {k} is {c}.", 5) for k in scenes.SHAPES for c in scenes.COLORS]
    # every description of one to three shapes (a few thousand strings)
    items = [scenes.Shape(k, c, 0, 0, 1) for k in scenes.SHAPES for c in scenes.COLORS]
    for n in (1, 2, 3):
        for combo in itertools.product(items, repeat=n):
            shapes = [scenes.Shape(s.kind, s.color, 10 * i, 0, 1) for i, s in enumerate(combo)]
            out.append((scenes.describe_answer(shapes), 1))
    return out


def train_bpe(n_base: int) -> list[bytes]:
    """Byte-level BPE on the task text (+ GENERIC_TEXT): returns token bytes by rank.

    Ranks 0..255 are the single bytes in byte order; then one token per merge, in merge
    order (rank = priority, as tiktoken uses it). Pairs never cross pre-tokenizer pieces.
    Ties between equally frequent pairs go to the smaller byte string (deterministic).
    """
    import regex  # same regex syntax; V1 is needed for the '&&' intersections (spec §4)
    pat = regex.compile(PAT_STR, flags=regex.V1)
    counts: collections.Counter = collections.Counter()
    for text, w in task_texts() + [(GENERIC_TEXT, 1)]:
        for piece in pat.findall(text):
            counts[piece.encode("utf-8")] += w * 10 if w > 1 else 1
    words = {tuple(bytes([b]) for b in piece): c for piece, c in counts.items()}
    vocab = [bytes([i]) for i in range(256)]
    while len(vocab) < n_base:
        pairs: collections.Counter = collections.Counter()
        for toks, c in words.items():
            for a, b in zip(toks, toks[1:]):
                pairs[(a, b)] += c
        pairs = {p: c for p, c in pairs.items() if c >= 2 and p[0] + p[1] not in vocab}
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p[0] + p[1], p[0]))
        new = best[0] + best[1]
        vocab.append(new)
        merged = {}
        for toks, c in words.items():
            out, i = [], 0
            while i < len(toks):
                if i + 1 < len(toks) and toks[i] == best[0] and toks[i + 1] == best[1]:
                    out.append(new)
                    i += 2
                else:
                    out.append(toks[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return vocab


def special_tokens(n_base: int) -> dict[str, int]:
    """All 256 special tokens at the real tokenizer's offsets (spec §4)."""
    out = {}
    for off in range(256):
        name = SPECIAL_NAMES.get(off, f"<|reserved_token_{n_base + off}|>")
        out[name] = n_base + off
    return out


class Tok:
    """The demo tokenizer: tiktoken over our ranks + the 256 specials (spec §4)."""

    def __init__(self, ranks: list[bytes]):
        import tiktoken
        self.n_base = len(ranks)
        self.specials = special_tokens(self.n_base)
        self.enc = tiktoken.Encoding(
            name="pykimi-demo", pat_str=PAT_STR,
            mergeable_ranks={b: i for i, b in enumerate(ranks)},
            special_tokens=self.specials)
        self.vocab_size = self.n_base + 256
        s = self.specials
        self.im_end, self.eos, self.media_pad = s["<|im_end|>"], s["[EOS]"], s["<|media_pad|>"]

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if int(i) < self.n_base])

    @staticmethod
    def load(path: str) -> "Tok":
        ranks = []
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                tok, rank = line.split()
                assert int(rank) == i, f"{path}: line {i + 1} has rank {rank}"
                ranks.append(base64.b64decode(tok))
        return Tok(ranks)


def write_tiktoken_model(ranks: list[bytes], path: str) -> None:
    with open(path, "wb") as f:
        for i, b in enumerate(ranks):
            f.write(base64.b64encode(b) + b" " + str(i).encode() + b"\n")


def render_prompt(question: str) -> str:
    """The chat template (spec §4) for one user turn = [image, question], with the
    generation prompt. No newlines anywhere; the default system turn comes first."""
    return ("<|im_system|>system<|im_middle|>" + SYSTEM_PROMPT + "<|im_end|>"
            "<|im_user|>user<|im_middle|>"
            "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
            + question + "<|im_end|><|im_assistant|>assistant<|im_middle|>")


def prompt_ids(tok: Tok, question: str, n_image_tokens: int) -> list[int]:
    """Tokenized prompt with the single <|media_pad|> expanded to n_image_tokens (spec §5.6)."""
    ids = tok.encode(render_prompt(question))
    k = ids.index(tok.media_pad)
    return ids[:k] + [tok.media_pad] * n_image_tokens + ids[k + 1:]


# ============================================================================ image (spec §5)
PATCH = 14
IN_TOKEN_LIMIT = 4096


def preprocess(img) -> tuple[np.ndarray, tuple[int, int]]:
    """PIL image -> (patches f32[gh*gw, 3, 14, 14], (gh, gw)), exactly spec §5."""
    from PIL import Image
    img = img.convert("RGB")
    w, h = img.size
    n = (w // PATCH) * (h // PATCH)
    if n > IN_TOKEN_LIMIT:  # step 1: shrink (never enlarge), Pillow bicubic, truncating
        s = math.sqrt(IN_TOKEN_LIMIT / n)
        img = img.resize((int(w * s), int(h * s)), Image.BICUBIC)
        w, h = img.size
    pw, ph = w + (28 - w % 28) % 28, h + (28 - h % 28) % 28   # step 2: pad right/bottom black
    if (pw, ph) != (w, h):
        canvas = Image.new("RGB", (pw, ph), (0, 0, 0))
        canvas.paste(img, (0, 0))
        img = canvas
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0   # step 4: [H, W, 3]
    x = (x - 0.5) / 0.5
    gh, gw = ph // PATCH, pw // PATCH
    # step 5: raster-order patches, each laid out (C, ky, kx)
    x = x.transpose(2, 0, 1).reshape(3, gh, PATCH, gw, PATCH).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(x.reshape(gh * gw, 3, PATCH, PATCH)), (gh, gw)


# ============================================================================ model config
def make_config(n_base: int) -> dict:
    """config.json with the real schema (spec §2 / reference config.json), tiny sizes."""
    v = n_base + 256
    sp = lambda off: n_base + off  # noqa: E731
    return {
        "architectures": ["KimiVLForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_kimi_vl.KimiVLConfig",
            "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration",
        },
        "vision_config": {
            "model_type": "moonvit", "patch_size": 14, "num_attention_heads": 4,
            "num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 256,
            "init_pos_emb_height": 16, "init_pos_emb_width": 16, "merge_kernel_size": [2, 2],
            "torch_dtype": "bfloat16",
        },
        "text_config": {
            "vocab_size": v, "max_position_embeddings": 2048, "hidden_size": 128,
            "intermediate_size": 384, "moe_intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "n_shared_experts": 1, "n_routed_experts": 8, "ep_size": 1,
            "routed_scaling_factor": 2.446, "kv_lora_rank": 64, "q_lora_rank": None,
            "qk_rope_head_dim": 16, "v_head_dim": 32, "qk_nope_head_dim": 32,
            "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2,
            "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
            "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True,
            "num_key_value_heads": 4, "hidden_act": "silu", "initializer_range": 0.02,
            "rms_norm_eps": 1e-05, "pretraining_tp": 1, "use_cache": True,
            "rope_theta": 800000.0, "rope_scaling": None, "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": sp(0), "pad_token_id": sp(255),
            "eos_token_id": sp(1), "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        },
        "ignore_index": -100,
        "media_placeholder_token_id": sp(21),
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.3",
        "tie_word_embeddings": False,
        "vocab_size": v,
        "model_type": "kimi_vl",
    }


# ============================================================================ torch model
def build_model(cfg: dict):
    """The torch model; its state_dict names are the checkpoint's tensor names (spec §3)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    vc, tc = cfg["vision_config"], cfg["text_config"]

    def rope_interleaved(x, cos, sin):
        """Rotate pairs (x[2j], x[2j+1]) by angle j; cos/sin broadcast to [..., D/2]."""
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    def rms_norm(x, w, eps):
        # spec §8.2: normalize in fp32, then multiply by the weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    class Param(nn.Module):  # holds one tensor called `weight` (pos_emb, norms)
        def __init__(self, *shape, init=None):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(*shape) if init is None else init)

    # ---------------------------------------------------------------- MoonViT (spec §6)
    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            C = vc["hidden_size"]
            self.proj = nn.Conv2d(3, C, PATCH, stride=PATCH)
            self.pos_emb = Param(vc["init_pos_emb_height"], vc["init_pos_emb_width"], C,
                                 init=torch.randn(vc["init_pos_emb_height"], vc["init_pos_emb_width"], C) * 0.02)

        def forward(self, patches, gh, gw):
            C = self.proj.weight.shape[0]
            # §6.1: the conv on a 14x14 patch = flattened (C,ky,kx) patch @ W[C,588]^T + b
            x = F.linear(patches.reshape(len(patches), -1), self.proj.weight.reshape(C, -1), self.proj.bias)
            # §6.2: table (H0,W0,C) -> channel-first, torch bicubic, align_corners=False
            tab = self.pos_emb.weight.permute(2, 0, 1)[None]
            pos = F.interpolate(tab, size=(gh, gw), mode="bicubic", align_corners=False)
            return x + pos[0].permute(1, 2, 0).reshape(gh * gw, C)

    class VisionMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0 = nn.Linear(vc["hidden_size"], vc["intermediate_size"])
            self.fc1 = nn.Linear(vc["intermediate_size"], vc["hidden_size"])

        def forward(self, x):
            return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))  # §6.3 tanh GELU

    class VisionBlock(nn.Module):
        def __init__(self):
            super().__init__()
            C = vc["hidden_size"]
            self.nh = vc["num_attention_heads"]
            self.norm0 = nn.LayerNorm(C, eps=1e-5)
            self.norm1 = nn.LayerNorm(C, eps=1e-5)
            self.wqkv = nn.Linear(C, 3 * C)
            self.wo = nn.Linear(C, C)
            self.mlp = VisionMLP()

        def forward(self, x, cos, sin, key_ok):
            B, L, C = x.shape
            hd = C // self.nh
            q, k, v = self.wqkv(self.norm0(x)).split(C, dim=-1)   # contiguous thirds
            q, k, v = (t.reshape(B, L, self.nh, hd) for t in (q, k, v))
            q, k = rope_interleaved(q, cos, sin), rope_interleaved(k, cos, sin)  # §6.4
            # bidirectional attention restricted to each image's own tokens (§6.3):
            # one image per batch row, padded keys masked out
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=key_ok[:, None, None, :])
            x = x + self.wo(o.transpose(1, 2).reshape(B, L, C))
            return x + self.mlp(self.norm1(x))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(VisionBlock() for _ in range(vc["num_hidden_layers"]))
            self.final_layernorm = nn.LayerNorm(vc["hidden_size"], eps=1e-5)

    def vision_angles(gh, gw, hd):
        """§6.4: pair 2i turns by col*f_i, pair 2i+1 by row*f_i, f_i = 10000^(-4i/hd)."""
        f = 10000.0 ** (-4.0 * torch.arange(hd // 4, dtype=torch.float32) / hd)
        t = torch.arange(gh * gw)
        row, col = (t // gw).float(), (t % gw).float()
        ang = torch.empty(gh * gw, hd // 2)
        ang[:, 0::2] = col[:, None] * f
        ang[:, 1::2] = row[:, None] * f
        return ang

    class VisionTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed()
            self.encoder = Encoder()

        def forward(self, patches_list, grids):
            """One image per batch row (padded); returns merged tokens [sum T_i, 4, C] (§6.6)."""
            C = vc["hidden_size"]
            hd = C // vc["num_attention_heads"]
            B, Lmax = len(grids), max(gh * gw for gh, gw in grids)
            x = torch.zeros(B, Lmax, C)
            ang = torch.zeros(B, Lmax, hd // 2)
            key_ok = torch.zeros(B, Lmax, dtype=torch.bool)
            rows = []
            for i, (p, (gh, gw)) in enumerate(zip(patches_list, grids)):
                rows.append(self.patch_embed(p, gh, gw))
                ang[i, :gh * gw] = vision_angles(gh, gw, hd)
                key_ok[i, :gh * gw] = True
            x = torch.stack([F.pad(r, (0, 0, 0, Lmax - len(r))) for r in rows])
            cos, sin = torch.cos(ang)[:, :, None, :], torch.sin(ang)[:, :, None, :]
            for blk in self.encoder.blocks:
                x = blk(x, cos, sin, key_ok)
            x = self.encoder.final_layernorm(x)                     # §6.5
            out = []
            for i, (gh, gw) in enumerate(grids):                    # §6.6 TL, TR, BL, BR
                xi = x[i, :gh * gw].reshape(gh // 2, 2, gw // 2, 2, C).permute(0, 2, 1, 3, 4)
                out.append(xi.reshape(-1, 4, C))
            return torch.cat(out)

    class Projector(nn.Module):  # §7
        def __init__(self):
            super().__init__()
            C, H = vc["hidden_size"], tc["hidden_size"]
            self.pre_norm = nn.LayerNorm(C, eps=1e-5)
            self.linear_1 = nn.Linear(4 * C, 4 * C)
            self.linear_2 = nn.Linear(4 * C, H)

        def forward(self, merged):  # [T, 4, C]: LayerNorm per sub-vector, then concat
            x = self.pre_norm(merged).reshape(len(merged), -1)
            return self.linear_2(F.gelu(self.linear_1(x)))  # exact erf GELU

    # ---------------------------------------------------------------- LM (spec §8)
    H = tc["hidden_size"]
    nh = tc["num_attention_heads"]
    dn, dr, dv, r = tc["qk_nope_head_dim"], tc["qk_rope_head_dim"], tc["v_head_dim"], tc["kv_lora_rank"]
    eps = tc["rms_norm_eps"]

    class MLA(nn.Module):  # §8.3, no q-LoRA
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(H, nh * (dn + dr), bias=False)
            self.kv_a_proj_with_mqa = nn.Linear(H, r + dr, bias=False)
            self.kv_a_layernorm = Param(r)
            self.kv_b_proj = nn.Linear(r, nh * (dn + dv), bias=False)
            self.o_proj = nn.Linear(nh * dv, H, bias=False)

        def forward(self, h, cos, sin, mask=None):
            B, S, _ = h.shape
            q = self.q_proj(h).reshape(B, S, nh, dn + dr)
            q_nope, q_pe = q.split([dn, dr], dim=-1)
            c, k_pe = self.kv_a_proj_with_mqa(h).split([r, dr], dim=-1)
            c = rms_norm(c, self.kv_a_layernorm.weight, 1e-6)   # eps 1e-6, not the config's
            kv = self.kv_b_proj(c).reshape(B, S, nh, dn + dv)
            k_nope, v = kv.split([dn, dv], dim=-1)
            q_pe = rope_interleaved(q_pe, cos, sin)              # interleaved pairs (§8.3)
            k_pe = rope_interleaved(k_pe[:, :, None, :], cos, sin).expand(B, S, nh, dr)
            q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)
            k = torch.cat([k_nope, k_pe], -1).transpose(1, 2)
            if mask is None:
                o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True,
                                                   scale=(dn + dr) ** -0.5)
            else:  # packed rows (training): causal within each branch, see pack_rows
                o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask,
                                                   scale=(dn + dr) ** -0.5)
            return self.o_proj(o.transpose(1, 2).reshape(B, S, nh * dv))

    class SwiGLU(nn.Module):
        def __init__(self, inter):
            super().__init__()
            self.gate_proj = nn.Linear(H, inter, bias=False)
            self.up_proj = nn.Linear(H, inter, bias=False)
            self.down_proj = nn.Linear(inter, H, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            E = tc["n_routed_experts"]
            self.weight = nn.Parameter(torch.randn(E, H) * 0.02)
            # selection-only bias (§8.4); trained by the aux-loss-free balancing rule
            self.register_buffer("e_score_correction_bias", torch.zeros(E))

    class MoE(nn.Module):  # §8.4
        def __init__(self):
            super().__init__()
            E, I = tc["n_routed_experts"], tc["moe_intermediate_size"]
            self.experts = nn.ModuleList(SwiGLU(I) for _ in range(E))
            self.gate = Gate()
            self.shared_experts = SwiGLU(I * tc["n_shared_experts"])
            self.last_ids = None

        def forward(self, x):
            B, S, _ = x.shape
            h = x.reshape(B * S, H)
            s = torch.sigmoid(h.float() @ self.gate.weight.float().t())        # [N, E]
            ids = torch.topk(s + self.gate.e_score_correction_bias, tc["num_experts_per_tok"], dim=-1).indices
            w = s.gather(1, ids)                                                 # unbiased scores
            w = w / (w.sum(-1, keepdim=True) + 1e-20) * tc["routed_scaling_factor"]
            self.last_ids = ids.detach()
            out = torch.zeros_like(h)
            for e, expert in enumerate(self.experts):
                tok, slot = (ids == e).nonzero(as_tuple=True)
                if len(tok):
                    out = out.index_add(0, tok, expert(h[tok]) * w[tok, slot][:, None])
            return (out + self.shared_experts(h)).reshape(B, S, H)

    class DecoderLayer(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.input_layernorm = Param(H)
            self.post_attention_layernorm = Param(H)
            self.self_attn = MLA()
            moe = i >= tc["first_k_dense_replace"] and i % tc["moe_layer_freq"] == 0
            self.mlp = MoE() if moe else SwiGLU(tc["intermediate_size"])

        def forward(self, x, cos, sin, mask=None):
            x = x + self.self_attn(rms_norm(x, self.input_layernorm.weight, eps), cos, sin, mask)
            return x + self.mlp(rms_norm(x, self.post_attention_layernorm.weight, eps))

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(tc["vocab_size"], H)
            self.layers = nn.ModuleList(DecoderLayer(i) for i in range(tc["num_hidden_layers"]))
            self.norm = Param(H)

    class LanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(H, tc["vocab_size"], bias=False)

    class KimiVL(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = VisionTower()
            self.multi_modal_projector = Projector()
            self.language_model = LanguageModel()
            self.media_id = cfg["media_placeholder_token_id"]
            self.inv_freq = 1.0 / (tc["rope_theta"] ** (torch.arange(0, dr, 2, dtype=torch.float32) / dr))

        def encode_images(self, patches_list, grids):
            return self.multi_modal_projector(self.vision_tower(patches_list, grids))

        def hidden(self, ids, feats, pos=None, mask=None):
            """ids [B, S] (right-padded), feats [sum T, H] in order -> final-norm hidden.
            pos [B, S] / mask [B, 1, S, S] (bool, True = may attend): packed training rows."""
            lm = self.language_model.model
            x = lm.embed_tokens(ids)
            is_img = ids == self.media_id
            x = x.masked_scatter(is_img[..., None], feats.to(x.dtype))           # §8.1
            if pos is None:
                ang = torch.arange(ids.shape[1], dtype=torch.float32)[:, None] * self.inv_freq
                cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]    # [S, 1, dr/2]
            else:
                ang = pos.float()[..., None] * self.inv_freq                          # [B, S, dr/2]
                cos, sin = torch.cos(ang)[:, :, None, :], torch.sin(ang)[:, :, None, :]
            for layer in lm.layers:
                x = layer(x, cos, sin, mask)
            return rms_norm(x, lm.norm.weight, eps)

        def moe_layers(self):
            return [l.mlp for l in self.language_model.model.layers if isinstance(l.mlp, MoE)]

    model = KimiVL()
    # init: N(0, 0.02) for matrices, residual output projections scaled down (GPT-2 style)
    n_res = 2 * (tc["num_hidden_layers"] + vc["num_hidden_layers"])
    for name, p in model.named_parameters():
        if p.dim() == 2 and "gate.weight" not in name:
            nn.init.normal_(p, std=0.02)
            if name.endswith(("o_proj.weight", "down_proj.weight", "wo.weight", "fc1.weight")):
                p.data.mul_(1.0 / math.sqrt(n_res))
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    return model


# ============================================================================ data
def shape_mask(s, width: int, height: int) -> np.ndarray:
    """bool [height, width]: the pixels of shape s, drawn exactly as scenes.draw_scene does."""
    return np.any(np.asarray(scenes.draw_scene(width, height, [s])) != scenes.BACKGROUND, axis=-1)


def aux_labels(shapes, grid):
    """Training-only targets for the merged image tokens (one per 28x28 cell, raster order):
    - seg: the (kind, color) class (1..12) of the shape covering the most pixels of the cell,
      0 for cells no shape touches -- a dense signal, every cell of a shape learns its kind;
    - rank: the rank from the left (1..3) of that same shape, 0 for empty cells -- also at
      every cell of the shape: the language model must find "the k-th shape" (describe) or
      "the {kind}" (color) among the image tokens, and binding kind, color and rank in every
      cell of a shape gives its attention several matching keys instead of one center cell
      (with the rank at the center cell only, the first run learned to name the right set of
      colors and kinds but bound them to the wrong shapes);
    - count: the number of shapes (1..3), at every cell -- the image as a whole, so the
      language model can read it anywhere.
    Not part of the exported model."""
    gh2, gw2 = grid[0] // 2, grid[1] // 2
    H, W = gh2 * 28, gw2 * 28
    colors = list(scenes.COLORS)
    order = sorted(shapes, key=lambda s: s.cx)
    cover = np.zeros((len(order) + 1, gh2, gw2), np.int32)
    cls = [0]
    for j, s in enumerate(order):
        m = shape_mask(s, W, H)
        cover[j + 1] = m.reshape(gh2, 28, gw2, 28).sum((1, 3))
        cls.append(1 + scenes.SHAPES.index(s.kind) * len(colors) + colors.index(s.color))
    cover[0] = 0
    best = cover.argmax(0)                      # 0 wherever no shape has a pixel in the cell
    seg = np.asarray(cls, np.int64)[best].reshape(-1)
    rank = best.reshape(-1).astype(np.int64)    # cover is in left-to-right order: index = rank
    return seg, rank, np.full(gh2 * gw2, len(shapes), dtype=np.int64)


def make_batch(rng, n_images, tok, questions=True, shape_mix=None):
    """n_images random scenes -> (patches_list, grids, seq list of (prompt ids, answer ids,
    image index, qtype, answer text) (empty if not questions), aux labels (seg, rank, count) over
    all merged tokens). shape_mix: relative frequencies of 1, 2 and 3 shapes (None: the task's own
    uniform draw, scenes.random_scene)."""
    import torch
    patches, grids, seqs, labels = [], [], [], []
    mix = None if shape_mix is None else np.asarray(shape_mix, float) / np.sum(shape_mix)
    for i in range(n_images):
        n = None if mix is None else int(rng.choice(3, p=mix)) + 1
        img, shapes = scenes.random_scene(rng, n)
        p, g = preprocess(img)
        patches.append(torch.from_numpy(p))
        grids.append(g)
        labels.append(aux_labels(shapes, g))
        n_tok = (g[0] // 2) * (g[1] // 2)
        for q, a, qtype in (scenes.qa_pairs(shapes) if questions else []):
            seqs.append((prompt_ids(tok, q, n_tok), tok.encode(a) + [tok.im_end], i, qtype, a))
    aux = tuple(torch.from_numpy(np.concatenate(col)) for col in zip(*labels))
    return patches, grids, seqs, aux


def collate(seqs, pad_id):
    """Right-pad prompt+answer; labels are -100 except at positions predicting answer tokens."""
    import torch
    S = max(len(p) + len(a) for p, a, *_ in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), S), -100, dtype=torch.long)
    for j, (p, a, *rest) in enumerate(seqs):
        full = p + a
        ids[j, :len(full)] = torch.tensor(full)
        lab = torch.tensor(a)
        if len(rest) > 3 and rest[3] is not None:   # only some answer tokens carry loss
            lab = torch.where(torch.tensor(rest[3]), lab, torch.tensor(-100))
        labels[j, len(p) - 1:len(full) - 1] = lab   # logits at t predict t+1
    return ids, labels


def copy_drill(rng, tok, n):
    """Training-only text-only sequences (no image): the user asks "What color is the {shape}?"
    and the loss is only on the shape word of "The {shape} is ...". It teaches the language
    model to copy the asked shape from the question, which it was slow to find among the
    image tokens; the color itself is never trained here."""
    out = []
    for _ in range(n):
        kind = scenes.SHAPES[int(rng.integers(3))]
        text = render_prompt(scenes.color_question(kind)).replace(
            "<|media_start|>image<|media_content|><|media_pad|><|media_end|>", "")
        ans = tok.encode(f"The {kind} is red.") + [tok.im_end]
        mask = [False] * len(ans)
        mask[1] = True   # " {kind}"
        out.append((tok.encode(text), ans, None, "drill", "", mask))
    return out


AUX_CLASSES = (13, 4, 4)   # seg: none + 3 kinds x 4 colors; rank: none + 1..3; count: (0) 1..3


def aux_losses(aux_heads, feats, aux) -> dict:
    """Cross-entropy of the training-only heads (seg, rank, count) on the image features.
    Background cells are most cells: their weight is lowered so the shapes' cells dominate."""
    import torch
    import torch.nn.functional as F
    seg_w = torch.ones(AUX_CLASSES[0])
    seg_w[0] = 0.3
    rank_w = torch.ones(AUX_CLASSES[1])
    rank_w[0] = 0.3
    return {"seg": F.cross_entropy(aux_heads[0](feats), aux[0], weight=seg_w),
            "rank": F.cross_entropy(aux_heads[1](feats), aux[1], weight=rank_w),
            "count": F.cross_entropy(aux_heads[2](feats), aux[2])}


def pack_rows(seqs, pad_id, text_group=8):
    """Pack the sequences of each image into ONE row that holds the shared prefix (system turn,
    user header, the image tokens) once, followed by every question+answer as a branch.
    Returns (ids [R, S], positions [R, S], attention mask [R, 1, S, S] (True = may attend),
    labels [R, S] (-100 = no loss), seq index [R, S] of each labelled position, image index of
    each row (None for text-only rows)). A branch token sees the prefix and the earlier tokens of
    its own branch, with the positions it would have alone -- so every branch computes exactly
    what the unpacked sequence would (causal attention, RoPE by position), while the prefix,
    most of every sequence, is computed once instead of once per question. Text-only sequences are
    packed the same way, text_group to a row (so a row stays about as long as an image row: padding
    the 16 short drill rows per step to the longest row was 2/3 of the language model's work).
    Training only."""
    import torch
    groups: dict = {}
    n_txt = 0
    for j, sq in enumerate(seqs):
        if sq[2] is not None:
            key = ("img", sq[2])
        else:  # text-only rows (copy drills) share the system turn too: up to text_group per row
            key, n_txt = ("txt", n_txt // text_group), n_txt + 1
        groups.setdefault(key, []).append(j)
    rows = []
    for key, members in groups.items():
        prompts = [seqs[j][0] for j in members]
        P = min(len(p) for p in prompts) - 1          # every branch keeps >= 1 prompt token
        for p in prompts[1:]:
            P = min(P, next((i for i, (u, v) in enumerate(zip(prompts[0], p)) if u != v), P))
        ids, pos, br, lab, sid = list(prompts[0][:P]), list(range(P)), [-1] * P, [-100] * P, [-1] * P
        for b, j in enumerate(members):
            p, a = seqs[j][0], seqs[j][1]
            full = p + a
            lab_full = [-100] * len(full)
            keep = seqs[j][5] if len(seqs[j]) > 5 and seqs[j][5] is not None else [True] * len(a)
            for t, (tid, k) in enumerate(zip(a, keep)):   # logits at u predict u + 1
                if k:
                    lab_full[len(p) - 1 + t] = tid
            ids += full[P:]
            pos += list(range(P, len(full)))
            br += [b] * (len(full) - P)
            lab += lab_full[P:]
            sid += [j if x != -100 else -1 for x in lab_full[P:]]
        rows.append((ids, pos, br, lab, sid, key[1] if key[0] == "img" else None))
    S = max(len(r[0]) for r in rows)
    R = len(rows)
    ids_t = torch.full((R, S), pad_id, dtype=torch.long)
    pos_t = torch.zeros((R, S), dtype=torch.long)
    br_t = torch.full((R, S), -2, dtype=torch.long)            # -2 = padding
    lab_t = torch.full((R, S), -100, dtype=torch.long)
    sid_t = torch.full((R, S), -1, dtype=torch.long)
    for r, (ids, pos, br, lab, sid, _) in enumerate(rows):
        n = len(ids)
        ids_t[r, :n], pos_t[r, :n], br_t[r, :n] = torch.tensor(ids), torch.tensor(pos), torch.tensor(br)
        lab_t[r, :n], sid_t[r, :n] = torch.tensor(lab), torch.tensor(sid)
    q_br, k_br = br_t[:, :, None], br_t[:, None, :]
    q_pos, k_pos = pos_t[:, :, None], pos_t[:, None, :]
    mask = ((k_br == -1) | (k_br == q_br)) & (k_pos <= q_pos)  # causal, prefix or own branch
    mask &= (q_br != -1) | (k_br == -1)                         # prefix queries see only the prefix
    mask &= k_br != -2                                          # nobody attends to padding ...
    eye = torch.eye(S, dtype=torch.bool)[None]
    mask |= eye & (q_br == -2)                                  # ... except padding to itself (no NaN)
    return ids_t, pos_t, mask[:, None], lab_t, sid_t, [r[5] for r in rows]


def forward_loss(model, patches, grids, seqs, pad_id, aux=None, aux_heads=None, per_seq=False,
                 aux_weight=1.0, content_ids=None, content_weight=1.0):
    """Answer-token cross-entropy on packed rows (+ the training-only auxiliary losses on the
    image features when aux_heads is given). Returns (loss, per-sequence teacher-forced exact
    flags, ids, parts) where parts holds the separate loss terms."""
    import torch
    import torch.nn.functional as F
    ids, pos, mask, labels, sid, row_img = pack_rows(seqs, pad_id)
    feats = model.encode_images(patches, grids)                 # one vision pass per image
    per_img = list(torch.split(feats, [(g[0] // 2) * (g[1] // 2) for g in grids]))
    used = [per_img[i] for i in row_img if i is not None]
    h = model.hidden(ids, torch.cat(used) if used else feats[:0], pos, mask)
    m = labels != -100
    logits = model.language_model.lm_head(h[m])
    rows = sid[m]
    if per_seq:
        # every sequence weighs the same (mean over its answer tokens, then over sequences),
        # so short answers, whose decisive token (e.g. the shape copied from the question)
        # is one of a few, are not drowned by long descriptions
        # content_weight: inside a sequence, the color and kind words (the decisions the image
        # decides) weigh more than the fixed words around them
        tok_loss = F.cross_entropy(logits, labels[m], reduction="none")
        wt = torch.ones_like(tok_loss)
        if content_ids is not None and content_weight != 1.0:
            wt = torch.where(torch.isin(labels[m], content_ids), torch.tensor(float(content_weight)), wt)
        n_tok = torch.zeros(len(seqs)).index_add(0, rows, wt).clamp(min=1e-6)
        loss = (torch.zeros(len(seqs)).index_add(0, rows, tok_loss * wt) / n_tok).mean()
    else:
        loss = F.cross_entropy(logits, labels[m])
    parts = {"answer": loss.item()}
    if aux_heads is not None:
        terms = aux_losses(aux_heads, feats, aux)
        parts.update((k, v.item()) for k, v in terms.items())
        loss = loss + aux_weight * sum(terms.values())
    # teacher-forced exact match (= greedy exact match when every step's argmax is right)
    ok = (logits.argmax(-1) == labels[m]).long()
    n_bad = torch.zeros(len(seqs), dtype=torch.long).index_add(0, rows, 1 - ok)
    return loss, [bool(x == 0) for x in n_bad], ids, parts


def aux_accuracy(model, aux_heads, tok, seed=5, n_images=48):
    """How well the training-only heads read the image features: seg and rank accuracy on the
    cells shapes cover, false shapes on empty cells, count accuracy on every cell."""
    import torch
    patches, grids, _, (seg, rank, count) = make_batch(np.random.default_rng(seed), n_images, tok,
                                                       questions=False)
    with torch.no_grad():
        f = model.encode_images(patches, grids)
        ps, pr, pc = (h(f).argmax(-1) for h in aux_heads)
    on = seg > 0
    return {"seg": round((ps[on] == seg[on]).float().mean().item(), 3),
            "false_shape": round((ps[~on] > 0).float().mean().item(), 4),
            "rank": round((pr[on] == rank[on]).float().mean().item(), 3),
            "count": round((pc == count).float().mean().item(), 3)}


def pretrain_vision(model, aux_heads, tok, rng, args, t0):
    """Phase 1 (training only): the vision tower + projector alone learn the auxiliary targets
    (which shape covers each merged token, and each shape's rank from the left at its center
    cell). Without the language model a step is several times cheaper, and the language model
    then starts from image features that already hold what the answers need."""
    import torch
    params = (list(model.vision_tower.parameters()) + list(model.multi_modal_projector.parameters())
              + list(aux_heads.parameters()))
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=0.01)
    n = args.vision_steps
    print(f"vision pretraining: {n} steps of {args.vision_batch} images")
    for step in range(n):
        warm = 50
        f = (step + 1) / warm if step < warm else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, n - warm)))
        for g in opt.param_groups:
            g["lr"] = args.vision_lr * f
        patches, grids, _, aux = make_batch(rng, args.vision_batch, tok, questions=False)
        loss = sum(aux_losses(aux_heads, model.encode_images(patches, grids), aux).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == n - 1:
            print(f"  v{step:5d}  {loss.item():.4f}  {time.time() - t0:6.0f}s", flush=True)
        if (step + 1) % 250 == 0 or step == n - 1:
            print("     aux accuracy (48 images):", aux_accuracy(model, aux_heads, tok), flush=True)


# ============================================================================ evaluation
def greedy_answer(model, tok, prompt, feats, max_new=24):
    """Greedy decoding without a cache (recompute), stopping on <|im_end|> or [EOS]."""
    import torch
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            h = model.hidden(torch.tensor([ids]), feats)
            nxt = int(model.language_model.lm_head(h[0, -1]).argmax())
            if nxt in (tok.im_end, tok.eos):
                break
            out.append(nxt)
            ids.append(nxt)
    return tok.decode(out)


def evaluate_torch(model, tok, seed, n_images, greedy=True, chunk=16):
    """Exact-match accuracy by question type on n_images fresh scenes from `seed`."""
    import torch
    rng = np.random.default_rng(seed)
    right, total = collections.Counter(), collections.Counter()
    model.eval()
    with torch.no_grad():
        for start in range(0, n_images, chunk):
            patches, grids, seqs, _ = make_batch(rng, min(chunk, n_images - start), tok)
            if greedy:
                feats = model.encode_images(patches, grids)
                per_img = torch.split(feats, [(g[0] // 2) * (g[1] // 2) for g in grids])
                oks = [greedy_answer(model, tok, p, per_img[i]) == ans for p, _, i, _, ans in seqs]
            else:
                _, oks, _, _ = forward_loss(model, patches, grids, seqs, tok.specials["[PAD]"])
            for s, ok in zip(seqs, oks):
                total[s[3]] += 1
                right[s[3]] += int(ok)
    model.train()
    return {k: right[k] / total[k] for k in ("count", "color", "describe")}, dict(total)


# ============================================================================ export
def export(model, cfg, tok_ranks, out_dir):
    """Write the HF-layout checkpoint directory (bf16; correction bias f32; inv_freq per layer)."""
    import torch
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    tc = cfg["text_config"]
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().contiguous()
        tensors[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    dr = tc["qk_rope_head_dim"]
    inv = 1.0 / (tc["rope_theta"] ** (torch.arange(0, dr, 2, dtype=torch.float32) / dr))
    for i in range(tc["num_hidden_layers"]):  # stored like the real checkpoint; ignored by loaders
        tensors[f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv.to(torch.bfloat16)
    tensors = dict(sorted(tensors.items()))
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")
    write_tiktoken_model(tok_ranks, os.path.join(out_dir, "tiktoken.model"))
    n_base = len(tok_ranks)
    specials = special_tokens(n_base)
    template = open(os.path.join(ROOT, "pykimi", "data", "chat_template.jinja")).read()
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(template)
    tok_cfg = {
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for s, i in sorted(specials.items(), key=lambda kv: kv[1])},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                                      "<|im_middle|>", "<|media_start|>", "<|media_content|>",
                                      "<|media_end|>", "<|media_pad|>"],
        "chat_template": template,
        "model_max_length": cfg["text_config"]["max_position_embeddings"],
        "tokenizer_class": "TikTokenTokenizer",
        "num_base_tokens": n_base,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=1)
        f.write("\n")
    pre = {"image_processor_type": "KimiVLImageProcessor", "processor_class": "KimiVLProcessor",
           "patch_size": 14, "in_token_limit": 4096, "merge_kernel_size": [2, 2],
           "num_pooled_tokens": 1024, "pad_input": True,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=1)
        f.write("\n")


def load_exported(out_dir):
    """Rebuild the torch model from an exported directory (bf16 widened to f32)."""
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    tok = Tok.load(os.path.join(out_dir, "tiktoken.model"))
    model = build_model(cfg)
    sd = {k: v.float() for k, v in load_file(os.path.join(out_dir, "model.safetensors")).items()
          if not k.endswith("rotary_emb.inv_freq")}
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model, tok, cfg


# ============================================================================ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "pykimi", "demo"))
    ap.add_argument("--seed", type=int, default=0, help="seeds torch and the training scenes")
    ap.add_argument("--steps", type=int, default=3000, help="joint training steps (phase 2)")
    ap.add_argument("--batch-images", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-base", type=int, default=512, help="BPE base vocabulary size (upper bound)")
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="aux-loss-free balancing step")
    ap.add_argument("--aux-weight", type=float, default=0.5,
                    help="weight of the training-only detection loss on the image features")
    ap.add_argument("--val-seed", type=int, default=99, help="scenes for the progress checks")
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--eval-seed", type=int, default=2026, help="scenes for the final report")
    ap.add_argument("--eval-images", type=int, default=300)
    ap.add_argument("--state", default="/tmp/pykimi_demo_state.pt",
                    help="torch state saved at every progress check (for --export-only)")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="end after this many steps (the schedule still spans --steps)")
    ap.add_argument("--init-state", default=None,
                    help="start from the model weights (and router biases) saved in this state file")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--content-weight", type=float, default=3.0,
                    help="per-sequence loss: weight of the color and kind words against the other tokens")
    # three-shape scenes are where the language model must tell the second shape from the third:
    # drawn 5/8 of the time in the joint phase (the evaluation draws 1, 2, 3 uniformly)
    ap.add_argument("--shape-mix", type=lambda v: [float(t) for t in v.split(",")], default=[1.0, 2.0, 5.0],
                    help="joint phase: relative frequency of scenes with 1,2,3 shapes (default 1,2,5; "
                         "1,1,1 = uniform, as the task draws them)")
    ap.add_argument("--color-repeat", type=int, default=1, help="extra copies of each color question")
    ap.add_argument("--copy-drill", type=int, default=16, help="text-only copy sequences per step")
    ap.add_argument("--per-seq-loss", action=argparse.BooleanOptionalAction, default=True,
                    help="average the loss per sequence first")
    ap.add_argument("--vision-steps", type=int, default=1500,
                    help="phase 1: steps of vision-only pretraining on the auxiliary targets")
    ap.add_argument("--vision-batch", type=int, default=16)
    ap.add_argument("--vision-lr", type=float, default=3e-3)
    ap.add_argument("--export-only", action="store_true",
                    help="skip training: export the model saved in --state")
    # 1 thread: on a shared 2-core box, 2 OpenMP threads spin-wait and ran 7x slower (measured)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    ranks = train_bpe(args.n_base)
    tok = Tok(ranks)
    cfg = make_config(tok.n_base)
    print(f"tokenizer: {tok.n_base} base tokens + 256 specials = {tok.vocab_size}; "
          f"prompt example {len(prompt_ids(tok, scenes.QUESTION_DESCRIBE, 64))} ids with 64 image tokens")

    model = build_model(cfg)
    H = cfg["text_config"]["hidden_size"]
    # training-only heads on the projector output (not exported; see aux_labels): which shape
    # covers each merged token, each shape's rank from the left at its center cell, and the
    # number of shapes. They give the vision tower a dense signal; the answers are still
    # learned only through the language model.
    aux_heads = torch.nn.ModuleList([torch.nn.Linear(H, k) for k in AUX_CLASSES])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters")

    if args.init_state:
        st = torch.load(args.init_state)
        model.load_state_dict(st["model"])
        try:
            aux_heads.load_state_dict(st["aux_heads"])
        except (KeyError, RuntimeError):  # states of older versions: other or no heads
            print("  (auxiliary heads not in that state or of another shape: fresh ones)")
        print(f"initialized from {args.init_state} (saved after {st['step']} steps)")
    if args.export_only:
        model.load_state_dict(torch.load(args.state)["model"])
        args.steps = 0
    named = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux_heads.named_parameters()]
    is_decay = lambda n, p: p.dim() >= 2 and "pos_emb" not in n and "embed" not in n  # noqa: E731
    opt = torch.optim.AdamW([{"params": [p for n, p in named if is_decay(n, p)], "weight_decay": 0.01},
                             {"params": [p for n, p in named if not is_decay(n, p)], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warm = args.warmup

    def lr_at(step):  # linear warmup, cosine decay to 5 %
        if step < warm:
            return args.lr * (step + 1) / warm
        p = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    rng = np.random.default_rng(args.seed)
    pad_id = tok.specials["[PAD]"]
    if args.vision_steps and not args.export_only:
        pretrain_vision(model, aux_heads, tok, rng, args, t0)
    moes = model.moe_layers()
    E = cfg["text_config"]["n_routed_experts"]
    content_ids = torch.tensor(sorted({i for w in list(scenes.COLORS) + list(scenes.SHAPES)
                                       for i in tok.encode(" " + w)}))
    ema, ema_acc = None, None
    if args.steps:
        print("step   loss    ema_loss  tf_exact  lr       sec")
    for step in range(args.steps if args.stop_at is None else min(args.steps, args.stop_at)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        patches, grids, seqs, aux = make_batch(rng, args.batch_images, tok, shape_mix=args.shape_mix)
        # color questions repeated (they are the only ones that need the question's words)
        seqs = seqs + [s for s in seqs if s[3] == "color"] * args.color_repeat
        seqs = seqs + copy_drill(rng, tok, args.copy_drill)
        heads = aux_heads if args.aux_weight > 0 else None
        loss, seq_ok, ids, parts = forward_loss(model, patches, grids, seqs, pad_id, aux, heads,
                                                per_seq=args.per_seq_loss, aux_weight=args.aux_weight,
                                                content_ids=content_ids, content_weight=args.content_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts,
        # lower it for over-loaded ones (counted over real, non-pad tokens)
        valid = (ids != pad_id).reshape(-1)
        with torch.no_grad():
            for moe in moes:
                load = torch.bincount(moe.last_ids[valid].reshape(-1), minlength=E).float()
                moe.gate.e_score_correction_bias += args.bias_rate * torch.sign(load.mean() - load)
        acc = sum(seq_ok) / len(seq_ok)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        if step % 25 == 0 or step == args.steps - 1:
            terms = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
            print(f"{step:5d}  {loss.item():.4f}  {ema:.4f}    {ema_acc:.3f}     {lr_at(step):.2e} {time.time() - t0:6.0f}"
                  f"   ({terms})", flush=True)
        if (step + 1) % args.val_every == 0 or step == args.steps - 1 or step + 1 == args.stop_at:
            torch.save({"model": model.state_dict(), "aux_heads": aux_heads.state_dict(), "step": step + 1},
                       args.state)
            accs, _ = evaluate_torch(model, tok, args.val_seed, 48, greedy=False)
            print("   val (teacher-forced exact, 48 images):", {k: round(v, 3) for k, v in accs.items()}, flush=True)
    print(f"training took {(time.time() - t0) / 60:.1f} min")
    for i, moe in enumerate(moes):
        print(f"  MoE layer {i + 1} correction bias:", np.round(moe.gate.e_score_correction_bias.numpy(), 4).tolist())

    accs, totals = evaluate_torch(model, tok, args.eval_seed, args.eval_images, greedy=False)
    print(f"torch float32, teacher-forced exact match on {args.eval_images} images (seed {args.eval_seed}):",
          accs, totals)
    export(model, cfg, ranks, args.out)
    m2, tok2, _ = load_exported(args.out)
    accs_bf, _ = evaluate_torch(m2, tok2, args.eval_seed, args.eval_images, greedy=False)
    print("torch on the exported bf16 weights, teacher-forced exact:", accs_bf)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"exported to {args.out} ({size / 1e6:.2f} MB); total {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
