"""DDP with real processes (gloo on CPU): parity with one process, equal step counts with too
few shards, exact evaluation, rank 0 alone writing, and errors that end the job instead of
hanging it. Launched both ways: `python -m torch.distributed.run ... -m cmkd run` and
`cmkd run --nproc-per-node 2`."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_AST, TINY_CNN, cmkd_env, launcher, read_json, read_jsonl, run_cmkd, write_gin

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

# A hang shows up as a timeout, not a stuck session: the runs take ~20-70 s on 2 busy cores.
RUN_TIMEOUT = 240

PARITY = """
import ddp_toy
experiment.name = 'parity'
experiment.stages = ['main']
train.dataset = @datasets.ddp_toy
datasets.ddp_toy.global_batch = 8
datasets.ddp_toy.steps = 4
datasets.ddp_toy.eval_samples = 7
train.epochs = 2
train.log_steps = True
optimizer.lr = 3e-3
"""


def test_two_processes_follow_the_single_process_loss_trajectory(tmp_path):
    """Same global batch (8 = 1 x 8 = 2 x 4), no dropout/mixup/SpecAugment, an AST (LayerNorm,
    no BatchNorm, whose per-rank statistics would legitimately differ): DDP averages the two
    ranks' gradients of their half-batch means, which is the gradient of the full-batch mean.
    Every step's loss (the rank mean = the global batch's loss) must then equal the
    single-process loss up to float32 reassociation (batch sums split in two, the gradient
    all-reduce): measured ~1e-7 relative over these 8 Adam steps, so 1e-5 leaves 100x headroom.
    Without DDP (ranks neither sharing the initial weights nor averaging gradients) the losses
    are 10-50% off from the first step; the trajectory itself moves by > 0.01 every step."""
    gin = write_gin(tmp_path / "parity.gin", "import ddp_toy", TINY_AST, PARITY)
    env = cmkd_env(tmp_path)
    run_cmkd(["run", gin, "--run-dir", tmp_path / "one", "--device", "cpu", "-b", "train.batch_size = 8"],
             env=env, timeout=RUN_TIMEOUT).check()
    two = run_cmkd(["run", gin, "--run-dir", tmp_path / "two", "--device", "cpu", "-b", "train.batch_size = 4"],
                   env=env, timeout=RUN_TIMEOUT, prefix=launcher("torchrun", nproc=2)).check()

    steps1 = read_jsonl(tmp_path / "one/parity/main/steps.jsonl")
    steps2 = read_jsonl(tmp_path / "two/parity/main/steps.jsonl")
    assert [s["step"] for s in steps1] == [s["step"] for s in steps2] == list(range(1, 9))
    loss1, loss2 = np.array([s["loss"] for s in steps1]), np.array([s["loss"] for s in steps2])
    assert np.abs(np.diff(loss1)).min() > 0.01, f"the trajectory must move for the comparison to mean anything: {loss1}"
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5, atol=0)

    m1 = read_jsonl(tmp_path / "one/parity/main/metrics.jsonl")
    m2 = read_jsonl(tmp_path / "two/parity/main/metrics.jsonl")
    assert [r["step"] for r in m2] == [4, 8]
    for a, b in zip(m1, m2):  # evaluation gathered over 2 ranks = evaluation in one process
        assert a["eval_samples"] == b["eval_samples"] == 7  # odd: 4 on rank 0, 3 on rank 1
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["eval_accuracy"] == a["eval_accuracy"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert read_json(tmp_path / "one/parity/main/summary.json")["world_size"] == 1
    assert read_json(tmp_path / "two/parity/main/summary.json")["world_size"] == 2
    assert two.stdout.count("stages on the eval split") == 1  # rank 0 alone reports (and writes)
    assert "repeat a key" not in two.stderr


KD_ONE_SHARD = """
experiment.name = 'kd'
experiment.stages = ['teacher', 'student']
train.dataset = @datasets.synthetic
datasets.synthetic.num_classes = 4
datasets.synthetic.train_samples = 16
datasets.synthetic.eval_samples = 9
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.shard_size = 16
datasets.synthetic.num_workers = 2
train.batch_size = 4
student/classifier.backbone = @backbones.efficientnet
student/classifier.pooler = @poolers.mean
student/train.strategy = @strategies.logit_kd
strategies.logit_kd.teacher = 'teacher'
"""


def test_cmkd_nproc_per_node_kd_with_fewer_shards_than_readers(tmp_path):
    """`cmkd run --nproc-per-node 2`: a 2-stage KD (AST teacher, BatchNorm CNN student) on a
    synthetic set with 1 train shard for 2 ranks x 2 workers and 9 eval clips in 1 shard. Both
    ranks generate the synthetic set at once into an empty cache. It must finish (no hang),
    warn about the shards, take ceil(16 / (4 x 2)) = 2 steps per rank, score every eval clip
    exactly once, and report metrics equal to a single-process evaluation of the saved model."""
    gin = write_gin(tmp_path / "kd.gin", TINY_AST, TINY_CNN, KD_ONE_SHARD)
    env = cmkd_env(tmp_path)
    runs = tmp_path / "runs"
    res = run_cmkd(["run", gin, "--run-dir", runs, "--device", "cpu", "--nproc-per-node", "2"],
                   env=env, cwd=tmp_path, timeout=RUN_TIMEOUT).check()

    assert "1 shard(s) for 4 reader slots (2 rank(s) x 2 worker(s))" in res.stderr
    warned = [line for line in res.stderr.splitlines() if "reader slots" in line]  # a line for the user:
    assert all(line.startswith("warning: ") for line in warned) and "UserWarning" not in res.stderr  # no file:line
    assert "repeat a key" not in res.stderr  # no eval clip was scored by two ranks
    for stage in ("teacher", "student"):
        (record,) = read_jsonl(runs / "kd" / stage / "metrics.jsonl")
        assert record["step"] == 2 and record["eval_samples"] == 9, record
        summary = read_json(runs / "kd" / stage / "summary.json")
        assert summary["finished"] and summary["world_size"] == 2
        assert {"best.pt", "last.pt"} <= {p.name for p in (runs / "kd" / stage / "checkpoints").iterdir()}
        assert not [p for p in (runs / "kd" / stage).rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    teacher_best = str(runs / "kd" / "teacher" / "checkpoints" / "best.pt")
    assert read_json(runs / "kd" / "student" / "summary.json")["teachers"] == [teacher_best]
    assert f"teacher 'teacher': {teacher_best}" in res.stderr
    assert res.stdout.count("stages on the eval split") == 1

    # Both ranks generated the set concurrently: one complete copy, no half-written leftovers.
    cache = Path(env["CMKD_CACHE"]) / "synthetic"
    assert [p.name.startswith("sl4-") for p in cache.iterdir()] == [True], list(cache.iterdir())

    # Evaluate the saved student in this process: the same numbers the two ranks gathered. With
    # BatchNorm this holds only because every rank evaluates rank 0's running statistics.
    _assert_reevaluation_matches(runs / "kd" / "student", cache)


def _assert_reevaluation_matches(stage_dir: Path, cache: Path) -> None:
    import torch

    from cmkd import components
    from cmkd.data.stream import ShardDataset
    from cmkd.distill.losses import CE
    from cmkd.models.factory import load_model
    from cmkd.train.distributed import DistEnv
    from cmkd.train.evaluate import evaluate

    components.load_all()  # the checkpoint's config names experiment, backbones, ...
    (root,) = list(cache.iterdir())
    logged = read_jsonl(stage_dir / "metrics.jsonl")[-1]
    model = load_model(str(stage_dir / "checkpoints" / "best.pt"))
    ds = ShardDataset(str(root), num_workers=0)
    with torch.no_grad():
        metrics, (keys, _, _) = evaluate(DistEnv(), [model.classifier], model.featurizer, ds.eval_loader(4),
                                         ds.multilabel, CE(), amp=False)
    assert len(keys) == len(set(keys)) == logged["eval_samples"] == 9
    assert metrics["loss"] == pytest.approx(logged["eval_loss"], rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(logged["eval_accuracy"])


def test_a_failing_rank_ends_the_job_instead_of_hanging_it(tmp_path):
    """Rank 1 raises at step 1 while rank 0 waits for it in DDP's gradient all-reduce: the
    launcher must stop rank 0, name the failure and exit non-zero, long before any timeout."""
    gin = write_gin(tmp_path / "fail.gin", "import ddp_toy", TINY_AST, PARITY,
                    "datasets.ddp_toy.fail_rank = 1", "datasets.ddp_toy.fail_step = 1", "train.batch_size = 4")
    res = run_cmkd(["run", gin, "--run-dir", tmp_path / "runs", "--device", "cpu", "--nproc-per-node", "2"],
                   env=cmkd_env(tmp_path), timeout=RUN_TIMEOUT)
    assert res.returncode != 0, res.describe()
    assert "planned failure on rank 1 at step 1" in res.stderr, res.describe()
    assert "rank 1 (of 2) exited with code 1" in res.stderr, res.describe()
    assert not (tmp_path / "runs/parity/main/summary.json").exists()


def test_the_launcher_blames_the_rank_that_failed_first(tmp_path, monkeypatch):
    """Elastic's failure timestamps are whole seconds, so a rank and the peer that failed because it
    left tie; the ranks' own ns marks break it (none marked: elastic decides)."""
    from cmkd.commands.common import RANK_ERRORS, first_failed, mark_failed

    assert first_failed(str(tmp_path)) is None
    monkeypatch.setenv(RANK_ERRORS, str(tmp_path))
    mark_failed(1)
    mark_failed(0)
    assert first_failed(str(tmp_path)) == 1


def test_gather_counts_a_repeated_key_once_and_says_so():
    """The gather step is the last guard of exact metrics: a key seen twice counts once, loudly."""
    from cmkd.train.distributed import DistEnv
    from cmkd.train.evaluate import gather

    scores = np.eye(3, dtype=np.float32)
    with pytest.warns(UserWarning, match="1 prediction.* repeat a key"):
        keys, s, t = gather(DistEnv(), ["a", "b", "a"], scores, scores)
    assert keys == ["a", "b"] and s.shape == t.shape == (2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gather(DistEnv(), ["a", "b"], scores[:2], scores[:2])[0] == ["a", "b"]
