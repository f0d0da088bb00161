"""`cogvx data split MANIFEST --output M` and `cogvx data score MANIFEST --motion [--aesthetic HEAD ...]`: cut clips
into shots, and add score columns, over a manifest of any size (`cogvx_mega.data.shots`, `cogvx_mega.data.scores`).

Both take a manifest (`cogvx data scan`) and write one, atomically, in the order of its lines:

- split: every video line becomes one line per shot that is long enough, with every column of the source line,
  `start`/`end` (seconds; `frames` stays the file's frame count, as the data path reads start/end within it) and
  `shot_frames`; a line that already has start/end is split within that range. A shot is kept when it fills the
  shortest video bucket of the config given (`--preset/--config`: `buckets.usable_frames` at data.fps), else when
  it lasts `--min-shot-seconds`; shorter ones are dropped and counted. With `--motion` each shot also gets its
  `motion_score` from the same decode. Image lines pass through.
- score: every line gets `motion_score` (videos) and/or `aesthetic_score` (videos and images) columns; the other
  columns are kept. Without --output the manifest is rewritten in place.

The lines of one file are done together, from one decode of it (a manifest split into shots of long files costs one
decode per file, not one per shot). Files go to `--workers` threads (PyAV, OpenCV and torch work outside the GIL),
and to parts: `--part I/N`, or the task's place under torchrun or in a SLURM job array (`data_scan.task_part`); a
file's lines all go to one part (a hash of its path). Each part appends every finished file to
`OUTPUT.<command>-parts/part-I-of-N.partial.jsonl` as it goes, so a killed run started again with the same command
does only the files not yet done; the last part to finish merges all parts into OUTPUT and removes the folder.

A file that cannot be decoded is one line on stderr (`skipped PATH: reason`), counted, and its lines are written
unchanged (no shots, no score column): nothing of the manifest is lost to a bad clip.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import os
import shutil
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cogvx_mega.checkpoint.atomic import hidden_sibling, write_text_atomically
from cogvx_mega.config.errors import ConfigError, refuse_existing_output
from cogvx_mega.data.manifest import IMAGE_SUFFIXES, MediaError
from cogvx_mega.data.shots import DETECTORS, ShotOptions, Span, analyze_file, frame_range, pair_starts, spread_frames
from cogvx_mega.tools.data_scan import claim_complete_parts, part_name, task_part

COUNTS = ("clips", "videos", "images", "failed", "shots", "dropped", "written", "motion", "aesthetic")


@dataclass
class CurationSummary:
    command: str
    clips: int = 0
    """Manifest lines read."""
    videos: int = 0
    images: int = 0
    failed: int = 0
    """Lines of files that could not be decoded (written unchanged)."""
    shots: int = 0
    """split: shots found."""
    dropped: int = 0
    """split: shots shorter than the minimum, not written."""
    written: int = 0
    motion: int = 0
    """Lines given a motion_score."""
    aesthetic: int = 0
    resumed: int = 0
    """Lines done by an earlier run of this task (and not again)."""
    seconds: float = 0.0
    """This run's time."""
    merged: bool = True
    """False for a part of a parallel run whose merge another task does."""

    def table(self) -> str:
        """The summary table printed at the end of a run."""
        done = self.clips - self.resumed
        rate = done / self.seconds if self.seconds > 0 else 0.0
        rows = [("clips read", self.clips), ("  videos", self.videos), ("  images", self.images)]
        if self.command == "split":
            rows += [("shots found", self.shots), ("short shots dropped", self.dropped)]
        if self.motion or self.command == "score":
            rows.append(("motion scored", self.motion))
        if self.aesthetic:
            rows.append(("aesthetic scored", self.aesthetic))
        rows += [("failed (written unchanged)", self.failed), ("lines written", self.written)]
        if self.resumed:
            rows.append(("done by an earlier run", self.resumed))
        rows += [("seconds (this run)", f"{self.seconds:.1f}"), ("clips/s (this run)", f"{rate:.2f}")]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"  {name:<{width}}  {value:>10}" for name, value in rows)


