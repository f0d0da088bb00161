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
    for number, record in enumerate(records):  # a dense caption on two lines of three, as `cogvx data caption`
        if number % 3:
            record["dense_caption"] = f"a long and detailed account of {record['caption']} number {number}"
    (root / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    make_tiny_vae(root / "vae")
    make_tiny_t5(root / "t5", captions=[r["caption"] for r in records] + [r["dense_caption"] for r in records
                                                                             if "dense_caption" in r])
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


def test_captions_first_equals_a_hand_made_manifest_and_random_picks_by_slot(scored, tmp_path):
    """data.captions=[dense_caption, caption] with caption_pick=first trains on the dense caption where a line has
    one (the text and losses of a manifest whose captions were replaced by hand); caption_pick=random draws one per
    use, keyed on (seed, step, slot): the same twice, not always first's, and each slot's text embedding is that of
    the caption `pick_caption` gives for its draw."""
    import torch

    from cogvx_mega.config import load_config
    from cogvx_mega.data.captioning import pick_caption
    from cogvx_mega.diffusion.randomness import Stream, slot_uniform
    from cogvx_mega.tools.training_data import open_training_data

    root, records = scored
    online = ["--vae", str(root / "vae"), "--text-encoder", str(root / "t5")]
    plain = ["data.stages=null", "training.steps=4"]
    by_hand = tmp_path / "by_hand.jsonl"
    by_hand.write_text("".join(json.dumps({**r, "caption": r.get("dense_caption", r["caption"])}) + "\n"
                               for r in records))
    losses = {}
    for name, data, extra in (("first", root / "scored.jsonl", ["data.captions=[dense_caption, caption]"]),
                              ("by_hand", by_hand, [])):
        assert main(["train", "--config", EXAMPLE, "--data", str(data), *online, "--run-dir", str(tmp_path / name),
                     *plain, *extra]) == 0
        losses[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["first"]) == 4 and losses["first"] == losses["by_hand"]

    def texts(source, *extra):
        config = load_config(config_file=EXAMPLE, overrides=[
            f"data.source={source}", f"data.vae={root / 'vae'}", f"data.text_encoder={root / 't5'}", *plain, *extra])
        data = open_training_data(config, global_batch=2)
        out = [data.step_batch(step, range(2), 2, config.training.seed)["text_embeds"] for step in range(4)]
        return data, config, out

    dense = ["data.captions=[dense_caption, caption]"]
    first = texts(root / "scored.jsonl", *dense)
    assert all(torch.equal(a, b) for a, b in zip(first[2], texts(by_hand)[2]))
    assert not all(torch.equal(a, b) for a, b in zip(first[2], texts(root / "scored.jsonl")[2]))  # caption alone
    data, config, random = texts(root / "scored.jsonl", *dense, "data.caption_pick=random")
    assert all(torch.equal(a, b) for a, b in zip(random, texts(root / "scored.jsonl", *dense,
                                                              "data.caption_pick=random")[2]))
    assert not all(torch.equal(a, b) for a, b in zip(random, first[2]))
    for step in range(4):
        bucket, clips = data.batch_of_step(step, 2, config.training.seed)
        draws = slot_uniform([0, 1], seed=config.training.seed, step=step, stream=Stream.CAPTION_PICK).tolist()
        for slot, (index, draw) in enumerate(zip(clips, draws)):
            line = data.plan.clips[bucket][index]
            line = {**line, "caption": line.get("manifest_caption", line["caption"])}  # as the manifest had it
            caption = pick_caption(line, ["dense_caption", "caption"], "random", draw)
            expected = torch.from_numpy(data.encoder.encode_text([caption])[0]).half().float()
            assert torch.equal(random[step][slot], expected), (step, slot, caption)
    data.close()


def test_a_resume_across_the_stage_whose_filter_tightens_continues_the_run(scored, tmp_path):
    import shutil

    root, _ = scored
    online = ["--data", str(root / "scored.jsonl"), "--vae", str(root / "vae"), "--text-encoder", str(root / "t5")]
    assert main(["train", "--config", EXAMPLE, *online, "--run-dir", str(tmp_path / "whole")]) == 0
    assert main(["train", "--config", EXAMPLE, *online, "--run-dir", str(tmp_path / "cut"),
                 "training.save_interval=2", "training.keep_checkpoints=3"]) == 0
    for step in (4, 6):  # keep the checkpoint of step 2, before the stage switch at step 3
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / f"step_{step:08d}")
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").glob("step_*")] == ["step_00000002"]
    assert main(["train", "--config", EXAMPLE, *online, "--run-dir", str(tmp_path / "cut"), "--resume", "auto"]) == 0
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("whole", "cut")}
    assert len(losses["whole"]) == 6 and losses["cut"] == losses["whole"]
