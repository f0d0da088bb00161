"""The manifest of a video/image collection: `cogvx data scan DIR --output manifest.jsonl`.

Every file under DIR (or every path of a list) is probed in parallel workers: container, codec, frame
rate, frame count, width x height. Images (PNG, JPEG, WebP, BMP) are 1-frame clips. A file that cannot
be read (empty, truncated, not media at all) or has no caption is reported with its path and reason,
counted, and never written. A manifest line is one clip:
`{"path", "caption", "kind", "container", "codec", "fps", "frames", "width", "height"}` plus optional
`"start"` / `"end"` (seconds) for a clip cut from a longer file.

Captions come from a sidecar `.txt` beside the file (`clip.mp4` -> `clip.txt`) or from `--captions`, a
JSONL (`{"path": ..., "caption": ...}` per line) or CSV (columns `path,caption`) file; paths there are
absolute or relative to DIR. Every caption file is read as UTF-8 (a byte-order mark is dropped). A sidecar that
is not valid UTF-8 is not guessed at or patched with replacement characters (a caption of mangled words would
train silently on the wrong text): its clip is skipped and reported with the byte and its offset, like an
unreadable video, and the scan goes on; a `--captions` file that is not UTF-8 is one clear error.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from cogvx_mega.files import IMAGE_SUFFIXES, VIDEO_SUFFIXES

logger = logging.getLogger(__name__)

MEDIA_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES


class MediaError(ValueError):
    """A file that cannot be used: the message is the reason (the path travels beside it)."""


@dataclass
class ClipRecord:
    path: str
    caption: str
    kind: str
    """'video' or 'image' (a 1-frame clip)."""
    container: str
    codec: str
    fps: Optional[float]
    frames: int
    width: int
    height: int
    start: Optional[float] = None
    end: Optional[float] = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None or k not in ("start", "end")})


@dataclass
class ScanFailure:
    path: str
    reason: str


def _import_av():
    try:
        import av
    except ImportError as error:  # pragma: no cover - depends on the extra
        raise MediaError("probing video needs PyAV: pip install -e .[video]") from error
    return av


def probe_image(path: Path) -> dict:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()  # checks the file's structure without decoding all of it
        with Image.open(path) as image:
            image.load()  # a truncated image fails here
            width, height = image.size
            container = (image.format or path.suffix.lstrip(".")).lower()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise MediaError(f"not a readable image ({error})") from None
    return {"kind": "image", "container": container, "codec": container, "fps": None, "frames": 1,
            "width": width, "height": height}


def probe_video(path: Path) -> dict:
    """Container, codec, fps, size and the frame count, found by demuxing every packet (no decoding) and
    decoding the first frame: a file truncated after its index has fewer packets than its index claims."""
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else None
            width, height = stream.codec_context.width, stream.codec_context.height
            claimed = stream.frames
            packets = 0
            first = None
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                packets += 1
                if first is None:
                    for frame in packet.decode():
                        first = frame
                        break
            if first is None:
                for frame in stream.codec_context.decode(None):  # frames held back by the decoder
                    first = frame
                    break
            format_name = container.format.name.split(",")[0]
    except MediaError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise MediaError(f"not a readable video ({type(error).__name__}: {error})") from None
    if first is None or packets == 0:
        raise MediaError("no decodable frame")
    if claimed and packets < claimed:
        raise MediaError(f"truncated: {packets} of the {claimed} frames its index lists are present")
    if not fps:
        raise MediaError("no frame rate")
    return {"kind": "video", "container": format_name, "codec": codec, "fps": round(fps, 6), "frames": packets,
            "width": width or first.width, "height": height or first.height}


def probe_media(path: str | Path) -> dict:
    """The media fields of one file; MediaError (the reason) when it cannot be used."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise MediaError(f"cannot be read ({error.strerror})") from None
    if size == 0:
        raise MediaError("empty file (0 bytes)")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return probe_image(path)
    return probe_video(path)


def read_captions(file: str | Path, root: Optional[Path] = None) -> dict[str, str]:
    """path -> caption from a JSONL or CSV captions file (relative paths are taken relative to `root`)."""
    from cogvx_mega.config.errors import ConfigError

    file = Path(file)
    if not file.is_file():
        raise ConfigError("--captions", str(file), "no such file; pass a JSONL or CSV file of (path, caption)")
    rows: list[tuple[str, str]] = []
    try:
        text = read_utf8(file)
    except MediaError as error:
        raise ConfigError("--captions", str(file), str(error)) from None
    number = 0
    try:
        if file.suffix.lower() == ".csv":
            reader = csv.DictReader(text.splitlines())
            if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
                raise ConfigError("--captions", str(file), "a CSV captions file needs the columns path,caption")
            rows = [(row["path"], row["caption"]) for row in reader]
        else:
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    item = json.loads(line)
                    rows.append((item["path"], item["caption"]))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigError("--captions", str(file), f"line {number} is not a JSON object with path and caption "
                                                   f"({error})") from None
    base = root or file.parent
    return {str((base / path).resolve()) if not os.path.isabs(path) else str(Path(path).resolve()): caption
            for path, caption in rows}


