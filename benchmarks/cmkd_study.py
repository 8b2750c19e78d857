"""CMKD on real audio: CNN alone, AST alone, CNN→AST, AST→CNN and CNN→CNN (self-KD), several seeds.

    python benchmarks/cmkd_study.py                       # the full study (benchmarks/results.md, .png)
    python benchmarks/cmkd_study.py --quick               # a smoke check in minutes (results under --work)
    python benchmarks/cmkd_study.py --folds 1,2 --seeds 0,1,2 --jobs 2

Data (read only, never copied into the repository): /work/shared/data/esc10 (ESC-10, 5 folds)
and /work/shared/data/fsdd (spoken digits, 6 speakers). Both are written as shards by
`cmkd prepare` into --work, then every (dataset, fold, seed) is one `cmkd run` of a gin file this
script writes: five stages in one experiment, so the two single-model stages ARE the teachers
of the KD stages (same seed, same fold) and are trained once. A finished stage is reused, so a
stopped study continues where it was (`cmkd run --resume` also continues a half-trained stage).

Small models from scratch (no pretrained weights: none can be downloaded here), sized for a
2-core CPU; see SIZES and the notes written into results.md. The figures in results.md are
computed from the runs' summary.json files by this script, never typed in.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CMKD = [sys.executable, "-m", "cmkd"]
STAGES = ["cnn", "ast", "cnn_to_ast", "ast_to_cnn", "cnn_to_cnn"]
# stage → (label, student class, teacher stage or None)
CELLS = {
    "cnn": ("CNN alone", "CNN", None),
    "ast": ("AST alone", "AST", None),
    "cnn_to_ast": ("CNN→AST", "AST", "cnn"),
    "ast_to_cnn": ("AST→CNN", "CNN", "ast"),
    "cnn_to_cnn": ("CNN→CNN (self-KD)", "CNN", "cnn"),
}
BASELINE = {"CNN": "cnn", "AST": "ast"}
ESC_FOLDS = [1, 2, 3, 4, 5]
FSDD_SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]

# Everything that defines the study's models and training. The paper's front end (16 kHz, Kaldi
# fbank, 25 ms / 10 ms, (x - mean) / (2 std)) with 64 instead of 128 mel bins, and ESC-10 cut to
# 2.5 s windows (random in training, the first 2.5 s in evaluation): a 4x smaller input, so
# that 90 trainings fit in an hour of a 2-core CPU. Models: timm's smallest EfficientNet and a
# 3-block AST (patches 16x16, stride 10 as the paper), both about 0.1-0.4 M parameters.
SIZES: dict[str, dict[str, Any]] = {
    "esc10": dict(clip_seconds=2.5, n_mels=64, frames=248, freqm=12, timem=48, epochs=20, batch=32),
    "fsdd": dict(clip_seconds=1.0, n_mels=64, frames=100, freqm=12, timem=20, epochs=12, batch=32),
}
MODEL = dict(cnn="test_efficientnet", ast_dim=96, ast_depth=3, ast_heads=4, cnn_lr=2e-3, ast_lr=1e-3,
             lam=0.5, tau=1.0, warmup_epochs=2)


# -- data ------------------------------------------------------------------------------------------
def run_cmd(cmd: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> None:
    if log is None:
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
        return
    with open(log, "a") as fh:
        res = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
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
             "--overwrite"], log, thread_env())


def prepare_fsdd(src: Path, dest: Path, eval_speakers: list[str], takes: int, log: Path) -> None:
    if (dest / "dataset.json").exists():
        return
    print(f"preparing FSDD (eval speakers {', '.join(eval_speakers)}, takes 0-{takes - 1}) → {dest}", flush=True)
    dest.mkdir(parents=True, exist_ok=True)
    table = dest.parent / f"{dest.name}.csv"  # the label CSV lives next to the shards, outside the repo
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "labels", "split"])
        for f in sorted((src / "recordings").glob("*.wav")):
            digit, speaker, take = f.stem.split("_")
            if int(take) < takes:
                w.writerow([f.name, digit, "eval" if speaker in eval_speakers else "train"])
    # Clips (0.15-2.3 s) zero-padded or cut to 1 s at 16 kHz; norm stats from the training speakers.
    run_cmd([*CMKD, "prepare", "folder", str(src / "recordings"), str(dest), "--csv", str(table), "--name", "fsdd",
             "--clip-seconds", str(SIZES["fsdd"]["clip_seconds"]), "--shard-max-count", "50", "--workers", "0",
             "--overwrite"], log, thread_env())


# -- gin -------------------------------------------------------------------------------------------
def gin_text(dataset: str, root: Path, train_samples: int) -> str:
    steps = -(-train_samples // SIZES[dataset]["batch"])  # steps per epoch
    s, m = SIZES[dataset], MODEL
    lines = [
        f"# Written by benchmarks/cmkd_study.py: the {dataset} cell of the CMKD study. Five stages in one",
        "# experiment: the single-model stages are the teachers of the KD stages (same seed and split).",
        "include 'base.gin'",
        "include 'models.gin'",
        "",
        f"experiment.name = '{dataset}'",
        f"experiment.stages = {STAGES!r}",
        "PRETRAINED = False  # no network here: every model starts from random weights",
        "SEED = 0",
        "TRAIN_SPLITS = ['train']",
        "EVAL_SPLIT = 'eval'",
        "EPOCHS = %d" % s["epochs"],
        "train.seed = %SEED",
        "",
        "train.dataset = @datasets.webdataset",
        f"datasets.webdataset.root = '{root}'",
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
        f"strategies.logit_kd.tau = {m['tau']}",
    ]
    for stage, (_, cls, teacher) in CELLS.items():
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
                      f"{stage}/strategies.logit_kd.teacher = '{teacher}'"]
    return "\n".join(lines) + "\n"


# -- the grid --------------------------------------------------------------------------------------
@dataclass
class Group:
    """One `cmkd run`: a dataset, a train/eval split and a seed; five stages."""

    dataset: str
    split: str  # 'fold1'.. for ESC-10, 'speakers' for FSDD
    seed: int
    bindings: list[str]
    run_dir: Path
    gin: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None
    started: float = 0.0
    seen: set = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.split}/seed{self.seed}"

    def command(self) -> list[str]:
        cmd = ["cmkd", "run", str(self.gin)]
        for b in self.bindings:
            cmd += ["-b", b]
        return cmd + ["--run-dir", str(self.run_dir), "--device", "cpu", "--resume"]

    def summary(self, stage: str) -> dict[str, Any] | None:
        p = self.run_dir / self.dataset / stage / "summary.json"
        if not p.exists():
            return None
        s = json.loads(p.read_text())
        return s if s.get("finished") else None


def thread_env() -> dict[str, str]:
    # One thread per process: on 2 shared cores, intra-op threads mostly wait on each other
    # (a batched fbank ran 14x slower with 2 threads than with 1 while others used the CPU).
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def build_groups(args: argparse.Namespace, work: Path, roots: dict[str, Path]) -> list[Group]:
    gins = {}
    for ds, root in roots.items():
        manifest = json.loads((root / "dataset.json").read_text())
        if ds == "esc10":
            n = sum(v["samples"] for v in manifest["splits"].values()) * 4 // 5
        else:
            n = manifest["splits"]["train"]["samples"]
        text = gin_text(ds, root, n)
        if args.epochs:
            text = text.replace(f"EPOCHS = {SIZES[ds]['epochs']}", f"EPOCHS = {args.epochs}")
        path = work / "gin" / f"{ds}.gin"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        gins[ds] = path
    # A run folder per gin text: a finished stage is reused by cmkd, so a changed setting must not
    # land in the folder of the old one.
    tag = {ds: hashlib.sha1(path.read_text().encode()).hexdigest()[:8] for ds, path in gins.items()}
    esc, fsdd = [], []
    for seed in args.seeds:
        if "fsdd" in roots:
            fsdd.append(Group("fsdd", "speakers", seed, [f"SEED={seed}"],
                              work / "runs" / f"fsdd-{tag['fsdd']}" / f"seed{seed}", gins["fsdd"]))
    for fold in args.folds:
        for seed in args.seeds:
            if "esc10" in roots:
                train = [f"fold{f}" for f in ESC_FOLDS if f != fold]
                esc.append(Group("esc10", f"fold{fold}", seed,
                                 [f"SEED={seed}", "TRAIN_SPLITS=[%s]" % ", ".join(f'"{t}"' for t in train),
                                  f'EVAL_SPLIT="fold{fold}"'],
                                 work / "runs" / f"esc10-{tag['esc10']}" / f"fold{fold}" / f"seed{seed}",
                                 gins["esc10"]))
    # Interleaved, so that a study stopped early has both datasets (and the first folds complete).
    groups = [g for pair in itertools.zip_longest(esc, fsdd) for g in pair if g is not None]
    return groups


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_groups(groups: list[Group], jobs: int, logs: Path) -> None:
    """Run the groups, `jobs` at a time, printing each stage as it finishes (with an ETA)."""
    todo = [g for g in groups if any(g.summary(s) is None for s in STAGES)]
    total = len(groups) * len(STAGES)
    done = sum(1 for g in groups for s in STAGES if g.summary(s) is not None)
    for g in groups:
        g.seen = {s for s in STAGES if g.summary(s) is not None}
    print(f"{total} stage runs in {len(groups)} groups; {done} already finished (reused); "
          f"{len(todo)} group(s) to run, {jobs} at a time", flush=True)
    running: list[Group] = []
    failed: list[Group] = []
    # SIGTERM (e.g. `kill PID` of this script) stops the children too; a stopped study continues
    # on the next invocation (finished stages are reused, a half-trained one resumes).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _loop(todo, running, failed, jobs, logs, groups, total, done)
    except KeyboardInterrupt:
        for g in running:
            if g.proc is not None and g.proc.poll() is None:
                g.proc.terminate()
                g.proc.wait()
        raise SystemExit("stopped; run the same command again to continue")
    if failed:
        raise SystemExit(f"{len(failed)} group(s) failed: {', '.join(g.name for g in failed)}")


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _loop(todo: list[Group], running: list[Group], failed: list[Group], jobs: int, logs: Path,
          groups: list[Group], total: int, done: int) -> None:
    t0 = time.time()
    fresh_done = 0
    while todo or running:
        while todo and len(running) < jobs:
            g = todo.pop(0)
            g.log = logs / f"{g.dataset}-{g.split}-seed{g.seed}.log"
            g.started = time.time()
            cmd = [*CMKD, *g.command()[1:]]
            with open(g.log, "a") as fh:
                fh.write(f"\n$ {shlex.join(g.command())}\n")
                g.proc = subprocess.Popen(cmd, cwd=REPO, env=thread_env(), stdout=fh, stderr=subprocess.STDOUT)
            print(f"  start {g.name}  (log {g.log})", flush=True)
            running.append(g)
        time.sleep(3)
        for g in list(running):
            for s in STAGES:
                if s in g.seen:
                    continue
                summ = g.summary(s)
                if summ is None:
                    continue
                g.seen.add(s)
                done += 1
                fresh_done += 1
                elapsed = time.time() - t0
                eta = elapsed / fresh_done * (total - done)  # from this invocation's pace
                acc = summ["last"].get("eval_accuracy", float("nan"))
                print(f"[{done:3d}/{total}] {g.name:24s} {CELLS[s][0]:18s} acc {acc:.3f} "
                      f"({summ['seconds']:.0f} s)  elapsed {fmt_time(elapsed)}  ETA {fmt_time(eta)}", flush=True)
            if g.proc is not None and g.proc.poll() is not None:
                running.remove(g)
                if g.proc.returncode != 0:
                    failed.append(g)
                    print(f"  FAILED {g.name} (exit {g.proc.returncode}); see {g.log}", flush=True)


# -- results ---------------------------------------------------------------------------------------
def collect(groups: list[Group]) -> dict[str, Any]:
    """{dataset: {stage: [(split, seed, acc, seconds, teacher_acc)]}} from the runs' summaries."""
    out: dict[str, Any] = {}
    for g in groups:
        summaries = {s: g.summary(s) for s in STAGES}
        if any(v is None for v in summaries.values()):
            continue  # only complete groups: every comparison is paired within one (split, seed)
        for s, summ in summaries.items():
            acc = summ["last"]["eval_accuracy"]
            # Time from the per-epoch records (train + eval): summary.json's "seconds" counts only the
            # last process of a stage that was stopped and resumed.
            history = (g.run_dir / g.dataset / s / "metrics.jsonl").read_text().splitlines()
            seconds = sum(json.loads(line)["epoch_seconds"] for line in history if line.strip())
            out.setdefault(g.dataset, {}).setdefault(s, []).append(
                dict(split=g.split, seed=g.seed, acc=acc, best=summ["best"]["eval_accuracy"], seconds=seconds,
                     params=summ["params"]))
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(xs: list[float], scale: float = 100.0, signed: bool = False) -> str:
    m, s = mean_std(xs)
    return f"{m * scale:+.1f} ± {s * scale:.1f}" if signed else f"{m * scale:.1f} ± {s * scale:.1f}"


def paired(rows: dict[str, list[dict]], a: str, b: str) -> list[float]:
    """acc(a) - acc(b) for the runs of both stages with the same split and seed."""
    other = {(r["split"], r["seed"]): r["acc"] for r in rows.get(b, [])}
    return [r["acc"] - other[(r["split"], r["seed"])] for r in rows.get(a, []) if (r["split"], r["seed"]) in other]


def dataset_table(rows: dict[str, list[dict]]) -> list[str]:
    head = ["| cell | student | student acc. % | teacher | teacher acc. % | student − teacher (pp) | "
            "student − same-class baseline (pp) | better than baseline | runs | train time per run |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    body = []
    for stage, (label, cls, teacher) in CELLS.items():
        rs = rows.get(stage, [])
        if not rs:
            continue
        accs = [r["acc"] for r in rs]
        t_label = CELLS[teacher][0].replace(" alone", "") if teacher else "–"
        t_acc = pm([r["acc"] for r in rows.get(teacher, [])]) if teacher else "–"
        vs_t = pm(paired(rows, stage, teacher), signed=True) if teacher else "–"
        base = BASELINE[cls]
        if base != stage:
            d = paired(rows, stage, base)
            vs_b, wins = pm(d, signed=True), f"{sum(x > 0 for x in d)}/{len(d)} (ties {sum(x == 0 for x in d)})"
        else:
            vs_b, wins = "(baseline)", "–"
        secs = statistics.fmean(r["seconds"] for r in rs)
        body.append(f"| {label} | {cls} ({rs[0]['params'] / 1e6:.2f} M) | **{pm(accs)}** | {t_label} | {t_acc} | "
                    f"{vs_t} | {vs_b} | {wins} | {len(rs)} | {secs:.0f} s |")
    return head + body


def machine() -> str:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), no GPU; "
            f"Python {platform.python_version()}, torch {torch.__version__}; "
            f"each `cmkd run` on 1 thread")


