"""Typed configs (one dataclass per concern: model, parallel, data, training; `Config` composes them), presets and
loading. Importing this package has no side effects."""
from cogvx_mega.config.data import DataConfig
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.loading import load_config, write_resolved_config
from cogvx_mega.config.model import ModelConfig
from cogvx_mega.config.parallel import ParallelConfig
from cogvx_mega.config.presets import PRESETS, get_preset
from cogvx_mega.config.schema import Config
from cogvx_mega.config.training import DiffusionConfig, FinetuneConfig, SamplingConfig, TrainingConfig

__all__ = ["Config", "ConfigError", "DataConfig", "DiffusionConfig", "FinetuneConfig", "ModelConfig",
           "ParallelConfig", "SamplingConfig", "TrainingConfig", "PRESETS", "get_preset", "load_config",
           "write_resolved_config"]