@dataclass
class SplitOptions:
    shots: ShotOptions = field(default_factory=ShotOptions)
    min_shot_seconds: float = 2.0
    min_video_frames: Optional[int] = None
    """From a config: the shortest video bucket's frames, which a shot must fill at `data_fps`."""
    data_fps: float = 8.0
    motion: Optional["MotionOptions"] = None
    every_frame: bool = False
    """Decode every frame (exact cut frames) rather than skip the non-reference ones (`shots` module)."""


@dataclass
class MotionOptions:
    fps: float = 2.0
    side: int = 128
    raft_weights: Optional[str] = None


@dataclass
class ScoreOptions:
    motion: Optional[MotionOptions] = None
    aesthetic: Optional[str] = None
    aesthetic_clip: Optional[str] = None
    aesthetic_frames: int = 3
    every_frame: bool = False


@dataclass
class GroupResult:
    """What one file's lines became: (line, shot, record) rows, skip lines, counts."""

    out: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def is_image(record: dict) -> bool:
    return (record.get("kind") == "image" or Path(record["path"]).suffix.lower() in IMAGE_SUFFIXES
            or int(record.get("frames") or 1) <= 1)


def make_motion(options: Optional[MotionOptions], device: str = "cpu"):
    if options is None:
        return None
    from cogvx_mega.data.scores import FarnebackMotion, RaftMotion

    if options.raft_weights:
        return RaftMotion(options.raft_weights, device, side=options.side)
    return FarnebackMotion(side=options.side)


def video_spans(items: list, result: GroupResult) -> list[tuple[int, dict, Span]]:
    """(line, record, span) of the video lines of one file; a line without a usable fps/frames is a failure."""
    spans = []
    for line, record in items:
        try:
            first, last = frame_range(record)
            fps = float(record["fps"])
        except (KeyError, TypeError, ValueError):
            result.out.append((line, 0, record))
            result.counts.update(failed=1, written=1)
            result.skipped.append((record["path"], f"line {line} has no fps and frame count (scan the file again)"))
            continue
        if last - first < 1 or fps <= 0:
            result.out.append((line, 0, record))
            result.counts.update(failed=1, written=1)
            result.skipped.append((record["path"], f"line {line} holds no frame (start/end outside the file)"))
            continue
        spans.append((line, record, Span(first, last)))
    return spans


def split_group(path: str, items: list, options: SplitOptions, motion=None, backend: str = "pyav",
                device: str = "cpu") -> GroupResult:
    """The shots of one file's lines (see the module)."""
    from cogvx_mega.data.buckets import usable_frames

    result = GroupResult()
    result.counts["clips"] = len(items)
    videos = []
    for line, record in items:
        if is_image(record):
            result.out.append((line, 0, record))
            result.counts.update(images=1, written=1)
        else:
            videos.append((line, record))
    spans = video_spans(videos, result)
    if not spans:
        return result
    result.counts["videos"] = len(spans)
    fps = float(spans[0][1]["fps"])
    for _, _, span in spans:
        span.detect = True
        if motion is not None:
            span.pair_starts = pair_starts(span.first, span.last, fps, options.motion.fps)
    try:
        analyze_file(path, fps, [span for _, _, span in spans], options.shots, motion, backend=backend,
                     device=device, every_frame=options.every_frame)
    except MediaError as error:
        return failed(result, path, error, spans)
    for line, record, span in spans:
        for number, (first, last) in enumerate(span.shots()):
            result.counts["shots"] += 1
            shot = dict(record)
            shot["start"] = record["start"] if first == span.first and record.get("start") is not None else first / fps
            shot["end"] = record["end"] if last == span.last and record.get("end") is not None else last / fps
            shot["shot_frames"] = last - first
            if options.min_video_frames is not None:
                long_enough = usable_frames(shot, options.data_fps) >= options.min_video_frames
            else:
                long_enough = (last - first) / fps >= options.min_shot_seconds - 1e-9
            if not long_enough:
                result.counts["dropped"] += 1
                continue
            if motion is not None:
                value = span.motion_between(first, last)
                if value is not None:
                    shot["motion_score"] = round(value, 4)
                    result.counts["motion"] += 1
            result.out.append((line, number, shot))
            result.counts["written"] += 1
    return result


