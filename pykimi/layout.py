"""The one table of checkpoint tensors: every name the model reads, with its shape, derived from config.json.

Names are the Hugging Face checkpoint's own (``vision_tower.encoder.blocks.3.wqkv.weight``) and are used
unchanged in code, traces and errors (DESIGN.md §Style 3). On the real config this table regenerates all
5679 names of the released checkpoint (tests/test_layout.py).
"""
from __future__ import annotations

from .config import KimiVLConfig

LM = "language_model.model"
# tensors present in the released checkpoint but never read (spec §3: inv_freq is recomputed from theta)
IGNORED_SUFFIXES = (".self_attn.rotary_emb.inv_freq",)
# tensors stored in float32 in DeepSeek-V3-style checkpoints (the golden tiny checkpoint does the same)
F32_SUFFIXES = (".mlp.gate.e_score_correction_bias",)


def vision_tensors(cfg: KimiVLConfig) -> list[tuple[str, tuple]]:
    v = cfg.vision
    C, F, p = v.hidden_size, v.intermediate_size, v.patch_size
    out = [
        ("vision_tower.patch_embed.proj.weight", (C, 3, p, p)),
        ("vision_tower.patch_embed.proj.bias", (C,)),
        ("vision_tower.patch_embed.pos_emb.weight", (v.init_pos_emb_height, v.init_pos_emb_width, C)),
    ]
    for i in range(v.num_hidden_layers):
        b = f"vision_tower.encoder.blocks.{i}"
        out += [
            (f"{b}.norm0.weight", (C,)), (f"{b}.norm0.bias", (C,)),
            (f"{b}.norm1.weight", (C,)), (f"{b}.norm1.bias", (C,)),
            (f"{b}.wqkv.weight", (3 * C, C)), (f"{b}.wqkv.bias", (3 * C,)),
            (f"{b}.wo.weight", (C, C)), (f"{b}.wo.bias", (C,)),
            (f"{b}.mlp.fc0.weight", (F, C)), (f"{b}.mlp.fc0.bias", (F,)),
            (f"{b}.mlp.fc1.weight", (C, F)), (f"{b}.mlp.fc1.bias", (C,)),
        ]
    out += [("vision_tower.encoder.final_layernorm.weight", (C,)),
            ("vision_tower.encoder.final_layernorm.bias", (C,))]
    return out


def projector_tensors(cfg: KimiVLConfig) -> list[tuple[str, tuple]]:
    C = cfg.vision.hidden_size
    kh, kw = cfg.vision.merge_kernel_size
    M = C * kh * kw
    H = cfg.text.hidden_size
    return [
        ("multi_modal_projector.pre_norm.weight", (C,)), ("multi_modal_projector.pre_norm.bias", (C,)),
        ("multi_modal_projector.linear_1.weight", (M, M)), ("multi_modal_projector.linear_1.bias", (M,)),
        ("multi_modal_projector.linear_2.weight", (H, M)), ("multi_modal_projector.linear_2.bias", (H,)),
    ]


