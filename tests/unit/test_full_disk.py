"""A full disk: `cogvx` says so in one line (what was being written, and to free space there), exits 1, prints no
traceback, and leaves nothing half-written. Each command runs on a small tmpfs mounted in a private mount
namespace (root only; skipped elsewhere): a training checkpoint that does not fit, `cogvx export diffusers`,
`cogvx sample --output` and `cogvx data encode` (whose committed shards stay, and the same command continues once
there is space). The recogniser of a full disk is tested on the failures the writing libraries really raise on such
a disk, and on those exceptions rebuilt from their texts; metrics.jsonl keeps whole rows."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import traceback
from pathlib import Path

import pytest
import torch

from small_disk import Outcome, cogvx, on_small_disk, python, skip_without_small_disks

from cogvx_mega.files import full_disk_error, shown_path
from cogvx_mega.cli import main

TINY = ["--preset", "tiny", "--data", "synthetic", "data.num_synthetic_clips=4", "training.micro_batch_size=2",
        "--device", "cpu"]
HINT = "free space there (or write elsewhere) and run it again"


def full_disk_line(path) -> str:
    return f"cogvx: error: No space left on device while writing {path}; {HINT}"


@pytest.fixture(scope="module")
def small_disks():
    skip_without_small_disks()


def assert_one_full_disk_line(outcome: Outcome, written) -> None:
    assert outcome.status == 1, outcome.stderr[-3000:]
    assert outcome.full_disk_lines == [full_disk_line(written)], outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr


@pytest.fixture(scope="module")
def parts(tmp_path_factory, small_disks):
    """A tiny training checkpoint (one step), its VAE and T5, prompt embeddings, and a manifest of four clips."""
    from diffusers import AutoencoderKLCogVideoX
    from media import moving_square, write_video
    from safetensors.torch import save_file
    from text_encoder import make_tiny_t5

    root = tmp_path_factory.mktemp("full-disk-parts")
    assert main(["train", *TINY, "--run-dir", str(root / "run"), "--steps", "1"]) == 0
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(root / "vae")
    make_tiny_t5(root / "t5")
    save_file({"prompt_embeds": torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))},
              str(root / "prompt.safetensors"))
    media = root / "media"
    media.mkdir()
    for index in range(4):
        write_video(media / f"clip{index}.mp4", moving_square(9, 32, 48, seed=index), 8, "libx264", "yuv420p")
        (media / f"clip{index}.txt").write_text(f"a square moving, clip {index}\n")
    assert main(["data", "scan", str(media), "--output", str(root / "manifest.jsonl")]) == 0
    return root


# --- the commands ------------------------------------------------------------------------------------------------

def test_a_checkpoint_that_does_not_fit_is_one_line_and_leaves_no_folder(tmp_path, small_disks):
    disk = tmp_path / "disk"
    [outcome] = on_small_disk(disk, "2m", cogvx("train", *TINY, "--run-dir", disk / "run", "--steps", "1"))
    assert_one_full_disk_line(outcome, disk / "run" / "checkpoints" / "step_00000001")
    assert "run/checkpoints" in outcome.left  # the save began there
    assert [name for name in outcome.left if name.startswith("run/checkpoints/")] == []  # no hidden folder, no step
    assert not [name for name in outcome.left if ".tmp" in name]


def test_an_export_that_does_not_fit_leaves_nothing(parts, tmp_path):
    disk = tmp_path / "disk"
    [outcome] = on_small_disk(disk, "1m", cogvx("export", "diffusers", "--ckpt",
                                                 parts / "run" / "checkpoints" / "step_00000001", "--vae",
                                                 parts / "vae", "--text-encoder", parts / "t5", "--out",
                                                 disk / "release"))
    assert_one_full_disk_line(outcome, disk / "release")
    assert outcome.left == []


def test_a_sampled_video_that_does_not_fit_leaves_nothing(parts, tmp_path):
    disk = tmp_path / "disk"
    [outcome] = on_small_disk(disk, "4k", cogvx("sample", "--ckpt", parts / "run" / "checkpoints" / "step_00000001",
                                                "--vae", parts / "vae", "--prompt-embeds",
                                                parts / "prompt.safetensors", "--steps", "1", "--frames", "9",
                                                "--size", "32x48", "--output", disk / "clip.mp4", "--device", "cpu"))
    assert_one_full_disk_line(outcome, disk / "clip.mp4")  # a 4.6 kB video on a disk of one 4 kB page
    assert outcome.left == []


def test_an_encode_that_fills_the_disk_keeps_its_committed_shards_and_continues(parts, tmp_path):
    disk = tmp_path / "disk"
    encode = cogvx("data", "encode", "--manifest", parts / "manifest.jsonl", "--vae", parts / "vae",
                   "--text-encoder", parts / "t5", "--output", disk / "cache.zarr", "--preset", "tiny",
                   "data.buckets=[9x32x48]", "--shard-clips", "1")
    # the store's 9 metadata files (zarr.json x7, the text_row chunk, the clip table) and two shards of 6 files (the
    # shard files of mean, logvar, first_frame and text, a claim, a marker) fit in 96 kB of 4 kB pages; the third
    # shard does not
    failed, resumed = on_small_disk(disk, "96k", encode, f"mount -o remount,size=1m {disk} && {encode}")
    assert_one_full_disk_line(failed, disk / "cache.zarr")
    commits = {int(Path(name).stem) for name in failed.left if name.startswith("cache.zarr/commits/9x32x48/")}
    assert commits == {0, 1}
    assert not [name for name in failed.left if "/." in f"/{name}" or name.endswith(".partial")]  # no temporary
    shard_file = re.compile(r"cache\.zarr/(9x32x48/(mean|logvar|first_frame)|text)/c/(\d+)/")
    clips = {int(match.group(3)) for name in failed.left if (match := shard_file.match(name))}
    assert clips == commits  # cache.zarr/<bucket>/<array>/c/<shard>/...: the third shard's files are gone
    assert resumed.status == 0, resumed.stderr[-3000:]
    assert "resuming: 2 of 4 shards are already committed" in resumed.stderr
    assert {int(Path(name).stem) for name in resumed.left if name.startswith("cache.zarr/commits/9x32x48/")} == \
        {0, 1, 2, 3}


# --- our own writers ---------------------------------------------------------------------------------------------

OWN_WRITERS = r"""
import json, os, sys
from pathlib import Path
disk = Path(sys.argv[1])
from cogvx_mega.checkpoint.atomic import atomic_directory, write_text_atomically
from cogvx_mega.training.metrics import append_whole
(disk / "filler").write_bytes(b"x" * 4000)  # one of the two pages
said = {}
rows = disk / "metrics.jsonl"
try:
    for step in range(1, 10):
        append_whole(rows, json.dumps({"step": step, "note": "x" * 980}) + "\n")  # 4 rows fill a page
