"""Packed sequences on the GPU (skipped without CUDA): every block-diagonal attention kernel equals one attention
per clip; Transformer Engine's thd attention gives the packed forward and packed training of the local backend;
with two GPUs, TE's thd context parallel equals CP=1. (Both backends refuse a pack with an unpadded span
through `parallel.varlen.check_packed_split`, tested on CPU.)"""
from __future__ import annotations

import importlib.util
import os
import traceback

import pytest
import torch
from spawn import spawn_ranks

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

HAS_TE = importlib.util.find_spec("transformer_engine") is not None
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
PACKING = ["data.num_synthetic_clips=24", "training.micro_batch_size=1", "training.global_batch_size=4",
           "data.buckets=[9x64x64,1x64x64,5x32x64,9x32x32]", "data.packing=true", "data.pack_tokens=160",
           "model.max_text_seq_length=15", "training.device=cuda", "training.bf16=true"]
LOSS_RTOL = 2e-2  # bf16 autocast in both runs, each rounding differently


@pytest.mark.parametrize("kernel", ["sdpa_mask", "flex"] + (["flash"] if HAS_FLASH else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_kernels_match_one_attention_per_clip_on_gpu(kernel, dtype):
    from cogvx_mega.parallel.varlen import varlen_attention

    if kernel == "flash" and dtype == torch.float32:
        pytest.skip("flash-attn has no fp32 kernels")
    generator = torch.Generator().manual_seed(0)
    cu_q, cu_k = [0, 300, 520, 1024], [0, 290, 500, 1000]
    q, k, v = (torch.randn(n, 4, 64, generator=generator).to("cuda", dtype) for n in (1024, 1000, 1000))
    expected = varlen_attention(q.float(), k.float(), v.float(), cu_q, cu_k, None, "per_clip")
    actual = varlen_attention(q, k, v, cu_q, cu_k, None, kernel).float()
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    assert (actual - expected).abs().max().item() <= tolerance


@pytest.mark.skipif(not HAS_TE, reason="needs Transformer Engine (pip install -e .[gpu])")
def test_te_thd_forward_packed_matches_local_backend(tmp_path):
    from families import make_diffusers_model

    import cogvx_mega

    reference = make_diffusers_model("rope-5b", std=0.1)
    reference.save_pretrained(tmp_path)
    local = cogvx_mega.from_pretrained(str(tmp_path), device="cuda", backend="local")
    te = cogvx_mega.from_pretrained(str(tmp_path), device="cuda", backend="te")
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 8, 12, 5), (2, 10, 6, 3), (1, 4, 4, 4)]
    latents = [torch.randn(t, 4, h, w, generator=generator).cuda() for t, h, w, _ in shapes]
    texts = [torch.randn(n, 12, generator=generator).cuda() for *_, n in shapes]
    timesteps = torch.tensor([3, 999, 500], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = local.forward_packed(latents, texts, timesteps)
        actual = te.forward_packed(latents, texts, timesteps)
    for a, e in zip(actual, expected):
        assert (a.float() - e.float()).abs().max().item() <= 2e-2 * e.abs().max().item()


def _train(rank: int, world_size: int, port: int, overrides: list, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    try:
        from cogvx_mega.config import load_config
        from cogvx_mega.model.transformer import build_model_chunks
        from cogvx_mega.parallel.state import initialize_parallel, shutdown
        from cogvx_mega.tools.training_data import open_training_data
        from cogvx_mega.training.trainer import Trainer

        config = load_config("tiny", overrides=[*PACKING, *overrides])
        dims = initialize_parallel(config.parallel, device="cuda", seed=config.training.seed)
        chunks = build_model_chunks(config.model, config.parallel, device="cuda", seed=config.training.seed)
        dataset = open_training_data(config)
        trainer = Trainer(config, dims, chunks, dataset, run_dir=f"/tmp/cogvx-te-packing-{port}")
        history = []
        for step in range(3):
            batch = dataset.step_batch(step, trainer.slots, trainer.global_batch, config.training.seed)
            metrics = trainer.train_step(batch)
            history.append((metrics["loss"], metrics["grad_norm"]))
        shutdown()
        results.put((rank, "ok", history))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


@pytest.fixture(scope="module")
def local_packed():
    return spawn_ranks(_train, 1, ["model.backend=local"])[0]


def _assert_close(history, reference):
    for (loss, norm), (ref_loss, ref_norm) in zip(history, reference):
        assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)
        assert norm == pytest.approx(ref_norm, rel=5 * LOSS_RTOL)


@pytest.mark.skipif(not HAS_TE, reason="needs Transformer Engine (pip install -e .[gpu])")
def test_te_packed_training_matches_local_backend(local_packed):
    _assert_close(spawn_ranks(_train, 1, ["model.backend=te"])[0], local_packed)


@pytest.mark.skipif(not HAS_TE or torch.cuda.device_count() < 2, reason="needs TE and two GPUs")
def test_te_thd_context_parallel_matches_cp1(local_packed):
    for history in spawn_ranks(_train, 2, ["model.backend=te", "parallel.context_parallel_size=2",
                            "parallel.context_parallel_attention=p2p"]):
        _assert_close(history, local_packed)