def layer_tensors(cfg: KimiVLConfig, i: int, include_ignored: bool = True) -> list[tuple[str, tuple]]:
    t = cfg.text
    H, nh = t.hidden_size, t.num_attention_heads
    b = f"{LM}.layers.{i}"
    out = [(f"{b}.input_layernorm.weight", (H,)), (f"{b}.post_attention_layernorm.weight", (H,))]
    if t.q_lora_rank:
        out += [(f"{b}.self_attn.q_a_proj.weight", (t.q_lora_rank, H)),
                (f"{b}.self_attn.q_a_layernorm.weight", (t.q_lora_rank,)),
                (f"{b}.self_attn.q_b_proj.weight", (nh * t.qk_head_dim, t.q_lora_rank))]
    else:
        out += [(f"{b}.self_attn.q_proj.weight", (nh * t.qk_head_dim, H))]
    out += [
        (f"{b}.self_attn.kv_a_proj_with_mqa.weight", (t.kv_lora_rank + t.qk_rope_head_dim, H)),
        (f"{b}.self_attn.kv_a_layernorm.weight", (t.kv_lora_rank,)),
        (f"{b}.self_attn.kv_b_proj.weight", (nh * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank)),
        (f"{b}.self_attn.o_proj.weight", (H, nh * t.v_head_dim)),
    ]
    if include_ignored:
        out.append((f"{b}.self_attn.rotary_emb.inv_freq", (t.qk_rope_head_dim // 2,)))
    if t.is_moe_layer(i):
        E, I = t.n_routed_experts, t.moe_intermediate_size
        for e in range(E):
            out += [(f"{b}.mlp.experts.{e}.gate_proj.weight", (I, H)),
                    (f"{b}.mlp.experts.{e}.up_proj.weight", (I, H)),
                    (f"{b}.mlp.experts.{e}.down_proj.weight", (H, I))]
        out += [(f"{b}.mlp.gate.weight", (E, H)), (f"{b}.mlp.gate.e_score_correction_bias", (E,))]
        if t.n_shared_experts:
            S = I * t.n_shared_experts
            out += [(f"{b}.mlp.shared_experts.gate_proj.weight", (S, H)),
                    (f"{b}.mlp.shared_experts.up_proj.weight", (S, H)),
                    (f"{b}.mlp.shared_experts.down_proj.weight", (H, S))]
    else:
        I = t.intermediate_size
        out += [(f"{b}.mlp.gate_proj.weight", (I, H)), (f"{b}.mlp.up_proj.weight", (I, H)),
                (f"{b}.mlp.down_proj.weight", (H, I))]
    return out


def language_tensors(cfg: KimiVLConfig, include_ignored: bool = True) -> list[tuple[str, tuple]]:
    t = cfg.text
    out = [(f"{LM}.embed_tokens.weight", (t.vocab_size, t.hidden_size))]
    for i in range(t.num_hidden_layers):
        out += layer_tensors(cfg, i, include_ignored)
    out.append((f"{LM}.norm.weight", (t.hidden_size,)))
    if not t.tie_word_embeddings:
        out.append(("language_model.lm_head.weight", (t.vocab_size, t.hidden_size)))
    return out


def expected_tensors(cfg: KimiVLConfig, include_ignored: bool = True) -> list[tuple[str, tuple]]:
    """Every tensor of a Kimi-VL checkpoint for this config, in a fixed order (vision, projector, LM). A config
    without a vision tower (Moonlight) has the LM's only, under these names (pykimi.variants maps its flat
    ``model.*`` / ``lm_head.weight`` names onto them when the checkpoint is opened)."""
    if getattr(cfg, "vision", None) is None:
        return language_tensors(cfg, include_ignored)
    return vision_tensors(cfg) + projector_tensors(cfg) + language_tensors(cfg, include_ignored)


def is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)


def stored_dtype(name: str, default: str) -> str:
    """The dtype a checkpoint writer uses for ``name`` (e_score_correction_bias stays f32)."""
    return "F32" if name.endswith(F32_SUFFIXES) else default


FLOAT_DTYPES = ("BF16", "F16", "F32")


def validate_checkpoint(ckpt, cfg: KimiVLConfig) -> None:
    """Check, from the headers alone, that every tensor the model reads is present with the shape config.json
    implies and a float dtype (or as a pykimi-quantized weight), so a wrong checkpoint fails at load time with
    a one-line CheckpointError naming the tensor -- not at layer 14."""
    import os

    from .config import check_fits
    from .errors import CheckpointError

    check_fits(cfg, ckpt)                     # sizes bounded by the files before the per-layer table is built
    qmeta = None
    for name, shape in expected_tensors(cfg, include_ignored=False):
        if name in ckpt:
            ckpt.expect(name, shape, FLOAT_DTYPES)
            continue
        if ckpt.has_weight(name):  # stored quantized as NAME.qweight + NAME.scales
            if qmeta is None:
                qmeta = ckpt.quant_meta()
            got = (qmeta.get(name) or {}).get("shape")
            if got is not None and tuple(got) != tuple(shape):
                raise CheckpointError(f"{os.path.basename(ckpt.info(name + '.qweight').file)}: quantized tensor "
                                      f"{name!r} has shape {list(got)}, expected {list(shape)} from config.json")
            continue
        raise CheckpointError(f"{ckpt.path}: tensor {name!r} {list(shape)} is missing; the config.json there "
                              f"needs it (a truncated download, or a checkpoint of another model?)")
