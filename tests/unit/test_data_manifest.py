"""`cogvx data scan`: every usable video and image becomes one manifest line with its real properties;
broken files (truncated, empty, not media) and files without a caption are reported, counted, never written."""
from __future__ import annotations

import json

import pytest

from cogvx_mega.cli import EXIT_USER_ERROR, main


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from media import make_media_folder

    root = tmp_path_factory.mktemp("media")
    return root, make_media_folder(root)


def test_scan_keeps_good_files_and_reports_each_bad_one(media, tmp_path, capsys):
    root, made = media
    manifest = tmp_path / "manifest.jsonl"
    assert main(["data", "scan", str(root), "--output", str(manifest), "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    good = {name: info for name, info in made.items() if info["kind"] != "broken"}
    assert sorted(line["path"] for line in lines) == sorted(str((root / name).resolve()) for name in good)
    for line in lines:
        expected = good[str(line["path"])[len(str(root.resolve())) + 1:]]
        assert (line["kind"], line["frames"], line["height"], line["width"]) == (
            expected["kind"], expected["frames"], expected["height"], expected["width"])
        assert line["fps"] == expected["fps"] and line["caption"]
    assert {line["codec"] for line in lines} == {"vp9", "mjpeg", "h264", "png", "jpeg"}
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    broken = sorted(name for name, info in made.items() if info["kind"] == "broken")
    assert sorted(line.split(":")[0].rsplit("/", 1)[-1] for line in skipped) == broken
    reasons = {line.split(":")[0].rsplit("/", 1)[-1]: line.split(": ", 1)[1] for line in skipped}
    assert "empty" in reasons["empty.mp4"] and "not a readable video" in reasons["notes.mp4"]
    assert f"{len(good)} clips" in out and f"{len(broken)} skipped" in out


def test_captions_file_and_missing_captions(media, tmp_path, capsys):
    root, _ = media
    captions = tmp_path / "captions.csv"
    captions.write_text("path,caption\nclip_vp9.webm,from the csv file\n")
    manifest = tmp_path / "manifest.jsonl"
    assert main(["data", "scan", str(root), "--output", str(manifest), "--captions", str(captions)]) == 0
    by_name = {line["path"].rsplit("/", 1)[-1]: line for line in map(json.loads, manifest.read_text().splitlines())}
    assert by_name["clip_vp9.webm"]["caption"] == "from the csv file"  # the file wins over the sidecar
    assert by_name["clip_mjpeg.avi"]["caption"] == "a square moving in clip 1"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "a.png").write_bytes((root / "image.png").read_bytes())  # no caption anywhere
    capsys.readouterr()
    status = main(["data", "scan", str(bare), "--output", str(tmp_path / "bare.jsonl")])
    err = capsys.readouterr().err.splitlines()
    assert status == EXIT_USER_ERROR and "no caption" in err[0] and err[-1].startswith("cogvx: error:")
    assert not (tmp_path / "bare.jsonl").exists()


@pytest.mark.parametrize("problem", ["missing-dir", "output-exists", "bad-captions"])
def test_scan_bad_input_is_one_clear_line(problem, media, tmp_path, capsys):
    root, _ = media
    output = tmp_path / "manifest.jsonl"
    args = ["data", "scan", str(root), "--output", str(output)]
    if problem == "missing-dir":
        args[2] = str(tmp_path / "nowhere")
    elif problem == "output-exists":
        output.write_text("keep me\n")
    else:
        (tmp_path / "captions.jsonl").write_text("{not json\n")
        args += ["--captions", str(tmp_path / "captions.jsonl")]
    status = main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USER_ERROR and len(lines) == 1 and lines[0].startswith("cogvx: error:")
    assert (output.read_text() == "keep me\n") if problem == "output-exists" else not output.exists()


@pytest.mark.parametrize("how", ["part", "torchrun", "slurm-array"])
def test_a_scan_split_over_tasks_writes_the_manifest_of_one_scan(how, media, tmp_path, monkeypatch, capsys):
    """Each task probes its share of the files (a hash of the path decides) and writes a part; the task that
    finds every part written merges them in path order: byte for byte the manifest one scan writes. A task run
    again reuses its part."""
    from cogvx_mega.tools.data_scan import parts_folder, scan_folder

    root, _ = media
    single = tmp_path / "single.jsonl"
    scan_folder(str(root), str(single), workers=2)
    output = tmp_path / "parallel.jsonl"
    summaries = []
    count = 3
    for index in (2, 0, 0, 1):  # task 0 twice: killed after its part and run again
        if how == "torchrun":
            monkeypatch.setenv("WORLD_SIZE", str(count))
            monkeypatch.setenv("RANK", str(index))
        elif how == "slurm-array":
            monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(count))
            monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(4 + index))
        summaries.append(scan_folder(str(root), str(output), workers=2,
                                     part=(index, count) if how == "part" else None))
        if len(summaries) < 4:
            assert not output.exists() and not summaries[-1].merged
    assert output.read_bytes() == single.read_bytes()
    assert not parts_folder(str(output)).exists()
    whole = summaries[-1]
    assert whole.merged and whole.clips == len(single.read_text().splitlines())
    assert summaries[2] == summaries[1]  # task 0 again: its part read back, not scanned again
    assert 0 < summaries[0].files and 0 < summaries[1].files  # the hash split gave every task some files
    assert summaries[0].files + summaries[1].files < whole.files


def test_scan_parts_from_the_command_line(media, tmp_path, capsys):
    root, _ = media
    output = tmp_path / "m.jsonl"
    assert main(["data", "scan", str(root), "--output", str(output), "--part", "1/2"]) == 0
    assert "the last part to finish writes" in capsys.readouterr().out and not output.exists()
    assert main(["data", "scan", str(root), "--output", str(output), "--part", "0/2"]) == 0
    assert "written to" in capsys.readouterr().out and output.is_file()
    assert main(["data", "scan", str(root), "--output", str(tmp_path / "x.jsonl"), "--part", "3"]) == EXIT_USER_ERROR
    assert "--part='3': write I/N" in capsys.readouterr().err


def test_scan_writes_the_clip_index_too(media, tmp_path, capsys):
    """`--index`: the task that writes the manifest also indexes it, for the config's buckets (what `cogvx data
    index` would write)."""
    root, _ = media
    buckets = "data.buckets=[5x32x48,1x32x32]"
    assert main(["data", "scan", str(root), "--output", str(tmp_path / "m.jsonl"), "--index", str(tmp_path / "idx"),
                 "--preset", "tiny", buckets]) == 0
    assert main(["data", "index", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "again"), "--preset", "tiny",
                 buckets]) == 0
    from cogvx_mega.data.index import ClipIndex

    scanned, again = ClipIndex.open(tmp_path / "idx"), ClipIndex.open(tmp_path / "again")
    assert scanned.clip_counts() == again.clip_counts() and sum(scanned.clip_counts().values()) > 0
    assert scanned.fingerprint == again.fingerprint
