"""Bad training states: a NaN loss (injected by a test-only strategy at a given step) stops the
run with the step, the batch keys and the last good checkpoint (train.on_nan = 'raise'), or is
skipped — no update — and counted in metrics.jsonl and the progress notes (on_nan = 'skip')."""

from __future__ import annotations

import pytest
import torch
from faultkit import flat
from helpers import read_jsonl

pytestmark = [pytest.mark.timeout(300)]

NAN_RUN = """
import fault_plugins
experiment.name = 'nan'
train.dataset = @datasets.synthetic
datasets.synthetic.train_samples = 16
datasets.synthetic.eval_samples = 4
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.num_workers = 0
train.batch_size = 4
train.epochs = 2
train.checkpoint_every = 1
train.strategy = @strategies.nan_at
strategies.nan_at.at_call = 3
"""


def test_nan_loss_raises_with_step_keys_and_last_good_checkpoint(inprocess):
    from cmkd.train.loop import TrainingError

    with pytest.raises(TrainingError) as err:
        inprocess.run(NAN_RUN)
    message = flat(str(err.value))
    last = inprocess.runs / "nan" / "main" / "checkpoints" / "last.pt"
    assert "loss is nan at step 2" in message and "batch keys ['" in message, message
    assert f"the last good checkpoint is {last}" in message
    assert torch.load(last, weights_only=True)["step"] == 2  # the two good steps are kept


def test_nan_loss_skipped_and_counted(inprocess, capsys):
    inprocess.run(NAN_RUN, binds=["train.on_nan = 'skip'"])
    records = read_jsonl(inprocess.runs / "nan" / "main" / "metrics.jsonl")
    assert [(r["step"], r["nan_skipped"]) for r in records] == [(4, 1), (8, 1)]
    assert all(r["train_loss"] == r["train_loss"] for r in records), "the running loss stays finite"
    assert "1 step(s) skipped for a non-finite loss so far" in flat(capsys.readouterr().err)