def failed(result: GroupResult, path: str, error: Exception, spans: list) -> GroupResult:
    """A file that could not be decoded: its lines written unchanged, counted, one skip line."""
    for line, record, _ in spans:
        result.out.append((line, 0, record))
    result.counts.update(failed=len(spans), written=len(spans))
    result.skipped.append((path, str(error)))
    return result


def score_group(path: str, items: list, options: ScoreOptions, motion=None, aesthetic=None, backend: str = "pyav",
                device: str = "cpu") -> GroupResult:
    """The score columns of one file's lines (see the module)."""
    result = GroupResult()
    result.counts["clips"] = len(items)
    images, videos = [], []
    for line, record in items:
        (images if is_image(record) else videos).append((line, record))
    result.counts["images"] = len(images)
    for line, record in images:  # no motion in a still; the aesthetic score of the image itself
        if aesthetic is not None:
            try:
                picture = still_picture(record)
            except MediaError as error:
                result.out.append((line, 0, record))
                result.counts.update(failed=1, written=1)
                result.skipped.append((record["path"], str(error)))
                continue
            record = {**record, "aesthetic_score": round(aesthetic([picture])[0], 4)}
            result.counts["aesthetic"] += 1
        result.out.append((line, 0, record))
        result.counts["written"] += 1
    spans = video_spans(videos, result)
    if not spans:
        return result
    result.counts["videos"] = len(spans)
    fps = float(spans[0][1]["fps"])
    for _, _, span in spans:
        if motion is not None:
            span.pair_starts = pair_starts(span.first, span.last, fps, options.motion.fps)
        if aesthetic is not None:
            span.aesthetic_frames = spread_frames(span.first, span.last, options.aesthetic_frames)
    try:
        analyze_file(path, fps, [span for _, _, span in spans], None, motion, aesthetic, backend=backend,
                     device=device, every_frame=options.every_frame)
    except MediaError as error:
        return failed(result, path, error, spans)
    for line, record, span in spans:
        record = dict(record)
        if motion is not None:
            value = span.motion_between(span.first, span.last)
            if value is not None:
                record["motion_score"] = round(value, 4)
                result.counts["motion"] += 1
        if aesthetic is not None:
            value = span.aesthetic_between(span.first, span.last)
            if value is not None:
                record["aesthetic_score"] = round(value, 4)
                result.counts["aesthetic"] += 1
        result.out.append((line, 0, record))
        result.counts["written"] += 1
    return result


def still_picture(record: dict):
    """An image line's picture, RGB uint8 [H, W, 3]."""
    from cogvx_mega.data.decode import decode_image, open_media

    try:
        return decode_image(open_media(record))[0].numpy()
    except OSError as error:
        raise MediaError(f"cannot be read ({error})") from None


def curation_backend(device: str) -> str:
    """'dali-gpu' for a CUDA device where DALI is installed, else 'pyav' (CPU). Also holds OpenCV to one thread: the
    worker threads are the parallelism (one file each), and OpenCV's own threads would only contend with them."""
    import cv2

    from cogvx_mega.data.decode import dali_available

    cv2.setNumThreads(1)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device", device, "no CUDA GPU is visible here; use --device cpu")
        return "dali-gpu" if dali_available() else "pyav"
    return "pyav"


def split_manifest(manifest: str, output: str, options: SplitOptions, workers: int = 1, overwrite: bool = False,
                   part: Optional[tuple[int, int]] = None, device: str = "cpu",
                   progress: bool = True) -> CurationSummary:
    """`cogvx data split` (see the module)."""
    refuse_existing_output("--output", output, overwrite)
    if options.shots.detector not in DETECTORS:
        raise ConfigError("--detector", options.shots.detector, f"use one of {', '.join(DETECTORS)}")
    options.shots.detector_for(25.0)  # PySceneDetect is there: once here, not as a failure of every file
    backend = curation_backend(device)
    motion = make_motion(options.motion, device)
    settings = {"detector": dataclasses.asdict(options.shots), "min_shot_seconds": options.min_shot_seconds,
                "min_video_frames": options.min_video_frames, "data_fps": options.data_fps,
                "motion": dataclasses.asdict(options.motion) if options.motion else None,
                "every_frame": options.every_frame}
    return curate("split", manifest, output, settings,
                  lambda path, items: split_group(path, items, options, motion, backend, device),
                  workers, part, progress)


