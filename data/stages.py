"""Progressive training (`data.stages`): the data changes at configured steps (resolution, buckets, source,
pack budget), e.g. 256px clips until step A, 512px until B, then 768px, images and videos mixed.

Stage k covers steps [start_k, end_k). Its dataset is opened when the run first reaches it and sees the
local step (step - start_k), so each stage's data order begins at its own epoch 0 and step s of a run is a
pure function of s: a run resumed inside or across a stage switch continues exactly. Each stage's table of
buckets (`accounting.training_bucket_table`) is logged when a training step opens it.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from cogvx_mega.data.accounting import first_rank, training_bucket_table

logger = logging.getLogger(__name__)


class StagedDataset:
    """`step_batch` dispatched to the stage holding the step. `stages`: [(start, end or None, open)] where
    `open()` builds that stage's dataset."""

    def __init__(self, stages: list[tuple[int, Optional[int], Callable]]):
        self.stages = stages
        self._open: Optional[tuple[int, object]] = None  # (stage index, dataset)
        self._saved: Optional[dict] = None  # a checkpoint's state of a stage's dataset, until that stage opens

    def stage_of(self, step: int) -> int:
        for index, (start, end, _) in enumerate(self.stages):
            if start <= step and (end is None or step < end):
                return index
        raise ValueError(f"step {step} is after the last data stage (ends at {self.stages[-1][1]})")

    def dataset_for(self, step: int):
        index = self.stage_of(step)
        if self._open is None or self._open[0] != index:
            self.close()
            start, end, open_stage = self.stages[index]
            logger.info("data stage %d: steps %d..%s", index, start, "end" if end is None else end - 1)
            self._open = (index, open_stage())
            load_state = getattr(self._open[1], "load_state_dict", None)
            if self._saved and self._saved.get("stage") == index and load_state is not None:
                load_state(self._saved["state"])
        return self._open[1]

    def state_dict(self) -> Optional[dict]:
        """The open stage's dataset state (a packed stage's pack counts), with the stage it belongs to."""
        state_of = getattr(self._open[1], "state_dict", None) if self._open else None
        state = state_of() if state_of is not None else None
        return {"stage": self._open[0], "state": state} if state else self._saved

    def load_state_dict(self, state: dict) -> None:
        self._saved = state

    def step_batch(self, step: int, slots: range, global_batch: int, seed: int) -> dict:
        before = self._open[0] if self._open else None
        dataset = self.dataset_for(step)
        if self._open[0] != before and first_rank():
            logger.info("%s", training_bucket_table(self, global_batch, step))
        stage = self._open[0]
        batch = dataset.step_batch(step - self.stages[stage][0], slots, global_batch, seed)
        return {**batch, "stage": stage}

    @property
    def skipped(self) -> int:
        return getattr(self._open[1], "skipped", 0) if self._open else 0

    def __len__(self) -> int:
        return len(self._open[1]) if self._open else 0

    def close(self) -> None:
        if self._open is not None:
            close = getattr(self._open[1], "close", None)
            if close is not None:
                close()
            self._open = None
