"""Shots of a video and the frames its scores look at, from one decode of the file (`cogvx data split|score`).

`analyze_file` decodes a video once, from its first frame up to the last frame any of its manifest lines needs, and
hands each decoded frame, downscaled, to whatever wants it:

- shot detection (`ShotOptions`): PySceneDetect's ContentDetector (a cut where the mean HSV change between two
  frames passes `threshold`) or AdaptiveDetector (a cut where a frame's change stands out from the mean of its
  neighbours by `adaptive_threshold`), fed the frames of each line's range at `detect_width` pixels wide (256 by
  default: the width PySceneDetect's own automatic downscale gives). A shot's first frame is the first decoded
  frame of the new scene.
- motion (`cogvx_mega.data.scores`): frame pairs sampled `motion_fps` times a second in each line's range (a frame
  at or after each sample point and the next decoded frame), at a `motion_side`-pixel short side, each pair turned
  into one number per source frame (the flow over the pair divided by the frames between them) as soon as its
  second frame is decoded.
- aesthetic: a few frames spread over each line's range, at the CLIP model's input size, scored when the file is
  done.

Frame numbers are positions in the video's frame sequence and a range is [floor(start * fps), ceil(end * fps)), as
`decode.frame_indices` reads a line's `start`/`end`, so a shot written with `start = first / fps` and
`end = last / fps` decodes to exactly its frames.

Decoding goes through PyAV on the CPU with one decoder thread (the command runs one file per worker thread) and the
deblocking filter skipped (`skip_loop_filter=all`: 20-30 % faster on H.264; its effect is gone at 256 px), or
through DALI on the GPU (NVDEC) for `device='cuda'` where DALI is installed. By default the decoder also skips the
frames no other frame refers to (`skip_frame=NONREF`: the non-reference B-frames of H.264/HEVC, a third of the
frames and a quarter of the decode time of x264's defaults) and frames are numbered by their timestamps: a cut is
then found at the first decoded frame of the new scene, at most one frame late where non-reference frames stand
alone (x264's B-pyramid; exact where the encoder put a key or P frame at the cut, as x264's scene-cut detection
does). `every_frame=True` decodes and looks at every frame (exact cut frames). A file that cannot be decoded, or
that ends before a frame its line lists, raises MediaError with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from cogvx_mega.data.manifest import MediaError, _import_av

DETECTORS = ("content", "adaptive")
AESTHETIC_BATCH = 16


@dataclass(frozen=True)
class ShotOptions:
    """How cuts are found (PySceneDetect's detectors and their defaults)."""

    detector: str = "content"
    threshold: float = 27.0
    """ContentDetector: the mean HSV change (0-255) between two frames that makes a cut."""
    adaptive_threshold: float = 3.0
    """AdaptiveDetector: how many times its neighbours' mean change a frame's change must be."""
    min_content_val: float = 15.0
    """AdaptiveDetector: the least change that can make a cut at all."""
    min_scene_frames: int = 15
    """Cuts closer than this are merged (PySceneDetect's min_scene_len)."""
    detect_width: int = 256

    def detector_for(self, fps: float):
        try:
            from scenedetect import AdaptiveDetector, ContentDetector
        except ImportError as error:  # pragma: no cover - depends on the extra
            raise MediaError("shot detection needs PySceneDetect: pip install -e .[data]") from error
        if self.detector == "adaptive":
            return AdaptiveDetector(adaptive_threshold=self.adaptive_threshold, min_content_val=self.min_content_val,
                                    min_scene_len=self.min_scene_frames)
        return ContentDetector(threshold=self.threshold, min_scene_len=self.min_scene_frames)


@dataclass
class Span:
    """One manifest line's frames [first, last) in its file, what is wanted of them, and what was found."""

    first: int
    last: int
    detect: bool = False
    pair_starts: tuple[int, ...] = ()
    """Motion: the sample points; each is scored on the first decoded frame at or after it and the next one."""
    aesthetic_frames: tuple[int, ...] = ()
    cuts: list[int] = field(default_factory=list)
    """The first frame of every shot but the first (first < cut < last)."""
    motion: dict[int, tuple[int, int, float]] = field(default_factory=dict)
    """sample point -> (first frame, second frame, motion per source frame) of its pair."""
    aesthetic: dict[int, float] = field(default_factory=dict)
    """aesthetic frame wanted -> the score of the frame looked at for it (the first decoded at or after it)."""

    def shots(self) -> list[tuple[int, int]]:
        bounds = [self.first, *sorted(c for c in set(self.cuts) if self.first < c < self.last), self.last]
        return list(zip(bounds[:-1], bounds[1:]))

    def motion_between(self, first: int, last: int) -> Optional[float]:
        """The mean motion of the pairs that lie inside frames [first, last) (None if none does)."""
        values = [v for a, b, v in self.motion.values() if first <= a and b < last]
        return float(np.mean(values)) if values else None

    def aesthetic_between(self, first: int, last: int) -> Optional[float]:
        values = [v for n, v in self.aesthetic.items() if first <= n < last]
        return float(np.mean(values)) if values else None


def frame_range(record: dict) -> tuple[int, int]:
    """[first, last) source frames of a manifest line, read as `decode.frame_indices` reads start/end."""
    fps, frames = float(record["fps"]), int(record["frames"])
    start, end = record.get("start"), record.get("end")
    first = int(math.floor((start or 0.0) * fps + 1e-9))
    last = frames if end is None else min(frames, int(math.ceil(end * fps - 1e-9)))
    return first, last


def pair_starts(first: int, last: int, fps: float, motion_fps: float) -> tuple[int, ...]:
    """The motion sample points of [first, last): one every fps / motion_fps frames, the first half a step in, each
    with room for its pair (n, n + 1) before `last`; at least one when the range holds a pair."""
    if last - first < 2:
        return ()
    step = max(1.0, fps / motion_fps)
    starts = []
    k = 0
    while True:
        n = first + int(math.floor((k + 0.5) * step))
        if n + 1 >= last:
            break
        starts.append(n)
        k += 1
    return tuple(starts) or (first,)


def spread_frames(first: int, last: int, count: int) -> tuple[int, ...]:
    """`count` frames spread over [first, last): the middles of `count` equal parts."""
    if last <= first:
        return ()
    return tuple(sorted({first + int((k + 0.5) * (last - first) / count) for k in range(count)}))


@dataclass(frozen=True)
class View:
    """A downscaled copy of a frame: `size` pixels of the short side (or of the width, `by_width`), never upscaled,
    even, a multiple of `multiple`; `format` a PyAV pixel format ('bgr24', 'rgb24', 'gray')."""

    size: int
    format: str
    by_width: bool = False
    multiple: int = 2

    def shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the view of a height x width frame."""
        scale = min(1.0, self.size / (width if self.by_width else min(height, width)))
        m = self.multiple
        return max(m, int(round(height * scale / m)) * m), max(m, int(round(width * scale / m)) * m)


def analyze_file(path: str, fps: float, spans: Sequence[Span], shots: Optional[ShotOptions] = None,
                 motion=None, aesthetic=None, backend: str = "pyav", device: str = "cpu",
                 every_frame: bool = False) -> None:
    """Decode `path` once and fill each span's `cuts` (spans with `detect`), `motion` (with a motion scorer, see
    `scores.FarnebackMotion`) and `aesthetic` (with an aesthetic scorer). MediaError when the file cannot be
    decoded or ends before a frame a span needs."""
    end = max(span.last for span in spans)
    views: dict[str, View] = {}
    if shots is not None and any(span.detect for span in spans):
        views["detect"] = View(shots.detect_width, "bgr24", by_width=True)
    if motion is not None:
        views["motion"] = View(motion.side, motion.view_format, multiple=8)
    if aesthetic is not None:
        views["aesthetic"] = View(aesthetic.side, "rgb24")
    detectors = {id(span): shots.detector_for(fps) for span in spans if span.detect and shots is not None}
    detecting = [span for span in spans if id(span) in detectors]
    points = sorted({n for span in spans for n in span.pair_starts}) if motion is not None else []
    targets = sorted({n for span in spans for n in span.aesthetic_frames}) if aesthetic is not None else []
    state = {"point": 0, "target": 0}
    held: list = []  # motion: (sample points, frame number, image) of a pair's first frame until its second comes
    pairs: dict[int, tuple[int, int, float]] = {}
    pictures: dict[int, np.ndarray] = {}  # aesthetic target -> the image looked at for it, until scored
    looks: dict[int, float] = {}  # aesthetic target -> its score

    def score_pictures() -> None:  # a batch at a time: a long file's shots never hold all their pictures
        order = sorted(pictures)
        looks.update(zip(order, aesthetic([pictures.pop(n) for n in order])))

    def wanted(n: int) -> tuple[str, ...]:
        kinds = []
        if detecting and any(span.first <= n < span.last for span in detecting):
            kinds.append("detect")
        if held or (state["point"] < len(points) and points[state["point"]] <= n):
            kinds.append("motion")
        if state["target"] < len(targets) and targets[state["target"]] <= n:
            kinds.append("aesthetic")
        return tuple(kinds)

    if detectors:
        from scenedetect import FrameTimecode  # there: detector_for found PySceneDetect

    decoded = -1
    source = dali_frames(path, end, wanted, views, device) if backend == "dali-gpu" else \
        pyav_frames(path, end, wanted, views, fps, every_frame)
    for n, images in source:
        decoded = n
        if "detect" in images:
            for span in detecting:
                if span.first <= n < span.last:
                    cuts = detectors[id(span)].process_frame(FrameTimecode(n, fps), images["detect"])
                    span.cuts.extend(cut.frame_num for cut in cuts)
        if "motion" in images:
            if held:
                covered, first, image = held.pop()
                value = motion(image, images["motion"]) / (n - first)
                for point in covered:
                    pairs[point] = (first, n, value)
            covered = []
            while state["point"] < len(points) and points[state["point"]] <= n:
                covered.append(points[state["point"]])
                state["point"] += 1
            if covered:
                held.append((covered, n, images["motion"]))
        if "aesthetic" in images:
            while state["target"] < len(targets) and targets[state["target"]] <= n:
                pictures[targets[state["target"]]] = images["aesthetic"]
                state["target"] += 1
            if len(pictures) >= AESTHETIC_BATCH:
                score_pictures()
    # skipped frames can end the range early: a stream that stops more than a few frames short is cut off
    if decoded + 1 < end - (0 if every_frame or backend == "dali-gpu" else 4):
        raise MediaError(f"decoding stopped at frame {decoded + 1}, before frame {end} that its manifest line lists "
                         f"(the file ends early or is damaged)")
    for span in detecting:
        span.cuts.extend(cut.frame_num for cut in
                         detectors[id(span)].post_process(FrameTimecode(max(span.first, min(decoded, span.last - 1)),
                                                                        fps)))
    for span in spans:
        span.motion = {point: pairs[point] for point in span.pair_starts if point in pairs}
    if pictures:
        score_pictures()
    for span in spans:
        span.aesthetic = {n: looks[n] for n in span.aesthetic_frames if n in looks}


def pyav_frames(path: str, end: int, wanted: Callable[[int], tuple[str, ...]], views: dict[str, View],
                fps: float, every_frame: bool = False) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(n, {view name: image}) for the decoded frames n < end, with the views `wanted(n)` names (swscale's area
    downscale straight from the decoder's YUV). Every frame, numbered by its place in the sequence, with
    `every_frame`; else without the non-reference frames, numbered by timestamp (from the first frame's)."""
    av = _import_av()
    from av.video.reformatter import Interpolation, VideoReformatter

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "NONE"
            stream.thread_count = 1
            stream.codec_context.options = {"skip_loop_filter": "all"}
            if not every_frame:
                stream.codec_context.skip_frame = "NONREF"
            reformatters = {kind: VideoReformatter() for kind in views}  # one each: swscale keeps its setup
            shapes: dict[str, tuple[int, int]] = {}
            origin, previous = None, -1
            for place, frame in enumerate(container.decode(stream)):
                if every_frame or frame.pts is None or frame.time_base is None:
                    n = place if every_frame else previous + 1
                else:
                    origin = frame.pts if origin is None else origin
                    n = max(previous + 1, int(round(float((frame.pts - origin) * frame.time_base) * fps)))
                previous = n
                if n >= end:
                    break
                images = {}
                for kind in wanted(n):
                    if kind not in shapes:
                        shapes[kind] = views[kind].shape(frame.height, frame.width)
                    height, width = shapes[kind]
                    images[kind] = reformatters[kind].reformat(frame, width=width, height=height,
                                                               format=views[kind].format,
                                                               interpolation=Interpolation.AREA).to_ndarray()
                yield n, images
    except MediaError:
        raise
    except (av.error.FFmpegError, ValueError) as error:
        raise MediaError(f"decoding failed ({type(error).__name__}: {error})") from None


