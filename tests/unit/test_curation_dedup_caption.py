"""Curation (issue 28): `cogvx data dedup` finds exact copies and re-encoded copies of a clip and keeps one, never
a different clip; `cogvx data caption` writes a dense caption column with a tiny random LLaVA the test builds
(frames captioned, then summarised), deterministic, resumable after a kill, split over tasks. An unreadable clip is
one line, counted, and kept."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cogvx_mega.cli import EXIT_USER_ERROR, main

FRAMES, HEIGHT, WIDTH, FPS = 24, 72, 128, 12


def scene(seed: int, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """uint8 [T, H, W, 3]: a smooth random landscape the camera pans across, a box crossing it (a seed's own)."""
    generator = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.rand(1, 3, 6, 10, generator=generator), size=(2 * height, 2 * width),
                          mode="bicubic", align_corners=False)[0]
    detail = F.interpolate(torch.rand(1, 3, 24, 40, generator=generator), size=(2 * height, 2 * width),
                           mode="bilinear")[0]
    canvas = (0.8 * field + 0.2 * detail).clamp(0, 1)
    direction = torch.rand(2, generator=generator) * 2 - 1
    colour = torch.rand(3, generator=generator)
    video = []
    for t in range(frames):
        top = int(height / 2 * (1 + 0.9 * float(direction[0]) * t / frames))
        left = int(width / 2 * (1 + 0.9 * float(direction[1]) * t / frames))
        frame = canvas[:, top:top + height, left:left + width].clone()
        row, col = int(height * (0.2 + 0.5 * t / frames)), int(width * (0.7 - 0.5 * t / frames))
        frame[:, row:row + height // 5, col:col + width // 6] = colour[:, None, None]
        video.append(frame)
    return (torch.stack(video).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def resized(video: np.ndarray, height: int, width: int) -> np.ndarray:
    frames = torch.from_numpy(video).permute(0, 3, 1, 2).float()
    frames = F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True)
    return frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A clip (H.264), its byte copy, the same frames re-encoded (VP9 at a low bitrate, half the size),
    a different clip and an image, scanned into a manifest; then a line for a clip gone unreadable since."""
    from cogvx_mega.vae.io import encode_frames

    root = tmp_path_factory.mktemp("curation")
    media = root / "media"
    media.mkdir()
    original = scene(1)
    encode_frames(media / "a.mp4", original, FPS, "libx264", "yuv420p", stream_options={"crf": "18"})
    shutil.copyfile(media / "a.mp4", media / "a_copy.mp4")
    encode_frames(media / "a_reencoded.webm", resized(original, HEIGHT // 2, WIDTH // 2), FPS, "libvpx-vp9",
                  "yuv420p", stream_options={"b": "40k"})
    encode_frames(media / "b.mp4", scene(2), FPS, "libx264", "yuv420p", stream_options={"crf": "18"})
    from PIL import Image

    Image.fromarray(scene(3, frames=1)[0]).save(media / "still.png")
    for path in media.iterdir():
        path.with_suffix(".txt").write_text(f"the original caption of {path.stem}\n")
    manifest = root / "manifest.jsonl"
    assert main(["data", "scan", str(media), "--output", str(manifest), "--workers", "2"]) == 0
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    broken = media / "broken.mp4"
    broken.write_text("not a video any more\n")
    lines.append({**lines[0], "path": str(broken.resolve())})  # scanned once, overwritten since
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root, manifest


def table(out: str) -> dict[str, str]:
    """name -> value of the summary table a command printed."""
    return {match[1]: match[2] for match in re.finditer(r"^  (\S.*?)  +(\S+)", out, re.MULTILINE)}


def names(manifest: Path) -> list[str]:
    return [Path(json.loads(line)["path"]).name for line in manifest.read_text().splitlines()]


def test_dedup_finds_copies_and_reencodes_not_a_different_clip(clips, tmp_path, capsys):
    from cogvx_mega.data.dedup import DEFAULT_THRESHOLD, hamming

    root, manifest = clips
    output = tmp_path / "deduped.jsonl"
    capsys.readouterr()
    assert main(["data", "dedup", str(manifest), "--output", str(output), "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert names(output) == ["a.mp4", "b.mp4", "still.png", "broken.mp4"]  # the unreadable clip is kept
    (group,) = [json.loads(line) for line in Path(f"{output}.duplicates.jsonl").read_text().splitlines()]
    assert Path(group["kept"]["path"]).name == "a.mp4"  # full size beats half size; then the first line
    dropped = {Path(d["path"]).name: d for d in group["dropped"]}
    assert dropped["a_copy.mp4"]["exact"] and dropped["a_copy.mp4"]["distance"] == 0
    assert not dropped["a_reencoded.webm"]["exact"] and dropped["a_reencoded.webm"]["distance"] <= 3
    unreadable = [line for line in err.splitlines() if line.startswith("unreadable ")]
    assert len(unreadable) == 1 and "broken.mp4" in unreadable[0]
    rows = table(out)
    assert (rows["clips"], rows["unreadable"], rows["groups"], rows["dropped, exact"], rows["dropped, near"],
            rows["kept"]) == ("6", "1", "1", "1", "1", "4")
    hashes = {Path(json.loads(line)["key"].split('"')[1]).name: json.loads(line)
              for line in Path(f"{output}.hashes.jsonl").read_text().splitlines()}
    signature = {name: [int(h, 16) for h in entry["hashes"]] for name, entry in hashes.items() if "hashes" in entry}
    assert hamming(signature["a.mp4"], signature["b.mp4"]) > 2 * DEFAULT_THRESHOLD
    assert "error" in hashes["broken.mp4"]

    # resumable: a kill cut the signatures file inside a line; the run again hashes only what is missing
    cache = Path(f"{output}.hashes.jsonl")
    data = cache.read_bytes()
    cache.write_bytes(data[: data.index(b"\n", data.index(b"\n") + 1) + 20])  # two whole lines and a part
    assert main(["data", "dedup", str(manifest), "--output", str(output), "--workers", "2"]) == EXIT_USER_ERROR
    capsys.readouterr()
    assert main(["data", "dedup", str(manifest), "--output", str(output), "--overwrite", "--workers", "1"]) == 0
    rows = table(capsys.readouterr().out)
    assert (rows["reused"], rows["hashed"], rows["unreadable"]) == ("2", "3", "1")  # the 2 whole lines kept
    assert names(output) == ["a.mp4", "b.mp4", "still.png", "broken.mp4"]


def test_dedup_groups_scale_and_chains():
    """The bucketed search finds what all pairs would: many random signatures with a few planted near copies."""
    from cogvx_mega.data.dedup import find_groups

    rng = np.random.default_rng(0)
    count = 3000
    hashes = rng.integers(0, 2**63, size=(count, 4), dtype=np.int64).astype(np.uint64)
    for copy in range(1, count, 300):  # 3 bits flipped in each frame of the clip before
        flips = rng.integers(0, 64, size=(4, 3))
        hashes[copy] = hashes[copy - 1] ^ np.bitwise_or.reduce(np.uint64(1) << flips.astype(np.uint64), axis=1)
    records = [{"path": f"/clips/{i}.mp4", "width": 64, "height": 64, "fps": 8.0, "frames": 16} for i in range(count)]
    records[1]["width"] = 128  # the bigger copy is kept
    entries = [{"bytes": i, "digest": str(i), "hashes": [f"{int(h):016x}" for h in row]}
               for i, row in enumerate(hashes)]
    groups, stats = find_groups(records, entries, threshold=8.0)
    assert sorted((g.kept, [d.line for d in g.dropped]) for g in groups) == sorted(
        [(1, [0])] + [(copy - 1, [copy]) for copy in range(301, count, 300)])
    assert stats.compared < count * (count - 1) / 2 / 100


def make_tiny_llava(root: Path) -> Path:
    """A random LLaVA (1-layer CLIP vision tower, 1-layer Llama) with a word-level tokenizer and a chat template,
    saved with its processor as a downloaded model is: what `--model` loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    from cogvx_mega.data.tiny_models import WORDS

    special = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocabulary = {token: i for i, token in enumerate(special + sorted(set(WORDS) | {"USER:", "ASSISTANT:"}))}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(vocabulary), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.5),
        image_token_index=vocabulary["<image>"], vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[:len(special)] = 0  # a random model would end some captions at once
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def caption_args(manifest: Path, model: Path, output: Path, *more: str) -> list[str]:
    return ["data", "caption", str(manifest), "--model", str(model), "--output", str(output), "--frames", "2",
            "--batch-size", "4", "--max-new-tokens", "6", "--summary-max-new-tokens", "8", "--device", "cpu",
            "--workers", "2", *more]