def plot(results: dict[str, Any], path: Path, title_extra: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [d for d in ("esc10", "fsdd") if d in results]
    fig, axes = plt.subplots(1, len(names), figsize=(6.4 * len(names), 5.0), squeeze=False)
    colors = {"CNN": "#3b75af", "AST": "#ef8636"}
    for ax, ds in zip(axes[0], names):
        rows = results[ds]
        stages = [s for s in STAGES if s in rows]
        for i, s in enumerate(stages):
            label, cls, teacher = CELLS[s]
            accs = [100 * r["acc"] for r in rows[s]]
            m, sd = mean_std(accs)
            ax.bar(i, m, width=0.62, color=colors[cls], alpha=0.9 if teacher else 0.55,
                   hatch=None if teacher else "//", edgecolor="black", linewidth=0.6)
            ax.errorbar(i, m, yerr=sd, color="black", capsize=5, linewidth=1.3)
            jitter = [(k % 5 - 2) * 0.06 for k in range(len(accs))]
            ax.scatter([i + j for j in jitter], accs, s=9, color="black", alpha=0.45, zorder=3)
            ax.text(i, m + sd + 1.2, f"{m:.1f}", ha="center", va="bottom", fontsize=10)
            if teacher:  # the teacher's mean as a dashed line across the student's bar
                tm = mean_std([100 * r["acc"] for r in rows[teacher]])[0]
                ax.plot([i - 0.31, i + 0.31], [tm, tm], color="black", linestyle="--", linewidth=1.2)
        ax.set_xticks(range(len(stages)))
        ax.set_xticklabels([CELLS[s][0].replace(" (self-KD)", "\n(self-KD)") for s in stages], fontsize=10)
        ax.set_ylabel("eval accuracy, last epoch (%)")
        ax.set_title(title_extra.get(ds, ds), fontsize=11)
        top = max(100 * r["acc"] for s in stages for r in rows[s])
        ax.set_ylim(0, min(100, top + 12))
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colors["CNN"], alpha=0.55, hatch="//", edgecolor="black", label="CNN alone (teacher)"),
               Patch(facecolor=colors["AST"], alpha=0.55, hatch="//", edgecolor="black", label="AST alone (teacher)"),
               Patch(facecolor=colors["CNN"], edgecolor="black", label="CNN student"),
               Patch(facecolor=colors["AST"], edgecolor="black", label="AST student"),
               Line2D([], [], color="black", linestyle="--", label="its teacher's mean"),
               Line2D([], [], color="black", marker="o", linestyle="", markersize=3, label="one run")]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=9, frameon=False)
    fig.suptitle("CMKD at small scale, from scratch (mean ± std over runs; bars: mean, whiskers: std)", fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(args: argparse.Namespace, groups: list[Group], results: dict[str, Any], work: Path,
                  md: Path, png: Path, wall: dict[str, Any]) -> str:
    esc_folds = sorted({r["split"] for r in results.get("esc10", {}).get("cnn", [])})

    def seeds_of(ds: str) -> str:
        seeds = sorted({r["seed"] for r in results.get(ds, {}).get("cnn", [])})
        return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"

    titles = {
        "esc10": f"ESC-10: {len(esc_folds)} of 5 folds held out in turn × {seeds_of('esc10')}",
        "fsdd": f"FSDD: speakers {' + '.join(args.fsdd_eval_speakers)} held out × {seeds_of('fsdd')}",
    }
    plot(results, png, titles)
    if args.docs:
        update_docs(REPO / "docs" / "distillation.md", results, md, titles)
    n_runs = sum(len(v) for r in results.values() for v in r.values())
    stage_seconds = sum(x["seconds"] for r in results.values() for v in r.values() for x in v)
    e, f = SIZES["esc10"], SIZES["fsdd"]
    m = MODEL
    L = [
        "# CMKD on real audio: a small-scale study",
        "",
        "Written by `benchmarks/cmkd_study.py` from the runs' `summary.json` files; every figure here is measured",
        "by that script. Method: Gong et al. 2022 (CMKD) as implemented by cmkd (`docs/distillation.md`).",
        "",
        f"- **Command:** `{args.command}`",
        f"- **Machine:** {machine()}; {args.jobs} `cmkd run` processes at a time. Other engineers shared the 2 cores "
        f"for part of the run (load average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}).",
        f"- **Wall time:** {fmt_time(wall.get('last_end', time.time()) - wall['first_start'])} from the study's "
        f"first start to its last run (data preparation included; {wall['invocations']} invocation(s) of the script, "
        f"which ran {fmt_time(wall['running'])} of it); {fmt_time(stage_seconds)} of training time summed over the "
        f"{n_runs} stage runs ({args.jobs} at a time).",
        "- **No pretrained weights.** The paper starts both models from ImageNet weights; nothing can be downloaded "
        "here, so every model is trained from random initialisation (`PRETRAINED = False`).",
        f"- **Runs:** {n_runs} stage runs = {len(groups)} `cmkd run` groups (dataset × split × seed) × 5 stages. In "
        "each group one experiment has the stages `cnn`, `ast`, `cnn_to_ast`, `ast_to_cnn`, `cnn_to_cnn`: the two "
        "single-model stages are trained once and ARE the teachers of the three KD stages (same seed, same split).",
        "",
        "## Setup",
        "",
        f"- **ESC-10** (`/work/shared/data/esc10`, 400 clips, 10 classes): {len(esc_folds)}-fold cross-validation on "
        f"the given folds ({', '.join(esc_folds)} held out in turn; train on the other four, 320 clips). Clips are "
        f"cut to {e['clip_seconds']} s: a random window in training, the first {e['clip_seconds']} s in "
        f"evaluation ({e['frames']} frames). Normalisation statistics: all folds (as `cmkd prepare esc50` does).",
        f"- **FSDD** (`/work/shared/data/fsdd`, spoken digits, 6 speakers): speaker-disjoint split, speakers "
        f"{', '.join(args.fsdd_eval_speakers)} held out for evaluation; takes 0–{args.fsdd_takes - 1} of each "
        f"speaker and digit ({args.fsdd_takes * 10 * 4} training clips, {args.fsdd_takes * 10 * 2} evaluation "
        f"clips); 8 kHz WAV resampled to 16 kHz, zero-padded (or cut) to 1 s ({f['frames']} frames). "
        "Normalisation statistics: training speakers only.",
        f"- **Front end:** the paper's Kaldi fbank (16 kHz, 25 ms Hanning, 10 ms shift, (x − mean)/(2·std)) with "
        f"**{e['n_mels']} mel bins** instead of 128 — with the shorter ESC-10 window a 4× smaller input, so that the "
        "grid fits an hour of a 2-core CPU. SpecAugment "
        f"(ESC-10 freqm {e['freqm']} / timem {e['timem']}, FSDD {f['freqm']} / {f['timem']}), no mixup.",
        f"- **CNN:** `{m['cnn']}` (timm's smallest EfficientNet), mean-pooled map → linear head; Adam lr "
        f"{m['cnn_lr']}. **AST:** patches 16×16 with stride 10 (overlap 6, as the paper), embed {m['ast_dim']}, "
        f"depth {m['ast_depth']}, {m['ast_heads']} heads, CLS + distillation tokens → LayerNorm + linear; Adam lr "
        f"{m['ast_lr']}. Batch 32, cosine schedule with {m['warmup_epochs']} warm-up epochs; ESC-10 {e['epochs']} "
        f"epochs, FSDD {f['epochs']} epochs. Softmax + cross-entropy.",
        "- **KD:** `strategies.logit_kd`, the paper's loss λ·CE + (1−λ)·KL(softmax(Zt/τ) ‖ softmax(Zs)), "
        f"λ = {m['lam']}, "
        f"τ = {m['tau']}; the frozen teacher sees the student's exact augmented input. The teacher is its stage's "
        "**last** checkpoint (`train.teacher_checkpoint = 'last'`): the 'best' epoch is picked on the eval split and "
        "would leak it into the student.",
        "- **Metric:** accuracy on the held-out split after the **last** epoch (no epoch selection on the eval data). "
        "mean ± std over all runs of a cell (seeds, and folds for ESC-10). "
        "The paired columns compare runs with the same "
        "split and seed (same initialisation of the student's class and the same data order as its baseline).",
        "",
    ]
    for ds in ("esc10", "fsdd"):
        if ds not in results:
            continue
        L += [f"## {titles[ds]}", ""] + dataset_table(results[ds]) + [""]
        if ds == "esc10":
            L += ["Per fold (mean over seeds, %):", "", "| fold | " + " | ".join(CELLS[s][0] for s in STAGES) + " |",
                  "|---" * (len(STAGES) + 1) + "|"]
            for fold in esc_folds:
                cells = []
                for s in STAGES:
                    xs = [r["acc"] for r in results[ds].get(s, []) if r["split"] == fold]
                    cells.append(f"{100 * statistics.fmean(xs):.1f}" if xs else "–")
                L.append(f"| {fold} | " + " | ".join(cells) + " |")
            L.append("")
    L += [f"![CMKD study]({png.name})", "", "## Do the paper's findings hold at this scale?", "",
          "VERDICT_PLACEHOLDER", ""]
    L += ["## Reproduce", "", "```", args.command, "```", "",
          "The gin files the script wrote (one per dataset; the folds and seeds are `-b` bindings) and the exact "
          "`cmkd run` commands:", "", "```"]
    shown = set()
    for g in groups:
        if g.dataset not in shown:
            shown.add(g.dataset)
            L.append(shlex.join(g.command()))
    L += ["```", ""]
    for ds in sorted({g.dataset for g in groups}):
        L += [f"`{ds}.gin`:", "", "```", (work / "gin" / f"{ds}.gin").read_text().rstrip(), "```", ""]
    text = "\n".join(L)
    old = md.read_text() if md.exists() else ""
    if "<!-- verdict -->" in old:  # keep a hand-written verdict section across re-runs of the script
        verdict = old.split("<!-- verdict -->")[1]
        text = text.replace("VERDICT_PLACEHOLDER", f"<!-- verdict -->{verdict}<!-- verdict -->")
    else:
        text = text.replace("VERDICT_PLACEHOLDER", auto_verdict(results))
    md.write_text(text)
    return text


def auto_verdict(results: dict[str, Any]) -> str:
    """The three comparisons as measured (paired means and run counts), no interpretation."""
    out = []
    for ds, rows in results.items():
        parts = []
        for a, b, what in (("cnn_to_ast", "ast", "CNN→AST vs AST alone"), ("ast_to_cnn", "cnn", "AST→CNN vs CNN alone"),
                           ("cnn_to_cnn", "cnn", "CNN→CNN vs CNN alone"), ("cnn_to_ast", "cnn", "CNN→AST vs its "
                                                                                                "teacher"),
                           ("ast_to_cnn", "ast", "AST→CNN vs its teacher")):
            d = paired(rows, a, b)
            if d:
                parts.append(f"{what}: {pm(d, signed=True)} pp ({sum(x > 0 for x in d)}/{len(d)} runs better)")
        out.append(f"- {ds}: " + "; ".join(parts))
    return "\n".join(out)


def update_docs(docs: Path, results: dict[str, Any], md: Path, titles: dict[str, str]) -> None:
    """Replace the body of docs/distillation.md's "Results on real audio" section (only that section)."""
    heading = "## Results on real audio"
    text = docs.read_text()
    if heading not in text:
        print(f"warning: {docs} has no '{heading}' section; not updated")
        return
    start = text.index(heading) + len(heading)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    old = text[start:end]
    summary = old.split("<!-- summary -->")[1] if old.count("<!-- summary -->") == 2 else "\n"
    rel = os.path.relpath(md, docs.parent)
    lines = ["", "", "Accuracy (%, mean ± std over runs, last epoch) of small models trained **from scratch** (no "
             "pretrained weights) on real audio with the paper's loss (`logit_kd`, λ = 0.5, τ = 1); in each run the "
             "single-model stages are the teachers of the KD stages. Written by `benchmarks/cmkd_study.py`; setup, "
             f"per-fold numbers, paired differences, the plot and the exact commands: [{md.name}]({rel}).", "",
             "| data | runs | " + " | ".join(CELLS[s][0] for s in STAGES) + " |", "|---" * (len(STAGES) + 2) + "|"]
    for ds, rows in results.items():
        n = len(rows.get("cnn", []))
        lines.append(f"| {titles[ds]} | {n} | " + " | ".join(pm([r["acc"] for r in rows.get(s, [])]) for s in STAGES)
                     + " |")
    lines += ["", f"<!-- summary -->{summary}<!-- summary -->", ""]
    docs.write_text(text[:start] + "\n".join(lines) + ("\n" + text[end:] if end < len(text) else ""))


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/work/shared/data"), help="holds esc10/ and fsdd/")
    p.add_argument("--work", type=Path, default=Path("/tmp/cmkd_study"),
                   help="prepared shards, gin files, runs and logs (outside the repository)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--folds", default="1,2,3,4,5", help="ESC-10 folds held out in turn")
    p.add_argument("--datasets", default="esc10,fsdd")
    p.add_argument("--fsdd-eval-speakers", default="nicolas,theo")
    p.add_argument("--fsdd-takes", type=int, default=25, help="takes 0..N-1 of each speaker and digit (of 50)")
    p.add_argument("--epochs", type=int, default=0, help="override the epochs of every stage (0: SIZES)")
    p.add_argument("--jobs", type=int, default=2, help="`cmkd run` processes at a time (each on 1 thread)")
    p.add_argument("--quick", action="store_true", help="tiny smoke check: 1 seed, 1 fold, 2 epochs, few FSDD takes")
    p.add_argument("--report-only", action="store_true", help="only rewrite results.md/.png from finished runs")
    p.add_argument("--out", type=Path, default=None, help="results markdown (default benchmarks/results.md; "
                                                         "--quick: <work>/quick/results.md)")
    p.add_argument("--no-docs", dest="docs", action="store_false",
                   help="leave docs/distillation.md alone (--quick never touches it)")
    args = p.parse_args()
    args.command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    if args.quick:
        args.docs = False
        args.work = args.work / "quick"
        args.seeds, args.folds, args.epochs, args.fsdd_takes = "0", "1", args.epochs or 2, min(args.fsdd_takes, 3)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    args.folds = [int(f) for f in str(args.folds).split(",") if f != ""]
    args.fsdd_eval_speakers = [s for s in args.fsdd_eval_speakers.split(",") if s]
    datasets = [d for d in args.datasets.split(",") if d]
    if bad := [f for f in args.folds if f not in ESC_FOLDS]:
        p.error(f"--folds {bad}: ESC-10 has folds 1-5")
    if bad := [s for s in args.fsdd_eval_speakers if s not in FSDD_SPEAKERS]:
        p.error(f"--fsdd-eval-speakers {bad}: FSDD speakers are {FSDD_SPEAKERS}")
    md = args.out or (args.work / "results.md" if args.quick else REPO / "benchmarks" / "results.md")
    png = md.with_suffix(".png")
    work = args.work.resolve()
    if REPO in work.parents or work == REPO:
        p.error(f"--work {work} is inside the repository; the prepared audio must stay outside it")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    roots: dict[str, Path] = {}
    if "esc10" in datasets:
        roots["esc10"] = work / "data" / "esc10"
        if not args.report_only:
            prepare_esc10(args.data / "esc10", roots["esc10"], logs / "prepare.log")
    if "fsdd" in datasets:
        spk = "-".join(args.fsdd_eval_speakers)
        roots["fsdd"] = work / "data" / f"fsdd-eval_{spk}-takes{args.fsdd_takes}"
        if not args.report_only:
            prepare_fsdd(args.data / "fsdd", roots["fsdd"], args.fsdd_eval_speakers, args.fsdd_takes,
                         logs / "prepare.log")
    groups = build_groups(args, work, roots)
    # Wall time: from the first invocation's start (a study may be stopped and continued) to now,
    # and the time the script itself ran. Without a ledger yet, the first start is the oldest log.
    ledger = work / "wall_time.json"
    if ledger.exists():
        wall = json.loads(ledger.read_text())
    else:
        oldest = min([f.stat().st_mtime for f in logs.iterdir()] + [t0])
        wall = {"first_start": oldest, "running": 0.0, "invocations": 0}
        ledger.write_text(json.dumps(wall))
    if not args.report_only:
        print(f"work dir {work}; {len(groups)} groups; commands like:\n  {shlex.join(groups[0].command())}", flush=True)
        try:
            run_groups(groups, args.jobs, logs)
        finally:
            wall["running"] += time.time() - t0
            wall["invocations"] += 1
            wall["last_end"] = time.time()
            ledger.write_text(json.dumps(wall))
    results = collect(groups)
    write_results(args, groups, results, work, md, png, wall)
    print(f"wrote {md} and {png}")
    for ds, rows in results.items():
        print(f"\n{ds}:")
        print("\n".join(dataset_table(rows)))


if __name__ == "__main__":
    main()
