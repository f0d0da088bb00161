"""Parity with diffusers' CogVideoXTransformer3DModel (fp32, CPU) for every preset family, and exact round trips."""
from __future__ import annotations

import pytest
import torch

from families import FAMILIES, make_diffusers_model, pipeline_rope

import cogvx_mega
from cogvx_mega.checkpoint import transformer as convert

TOLERANCE = 1e-5


def random_inputs(config, frames: int, height: int, width: int, batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, config.in_channels, height, width, generator=generator)
    text = torch.randn(batch, config.max_text_seq_length, config.text_embed_dim, generator=generator)
    timesteps = torch.tensor([3, 999, 500, 250][:batch])
    extra = {"ofs": torch.full((batch,), 2.0)} if config.ofs_embed_dim else {}
    return latents, text, timesteps, extra


# (frames, height, width) per family: the sample size, and another size where the family allows one
# (fractional linspace RoPE positions / recomputed sin-cos tables / sliced 1.5 positions).
SIZES = {
    "sincos-2b": [(3, 8, 12), (2, 6, 8)],
    "rope-5b": [(3, 8, 12), (2, 10, 6)],
    "i2v-5b": [(3, 8, 12)],
    "v15-5b": [(4, 8, 12), (2, 6, 8)],
    "v15-i2v": [(4, 8, 12)],
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_models(request, tmp_path_factory):
    family = request.param
    reference = make_diffusers_model(family)
    folder = tmp_path_factory.mktemp(family)
    reference.save_pretrained(folder)
    return family, reference, folder, cogvx_mega.from_pretrained(str(folder))


def test_forward_matches_diffusers(family_models):
    family, reference, _, ours = family_models
    for frames, height, width in SIZES[family]:
        latents, text, timesteps, extra = random_inputs(reference.config, frames, height, width)
        rope = pipeline_rope(reference, frames, height, width)
        with torch.no_grad():
            expected = reference(latents, text, timesteps, image_rotary_emb=rope, return_dict=False, **extra)[0]
            actual = ours(latents, text, timesteps, **extra)
        assert actual.shape == expected.shape
        difference = (actual - expected).abs().max().item()
        assert difference <= TOLERANCE, f"{family} at {(frames, height, width)}: max |diff| {difference:.3e}"


def test_round_trip_reproduces_every_tensor(family_models):
    family, reference, folder, _ = family_models
    model_config, diffusers_state = convert.read_diffusers_folder(str(folder))
    back = convert.project_to_diffusers(convert.diffusers_to_project(diffusers_state, model_config), model_config)
    assert set(back) == set(diffusers_state)
    for key, tensor in diffusers_state.items():
        assert torch.equal(back[key], tensor), key
    assert convert.diffusers_config_from_model(model_config)["use_rotary_positional_embeddings"] == \
        reference.config.use_rotary_positional_embeddings


def test_cli_round_trip_through_project_checkpoint(family_models, tmp_path):
    """diffusers folder -> `cogvx convert` -> project checkpoint -> `cogvx convert` -> diffusers folder: bit-exact."""
    from safetensors.torch import load_file

    from cogvx_mega.cli import main

    family, reference, folder, _ = family_models
    assert main(["convert", "diffusers-to-project", str(folder), str(tmp_path / "project")]) == 0
    assert main(["convert", "project-to-diffusers", str(tmp_path / "project"), str(tmp_path / "back")]) == 0
    original = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    returned = load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
    assert set(original) == set(returned)
    assert all(torch.equal(original[k], returned[k]) for k in original)
    from diffusers import CogVideoXTransformer3DModel

    reloaded = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "back"))
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    assert public(reloaded.config) == public(reference.config)