def test_caption_column_resumable_and_split_over_tasks(clips, llava, tmp_path, capsys, monkeypatch):
    from cogvx_mega.data.captioning import FrameCaptioner

    _, manifest = clips
    source = [json.loads(line) for line in manifest.read_text().splitlines()]
    reference = tmp_path / "reference.jsonl"
    capsys.readouterr()
    assert main(caption_args(manifest, llava, reference)) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in reference.read_text().splitlines()]
    assert [line["path"] for line in lines] == [line["path"] for line in source]
    assert [line["caption"] for line in lines] == [line["caption"] for line in source]  # never overwritten
    for line in lines[:-1]:
        assert isinstance(line["dense_caption"], str) and line["dense_caption"]
    assert "dense_caption" not in lines[-1]  # the unreadable clip: kept, without the column
    assert len([line for line in err.splitlines() if line.startswith("unreadable ")]) == 1
    rows = table(out)
    assert (rows["clips"], rows["captioned"], rows["resumed"], rows["unreadable"]) == ("6", "5", "0", "1")
    assert not Path(f"{reference}.parts").exists()

    # killed after the first group of clips, and inside the next result line: the run again finishes the rest
    killed = tmp_path / "killed.jsonl"
    calls = {"n": 0}
    real = FrameCaptioner.caption

    def dies_second_time(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FrameCaptioner, "caption", dies_second_time)
    assert main(caption_args(manifest, llava, killed)) == 130
    monkeypatch.setattr(FrameCaptioner, "caption", real)
    (part,) = Path(f"{killed}.parts").glob("part-*.jsonl")
    assert len(part.read_text().splitlines()) == 2  # the first group: 2 clips
    with open(part, "a") as file:
        file.write('{"line": 2, "path": "cut sh')
    capsys.readouterr()
    assert main(caption_args(manifest, llava, killed)) == 0
    assert killed.read_text() == reference.read_text()
    assert table(capsys.readouterr().out)["resumed"] == "2"

    # two tasks (torchrun's RANK / WORLD_SIZE): each its block, the last one merges the same manifest
    split = tmp_path / "split.jsonl"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        assert main(caption_args(manifest, llava, split)) == 0
        assert split.exists() == (rank == 0)
    assert split.read_text() == reference.read_text()

    # other settings on a folder of parts are refused, not mixed in
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    other = tmp_path / "other.jsonl"
    assert main(caption_args(manifest, llava, other, "--part", "0/2")) == 0
    capsys.readouterr()
    assert main(caption_args(manifest, llava, other, "--part", "1/2", "--frames", "3")) == EXIT_USER_ERROR
    assert "other frames" in capsys.readouterr().err


