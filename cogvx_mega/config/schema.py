"""The root config of a run: one typed section per concern (config/model.py, parallel.py, data.py, training.py),
validated once at start-up. Every user-facing error is a `ConfigError` that names the field, the bad value and
the fix (config/errors.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cogvx_mega.config.data import DataConfig
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.model import ModelConfig
from cogvx_mega.config.parallel import ParallelConfig
from cogvx_mega.config.training import DiffusionConfig, FinetuneConfig, SamplingConfig, TrainingConfig


@dataclass
class Config:
    """Everything a run needs. `preset` records where the defaults came from."""

    preset: str = "cogvideox-2b"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def sampling_resolution(self) -> tuple[int, int, int]:
        """(frames, height, width) in pixels of the samples a run writes."""
        data = self.data.stage_configs()[-1][2]
        s = self.sampling
        return (s.num_frames or data.num_frames, s.height or data.height, s.width or data.width)

    def validate(self) -> "Config":
        self.model.validate()
        self.parallel.validate(self.model)
        self.diffusion.validate()
        self.data.validate(self.model)
        self.training.validate()
        if self.training.valid_every and not self.data.valid:
            raise ConfigError("training.valid_every", self.training.valid_every, "validation needs data.valid (a "
                                                                             "cache, manifest, latent folder or "
                                                                             "'synthetic')")
        self.sampling.validate(self.model, self.training, self.data)
        self.finetune.validate()
        if self.model.is_image_to_video and self.data.packing:
            raise ConfigError("data.packing", True, "image-to-video training does not pack clips yet: use "
                                                    "data.packing=false")
        if self.data.packing and self.training.micro_batch_size != 1:
            raise ConfigError("training.micro_batch_size", self.training.micro_batch_size,
                              "with data.packing a micro-batch is one pack: use 1 (raise data.pack_tokens for more "
                              "tokens per micro-batch)")
        if self.model.fp8 is not None and self.training.device != "cuda":
            raise ConfigError("model.fp8", self.model.fp8, "FP8 needs a CUDA GPU (training.device=cuda); use "
                                                           "model.fp8=null on CPU")
        if self.model.backend == "te" and self.training.device != "cuda":
            raise ConfigError("model.backend", "te", "Transformer Engine runs on GPU only: use model.backend=local "
                                                     "with --device cpu")
        return self

    def check_world(self, data_parallel_size: int) -> int:
        """Checks that need the data-parallel size (clear errors before anything is built); returns the
        global batch."""
        global_batch = self.training.global_batch(data_parallel_size)
        if self.diffusion.timestep_sampling == "explicit_uniform" and global_batch > self.diffusion.num_train_timesteps:
            raise ConfigError("training.global_batch_size", global_batch,
                              f"explicit uniform sampling gives each sample of a step its own stratum of the "
                              f"{self.diffusion.num_train_timesteps} timesteps: use a global batch of at most "
                              f"{self.diffusion.num_train_timesteps}, or diffusion.timestep_sampling=uniform")
        return global_batch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
