"""PyTorch eager peer: transformers' DeepseekV3ForCausalLM on the checkpoint's own language-model weights, and
the MoonViT torch twin of bench/bench_vision.py (fp32) on its vision weights.

Weight mapping (the Kimi-VL LM *is* a DeepSeek-V3 CausalLM under the ``language_model.`` prefix, spec §8):
  language_model.model.*                    -> model.*            (same names)
  language_model.lm_head.weight             -> lm_head.weight
  ...mlp.experts.{e}.{gate,up}_proj.weight  -> ...mlp.experts.gate_up_proj [E, 2*I, D]  ([gate; up] per expert)
  ...mlp.experts.{e}.down_proj.weight       -> ...mlp.experts.down_proj    [E, D, I]
  ...self_attn.rotary_emb.inv_freq          -> dropped (recomputed from rope_theta, spec §3)
Config: q_lora_rank None, rope_interleave True (the rope slice is stored in interleaved pairs, spec §8.3),
n_group = topk_group = 1, sigmoid router with e_score_correction_bias. transformers builds kv_a_layernorm
with its default eps 1e-6 -- the same as the reference (spec §8.2) and as pykimi. The router weight and the
correction bias stay fp32 in both dtypes (transformers keeps them fp32: _keep_in_fp32_modules_strict).

transformers is an optional tool dependency of the benchmark only (never of pykimi).
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np

LMP = "language_model."


def unavailable() -> str | None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import DeepseekV3ForCausalLM  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def hf_config(text):
    """A transformers DeepseekV3Config from pykimi's TextConfig."""
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        moe_intermediate_size=text.moe_intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_attention_heads,
        n_shared_experts=text.n_shared_experts, n_routed_experts=text.n_routed_experts,
        routed_scaling_factor=text.routed_scaling_factor, kv_lora_rank=text.kv_lora_rank,
        q_lora_rank=text.q_lora_rank, qk_rope_head_dim=text.qk_rope_head_dim, v_head_dim=text.v_head_dim,
        qk_nope_head_dim=text.qk_nope_head_dim, n_group=text.n_group, topk_group=text.topk_group,
        num_experts_per_tok=text.num_experts_per_tok, first_k_dense_replace=text.first_k_dense_replace,
        norm_topk_prob=text.norm_topk_prob, hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(text.rope_theta)},
        rope_interleave=True, attention_bias=False, tie_word_embeddings=False,
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)
    return cfg


def _tensor(ck, name: str, dtype):
    """A torch tensor of checkpoint tensor ``name`` in ``dtype``; bf16 -> bf16 is zero-copy on the mmap."""
    import torch

    st = ck.tensor(name)
    if st.dtype == "BF16" and dtype == torch.bfloat16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                         # the mmap view is read-only; torch warns
            return torch.from_numpy(st.data).view(torch.bfloat16)
    return torch.from_numpy(st.f32()).to(dtype)


def lm_state_dict(ck, text, dtype) -> dict:
    """The DeepseekV3ForCausalLM state dict for the checkpoint's LM, in ``dtype`` (router in fp32)."""
    import torch

    sd = {}
    for name in ck.names():
        if not name.startswith(LMP) or name.endswith("rotary_emb.inv_freq") or ".mlp.experts." in name:
            continue
        hf = name[len(LMP):]
        keep32 = hf.endswith("mlp.gate.weight") or hf.endswith("e_score_correction_bias")
        sd[hf] = _tensor(ck, name, torch.float32 if keep32 else dtype)
    for i in range(text.num_hidden_layers):
        if not text.is_moe_layer(i):
            continue
        p = f"model.layers.{i}.mlp.experts"
        E = text.n_routed_experts
        gu = torch.empty((E, 2 * text.moe_intermediate_size, text.hidden_size), dtype=dtype)
        dn = torch.empty((E, text.hidden_size, text.moe_intermediate_size), dtype=dtype)
        I = text.moe_intermediate_size
        for e in range(E):
            src = f"{LMP}{p}.{e}"
            gu[e, :I] = _tensor(ck, f"{src}.gate_proj.weight", dtype)
            gu[e, I:] = _tensor(ck, f"{src}.up_proj.weight", dtype)
            dn[e] = _tensor(ck, f"{src}.down_proj.weight", dtype)
        sd[f"{p}.gate_up_proj"] = gu
        sd[f"{p}.down_proj"] = dn
    return sd


def build_lm(ckpt_dir: str, dtype_name: str):
    import torch
    from transformers import DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    from pykimi.weights import Checkpoint

    dtype = getattr(torch, dtype_name)
    ck = Checkpoint.open(ckpt_dir)
    text = ck.config.text
    cfg = hf_config(text)
    with torch.device("meta"):                                       # no allocation, no random init
        model = DeepseekV3ForCausalLM(cfg)
    sd = lm_state_dict(ck, text, dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"weight mapping: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.model.rotary_emb = DeepseekV3RotaryEmbedding(cfg)           # its inv_freq buffer was on meta
    model.eval()
    return model, text


def _argmax(logits) -> int:
    return int(logits[0, -1].float().argmax())


def lm_bench(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model, text = build_lm(spec["ckpt"], spec["dtype"])
    out = {"load_s": time.perf_counter() - t0, "torch": torch.__version__,
           "attn_impl": getattr(model.config, "_attn_implementation", None),
           "experts_impl": getattr(model.config, "_experts_implementation", None)}
    from run import _synthetic_prompt                               # same prompt ids as pykimi's decode

    prompt = torch.from_numpy(_synthetic_prompt(spec["prompt"], text.vocab_size))[None]

    def decode(n_new):
        r = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache = r.past_key_values
        ids = [_argmax(r.logits)]
        steps = []
        for _ in range(n_new - 1):
            t = time.perf_counter()
            r = model(input_ids=torch.tensor([[ids[-1]]]), cache=cache, use_cache=True)
            cache = r.past_key_values
            ids.append(_argmax(r.logits))
            steps.append(time.perf_counter() - t)
        return np.array(steps), ids

    if spec["dtype"] == "float32":
        # the weight mapping checked against pykimi: last-position logits of the same prompt
        import pykimi
        ref = pykimi.load(spec["ckpt"]).forward(prompt[0].numpy())[-1]
        got = model(input_ids=prompt, logits_to_keep=1).logits[0, -1].float().numpy()
        out["max_rel_logit_diff_vs_pykimi"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    decode(spec["warmup"] + 1)
    steps, ids = decode(spec["tokens"] + 1)
    out.update(decode_ms=float(1e3 * steps.mean()), decode_ms_median=float(1e3 * np.median(steps)),
               decode_tok_s=float(len(steps) / steps.sum()), token_ids=ids)
    out["prefill"] = {}
    for n in spec["prefill"]:
        from run import _synthetic_prompt as sp
        ids_n = torch.from_numpy(sp(n, text.vocab_size, seed=2))[None]
        best = None
        for _ in range(2):                  # best of 2, as pykimi's and llama.cpp's prefills are timed
            t = time.perf_counter()
            model(input_ids=ids_n, use_cache=True, logits_to_keep=1)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        out["prefill"][str(n)] = {"seconds": best, "tok_s": n / best}
    return out


def vision_bench(spec: dict) -> dict:
    """The fp32 MoonViT + projector torch twin from bench/bench_vision.py, on the checkpoint's vision weights."""
    try:
        from bench_vision import torch_encode
    except Exception as e:
        return {"skipped": f"bench/bench_vision.py has no importable torch twin ({type(e).__name__}: {e})"}
    import torch

    from pykimi.layout import projector_tensors, vision_tensors
    from pykimi.weights import Checkpoint
    from run import synthetic_image

    torch.set_num_threads(spec["threads"])
    torch.set_grad_enabled(False)
    ck = Checkpoint.open(spec["ckpt"])
    cfg = ck.config
    W = {n: torch.from_numpy(ck.f32(n)) for n, _ in vision_tensors(cfg) + projector_tensors(cfg)}
    torch_encode(torch, W, cfg, *synthetic_image(28 * 2))                # warm-up
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for size in spec["sizes"]:
        pv, grid = synthetic_image(size)
        t = time.perf_counter()
        torch_encode(torch, W, cfg, pv, grid)
        out[str(size)] = {"seconds": time.perf_counter() - t, "patches": int(pv.shape[0])}
    return out


def run(spec: dict) -> dict:
    why = unavailable()
    if why:
        return {"skipped": why}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return lm_bench(spec) if spec["what"] == "lm" else vision_bench(spec)
