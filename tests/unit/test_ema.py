"""The weight average (`training.ema_decay`, issue 30): after N steps it equals an EMA computed by hand from the
weights saved at every step (1e-6), it is saved beside the model as `ema.*` tensors, a resume continues it
exactly, and a run that adds it to a checkpoint without one starts it at the loaded weights."""
from __future__ import annotations

import pytest
import torch

from cogvx_mega.cli import main
from cogvx_mega.checkpoint.meta import read_checkpoint_meta
from cogvx_mega.checkpoint.sharded import read_sharded_model_state

DECAY, START = 0.8, 2
BASE = ["train", "--preset", "tiny", "--data", "synthetic", "--device", "cpu", "data.num_synthetic_clips=4",
        "training.save_interval=1", "training.keep_checkpoints=10", f"training.ema_decay={DECAY}",
        f"training.ema_start_step={START}", "training.lr=0.01", "training.warmup_steps=0"]


def saved(run, step, ema=False):
    folder = run / "checkpoints" / f"step_{step:08d}"
    return read_sharded_model_state(folder, read_checkpoint_meta(folder), ema=ema)[1]


def hand_ema(run, steps: int) -> dict[str, torch.Tensor]:
    average = None
    for step in range(1, steps + 1):
        weights = saved(run, step)
        if step <= START or average is None:
            average = {k: v.double().clone() for k, v in weights.items()}
        else:
            average = {k: DECAY * average[k] + (1 - DECAY) * weights[k].double() for k in weights}
    return average


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ema") / "run"
    assert main([*BASE, "--run-dir", str(run), "--steps", "5"]) == 0
    return run


def test_the_average_equals_a_hand_computed_ema_of_the_saved_weights(run):
    expected = hand_ema(run, 5)
    found = saved(run, 5, ema=True)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(found[key].double(), value, atol=1e-6, rtol=0, msg=key)
    # it is an average, not the weights: the last step moved the weights away from it
    weights = saved(run, 5)
    assert max((found[k] - weights[k]).abs().max().item() for k in weights) > 1e-4
    assert read_checkpoint_meta(run / "checkpoints" / "step_00000005")["ema"] == {"decay": DECAY, "start_step": START}


def test_a_resume_continues_the_average_exactly(run, tmp_path):
    import shutil

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    assert main([*BASE, "--run-dir", str(resumed), "--steps", "5", "--resume", "auto"]) == 0
    for ema in (False, True):
        expected, found = saved(run, 5, ema), saved(resumed, 5, ema)
        for key in expected:
            assert torch.equal(found[key], expected[key]), (ema, key)


def test_a_checkpoint_without_an_average_starts_one_at_its_weights(tmp_path):
    plain = tmp_path / "plain"
    assert main(["train", "--preset", "tiny", "--data", "synthetic", "--device", "cpu", "data.num_synthetic_clips=4",
                 "--run-dir", str(plain), "--steps", "2"]) == 0
    assert "ema" not in read_checkpoint_meta(plain / "checkpoints" / "step_00000002")
    assert main([*BASE, "--run-dir", str(plain), "--steps", "3", "--resume", "auto",
                 "training.ema_start_step=0"]) == 0
    start, weights, average = saved(plain, 2), saved(plain, 3), saved(plain, 3, ema=True)
    for key in weights:
        torch.testing.assert_close(average[key].double(), DECAY * start[key].double()
                                   + (1 - DECAY) * weights[key].double(), atol=1e-6, rtol=0)


def test_export_and_from_pretrained_take_the_average_or_the_weights(run, tmp_path, capsys):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from text_encoder import make_tiny_t5

    import cogvx_mega
    from cogvx_mega.checkpoint.transformer import project_to_diffusers
    from cogvx_mega.config import load_config

    model_config = load_config("tiny").model
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=model_config.out_channels).save_pretrained(tmp_path / "vae")
    make_tiny_t5(tmp_path / "t5", d_model=model_config.text_embed_dim)
    step = run / "checkpoints" / "step_00000005"
    for choice in ("ema", "model", None):
        weights = ["--weights", choice] if choice else []
        assert main(["export", "diffusers", "--ckpt", str(step), "--vae", str(tmp_path / "vae"), "--text-encoder",
                     str(tmp_path / "t5"), "--out", str(tmp_path / str(choice)), *weights]) == 0
    exported = {choice: CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / choice), subfolder="transformer")
                .state_dict() for choice in ("ema", "model", "None")}
    expected = {"ema": project_to_diffusers(saved(run, 5, ema=True), model_config),
                "model": project_to_diffusers(saved(run, 5), model_config)}
    for choice in ("ema", "model"):
        for name, tensor in expected[choice].items():
            assert torch.equal(exported[choice][name], tensor), (choice, name)
    assert any(not torch.equal(exported["ema"][k], exported["model"][k]) for k in exported["ema"])
    assert all(torch.equal(exported["None"][k], exported["ema"][k]) for k in exported["ema"])  # the default
    assert "moving average of the weights" in (tmp_path / "ema" / "README.md").read_text()
    assert "not their moving average" in (tmp_path / "model" / "README.md").read_text()
    # from_pretrained: the same choice, the same default
    average = cogvx_mega.from_pretrained(str(step)).state_dict()
    weights = cogvx_mega.from_pretrained(str(step), weights="model").state_dict()
    for key, value in saved(run, 5, ema=True).items():
        assert torch.equal(average[key], value) and torch.equal(weights[key], saved(run, 5)[key]), key