def score_manifest(manifest: str, output: Optional[str], options: ScoreOptions, workers: int = 1,
                   overwrite: bool = False, part: Optional[tuple[int, int]] = None, device: str = "cpu",
                   progress: bool = True) -> CurationSummary:
    """`cogvx data score` (see the module); without `output` the manifest is rewritten in place."""
    if options.motion is None and options.aesthetic is None:
        raise ConfigError("score", "nothing", "ask for a score: --motion and/or --aesthetic HEAD --aesthetic-clip DIR")
    if options.aesthetic is not None and not options.aesthetic_clip:
        raise ConfigError("--aesthetic-clip", None, "the aesthetic head needs the CLIP model it was trained on: pass "
                                                    "its local folder (e.g. clip-vit-large-patch14)")
    if output is not None and os.path.abspath(output) != os.path.abspath(manifest):
        refuse_existing_output("--output", output, overwrite)
    output = output or manifest
    backend = curation_backend(device)
    motion = make_motion(options.motion, device)
    aesthetic = None
    if options.aesthetic is not None:
        from cogvx_mega.data.scores import AestheticScorer

        aesthetic = AestheticScorer(options.aesthetic, options.aesthetic_clip, device)
    settings = {"motion": dataclasses.asdict(options.motion) if options.motion else None,
                "aesthetic": options.aesthetic, "aesthetic_clip": options.aesthetic_clip,
                "aesthetic_frames": options.aesthetic_frames, "every_frame": options.every_frame}
    return curate("score", manifest, output, settings,
                  lambda path, items: score_group(path, items, options, motion, aesthetic, backend, device),
                  workers, part, progress)


def parts_folder(output: str, command: str) -> Path:
    return Path(f"{output}.{command}-parts")


