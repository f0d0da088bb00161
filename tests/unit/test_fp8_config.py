"""FP8 settings: each mistake is one ConfigError naming the field and the fix, before anything is built; a valid
FP8 config maps to megatron's FP8 fields; FP8 pads sequences so every rank's GEMMs get a multiple of 16 rows."""
from __future__ import annotations

import pytest

from cogvx_mega.config import ConfigError, load_config
from cogvx_mega.config.model import ModelConfig

TE_GPU = ["model.backend=te", "training.device=cuda"]


@pytest.mark.parametrize("overrides, field, fix", [
    (["model.fp8=hybrid"], "model.fp8", "model.backend=te"),
    (["model.fp8=hybrid", "model.backend=te"], "model.fp8", "training.device=cuda"),
    (["model.fp8=e5m2", *TE_GPU], "model.fp8", "e4m3, hybrid"),
    (["model.fp8=hybrid", "model.fp8_recipe=blockwise", *TE_GPU], "model.fp8_recipe", "delayed, current, mxfp8"),
    (["model.fp8=hybrid", "model.fp8_bf16_edge_layers=1", *TE_GPU], "model.fp8_bf16_edge_layers", "current"),
])
def test_fp8_mistakes_are_refused_with_the_fix(overrides, field, fix):
    with pytest.raises(ConfigError, match=field) as error:
        load_config("tiny", overrides=overrides)
    assert fix in str(error.value)


def test_fp8_maps_to_megatron_and_refuses_a_cpu_build():
    from cogvx_mega.config.megatron import fp8_settings

    model = ModelConfig(backend="te", fp8="hybrid", fp8_recipe="current", fp8_bf16_edge_layers=1,
                        positional_embedding="rope")
    settings = fp8_settings(model, "cuda")
    assert settings["fp8"] == "hybrid" and settings["fp8_recipe"] == "tensorwise"
    assert settings["first_last_layers_bf16"] and settings["num_layers_at_start_in_bf16"] == 1
    assert fp8_settings(ModelConfig(), "cuda") == {}
    with pytest.raises(ConfigError, match="built for cpu"):
        fp8_settings(model, "cpu")


@pytest.mark.parametrize("cp, tp, sp", [(1, 1, False), (2, 1, False), (2, 2, True), (1, 4, True)])
def test_fp8_split_unit_gives_every_rank_a_multiple_of_16_tokens(cp, tp, sp):
    from types import SimpleNamespace

    from cogvx_mega.parallel.context import sequence_split_unit

    layout = dict(context_parallel_size=cp, tensor_model_parallel_size=tp, sequence_parallel=sp)
    plain = sequence_split_unit(SimpleNamespace(**layout, fp8=None))
    unit = sequence_split_unit(SimpleNamespace(**layout, fp8="hybrid"))
    assert unit % plain == 0 and (unit // cp) % 16 == 0