except OSError as error:
    said["append"] = [error.errno, error.filename]
said["rows"] = [json.loads(line)["step"] for line in rows.read_text().splitlines()]
rows.unlink()
try:
    write_text_atomically(disk / "manifest.jsonl", "y" * 8000)
except OSError as error:
    said["text"] = [error.errno, error.filename]
try:
    with atomic_directory(disk / "folder") as folder:
        (folder / "a").write_bytes(b"z" * 8000)
except OSError as error:
    said["folder"] = [error.errno, error.filename]
print(json.dumps(said))
"""


def test_our_writers_keep_whole_rows_and_leave_no_temporary(tmp_path, small_disks):
    disk = tmp_path / "disk"
    [outcome] = on_small_disk(disk, "8k", python(OWN_WRITERS, disk))
    assert outcome.status == 0, outcome.stderr
    said = json.loads(outcome.stdout)
    assert said["append"] == [errno.ENOSPC, str(disk / "metrics.jsonl")]
    assert said["rows"] == [1, 2, 3, 4]  # the fifth row, cut by the full disk, is taken back whole
    assert said["text"] == [errno.ENOSPC, str(disk / "manifest.jsonl")]
    assert said["folder"] == [errno.ENOSPC, str(disk / "folder")]
    assert outcome.left == ["filler"]


# --- the recogniser ----------------------------------------------------------------------------------------------

LIBRARY_FAILURES = r"""
import json, os, shutil, sys, warnings
from pathlib import Path
import numpy as np, torch
from cogvx_mega.files import full_disk_error
warnings.simplefilter("ignore")
disk = Path(sys.argv[1])
big = torch.randn(1_000_000)  # 4 MB on a 64 kB disk