def sat_state_from_diffusers(reference) -> dict:
    """A SAT-layout state dict written from diffusers weights with REFERENCE §4's names (independent of tools/)."""
    state, cfg, p = reference.state_dict(), reference.config, "model.diffusion_model."
    out = {}
    names = {"patch_embed.proj": "mixins.patch_embed.proj", "patch_embed.text_proj": "mixins.patch_embed.text_proj",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "ofs_embedding.linear_1": "ofs_embed.0", "ofs_embedding.linear_2": "ofs_embed.2",
             "norm_final": "transformer.final_layernorm", "norm_out.norm": "mixins.final_layer.norm_final",
             "norm_out.linear": "mixins.final_layer.adaLN_modulation.1", "proj_out": "mixins.final_layer.linear"}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in names:
            out[f"{p}{names[module]}.{leaf}"] = value
    if cfg.use_learned_positional_embeddings:
        out[p + "mixins.pos_embed.pos_embedding"] = state["patch_embed.pos_embedding"]
    for i in range(cfg.num_layers):
        b, s = f"transformer_blocks.{i}.", f"{p}transformer.layers.{i}."
        for leaf in ("weight", "bias"):
            out[f"{s}attention.query_key_value.{leaf}"] = torch.cat([state[f"{b}attn1.to_{n}.{leaf}"] for n in "qkv"])
            out[f"{s}attention.dense.{leaf}"] = state[f"{b}attn1.to_out.0.{leaf}"]
            out[f"{s}input_layernorm.{leaf}"] = state[f"{b}norm1.norm.{leaf}"]
            out[f"{s}post_attention_layernorm.{leaf}"] = state[f"{b}norm2.norm.{leaf}"]
            out[f"{s}mlp.dense_h_to_4h.{leaf}"] = state[f"{b}ff.net.0.proj.{leaf}"]
            out[f"{s}mlp.dense_4h_to_h.{leaf}"] = state[f"{b}ff.net.2.{leaf}"]
            out[f"{p}mixins.adaln_layer.query_layernorm_list.{i}.{leaf}"] = state[f"{b}attn1.norm_q.{leaf}"]
            out[f"{p}mixins.adaln_layer.key_layernorm_list.{i}.{leaf}"] = state[f"{b}attn1.norm_k.{leaf}"]
            norm1 = state[f"{b}norm1.linear.{leaf}"].chunk(6)
            norm2 = state[f"{b}norm2.linear.{leaf}"].chunk(6)
            sat_order = [norm1[0], norm1[1], norm1[2], norm2[0], norm2[1], norm2[2],
                         norm1[3], norm1[4], norm1[5], norm2[3], norm2[4], norm2[5]]
            out[f"{p}mixins.adaln_layer.adaLN_modulations.{i}.1.{leaf}"] = torch.cat(sat_order)
    out["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)  # VAE tensors in the file are ignored
    return out


def test_sat_checkpoint_converts_to_the_same_model(family_models, tmp_path):
    family, reference, _, ours = family_models
    model_config = convert.model_config_from_diffusers(dict(reference.config))
    state = convert.sat_to_project(sat_state_from_diffusers(reference), model_config)
    expected = convert.diffusers_to_project(reference.state_dict(), model_config)
    assert set(state) == set(expected)
    for key in expected:
        assert torch.equal(state[key], expected[key]), key



def test_expected_shapes_describe_the_built_model(family_models):
    """The converter's analytic shape table (used without building a model) equals the real model's tensors."""
    family, reference, _, ours = family_models
    model_config = convert.model_config_from_diffusers(dict(reference.config))
    built = {k: v.shape for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    assert convert.expected_shapes(model_config) == built


def test_sat_final_norm_eps_gives_sat_numbers(family_models):
    """SAT's own numbers: its final adaptive LayerNorm uses eps 1e-6 where its block LayerNorms use 1e-5, as
    diffusers' model does with `norm_out.norm.eps` set to 1e-6 by hand. `output_norm_eps=1e-6` gives them, and
    moves the output as much as it moves diffusers' (compared as the change each model makes, in float64, so that
    rounding stays far below the eps's effect of ~1e-5)."""
    import copy

    family, reference, folder, _ = family_models
    sat = copy.deepcopy(reference).double()
    sat.norm_out.norm.eps = 1e-6
    sat_numbers = cogvx_mega.from_pretrained(str(folder), dtype=torch.float64, output_norm_eps=1e-6)
    default = cogvx_mega.from_pretrained(str(folder), dtype=torch.float64)
    assert sat_numbers.output_norm.eps == 1e-6 and default.output_norm.eps == 1e-5
    frames, height, width = SIZES[family][0]
    latents, text, timesteps, extra = (v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                       for v in random_inputs(reference.config, frames, height, width))
    extra = {k: v.double() for k, v in extra.items()}
    rope = pipeline_rope(reference, frames, height, width)
    rope = tuple(r.double() for r in rope) if rope is not None else None
    reference = copy.deepcopy(reference).double()
    with torch.no_grad():
        expected_change = (sat(latents, text, timesteps, image_rotary_emb=rope, return_dict=False, **extra)[0]
                           - reference(latents, text, timesteps, image_rotary_emb=rope, return_dict=False, **extra)[0])
        change = sat_numbers(latents, text, timesteps, **extra) - default(latents, text, timesteps, **extra)
    assert expected_change.abs().max().item() > 1e-6
    assert (change - expected_change).abs().max().item() <= 1e-3 * expected_change.abs().max().item()
