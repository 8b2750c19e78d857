"""Saved configs are data, not code (issue 14, finding 1): hostile checkpoints and run-folder
configs — gin dynamic registration binding ``@os.system()``, a stealth variant on a backbone
parameter, ``import subprocess`` with ``@subprocess.call`` — go through every command that loads
a checkpoint or a run config (predict, eval, embed, export, report, average, a KD teacher in
`cmkd run`, `cmkd run --resume`). Each runs nothing (the marker file never appears), exits 2 and
prints one `error:` line naming the offending line, with no traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from faultkit import flat
from helpers import TINY_AST, cmkd_env, run_cmkd, write_gin

pytestmark = [pytest.mark.timeout(300)]

DATA = """
experiment.name = 'sec'
train.dataset = @datasets.synthetic
datasets.synthetic.num_classes = 3
datasets.synthetic.train_samples = 8
datasets.synthetic.eval_samples = 6
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.shard_size = 8
datasets.synthetic.num_workers = 0
train.batch_size = 4
"""


def payloads(marker: Path) -> dict[str, tuple[str, str]]:
    """name → (lines appended to the saved config, the line the error must name). Appended, the
    dynamic-registration payloads really run on a cmkd without the check (gin reuses the
    registered configurable when the module path names it): checked by hand against the code
    before this fix; the marker file appeared, and the stealth one exited 0."""
    touch = f"touch {marker}"
    dynamic = f"from __gin__ import dynamic_registration\nimport os\nos.system.command = {touch!r}\n"
    return {
        # The finding as reported: dynamic registration, then a binding that calls os.system.
        "dynamic": (dynamic + "import cmkd.models.classifier\n"
                              "cmkd.models.classifier.build_classifier.head = @os.system()\n",
                    "from __gin__ import dynamic_registration"),
        # Stealth: the call hides in a backbone parameter (os.system returns 0, a valid drop-path rate).
        "stealth": (dynamic + "import cmkd.models.backbones.ast\n"
                              "cmkd.models.backbones.ast.ast.drop_path_rate = @os.system()\n",
                    "from __gin__ import dynamic_registration"),
        "subprocess": ("import subprocess\nbackbones.ast.drop_path_rate = @subprocess.call()\n", "import subprocess"),
        # No import line at all: a reference to a configurable that cmkd never registered.
        "reference": ("backbones.ast.drop_path_rate = @subprocess.call()\n", "@subprocess.call()"),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One real tiny run (subprocess), its synthetic data and a clip."""
    base = tmp_path_factory.mktemp("hostile")
    gin_file = write_gin(base / "exp.gin", TINY_AST, DATA, "train.epochs = 2")
    run_cmkd(["run", gin_file, "--run-dir", base / "runs", "--device", "cpu"], env=cmkd_env(base)).check()
    (data,) = (base / "cmkd-cache" / "synthetic").iterdir()
    wav = base / "clip.wav"
    sf.write(wav, np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1, 16000)
    return {"base": base, "gin": Path(gin_file), "stage": base / "runs" / "sec" / "main", "data": data, "wav": wav}


def hostile_checkpoint(source: Path, out: Path, payload: str) -> Path:
    """``source`` (a real checkpoint) with ``payload`` put into its saved config, as an attacker would."""
    from cmkd.train import checkpoint

    ckpt = torch.load(source, weights_only=True)
    ckpt["config"] = ckpt["config"] + payload
    for key in ("format", "format_version", "cmkd_version"):
        ckpt.pop(key, None)
    checkpoint.save(str(out), ckpt)
    return out


def assert_refused(result, offending: str, marker: Path) -> None:
    out = result.output
    assert not marker.exists(), f"the payload ran:\n{out}"
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    assert offending in flat(out) and "refused" in out, out


@pytest.mark.parametrize("command", ["predict", "eval", "embed", "export", "average"])
def test_a_hostile_checkpoint_runs_nothing(trained, tmp_path, command):
    marker = tmp_path / "PWNED"
    payload, offending = payloads(marker)["dynamic"]
    best = trained["stage"] / "checkpoints" / "best.pt"
    evil = hostile_checkpoint(best, tmp_path / "evil.pt", payload)
    args = {
        "predict": ["predict", evil, trained["wav"], "--device", "cpu"],
        "eval": ["eval", evil, trained["data"], "--device", "cpu"],
        "embed": ["embed", evil, trained["wav"], "-o", tmp_path / "emb.npy", "--device", "cpu"],
        "export": ["export", evil, "-f", "torchscript", "-o", tmp_path / "model.pt"],
        "average": ["average", best, evil, "-o", tmp_path / "avg.pt"],
    }[command]
    result = run_cmkd(args, env=cmkd_env(tmp_path))
    assert_refused(result, offending, marker)
    assert not (tmp_path / "avg.pt").exists()  # average copied no payload into a new checkpoint


@pytest.mark.parametrize("variant", ["stealth", "subprocess", "reference"])
def test_every_payload_variant_is_refused_by_predict(trained, tmp_path, variant):
    marker = tmp_path / "PWNED"
    payload, offending = payloads(marker)[variant]
    evil = hostile_checkpoint(trained["stage"] / "checkpoints" / "best.pt", tmp_path / "evil.pt", payload)
    assert_refused(run_cmkd(["predict", evil, trained["wav"], "--device", "cpu"], env=cmkd_env(tmp_path)),
                   offending, marker)


def test_an_edited_config_gin_is_refused_by_report(trained, tmp_path):
    marker = tmp_path / "PWNED"
    payload, offending = payloads(marker)["dynamic"]
    run = tmp_path / "runs" / "sec"
    shutil.copytree(trained["stage"].parent, run)
    gin_file = run / "main" / "config.gin"
    gin_file.write_text(gin_file.read_text() + payload)
    assert_refused(run_cmkd(["report", run, "--device", "cpu"], env=cmkd_env(tmp_path)), offending, marker)


def test_a_hostile_teacher_checkpoint_is_refused_by_run(trained, tmp_path):
    marker = tmp_path / "PWNED"
    payload, offending = payloads(marker)["stealth"]
    evil = hostile_checkpoint(trained["stage"] / "checkpoints" / "best.pt", tmp_path / "evil.pt", payload)
    gin_file = write_gin(tmp_path / "kd.gin", TINY_AST, DATA, "experiment.name = 'kd'",
                         "train.strategy = @strategies.logit_kd", f"strategies.logit_kd.teacher = '{evil}'")
    result = run_cmkd(["run", gin_file, "--run-dir", tmp_path / "runs", "--device", "cpu"], env=cmkd_env(tmp_path))
    assert_refused(result, offending, marker)


def test_a_hostile_last_pt_is_refused_by_resume(trained, tmp_path):
    marker = tmp_path / "PWNED"
    payload, offending = payloads(marker)["dynamic"]
    runs = tmp_path / "runs"
    shutil.copytree(trained["stage"].parent, runs / "sec")
    stage = runs / "sec" / "main"
    (stage / "summary.json").unlink()  # stopped part-way: --resume loads last.pt
    last = stage / "checkpoints" / "last.pt"
    hostile_checkpoint(last, last, payload)
    result = run_cmkd(["run", trained["gin"], "--run-dir", runs, "--device", "cpu", "--resume"],
                      env=cmkd_env(trained["base"]))
    assert_refused(result, offending, marker)
