"""Text + images -> model inputs, as HF ``KimiVLProcessor`` (spec §4-5).

The k-th ``<|media_pad|>`` in the prompt stands for the k-th image and is expanded to (gh*gw)/4 copies
(one per merged 2x2 patch group, spec §5 step 6); the ids, the concatenated ``pixel_values`` and the
``image_grid_hws`` are what ``model.forward`` / ``model.generate`` take.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .errors import ConfigError, InputError, TokenizerError
from .image import ImageSettings, preprocess_images
from .reasoning import THINK_END, THINK_START, ReasoningStream, split_reasoning
from .tokenizer import MEDIA_PAD, ChatTemplate, Tokenizer, check_messages, is_image_part


class Processor:
    """Tokenizer + chat template + image preprocessing of one checkpoint directory."""

    def __init__(self, tokenizer: Tokenizer, image_settings: ImageSettings | None = None,
                 chat_template: ChatTemplate | None = None, media_placeholder_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.image_settings = image_settings if image_settings is not None else ImageSettings()
        self.chat_template = chat_template if chat_template is not None else ChatTemplate()
        self.media_placeholder_token_id = (tokenizer.media_pad_id if media_placeholder_token_id is None
                                           else int(media_placeholder_token_id))
        # the reasoning markers of the thinking checkpoints (pykimi.reasoning); plain text, not special ids
        self.think_start, self.think_end = THINK_START, THINK_END
        if self.media_placeholder_token_id is not None and self.media_placeholder_token_id != tokenizer.media_pad_id:
            raise ConfigError(f"media_placeholder_token_id {self.media_placeholder_token_id} is not the "
                              f"tokenizer's {MEDIA_PAD} id {tokenizer.media_pad_id}")

    @classmethod
    def from_pretrained(cls, path: str) -> "Processor":
        """From a checkpoint directory: tiktoken.model (required), tokenizer_config.json,
        preprocessor_config.json, a chat template and config.json (media_placeholder_token_id) when present."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise TokenizerError(f"{path}: not a checkpoint directory")
        model = os.path.join(path, "tiktoken.model")
        if not os.path.isfile(model):
            raise TokenizerError(f"{model}: file not found (the checkpoint directory has no tokenizer vocabulary)")
        tok = Tokenizer.from_pretrained(path)
        placeholder, vocab = _read_config_ids(os.path.join(path, "config.json"))
        if vocab is not None and tok.n_vocab > vocab:
            raise ConfigError(f"{os.path.join(path, 'config.json')}: vocab_size {vocab} is smaller than the "
                              f"tokenizer's {tok.n_vocab} ids ({model})")
        template = ChatTemplate.from_dir(path, bos_token=_name(tok, tok.bos_id), eos_token=_name(tok, tok.eos_id))
        return cls(tok, ImageSettings.load(path), template, placeholder)

    # -- text

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt string of the chat template (spec §4); image parts become the media block."""
        return self.chat_template.render(messages, add_generation_prompt)

    @property
    def stop_ids(self) -> list[int]:
        return self.tokenizer.stop_ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tokenizer.decode(_as_list(ids), skip_special=skip_special)

    # -- reasoning (Kimi-VL-A3B-Thinking / -Thinking-2506: ◁think▷ reasoning ◁/think▷ answer)

    def split_reasoning(self, text: str, start_in_reasoning: bool = False) -> tuple[str | None, str]:
        """A decoded answer -> (reasoning, answer); reasoning is None when the text does not start with the
        think marker (pykimi.reasoning.split_reasoning has the rules)."""
        return split_reasoning(text, self.think_start, self.think_end, start_in_reasoning)

    def reasoning_stream(self, start_in_reasoning: bool = False) -> ReasoningStream:
        """Generated ids in, ("reasoning" | "answer", text) pieces out, markers split across tokens included."""
        return ReasoningStream(self.tokenizer, self.think_start, self.think_end, start_in_reasoning)

    # -- model inputs

    def __call__(self, text: str | None = None, images=None) -> dict:
        """Prompt text with one ``<|media_pad|>`` per image (+ the images in the same order) ->
        dict(input_ids int64[S], pixel_values f32[N, 3, 14, 14] | None, image_grid_hws int64[n, 2] | None)."""
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise InputError(f"text must be a str (one prompt), got {type(text).__name__}")
        images = [] if images is None else list(images) if not _is_single_image(images) else [images]
        ids = self.tokenizer.encode(text, allow_special=True)
        pad = self.tokenizer.media_pad_id
        if pad is None and images:
            raise InputError(f"this tokenizer has no {MEDIA_PAD} token (a language model alone): it cannot take "
                             f"images")
        n_pads = sum(1 for t in ids if t == pad) if pad is not None else 0
        if n_pads != len(images):
            raise InputError(f"the prompt has {n_pads} {MEDIA_PAD} placeholder(s) but {len(images)} image(s) "
                             f"were given; each image needs exactly one")
        if not images:
            return {"input_ids": np.asarray(ids, dtype=np.int64), "pixel_values": None, "image_grid_hws": None}
        pixel_values, grids = preprocess_images(images, self.image_settings)  # [N, 3, 14, 14], [n, 2]
        mh, mw = self.image_settings.merge_kernel_size
        out: list[int] = []
        k = 0
        for t in ids:
            if t == pad:
                gh, gw = int(grids[k, 0]), int(grids[k, 1])
                out += [self.media_placeholder_token_id] * ((gh * gw) // (mh * mw))  # one id per merged group
                k += 1
            else:
                out.append(t)
        return {"input_ids": np.asarray(out, dtype=np.int64), "pixel_values": pixel_values,
                "image_grid_hws": grids}

    def prepare(self, messages, images=None, add_generation_prompt: bool = True) -> dict:
        """Chat messages -> model inputs. Image parts take their picture from the part itself
        ({"type": "image", "image": PIL.Image or path}) or, when the part has none, from ``images`` in order;
        every image part needs exactly one picture and every given image one part."""
        check_messages(messages)
        given = [] if images is None else list(images) if not _is_single_image(images) else [images]
        parts = [p for m in messages if not isinstance(m["content"], str) for p in m["content"] if is_image_part(p)]
        if parts and self.tokenizer.media_pad_id is None:
            raise InputError(f"this tokenizer has no {MEDIA_PAD} token (a language model alone): it cannot take "
                             f"images")
        inline = [p.get("image") for p in parts]  # None: the picture comes from images=
        n_missing = sum(1 for x in inline if x is None)
        if n_missing != len(given):
            raise InputError(f"the messages have {len(parts)} image part(s), {len(parts) - n_missing} with an "
                             f"inline image, so images= must give {n_missing} image(s), got {len(given)}")
        rest = iter(given)
        picked = [x if x is not None else next(rest) for x in inline]
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self(text=text, images=picked)

    def __repr__(self) -> str:
        return (f"Processor({self.tokenizer!r}, {self.image_settings}, template={self.chat_template.origin}, "
                f"media_placeholder_token_id={self.media_placeholder_token_id})")


def _read_config_ids(path: str) -> tuple[int | None, int | None]:
    """(media_placeholder_token_id, vocab_size) from config.json, or Nones when there is no config.json."""
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    ph = cfg.get("media_placeholder_token_id")
    vocab = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    for key, v in (("media_placeholder_token_id", ph), ("vocab_size", vocab)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConfigError(f"{path}: {key} must be a non-negative integer, got {v!r}")
    return ph, vocab


def _name(tok: Tokenizer, i: int) -> str:
    return tok.decode([i])


def _is_single_image(x) -> bool:
    if isinstance(x, (str, os.PathLike)):
        return True
    try:
        from PIL import Image
        return isinstance(x, Image.Image)
    except ImportError:  # pragma: no cover
        return False


def _as_list(ids) -> list:
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise InputError(f"decode: expected a 1-D id array, got shape {ids.shape}")
        return ids.tolist()
    return list(ids)
