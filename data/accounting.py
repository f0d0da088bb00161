"""Where the clips of the training data go: the table of buckets (clips, and batches per epoch at the run's global
batch, or packs with data.packing) that `cogvx data encode`, `cogvx data info` and the start of training print,
and the one warning line naming the buckets whose clips are never trained on.

Every global batch of a bucketed dataset comes from one bucket, so a bucket holding fewer clips than the global
batch is never drawn. `data.small_buckets` decides what happens to such a bucket: `drop` leaves it out and says
so here; `merge` moves its clips to the nearest bucket that fills a global batch (`buckets.merge_small_buckets`)
when the clips are planned, which for a latent cache is when it is encoded. Packed data (data.packing) puts every
clip in a pack and leaves none out; a single-size dataset (a latent folder, synthetic data without buckets)
draws its batches from one stream of epochs and leaves none out either.
"""
from __future__ import annotations

from typing import Optional

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.buckets import Bucket, small_buckets
from cogvx_mega.data.order import ClipRange
from cogvx_mega.data.packing import PackPlan

DROP_FIX = ("set data.small_buckets=merge to train them at the nearest bucket that fills a global batch (a latent "
            "cache: re-encode with it), use data.packing, or lower training.global_batch_size")


def clips_text(count: int) -> str:
    return f"{count} clip" if count == 1 else f"{count} clips"


def first_rank() -> bool:
    """Whether this process reports for the run (rank 0, or no process group)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _rows_to_text(header: list[str], rows: list[list[str]], notes: list[str]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row, note in zip([header, *rows], ["", *notes]):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append(("  " + "  ".join(cells) + ("  " + note if note else "")).rstrip())
    return lines


def bucket_table(clips: dict[str, int], global_batch: int, *, packs: Optional[int] = None,
                 merged: Optional[dict[str, dict[str, int]]] = None, columns: Optional[dict[str, dict]] = None,
                 stream: bool = False, title: str = "data") -> str:
    """The table of buckets, as text (a title line, then one row per bucket and a total).

    `clips`: bucket -> clips the data holds; `global_batch`: clips per step (packs per step with `packs`);
    `packs`: the packs of an epoch (data.packing); `merged`: {small bucket: {bucket: clips moved there}} of
    data.small_buckets=merge; `columns`: more columns {title: {bucket: text}} (`cogvx data info`); `stream`: the
    data draws from one stream of epochs (a single-size dataset), which leaves no clip out."""
    merged = merged or {}
    columns = columns or {}
    names = list(clips) + [name for name in merged if name not in clips]
    total = sum(clips.values())
    header = ["bucket", "clips", *columns]
    if packs is None and not stream:
        header.append("batches/epoch")
    rows, notes = [], []
    received: dict[str, list[str]] = {}
    for small, targets in merged.items():
        for target, count in targets.items():
            received.setdefault(target, []).append(f"{count} from {small}")
    for name in names:
        count = clips.get(name, 0)
        row = [name, str(count), *(str(column.get(name, "")) for column in columns.values())]
        note = []
        if name in merged:
            note.append("merged into " + ", ".join(f"{t} ({clips_text(n)})" for t, n in merged[name].items()))
        if name in received:
            note.append("holds " + ", ".join(received[name]) + " (data.small_buckets=merge)")
        if packs is None and not stream:
            row.append(str(count // global_batch))
            if 0 < count < global_batch:
                note.append(f"never trained on: {clips_text(count)}, fewer than a global batch of {global_batch}")
            elif count % global_batch:
                note.append(f"each epoch leaves out {clips_text(count % global_batch)} at random (reshuffled every "
                            f"epoch)")
        rows.append(row)
        notes.append("; ".join(note))
    footer = ["total", str(total), *("" for _ in columns)]
    if packs is not None:
        summary = (f"{packs} packs an epoch ({packs / global_batch:.2f} steps of {global_batch} packs); every clip "
                   f"is in a pack")
        heading = f"{title}: {len(names)} bucket(s), packed (data.packing)"
    elif stream:
        summary = (f"one stream of epochs, {global_batch} clips a step ({total / global_batch:.2f} steps an epoch); "
                   f"no clip is left out")
        heading = f"{title}: one size of clip"
    else:
        per = sum(count // global_batch for count in clips.values())
        footer.append(str(per))
        unused = sum(count for count in clips.values() if 0 < count < global_batch)
        summary = (f"{unused} of {clips_text(total)} never trained on" if unused
                   else "every bucket fills a global batch")
        heading = f"{title}: {len(names)} bucket(s) at a global batch of {global_batch}"
    rows.append(footer)
    notes.append(summary)
    return "\n".join([heading + ":", *_rows_to_text(header, rows, notes)])


def config_bucket_table(clips: dict[str, int], config, global_batch: int, *,
                        merged: Optional[dict[str, dict[str, int]]] = None, columns: Optional[dict[str, dict]] = None,
                        title: str = "data") -> str:
    """`bucket_table` of clips planned or encoded under `config`: with data.packing, the packs of an epoch (each
    clip at its bucket's latent grid, packed as training would pack them); otherwise batches per epoch."""
    if not config.data.packing:
        return bucket_table(clips, global_batch, merged=merged, columns=columns, title=title)
    from cogvx_mega.model.packing import ClipShape, clip_tokens

    temporal, spatial = config.model.temporal_compression_ratio, config.data.spatial_compression_ratio
    text = config.model.max_text_seq_length
    groups = [(bucket, ClipRange(count), clip_tokens(config.model, ClipShape(
        *Bucket.parse(bucket).latent_grid(temporal, spatial), text))) for bucket, count in clips.items() if count]
    try:
        packs = len(PackPlan.of_groups(groups, config.data.pack_tokens, config.training.seed,
                                       config.data.pack_window).epoch_packs(0))
    except ConfigError as error:
        return f"{title}: no packs ({error})"
    return bucket_table(clips, global_batch, packs=packs, columns=columns, title=title)


def small_bucket_warning(clips: dict[str, int], global_batch: int, policy: str,
                         fix: str = DROP_FIX) -> Optional[str]:
    """One line naming each bucket that never fills a global batch and its clips (None when there is none)."""
    small = small_buckets(clips, global_batch)
    if not small:
        return None
    named = ", ".join(f"{name} ({clips_text(count)})" for name, count in small.items())
    return (f"data.small_buckets={policy}: {sum(small.values())} of {clips_text(sum(clips.values()))} never trained "
            f"on: bucket(s) {named} hold fewer clips than the global batch of {global_batch}; {fix}")


def training_bucket_table(dataset, global_batch: int, step: int = 0) -> str:
    """The bucket table of a training dataset (what `tools.training_data.open_training_data` returns) at the run's
    global batch, for the start of training; with data.stages, of the stage that trains `step` (opening it, as
    the step would)."""
    title = "data"
    if hasattr(dataset, "dataset_for"):  # progressive stages: the stage of `step`
        title = f"data stage {dataset.stage_of(step)}"
        dataset = dataset.dataset_for(step)
    if hasattr(dataset, "packs_per_epoch"):
        return bucket_table(dataset.bucket_clips(), global_batch, packs=dataset.packs_per_epoch(), title=title)
    return bucket_table(dataset.bucket_clips(), global_batch, merged=getattr(dataset, "merged", None),
                        stream=getattr(dataset, "streams_epochs", False), title=title)
