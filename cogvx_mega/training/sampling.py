"""Videos from a model: what the CogVideoX pipelines do around the denoising loop, shared by `cogvx sample`
and by the samples a run writes while it trains (`training.sample_every`).

* The latent grid of a request: 1 + (frames - 1) / 4 latent frames; the 1.5 models (p_t = 2) round that up
  to a multiple of p_t and drop the leading extra latent frames before the decode, as diffusers' pipelines do
  (the final latents keep them, as the pipelines' `output_type="latent"` does).
* Image-to-video: each image's VAE latent (a posterior draw from the sampling generator, taken before the
  initial noise, as the I2V pipeline consumes its generator) times the VAE latent scale, divided instead for
  a VAE with `invert_scale_latents`, in the first latent frame and zeros after, concatenated to the noisy
  latents on the channel axis at every step; `ofs` = 2.0 for the 1.5-I2V model.
* The model at any layout (`layout_forward`): this rank's chunks run megatron's forward-only schedule; the
  model's own gathers give every TP and CP rank the whole v, and the last pipeline stage broadcasts it to
  the others. Every rank then takes the same sampler steps from the same generator, so every rank of the
  layout holds the same latents, and the VAE decode can split time over any group of them.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.diffusion.sampler import SamplingSettings, sample_latents

logger = logging.getLogger(__name__)

I2V_OFS = 2.0  # the 1.5-I2V pipeline's ofs input at inference


@dataclasses.dataclass(frozen=True)
class LatentGrid:
    """The latents a request denoises: [B, frames, channels, height, width]; `dropped_frames` leading
    latent frames are not decoded (the 1.5 models' rounding to whole temporal patches)."""

    frames: int
    channels: int
    height: int
    width: int
    dropped_frames: int

    def shape(self, batch: int) -> tuple[int, int, int, int, int]:
        return batch, self.frames, self.channels, self.height, self.width


def latent_grid(model_config, frames: int, height: int, width: int, temporal_ratio: int = 4,
                spatial_ratio: int = 8) -> LatentGrid:
    latent_frames = (frames - 1) // temporal_ratio + 1
    patch_t = model_config.patch_size_t or 1
    dropped = (patch_t - latent_frames % patch_t) % patch_t
    return LatentGrid(latent_frames + dropped, model_config.out_channels, height // spatial_ratio,
                      width // spatial_ratio, dropped)


def read_image(path: str, height: int, width: int, flag: str = "--image") -> Tensor:
    """An image file as [3, H, W] in [-1, 1], resized to HxW with Lanczos as diffusers' video processor does."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise ConfigError(flag, path, "no such file")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise ConfigError(flag, path, f"is not an image PIL can read ({error})") from None
    return pixels.reshape(height, width, 3).permute(2, 0, 1).float() / 255.0 * 2.0 - 1.0


@torch.no_grad()
def image_condition(vae, images: Tensor, grid: LatentGrid, generator: torch.Generator) -> Tensor:
    """The I2V conditioning latents [B, grid.frames, C, h, w] of `images` [B, 3, H, W] in [-1, 1]: each image
    encoded on its own (one posterior draw each, in order), scaled, then zeros for the later frames."""
    c = vae.config
    first = [vae.encode(image[None, :, None].to(next(vae.parameters())), sample=True, generator=generator)
             for image in images]  # [1, C, 1, h, w] each
    first = torch.cat(first).permute(0, 2, 1, 3, 4).float()  # [B, 1, C, h, w]
    first = first / c.scaling_factor if c.invert_scale_latents else first * c.scaling_factor
    padding = first.new_zeros(first.shape[0], grid.frames - 1, *first.shape[2:])
    return torch.cat([first, padding], dim=1)


def denoise(forward: Callable, model_config, vae, grid: LatentGrid, prompt_embeds: Tensor,
            negative_embeds: Optional[Tensor], settings: SamplingSettings, alphas_cumprod: Tensor, seed: int,
            device, latents: Optional[Tensor] = None, images: Optional[Tensor] = None,
            progress: bool = False) -> Tensor:
    """The final latents [B, grid.frames, C, h, w] for these prompts, drawn from `seed` as diffusers' pipelines
    draw them (the I2V image latents first, then the initial noise, then the DPM steps' noise)."""
    batch = prompt_embeds.shape[0]
    generator = torch.Generator().manual_seed(seed)
    condition = None
    if model_config.is_image_to_video:
        if images is None or images.shape[0] != batch:
            raise ConfigError("--image", None if images is None else images.shape[0],
                              f"an image-to-video model needs one image per prompt ({batch})")
        condition = image_condition(vae, images, grid, generator).to(device)
    if latents is None:
        latents = torch.randn(grid.shape(batch), generator=generator)
    ofs = I2V_OFS if model_config.ofs_embed_dim else None
    return sample_latents(forward, latents.to(device), prompt_embeds.to(device),
                          None if negative_embeds is None else negative_embeds.to(device), settings, alphas_cumprod,
                          ofs=ofs, progress=progress, generator=generator, image_latents=condition)


@torch.no_grad()
def decode_video(vae, latents: Tensor, grid: LatentGrid, chunk_frames: Optional[int] = None, group=None) -> Tensor:
    """Pixels [B, 3, F, H, W] in [-1, 1] of final latents [B, T, C, h, w]: the dropped frames removed, the
    latent scale undone, decoded whole, in chunks of `chunk_frames` latent frames, or context parallel over
    `group` (every rank of which holds the same latents; every rank gets the whole video)."""
    latents = latents[:, grid.dropped_frames:] / vae.config.scaling_factor
    latents = latents.permute(0, 2, 1, 3, 4).to(next(vae.parameters()))
    if group is not None and dist.get_world_size(group) > 1:
        return vae.decode(latents, group=group, gather=True).float()
    return vae.decode(latents, chunk_frames=chunk_frames).float()


def layout_forward(chunks: Sequence[torch.nn.Module], dtype: torch.dtype = torch.float32) -> Callable:
    """`forward(latents, text, timesteps, ofs=None) -> v` (float32, on every rank) for this rank's model chunks
    at megatron's current layout (a single whole model, or the chunks of a TP/PP/VPP/CP layout). Inputs are
    cast to `dtype`, the weights' dtype."""
    from cogvx_mega.model.transformer import sequence_length
    from cogvx_mega.parallel.context import padded_sequence_length
    from cogvx_mega.parallel.pipeline import unwrap_model

    first = unwrap_model(chunks[0])
    pipeline = first.pg_collection.pp  # the groups the model was built with (a whole model: its own, size 1)
    if pipeline is None or dist.get_world_size(pipeline) == 1:
        def whole(latents, text, timesteps, ofs=None):
            return chunks[0](latents.to(dtype), text.to(dtype), timesteps, ofs=ofs).float()

        return whole

    from megatron.core.pipeline_parallel import get_forward_backward_func

    m = first.model_config
    stages = dist.get_world_size(pipeline)
    interleaved = len(chunks) > 1

    def pipelined(latents, text, timesteps, ofs=None):
        b, frames, _, height, width = latents.shape
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(b)
        # the interleaved schedule needs at least as many micro-batches as stages: repeat the last sample
        micro_batches = stages if interleaved else 1
        per_micro = -(-b // micro_batches)
        pad = per_micro * micro_batches - b
        inputs = [torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]) if pad else x
                  for x in (latents.to(dtype), text.to(dtype), timesteps)]
        outputs: list[Tensor] = []

        def step(iterator, model):
            index = next(iterator)
            part = [x[index * per_micro:(index + 1) * per_micro] for x in inputs]
            output = model(*part, ofs=ofs)

            def keep(output_tensor):
                outputs.append(output_tensor.float())
                return output_tensor.new_zeros(()), {}

            return output, keep

        iterators = [iter(range(micro_batches)) for _ in chunks]
        seq = padded_sequence_length(sequence_length(m, frames, height, width, text.shape[1]), first.config)
        get_forward_backward_func()(forward_step_func=step, data_iterator=iterators if interleaved else iterators[0],
                                    model=list(chunks), num_microbatches=micro_batches, seq_length=seq,
                                    micro_batch_size=per_micro, forward_only=True)
        if outputs:  # the last stage
            v = torch.cat(outputs)[:b].contiguous()
        else:
            v = torch.empty(b, frames, m.out_channels, height, width, device=latents.device)
        dist.broadcast(v, src=dist.get_global_rank(pipeline, stages - 1), group=pipeline)
        return v

    return pipelined


# --- samples during training ---------------------------------------------------------------------------
@dataclasses.dataclass
class SamplePrompts:
    """What a run samples: prompt embeddings [N, L, D] (and negatives, None: zeros), I2V images [N, 3, H, W]."""

    prompt_embeds: Tensor
    negative_embeds: Optional[Tensor] = None
    images: Optional[Tensor] = None


class TrainingSampler:
    """`training.sample_every`: videos of the model as it is, from every rank of the run.

    Prompt k goes to data-parallel replica k mod DP; the ranks of that replica's layout denoise it together
    with the training chunks (forward only), the VAE decode splits time over its context-parallel group, and
    its first rank writes `<run_dir>/samples/step_<N>/sample_<k>.mp4` (and the final latents with
    `sampling.save_latents`). Each prompt is drawn from `sampling.seed`, so sample k equals `cogvx sample
    --seed S` of the step's checkpoint for that prompt, at any layout."""

    def __init__(self, config, prompts: SamplePrompts, vae):
        self.config = config
        self.prompts = prompts
        self.vae = vae

    def sample(self, trainer) -> list[str]:
        """Sample every prompt at the trainer's current weights; returns the files written (paths relative to
        the run folder), on every rank."""
        from megatron.core import parallel_state

        from cogvx_mega.diffusion.schedule import schedule_from_config
        from cogvx_mega.vae import io
        from cogvx_mega.training import checkpoint as ckpt

        s, m = self.config.sampling, self.config.model
        frames, height, width = self.config.sampling_resolution()
        grid = latent_grid(m, frames, height, width, self.vae.config.temporal_compression_ratio,
                           self.vae.config.spatial_compression_ratio)
        settings = SamplingSettings(s.steps, s.guidance_scale, s.dynamic_cfg, s.scheduler)
        alphas = schedule_from_config(self.config.diffusion)
        folder_name = f"samples/{ckpt.step_folder('', trainer.step).name}"
        folder = trainer.run_dir / folder_name
        dp_size, dp_rank = trainer.dims.data_parallel_size, trainer.dims.data_parallel_rank
        cp_group = parallel_state.get_context_parallel_group() if trainer.dims.context_parallel_size > 1 else None
        writer = (parallel_state.get_tensor_model_parallel_rank() == 0
                  and parallel_state.get_pipeline_model_parallel_rank() == 0
                  and parallel_state.get_context_parallel_rank() == 0)
        dtype = torch.bfloat16 if trainer.config.training.precision() == "bf16_params" else torch.float32
        forward = layout_forward(trainer.ddp_chunks, dtype)
        written = []
        for chunk in trainer.ddp_chunks:
            chunk.eval()
        try:
            with trainer.autocast():
                for index in range(self.prompts.prompt_embeds.shape[0]):
                    name = f"{folder_name}/sample_{index:02d}"
                    written.append(f"{name}.mp4")
                    if s.save_latents:
                        written.append(f"{name}.safetensors")
                    if index % dp_size != dp_rank:
                        continue
                    pick = slice(index, index + 1)
                    negative = self.prompts.negative_embeds
                    latents = denoise(forward, m, self.vae, grid, self.prompts.prompt_embeds[pick],
                                      None if negative is None else negative[pick], settings, alphas, s.seed,
                                      trainer.device, images=None if self.prompts.images is None
                                      else self.prompts.images[pick])
                    video = decode_video(self.vae, latents, grid, s.chunk_frames, cp_group)
                    if writer:
                        folder.mkdir(parents=True, exist_ok=True)
                        if s.save_latents:
                            io.save_latents(str(trainer.run_dir / f"{name}.safetensors"), latents.float())
                        io.write_video(str(trainer.run_dir / f"{name}.mp4"), video.cpu(), fps=s.fps)
        finally:
            for chunk in trainer.ddp_chunks:
                chunk.train()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every sample is on disk before the step's metrics name them
        return written
