"""Captions -> T5 text embeddings [N, L, D], as the CogVideoX pipelines compute them: the sentencepiece T5
tokenizer pads or truncates every caption to L tokens (226 for CogVideoX) and the T5 encoder runs on the
token ids alone (no attention mask), so pad positions get embeddings too, exactly as in diffusers.

Everything is read from local folders (a T5 folder with both parts, or a diffusers pipeline folder with
`tokenizer/` and `text_encoder/`); nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from cogvx_mega.config.errors import ConfigError

_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")


def _part_folder(root: Path, part: str, marker_files: Sequence[str]) -> Optional[Path]:
    for folder in (root / part, root):
        if any((folder / name).is_file() for name in marker_files):
            return folder
    return None


def t5_parts(path: str) -> tuple[Path, Path]:
    """(tokenizer folder, encoder folder) of a local T5 folder: both at its top, or a pipeline's tokenizer/ and
    text_encoder/. One clear error when a part is missing."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError("--text-encoder", str(path), "no such folder; pass a local T5 folder (tokenizer and "
                                                       "encoder, or a diffusers pipeline folder): nothing is "
                                                       "downloaded")
    tokenizer_dir = _part_folder(root, "tokenizer", _TOKENIZER_FILES)
    encoder_dir = _part_folder(root, "text_encoder", ("config.json",))
    if tokenizer_dir is None or encoder_dir is None:
        missing = "tokenizer (spiece.model / tokenizer.json)" if tokenizer_dir is None else "encoder (config.json)"
        raise ConfigError("--text-encoder", str(path), f"has no T5 {missing}, neither at its top nor in "
                                                       f"tokenizer/ / text_encoder/")
    return tokenizer_dir, encoder_dir


class T5TextEncoder:
    """`encode(captions) -> [N, max_length, d_model]` float32 on the CPU (the encoder runs on `device`, in
    bf16 on a GPU unless `dtype` says otherwise)."""

    def __init__(self, path: str, max_length: int = 226, device: str = "cpu", dtype: Optional[torch.dtype] = None):
        tokenizer_dir, encoder_dir = t5_parts(path)
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
        self.encoder = T5EncoderModel.from_pretrained(str(encoder_dir), local_files_only=True,
                                                      torch_dtype=dtype).to(device).eval()
        self.max_length, self.device = max_length, device

    @property
    def width(self) -> int:
        return self.encoder.config.d_model

    def token_ids(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                              add_special_tokens=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.token_ids(captions).to(self.device)
        return self.encoder(ids)[0].float().cpu()
