"""Transformer Engine backend in training, against the local backend (skipped without CUDA and TE).

One GPU: a te run and a local run of the tiny model, both at CP=1, give the same losses and gradient
norms. Two or more GPUs: TE's context parallel attention (p2p, all_gather, a2a, a2a+p2p) at CP=2 gives
the losses of the local backend at CP=1. All runs are bf16 autocast (TE's fused attention, which its
context parallelism needs, has no fp32 kernels), so the tolerance is bf16-sized.

Each run is its own spawned process group (NCCL), so CUDA is never initialised in the pytest process.
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
from spawn import spawn_ranks

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("transformer_engine", reason="needs Transformer Engine (pip install -e .[gpu])")

STEPS = 3
GLOBAL_BATCH = 2
# bf16 matmuls and attention in both runs, each rounding differently: losses agree to about 1%
LOSS_RTOL = 2e-2


def _train(rank: int, world_size: int, port: int, overrides: list, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    try:
        from cogvx_mega.config import load_config
        from cogvx_mega.data.latent_dataset import rank_batch, synthetic_dataset_for
        from cogvx_mega.model.transformer import build_model_chunks
        from cogvx_mega.parallel.state import initialize_parallel, shutdown
        from cogvx_mega.training.trainer import Trainer

        config = load_config("tiny", overrides=["training.device=cuda", "training.bf16=true",
                                                "training.micro_batch_size=1",
                                                f"training.global_batch_size={GLOBAL_BATCH}", *overrides])
        dims = initialize_parallel(config.parallel, device="cuda", seed=config.training.seed)
        chunks = build_model_chunks(config.model, config.parallel, device="cuda", seed=config.training.seed)
        trainer = Trainer(config, dims, chunks, synthetic_dataset_for(config), run_dir=f"/tmp/cogvx-te-cp-{port}")
        samples = trainer.samples_per_rank
        history = []
        for step in range(STEPS):
            batch = rank_batch(trainer.dataset, step, samples, dims.data_parallel_rank, dims.data_parallel_size,
                               config.training.seed)
            generator = torch.Generator().manual_seed(1000 + step)
            fixed = {"noise": torch.randn(GLOBAL_BATCH, *trainer.dataset.latents.shape[1:], generator=generator),
                     "timesteps": torch.randint(0, 1000, (GLOBAL_BATCH,), generator=generator),
                     "text_drop_mask": torch.zeros(GLOBAL_BATCH, dtype=torch.bool)}
            mine = slice(dims.data_parallel_rank * samples, (dims.data_parallel_rank + 1) * samples)
            batch.update({k: v[mine] for k, v in fixed.items()})
            metrics = trainer.train_step(batch)
            history.append((metrics["loss"], metrics["grad_norm"]))
        shutdown()
        results.put((rank, "ok", history))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


@pytest.fixture(scope="module")
def local_single_gpu():
    return spawn_ranks(_train, 1, ["model.backend=local"])[0]


@pytest.mark.timeout(900)
def test_te_training_matches_local_backend_on_one_gpu(local_single_gpu):
    te = spawn_ranks(_train, 1, ["model.backend=te"])[0]
    assert [loss for loss, _ in te] == pytest.approx([loss for loss, _ in local_single_gpu], rel=LOSS_RTOL)
    assert [norm for _, norm in te] == pytest.approx([norm for _, norm in local_single_gpu], rel=5e-2)


@pytest.mark.timeout(900)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TE context parallel at CP=2 needs two GPUs")
@pytest.mark.parametrize("comm", ["p2p", "all_gather", "a2a"])
def test_te_context_parallel_matches_local_single_gpu(comm, local_single_gpu):
    ranks = spawn_ranks(_train, 2, ["model.backend=te", "parallel.context_parallel_size=2",
                     f"parallel.context_parallel_attention={comm}"])
    _assert_same_losses(ranks, local_single_gpu, comm)


@pytest.mark.timeout(900)
@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="hierarchical a2a+p2p at CP=4 needs four GPUs")
def test_te_hierarchical_context_parallel_matches_local_single_gpu(local_single_gpu):
    ranks = spawn_ranks(_train, 4, ["model.backend=te", "parallel.context_parallel_size=4",
                     "parallel.context_parallel_attention=a2a+p2p", "parallel.hierarchical_context_parallel_sizes=[2, 2]"])
    _assert_same_losses(ranks, local_single_gpu, "a2a+p2p")


def _assert_same_losses(ranks: list, expected: list, label: str) -> None:
    for rank, history in enumerate(ranks):
        assert [loss for loss, _ in history] == pytest.approx([loss for loss, _ in expected],
                                                              rel=LOSS_RTOL), f"{label} rank {rank}"


# FP8 GEMMs (e4m3 forward, e5m2 gradients) against the bf16 local run: a few percent on a 3-step loss
FP8_LOSS_RTOL = 5e-2


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_training_follows_bf16(recipe, local_single_gpu):
    history = spawn_ranks(_train, 1, ["model.backend=te", "model.fp8=hybrid", f"model.fp8_recipe={recipe}"])[0]
    for (loss, _), (ref_loss, _) in zip(history, local_single_gpu):
        assert loss == pytest.approx(ref_loss, rel=FP8_LOSS_RTOL)