def read_part(manifest: str, index: int, count: int) -> dict[str, list[tuple[int, dict]]]:
    """path -> [(line number, record)] of this part's files, streamed from the manifest (a task holds its share)."""
    file = Path(manifest)
    if not file.is_file():
        raise ConfigError("MANIFEST", manifest, "no such file; write one with `cogvx data scan DIR --output M`")
    groups: dict[str, list[tuple[int, dict]]] = {}
    number = 0
    try:
        with open(file, encoding="utf-8-sig") as lines:
            for number, text in enumerate(lines, 1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ConfigError("MANIFEST", manifest, f"line {number} is not JSON ({error})") from None
                if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                    raise ConfigError("MANIFEST", manifest, f"line {number} is not a clip (a JSON object with a path)")
                if count > 1 and zlib.crc32(record["path"].encode()) % count != index:
                    continue
                groups.setdefault(record["path"], []).append((number, record))
    except UnicodeDecodeError as error:
        raise ConfigError("MANIFEST", manifest, f"line {number + 1} is not UTF-8 ({error.reason}); save it as UTF-8") \
            from None
    return groups


def load_partial(file: Path) -> list[dict]:
    """The files an earlier run of this task finished (one JSON line each); a last line cut by a kill is dropped
    (and cut from the file, so that appending goes on after the last whole line)."""
    if not file.is_file():
        return []
    data = file.read_bytes()
    entries, good = [], 0
    for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is a cut line (or nothing)
        try:
            entries.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        good += len(raw) + 1
    if good != len(data):
        with open(file, "r+b") as handle:
            handle.truncate(good)
    return entries


def check_same_run(folder: Path, name: str, command: str, manifest: str, settings: dict) -> None:
    """A part resumed must be of the same manifest and options as the run that began it; the first run records them."""
    stat = os.stat(manifest)
    record = {"command": command, "manifest": os.path.abspath(manifest), "size": stat.st_size,
              "mtime_ns": stat.st_mtime_ns, "options": settings}
    file = folder / f"{name}.options.json"
    if file.is_file():
        before = json.loads(file.read_text())
        if before != json.loads(json.dumps(record)):
            changed = [k for k in record if before.get(k) != json.loads(json.dumps(record[k]))]
            raise ConfigError("--output", str(folder), f"holds an interrupted {command} of another manifest or other "
                                                       f"options ({', '.join(changed)} differ); run the same command "
                                                       f"again to resume it, or delete the folder to start over")
        return
    write_text_atomically(file, json.dumps(record))


def curate(command: str, manifest: str, output: str, settings: dict, work: Callable[[str, list], GroupResult],
           workers: int, part: Optional[tuple[int, int]], progress: bool) -> CurationSummary:
    """Run `work` over this task's files, resumably, and merge the parts when all are written (see the module)."""
    started = time.perf_counter()
    index, count = part or task_part()
    if not 0 <= index < count:
        raise ConfigError("--part", f"{index}/{count}", "write I/N with 0 <= I < N")
    groups = read_part(manifest, index, count)
    folder, name = parts_folder(output, command), part_name(index, count)
    if (folder / f"{name}.json").is_file():  # this part was finished by an earlier run
        summary = CurationSummary(**json.loads((folder / f"{name}.json").read_text()))
        return merge_when_complete(command, output, count) or dataclasses.replace(summary, merged=False)
    folder.mkdir(parents=True, exist_ok=True)
    check_same_run(folder, name, command, manifest, settings)
    partial = folder / f"{name}.partial.jsonl"
    entries = load_partial(partial)
    done = {entry["path"] for entry in entries}
    for entry in entries:
        for path, reason in entry["skipped"]:
            print(f"skipped {path}: {reason} (an earlier run)", file=sys.stderr)
    resumed = sum(entry["counts"].get("clips", 0) for entry in entries)
    todo = [(path, items) for path, items in groups.items() if path not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(items) for items in groups.values()), initial=resumed, unit="clip",
                   desc=command if count == 1 else f"{command} part {index}/{count}", dynamic_ncols=True)
    write = bar.write if bar is not None else print
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        with open(partial, "a", encoding="utf-8") as out:
            futures = {pool.submit(work, path, items): path for path, items in todo}
            for future in as_completed(futures):
                result = future.result()
                path = futures[future]
                entry = {"path": path, "out": result.out, "skipped": result.skipped, "counts": dict(result.counts)}
                out.write(json.dumps(entry) + "\n")
                out.flush()
                entries.append(entry)
                for skipped_path, reason in result.skipped:
                    write(f"skipped {skipped_path}: {reason}", file=sys.stderr)
                if bar is not None:
                    bar.update(result.counts.get("clips", 0))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if bar is not None:
            bar.close()
    totals = Counter()
    for entry in entries:
        totals.update(entry["counts"])
    summary = CurationSummary(command, **{k: totals.get(k, 0) for k in COUNTS}, resumed=resumed,
                              seconds=time.perf_counter() - started)
    rows = sorted(((line, shot, record) for entry in entries for line, shot, record in entry["out"]),
                  key=lambda row: row[:2])
    write_text_atomically(folder / f"{name}.jsonl",
                          "".join(f"{line}\t{shot}\t{json.dumps(record)}\n" for line, shot, record in rows))
    write_text_atomically(folder / f"{name}.json", json.dumps(dataclasses.asdict(summary)))
    partial.unlink(missing_ok=True)
    return merge_when_complete(command, output, count) or dataclasses.replace(summary, merged=False)


def merge_when_complete(command: str, output: str, count: int) -> Optional[CurationSummary]:
    """Merge the n parts into `output` in manifest order when all are written and no other task has begun to (a
    claim file created exclusively decides; one part alone merges without it); the whole run's summary, or None
    when this task leaves the merge to another."""
    folder = parts_folder(output, command)
    parts = claim_complete_parts(folder, count)
    if parts is None:
        return None
    names = [part_name(i, count) for i in range(count)]
    summary = CurationSummary(command, **{k: sum(p[k] for p in parts) for k in (*COUNTS, "resumed")},
                              seconds=max(p["seconds"] for p in parts))
    files = [open(folder / f"{name}.jsonl", encoding="utf-8") for name in names]
    tmp = hidden_sibling(Path(output), ".tmp-")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for row in heapq.merge(*files, key=lambda row: tuple(int(v) for v in row.split("\t", 2)[:2])):
                out.write(row.split("\t", 2)[2])
        os.replace(tmp, output)
    finally:
        for file in files:
            file.close()
        tmp.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    return summary
