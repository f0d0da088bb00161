"""CogVideoX expert transformer: embed -> megatron TransformerBlock -> modulated head -> unpatchify.

Single-device math. The model holds no collective of its own: sequence/context parallelism enter through
the split/gather glue of `cogvx_mega.parallel` (identities on one process) and the layer spec, with the
process groups the model was built with (`pg_collection`). Video tensors are [B, T, C, H, W] at the edges
and megatron's [s, b, h] inside the block stack; patchify/unpatchify are the only conversions.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import (TransformerBlock, TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.utils import get_pg_rank
from torch import Tensor, nn

from cogvx_mega.config.model import ModelConfig
from cogvx_mega.parallel.context import (gather_sequence, padded_sequence_length, rank_major_positions,
                                         sequence_split_unit, split_sequence)
from cogvx_mega.parallel.pipeline import REPLICATED_MODULES
from cogvx_mega.parallel.sequence import gather_tokens, local_tokens, mark_sequence_parallel, scatter_tokens
from cogvx_mega.model.layer import LayerNorm
from cogvx_mega.model.layer_spec import layer_spec_for, masks_padded_keys
from cogvx_mega.model.packing import ClipShape, PackLayout, plan_pack_layout, video_tokens
from cogvx_mega.model.positions import rope_3d_angles, sincos_3d, timestep_sinusoid


class TableCache:
    """Position tables (constants of a shape) built once per (shape, device) and kept, so a forward does not
    rebuild them on the CPU and copy them over every step. A few shapes per run (buckets, stages), bounded."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.tables: dict = {}

    def get(self, key, build):
        if key not in self.tables:
            if len(self.tables) >= self.limit:
                self.tables.pop(next(iter(self.tables)))
            self.tables[key] = build()
        return self.tables[key]


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on a sinusoidal embedding."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(torch.nn.functional.silu(self.linear_1(x)))


