"""`cogvx_mega.files.atomic_file`, the one-file writer under latent files and videos: the umask decides the mode
(safetensors alone writes 0600), an error leaves the old file and no temporary, and the latent writer of
`cogvx vae encode` and `cogvx sample --save-latents` round-trips."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from cogvx_mega.files import atomic_file, process_umask
from cogvx_mega.vae import io


@pytest.fixture
def umask():
    def set_umask(mask):
        previous.append(os.umask(mask))
    previous = []
    yield set_umask
    if previous:
        os.umask(previous[0])


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_latent_file_takes_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert process_umask() == mask
    path = tmp_path / "z.safetensors"
    latents = torch.randn(1, 2, 16, 4, 4)
    io.save_latents(str(path), latents, {"fps": 8})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    loaded, metadata = io.load_latents(str(path))
    assert torch.equal(loaded, latents) and metadata == {"fps": 8}
    io.save_latents(str(path), latents)  # no metadata: sample's files
    assert io.load_latents(str(path))[1] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.safetensors"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_file(path) as tmp:
            assert tmp.suffix == ".mp4" and tmp.name.startswith(".clip.mp4.tmp-")
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full halfway")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_video_writer_takes_the_umask(tmp_path, umask):
    pytest.importorskip("av")
    umask(0o002)
    path = tmp_path / "v.mp4"
    io.write_video(str(path), torch.zeros(1, 3, 2, 16, 16), fps=8)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert io.read_video(str(path))[0].shape == (1, 3, 2, 16, 16)


def test_a_full_disk_names_the_file_whatever_the_writer_says(tmp_path):
    """safetensors says "I/O error: No space left on device (os error 28)" and names no file: the error that
    leaves atomic_file is the OS's, naming the file being written (not its hidden temporary)."""
    import errno

    path = tmp_path / "latents.safetensors"
    with pytest.raises(OSError) as raised:
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []
