"""The parallel section: the model-parallel layout (TP, PP, VPP, CP, sequence parallel) and data-parallel settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from cogvx_mega.config.errors import ConfigError, check_choices, require_positive_integers
from cogvx_mega.config.model import ModelConfig

ContextParallelAttention = Literal["a2a", "all_gather", "p2p", "a2a+p2p"]  # the backend decides which apply


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallel is whatever remains of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    context_parallel_attention: ContextParallelAttention = "a2a"
    """How attention spans the CP group: 'a2a' (Ulysses all-to-all over heads) or 'all_gather' (K/V gathered;
    any head count) on the local backend; 'p2p', 'all_gather', 'a2a' or 'a2a+p2p' with Transformer Engine."""
    hierarchical_context_parallel_sizes: Optional[list[int]] = None
    """For 'a2a+p2p': [a2a size, p2p size] with a product equal to context_parallel_size (e.g. [8, 2]: a2a
    inside a node, p2p between nodes)."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    """Shard the optimizer state (and fp32 master weights) over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: overlap the parameter all-gather with the next forward pass."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per gradient-reduction bucket with overlap_grad_reduce (megatron's --ddp-bucket-size;
    None: megatron's default, max(40M, 1M x DP))."""
    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Uneven pipeline split: layers on the first stage (the rest are spread evenly)."""
    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Uneven pipeline split: layers on the last stage."""

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def validate(self, model: ModelConfig) -> None:
        check_choices(self, "parallel")
        require_positive_integers(self, "parallel", ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                                     "context_parallel_size"))
        tp = self.tensor_model_parallel_size
        if model.num_attention_heads % tp:
            raise ConfigError("parallel.tensor_model_parallel_size", tp,
                              f"model.num_attention_heads={model.num_attention_heads} is not divisible by it; "
                              f"choose a divisor of the head count")
        cp = self.context_parallel_size
        kinds = ("a2a", "all_gather") if model.backend == "local" else ("p2p", "all_gather", "a2a", "a2a+p2p")
        if self.context_parallel_attention not in kinds:
            raise ConfigError("parallel.context_parallel_attention", self.context_parallel_attention,
                              f"the {model.backend} backend offers {', '.join(kinds)}")
        if cp > 1 and self.context_parallel_attention == "a2a" and (model.num_attention_heads // tp) % cp:
            raise ConfigError("parallel.context_parallel_size", cp,
                              f"Ulysses (a2a) splits the {model.num_attention_heads // tp} heads of each TP rank over "
                              f"CP: use a CP size dividing them, or parallel.context_parallel_attention=all_gather")
        hierarchy = self.hierarchical_context_parallel_sizes
        if cp > 1 and self.context_parallel_attention == "a2a+p2p":
            if (not isinstance(hierarchy, list) or len(hierarchy) != 2
                    or not all(isinstance(n, int) and n > 0 for n in hierarchy) or hierarchy[0] * hierarchy[1] != cp):
                raise ConfigError("parallel.hierarchical_context_parallel_sizes", hierarchy,
                                  f"a2a+p2p needs [a2a size, p2p size] with product context_parallel_size={cp}, "
                                  f"e.g. [{cp // 2 if cp % 2 == 0 else 1}, {2 if cp % 2 == 0 else cp}]")
            if (model.num_attention_heads // tp) % hierarchy[0]:
                raise ConfigError("parallel.hierarchical_context_parallel_sizes", hierarchy,
                                  f"the a2a level splits the {model.num_attention_heads // tp} heads of each TP rank: "
                                  f"its size {hierarchy[0]} must divide them")
        elif hierarchy is not None:
            raise ConfigError("parallel.hierarchical_context_parallel_sizes", hierarchy,
                              "only parallel.context_parallel_attention=a2a+p2p with CP > 1 uses it; remove it")
        if self.sequence_parallel and tp == 1:
            raise ConfigError("parallel.sequence_parallel", True, "sequence parallel needs tensor_model_parallel_size > 1")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if vpp < 1 or self.pipeline_model_parallel_size == 1:
                raise ConfigError("parallel.virtual_pipeline_model_parallel_size", vpp,
                                  "virtual stages need pipeline_model_parallel_size > 1 and a positive count")
        if self.ddp_bucket_size is not None and (self.ddp_bucket_size < 1 or not self.overlap_grad_reduce):
            raise ConfigError("parallel.ddp_bucket_size", self.ddp_bucket_size,
                              "buckets exist only with parallel.overlap_grad_reduce=true; use a positive size")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather", True, "needs parallel.use_distributed_optimizer=true")
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if first is not None or last is not None:
            pp = self.pipeline_model_parallel_size
            middle_stages = pp - (first is not None) - (last is not None)
            rest = model.num_layers - (first or 0) - (last or 0)
            if pp == 1 or rest < 0 or (middle_stages and rest % (middle_stages * (vpp or 1))) or \
                    (not middle_stages and rest):
                raise ConfigError("parallel.num_layers_in_first_pipeline_stage", first,
                                  f"with last={last}, the {model.num_layers} layers do not split over {pp} stages "
                                  f"(the middle stages share the rest evenly)")
            return
        stages = self.pipeline_model_parallel_size * (vpp or 1)
        if model.num_layers % stages:
            raise ConfigError("parallel.pipeline_model_parallel_size", self.pipeline_model_parallel_size,
                              f"model.num_layers={model.num_layers} does not split into {stages} pipeline stages")

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size for a world size; a clear error if the layout does not factor it."""
        mp = self.model_parallel_size
        if world_size % mp:
            raise ConfigError(
                "parallel", f"TP{self.tensor_model_parallel_size}xPP{self.pipeline_model_parallel_size}"
                f"xCP{self.context_parallel_size}",
                f"world size {world_size} is not divisible by TPxPPxCP={mp}; launch a multiple of {mp} processes")
        return world_size // mp
