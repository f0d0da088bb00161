"""The CogVideoX expert transformer layer for megatron-core's TransformerBlock.

Single-device math only: tensor/sequence/context parallelism come from the submodules chosen in
`layer_spec.py`, never from branches here.

How conditioning reaches the layer through `TransformerBlock.forward` (whose arguments are tensors,
so they also pass through megatron's activation recomputation):
- `context`: the conditioning embedding `emb` [b, time_embed_dim] (timestep, plus ofs for 1.5-I2V);
- `context_mask`: `condition_index` [s, b] int64: token (s, b) is modulated with row `index // 2`
  of `context` and with the text expert when `index % 2 == 1` (video otherwise). One row per sample
  (row = batch index) or, in a packed sequence, one row per clip. It is sliced exactly like the hidden
  states (sequence or context parallel), so any token order or packing stays correct.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import get_pg_rank, get_pg_size, make_viewless_tensor
from torch import Tensor, nn

from cogvx_mega.kernels.adaln.op import gated_add, gated_residual, modulate, modulated_layer_norm
from cogvx_mega.kernels.rope.op import apply_rope_3d

from cogvx_mega.parallel.context import CP_ATTENTION_KINDS, context_parallel_attention, sdpa
from cogvx_mega.parallel.varlen import check_packed_split, packed_attention

# Order of the 12 modulation chunks of one layer: the attention half, then the FFN half
# (the same order as diffusers' norm1.linear followed by norm2.linear).
MODULATION_NAMES = ("shift", "scale", "gate", "text_shift", "text_scale", "text_gate")


class LayerNorm(nn.LayerNorm):
    """Affine torch LayerNorm with megatron's constructor; marks its parameters for sequence parallel."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, elementwise_affine=True)
        for param in self.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))


class QKLayerNorm(LayerNorm):
    """LayerNorm over one head's channels, shared by all heads; eps from `config.qk_layernorm_epsilon`."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps=config.qk_layernorm_epsilon)
        for param in self.parameters():
            param.sequence_parallel = False  # applied per head after QKV, never on a sequence shard


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(time_embed_dim -> 12 * hidden): the 12 per-layer modulation vectors."""

    def __init__(self, config):
        super().__init__()
        self.linear = nn.Linear(config.time_embed_dim, 12 * config.hidden_size)
        for param in self.parameters():
            # Replicated over TP; under sequence parallel each TP rank modulates different tokens,
            # so its gradient must be summed over the TP group like a norm's.
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, emb: Tensor) -> Tensor:
        return self.linear(torch.nn.functional.silu(emb))  # [b, 12h]


class RotarySelfAttention(SelfAttention):
    """megatron's SelfAttention with the 3D RoPE applied by `cogvx_mega.kernels.rope` (`model.rope_impl`):
    q and k rotated together right after the QKV projection and QK-LayerNorm, by per-token angles
    [s_cp, 1, 1, d] covering this context-parallel rank's tokens (zeros on text and pad). Per-token angles
    work for packed sequences too, where megatron's own thd RoPE would restart every clip at position 0."""

    _rotary_table: Optional[Tensor] = None

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, rotary_pos_emb=None, **kwargs):
        # megatron calls get_query_key_value_tensors inside its forward; the table waits there for it
        self._rotary_table = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, rotary_pos_emb=None, **kwargs)
        finally:
            self._rotary_table = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                  split_qkv=split_qkv)
        if self._rotary_table is None:
            return out
        query, key, *rest = out  # [s, b, heads, d] each
        query, key = apply_rope_3d(query, key, self._rotary_table, self.config.rope_impl)
        return (query, key, *rest)


