"""cogvx-mega: Megatron-style 3D-parallel training for CogVideoX-class text-to-video transformers.

Importing the package does nothing but define names; heavy modules load on first use.
"""
__version__ = "0.1.0"


def from_pretrained(path, device="cpu", dtype=None, backend="local", verify=True, weights=None, **model_overrides):
    """See `cogvx_mega.api.from_pretrained`."""
    import torch

    from cogvx_mega.api import from_pretrained as _from_pretrained

    return _from_pretrained(path, device=device, dtype=dtype or torch.float32, backend=backend, verify=verify,
                            weights=weights, **model_overrides)


def load_vae(path, device="cpu", dtype=None, verify=True):
    """See `cogvx_mega.api.load_vae`."""
    import torch

    from cogvx_mega.api import load_vae as _load_vae

    return _load_vae(path, device=device, dtype=dtype or torch.float32, verify=verify)


def train(config, resume=None, init_from=None, init_lora=None):
    """See `cogvx_mega.api.train`."""
    from cogvx_mega.api import train as _train

    return _train(config, resume=resume, init_from=init_from, init_lora=init_lora)


__all__ = ["from_pretrained", "load_vae", "train", "__version__"]
