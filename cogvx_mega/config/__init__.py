"""Typed configs, presets and loading. Importing this package has no side effects."""
from cogvx_mega.config.loading import load_config, write_resolved_config
from cogvx_mega.config.presets import PRESETS, get_preset
from cogvx_mega.config.schema import (Config, ConfigError, DataConfig, DiffusionConfig, ModelConfig, ParallelConfig,
                                      TrainingConfig)

__all__ = ["Config", "ConfigError", "DataConfig", "DiffusionConfig", "ModelConfig", "ParallelConfig",
           "TrainingConfig", "PRESETS", "get_preset", "load_config", "write_resolved_config"]
