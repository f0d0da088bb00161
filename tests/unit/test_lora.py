"""LoRA fine-tuning: the base weights stay frozen (no update, no optimizer state, no gradient buffer), the
adapters export in the names diffusers' `load_lora_weights` reads and give our adapted model's output, the
merged readers (from_pretrained, convert, --init-lora) give it too, and bad input is one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cogvx_mega
from cogvx_mega.cli import main

LORA = ["finetune.lora_rank=4", "finetune.lora_alpha=8"]
TRAIN = ["--preset", "tiny", "--device", "cpu", "data.num_synthetic_clips=8", "training.micro_batch_size=2",
         "training.lr=1e-2", "training.warmup_steps=0"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A released-style base (diffusers folder) and a 4-step LoRA run on it."""
    from families import make_tiny_preset_diffusers_model

    root = tmp_path_factory.mktemp("lora")
    make_tiny_preset_diffusers_model().save_pretrained(root / "base")
    assert main(["train", *TRAIN, *LORA, "--init-from", str(root / "base"), "--run-dir", str(root / "run"),
                 "--steps", "4"]) == 0
    checkpoint = sorted((root / "run" / "checkpoints").iterdir())[-1]
    return root, checkpoint


def adapted_model(base: str, checkpoint=None, rank: int = 4, alpha: float = 8.0):
    """Our model with unmerged adapters in one process: the base, the adapters added, their trained values."""
    from cogvx_mega.checkpoint.sharded import load_sharded_checkpoint
    from cogvx_mega.config import load_config
    from cogvx_mega.model.lora import apply_lora, is_lora_parameter
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.pretrained import load_pretrained_weights

    config = load_config("tiny", overrides=[f"finetune.lora_rank={rank}", f"finetune.lora_alpha={alpha}"])
    initialize_parallel(config.parallel, device="cpu", seed=0)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu")
    load_pretrained_weights(chunks, base, config.model)
    apply_lora(chunks, config.finetune, config.training.seed)
    if checkpoint is not None:
        load_sharded_checkpoint(checkpoint, chunks, keep=is_lora_parameter)
    return chunks[0].eval()


