"""Checkpoint formats and readers: what is on disk and how to read and write it, nothing more.

Every folder this package writes holds `cogvx_checkpoint.json` (format, config, step) plus its tensors:

- `single-v1` (`single_file.py`): the transformer unsharded in `model.safetensors`, megatron parameter
  names; what the converters write.
- `torch-dist-v1` (`sharded.py`): megatron dist_checkpointing `torch_dist` shards of model and optimizer;
  what training writes. It reloads at any layout, and `read_sharded_model_state` reads it into one
  process without process groups.
- `vae-single-v1` (`vae.py`): the 3D VAE, diffusers parameter names.

Foreign formats: diffusers transformer and VAE folders (`transformer.py`, `vae.py`, `weights.py`) and
SAT checkpoints (`transformer.read_sat_transformer`, `vae.read_sat_vae`: weights-only unpickling, the key maps).

Reading never builds a model and never creates or changes process groups; writing is atomic
(`atomic.py`). Imports point down only: config, vae's config and megatron's checkpointing.
"""
