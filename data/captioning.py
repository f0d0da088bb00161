"""Dense captions as CogVideoX's paper makes them (`cogvx data caption`): frames captioned by a vision-language
model, then the frame captions summarised into one caption of the clip; and the pick among a clip's captions.

The captioning model is any transformers image-text-to-text model saved in a local folder
(`AutoModelForImageTextToText` and `AutoProcessor`: LLaVA, LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL, Idefics3,
SmolVLM, PaliGemma, BLIP, GIT, ...). Each of K frames spread over the clip (`dedup.sample_frames`) is captioned on
its own, one image a prompt, many prompts a batch (any such model takes that; a video-input mode is not made).
A clip of one frame (an image) keeps its frame's caption. For more frames the summary is written by
`--summarize-model` (a local text model: `AutoModelForCausalLM`, or `AutoModelForSeq2SeqLM` for an
encoder-decoder) when given, else by the captioning model itself given the text alone (a chat VLM answers a
text-only prompt as its language model does). Generation is greedy (`do_sample=False`): the same model, frames and
prompts give the same captions.

Prompts go through the processor's (tokenizer's) chat template when it has one, as the model was trained to read
them; a model without one (BLIP, GIT) gets the prompt as its text, or images alone for an empty prompt.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_PROMPT = ("Describe this video frame in detail: the main subjects and their appearance, what they are "
                  "doing, the setting, the lighting and colours, and the camera's view.")
DEFAULT_SUMMARY_PROMPT = (
    "Here are descriptions of {count} frames of one video clip, in order:\n{captions}\n"
    "Write one detailed paragraph that describes the video as a whole: the subjects, how they move and what "
    "changes over time, the setting, and the camera's movement. Describe it as a video; do not mention frames.")
"""`{count}` and `{captions}` (one `Frame k: ...` line each) are filled in."""


def summary_prompt(template: str, captions: Sequence[str]) -> str:
    lines = "\n".join(f"Frame {k}: {caption}" for k, caption in enumerate(captions, 1))
    return template.replace("{count}", str(len(captions))).replace("{captions}", lines)


def tidy(text: str) -> str:
    """A generated caption as one line: whitespace runs made one space, ends stripped."""
    return re.sub(r"\s+", " ", text).strip()


def resolve_device(device: Optional[str] = None) -> str:
    """'cpu', 'cuda:N' as given; 'cuda' or None: this task's GPU (LOCAL_RANK under torchrun), else the CPU."""
    import os

    import torch

    if device is None and not torch.cuda.is_available():
        return "cpu"
    if device in (None, "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def local_model_folder(flag: str, path: str) -> Path:
    from cogvx_mega.config.errors import ConfigError

    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ConfigError(flag, path, "not a folder holding a transformers model (config.json); pass the local "
                                      "folder a model was saved or downloaded to")
    return folder


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


class _Generator:
    """What the two models share: moving inputs to the device, greedy generation, decoding the new tokens."""

    model = None
    device = "cpu"
    dtype = None
    flag = "--model"
    path = ""

    def _generate(self, inputs, max_new_tokens: int, decode) -> list[str]:
        import torch

        from cogvx_mega.config.errors import ConfigError

        moved = {}
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
            moved[name] = value
        try:
            with torch.inference_mode():
                output = self.model.generate(**moved, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as error:
            raise ConfigError(self.flag, self.path, f"generation fails ({first_line(error)})") from error
        prompt = moved.get("input_ids")
        if prompt is not None and output.shape[1] >= prompt.shape[1] and torch.equal(
                output[:, :prompt.shape[1]], prompt.to(output.device)):
            output = output[:, prompt.shape[1]:]  # a decoder-only model returns the prompt before its answer
        return [tidy(text) for text in decode(output.cpu(), skip_special_tokens=True)]


def _dtype_for(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _left_padded(tokenizer) -> None:
    """Batched generation by a decoder-only model needs the padding on the left (the answer follows the prompt)."""
    if tokenizer is None:
        return
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


class FrameCaptioner(_Generator):
    """A local image-text-to-text model: `caption(images, prompt)` and, for chat models, `complete(prompts)`."""

    def __init__(self, path: str, device: Optional[str] = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from cogvx_mega.config.errors import ConfigError

        folder = local_model_folder("--model", path)
        self.path, self.flag = path, "--model"
        self.device = resolve_device(device)
        self.dtype = _dtype_for(self.device)
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True,
                                                                     dtype=self.dtype).to(self.device).eval()
        except (ValueError, OSError, KeyError, TypeError) as error:
            raise ConfigError("--model", path, f"cannot be loaded as a transformers image-text-to-text model with "
                                               f"its processor ({first_line(error)})") from None
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if not getattr(self.model.config, "is_encoder_decoder", False):
            _left_padded(self.tokenizer)
        self.chat = bool(getattr(self.processor, "chat_template", None))

    def _decode(self, ids, skip_special_tokens: bool):
        return self.processor.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    def _chat(self, content: list[dict]) -> str:
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)

    def caption(self, images: Sequence, prompt: str, max_new_tokens: int) -> list[str]:
        """One caption per image (PIL), all in one generate call."""
        if self.chat:
            texts = [self._chat([{"type": "image"}, {"type": "text", "text": prompt}])] * len(images)
        else:
            texts = [prompt] * len(images) if prompt else None
        kwargs = {"images": list(images), "return_tensors": "pt"}
        if texts is not None:
            kwargs.update(text=texts, padding=True)
        try:
            inputs = self.processor(**kwargs)
        except (ValueError, TypeError, KeyError) as error:
            raise _model_error(self, "its processor cannot take these frames and prompt", error) from error
        return self._generate(inputs, max_new_tokens, self._decode)

    def complete(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Text-only answers (the summaries), through the chat template."""
        texts = [self._chat([{"type": "text", "text": prompt}]) for prompt in prompts]
        try:
            inputs = self.processor(text=texts, return_tensors="pt", padding=True)
        except (ValueError, TypeError, KeyError) as error:
            raise _model_error(self, "it cannot take a text-only prompt (pass --summarize-model)", error) \
                from error
        return self._generate(inputs, max_new_tokens, self._decode)


class TextSummarizer(_Generator):
    """A local text model that writes the summary of the frame captions: `complete(prompts)`."""

    def __init__(self, path: str, device: Optional[str] = None):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        from cogvx_mega.config.errors import ConfigError

        folder = local_model_folder("--summarize-model", path)
        self.path, self.flag = path, "--summarize-model"
        self.device = resolve_device(device)
        self.dtype = _dtype_for(self.device)
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
            kind = AutoModelForSeq2SeqLM if self.encoder_decoder else AutoModelForCausalLM
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = kind.from_pretrained(folder, local_files_only=True, dtype=self.dtype).to(self.device).eval()
        except (ValueError, OSError, KeyError, TypeError) as error:
            raise ConfigError("--summarize-model", path, f"cannot be loaded as a transformers text model with its "
                                                         f"tokenizer ({first_line(error)})") from None
        if not self.encoder_decoder:
            _left_padded(self.tokenizer)
        elif self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def complete(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        if getattr(self.tokenizer, "chat_template", None):
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                        add_generation_prompt=True, tokenize=False)
                     for prompt in prompts]
        else:
            texts = list(prompts)
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True)
        return self._generate(inputs, max_new_tokens, self.tokenizer.batch_decode)


def _model_error(generator: _Generator, what: str, error: BaseException):
    from cogvx_mega.config.errors import ConfigError

    return ConfigError(generator.flag, generator.path, f"{what} ({first_line(error)})")


# the training side: several captions per clip

CAPTION_PICKS = ("first", "random")


def pick_caption(record: dict, columns: Sequence[str], pick: str = "first", draw: Optional[float] = None) -> str:
    """The caption a clip trains with, among the manifest columns `columns` (in order) that the line holds as
    non-empty text: pick="first" the first of them (["dense_caption", "caption"]: the dense caption where there is
    one, else the original); pick="random" one of them at random, chosen by `draw`, a uniform number in [0, 1) keyed
    on the clip's place in the run (seed, step, slot), so a resumed run or another parallel layout picks the same.
    KeyError when the line holds none of them."""
    present = [record[column] for column in columns
               if isinstance(record.get(column), str) and record[column].strip()]
    if not present:
        raise KeyError(f"none of the caption columns {', '.join(columns)}")
    if pick == "first" or len(present) == 1:
        return present[0]
    if pick != "random":
        raise ValueError(f"unknown caption pick {pick!r}; choose one of {', '.join(CAPTION_PICKS)}")
    if draw is None or not 0.0 <= draw < 1.0:
        raise ValueError("pick='random' needs a draw in [0, 1)")
    return present[min(len(present) - 1, int(draw * len(present)))]
