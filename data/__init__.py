"""Data: synthetic clips, cached latents and text embeddings, loaders."""
