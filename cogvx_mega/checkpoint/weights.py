"""Tensors by name from files, read whole or as one slice: the common reader under every format.

`TensorSource` is what the key maps and the sharded loader read from. `SafetensorsTensors` opens
safetensors files lazily and reads only the requested slice from disk, so a tensor-parallel rank
loading a released checkpoint never holds more than its own shard of a tensor; `DictTensors` serves
tensors already in memory (a `.bin`, a SAT `.pt`, a test's state dict).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor

from cogvx_mega.checkpoint.meta import ConversionError


class TensorSource:
    """Named tensors. `read(key, dim, start, stop)` returns the whole tensor, or `[start:stop]` along `dim`."""

    def keys(self) -> set[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, key: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> Tensor:
        raise NotImplementedError

    def read_all(self) -> dict[str, Tensor]:
        return {key: self.read(key) for key in sorted(self.keys())}


class DictTensors(TensorSource):
    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors

    def keys(self) -> set[str]:
        return set(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def read(self, key, dim=None, start=0, stop=None):
        tensor = self.tensors[key]
        if dim is None:
            return tensor
        return tensor.narrow(dim, start, (tensor.shape[dim] if stop is None else stop) - start)


class SafetensorsTensors(TensorSource):
    """Tensors of one or more safetensors files, opened lazily; slices are read from disk alone."""

    def __init__(self, files: Iterable[str | Path]):
        from safetensors import safe_open

        self._handles = {}
        self._file_of: dict[str, str] = {}
        for file in files:
            handle = safe_open(str(file), framework="pt")
            self._handles[str(file)] = handle
            for key in handle.keys():
                self._file_of[key] = str(file)

    def keys(self) -> set[str]:
        return set(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[key]].get_slice(key).get_shape())

    def read(self, key, dim=None, start=0, stop=None):
        handle = self._handles[self._file_of[key]]
        if dim is None:
            return handle.get_tensor(key)
        shape = self.shape(key)
        index = [slice(None)] * len(shape)
        index[dim] = slice(start, shape[dim] if stop is None else stop)
        return handle.get_slice(key)[tuple(index)]


def diffusers_weight_files(folder: Path) -> Optional[list[Path]]:
    """The safetensors files of a diffusers model folder (sharded or single), or None if it has none."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return [folder / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "diffusion_pytorch_model.safetensors"
    return [single] if single.is_file() else None


def open_diffusers_weights(folder: Path) -> TensorSource:
    """A diffusers model folder's weights: sharded or single safetensors (lazy), or a .bin (in memory)."""
    files = diffusers_weight_files(folder)
    if files is not None:
        return SafetensorsTensors(files)
    if (folder / "diffusion_pytorch_model.bin").is_file():
        return DictTensors(torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True))
    raise ConversionError(f"{folder}: no diffusion_pytorch_model weights found")


def read_diffusers_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a diffusers model folder, in memory."""
    return open_diffusers_weights(Path(folder)).read_all()