def find_media(root: Path, part: int = 0, parts: int = 1) -> list[Path]:
    """Media files under `root` by suffix, sorted by path; with `parts` > 1 only those of part `part` (a stable
    hash of the path relative to `root` decides, so each of `parts` scanning tasks holds its share of the paths
    and no task the whole list)."""
    found = []
    for folder, folders, files in os.walk(root):
        folders.sort()
        for name in files:
            if os.path.splitext(name)[1].lower() not in MEDIA_SUFFIXES:
                continue
            path = Path(folder) / name
            if parts > 1 and zlib.crc32(str(path.relative_to(root)).encode()) % parts != part:
                continue
            if path.is_file():
                found.append(path)
    return sorted(found)


def merge_manifests(parts: Sequence[Path], output: Path) -> int:
    """One manifest of the lines of `parts` (each sorted by path, as `scan` writes them), merged in path order
    without holding them: the manifest a single scan of the folder would write, whatever the number of parts.
    Written atomically; returns the lines written."""
    import heapq

    from cogvx_mega.checkpoint.atomic import hidden_sibling

    files = [open(part, encoding="utf-8") for part in parts]
    tmp = hidden_sibling(output, ".tmp-")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for line in heapq.merge(*files, key=lambda line: json.loads(line)["path"]):
                out.write(line)
                count += 1
        os.replace(tmp, output)
    finally:
        for file in files:
            file.close()
        tmp.unlink(missing_ok=True)
    return count


def read_utf8(file: Path) -> str:
    """The text of a UTF-8 file (a byte-order mark dropped); MediaError naming the first bad byte otherwise."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MediaError(f"{file.name} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                         f"save it as UTF-8") from None


def caption_for(path: Path, captions: dict[str, str]) -> Optional[str]:
    """The caption of a media file: from `captions`, else its sidecar .txt; None when there is none. MediaError
    when the sidecar cannot be read as UTF-8 (the clip is skipped, see the module)."""
    caption = captions.get(str(path.resolve()))
    if caption is None:
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            try:
                caption = read_utf8(sidecar).strip()
            except MediaError as error:
                raise MediaError(f"its caption sidecar {error}") from None
            except OSError as error:
                raise MediaError(f"its caption sidecar {sidecar.name} cannot be read ({error.strerror})") from None
    return caption if caption else None


def scan(paths: Iterable[Path], captions: Optional[dict[str, str]] = None, workers: int = 8,
         progress: bool = True) -> tuple[list[ClipRecord], list[ScanFailure]]:
    """Probe every path in parallel; returns the usable clips (in the order given) and the failures."""
    paths = list(paths)
    captions = captions or {}

    def one(path: Path):
        try:
            caption = caption_for(path, captions)
            fields = probe_media(path)
        except MediaError as error:
            return ScanFailure(str(path), str(error))
        if caption is None:
            return ScanFailure(str(path), "no caption (no sidecar .txt and not in --captions)")
        return ClipRecord(path=str(path.resolve()), caption=caption, **fields)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="scan", unit="file", dynamic_ncols=True)
    results = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PyAV and Pillow release the GIL in C
        for result in pool.map(one, paths):
            results.append(result)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    records = [r for r in results if isinstance(r, ClipRecord)]
    failures = [r for r in results if isinstance(r, ScanFailure)]
    return records, failures


def write_manifest(records: list[ClipRecord], path: str | Path) -> Path:
    """One JSON line per clip, written atomically (a temporary sibling renamed into place)."""
    from cogvx_mega.checkpoint.atomic import write_text_atomically

    return write_text_atomically(path, "".join(record.to_json() + "\n" for record in records))


def read_manifest(path: str | Path) -> list[dict]:
    from cogvx_mega.config.errors import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError("--manifest", str(path), "no such file; write one with `cogvx data scan DIR --output M`")
    lines = []
    try:
        text = read_utf8(file)
    except MediaError as error:
        raise ConfigError("--manifest", str(path), str(error)) from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            lines.append(parse_manifest_line(line, number, path))
    return lines


def parse_manifest_line(line: str | bytes, number: int, path) -> dict:
    """One manifest line as a dict; a ConfigError naming the line when it is not a JSON object. (The clip index
    calls it to name the line pyarrow's reader could not parse.)"""
    from cogvx_mega.config.errors import ConfigError

    try:
        item = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError("--manifest", str(path), f"line {number} is not JSON ({error})") from None
    if not isinstance(item, dict):
        raise ConfigError("--manifest", str(path), f"line {number} is not a JSON object (one clip a line)")
    return item


def read_clip_lines(path: str | Path, flag: str = "MANIFEST") -> list[dict]:
    """The lines of a manifest a curation command works through: at least one, each with a path (one
    ConfigError naming the line otherwise)."""
    from cogvx_mega.config.errors import ConfigError

    records = read_manifest(path)
    if not records:
        raise ConfigError(flag, str(path), "holds no clip")
    for number, record in enumerate(records, 1):
        if not isinstance(record.get("path"), str):
            raise ConfigError(flag, str(path), f"line {number} has no path")
    return records

