"""data.filters with a stage that tightens them (issue 28): every clip of every step passes its stage's filter,
and the run's losses equal those of manifests filtered by hand to the same clips; the counts are printed when a
stage opens and are in the metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogvx_mega.cli import main

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny-filters.yaml")
THRESHOLDS = [(0, 3, 0.2), (3, 6, 0.6)]  # the example's stages: (first step, end, motion_score minimum)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A manifest of the generated media, each file listed three times with another motion_score (lines are
    clips), a tiny VAE and T5."""
    from media import make_media_folder

    from cogvx_mega.data.tiny_models import make_tiny_t5, make_tiny_vae

    root = tmp_path_factory.mktemp("filters")
    make_media_folder(root / "media")
    assert main(["data", "scan", str(root / "media"), "--output", str(root / "scanned.jsonl")]) == 0
    lines = [json.loads(line) for line in (root / "scanned.jsonl").read_text().splitlines()]
    records = [{**line, "motion_score": round((3 * i + copy) / (3 * len(lines)), 3)}
               for copy in range(3) for i, line in enumerate(lines)]
    (root / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    make_tiny_vae(root / "vae")
    make_tiny_t5(root / "t5", captions=[r["caption"] for r in records])
    return root, records


def test_every_step_passes_its_stage_filter_and_equals_hand_filtered_manifests(scored, tmp_path, capsys):
    from cogvx_mega.config import load_config
    from cogvx_mega.tools.training_data import open_training_data

    root, records = scored
    online = ["--vae", str(root / "vae"), "--text-encoder", str(root / "t5")]
    assert main(["train", "--config", EXAMPLE, "--data", str(root / "scored.jsonl"), *online,
                 "--run-dir", str(tmp_path / "filtered")]) == 0
    logged = capsys.readouterr().err
    for _, _, minimum in THRESHOLDS:
        dropped = sum(1 for r in records if r["motion_score"] < minimum)
        assert f"filter motion_score >= {minimum}: {dropped} clips dropped" in logged
    rows = [json.loads(line) for line in (tmp_path / "filtered" / "metrics.jsonl").read_text().splitlines()]
    assert [row["data_clips_kept"] for row in rows] == [
        sum(1 for r in records if r["motion_score"] >= minimum) for start, end, minimum in THRESHOLDS
        for _ in range(start, end)]

    config = load_config(config_file=EXAMPLE, overrides=[f"data.source={root / 'scored.jsonl'}",
                                                         f"data.vae={root / 'vae'}", f"data.text_encoder={root / 't5'}"])
    data = open_training_data(config, global_batch=2)
    for start, end, minimum in THRESHOLDS:
        for step in range(start, end):
            stage = data.dataset_for(step)
            bucket, clips = stage.batch_of_step(step - start, 2, config.training.seed)
            scores = [stage.plan.clips[bucket][index]["motion_score"] for index in clips]
            assert all(score >= minimum for score in scores), (step, scores)
    data.close()

    by_hand = []  # the same stages, each reading a manifest filtered by hand
    for number, (_, _, minimum) in enumerate(THRESHOLDS):
        kept = [r for r in records if r["motion_score"] >= minimum]
        by_hand.append(tmp_path / f"stage{number}.jsonl")
        by_hand[-1].write_text("".join(json.dumps(r) + "\n" for r in kept))
    stages = json.dumps([{"until_step": 3, "source": str(by_hand[0])}, {"source": str(by_hand[1])}])
    assert main(["train", "--config", EXAMPLE, "--data", str(root / "scored.jsonl"), *online,
                 "--run-dir", str(tmp_path / "by_hand"), f"data.stages={stages}"]) == 0
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("filtered", "by_hand")}
    assert len(losses["filtered"]) == 6 and losses["filtered"] == losses["by_hand"]
