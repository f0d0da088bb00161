"""`cogvx data caption MANIFEST --model PATH --output OUT`: a dense caption of every clip in a new manifest column
(`--column`, default `dense_caption`; `caption` is never overwritten), written by a local vision-language model
(`cogvx_mega.data.captioning`: K frames captioned, then summarised).

Resumable and split over tasks as `cogvx data scan` is: task i of n (`--part I/N`, or its place under torchrun or in
a SLURM job array) captions the i-th contiguous block of manifest lines and appends each clip's result to
`OUT.parts/part-i-of-n.jsonl` as soon as its batch is done (flushed and synced): a killed task run again skips what
is there. The task that finds every part done merges them into OUT (the manifest's lines in order, each with its
caption column) and removes OUT.parts. OUT.parts/settings.json holds what the captions depend on (the manifest's
digest, the models, the prompts, the frame count); a run with other settings is refused rather than mixed in. A
clip that cannot be read is one line on stderr, counted, and kept in OUT without the column.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from cogvx_mega.tools.data_scan import claim_complete_parts, parse_part, part_name, parts_folder

HELP = ("caption every clip of a manifest with a local vision-language model (frames captioned, then summarised) "
        "into a new column")
RESERVED_COLUMNS = ("path", "caption", "kind", "container", "codec", "fps", "frames", "width", "height", "start",
                    "end", "member", "offset", "size")


@dataclass
class CaptionSummary:
    clips: int
    captioned: int
    """Clips that got a caption, by this run and earlier ones."""
    resumed: int
    """Clips found done in the parts (a killed run's work)."""
    unreadable: int
    empty: int = 0
    """Clips the model wrote an empty caption for (kept without the column)."""
    merged: bool = True
    """False for a part whose merge another task does."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="MANIFEST")
    parser.add_argument("--model", required=True,
                        help="local folder of a transformers image-text-to-text model and its processor")
    parser.add_argument("--output", required=True,
                        help="the manifest to write, with the caption column (work in progress: OUTPUT.parts)")
    parser.add_argument("--column", default="dense_caption", help="the column written (never 'caption')")
    parser.add_argument("--frames", type=int, default=4, help="frames captioned per clip, spread over start..end")
    parser.add_argument("--prompt", default=None, help="the prompt given with each frame")
    parser.add_argument("--summarize-model", default=None,
                        help="local folder of a text model that summarises the frame captions (default: the "
                             "captioning model, given the text alone)")
    parser.add_argument("--summary-prompt", default=None,
                        help="the summary's prompt; {count} and {captions} (a 'Frame k: ...' line each) are filled in")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=120, help="tokens of a frame caption at most")
    parser.add_argument("--summary-max-new-tokens", type=int, default=220, help="tokens of a summary at most")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: this task's GPU, else cpu)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="clips decoded in parallel ahead of the model")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--part", default=None, metavar="I/N",
                        help="caption part I of N (0-based) and merge when all are written; under torchrun or a SLURM "
                             "job array the task's place is used without this flag")


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.tools.data_dedup import summary_table

    part = parse_part(args.part) if args.part is not None else None
    summary = caption_manifest(
        args.manifest, args.output, args.model, column=args.column, frames=args.frames, prompt=args.prompt,
        summarize_model=args.summarize_model, summary_prompt=args.summary_prompt, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, summary_max_new_tokens=args.summary_max_new_tokens, device=args.device,
        workers=args.workers, overwrite=args.overwrite, part=part)
    rows = [("clips", summary.clips, "" if summary.merged else "of this part"),
            ("captioned", summary.captioned, f"column {args.column}"),
            ("resumed", summary.resumed, "done by an earlier run"),
            ("unreadable", summary.unreadable, f"kept without {args.column}" if summary.unreadable else "")]
    if summary.empty:
        rows.append(("empty", summary.empty, f"the model wrote nothing; kept without {args.column}"))
    if summary.merged:
        rows.append(("written", summary.clips, args.output))
        print(summary_table(f"caption of {args.manifest}", rows))
    else:
        print(summary_table(f"caption of {args.manifest}, this part", rows))
        print(f"the last part to finish writes {args.output}")
    return 0


def block(index: int, count: int, lines: int) -> range:
    """The manifest lines of part `index` of `count`: a contiguous block."""
    return range(index * lines // count, (index + 1) * lines // count)


def caption_manifest(manifest: str, output: str, model: str, column: str = "dense_caption", frames: int = 4,
                     prompt: Optional[str] = None, summarize_model: Optional[str] = None,
                     summary_prompt: Optional[str] = None, batch_size: int = 16, max_new_tokens: int = 120,
                     summary_max_new_tokens: int = 220, device: Optional[str] = None, workers: int = 4,
                     overwrite: bool = False, part: Optional[tuple[int, int]] = None,
                     progress: bool = True) -> CaptionSummary:
    """Caption this task's share of the manifest and merge when all parts are done (see the module). Checked before
    a model loads: the manifest, the flags, the output (refused if it exists, without `overwrite`), the parts'
    settings."""
    from cogvx_mega.config.errors import ConfigError, refuse_existing_output
    from cogvx_mega.data.captioning import DEFAULT_PROMPT, DEFAULT_SUMMARY_PROMPT, local_model_folder
    from cogvx_mega.data.manifest import read_clip_lines
    from cogvx_mega.tools.data_scan import task_part

    prompt = DEFAULT_PROMPT if prompt is None else prompt
    summary_prompt = DEFAULT_SUMMARY_PROMPT if summary_prompt is None else summary_prompt
    if column in RESERVED_COLUMNS or not column.strip():
        raise ConfigError("--column", column, "a manifest field of its own is never overwritten; name a new column, "
                                              "e.g. dense_caption")
    for flag, value in (("--frames", frames), ("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens),
                        ("--summary-max-new-tokens", summary_max_new_tokens), ("--workers", workers)):
        if value < 1:
            raise ConfigError(flag, value, "must be a positive integer")
    if frames > 1 and "{captions}" not in summary_prompt:
        raise ConfigError("--summary-prompt", summary_prompt, "put {captions} where the frame captions go")
    if os.path.abspath(manifest) == os.path.abspath(output):
        raise ConfigError("--output", output, "is the manifest read; write the captioned one to another file")
    refuse_existing_output("--output", output, overwrite)
    local_model_folder("--model", model)
    if summarize_model is not None:
        local_model_folder("--summarize-model", summarize_model)
    index, count = part or task_part()
    if not 0 <= index < count:
        raise ConfigError("--part", f"{index}/{count}", "write I/N with 0 <= I < N")
    records = read_clip_lines(manifest)
    folder = parts_folder(output)
    settings = {"manifest": hashlib.blake2b(Path(manifest).read_bytes(), digest_size=16).hexdigest(),
                "lines": len(records), "model": str(Path(model).resolve()),
                "summarize_model": str(Path(summarize_model).resolve()) if summarize_model else None,
                "column": column, "frames": frames, "prompt": prompt,
                "summary_prompt": summary_prompt if frames > 1 else None, "max_new_tokens": max_new_tokens,
                "summary_max_new_tokens": summary_max_new_tokens if frames > 1 else None, "parts": count}
    check_settings(output, settings)
    name = part_name(index, count)
    if (folder / f"{name}.json").is_file():  # done by an earlier run of this task
        done = CaptionSummary(**json.loads((folder / f"{name}.json").read_text()))
        done.resumed = done.clips
        return merge_when_complete(records, output, column, count) or done
    results = folder / f"{name}.jsonl"
    mine = block(index, count, len(records))
    finished = read_results(results, mine)
    todo = [line for line in mine if line not in finished]
    summary = CaptionSummary(clips=len(mine), captioned=0, resumed=len(finished), unreadable=0, merged=False)
    if todo:
        write_captions(records, todo, results, model, summarize_model, frames, prompt, summary_prompt, batch_size,
                       max_new_tokens, summary_max_new_tokens, device, workers,
                       progress=progress and (count == 1 or index == 0), done_before=len(finished),
                       total=len(mine), column=column)
        finished = read_results(results, mine)
    for result in finished.values():
        summary.captioned += "caption" in result
        summary.unreadable += "error" in result
        summary.empty += "empty" in result
    from cogvx_mega.checkpoint.atomic import write_text_atomically

    write_text_atomically(folder / f"{name}.json", json.dumps(asdict(summary)))
    return merge_when_complete(records, output, column, count) or summary


def check_settings(output: str, settings: dict) -> None:
    """The parts folder's settings: written by the first task (atomically, a link that fails if another task got
    there first); a run whose settings differ is refused."""
    from cogvx_mega.config.errors import ConfigError

    folder = parts_folder(output)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "settings.json"
    if not path.is_file():
        tmp = folder / f".settings-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(settings, indent=1))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    held = json.loads(path.read_text())
    differ = [key for key in settings if held.get(key) != settings[key]]
    if differ:
        raise ConfigError("--output", output, f"{folder} holds the work of a caption run with other "
                                              f"{', '.join(differ)}; run it again as it was to resume it, or delete "
                                              f"{folder} to start over")


def read_results(path: Path, lines: range) -> dict[int, dict]:
    """line -> result of the lines of `lines` found in a part's results file. A line a kill cut short (and whatever
    follows it) is cut off the file, so appending goes on from a whole line."""
    results: dict[int, dict] = {}
    if not path.is_file():
        return results
    keep = 0
    with open(path, "rb") as file:
        for raw in file:
            if not raw.endswith(b"\n"):
                break
            try:
                result = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            keep += len(raw)
            if isinstance(result, dict) and result.get("line") in lines:
                results[result["line"]] = result
    if keep != path.stat().st_size:
        os.truncate(path, keep)
    return results


def decoded_ahead(pool, function, items: list, ahead: int) -> Iterator[tuple[object, object]]:
    """(item, function(item) or the MediaError it raised), in order, at most `ahead` of them decoding at once."""
    from collections import deque

    from cogvx_mega.data.manifest import MediaError

    def safe(item):
        try:
            return function(item)
        except MediaError as error:
            return error
        except OSError as error:
            return MediaError(f"cannot be read ({error.strerror or error})")

    pending = deque()
    position = 0
    while position < len(items) or pending:
        while position < len(items) and len(pending) < ahead:
            pending.append((items[position], pool.submit(safe, items[position])))
            position += 1
        item, future = pending.popleft()
        yield item, future.result()


def write_captions(records: list[dict], todo: list[int], results: Path, model: str, summarize_model: Optional[str],
                   frames: int, prompt: str, summary_prompt: str, batch_size: int, max_new_tokens: int,
                   summary_max_new_tokens: int, device: Optional[str], workers: int, progress: bool,
                   done_before: int, total: int, column: str) -> None:
    """Caption the lines `todo`, appending one result line per clip to `results` as each group of clips is done."""
    from concurrent.futures import ThreadPoolExecutor

    from cogvx_mega.config.errors import ConfigError
    from cogvx_mega.data.captioning import FrameCaptioner, TextSummarizer, summary_prompt as fill_summary
    from cogvx_mega.data.decode import media_name
    from cogvx_mega.data.dedup import sample_frames
    from cogvx_mega.data.manifest import MediaError

    captioner = FrameCaptioner(model, device)
    summarizer = TextSummarizer(summarize_model, captioner.device) if summarize_model else None
    if frames > 1 and summarizer is None and not captioner.chat:
        raise ConfigError("--model", model, "has no chat template, so it cannot summarise the frame captions; pass "
                                            "--summarize-model, or --frames 1")
    summarise = (summarizer or captioner).complete
    clips_at_once = max(1, batch_size // frames)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done_before, desc="caption", unit="clip", dynamic_ncols=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool, open(results, "a", encoding="utf-8") as out:
            stream = decoded_ahead(pool, lambda line: sample_frames(records[line], frames), todo,
                                   ahead=max(2 * clips_at_once, workers))
            while True:
                group = [item for _, item in zip(range(clips_at_once), stream)]
                if not group:
                    break
                lines = []
                for line, decoded in group:
                    if isinstance(decoded, MediaError):
                        print(f"unreadable {media_name(records[line])}: {decoded} (kept without {column})",
                              file=sys.stderr)
                        lines.append({"line": line, "path": records[line]["path"], "error": str(decoded)})
                good = [(line, images) for line, images in group if not isinstance(images, MediaError)]
                images = [image for _, clip in good for image in clip]
                captions = []
                for start in range(0, len(images), batch_size):
                    captions += captioner.caption(images[start:start + batch_size], prompt, max_new_tokens)
                per_clip, position = [], 0
                for line, clip in good:
                    per_clip.append(captions[position:position + len(clip)])
                    position += len(clip)
                several = [k for k, (_, clip) in enumerate(good) if len(clip) > 1]
                summaries = {}
                prompts = [fill_summary(summary_prompt, per_clip[k]) for k in several]
                for start in range(0, len(prompts), batch_size):
                    for k, text in zip(several[start:start + batch_size],
                                       summarise(prompts[start:start + batch_size], summary_max_new_tokens)):
                        summaries[k] = text
                for k, (line, _) in enumerate(good):
                    caption = summaries.get(k, per_clip[k][0])
                    result = {"line": line, "path": records[line]["path"], "frames": per_clip[k]}
                    result.update({"caption": caption} if caption else {"empty": True})
                    lines.append(result)
                lines.sort(key=lambda result: result["line"])
                out.write("".join(json.dumps(result) + "\n" for result in lines))
                out.flush()
                os.fsync(out.fileno())
                if bar is not None:
                    bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()


def merge_when_complete(records: list[dict], output: str, column: str, count: int) -> Optional[CaptionSummary]:
    """Write OUTPUT from the parts when all are done and no other task has begun to (a claim file created
    exclusively decides); the whole run's summary, or None when this task leaves the merge to another."""
    from cogvx_mega.checkpoint.atomic import hidden_sibling

    folder = parts_folder(output)
    totals = claim_complete_parts(folder, count)
    if totals is None:
        return None
    names = [part_name(i, count) for i in range(count)]
    summary = CaptionSummary(**{key: sum(t[key] for t in totals)
                                for key in ("clips", "captioned", "resumed", "unreadable", "empty")})
    target = Path(output)
    tmp = hidden_sibling(target, ".tmp-")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for index, name in enumerate(names):
                lines = block(index, count, len(records))
                results = read_results(folder / f"{name}.jsonl", lines)
                missing = [line for line in lines if line not in results]
                if missing:
                    raise RuntimeError(f"{folder / name}.jsonl lacks manifest line {missing[0] + 1}; delete {folder} "
                                       f"and caption again")
                for line in lines:
                    record = records[line]
                    result = results[line]
                    if "caption" in result:
                        record = {**record, column: result["caption"]}
                    out.write(json.dumps(record) + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    return summary
