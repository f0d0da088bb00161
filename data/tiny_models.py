"""Tiny random stand-ins for the VAE and T5, made on the spot and saved like the real ones, so the data
path (encode, cache, train) runs end to end with nothing downloaded: the demo and the tests use them."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch

WORDS = ("a red green blue yellow white square circle bar moving slowly quickly left right up down over the "
         "dark background bright little big video of clip shows").split()


def caption_corpus(lines: int = 400, extra: Sequence[str] = ()) -> list[str]:
    rng = random.Random(0)
    return [*extra, *(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines))]


def make_tiny_t5(root: Path, d_model: int = 32, captions: Sequence[str] = ()) -> Path:
    """A sentencepiece tokenizer trained on a caption corpus and a random 1-layer T5 encoder, saved as a
    pipeline's `tokenizer/` and `text_encoder/` folders under `root`."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(caption_corpus(extra=captions)) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "spiece"), vocab_size=48,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   minloglevel=2)
    T5Tokenizer(vocab_file=str(root / "spiece.model"), extra_ids=0, legacy=False).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = T5Config(vocab_size=48, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(config).eval().save_pretrained(root / "text_encoder")
    return root


def make_tiny_vae(path: Path, latent_channels: int = 4) -> Path:
    """A random CogVideoX VAE with the real structure at small widths (8x spatial, 4x temporal), saved as
    a cogvx-mega VAE checkpoint. Its posterior is made sharp (log-variance -8), as a trained VAE's is, so
    the latents carry the video."""
    from cogvx_mega.checkpoint.vae import save_vae_checkpoint
    from cogvx_mega.vae import CogVideoXVAE, VAEConfig

    torch.manual_seed(0)
    config = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                       latent_channels=latent_channels)
    model = CogVideoXVAE(config)
    with torch.no_grad():
        model.encoder.conv_out.conv.weight[latent_channels:] = 0.0
        model.encoder.conv_out.conv.bias[latent_channels:] = -8.0
    return save_vae_checkpoint(str(path), model.state_dict(), config, extra={"made_by": "tiny_models.make_tiny_vae"})