def patchify(latents: Tensor, patch_size: int, patch_size_t: int) -> Tensor:
    """[B, T, C, H, W] -> [B, (T/pt)(H/p)(W/p), C*pt*p*p], tokens (t, h, w) w fastest, features (c, pt, ph, pw)."""
    b, t, c, h, w = latents.shape
    p, pt = patch_size, patch_size_t
    x = latents.permute(0, 1, 3, 4, 2).reshape(b, t // pt, pt, h // p, p, w // p, p, c)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(4, 7).flatten(1, 3)


def unpatchify(tokens: Tensor, frames: int, height: int, width: int, patch_size: int,
               patch_size_t: Optional[int]) -> Tensor:
    """[B, N, C*pt*p*p] (features (c, pt, ph, pw)) -> [B, T, C, H, W]."""
    b = tokens.shape[0]
    p = patch_size
    if patch_size_t is None:
        x = tokens.reshape(b, frames, height // p, width // p, -1, p, p)
        return x.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
    pt = patch_size_t
    x = tokens.reshape(b, frames // pt, height // p, width // p, -1, pt, p, p)
    return x.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)


class PatchEmbedding(nn.Module):
    """Text projection, video patch projection and absolute positions (2B sin-cos, 5B-I2V learned)."""

    def __init__(self, model: ModelConfig):
        super().__init__()
        self.model = model
        hidden = model.hidden_size
        if model.patch_size_t is None:
            self.proj = nn.Conv2d(model.in_channels, hidden, kernel_size=model.patch_size, stride=model.patch_size,
                                  bias=model.patch_bias)
        else:
            self.proj = nn.Linear(model.in_channels * model.patch_size**2 * model.patch_size_t, hidden)
        self.text_proj = nn.Linear(model.text_embed_dim, hidden)
        self._table_cache = TableCache()
        if model.positional_embedding == "rope+learned":
            # Learned table over [text ; video] at the sample resolution, initialised with sin-cos.
            self.pos_embedding = nn.Parameter(self._sincos_table(model.sample_frames, model.sample_height,
                                                                 model.sample_width).float())

    def _sincos_table(self, pixel_frames: int, latent_height: int, latent_width: int) -> Tensor:
        m = self.model
        frames = (pixel_frames - 1) // m.temporal_compression_ratio + 1
        video = sincos_3d(m.hidden_size, frames, latent_height // m.patch_size, latent_width // m.patch_size,
                          m.spatial_interpolation_scale, m.temporal_interpolation_scale)
        return torch.cat([video.new_zeros(m.max_text_seq_length, m.hidden_size), video])[None]  # [1, L+N, h]

    def forward(self, text_embeds: Tensor, latents: Tensor) -> Tensor:
        m = self.model
        b, t, c, h, w = latents.shape
        text = self.text_proj(text_embeds)  # [b, L, h]
        if m.patch_size_t is None:
            video = self.proj(latents.reshape(b * t, c, h, w))  # [b*t, h, H/p, W/p]
            video = video.view(b, t, *video.shape[1:]).flatten(3).transpose(2, 3).flatten(1, 2)  # [b, N, h]
        else:
            video = self.proj(patchify(latents, m.patch_size, m.patch_size_t))  # [b, N, h]
        tokens = torch.cat([text, video], dim=1).contiguous()  # [b, L+N, h]
        if m.positional_embedding in ("sincos", "rope+learned"):
            if text.shape[1] != m.max_text_seq_length:
                raise ValueError(f"text_embeds has {text.shape[1]} tokens; absolute positions need exactly "
                                 f"model.max_text_seq_length={m.max_text_seq_length} (pad or truncate the text)")
            pixel_frames = (t - 1) * m.temporal_compression_ratio + 1
            at_sample_size = (h, w, pixel_frames) == (m.sample_height, m.sample_width, m.sample_frames)
            if m.positional_embedding == "rope+learned" and at_sample_size:
                positions = self.pos_embedding
            else:
                # diffusers falls back to sin-cos for a learned table at another frame count; kept for parity.
                positions = self._table_cache.get(("sincos", pixel_frames, h, w, tokens.device), lambda: self._sincos_table(
                    pixel_frames, h, w).to(tokens.device))
            tokens = tokens + positions.to(dtype=tokens.dtype)
        return tokens


class CogVideoXTransformer(MegatronModule):
    """`model(latents [B,T,C,H,W], text_embeds [B,L,D_text], timesteps [B], ofs=None) -> v_pred [B,T,C_out,H,W]`.

    Matches diffusers' CogVideoXTransformer3DModel argument for argument and computes its own
    positions exactly as the diffusers CogVideoX pipelines do for the same config.
    """

    def __init__(self, model: ModelConfig, transformer_config, pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None, pg_collection=None):
        """`pg_collection`: the process groups the model runs on (`parallel.state.model_parallel_groups()` for
        a training layout, `single_process_groups()` for a whole model in one process)."""
        super().__init__(config=transformer_config)
        if pg_collection is None:
            from cogvx_mega.parallel.state import model_parallel_groups

            pg_collection = model_parallel_groups()
        self.pg_collection = pg_collection
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads: nothing is tied
        self.model_config = model
        self._table_cache = TableCache()  # RoPE angles per shape and device
        self.vp_stage = vp_stage
        self.pre_process = pre_process
        self.post_process = post_process
        hidden = model.hidden_size
        # The conditioning embedding is needed by every stage's layers (replicated under PP).
        self.time_embedding = TimestepEmbedding(hidden, model.time_embed_dim)
        self.ofs_embedding = (TimestepEmbedding(model.ofs_embed_dim, model.ofs_embed_dim)
                              if model.ofs_embed_dim else None)
        if pre_process:
            self.patch_embed = PatchEmbedding(model)
        spec = layer_spec_for(model.backend)
        layers_here = get_num_layers_to_build(transformer_config, vp_stage=vp_stage,
                                              pp_rank=get_pg_rank(pg_collection.pp))  # this pipeline chunk's share
        self.decoder = TransformerBlock(
            config=transformer_config,
            spec=TransformerBlockSubmodules(layer_specs=[spec] * layers_here, layer_norm=LayerNorm),
            post_layer_norm=post_process,
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        if post_process:
            self.output_norm_linear = nn.Linear(model.time_embed_dim, 2 * hidden)
            self.output_norm = nn.LayerNorm(hidden, eps=model.final_norm_eps, elementwise_affine=True)
            patch_volume = model.patch_size**2 * (model.patch_size_t or 1)
            self.output_proj = nn.Linear(hidden, patch_volume * model.out_channels)
        # Under sequence parallel the conditioning and the head act on each rank's token shard, so
        # their gradients are partial sums over the TP group (reduced by finalize_model_grads).
        for name in ("time_embedding", "ofs_embedding", "output_norm_linear", "output_norm", "output_proj"):
            if getattr(self, name, None) is not None:
                mark_sequence_parallel(getattr(self, name), transformer_config)

    @property
    def cp_group(self):
        """The context-parallel group (None for a single-process model)."""
        return self.pg_collection.cp

    @property
    def tp_group(self):
        return self.pg_collection.tp

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron's sharded state; the conditioning copies past the first pipeline chunk are non-main replicas."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if get_pg_rank(self.pg_collection.pp) != 0 or (self.vp_stage or 0) != 0:
            replicated = tuple(f"{prefix}{name}." for name in REPLICATED_MODULES)
            for key, tensor in state.items():
                if key.startswith(replicated):
                    tensor.replica_id = (1, *tensor.replica_id[1:])
        return state

    # --- pipeline-parallel hook (megatron schedules call it on every stage) ---
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def conditioning(self, timesteps: Tensor, ofs: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
        """emb [b, time_embed_dim] from integer timesteps (and ofs for 1.5-I2V), in `dtype` (default: the
        embedding's own weights' dtype, which every pipeline stage knows, whatever its inputs are)."""
        dtype = dtype or self.time_embedding.linear_1.weight.dtype
        emb = self.time_embedding(timestep_sinusoid(timesteps, self.model_config.hidden_size).to(dtype))
        if self.ofs_embedding is not None:
            if ofs is None:
                raise ValueError("this model has an ofs embedding (CogVideoX1.5-I2V): pass ofs (2.0 at inference)")
            ofs = torch.as_tensor(ofs, device=timesteps.device).reshape(-1).expand(timesteps.shape[0])
            emb = emb + self.ofs_embedding(timestep_sinusoid(ofs, self.model_config.ofs_embed_dim).to(dtype))
        return emb

    def rotary_table(self, latent_frames: int, latent_height: int, latent_width: int, text_length: int,
                     device: torch.device) -> Optional[Tensor]:
        """RoPE angles [s, 1, 1, head_dim] for [text ; video]; zero angles (identity) on text rows. Built once
        per shape and device."""
        if not self.model_config.uses_rope:
            return None
        key = ("rope", latent_frames, latent_height, latent_width, text_length, torch.device(device))
        return self._table_cache.get(key, lambda: self._build_rotary_table(latent_frames, latent_height,
                                                                           latent_width, text_length, device))

    def _build_rotary_table(self, latent_frames: int, latent_height: int, latent_width: int, text_length: int,
                            device) -> Tensor:
        m = self.model_config
        p = m.patch_size
        grid_h, grid_w = latent_height // p, latent_width // p
        base_h, base_w = m.sample_height // p, m.sample_width // p
        if m.patch_size_t is None:
            video = rope_3d_angles(m.attention_head_dim, latent_frames, grid_h, grid_w, base_height=base_h,
                                   base_width=base_w, grid="linspace")
        else:
            frames = (latent_frames + m.patch_size_t - 1) // m.patch_size_t
            video = rope_3d_angles(m.attention_head_dim, frames, grid_h, grid_w, base_height=base_h,
                                   base_width=base_w, grid="slice")
        table = torch.cat([video.new_zeros(text_length, m.attention_head_dim), video])
        return table[:, None, None, :].to(device)

    def sequence_length(self, latent_frames: int, latent_height: int, latent_width: int, text_length: int) -> int:
        return sequence_length(self.model_config, latent_frames, latent_height, latent_width, text_length)

    def forward(self, latents, text_embeds, timesteps: Tensor, ofs: Optional[Tensor] = None,
                return_tokens: bool = False, pack_length: Optional[int] = None):
        """v_pred [B, T, C_out, H, W]; with `return_tokens`, this context-parallel rank's output tokens
        [S/cp, b, C_out*pt*p*p] over [text ; video ; pad] (what training computes its loss on).

        Lists of per-clip latents and text (no batch dimension) run as one packed sequence: see
        `forward_packed`."""
        if isinstance(latents, (list, tuple)):
            return self.forward_packed(latents, text_embeds, timesteps, ofs, return_tokens=return_tokens,
                                       pack_length=pack_length)
        b, t, c, h, w = latents.shape
        m = self.model_config
        if c != m.in_channels:
            raise ValueError(f"latents have {c} channels; this model takes model.in_channels={m.in_channels}")
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(b)
        emb = self.conditioning(timesteps, ofs)  # [b, E]
        text_length = text_embeds.shape[1]
        seq = self.sequence_length(t, h, w, text_length)
        padded = padded_sequence_length(seq, self.config)  # CP / SP split evenly; the pad is masked everywhere
        if padded != seq and not masks_padded_keys(self.model_config.backend):
            raise ValueError(f"model.backend=te: the joint sequence has {seq} tokens ({text_length} text), not a "
                             f"multiple of {sequence_split_unit(self.config)} as the CP/SP split needs; change the "
                             f"text length or latent size, or use model.backend=local (which pads and masks)")
        if self.pre_process:
            hidden = self.patch_embed(text_embeds, latents).transpose(0, 1)  # [s, b, h]
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, 0, 0, padded - seq)).contiguous()  # [S, b, h]
            hidden = split_sequence(hidden, padded, self.cp_group)  # [S/cp, b, h]: this context-parallel rank's tokens
            hidden = scatter_tokens(hidden, self.config, self.tp_group)  # [S/cp/tp, b, h] under sequence parallel
        else:
            hidden = None  # comes from the previous pipeline stage via set_input_tensor
        # modulation row of each token: 2 x sample + is_text (see `layer.py`)
        condition = 2 * torch.arange(b, device=latents.device)[None, :].expand(padded, b).clone()
        condition[:text_length] += 1
        condition = local_tokens(split_sequence(condition, padded, self.cp_group), self.config,
                                 self.tp_group)  # sliced like hidden
        key_valid = None  # [S]: real keys, in the order the attention sees them (rank-major under CP)
        if padded != seq:
            key_valid = rank_major_positions(padded, self.cp_group, latents.device) < seq
        rope = self.rotary_table(t, h, w, text_length, latents.device)  # [s, 1, 1, d]
        if rope is not None:  # this CP rank's rows; q/k cover the whole CP shard even under sequence parallel
            rope = split_sequence(torch.nn.functional.pad(rope, (0, 0, 0, 0, 0, 0, 0, padded - seq)), padded,
                                  self.cp_group)
        hidden = self.decoder(hidden, attention_mask=key_valid, context=emb, context_mask=condition,
                              rotary_pos_emb=rope)  # [S/cp(/tp), b, h]
        if not self.post_process:
            return hidden
        # The head is per token: run it on this rank's tokens (text rows too, discarded below), then gather.
        shift, scale = self.output_norm_linear(torch.nn.functional.silu(emb)).chunk(2, dim=1)  # [b, h] each
        tokens = self.output_norm(hidden) * (1 + scale)[None] + shift[None]
        tokens = gather_tokens(self.output_proj(tokens), self.config, self.tp_group)  # [S/cp, b, C_out*pt*p*p]
        if return_tokens:
            return tokens
        tokens = gather_sequence(tokens, padded, self.cp_group)  # [S, b, C_out*pt*p*p]
        video = tokens[text_length:seq].transpose(0, 1)  # [b, N, C_out*pt*p*p]
        return unpatchify(video, t, h, w, m.patch_size, m.patch_size_t)  # [B, T, C_out, H, W]

    # --- packed sequences ---------------------------------------------------------------------------
    def pack_layout(self, latents, text_embeds, pack_length: Optional[int] = None) -> PackLayout:
        """The `PackLayout` of these clips at this model's parallel layout (checks their shapes)."""
        m = self.model_config
        if len(latents) != len(text_embeds) or not latents:
            raise ValueError(f"forward_packed got {len(latents)} latents and {len(text_embeds)} text embeddings: "
                             f"pass one of each per clip (at least one clip)")
        clips = []
        for index, (clip, text) in enumerate(zip(latents, text_embeds)):
            if clip.dim() != 4 or clip.shape[1] != m.in_channels:
                raise ValueError(f"clip {index}: latents of shape {tuple(clip.shape)}; forward_packed takes one "
                                 f"[T, C={m.in_channels}, H, W] tensor per clip (no batch dimension)")
            if text.dim() != 2 or text.shape[1] != m.text_embed_dim:
                raise ValueError(f"clip {index}: text_embeds of shape {tuple(text.shape)}; forward_packed takes one "
                                 f"[L, D={m.text_embed_dim}] tensor per clip")
            frames, _, height, width = clip.shape
            if frames % (m.patch_size_t or 1) or height % m.patch_size or width % m.patch_size:
                raise ValueError(f"clip {index}: latent grid {frames}x{height}x{width} does not divide into "
                                 f"patches of {m.patch_size_t or 1}x{m.patch_size}x{m.patch_size}")
            clips.append(ClipShape(frames, height, width, text.shape[0]))
        return plan_pack_layout(m, clips, self.config, pack_length)

    def forward_packed(self, latents: list, text_embeds: list, timesteps: Tensor, ofs: Optional[Tensor] = None,
                       return_tokens: bool = False, pack_length: Optional[int] = None):
        """Clips of different sizes, durations and text lengths in one sequence, each with its own timestep.

        `latents[i]` [T_i, C, H_i, W_i], `text_embeds[i]` [L_i, D] (no batch dimension), `timesteps` [n] (and
        `ofs`, a number or [n], for 1.5-I2V) -> a list of v_pred [T_i, C_out, H_i, W_i]. Every clip gets exactly
        what it gets when it runs alone: attention stays inside the clip (block-diagonal, `parallel.varlen` /
        TE's thd attention), its positions are its own grid's, its tokens are modulated by its own timestep.
        With `return_tokens`, this context-parallel rank's output tokens [t/cp, 1, F] in the pack order of
        `pack_layout(...)` (TE's thd split; what training computes its loss on). `pack_length` pads the pack
        to a fixed length."""
        m = self.model_config
        layout = self.pack_layout(latents, text_embeds, pack_length)
        device, n = latents[0].device, len(latents)
        timesteps = torch.as_tensor(timesteps, device=device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(n)
        if timesteps.numel() != n:
            raise ValueError(f"forward_packed got {timesteps.numel()} timesteps for {n} clips: pass one per clip")
        emb = self.conditioning(timesteps, ofs)  # [n, E]: one row per clip
        total, segments = layout.total, layout.segments
        params = layout.sequence_params(device)
        if self.pre_process:
            pieces = []
            for clip, text, start, stop in zip(latents, text_embeds, segments[:-1], segments[1:]):
                tokens = self.patch_embed(text[None], clip[None])[0]  # [L_i + N_i, h]: the clip's own positions
                pieces.append(torch.nn.functional.pad(tokens, (0, 0, 0, stop - start - tokens.shape[0])))
            hidden = torch.cat(pieces)[:, None]  # [t, 1, h]
            hidden = split_sequence(hidden, total, self.cp_group, segments)  # this CP rank's share of every clip
            hidden = scatter_tokens(hidden, self.config, self.tp_group)
        else:
            hidden = None  # comes from the previous pipeline stage via set_input_tensor
        condition = layout.condition_index(device)[:, None]  # [t, 1]
        condition = local_tokens(split_sequence(condition, total, self.cp_group, segments), self.config,
                                 self.tp_group)  # sliced like hidden
        rope = self.packed_rotary_table(layout, device)  # [t, 1, 1, d]
        if rope is not None:  # this CP rank's rows; q/k cover the whole CP shard even under sequence parallel
            rope = split_sequence(rope, total, self.cp_group, segments)
        hidden = self.decoder(hidden, attention_mask=None, context=emb, context_mask=condition, rotary_pos_emb=rope,
                              packed_seq_params=params)
        if not self.post_process:
            return hidden
        shift, scale = self.output_norm_linear(torch.nn.functional.silu(emb)).chunk(2, dim=1)  # [n, h] each
        clip_of_token = condition // 2  # [t_local, 1]
        tokens = self.output_norm(hidden) * (1 + scale[clip_of_token]) + shift[clip_of_token]
        tokens = gather_tokens(self.output_proj(tokens), self.config, self.tp_group)  # [t/cp, 1, F]
        if return_tokens:
            return tokens
        tokens = gather_sequence(tokens, total, self.cp_group, segments)[:, 0]  # [t, F], pack order
        outputs = []
        for clip, shape, start, length in zip(latents, layout.clips, segments, layout.lengths):
            video = tokens[start + shape.text_length:start + length][None]
            outputs.append(unpatchify(video, clip.shape[0], clip.shape[2], clip.shape[3], m.patch_size,
                                      m.patch_size_t)[0])
        return outputs

    def packed_rotary_table(self, layout: PackLayout, device) -> Optional[Tensor]:
        """RoPE angles [t, 1, 1, head_dim] of a pack: each clip's own table (as it gets alone), zeros on pad."""
        if not self.model_config.uses_rope:
            return None
        pieces = []
        for shape, start, stop in zip(layout.clips, layout.segments[:-1], layout.segments[1:]):
            table = self.rotary_table(shape.latent_frames, shape.latent_height, shape.latent_width,
                                      shape.text_length, device)
            pieces.append(torch.nn.functional.pad(table, (0, 0, 0, 0, 0, 0, 0, stop - start - table.shape[0])))
        return torch.cat(pieces)


def sequence_length(model: ModelConfig, latent_frames: int, latent_height: int, latent_width: int,
                    text_length: int) -> int:
    """Tokens of the joint sequence: text plus video patches (before any CP/SP padding)."""
    return text_length + video_tokens(model, latent_frames, latent_height, latent_width)


def build_model_chunks(model: ModelConfig, parallel=None, device: str = "cpu",
                       params_dtype: torch.dtype = torch.float32, seed: int = 1234, recompute: str = "none",
                       recompute_num_layers: int = 1) -> list[CogVideoXTransformer]:
    """This rank's model chunks (one per virtual pipeline stage) at megatron's current layout, initialised
    independently of the layout. Call `initialize_parallel` first."""
    from cogvx_mega.config.megatron import build_transformer_config
    from cogvx_mega.parallel.pipeline import build_model_chunks as build_stage_chunks
    from cogvx_mega.parallel.state import model_parallel_groups
    from cogvx_mega.model.init import initialize_weights

    transformer_config = build_transformer_config(model, parallel, params_dtype=params_dtype, device=device,
                                                  recompute=recompute, recompute_num_layers=recompute_num_layers)
    groups = model_parallel_groups()
    chunks = build_stage_chunks(lambda pre, post, vp_stage: CogVideoXTransformer(
        model, transformer_config, pre_process=pre, post_process=post, vp_stage=vp_stage, pg_collection=groups))
    initialize_weights(chunks, seed)
    return [chunk.to(device=device) for chunk in chunks]


def build_model(model: ModelConfig, device: str = "cpu", params_dtype: torch.dtype = torch.float32,
                seed: int = 1234, run_device: Optional[str] = None) -> CogVideoXTransformer:
    """The whole model in this process, on its own (`single_process_groups`): it never involves another rank
    and leaves a running job's groups alone."""
    from cogvx_mega.config.megatron import build_transformer_config
    from cogvx_mega.parallel.state import single_process_groups
    from cogvx_mega.model.init import initialize_weights

    from cogvx_mega.config.megatron import resolve_rope_impl

    # 'auto' choices for the device the model will run on (`run_device`, default `device`)
    model = dataclasses.replace(model, rope_impl=resolve_rope_impl(model.rope_impl, run_device or device))
    transformer_config = build_transformer_config(model, None, params_dtype=params_dtype, device="cpu")
    groups = single_process_groups()
    chunk = CogVideoXTransformer(model, transformer_config, pg_collection=groups)
    initialize_weights([chunk], seed)
    return chunk.to(device=device)
