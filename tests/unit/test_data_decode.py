"""Decoding manifest clips into training frames: shapes (1 + 4k frames at the bucket size), values in [-1, 1],
frames sampled at the target rate, and the picture itself (against the frames the clip was made from)."""
from __future__ import annotations

import pytest
import torch

from cogvx_mega.data.decode import DecodeSpec, decode_clip, frame_indices, longest_usable_count, resize_and_crop
from cogvx_mega.data.manifest import MediaError, find_media, scan


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from media import make_media_folder

    root = tmp_path_factory.mktemp("media")
    make_media_folder(root)
    good, _ = scan(find_media(root), progress=False)
    return {record.path.rsplit("/", 1)[-1]: vars(record) for record in good}, root


def test_frame_sampling_and_counts():
    spec = DecodeSpec(frames=9, height=32, width=32, fps=8)
    assert frame_indices(24.0, 100, spec) == [0, 3, 6, 9, 12, 15, 18, 21, 24]  # every third frame at 24 fps
    assert frame_indices(8.0, 100, spec) == list(range(9))
    assert frame_indices(4.0, 100, spec) == list(range(9))  # slower sources are not stretched
    assert frame_indices(24.0, 20, spec) == [0, 3, 6, 9, 12]  # 7 target frames fit: cut to 1 + 4k = 5
    assert frame_indices(12.0, 9, DecodeSpec(frames=5, height=8, width=8, fps=6)) == [0, 2, 4, 6, 8]
    assert frame_indices(24.0, 100, spec, start=1.0) == [24 + 3 * k for k in range(9)]
    assert [longest_usable_count(n, 49) for n in (0, 1, 4, 5, 48, 49, 80)] == [0, 1, 1, 5, 45, 49, 49]
    with pytest.raises(MediaError, match="no frame"):
        frame_indices(24.0, 10, spec, start=5.0)


@pytest.mark.parametrize("name", ["clip_vp9.webm", "clip_mjpeg.avi", "clip_h264.mp4", "image.png", "photo.jpg"])
def test_decoded_clip_shapes_and_range(records, name):
    by_name, _ = records
    spec = DecodeSpec(frames=5, height=32, width=48, fps=8)
    video = decode_clip(by_name[name], spec)
    expected_frames = 1 if by_name[name]["kind"] == "image" else 5
    assert video.shape == (3, expected_frames, 32, 48) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0 and video.std() > 0.05


def test_decoded_frames_are_the_source_frames(records):
    """The MJPEG clip at its own rate and size equals the frames it was encoded from, within MJPEG's loss."""
    from media import moving_square

    by_name, _ = records
    record = by_name["clip_mjpeg.avi"]
    spec = DecodeSpec(frames=9, height=record["height"], width=record["width"], fps=record["fps"])
    video = decode_clip(record, spec)
    source = resize_and_crop(torch.from_numpy(moving_square(9, 48, 80, seed=1)), 48, 80)
    assert (video - source).abs().mean() < 0.03  # about 4 of 255 levels on average
    sampled = decode_clip(record, DecodeSpec(frames=5, height=48, width=80, fps=record["fps"] / 2))
    assert sampled.shape == source[:, ::2].shape and (sampled - source[:, ::2]).abs().mean() < 0.03  # half the rate: every other source frame


def test_a_clip_that_ends_early_is_a_media_error(records, tmp_path):
    by_name, _ = records
    record = dict(by_name["clip_h264.mp4"], frames=60)  # the manifest claims more frames than the file has
    with pytest.raises(MediaError, match="ends early"):
        decode_clip(record, DecodeSpec(frames=49, height=32, width=32, fps=30))


def test_backend_choice():
    from cogvx_mega.data.decode import choose_backend, dali_available

    assert choose_backend({"path": "a.png", "kind": "image"}) == "image"
    assert choose_backend({"path": "a.mp4", "kind": "video", "codec": "h264"}) == "pyav"  # DALI's CPU decoder refuses it
    cpu_vp9 = choose_backend({"path": "a.webm", "kind": "video", "codec": "vp9"})
    assert cpu_vp9 == ("dali-cpu" if dali_available() else "pyav")
    if dali_available():
        assert choose_backend({"path": "a.mp4", "kind": "video", "codec": "h264"}, device="cuda") == "dali-gpu"


@pytest.mark.parametrize("name", ["clip_vp9.webm", "clip_mjpeg.avi"])
def test_dali_cpu_and_pyav_decode_the_same_frames(records, name):
    """DALI's CPU decoder and PyAV (both from the same bitstream) agree within a codec tolerance: the two
    decoders and their YUV -> RGB conversions may differ by a few levels."""
    pytest.importorskip("nvidia.dali")
    by_name, _ = records
    record = by_name[name]
    spec = DecodeSpec(frames=5, height=record["height"], width=record["width"], fps=record["fps"] / 2)
    dali = decode_clip(record, spec, backend="dali-cpu")
    pyav = decode_clip(record, spec, backend="pyav")
    assert dali.shape == pyav.shape == (3, 5, record["height"], record["width"])
    difference = (dali - pyav).abs()
    assert difference.mean() <= 2 / 127.5 and difference.max() <= 24 / 127.5, (difference.mean(), difference.max())
