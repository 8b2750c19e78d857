"""`cmkd prepare` / `cmkd stats` on tiny fake releases built here: ESC-50 (44.1 kHz stereo WAV),
FSD50K, AudioSet and a plain folder; corrupt, missing and mislabelled inputs; a real S3 round trip
(moto); the data gin recipes; and the webdataset reader's list of training splits."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from cmkd.cli import app
from cmkd.data.manifest import Manifest, ManifestError
from cmkd.data.recipes import PrepareOptions, RecipeError, prepare
from cmkd.data.recipes.prepare import shown_url

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parent.parent
ESC_CLASSES = {"dog": 0, "rooster": 1, "rain": 10}  # ESC-50 targets; all three are ESC-10 classes
runner = CliRunner()


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args), env={"COLUMNS": "400"})


def write_wav(path: Path, seconds: float, sr: int = 44100, channels: int = 2, freq: float = 440.0) -> None:
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * freq * t)
    data = np.stack([wave, 0.5 * wave], axis=1)[:, :channels] if channels > 1 else wave
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data.astype(np.float32), sr)


def make_esc50(root: Path, *, seconds: float = 1.0, corrupt: bool = True) -> Path:
    """3 classes x 5 folds, 44.1 kHz stereo WAV; one extra non-ESC-10 row; optionally a corrupt clip."""
    rows = []
    for fold in range(1, 6):
        for i, (cat, target) in enumerate(ESC_CLASSES.items()):
            name = f"{fold}-{1000 + i}-A-{target}.wav"
            write_wav(root / "audio" / name, seconds, freq=300.0 * (i + 1))
            rows.append([name, fold, target, cat, "True", 1000 + i, "A"])
    write_wav(root / "audio" / "2-2000-A-5.wav", seconds)
    rows.append(["2-2000-A-5.wav", 2, 5, "cat", "False", 2000, "A"])
    if corrupt:
        (root / "audio" / "3-3000-A-0.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
        rows.append(["3-3000-A-0.wav", 3, 0, "dog", "True", 3000, "A"])
    (root / "meta").mkdir(parents=True, exist_ok=True)
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writerows(rows)
    return root


def table_row(output: str, first: str) -> list[str]:
    """The cells of the summary-table row whose first cell is ``first``."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if line.strip().startswith("│") and cells[0] == first:
            return cells
    raise AssertionError(f"no table row {first!r} in:\n{output}")


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def all_members(root: Path, split: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for shard in sorted(root.glob(f"{split}-*.tar")):
        out.update(members(shard))
    return out


@pytest.fixture(scope="module")
def esc50(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """An ESC-50 release and its prepared copy (through the CLI), shared read-only by the module."""
    base = tmp_path_factory.mktemp("esc")
    src, dest = make_esc50(base / "ESC-50-master"), base / "esc50"
    result = cli("prepare", "esc50", str(src), str(dest), "--workers", "0", "--shard-max-count", "2")
    return src, dest, result


# -- ESC-50 --------------------------------------------------------------------------------------
def test_esc50_cli_writes_folds_flac_16k_mono_and_norm(esc50: tuple[Path, Path, Any]) -> None:
    src, dest, result = esc50
    assert result.exit_code == 0, result.output
    m = Manifest.load(str(dest))
    assert m.classes == ["cat", "dog", "rain", "rooster"] and not m.multilabel
    assert list(m.splits) == [f"fold{i}" for i in range(1, 6)]
    assert {s: m.splits[s].samples for s in m.splits} == {"fold1": 3, "fold2": 4, "fold3": 3, "fold4": 3, "fold5": 3}
    assert m.clip_seconds == 5.0 and m.sample_rate == 16000
    assert m.norm is not None and m.norm.std > 0
    assert len(m.shard_urls("fold2")) == 2  # 4 clips, --shard-max-count 2
    files = all_members(dest, "fold1")
    assert sorted(files) == sorted(f"1-{1000 + i}-A-{t}.{ext}" for i, t in enumerate(ESC_CLASSES.values())
                                   for ext in ("flac", "json"))
    wave, sr = sf.read(io.BytesIO(files["1-1000-A-0.flac"]), always_2d=True)
    assert sr == 16000 and wave.shape == (16000, 1)  # 1 s of 44.1 kHz stereo → 16 kHz mono, not padded
    meta = json.loads(files["1-1000-A-0.json"])
    assert meta["labels"] == ["dog"] and meta["fold"] == 1 and meta["target"] == 0


def test_esc50_corrupt_clip_is_skipped_named_and_counted(esc50: tuple[Path, Path, Any]) -> None:
    _, dest, result = esc50
    assert "3-3000-A-0.wav" in result.output and "meta/esc50.csv line" in result.output
    assert "1 clip(s) could not be decoded" in result.output
    assert table_row(result.output, "fold3")[:4] == ["fold3", "4", "3", "1"]  # listed, written, skipped
    assert "3-3000-A-0.flac" not in all_members(dest, "fold3")


def test_esc10_option_and_recipe_defaults(tmp_path: Path, esc50: tuple[Path, Path, Any]) -> None:
    src = esc50[0]
    report = prepare("esc50", src, str(tmp_path / "esc10"), PrepareOptions(workers=0, clip_seconds=0.5, pad=True),
                     quiet=True, esc10=True)
    m = report.manifest
    assert m.name == "esc10" and m.classes == ["dog", "rain", "rooster"] and m.clip_seconds == 0.5
    assert sum(r.written for r in report.splits.values()) == 15 and len(report.skipped) == 1
    wave, _ = sf.read(io.BytesIO(all_members(tmp_path / "esc10", "fold1")["1-1000-A-0.flac"]))
    assert wave.shape == (8000,)  # cropped at the start to 0.5 s


def test_crop_none_keeps_full_length_and_pad_fills_short_clips(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_wav(src / "long.wav", 1.5, sr=16000, channels=1)
    write_wav(src / "short.wav", 0.25, sr=16000, channels=1)
    (src / "labels.csv").write_text("file,labels,split\nlong.wav,a,train\nshort.wav,b,train\n")
    prepare("folder", src, str(tmp_path / "full"), PrepareOptions(workers=0, clip_seconds=1.0, crop="none"), quiet=True)
    prepare("folder", src, str(tmp_path / "pad"), PrepareOptions(workers=0, clip_seconds=1.0, pad=True), quiet=True)
    full, pad = all_members(tmp_path / "full", "train"), all_members(tmp_path / "pad", "train")
    frames = lambda members, name: sf.info(io.BytesIO(members[name])).frames  # noqa: E731
    assert frames(full, "long.flac") == 24000 and frames(full, "short.flac") == 4000
    assert frames(pad, "long.flac") == 16000 and frames(pad, "short.flac") == 16000


def test_esc50_inconsistent_metadata_names_the_row(tmp_path: Path) -> None:
    src = make_esc50(tmp_path / "src", corrupt=False)
    text = (src / "meta" / "esc50.csv").read_text().replace("2-1001-A-1.wav,2,1,rooster", "2-1001-A-1.wav,2,7,rooster")
    (src / "meta" / "esc50.csv").write_text(text)
    result = cli("prepare", "esc50", str(src), str(tmp_path / "out"), "--workers", "0")
    assert result.exit_code == 2
    assert "meta/esc50.csv line 6" in result.output and "rooster" in result.output and "target" in result.output
    assert not (tmp_path / "out").exists()  # nothing written before the metadata is checked


def test_existing_dataset_needs_overwrite_and_bad_options_are_named(tmp_path: Path,
                                                                    esc50: tuple[Path, Path, Any]) -> None:
    src, dest, _ = esc50
    result = cli("prepare", "esc50", str(src), str(dest), "--workers", "0")
    assert result.exit_code == 2
    assert "already holds a prepared dataset" in result.output and "--overwrite" in result.output
    assert Manifest.load(str(dest)).splits["fold1"].samples == 3  # untouched
    result = cli("prepare", "esc50", str(src), str(tmp_path / "x"), "--multilabel")
    assert result.exit_code == 2 and "does not take --multilabel" in result.output and "--esc10" in result.output
    result = cli("prepare", "esc5O", str(src), str(tmp_path / "x"))
    assert result.exit_code == 2 and "unknown recipe 'esc5O'" in result.output and "esc50" in result.output
    result = cli("prepare", "esc50", str(tmp_path / "nope"), str(tmp_path / "x"))
    assert result.exit_code == 2 and "is not a folder" in result.output and "meta/esc50.csv" in result.output
    result = cli("prepare", "esc50", str(src), str(tmp_path / "x"), "--crop", "middle")
    assert result.exit_code == 2 and "--crop 'middle'" in result.output
    result = cli("prepare", "esc50", str(src), str(tmp_path / "x"), "--norm-split", "train")
    assert result.exit_code == 2 and "--norm-split ['train']" in result.output and "fold1" in result.output
    assert shown_url("s3://AKIA:hunter2@bucket/esc50") == "s3://***@bucket/esc50"  # never print secrets in URLs


# -- FSD50K --------------------------------------------------------------------------------------
FSD_VOCAB = [("Bark", "/m/05tny_"), ("Music", "/m/04rlf"), ("Speech", "/m/09x0r"), ("Rain", "/m/06mb1")]


def make_fsd50k(root: Path, bad_label: bool = False) -> Path:
    gt = root / "FSD50K.ground_truth"
    gt.mkdir(parents=True)
    (gt / "vocabulary.csv").write_text("".join(f"{i},{n},{m}\n" for i, (n, m) in enumerate(FSD_VOCAB)))
    dev = [("101", "Bark,Music", "train"), ("102", "Speech", "train"), ("103", "Rain,Speech", "val"),
           ("104", "Barking" if bad_label else "Music", "train")]
    with open(gt / "dev.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "labels", "mids", "split"])
        for fname, labels, split in dev:
            mids = ",".join(m for n, m in FSD_VOCAB if n in labels.split(","))
            w.writerow([fname, labels, mids, split])
            write_wav(root / "FSD50K.dev_audio" / f"{fname}.wav", 0.5, sr=22050, channels=1)
    with open(gt / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "labels", "mids"])
        w.writerow(["201", "Bark,Rain", "/m/05tny_,/m/06mb1"])
        write_wav(root / "FSD50K.eval_audio" / "201.wav", 0.5, sr=22050, channels=1)
    return root


def test_fsd50k_multilabel_splits_with_a_worker_process(tmp_path: Path) -> None:
    src = make_fsd50k(tmp_path / "FSD50K")
    report = prepare("fsd50k", src, str(tmp_path / "out"), PrepareOptions(workers=1), quiet=True)
    m = Manifest.load(str(tmp_path / "out"))
    assert m.classes == [n for n, _ in FSD_VOCAB] and m.multilabel and m.clip_seconds == 10.0
    assert {s: v.samples for s, v in m.splits.items()} == {"train": 3, "val": 1, "eval": 1}
    assert m.label_counts is not None and m.label_counts["train"] == [1, 2, 1, 0] and m.splits["train"].max_labels == 2
    assert m.norm is not None and report.norm_splits == ["train"]
    meta = json.loads(all_members(tmp_path / "out", "val")["103.json"])
    assert meta["labels"] == ["Rain", "Speech"] and meta["mids"] == ["/m/09x0r", "/m/06mb1"]


def test_fsd50k_unknown_label_names_file_and_row_and_writes_nothing(tmp_path: Path) -> None:
    src = make_fsd50k(tmp_path / "FSD50K", bad_label=True)
    result = cli("prepare", "fsd50k", str(src), str(tmp_path / "out"), "--workers", "0")
    assert result.exit_code == 2
    out = result.output
    assert "FSD50K.ground_truth/dev.csv line 5" in out and "fname 104" in out and "'Barking'" in out
    assert "vocabulary" in out and "fix the label or add the class" in out
    assert not (tmp_path / "out").exists()


# -- AudioSet ------------------------------------------------------------------------------------
def make_audioset(root: Path, unknown_mid: bool = False) -> Path:
    clips = root / "clips"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/04rlf,"Music"\n2,/m/0bt9lr,"Dog"\n')
    header = "# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=3, num_segs=3, num_unique_labels=3\n" \
             "# YTID, start_seconds, end_seconds, positive_labels\n"
    bal = header + '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/04rlf"\n-0RWZT-miFs, 420.000, 430.000, "/m/0bt9lr"\n' \
        + 'gone0000001, 10.000, 20.000, "/m/04rlf"\n'
    if unknown_mid:
        bal += 'xyz00000001, 0.000, 10.000, "/m/nothere"\n'
    (root / "meta" / "balanced.csv").write_text(bal)
    (root / "meta" / "eval.csv").write_text(header + 'abcdefghijk, 0.000, 10.000, "/m/0bt9lr,/m/09x0r"\n'
                                            'missing0002, 0.000, 10.000, "/m/09x0r"\n')
    for ytid in ("--PJHxphWEs", "-0RWZT-miFs", "abcdefghijk"):
        write_wav(clips / "sub" / f"Y{ytid}.flac", 0.5, sr=32000, channels=2)
    return root


def test_audioset_counts_missing_clips_and_uses_the_pattern(tmp_path: Path) -> None:
    src = make_audioset(tmp_path / "as")
    meta = src / "meta"
    result = cli("prepare", "audioset", str(src / "clips"), str(tmp_path / "out"), "--workers", "0",
                 "--balanced", str(meta / "balanced.csv"), "--eval", str(meta / "eval.csv"),
                 "--labels", str(meta / "class_labels_indices.csv"), "--clip-pattern", "sub/Y{ytid}")
    assert result.exit_code == 0, result.output
    m = Manifest.load(str(tmp_path / "out"))
    assert m.classes == ["Speech", "Music", "Dog"] and m.multilabel
    assert {s: v.samples for s, v in m.splits.items()} == {"balanced": 2, "eval": 1}
    assert "2 listed clip(s) have no audio file" in result.output
    assert table_row(result.output, "balanced")[:5] == ["balanced", "3", "2", "0", "1"]  # ... skipped, missing
    rec = json.loads(all_members(tmp_path / "out", "balanced")["--PJHxphWEs.json"])
    assert rec["labels"] == ["Speech", "Music"] and rec["start"] == 30.0 and rec["ytid"] == "--PJHxphWEs"


def test_audioset_unknown_mid_names_csv_line(tmp_path: Path) -> None:
    src = make_audioset(tmp_path / "as", unknown_mid=True)
    with pytest.raises(RecipeError, match=r"balanced.csv line 7 \(YTID xyz00000001\).*'/m/nothere'.*class-labels CSV"):
        prepare("audioset", src / "clips", str(tmp_path / "out"), PrepareOptions(workers=0), quiet=True,
                balanced=str(src / "meta" / "balanced.csv"), labels=str(src / "meta" / "class_labels_indices.csv"))


# -- folder --------------------------------------------------------------------------------------
def make_folder(root: Path, rows: list[str], header: str) -> Path:
    for i, row in enumerate(rows):
        write_wav(root / next(csv.reader([row]))[0], 0.4, sr=8000, channels=1, freq=200.0 + 50 * i)
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root


def test_folder_with_split_column_multilabel_and_class_file(tmp_path: Path) -> None:
    rows = ["a/1.wav,dog;cat,train", 'a/2.wav,"cat,bird",train', "b/3.wav,bird,valid", "b/4.wav,dog,train"]
    src = make_folder(tmp_path / "src", rows, "file,labels,split")
    (tmp_path / "classes.txt").write_text("# my classes\ndog\ncat\nbird\nfish\n")
    result = cli("prepare", "folder", str(src), str(tmp_path / "out"), "--workers", "0", "--multilabel",
                 "--classes", str(tmp_path / "classes.txt"))
    assert result.exit_code == 0, result.output
    m = Manifest.load(str(tmp_path / "out"))
    assert m.classes == ["dog", "cat", "bird", "fish"] and m.multilabel
    assert {s: v.samples for s, v in m.splits.items()} == {"train": 3, "valid": 1} and m.norm is not None
    assert json.loads(all_members(tmp_path / "out", "train")["a/2.json"])["labels"] == ["cat", "bird"]
    (src / "labels.csv").write_text("file,labels,split\n" + "\n".join(rows[:3] + ["b/4.wav,dgo,train"]) + "\n")
    result = cli("prepare", "folder", str(src), str(tmp_path / "out2"), "--multilabel",
                 "--classes", str(tmp_path / "classes.txt"))
    assert result.exit_code == 2 and "labels.csv line 5 (file b/4.wav)" in result.output and "'dgo'" in result.output


def test_folder_without_split_column_is_deterministic_and_single_label(tmp_path: Path) -> None:
    rows = [f"{c}_{i}.wav,{c}" for c in ("dog", "cat") for i in range(5)]
    src = make_folder(tmp_path / "src", rows, "file,labels")
    opts = PrepareOptions(workers=0)
    first = prepare("folder", src, str(tmp_path / "a"), opts, quiet=True, eval_fraction=0.2)
    prepare("folder", src, str(tmp_path / "b"), opts, quiet=True, eval_fraction=0.2)
    assert {s: r.written for s, r in first.splits.items()} == {"train": 8, "eval": 2}
    keys = lambda root: sorted(k for k in all_members(root, "eval") if k.endswith(".json"))  # noqa: E731
    assert keys(tmp_path / "a") == keys(tmp_path / "b")
    eval_members = all_members(tmp_path / "a", "eval").items()
    assert {json.loads(v)["labels"][0] for k, v in eval_members if k.endswith(".json")} == {"dog", "cat"}
    assert first.manifest.classes == ["cat", "dog"] and not first.manifest.multilabel
    (src / "labels.csv").write_text("file,labels\ndog_0.wav,dog;cat\n")
    with pytest.raises(RecipeError, match=r"labels.csv line 2 \(file dog_0.wav\): 2 labels.*--multilabel"):
        prepare("folder", src, str(tmp_path / "c"), opts, quiet=True)
    (src / "labels.csv").write_text("file,labels\ndog_0.wav,dog\nnot_there.wav,cat\n")
    with pytest.raises(RecipeError, match=r"(?s)not_there.wav \(labels.csv line 3\).*--allow-missing"):
        prepare("folder", src, str(tmp_path / "c"), opts, quiet=True)


# -- stats ---------------------------------------------------------------------------------------
def test_stats_prints_and_writes_norm(tmp_path: Path, esc50: tuple[Path, Path, Any]) -> None:
    import shutil

    dest = tmp_path / "copy"
    shutil.copytree(esc50[1], dest)
    norm = Manifest.load(str(dest)).norm
    result = cli("stats", str(dest))
    assert result.exit_code == 0, result.output
    assert "fold1+fold2+fold3+fold4+fold5" in result.output and f"{norm.mean:.4f}" in result.output
    assert "pass --write" in result.output
    data = json.loads((dest / "dataset.json").read_text())
    data["norm"] = {"mean": 0.0, "std": 1.0}
    (dest / "dataset.json").write_text(json.dumps(data))
    result = cli("stats", str(dest), "--split", "fold1", "--max-clips", "2", "--write")
    assert result.exit_code == 0 and "wrote norm to" in result.output and "(2 clips)" in result.output
    assert Manifest.load(str(dest)).norm.std not in (1.0, norm.std)
    result = cli("stats", str(dest), "--split", "train")
    assert result.exit_code == 2 and "no split 'train'" in result.output and "fold1" in result.output


# -- object storage ------------------------------------------------------------------------------
def test_prepare_into_s3_then_stream_it_back(tmp_path: Path, s3_endpoint: str, esc50: tuple[Path, Path, Any]) -> None:
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("cmkd-prepare")
    result = cli("prepare", "esc50", str(esc50[0]), "s3://cmkd-prepare/esc50", "--workers", "0", "--clip-seconds", "1")
    assert result.exit_code == 0, result.output
    assert "wrote s3://cmkd-prepare/esc50/dataset.json" in result.output
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in result.output  # credentials come from the environment, unprinted
    import cmkd.data.stream  # noqa: F401 - registers datasets.webdataset
    from cmkd.registry import datasets

    ds = datasets.get("webdataset")(root="s3://cmkd-prepare/esc50", train_split=["fold1", "fold2", "fold3", "fold4"],
                                    eval_split="fold5", num_workers=0)
    assert ds.train_samples == 13 and ds.clip_samples == 16000
    keys = [k for batch in ds.eval_loader(2) for k in batch["key"]]
    assert sorted(keys) == sorted(f"5-{1000 + i}-A-{t}" for i, t in enumerate(ESC_CLASSES.values()))
    batch = next(iter(ds.train_loader(4)))
    assert batch["wave"].shape == (4, 16000) and batch["target"].shape == (4, 4)
    bad = cli("prepare", "esc50", str(esc50[0]), "s3://no-such-bucket-here/esc50", "--workers", "0")
    assert bad.exit_code == 2 and "bucket 'no-such-bucket-here' does not exist" in bad.output


# -- gin recipes and several training splits ------------------------------------------------------
@pytest.mark.parametrize("recipe,frames,train,eval_split,balanced", [
    ("esc50", 512, ["fold1", "fold2", "fold3", "fold4"], "fold5", False),
    ("fsd50k", 1024, "train", "val", True),
    ("audioset", 1024, ["balanced", "unbalanced"], "eval", True),
    ("folder", 1024, "train", "eval", False),
])
def test_data_gin_recipes_parse(recipe: str, frames: int, train: Any, eval_split: str, balanced: bool) -> None:
    import gin

    from cmkd import components, config

    components.load_all()
    gin.clear_config()
    try:
        config.parse([REPO / "gin" / "cnn_to_ast.gin", REPO / "gin" / "data" / f"{recipe}.gin"],
                     ["DATA_ROOT = 's3://bucket/x'"])
        macro = {"esc50": "%TRAIN_FOLDS", "audioset": "%AUDIOSET_TRAIN"}.get(recipe)
        assert gin.query_parameter(macro or "datasets.webdataset.train_split") == train
        assert gin.query_parameter("featurizers.fbank.target_frames") == frames
        assert gin.query_parameter("datasets.webdataset.balanced") is balanced
        assert gin.query_parameter("%DATA_ROOT") == "s3://bucket/x"
        ev = gin.query_parameter("datasets.webdataset.eval_split")
        assert (gin.query_parameter("%EVAL_FOLD") if recipe == "esc50" else ev) == eval_split
        if recipe == "esc50":
            augment = [gin.query_parameter(f"train.{p}") for p in ("freqm", "timem", "mixup")]
            assert augment == [24, 96, 0.0]
    finally:
        gin.clear_config()


def test_esc50_gin_builds_the_dataset_with_four_training_folds(esc50: tuple[Path, Path, Any]) -> None:
    import gin

    from cmkd import components, config
    from cmkd.registry import datasets

    components.load_all()
    gin.clear_config()
    try:
        config.parse([REPO / "gin" / "cnn_to_ast.gin", REPO / "gin" / "data" / "esc50.gin"],
                     [f"DATA_ROOT = '{esc50[1]}'", "TRAIN_FOLDS = ['fold2', 'fold3', 'fold4', 'fold5']",
                      "EVAL_FOLD = 'fold1'"])
        ds = datasets.get("webdataset")()
    finally:
        gin.clear_config()
    assert ds.train_splits == ["fold2", "fold3", "fold4", "fold5"] and ds.eval_split == "fold1"
    assert ds.train_samples == 13 and ds.steps_per_epoch(4) == 4 and not ds.multilabel


def test_webdataset_reads_a_list_of_training_splits(tmp_path: Path) -> None:
    from tones import write_tone_dataset

    import cmkd.data.stream  # noqa: F401
    from cmkd.registry import datasets

    root = str(tmp_path / "tones")
    write_tone_dataset(root, {"a": [("a0", ["x"], 0.3), ("a1", ["y", "x"], 0.3)], "b": [("b0", ["y"], 0.3)],
                              "c": [("c0", ["x"], 0.3)]}, classes=["x", "y"], max_count=1)
    make = datasets.get("webdataset")
    ds = make(root=root, train_split=("a", "b"), eval_split="c", num_workers=0, balanced=True)
    assert ds.train_samples == 3 and ds.train_split == "a+b"
    assert ds.balance is not None and ds.balance.max_labels == 2
    assert list(ds.balance.class_weight) == [1 / 2, 1 / 2]  # counts x: 2, y: 2 summed over a and b
    keys = {k for batch in ds.train_loader(1, seed=1) for k in batch["key"]}
    assert keys <= {"a0", "a1", "b0"}
    for kwargs, message in ((dict(train_split=["a", "zz"]), r"no training split\(s\) \['zz'\]"),
                            (dict(train_split=["a", "a"]), "names a split twice"),
                            (dict(train_split=["a", "c"], eval_split="c"), "both a training and the eval split"),
                            (dict(train_split=[]), "non-empty list")):
        with pytest.raises(ManifestError, match=message):
            make(root=root, num_workers=0, **kwargs)
