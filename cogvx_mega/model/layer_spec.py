"""Layer specs: the one module that knows the backends (local torch vs Transformer Engine): it chooses the
layer's modules and answers what a backend can do."""
from __future__ import annotations

from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from cogvx_mega.model.layer import (AdaLNModulation, ExpertAdaLNLayer, ExpertAdaLNLayerSubmodules, LayerNorm,
                                    QKLayerNorm, RotarySelfAttention, SDPACoreAttention)


def local_layer_spec() -> ModuleSpec:
    """Pure-torch layer (any device): megatron's tensor-parallel linears + SDPA core attention."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return _layer_spec(column_linear=ColumnParallelLinear, row_linear=RowParallelLinear,
                       core_attention=SDPACoreAttention, qk_norm=QKLayerNorm)


def te_layer_spec() -> ModuleSpec:
    """Transformer Engine layer (GPU; FP8 capable). Imported lazily: TE is an optional extra."""
    try:
        from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear, TEDotProductAttention,
                                                                  TERowParallelLinear)
    except ImportError as error:  # pragma: no cover - depends on the GPU extra
        raise RuntimeError("model.backend=te needs Transformer Engine: pip install -e .[gpu] on a CUDA machine") from error
    return _layer_spec(column_linear=TEColumnParallelLinear, row_linear=TERowParallelLinear,
                       core_attention=_checked_te_attention(TEDotProductAttention), qk_norm=QKLayerNorm)


_CHECKED_TE_ATTENTION = {}


def _checked_te_attention(base: type) -> type:
    """TE's attention behind the packed-split check: TE's thd context parallel silently truncates a clip whose
    span is not a multiple of 2 x CP, so such a pack is refused before it reaches TE."""
    if base not in _CHECKED_TE_ATTENTION:
        from cogvx_mega.parallel.varlen import check_packed_split

        class CheckedTEDotProductAttention(base):
            def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                        packed_seq_params=None, **kwargs):
                if packed_seq_params is not None:
                    check_packed_split(packed_seq_params, self.config.context_parallel_size)
                return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)

        _CHECKED_TE_ATTENTION[base] = CheckedTEDotProductAttention
    return _CHECKED_TE_ATTENTION[base]


def _layer_spec(column_linear, row_linear, core_attention, qk_norm) -> ModuleSpec:
    return ModuleSpec(
        module=ExpertAdaLNLayer,
        submodules=ExpertAdaLNLayerSubmodules(
            input_layernorm=LayerNorm,
            adaln_modulation=AdaLNModulation,
            self_attention=ModuleSpec(
                module=RotarySelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column_linear,
                    core_attention=core_attention,
                    linear_proj=row_linear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            pre_mlp_layernorm=LayerNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)),
        ),
    )


def layer_spec_for(backend: str) -> ModuleSpec:
    if backend == "local":
        return local_layer_spec()
    if backend == "te":
        return te_layer_spec()
    raise ValueError(f"model.backend={backend!r}: use 'local' or 'te'")


def masks_padded_keys(backend: str) -> bool:
    """Whether the backend's attention masks padded keys (sequences padded to split over CP / SP). The te
    spec builds TEDotProductAttention without a mask, so it needs sequences that split evenly."""
    return backend == "local"
