"""Diffusion objective: noise schedule, timestep sampling, loss."""