def test_caption_summarised_by_a_text_model_and_bad_flags(clips, llava, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _, manifest = clips
    summarizer = tmp_path / "summarizer"
    torch.manual_seed(1)
    tokenizer = AutoTokenizer.from_pretrained(llava)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(summarizer)
    tokenizer.save_pretrained(summarizer)
    output = tmp_path / "summarised.jsonl"
    assert main(caption_args(manifest, llava, output, "--summarize-model", str(summarizer), "--column", "long")) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert all(line.get("long") for line in lines[:-1]) and "dense_caption" not in lines[0]
    capsys.readouterr()
    for bad in (["--column", "caption"], ["--frames", "0"], ["--model", str(tmp_path)]):
        assert main(caption_args(manifest, llava, tmp_path / "bad.jsonl") + bad) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cogvx: error:")
    assert not (tmp_path / "bad.jsonl").exists()


def test_pick_caption_first_or_keyed_random():
    from cogvx_mega.data.captioning import pick_caption
    from cogvx_mega.diffusion.randomness import slot_seed

    record = {"caption": "short", "dense_caption": "a long dense caption", "empty": " "}
    assert pick_caption(record, ["dense_caption", "caption"]) == "a long dense caption"
    assert pick_caption({"caption": "short"}, ["dense_caption", "caption"]) == "short"
    picks = {pick_caption(record, ["caption", "dense_caption", "empty"], "random", draw=(slot_seed(0, 5, slot, 8) %
                                                                                       1000) / 1000)
             for slot in range(32)}
    assert picks == {"short", "a long dense caption"}
    with pytest.raises(KeyError):
        pick_caption({"caption": ""}, ["caption"])
