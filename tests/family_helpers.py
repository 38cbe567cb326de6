"""Tiny checkpoints in each layout of the family (the real files cannot be downloaded here).

* ``make_kimi_vl_dir``: the golden tiny Kimi-VL checkpoint + a byte vocabulary, optionally dressed as a variant
  (a name in config.json, a preprocessor_config.json with another in_token_limit, a generation_config.json).
* ``to_moonlight_layout``: the same checkpoint's language model rewritten as Moonlight ships it: the text_config
  fields flat at the top of a ``deepseek_v3`` config.json, tensors ``model.*`` / ``lm_head.weight``, no vision
  tower, no projector, a tokenizer_config.json without media tokens and with its own chat template.
"""
import json
import os
import shutil

from cli_helpers import make_tiny_model_dir

from pykimi.tokenizer import builtin_special_names
from pykimi.variants import flat_name
from pykimi.weights import Checkpoint, SafetensorsWriter, Stored

MOONLIGHT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant provided by Moonshot-AI.<|im_end|>"
    "{%- endif -%}"
    "{{ '<|im_' + message['role'] + '|>' + message['role'] + '<|im_middle|>' + message['content'] + '<|im_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")


def make_kimi_vl_dir(dst, name=None, in_token_limit=None, generation=None, template=None):
    d = make_tiny_model_dir(str(dst))
    if name is not None:
        p = os.path.join(d, "config.json")
        with open(p) as f:
            cfg = json.load(f)
        cfg["_name_or_path"] = f"moonshotai/{name}"
        with open(p, "w") as f:
            json.dump(cfg, f, indent=1)
    if in_token_limit is not None:
        p = os.path.join(d, "preprocessor_config.json")
        with open(p) as f:
            pp = json.load(f)
        pp["in_token_limit"] = in_token_limit
        with open(p, "w") as f:
            json.dump(pp, f, indent=1)
    if generation is not None:
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump(generation, f)
    if template is not None:
        with open(os.path.join(d, "chat_template.jinja"), "w") as f:
            f.write(template)
    return d


def to_moonlight_layout(src, dst, name=None, rope_theta=None, max_position_embeddings=None):
    """Write ``src``'s language model (a Kimi-VL directory) in the Moonlight layout at ``dst``."""
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        kcfg = json.load(f)
    flat = dict(kcfg["text_config"])
    flat["model_type"] = "deepseek_v3"
    flat["architectures"] = ["DeepseekV3ForCausalLM"]
    if name is not None:
        flat["_name_or_path"] = f"moonshotai/{name}"
    if rope_theta is not None:
        flat["rope_theta"] = rope_theta
    if max_position_embeddings is not None:
        flat["max_position_embeddings"] = max_position_embeddings
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(flat, f, indent=1)
    ck = Checkpoint.open(src)
    names = [n for n in ck.names() if flat_name(n) is not None]
    with SafetensorsWriter(os.path.join(dst, "model.safetensors")) as w:
        for n in names:
            t = ck.tensor(n)
            w.add(flat_name(n), Stored(flat_name(n), t.dtype, t.data))   # the writer names a Stored by its own
    shutil.copy(os.path.join(src, "tiktoken.model"), dst)
    n_base = 256
    names = {i: s for i, s in builtin_special_names(n_base).items() if "media" not in s}
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": {str(i): {"content": s, "special": True} for i, s in names.items()},
                   "bos_token": "[BOS]", "eos_token": "[EOS]", "chat_template": MOONLIGHT_TEMPLATE}, f)
    return dst
