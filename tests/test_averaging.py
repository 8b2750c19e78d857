"""Weight averaging: hand-made state dicts, `cmkd average` on real checkpoints, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cmkd import components, config
from cmkd.cli import app
from cmkd.experiment import Experiment, resolve_teacher
from cmkd.models.classifier import build_classifier
from cmkd.models.factory import build_frontend, load_model
from cmkd.train import checkpoint
from cmkd.train.averaging import LastEpochs, RunningMean, average_state_dicts
from cmkd.train.checkpoint import CheckpointError

# A tiny but real model config: load_model rebuilds it from the checkpoint alone.
TINY_CONFIG = """
frontend.featurizer = @featurizers.fbank
featurizers.fbank.n_mels = 32
featurizers.fbank.target_frames = 30
classifier.backbone = @backbones.ast
classifier.pooler = @poolers.token
backbones.ast.embed_dim = 16
backbones.ast.depth = 1
backbones.ast.num_heads = 2
"""
CLASSES = ["a", "b", "c"]


def test_mean_of_three_hand_made_state_dicts() -> None:
    sds = [
        {"w": torch.tensor([1.0, 2.0]), "bn.running_var": torch.tensor([0.5]),
         "bn.num_batches_tracked": torch.tensor(3)},
        {"w": torch.tensor([4.0, -2.0]), "bn.running_var": torch.tensor([1.5]),
         "bn.num_batches_tracked": torch.tensor(7)},
        {"w": torch.tensor([7.0, 3.0]), "bn.running_var": torch.tensor([4.0]),
         "bn.num_batches_tracked": torch.tensor(11)},
    ]
    avg = average_state_dicts(sds)
    assert torch.equal(avg["w"], torch.tensor([4.0, 1.0]))  # (1+4+7)/3, (2-2+3)/3
    assert avg["bn.running_var"].item() == pytest.approx(2.0)  # (0.5+1.5+4)/3
    # integer buffers are not averaged (7.0 would be the mean): the last one is kept
    assert avg["bn.num_batches_tracked"].item() == 11 and avg["bn.num_batches_tracked"].dtype == torch.int64
    assert avg["w"].dtype == torch.float32
    assert torch.equal(sds[0]["w"], torch.tensor([1.0, 2.0]))  # inputs untouched


def test_average_of_real_batchnorm_modules() -> None:
    mods = []
    for k in range(3):
        m = nn.BatchNorm1d(2)
        with torch.no_grad():
            m.weight.fill_(k + 1.0)
            m.running_mean.fill_(10.0 * k)
        m.num_batches_tracked.fill_(100 + k)
        mods.append(m.state_dict())
    avg = average_state_dicts(mods)
    target = nn.BatchNorm1d(2)
    target.load_state_dict(avg)  # loads back into the same module type
    assert torch.allclose(target.weight, torch.full((2,), 2.0))
    assert torch.allclose(target.running_mean, torch.full((2,), 10.0))
    assert int(target.num_batches_tracked) == 102


def test_mismatched_state_dicts_are_refused() -> None:
    mean = RunningMean("here")
    mean.add({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="other tensors"):
        mean.add({"v": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        mean.add({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="nothing to average"):
        RunningMean("x").result()


def test_average_last_bounds() -> None:
    with pytest.raises(ValueError, match=r"train.average_last = 5 must be between 0 \(off\) and train.epochs = 3"):
        LastEpochs(5, 3, "/tmp/x")
    assert not LastEpochs(0, 3, "/tmp/x").enabled
    assert LastEpochs(2, 3, "/tmp/x").first == 2


def test_teacher_resolution_explains_missing_averaged_checkpoint(tmp_path) -> None:
    exp = Experiment(name="x", stages=("teacher", "student"))
    ckpts = tmp_path / "x" / "teacher" / "checkpoints"
    ckpts.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="list 'teacher' before"):  # not trained: the plain message
        resolve_teacher(exp, str(tmp_path), "student", "teacher", "averaged")
    for name in ("best.pt", "last.pt"):
        (ckpts / name).write_bytes(b"")
    assert resolve_teacher(exp, str(tmp_path), "student", "teacher", "best") == str(ckpts / "best.pt")
    with pytest.raises(CheckpointError, match=r"teacher/train.average_last = N .*'best' or 'last'"):
        resolve_teacher(exp, str(tmp_path), "student", "teacher", "averaged")
    assert resolve_teacher(exp, str(tmp_path), "student", "/elsewhere/t.pt", "best") == "/elsewhere/t.pt"


def _tiny_checkpoints(tmp_path: Path, n: int = 3, classes: list[str] = CLASSES, config_text: str = TINY_CONFIG,
                      prefix: str = "ep") -> tuple[list[str], list[dict]]:
    components.load_all()
    urls, states = [], []
    with config.isolated(config_text):
        featurizer = build_frontend(sample_rate=16000, dataset_norm=(-4.0, 4.0))
        model = build_classifier(num_classes=len(classes), in_shape=tuple(featurizer.out_shape))
    for k in range(n):
        torch.manual_seed(k)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        state = {key: v.clone() for key, v in model.state_dict().items()}
        url = str(tmp_path / f"{prefix}{k}.pt")
        checkpoint.save(url, dict(experiment="x", stage="s", config=config_text, classes=classes, multilabel=True,
                                  sample_rate=16000, clip_samples=4000, norm=[-4.0, 4.0], model=state,
                                  optimizer={}, epoch=k + 1, step=10 * (k + 1), metrics={"eval_mAP": 0.1 * k}))
        urls.append(url)
        states.append(state)
    return urls, states


def test_cmkd_average_cli_writes_a_loadable_mean(tmp_path: Path) -> None:
    urls, states = _tiny_checkpoints(tmp_path)
    out = tmp_path / "avg" / "averaged.pt"
    res = CliRunner().invoke(app, ["average", *urls, "-o", str(out)])  # the real `cmkd` app, in-process
    assert res.exit_code == 0, res.output
    ckpt = checkpoint.load(str(out))
    for key, v in ckpt["model"].items():
        expected = (states[0][key].double() + states[1][key].double() + states[2][key].double()) / 3
        assert torch.allclose(v.double(), expected, atol=1e-6), key
    assert ckpt["averaged_from"] == urls and ckpt["epoch"] == 3 and "optimizer" not in ckpt
    loaded = load_model(str(out))  # self-describing: rebuilds from the averaged checkpoint alone
    wave = torch.randn(2, 4000)
    assert loaded.logits(wave).shape == (2, 3)


def test_cmkd_average_refuses_other_classes_and_configs(tmp_path: Path) -> None:
    urls, _ = _tiny_checkpoints(tmp_path, n=2)
    other, _ = _tiny_checkpoints(tmp_path, n=1, classes=["a", "b", "z"], prefix="other")
    runner = CliRunner()
    res = runner.invoke(app, ["average", urls[0], other[0], "-o", str(tmp_path / "o.pt")])
    assert res.exit_code == 2 and "classes" in res.output and "same model" in res.output
    tweaked, _ = _tiny_checkpoints(tmp_path, n=1, config_text=TINY_CONFIG + "train.epochs = 7\n", prefix="cfg")
    res = runner.invoke(app, ["average", urls[0], tweaked[0], "-o", str(tmp_path / "o.pt")], terminal_width=200)
    assert res.exit_code == 2 and "different configs" in res.output and "train.epochs = 7" in res.output
    assert "--allow-config-mismatch" in res.output
    res = runner.invoke(app, ["average", urls[0], tweaked[0], "-o", str(tmp_path / "o.pt"), "--allow-config-mismatch"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["average", urls[0], "-o", str(tmp_path / "o.pt")])
    assert res.exit_code == 2 and "at least two" in res.output


def test_cmkd_average_tells_a_foreign_file_from_a_damaged_checkpoint(tmp_path: Path) -> None:
    """A file that never was a checkpoint is "not a cmkd checkpoint"; a real one cut short keeps the
    truncated/fall-back message (one mechanism, checkpoint.load, for every caller)."""
    urls, _ = _tiny_checkpoints(tmp_path, n=2)
    runner = CliRunner()
    out = str(tmp_path / "o.pt")
    foreign = {"audio.pt": b"RIFF\x24\x00\x00\x00WAVEfmt ", "notes.pt": b"certainly not a checkpoint",
               "pickle.pt": b"\x80\x02}q\x00."}
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
        res = runner.invoke(app, ["average", urls[0], str(tmp_path / name), "-o", out], terminal_width=300)
        assert res.exit_code == 2, res.output
        flat = " ".join(res.output.split())
        assert f"{tmp_path / name} is not a cmkd checkpoint (not a torch zip file" in flat, flat
        assert "truncated" not in flat and "fall back" not in flat, flat
    import zipfile  # a whole, valid zip that torch did not write

    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as z:
        z.writestr("readme.txt", "hello")
    res = runner.invoke(app, ["average", urls[0], str(tmp_path / "archive.pt"), "-o", out], terminal_width=300)
    assert res.exit_code == 2 and "is not a cmkd checkpoint (a zip archive without torch's data.pkl" in res.output

    data = Path(urls[1]).read_bytes()
    for cut in (len(data) // 2, 3):  # a real checkpoint cut short, even inside the zip signature
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        res = runner.invoke(app, ["average", urls[0], str(tmp_path / "cut.pt"), "-o", out], terminal_width=300)
        flat = " ".join(res.output.split())
        assert res.exit_code == 2 and f"{tmp_path / 'cut.pt'} is truncated or corrupt" in flat, flat
        assert "delete it to fall back to an earlier checkpoint" in flat and "not a cmkd checkpoint" not in flat
    assert not Path(out).exists()


# -- train.teacher_checkpoint = 'last': the student learns from last.pt, not best.pt ---------------------------

def test_teacher_checkpoint_last_loads_last_pt_not_best_pt(tmp_path: Path, write_tones,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished teacher stage whose best.pt and last.pt hold different weights (made by hand, so
    they differ for sure); the student stage with train.teacher_checkpoint = 'last' must get last.pt's."""
    import json

    import gin

    from cmkd.experiment import run_experiment
    from cmkd.train import trainer
    from cmkd.train.distributed import DistEnv

    root = str(tmp_path / "data")
    clips = [(f"t{i}", [CLASSES[i % 3]], 0.25) for i in range(6)]
    write_tones(root, {"train": clips, "eval": clips[:3]}, classes=CLASSES, multilabel=False, clip_seconds=0.25)
    stage = tmp_path / "runs" / "lastkd" / "teacher"
    urls, states = _tiny_checkpoints(tmp_path, n=2)
    for which, k in (("best", 0), ("last", 1)):  # best.pt = weights 0, last.pt = weights 1
        ckpt = checkpoint.load(urls[k])
        ckpt.update(experiment="lastkd", stage="teacher", multilabel=False)
        checkpoint.save(str(stage / "checkpoints" / f"{which}.pt"), ckpt)
    (stage / "summary.json").write_text(json.dumps({"finished": True, "best": {}}))
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])

    loaded: list[tuple[str, dict]] = []
    real_load = trainer.load_model

    def spy(url: str, *args, **kwargs):
        model = real_load(url, *args, **kwargs)
        loaded.append((url, {k: v.detach().clone() for k, v in model.classifier.state_dict().items()}))
        return model

    monkeypatch.setattr(trainer, "load_model", spy)
    monkeypatch.setenv("CMKD_CACHE", str(tmp_path / "cache"))
    gin.clear_config()
    components.load_all()
    try:
        text = config.parse([], [*TINY_CONFIG.strip().splitlines(),
                                 "experiment.name = 'lastkd'", "experiment.stages = ['teacher', 'student']",
                                 "train.dataset = @datasets.webdataset", f"datasets.webdataset.root = '{root}'",
                                 "datasets.webdataset.num_workers = 0", "train.batch_size = 3", "train.epochs = 1",
                                 "train.amp = False", "student/train.strategy = @strategies.logit_kd",
                                 "strategies.logit_kd.teacher = 'teacher'", "train.teacher_checkpoint = 'last'"])
        summaries = run_experiment(str(tmp_path / "runs"), text, DistEnv())
    finally:
        gin.clear_config()
    last_url = str(stage / "checkpoints" / "last.pt")
    assert summaries["student"]["teachers"] == [last_url]
    assert [u for u, _ in loaded] == [last_url]  # best.pt was never opened as the teacher
    taught = loaded[0][1]
    assert all(torch.equal(taught[k], states[1][k]) for k in states[1])  # last.pt's weights
    assert any(not torch.equal(taught[k], states[0][k]) for k in states[0])  # not best.pt's
