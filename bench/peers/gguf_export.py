"""Write the language model of a Kimi-VL safetensors checkpoint as a llama.cpp GGUF (architecture deepseek2),
with the `gguf` package, streaming tensor by tensor: bf16 (the stored bits, as is), Q8_0 or Q4_0.

    python bench/peers/gguf_export.py CKPT_DIR OUT.gguf --type bf16|q8_0|q4_0

Layout (names from gguf.constants for MODEL_ARCH.DEEPSEEK2; GGUF shapes are numpy shapes reversed):
  embed_tokens -> token_embd, model.norm -> output_norm, lm_head -> output
  layer i: input_layernorm -> blk.i.attn_norm, post_attention_layernorm -> blk.i.ffn_norm,
    q_proj -> attn_q, kv_a_proj_with_mqa -> attn_kv_a_mqa, kv_a_layernorm -> attn_kv_a_norm,
    kv_b_proj [H*(nope+v), R] -> attn_k_b [H, R, nope] (per head, transposed) and attn_v_b [H, v, R]
      (llama.cpp's absorbed MLA decode reads these two), o_proj -> attn_output,
    dense: mlp.{gate,up,down}_proj -> ffn_{gate,up,down}
    MoE: mlp.gate -> ffn_gate_inp (f32), e_score_correction_bias -> exp_probs_b.bias (f32),
      experts.{e}.{gate,up,down}_proj stacked -> ffn_{gate,up,down}_exps [E, out, in],
      shared_experts.* -> ffn_{gate,up,down}_shexp
The rope slice stays in its stored interleaved-pair order: llama.cpp's NORM rope rotates adjacent pairs,
which is that order (spec §8.3). Metadata: q_lora_rank 0 (no q LoRA), kv_lora_rank, MLA key/value lengths,
one KV head (MLA runs as MQA over the latent), sigmoid gating, normalized top-k weights scaled by
routed_scaling_factor, leading dense block count. llama.cpp uses the one rms eps (1e-5) for kv_a_layernorm
too, where the reference uses 1e-6 (spec §8.2); a negligible difference for a speed benchmark.

A GGUF needs a vocabulary: the benchmark feeds token ids directly, so this writes a minimal SentencePiece-
style one (<unk>, <s>, </s>, the 256 byte tokens, then placeholder pieces up to vocab_size).
1-D tensors and the router stay f32; attn_k_b / attn_v_b stay bf16 (see plan_tensors); every other matrix
gets the chosen type (token_embd and output too).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

LM = "language_model.model"
TYPES = ("bf16", "q8_0", "q4_0")


def _gguf():
    import gguf

    return gguf


def _qtype(kind: str):
    g = _gguf()
    return {"bf16": g.GGMLQuantizationType.BF16, "q8_0": g.GGMLQuantizationType.Q8_0,
            "q4_0": g.GGMLQuantizationType.Q4_0, "f32": g.GGMLQuantizationType.F32}[kind]


def _ftype(kind: str):
    g = _gguf()
    return {"bf16": g.LlamaFileType.MOSTLY_BF16, "q8_0": g.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": g.LlamaFileType.MOSTLY_Q4_0}[kind]


def plan_tensors(ck) -> list:
    """[(gguf name, producer() -> f32 or bf16-bits array in numpy layout, forced type)] in file order;
    forced type True = f32, "bf16" = bf16 whatever the file type, False = the file type."""
    t = ck.config.text
    H, nope, v = t.num_attention_heads, t.qk_nope_head_dim, t.v_head_dim
    plan = []

    def raw(name):
        def read():
            return _read(ck, name)
        read.tensor_name = name
        return read

    plan.append(("token_embd.weight", raw(f"{LM}.embed_tokens.weight"), False))
    for i in range(t.num_hidden_layers):
        p, b = f"{LM}.layers.{i}", f"blk.{i}"
        a = f"{p}.self_attn"
        plan += [(f"{b}.attn_norm.weight", raw(f"{p}.input_layernorm.weight"), True),
                 (f"{b}.attn_q.weight", raw(f"{a}.q_proj.weight"), False),
                 (f"{b}.attn_kv_a_mqa.weight", raw(f"{a}.kv_a_proj_with_mqa.weight"), False),
                 (f"{b}.attn_kv_a_norm.weight", raw(f"{a}.kv_a_layernorm.weight"), True)]

        def k_b(a=a):
            kv = _f32(_read(ck, f"{a}.kv_b_proj.weight")).reshape(H, nope + v, -1)  # [H, nope+v, R]
            return np.ascontiguousarray(kv[:, :nope, :].transpose(0, 2, 1))        # [H, R, nope]

        def v_b(a=a):
            kv = _f32(_read(ck, f"{a}.kv_b_proj.weight")).reshape(H, nope + v, -1)
            return np.ascontiguousarray(kv[:, nope:, :])                           # [H, v, R]

        # k_b / v_b stay bf16: llama.cpp places quantized 2-D-looking weights in its AMX buffer, and these
        # two are used as 3-D batched products the AMX backend cannot run (GGML_ASSERT in the scheduler on
        # AMX machines such as this one). They are 4 MB of 60+ MB per layer.
        plan += [(f"{b}.attn_k_b.weight", k_b, "bf16"), (f"{b}.attn_v_b.weight", v_b, "bf16"),
                 (f"{b}.attn_output.weight", raw(f"{a}.o_proj.weight"), False),
                 (f"{b}.ffn_norm.weight", raw(f"{p}.post_attention_layernorm.weight"), True)]
        if t.is_moe_layer(i):
            plan += [(f"{b}.ffn_gate_inp.weight", raw(f"{p}.mlp.gate.weight"), True),
                     (f"{b}.exp_probs_b.bias", raw(f"{p}.mlp.gate.e_score_correction_bias"), True)]
            for proj, g in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                names = [f"{p}.mlp.experts.{e}.{proj}.weight" for e in range(t.n_routed_experts)]
                plan.append((f"{b}.ffn_{g}_exps.weight", ("stack", names), False))
            for proj, g in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                plan.append((f"{b}.ffn_{g}_shexp.weight", raw(f"{p}.mlp.shared_experts.{proj}.weight"), False))
        else:
            for proj, g in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                plan.append((f"{b}.ffn_{g}.weight", raw(f"{p}.mlp.{proj}.weight"), False))
    plan += [("output_norm.weight", raw(f"{LM}.norm.weight"), True),
             ("output.weight", raw("language_model.lm_head.weight"), False)]
    return plan


def _read(ck, name: str):
    """The stored tensor (a pykimi Stored, zero-copy), or the float32 values of a weight that the checkpoint
    holds repacked (pykimi int8 / int4: NAME.qweight + NAME.scales), so a GGUF can be written from either."""
    return ck.tensor(name) if name in ck else ck.weight(name).f32()


def _f32(arr) -> np.ndarray:
    return arr.f32() if hasattr(arr, "f32") else np.asarray(arr, dtype=np.float32)


def _shape(ck, name: str) -> tuple:
    return tuple(ck.info(name).shape) if name in ck else tuple(ck.weight(name).shape)


def _encode(arr, kind: str) -> np.ndarray:
    """One tensor (a pykimi Stored or an f32 array) in the GGUF storage type, numpy layout (bytes for quants)."""
    g = _gguf()
    from pykimi.weights import Stored

    if isinstance(arr, Stored):
        if kind == "bf16" and arr.dtype == "BF16":
            return np.ascontiguousarray(arr.data)                                  # the stored bits, unchanged
        arr = arr.f32()
    arr = np.asarray(arr, dtype=np.float32)
    if kind == "f32":
        return np.ascontiguousarray(arr)
    if kind == "bf16":
        from pykimi.weights import f32_to_bf16
        return f32_to_bf16(arr)
    return g.quants.quantize(arr, _qtype(kind))


def export(ckpt_dir: str, out_path: str, kind: str = "q8_0", progress: bool = True) -> str:
    """Write the GGUF to ``out_path`` (via a .tmp name, renamed when complete)."""
    if kind not in TYPES:
        raise ValueError(f"type must be one of {TYPES}, not {kind!r}")
    g = _gguf()
    from pykimi.weights import Checkpoint

    ck = Checkpoint.open(ckpt_dir)
    t = ck.config.text
    tmp = out_path + ".tmp"
    w = g.GGUFWriter(tmp, "deepseek2")
    w.add_name(f"pykimi synthetic {t.num_hidden_layers}-layer Kimi-VL LM")
    w.add_block_count(t.num_hidden_layers)
    w.add_context_length(min(t.max_position_embeddings, 131072))
    w.add_embedding_length(t.hidden_size)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_attention_heads)
    w.add_head_count_kv(1)                                       # MLA as MQA over the latent
    w.add_rope_freq_base(float(t.rope_theta))
    w.add_layer_norm_rms_eps(float(t.rms_norm_eps))
    w.add_expert_count(t.n_routed_experts)
    w.add_expert_used_count(t.num_experts_per_tok)
    w.add_expert_gating_func(g.ExpertGatingFuncType.SIGMOID if t.scoring_func == "sigmoid"
                             else g.ExpertGatingFuncType.SOFTMAX)
    w.add_leading_dense_block_count(t.first_k_dense_replace)
    w.add_vocab_size(t.vocab_size)
    w.add_q_lora_rank(int(t.q_lora_rank or 0))
    w.add_kv_lora_rank(t.kv_lora_rank)
    w.add_key_length(t.kv_lora_rank + t.qk_rope_head_dim)
    w.add_value_length(t.kv_lora_rank)
    w.add_key_length_mla(t.qk_nope_head_dim + t.qk_rope_head_dim)
    w.add_value_length_mla(t.v_head_dim)
    w.add_expert_feed_forward_length(t.moe_intermediate_size)
    w.add_expert_shared_count(t.n_shared_experts)
    w.add_expert_weights_scale(float(t.routed_scaling_factor))
    if t.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(t.qk_rope_head_dim)
    w.add_file_type(_ftype(kind))
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    _add_minimal_vocab(w, t)

    plan = plan_tensors(ck)
    # pass 1: the tensor-info header needs every shape, dtype and byte size up front
    infos = []
    for name, prod, force in plan:
        k = "f32" if force is True else ("bf16" if force == "bf16" else kind)
        shape = _planned_shape(ck, t, name, prod)
        if len(shape) == 1:
            k = "f32"
        qt = _qtype(k)
        block, tsize = g.GGML_QUANT_SIZES[qt]
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * tsize
        infos.append((name, prod, k, shape, nbytes))
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=sum(i[4] for i in infos), unit="B", unit_scale=True, desc=f"gguf {kind}",
                       file=sys.stderr)
        except ImportError:
            pass
    # pass 2: the data, one tensor at a time
    for name, prod, k, shape, nbytes in infos:
        if isinstance(prod, tuple):                              # stacked experts: encode expert by expert
            data = np.stack([_encode(_read(ck, n), k) for n in prod[1]])
        else:
            data = _encode(prod(), k)
        if data.nbytes != nbytes:
            raise RuntimeError(f"{name}: {data.nbytes} bytes, planned {nbytes}")
        w.write_tensor_data(data)
        if bar is not None:
            bar.update(nbytes)
        del data
    if bar is not None:
        bar.close()
    w.close()
    os.replace(tmp, out_path)
    return out_path


def _planned_shape(ck, t, name: str, prod) -> tuple:
    H, nope, v, R = t.num_attention_heads, t.qk_nope_head_dim, t.v_head_dim, t.kv_lora_rank
    if name.endswith("attn_k_b.weight"):
        return (H, R, nope)
    if name.endswith("attn_v_b.weight"):
        return (H, v, R)
    if isinstance(prod, tuple):
        return (len(prod[1]),) + _shape(ck, prod[1][0])
    if hasattr(prod, "tensor_name"):                 # header only: no read, no dequantization
        return _shape(ck, prod.tensor_name)
    return tuple(prod().shape)


def _add_minimal_vocab(w, t) -> None:
    """A SentencePiece-style ("llama") vocabulary of vocab_size pieces: <unk> <s> </s>, the 256 byte pieces,
    then placeholders. Nothing is ever tokenized from text: the benchmark feeds ids."""
    g = _gguf()
    T = g.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    n = t.vocab_size - len(tokens)
    tokens += [f"\u2581t{i}" for i in range(n)]
    types += [T.NORMAL] * n
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def active_bytes_per_token(path: str) -> dict:
    """Bytes of the GGUF's weights one decoded token reads (the same rule as bench/run.py for pykimi)."""
    g = _gguf()
    r = g.GGUFReader(path)
    by = {tt.name: int(tt.n_bytes) for tt in r.tensors}
    n_vocab = next(int(tt.shape[-1]) for tt in r.tensors if tt.name == "token_embd.weight")
    top_k = int(r.fields["deepseek2.expert_used_count"].parts[-1][0])
    n_exp = int(r.fields["deepseek2.expert_count"].parts[-1][0])
    parts = {"embedding_row": by["token_embd.weight"] // n_vocab, "attention": 0, "dense_mlp": 0, "router": 0,
             "routed_experts": 0, "shared_experts": 0, "norms": by["output_norm.weight"],
             "lm_head": by["output.weight"]}
    for name, nb in by.items():
        if not name.startswith("blk."):
            continue
        kind = name.split(".", 2)[2]
        if "norm" in kind:
            parts["norms"] += nb
        elif kind.startswith("attn_"):
            parts["attention"] += nb
        elif "_exps" in kind:
            parts["routed_experts"] += nb * top_k // n_exp
        elif "_shexp" in kind:
            parts["shared_experts"] += nb
        elif kind.startswith("ffn_gate_inp") or kind.startswith("exp_probs_b"):
            parts["router"] += nb
        elif kind.startswith("ffn_"):
            parts["dense_mlp"] += nb
    parts["total"] = sum(parts.values())
    return parts


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--type", default="q8_0", choices=TYPES)
    a = ap.parse_args(argv)
    export(a.ckpt, a.out, a.type)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
