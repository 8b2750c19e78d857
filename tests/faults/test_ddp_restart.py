"""DDP fault: `cmkd run --nproc-per-node 2 --max-restarts 1` (gloo on CPU), rank 1 SIGKILLs
itself in the middle of epoch 2 on the first attempt only (a test-only strategy and a marker
file). torch elastic restarts both ranks (TORCHELASTIC_RESTART_COUNT=1 → cmkd resumes), the
run resumes from the last checkpoint — not from step 0 — and finishes with every step logged
exactly once."""

from __future__ import annotations

import os
import re

import pytest
from faultkit import FAULTS_DIR, flat
from helpers import TINY_AST, cmkd_env, read_json, read_jsonl, run_cmkd, write_gin

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
]


def test_a_killed_rank_is_restarted_by_torch_elastic_and_resumes(tmp_path):
    marker = tmp_path / "killed"
    gin_file = write_gin(tmp_path / "elastic.gin", "import ddp_toy", "import fault_plugins", TINY_AST, f"""
experiment.name = 'elastic'
train.dataset = @datasets.ddp_toy
datasets.ddp_toy.global_batch = 8
datasets.ddp_toy.steps = 3
datasets.ddp_toy.eval_samples = 5
train.batch_size = 4
train.epochs = 2
train.checkpoint_every = 1
train.log_steps = True
train.strategy = @strategies.kill_once
strategies.kill_once.at_call = 5
strategies.kill_once.rank = 1
strategies.kill_once.marker = '{marker}'
""")
    env = cmkd_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(FAULTS_DIR), env["PYTHONPATH"]])
    result = run_cmkd(["run", gin_file, "--run-dir", tmp_path / "runs", "--device", "cpu", "--nproc-per-node", "2",
                       "--max-restarts", "1"], env=env, timeout=330)
    assert result.returncode == 0, result.describe()
    assert marker.read_text().startswith("killed rank 1 at call 5"), "the fault was never injected"
    resumed = re.search(r"resuming at epoch (\d+), step (\d+)", flat(result.output))
    assert resumed, result.describe()
    # Killed during step 5 (epoch 2, step 2): the newest checkpoint is step 4, or step 3 if rank 0
    # was stopped while writing step 4's — anything but a restart from zero.
    assert resumed.group(1) == "2" and int(resumed.group(2)) in (3, 4), resumed.group(0)
    stage = tmp_path / "runs" / "elastic" / "main"
    assert [r["step"] for r in read_jsonl(stage / "steps.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_jsonl(stage / "metrics.jsonl")] == [3, 6]
    assert read_json(stage / "summary.json")["world_size"] == 2