def inputs(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 3, 4, 8, 8, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    return latents, text, torch.tensor([40, 700])


def diffusers_output(transformer, latents, text, timesteps):
    from families import pipeline_rope

    with torch.no_grad():
        return transformer(hidden_states=latents, encoder_hidden_states=text, timestep=timesteps,
                           image_rotary_emb=pipeline_rope(transformer, *latents.shape[1:2], 8, 8)).sample


def test_diffusers_load_lora_weights_equals_our_adapted_and_merged_models(lora_run, tmp_path):
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    root, checkpoint = lora_run
    assert main(["export", "lora", "--ckpt", str(checkpoint), "--out", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    latents, text, timesteps = inputs()
    ours = adapted_model(str(root / "base"), checkpoint)
    with torch.no_grad():
        adapted = ours(latents, text, timesteps)
        untrained = adapted_model(str(root / "base"))(latents, text, timesteps)
    base = CogVideoXTransformer3DModel.from_pretrained(root / "base").eval()
    assert (adapted - diffusers_output(base, latents, text, timesteps)).abs().max() > 1e-3  # the adapters matter
    assert (untrained - diffusers_output(base, latents, text, timesteps)).abs().max() <= 1e-5  # B = 0 at start

    pipeline = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=base, scheduler=None)
    pipeline.load_lora_weights(str(tmp_path / "lora"))
    with_lora = diffusers_output(pipeline.transformer, latents, text, timesteps)
    assert (with_lora - adapted).abs().max() <= 1e-5

    merged = cogvx_mega.from_pretrained(str(checkpoint))  # base + adapters, merged by the reader
    with torch.no_grad():
        assert (merged(latents, text, timesteps) - adapted).abs().max() <= 1e-5
    assert main(["convert", "project-to-diffusers", str(checkpoint), str(tmp_path / "merged")]) == 0
    exported = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
    assert (diffusers_output(exported, latents, text, timesteps) - adapted).abs().max() <= 1e-5
    # a release of the LoRA checkpoint holds the merged transformer
    from diffusers import AutoencoderKLCogVideoX
    from text_encoder import make_tiny_t5

    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(tmp_path / "vae")
    make_tiny_t5(tmp_path / "t5", d_model=32)
    assert main(["export", "diffusers", "--ckpt", str(checkpoint), "--vae", str(tmp_path / "vae"), "--text-encoder",
                 str(tmp_path / "t5"), "--out", str(tmp_path / "release")]) == 0
    released = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "release", subfolder="transformer")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(released.state_dict()[name], tensor), name


def test_init_lora_merges_a_diffusers_lora_into_the_base(lora_run, tmp_path):
    from cogvx_mega.config import load_config
    from cogvx_mega.model.init import global_parameter_name
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.pretrained import load_pretrained_weights

    root, checkpoint = lora_run
    assert main(["export", "lora", "--ckpt", str(checkpoint), "--out", str(tmp_path / "lora")]) == 0
    config = load_config("tiny")
    initialize_parallel(config.parallel, device="cpu", seed=0)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu")
    load_pretrained_weights(chunks, str(root / "base"), config.model, lora=str(tmp_path / "lora"))
    merged = cogvx_mega.from_pretrained(str(checkpoint)).state_dict()
    for name, param in chunks[0].named_parameters():
        key = global_parameter_name(chunks[0], name)
        assert (param - merged[key]).abs().max() <= 1e-6, key
    # and as a training start: the first loss of a full run from base + LoRA equals one from the merged weights
    assert main(["convert", "project-to-diffusers", str(checkpoint), str(tmp_path / "merged")]) == 0
    runs = {}
    for name, extra in (("lora", ["--init-from", str(root / "base"), "--init-lora", str(tmp_path / "lora")]),
                        ("merged", ["--init-from", str(tmp_path / "merged")])):
        assert main(["train", *TRAIN, *extra, "--run-dir", str(tmp_path / name), "--steps", "1"]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert runs["lora"] == pytest.approx(runs["merged"], rel=1e-5)


def trainer_with(tmp_path, base, *overrides):
    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import synthetic_dataset_for
    from cogvx_mega.model.lora import apply_lora
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.pretrained import load_pretrained_weights
    from cogvx_mega.training.trainer import Trainer

    config = load_config("tiny", overrides=[f"training.run_dir='{tmp_path}'", "data.num_synthetic_clips=8",
                                            "training.micro_batch_size=2", "training.lr=1e-2",
                                            "training.warmup_steps=0", *overrides])
    dims = initialize_parallel(config.parallel, device="cpu", seed=0)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu")
    load_pretrained_weights(chunks, base, config.model)
    if config.finetune.lora:
        apply_lora(chunks, config.finetune, config.training.seed)
    return Trainer(config, dims, chunks, synthetic_dataset_for(config))


def optimizer_state_bytes(trainer) -> int:
    from cogvx_mega.checkpoint.sharded import _torch_optimizers

    return sum(value.numel() * value.element_size() for inner in _torch_optimizers(trainer.optimizer)
               for state in inner.state.values() for value in state.values() if torch.is_tensor(value)
               and value.dim() > 0)


def grad_buffer_elements(trainer) -> int:
    return sum(buffer.grad_data.numel() for ddp in trainer.ddp_chunks for buffer in ddp.buffers)


def test_base_weights_are_frozen_and_only_adapters_hold_optimizer_state(lora_run, tmp_path):
    from cogvx_mega.model.lora import is_lora_parameter

    base = str(lora_run[0] / "base")
    measured = {}
    for name, overrides in (("full", []), ("r4", ["finetune.lora_rank=4"]), ("r8", ["finetune.lora_rank=8"])):
        trainer = trainer_with(tmp_path / name, base, *overrides)
        params = dict(trainer.model.named_parameters())
        before = {k: v.detach().clone() for k, v in params.items()}
        for step in range(2):
            trainer.train_step(trainer.dataset.step_batch(step, trainer.slots, trainer.global_batch, 1234))
        adapters = sum(p.numel() for k, p in params.items() if is_lora_parameter(k))
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        measured[name] = (optimizer_state_bytes(trainer), grad_buffer_elements(trainer), adapters, trainable)
        if name == "full":
            continue
        for key, value in params.items():
            if is_lora_parameter(key):
                assert value.requires_grad and not (key.endswith("lora_B") and torch.equal(value, before[key])), key
            else:
                assert not value.requires_grad and torch.equal(value, before[key]), f"{name}: {key} moved"
        assert trainable == adapters
    total = sum(p.numel() for p in trainer.model.parameters()) - measured["r8"][2]
    # Adam's two fp32 moments (and fp32 grad buffers) exactly for what trains: the adapters under LoRA
    assert measured["full"][0] == 8 * total and measured["full"][1] == total
    for name in ("r4", "r8"):
        state, buffer, adapters, _ = measured[name]
        assert state == 8 * adapters and buffer == adapters, (name, measured[name])
    assert measured["r8"][2] == 2 * measured["r4"][2]  # adapter parameters (and their state) scale with the rank


@pytest.mark.parametrize("overrides, needle", [
    (["finetune.lora_targets=[to_q]"], "finetune.lora_targets"),
    (["finetune.lora_rank=0"], "finetune.lora_rank"),
])
def test_bad_lora_config_is_one_line(lora_run, tmp_path, capsys, overrides, needle):
    code = main(["train", *TRAIN, "--init-from", str(lora_run[0] / "base"), "--run-dir", str(tmp_path / "run"),
                 "--steps", "1", "finetune.lora_rank=4", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run").exists()


def test_lora_without_a_base_is_one_line(tmp_path, capsys):
    code = main(["train", *TRAIN, *LORA, "--run-dir", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--init-from" in err[0], err


def test_a_lora_checkpoint_whose_base_changed_is_refused(lora_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    root, checkpoint = lora_run
    moved = tmp_path / "copy"  # the run and its base, copied, then the base's weights changed
    shutil.copytree(root, moved)
    for path in sorted((moved / "run" / "checkpoints").iterdir()):
        meta = json.loads((path / "cogvx_checkpoint.json").read_text())
        meta["lora"]["base"] = str(moved / "base")
        (path / "cogvx_checkpoint.json").write_text(json.dumps(meta))
    ckpt = sorted((moved / "run" / "checkpoints").iterdir())[-1]
    assert main(["export", "lora", "--ckpt", str(ckpt), "--out", str(tmp_path / "ok")]) == 0  # the copy is the base
    weights = moved / "base" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["time_embedding.linear_1.weight"] = state["time_embedding.linear_1.weight"] + 0.01
    save_file(state, str(weights))
    capsys.readouterr()
    for argv in (["export", "lora", "--ckpt", str(ckpt), "--out", str(tmp_path / "lora")],
                 ["convert", "project-to-diffusers", str(ckpt), str(tmp_path / "merged")],
                 ["train", *TRAIN, *LORA, "--run-dir", str(moved / "run"), "--steps", "6", "--resume", "auto"]):
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "has changed" in err[0], (argv[0], err)
    assert not (tmp_path / "lora").exists() and not (tmp_path / "merged").exists()


def test_a_bad_init_lora_file_is_one_line(lora_run, tmp_path, capsys):
    from safetensors.torch import save_file

    folder = tmp_path / "other"
    folder.mkdir()
    save_file({"transformer.transformer_blocks.0.norm1.linear.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.0.norm1.linear.lora_B.weight": torch.zeros(384, 4)},
              str(folder / "pytorch_lora_weights.safetensors"))
    code = main(["train", *TRAIN, "--init-from", str(lora_run[0] / "base"), "--init-lora", str(folder),
                 "--run-dir", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "norm1.linear" in err[0], err
    assert not (tmp_path / "run").exists()