def dali_frames(path: str, end: int, wanted: Callable[[int], tuple[str, ...]], views: dict[str, View],
                device: str = "cuda", chunk: int = 32) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """`pyav_frames` through DALI on the GPU: frames decoded by NVDEC `chunk` at a time (`decode.DaliVideoDecoder`),
    the views downscaled there (area) and only they copied to the host. Written, not yet run on a GPU."""
    import cv2
    import torch
    import torch.nn.functional as F

    from cogvx_mega.data.decode import DaliVideoDecoder

    for begin in range(0, end, chunk):
        numbers = list(range(begin, min(end, begin + chunk)))
        frames = DaliVideoDecoder.decode(path, numbers, device)  # uint8 [T, H, W, 3] RGB on the GPU
        height, width = frames.shape[1:3]
        for i, n in enumerate(numbers):
            images = {}
            for kind in wanted(n):
                shape = views[kind].shape(height, width)
                picture = F.interpolate(frames[i].permute(2, 0, 1)[None].float(), size=shape, mode="area")
                rgb = picture[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
                fmt = views[kind].format
                images[kind] = rgb if fmt == "rgb24" else cv2.cvtColor(
                    rgb, cv2.COLOR_RGB2BGR if fmt == "bgr24" else cv2.COLOR_RGB2GRAY)
            yield n, images