def torch_to_path(path): torch.save({"a": big}, path)
def torch_to_file(path):
    with open(path, "wb") as f: torch.save({"a": big}, f)
def safetensors(path):
    from safetensors.torch import save_file
    save_file({"a": big}, str(path))
def zarr_chunk(path):
    import zarr
    array = zarr.open_group(str(path), mode="w", zarr_format=3).create_array(
        "x", shape=(2, 1_000_000), chunks=(1, 1_000_000), dtype="float32", fill_value=0.0)
    array[0] = big.numpy()
def tensorstore(path):
    import tensorstore as ts
    array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, create=True,
                    dtype=ts.float32, shape=[1_000_000]).result()
    array.write(big.numpy()).result()
def distributed_checkpoint(path):
    import torch.distributed.checkpoint as dcp
    dcp.save({"a": big}, checkpoint_id=str(path), no_dist=True)
def copytree(path):
    source = disk.parent / "source"
    source.mkdir(exist_ok=True)
    (source / "f").write_bytes(os.urandom(1_000_000))
    shutil.copytree(source, path)
def numpy_tofile(path): big.numpy().tofile(str(path))
def pyav(path):
    import av
    frames = np.random.default_rng(0).integers(0, 255, (8, 128, 128, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())

said = {}
for write in (torch_to_path, torch_to_file, safetensors, zarr_chunk, tensorstore, distributed_checkpoint, copytree,
              numpy_tofile, pyav):
    path = disk / f"{write.__name__}.mp4"  # PyAV picks the container by the suffix
    try:
        write(path)
        said[write.__name__] = "written"
    except BaseException as error:
        full = full_disk_error(error, path)  # before the partial write is removed
        said[write.__name__] = [type(error).__name__, str(error)[:300],
                                None if full is None else [full.errno, full.filename]]
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
print(json.dumps(said))
"""


def test_the_libraries_failures_on_a_full_disk_are_recognised(tmp_path, small_disks):
    disk = tmp_path / "disk"
    [outcome] = on_small_disk(disk, "64k", python(LIBRARY_FAILURES, disk))
    assert outcome.status == 0, outcome.stderr[-3000:]
    said = json.loads(outcome.stdout)
    for name, what in said.items():
        assert what != "written", name
        assert what[2] == [errno.ENOSPC, str(disk / f"{name}.mp4")], (name, what)
    assert outcome.left == []


def failure(text_or_error, cause=None):
    error = text_or_error if isinstance(text_or_error, BaseException) else RuntimeError(text_or_error)
    error.__cause__ = cause
    return error


def checkpoint_exception(*failures):
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException("write", {rank: (error, traceback.StackSummary()) for rank, error in
                                         enumerate(failures)})


def rebuilt_failures():
    """What the writers raise on a full disk (the texts found on a tmpfs), rebuilt without one."""
    from safetensors import SafetensorError

    enospc = OSError(errno.ENOSPC, "No space left on device")
    return {
        "an OSError": enospc,
        "a quota": OSError(errno.EDQUOT, "Disk quota exceeded"),
        "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        "tensorstore": ValueError('RESOURCE_EXHAUSTED: Error writing local file "/d/t.zarr/c/0": Failed writing: '
                                  '"/d/t.zarr/c/0.__lock": Failed to write 3741952 bytes to file 6: No space left on '
                                  "device [os_error_code='28']"),
        "torch's legacy writer": RuntimeError("write(): fd 3 failed with No space left on device"),
        "torch's zip writer to a file": failure("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs "
                                                "598", cause=enospc),
        "megatron's writer process": checkpoint_exception(failure("Worker failure: [Errno 28] No space left on "
                                                                  "device", cause=enospc)),
        "another rank's writer process": checkpoint_exception(RuntimeError("Worker failure: [Errno 28] No space "
                                                                           "left on device")),
        "copytree": shutil.Error([("/s/f", "/d/f", "[Errno 28] No space left on device: '/s/f' -> '/d/f'")]),
    }


@pytest.mark.parametrize("name", list(rebuilt_failures()))
def test_a_full_disk_is_recognised_however_the_library_says_it(name):
    expected = errno.EDQUOT if name == "a quota" else errno.ENOSPC
    found = full_disk_error(rebuilt_failures()[name], "/runs/a/checkpoints/.step_00000002.tmp")
    assert (found.errno, found.filename) == (expected, "/runs/a/checkpoints/step_00000002")


def test_a_write_that_lost_its_reason_is_a_full_disk_only_on_a_full_disk(tmp_path, monkeypatch):
    lost = failure("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534",
                   cause=RuntimeError("basic_ios::clear: iostream error"))
    assert full_disk_error(lost, tmp_path / "x.pt") is None  # this disk has room: something else went wrong
    assert full_disk_error(checkpoint_exception(lost), tmp_path / "x.pt") is None
    full = os.statvfs_result((4096, 4096, 1000, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    assert full_disk_error(lost, tmp_path / "x.pt").errno == errno.ENOSPC
    assert full_disk_error(checkpoint_exception(lost), tmp_path / "x.pt").errno == errno.ENOSPC
    assert full_disk_error(lost) is None  # nowhere to look


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"), ValueError("bad value"),
                                   checkpoint_exception(),  # another rank's: says nothing of what failed
                                   failure(KeyboardInterrupt(), cause=OSError(errno.ENOSPC, "x"))])
def test_other_errors_are_not_a_full_disk(error):
    assert full_disk_error(error, "/somewhere") is None


def test_hidden_temporary_names_are_shown_as_their_final_names():
    assert shown_path("/r/checkpoints/.step_00000001.tmp/__0_0.distcp") == "/r/checkpoints/step_00000001/__0_0.distcp"
    assert shown_path("/out/.clip.mp4.tmp-0123abcd.mp4") == "/out/clip.mp4"
    assert shown_path("/out/.release.tmp-0123abcd/vae") == "/out/release/vae"
    assert shown_path("/out/.hidden/a.tmp") == "/out/.hidden/a.tmp"


def test_main_says_a_wrapped_full_disk_in_one_line_also_from_a_thread(monkeypatch, capsys):
    import threading

    from cogvx_mega.cli import config

    def fill_the_disk(args):
        def writer():
            raise OSError(errno.ENOSPC, "No space left on device")

        thread = threading.Thread(target=writer)  # TensorBoard's writer thread dies so, and hands its error on
        thread.start()
        thread.join()
        raise checkpoint_exception(failure("Worker failure: [Errno 28] No space left on device",
                                           cause=OSError(errno.ENOSPC, "No space left on device",
                                                         "/r/checkpoints/.step_00000003.tmp/__0_1.distcp")))

    monkeypatch.setattr(config, "run", fill_the_disk)
    assert main(["config", "show"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [full_disk_line("/r/checkpoints/step_00000003/__0_1.distcp")]

    def nowhere(args):
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(config, "run", nowhere)
    assert main(["config", "show"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "cogvx: error: No space left on device; free space on the disk being written (or write elsewhere) and run it "
        "again"]
