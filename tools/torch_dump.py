"""Dump named intermediates of ANOTHER engine -- PyTorch modules (transformers' DeepseekV3ForCausalLM built from
the checkpoint's ``language_model.`` weights) -- with forward hooks, under pykimi's trace names, so that
``pykimi diff`` can compare the two implementations tensor by tensor.

    python tools/torch_dump.py --model DIR --inputs CASE/inputs.safetensors [--features DUMP] --out torch.safetensors
    pykimi trace --model DIR --inputs CASE/inputs.safetensors --out pykimi.safetensors
    pykimi diff pykimi.safetensors torch.safetensors

The same recipe works for any PyTorch port: register a hook on each module whose checkpoint path is a trace name
and store its output. Image prompts need the image features (``multi_modal_projector``) from a dump of the vision
side (``--features``; a golden file or a pykimi trace), because transformers has no MoonViT.

Optional tool: needs torch and transformers (never a pykimi runtime dependency).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def torch_lm_dump(model_dir: str, input_ids: np.ndarray, image_features: np.ndarray | None = None) -> dict:
    """Run transformers' DeepseekV3 on the checkpoint's LM in float32 and return {trace name: array}."""
    import torch

    from bench.peers.torch_peer import build_lm  # the weight mapping shared with the benchmark's peer

    model, text = build_lm(model_dir, "float32")
    out: dict[str, np.ndarray] = {}
    order: list[str] = []
    hooks = []

    def keep(name):
        def hook(module, args, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            out[name] = t.detach().float().numpy()[0]            # drop the batch axis
            order.append(name)
        return hook

    lm = model.model
    for i, layer in enumerate(lm.layers):
        p = f"language_model.model.layers.{i}"
        hooks.append(layer.self_attn.register_forward_hook(keep(f"{p}.self_attn")))
        hooks.append(layer.mlp.register_forward_hook(keep(f"{p}.mlp")))
        hooks.append(layer.register_forward_hook(keep(p)))
    hooks.append(lm.norm.register_forward_hook(keep("language_model.model.norm")))
    hooks.append(model.lm_head.register_forward_hook(keep("logits")))

    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))[None]
    with torch.no_grad():
        emb = lm.embed_tokens(ids)                                 # [1, S, D]
        if image_features is not None:
            # the Kimi-VL merge (spec §8.1): placeholders overwritten, in order, by the image features
            ph = np.flatnonzero(np.asarray(input_ids) == _placeholder(model_dir))
            if ph.size != image_features.shape[0]:
                raise SystemExit(f"{ph.size} placeholders but {image_features.shape[0]} image feature rows")
            emb[0, torch.from_numpy(ph)] = torch.from_numpy(np.asarray(image_features, dtype=np.float32))
        out["inputs_embeds"] = emb[0].numpy().copy()
        order.insert(0, "inputs_embeds")
        model(inputs_embeds=emb, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: out[k] for k in order}


def _placeholder(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as fh:
        return int(json.load(fh)["media_placeholder_token_id"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True, help="safetensors with input_ids (an inputs.safetensors)")
    ap.add_argument("--features", help="a dump holding multi_modal_projector (for prompts with images)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from pykimi.weights import Checkpoint, save_file

    inp = Checkpoint.open(args.inputs)
    ids = np.array(inp.get("input_ids"))
    feats = None
    if "pixel_values" in inp:
        if not args.features:
            raise SystemExit("these inputs have images: pass --features DUMP holding multi_modal_projector")
        feats = Checkpoint.open(args.features).f32("multi_modal_projector")
    dump = torch_lm_dump(args.model, ids, feats)
    save_file(dump, args.out, metadata={"producer": "transformers DeepseekV3ForCausalLM (tools/torch_dump.py)",
                                        "order": json.dumps(list(dump))})
    print(f"wrote {len(dump)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
