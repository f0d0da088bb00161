"""A tiny T5 made on the spot for the data tests: a sentencepiece model trained on test captions, a random
T5 encoder, both saved like a diffusers pipeline's tokenizer/ and text_encoder/ folders (nothing downloads)."""
from __future__ import annotations

from pathlib import Path

WORDS = ("a red green blue yellow white square circle bar moving slowly quickly left right up down over the "
         "dark background bright little big video of clip shows").split()


def caption_corpus(lines: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines)]


def make_tiny_t5(root: Path, d_model: int = 32) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(caption_corpus()) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "spiece"), vocab_size=48,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   minloglevel=2)
    tokenizer = T5Tokenizer(vocab_file=str(root / "spiece.model"), extra_ids=0, legacy=False)
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = T5Config(vocab_size=48, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(config).eval().save_pretrained(root / "text_encoder")
    return root
