"""Image-to-video training: the loss of a step equals one built by hand from diffusers' modules, the image
latent enters the first latent frame only, the augmentation and dropout are keyed on the sample slot, a tiny
I2V model learns, and data without first frames is refused."""
from __future__ import annotations

import json

import pytest
import torch

from cogvx_mega.cli import main
from cogvx_mega.config import load_config
from cogvx_mega.data.latent_dataset import synthetic_dataset_for
from cogvx_mega.model.transformer import build_model_chunks
from cogvx_mega.parallel.state import initialize_parallel
from cogvx_mega.training.trainer import Trainer


def i2v_trainer(tmp_path, preset, *overrides):
    config = load_config(preset, overrides=[f"training.run_dir='{tmp_path}'", "data.num_synthetic_clips=8",
                                            "training.micro_batch_size=2", *overrides])
    dims = initialize_parallel(config.parallel, device="cpu", seed=0)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu", seed=0)
    with torch.no_grad():  # the head is zero-initialised: randomise it so every input channel reaches the loss
        chunks[0].output_proj.weight.normal_(0.0, 0.05)
    return Trainer(config, dims, chunks, synthetic_dataset_for(config))


def diffusers_reference(trainer):
    """Our weights in diffusers' CogVideoXTransformer3DModel, and its scheduler for the run's schedule."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    from cogvx_mega.checkpoint.transformer import diffusers_config_from_model, project_to_diffusers

    m = trainer.config.model
    config = {k: v for k, v in diffusers_config_from_model(m).items() if not k.startswith("_")}
    reference = CogVideoXTransformer3DModel(**config).eval()
    state = {k: v for k, v in trainer.model.state_dict().items() if not k.endswith("_extra_state")}
    reference.load_state_dict(project_to_diffusers(state, m))
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       snr_shift_scale=trainer.config.diffusion.snr_shift_scale,
                                       beta_schedule="scaled_linear")
    return reference, scheduler


@pytest.mark.parametrize("preset", ["tiny-i2v", "tiny1.5-i2v"])
def test_loss_of_a_step_equals_the_diffusers_reference(tmp_path, preset):
    from families import pipeline_rope

    trainer = i2v_trainer(tmp_path, preset)
    reference, scheduler = diffusers_reference(trainer)
    batch = trainer.dataset.step_batch(0, trainer.slots, trainer.global_batch, 1234)
    generator = torch.Generator().manual_seed(3)
    batch.update(noise=torch.randn(batch["latents"].shape, generator=generator), timesteps=torch.tensor([120, 870]),
                 text_drop_mask=torch.tensor([False, False]), image_drop_mask=torch.tensor([False, True]))
    latents, image = batch["latents"], batch["image_latents"]
    assert image.shape == (2, 1, *latents.shape[2:])

    # by hand: the scheduler noises, the image latent (dropped for sample 1) fills frame 0 of 4 extra channels
    noisy = scheduler.add_noise(latents, batch["noise"], batch["timesteps"])
    target = scheduler.get_velocity(latents, batch["noise"], batch["timesteps"])
    condition = torch.zeros_like(latents)
    condition[0, 0] = image[0, 0]
    frames, _, height, width = latents.shape[1:]
    with torch.no_grad():
        prediction = reference(hidden_states=torch.cat([noisy, condition], dim=2),
                               encoder_hidden_states=batch["text_embeds"], timestep=batch["timesteps"],
                               ofs=torch.full((2,), 2.0) if trainer.config.model.ofs_embed_dim else None,
                               image_rotary_emb=pipeline_rope(reference, frames, height, width)).sample
    expected = torch.mean((prediction.float() - target.float()) ** 2).item()
    loss = trainer.train_step(batch)["loss"]
    assert abs(loss - expected) <= 1e-5, (loss, expected)


def test_the_image_enters_the_first_latent_frame_only(tmp_path):
    trainer = i2v_trainer(tmp_path, "tiny-i2v")
    seen = []
    trainer.model.patch_embed.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    batch = trainer.dataset.step_batch(0, trainer.slots, trainer.global_batch, 1234)
    batch["image_drop_mask"] = torch.tensor([False, True])
    trainer.train_step(batch)
    model_input = seen[0]  # [2, T, 8, h, w]: noisy video ‖ conditioning
    assert model_input.shape[2] == 8
    assert torch.equal(model_input[0, 0, 4:], batch["image_latents"][0, 0])
    assert model_input[0, 0, 4:].abs().sum() > 0
    assert torch.count_nonzero(model_input[:, 1:, 4:]) == 0  # later frames: zeros
    assert torch.count_nonzero(model_input[1, :, 4:]) == 0  # a dropped image: zeros everywhere


def test_augmentation_and_dropout_are_keyed_on_the_slot(tmp_path):
    from cogvx_mega.diffusion.image_condition import image_drop_mask, noised_first_frames

    frames = torch.zeros(6, 3, 8, 8)
    whole = noised_first_frames(frames, range(6), seed=1, step=4, log_sigma_mean=-3.0, log_sigma_std=0.5)
    part = noised_first_frames(frames[3:], range(3, 6), seed=1, step=4, log_sigma_mean=-3.0, log_sigma_std=0.5)
    assert torch.equal(whole[3:], part)  # a rank holding slots 3..5 draws what one process draws for them
    assert not torch.equal(whole, noised_first_frames(frames, range(6), seed=1, step=5, log_sigma_mean=-3.0,
                                                      log_sigma_std=0.5))
    many = noised_first_frames(torch.zeros(2000, 1, 16, 16), range(2000), seed=0, step=0, log_sigma_mean=-3.0,
                               log_sigma_std=0.5)
    log_sigma = many.flatten(1).std(dim=1).log()  # each frame's noise level, from its 256 pixels
    assert abs(log_sigma.mean().item() - (-3.0)) < 0.05 and abs(log_sigma.std().item() - 0.5) < 0.05
    drops = image_drop_mask(range(4000), seed=0, step=0, dropout=0.05).float().mean().item()
    assert 0.04 < drops < 0.06


def test_a_tiny_i2v_model_learns(tmp_path):
    trainer = i2v_trainer(tmp_path, "tiny-i2v", "training.lr=3e-3", "training.warmup_steps=2", "training.steps=20")
    losses = [trainer.train_step(trainer.dataset.step_batch(step, trainer.slots, trainer.global_batch, 1234))["loss"]
              for step in range(20)]
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses


def test_data_without_first_frames_is_refused(tmp_path, capsys):
    from cogvx_mega.data.latent_dataset import LatentDataset

    config = load_config("tiny", overrides=["data.num_synthetic_clips=4"])
    folder = tmp_path / "latents"
    synthetic_dataset_for(config).save(str(folder))  # a latent folder: videos only
    code = main(["train", "--preset", "tiny-i2v", "--data", str(folder), "--run-dir", str(tmp_path / "run"),
                 "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no first frames" in err[0] and str(folder) in err[0], err
    assert not (tmp_path / "run").exists()
    assert LatentDataset.load(str(folder)).latents.shape[2] == 4
