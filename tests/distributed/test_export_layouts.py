"""A release does not depend on the training layout: the export of a TP2 x PP2 training checkpoint equals the
export of the same weights saved at TP1 x PP1, tensor for tensor (both saved at step 0, where the weights are
the layout-independent initialisation)."""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks


def save_initial_checkpoint(rank: int, world_size: int, overrides: tuple, run_dir: str) -> str:
    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import synthetic_dataset_for
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.trainer import Trainer

    config = load_config("tiny", overrides=["data.num_synthetic_clips=4", "training.micro_batch_size=1",
                                            "training.global_batch_size=2", *overrides])
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu", seed=config.training.seed)
    trainer = Trainer(config, dims, chunks, synthetic_dataset_for(config), run_dir=run_dir)
    path = trainer.save()
    trainer.finalize_saves(blocking=True)
    return str(path)


@pytest.mark.timeout(240)
def test_export_of_a_tp2_pp2_checkpoint_equals_the_tp1_export(tmp_path):
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import load_file
    from text_encoder import make_tiny_t5

    from cogvx_mega.tools.export import export_diffusers

    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(tmp_path / "vae")
    make_tiny_t5(tmp_path / "t5", d_model=32)  # the tiny preset's text width
    checkpoints = {
        "tp2-pp2": run_ranks(4, save_initial_checkpoint, ("parallel.tensor_model_parallel_size=2",
                                                          "parallel.pipeline_model_parallel_size=2"),
                             str(tmp_path / "run-tp2-pp2"))[0],
        "tp1": run_ranks(1, save_initial_checkpoint, (), str(tmp_path / "run-tp1"))[0],
    }
    exported = {}
    for name, checkpoint in checkpoints.items():
        folder = export_diffusers(checkpoint, str(tmp_path / "vae"), str(tmp_path / "t5"), str(tmp_path / name))
        exported[name] = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(exported["tp2-pp2"]) == set(exported["tp1"]) and exported["tp1"]
    for key, tensor in exported["tp1"].items():
        assert torch.equal(exported["tp2-pp2"][key], tensor), key
