"""`--init-from` a diffusers folder at TP2, PP2 x VPP2 and CP2: every rank loads exactly its shard of the
released weights (read slice by slice, no full copy), and the first training step equals one process."""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks

LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2-vpp2": ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"],
    "cp2": ["parallel.context_parallel_size=2"],
}


def first_step_from(rank: int, world_size: int, overrides: tuple, init_from: str, run_dir: str) -> dict:
    from megatron.core.utils import get_pg_rank, get_pg_size

    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import synthetic_dataset_for
    from cogvx_mega.model.init import global_parameter_name
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.pretrained import load_pretrained_weights
    from cogvx_mega.training.trainer import Trainer

    config = load_config("tiny", overrides=["data.num_synthetic_clips=8", "training.micro_batch_size=1",
                                            "training.global_batch_size=2", *overrides])
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu", seed=config.training.seed)
    load_pretrained_weights(chunks, init_from, config.model)
    loaded = {}
    for chunk in chunks:
        tp = (get_pg_size(chunk.tp_group), get_pg_rank(chunk.tp_group))
        for name, param in chunk.named_parameters():
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) and tp[0] > 1 else None
            loaded[global_parameter_name(chunk, name)] = (param.detach().clone(), dim, *tp)
    trainer = Trainer(config, dims, chunks, synthetic_dataset_for(config), run_dir=run_dir)
    metrics = trainer.train_step(trainer.dataset.step_batch(0, trainer.slots, trainer.global_batch,
                                                            config.training.seed))
    return {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "loaded": loaded}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    from families import make_tiny_preset_diffusers_model

    from cogvx_mega.checkpoint.reader import read_transformer_checkpoint

    folder = tmp_path_factory.mktemp("released") / "transformer"
    make_tiny_preset_diffusers_model().save_pretrained(folder)
    _, full_state, _ = read_transformer_checkpoint(folder)
    reference = run_ranks(1, first_step_from, (), str(folder), str(folder.parent / "run"))[0]
    return str(folder), full_state, reference


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_init_from_diffusers_equals_one_process(layout, released, tmp_path):
    folder, full_state, reference = released
    for key, (tensor, *_rest) in reference["loaded"].items():  # one process holds the released tensors exactly
        assert torch.equal(tensor, full_state[key]), key
    results = run_ranks(2, first_step_from, tuple(LAYOUTS[layout]), folder, str(tmp_path))
    covered = set()
    for rank, result in enumerate(results):
        for key, (tensor, dim, tp_size, tp_rank) in result["loaded"].items():
            expected = full_state[key] if dim is None else full_state[key].chunk(tp_size, dim=dim)[tp_rank]
            assert torch.equal(tensor, expected), f"{layout} rank {rank}: {key}"
            covered.add(key)
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5), f"{layout} rank {rank} loss"
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), f"{layout} rank {rank} norm"
    assert covered == set(full_state)  # together the ranks hold the whole released model