def test_weights_ema_from_a_checkpoint_without_one_is_refused(tmp_path):
    plain = tmp_path / "plain"
    assert main(["train", "--preset", "tiny", "--data", "synthetic", "--device", "cpu", "data.num_synthetic_clips=4",
                 "--run-dir", str(plain), "--steps", "1"]) == 0
    import cogvx_mega
    from cogvx_mega.config.errors import ConfigError

    with pytest.raises(ConfigError, match="holds no weight average"):
        cogvx_mega.from_pretrained(str(plain / "checkpoints" / "step_00000001"), weights="ema")
    model = cogvx_mega.from_pretrained(str(plain / "checkpoints" / "step_00000001"))  # the default: its weights
    for key, value in saved(plain, 1).items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_lora_run_averages_its_adapters_only(tmp_path):
    """The checkpoint holds `ema.` tensors for the adapters and nothing else, equal to a hand EMA of the saved
    adapters; reading the average gives the base with the averaged adapters merged."""
    from pathlib import Path

    from families import make_tiny_preset_diffusers_model

    from cogvx_mega.checkpoint.lora import read_lora_adapters
    from cogvx_mega.checkpoint.reader import read_transformer_checkpoint
    from cogvx_mega.checkpoint.sharded import EMA_PREFIX
    from torch.distributed.checkpoint import FileSystemReader

    examples = Path(__file__).resolve().parents[2] / "examples" / "configs"
    make_tiny_preset_diffusers_model().save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    assert main(["train", "--config", str(examples / "tiny-lora.yaml"), "--init-from", str(tmp_path / "base"),
                 "--run-dir", str(run), "--steps", "3", "training.ema_decay=0.5", "training.ema_start_step=1",
                 "training.save_interval=1",
                 "training.keep_checkpoints=5", "training.lr=0.05"]) == 0
    last = run / "checkpoints" / "step_00000003"
    stored = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    averaged = {k[len(EMA_PREFIX):] for k in stored if k.startswith(EMA_PREFIX)}
    assert averaged and all(".lora_A" in k or ".lora_B" in k for k in averaged)
    metas = [read_checkpoint_meta(run / "checkpoints" / f"step_{s:08d}") for s in (1, 2, 3)]
    adapters = [read_lora_adapters(run / "checkpoints" / f"step_{s:08d}", m) for s, m in zip((1, 2, 3), metas)]
    found = read_lora_adapters(last, metas[-1], ema=True)
    for key in found:
        for factor in (0, 1):
            expected = adapters[0][key][factor]
            for step_adapters in adapters[1:]:
                expected = 0.5 * expected + 0.5 * step_adapters[key][factor]
            torch.testing.assert_close(found[key][factor], expected, atol=1e-6, rtol=0)
    merged_average = read_transformer_checkpoint(last, weights_choice="ema")[1]
    merged_weights = read_transformer_checkpoint(last, weights_choice="model")[1]
    assert any(not torch.equal(merged_average[k], merged_weights[k]) for k in merged_weights)


def test_loading_at_a_layout_takes_the_average_on_request(run):
    """What `cogvx sample` under torchrun does (`load_pretrained_weights` into this rank's chunks): the average
    with 'ema' or by default, the weights with 'model'."""
    from cogvx_mega.config import load_config
    from cogvx_mega.model.init import global_parameter_name
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.pretrained import load_pretrained_weights

    config = load_config("tiny", overrides=["training.device=cpu"])
    initialize_parallel(config.parallel, device="cpu")
    step = run / "checkpoints" / "step_00000005"
    for choice, expected in (("ema", saved(run, 5, ema=True)), (None, saved(run, 5, ema=True)),
                             ("model", saved(run, 5))):
        [chunk] = build_model_chunks(config.model, config.parallel, device="cpu")
        load_pretrained_weights([chunk], str(step), config.model, weights_choice=choice)
        for name, param in chunk.named_parameters():
            key = global_parameter_name(chunk, name)
            assert torch.equal(param.detach(), expected[key]), (choice, key)
