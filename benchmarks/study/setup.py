"""What defines the study: the cells, model and data sizes, the data preparation and the gin text."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CMKD = [sys.executable, "-m", "cmkd"]
TAU_HIGH = 2.5  # the larger τ (docs/distillation.md: the paper tunes τ on FSD50K; `-b TAU=2.5` is its example)
# stage → (label, student class, teacher stage or None, τ)
CELLS: dict[str, tuple[str, str, str | None, float]] = {
    "cnn": ("CNN alone", "CNN", None, 1.0),
    "ast": ("AST alone", "AST", None, 1.0),
    "cnn_to_ast": ("CNN→AST", "AST", "cnn", 1.0),
    "ast_to_cnn": ("AST→CNN", "CNN", "ast", 1.0),
    "cnn_to_cnn": ("CNN→CNN (self-KD)", "CNN", "cnn", 1.0),
    "cnn_to_ast_tau": (f"CNN→AST τ={TAU_HIGH}", "AST", "cnn", TAU_HIGH),
    "ast_to_cnn_tau": (f"AST→CNN τ={TAU_HIGH}", "CNN", "ast", TAU_HIGH),
}
CORE = ["cnn", "ast", "cnn_to_ast", "ast_to_cnn", "cnn_to_cnn"]  # the grid's first pass
ALL = list(CELLS)  # the τ pass adds the τ stages to a finished core group (its teachers are reused)
BASELINE = {"CNN": "cnn", "AST": "ast"}
DATASETS = ["esc10", "fsdd"]  # in the order the report shows them
NAMES = {"esc10": "ESC-10", "fsdd": "FSDD"}
ESC_FOLDS = [1, 2, 3, 4, 5]
FSDD_SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
# Speaker-disjoint 3-fold CV on FSDD: each pair held out in turn, the other four train.
FSDD_PAIRS = [("nicolas", "theo"), ("george", "jackson"), ("lucas", "yweweler")]

# The paper's front end (16 kHz Kaldi fbank, 25 ms / 10 ms, (x - mean) / (2 std)) with 64 mel
# bins, ESC-10 cut to 2.5 s windows (random in training, the first 2.5 s in evaluation): a 4x
# smaller input for a 2-core CPU. Models: timm's smallest EfficientNet and a 3-block AST
# (patches 16x16, stride 10 as the paper), about 0.1 and 0.4 M parameters.
SIZES: dict[str, dict[str, Any]] = {
    "esc10": dict(clip_seconds=2.5, n_mels=64, frames=248, freqm=12, timem=48, batch=32, train_clips=320),
    "fsdd": dict(clip_seconds=1.0, n_mels=64, frames=100, freqm=12, timem=20, batch=32, train_clips=1000),
}
MODEL = dict(cnn="test_efficientnet", ast_dim=96, ast_depth=3, ast_heads=4, cnn_lr=2e-3, ast_lr=1e-3,
             lam=0.5, warmup_epochs=2)
FSDD_TAKES = 25  # takes 0..24 of each speaker and digit: 4 speakers x 10 digits x 25 = 1000 training clips


def thread_env() -> dict[str, str]:
    # One thread per process: on 2 shared cores, intra-op threads mostly wait on each other.
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_cmd(cmd: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        res = subprocess.run(cmd, cwd=REPO, env=thread_env(), stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode:
        raise SystemExit(f"failed ({res.returncode}): {shlex.join(cmd)}; see {log}")


def prepare_esc10(src: Path, dest: Path, log: Path) -> None:
    if (dest / "dataset.json").exists():
        return
    # Full 5 s clips in the shards (--crop none); dataset.json's clip length (2.5 s) makes the
    # reader take a random 2.5 s window in training and the first 2.5 s in evaluation.
    print(f"preparing ESC-10 → {dest}", flush=True)
    run_cmd([*CMKD, "prepare", "esc50", str(src), str(dest), "--esc10", "--clip-seconds",
             str(SIZES["esc10"]["clip_seconds"]), "--crop", "none", "--shard-max-count", "20", "--workers", "0",
             "--overwrite"], log)


def fsdd_root(work: Path, pair: tuple[str, str]) -> Path:
    return work / "data" / f"fsdd-eval_{'-'.join(pair)}-takes{FSDD_TAKES}"


def prepare_fsdd(src: Path, dest: Path, eval_speakers: tuple[str, str], log: Path) -> None:
    if (dest / "dataset.json").exists():
        return
    print(f"preparing FSDD (eval speakers {', '.join(eval_speakers)}) → {dest}", flush=True)
    dest.mkdir(parents=True, exist_ok=True)
    table = dest.parent / f"{dest.name}.csv"  # the label CSV lives next to the shards, outside the repo
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "labels", "split"])
        for f in sorted((src / "recordings").glob("*.wav")):
            digit, speaker, take = f.stem.split("_")
            if int(take) < FSDD_TAKES:
                w.writerow([f.name, digit, "eval" if speaker in eval_speakers else "train"])
    # Clips (0.15-2.3 s) zero-padded or cut to 1 s at 16 kHz; norm stats from the training speakers.
    run_cmd([*CMKD, "prepare", "folder", str(src / "recordings"), str(dest), "--csv", str(table), "--name", "fsdd",
             "--clip-seconds", str(SIZES["fsdd"]["clip_seconds"]), "--shard-max-count", "50", "--workers", "0",
             "--overwrite"], log)


def gin_text(dataset: str) -> str:
    """One gin file per dataset; the data root, split, seed, epochs and stage list are -b bindings,
    so the text (whose hash names the run folder) is the same for the probe and every pass of the grid."""
    s, m = SIZES[dataset], MODEL
    steps = -(-s["train_clips"] // s["batch"])  # steps per epoch
    lines = [
        f"# Written by benchmarks/cmkd_study.py: the {dataset} cell of the CMKD study. The single-model",
        "# stages are the teachers of the KD stages (same seed and split).",
        "include 'base.gin'",
        "include 'models.gin'",
        "",
        f"experiment.name = '{dataset}'",
        f"experiment.stages = {CORE!r}",
        "PRETRAINED = False  # no network here: every model starts from random weights",
        "SEED = 0",
        "EPOCHS = 100",
        "DATA_ROOT = ''",
        "TRAIN_SPLITS = ['train']",
        "EVAL_SPLIT = 'eval'",
        "train.seed = %SEED",
        "",
        "train.dataset = @datasets.webdataset",
        "datasets.webdataset.root = %DATA_ROOT",
        "datasets.webdataset.train_split = %TRAIN_SPLITS",
        "datasets.webdataset.eval_split = %EVAL_SPLIT",
        "datasets.webdataset.num_workers = 0   # decoding is cheap; the cores go to the models",
        "datasets.webdataset.balanced = False",
        f"featurizers.fbank.n_mels = {s['n_mels']}",
        f"featurizers.fbank.target_frames = {s['frames']}",
        "",
        "train.loss = @losses.ce                # single-label: softmax + cross-entropy",
        "train.mixup = 0.0",
        f"train.freqm = {s['freqm']}",
        f"train.timem = {s['timem']}",
        "train.amp = False",
        "train.epochs = %EPOCHS",
        f"train.batch_size = {s['batch']}",
        "train.teacher_checkpoint = 'last'     # the 'best' epoch is chosen on the eval split: not for teaching",
        "schedule.kind = 'cosine'",
        f"schedule.warmup_steps = {m['warmup_epochs'] * steps}   # {m['warmup_epochs']} epochs",
        "",
        f"backbones.efficientnet.name = '{m['cnn']}'",
        f"backbones.ast.embed_dim = {m['ast_dim']}",
        f"backbones.ast.depth = {m['ast_depth']}",
        f"backbones.ast.num_heads = {m['ast_heads']}",
        "",
        f"strategies.logit_kd.lam = {m['lam']}",
    ]
    for stage, (_, cls, teacher, tau) in CELLS.items():
        lines.append("")
        if cls == "CNN":
            lines += [f"{stage}/classifier.backbone = @backbones.efficientnet",
                      f"{stage}/classifier.pooler = @poolers.mean",
                      f"{stage}/optimizer.lr = {m['cnn_lr']}"]
        else:
            lines += [f"{stage}/classifier.backbone = @backbones.ast",
                      f"{stage}/classifier.pooler = @poolers.token",
                      f"{stage}/heads.linear.norm = True",
                      f"{stage}/optimizer.lr = {m['ast_lr']}"]
        if teacher:
            lines += [f"{stage}/train.strategy = @strategies.logit_kd",
                      f"{stage}/strategies.logit_kd.teacher = '{teacher}'",
                      f"{stage}/strategies.logit_kd.tau = {tau}"]
    return "\n".join(lines) + "\n"