class SDPACoreAttention(MegatronModule):
    """Full (non-causal) attention with torch's scaled_dot_product_attention.

    Takes megatron's core-attention call: q/k/v [s, b, heads, head_dim] -> [s, b, heads*head_dim].
    Flash / memory-efficient kernels on GPU, math kernel on CPU. Under context parallel, `cp_comm_type`
    (passed down by the layer, as megatron's TransformerLayer does) picks how attention spans the CP group.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.no_mask,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.cp_group = pg_collection.cp if pg_collection is not None else None
        self.cp_comm_type = cp_comm_type
        self.context_parallel = get_pg_size(self.cp_group) > 1
        if self.context_parallel and cp_comm_type not in CP_ATTENTION_KINDS:
            raise ValueError(f"cp_comm_type={cp_comm_type!r}: the local backend's context parallel attention "
                             f"offers {', '.join(CP_ATTENTION_KINDS)}")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor] = None,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        if packed_seq_params is not None:  # thd: q/k/v [t, heads, d] of this CP rank's share of one pack
            check_packed_split(packed_seq_params, get_pg_size(self.cp_group))
            out = packed_attention(query, key, value, packed_seq_params, self.softmax_scale,
                                   self.config.packed_attention, self.cp_group, self.cp_comm_type)
            return out.reshape(query.shape[0], -1)  # [t, h]
        seq, batch, heads, head_dim = query.shape
        # attention_mask: None, or key_valid [s] (True on real keys, False on padding; rank-major under CP)
        if self.context_parallel:  # q/k/v hold this CP rank's tokens
            out = context_parallel_attention(query, key, value, self.cp_comm_type, self.softmax_scale,
                                             attention_mask, self.cp_group)
        else:
            out = sdpa(query, key, value, self.softmax_scale, attention_mask)
        return out.reshape(seq, batch, heads * head_dim)  # [s, b, h]


def cp_comm_type_of_layer(config, layer_number: int) -> Optional[str]:
    """The context-parallel attention kind of layer `layer_number` (1-based, global): megatron allows one
    kind for all layers or a list with one per layer. None without context parallel."""
    kind = config.cp_comm_type
    if config.context_parallel_size == 1 or kind is None:
        return None
    return kind[layer_number - 1] if isinstance(kind, list) else kind


@dataclass
class ExpertAdaLNLayerSubmodules:
    input_layernorm: Union[ModuleSpec, type] = None
    adaln_modulation: Union[ModuleSpec, type] = None
    self_attention: Union[ModuleSpec, type] = None
    pre_mlp_layernorm: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


class ExpertAdaLNLayer(MegatronModule):
    """One CogVideoX block (REFERENCE §2.5): expert adaptive LayerNorm around shared attention and FFN."""

    def __init__(self, config, submodules: ExpertAdaLNLayerSubmodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection=None, vp_stage: Optional[int] = None):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.pg_collection = pg_collection
        self.layer_number = layer_number + get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))
        self.input_layernorm = build_module(submodules.input_layernorm, config=config,
                                            hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.adaln_modulation = build_module(submodules.adaln_modulation, config=config)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=self.layer_number,
                                           cp_comm_type=cp_comm_type_of_layer(config, self.layer_number),
                                           pg_collection=pg_collection)
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, config=config,
                                              hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size,
                                tp_group=pg_collection.tp)

    def _modulated_residual_branch(self, hidden_states: Tensor, norm: nn.Module, branch, table: Tensor,
                                   condition: Tensor, **branch_kwargs) -> Tensor:
        """hidden + gate * branch(LN(hidden) * (1 + scale) + shift), each token with its own row of `table`
        [2 rows, 3, h] (shift, scale, gate), picked by `condition` [s, b]."""
        if self.config.adaln_impl == "triton":  # fused: no [s, b, h] modulation tensors (kernels/adaln)
            normed = modulated_layer_norm(hidden_states, norm.weight, norm.bias, norm.eps, table, condition)
            out, bias = branch(normed, **branch_kwargs)
            return gated_residual(hidden_states, out, bias, table, condition)
        out, bias = branch(modulate(norm(hidden_states), table, condition), **branch_kwargs)
        return gated_add(hidden_states, out, bias, table, condition)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                context: Optional[Tensor] = None, context_mask: Optional[Tensor] = None,
                rotary_pos_emb: Optional[Tensor] = None, packed_seq_params=None, **unused):
        # hidden_states [s, b, h]; context = emb [rows, E]; context_mask = condition_index [s, b] (module docstring);
        # attention_mask = None or key_valid [s] over all keys in rank-major order (False on sequence padding)
        if context is None or context_mask is None:
            raise ValueError("ExpertAdaLNLayer needs context=emb [rows, E] and context_mask=condition_index [s, b]")
        rows, hidden = context.shape[0], self.config.hidden_size
        # [rows, 12h] -> per (row, expert) the (shift, scale, gate) of both branches: [2 * rows, 2, 3, h]
        modulation = self.adaln_modulation(context).view(rows, 2, 2, 3, hidden).transpose(1, 2).reshape(
            2 * rows, 2, 3, hidden)
        hidden_states = self._modulated_residual_branch(
            hidden_states, self.input_layernorm, self.self_attention, modulation[:, 0], context_mask,
            attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params)
        hidden_states = self._modulated_residual_branch(
            hidden_states, self.pre_mlp_layernorm, self.mlp, modulation[:, 1], context_mask)
        output = make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)
        return output, context
