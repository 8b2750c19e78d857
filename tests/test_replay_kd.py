"""Consistent teaching offline: `cmkd teacher-logits --views K` then strategies.replay_kd, equal to online logit_kd."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_AST, TINY_CNN
from typer.testing import CliRunner

from cmkd import components, config
from cmkd.audio.augment import Mixup, SpecAugment
from cmkd.audio.views import draw_views
from cmkd.cli import app

AUG = dict(seed=3, mixup=0.5, mixup_alpha=10.0, freqm=8, timem=12, batch_size=4)


def _run(runs: Path, data: Path, *bindings: str, resume: bool = False) -> dict:
    import gin

    from cmkd.experiment import run_experiment
    from cmkd.train.distributed import DistEnv

    # as -b bindings, not a file: an unused macro (TINY_AST's PRETRAINED) would be refused
    tiny = [line for line in TINY_AST.strip().splitlines() if not line.startswith("PRETRAINED")]
    base = [*tiny, "experiment.name = 'eq'", "train.dataset = @datasets.synthetic",
            f"datasets.synthetic.root = '{data}'", "datasets.synthetic.num_classes = 4",
            "datasets.synthetic.train_samples = 10", "datasets.synthetic.eval_samples = 4",
            "datasets.synthetic.clip_seconds = 0.5", "datasets.synthetic.shard_size = 4",
            "datasets.synthetic.num_workers = 0", "train.epochs = 2", f"train.batch_size = {AUG['batch_size']}",
            f"train.seed = {AUG['seed']}", f"train.mixup = {AUG['mixup']}", f"train.freqm = {AUG['freqm']}",
            f"train.timem = {AUG['timem']}", "train.log_steps = True", "train.deterministic = True",
            "teacher/train.epochs = 1"]
    gin.clear_config()
    components.load_all()
    try:
        return run_experiment(str(runs), config.parse([], [*base, *bindings]), DistEnv(), resume=resume)
    finally:
        gin.clear_config()


def _views_cli(teacher: Path, data: Path, *extra: str) -> object:
    args = ["teacher-logits", str(teacher), str(data), "--views", "2", "--device", "cpu", "--num-workers", "0",
            "--batch-size", str(AUG["batch_size"]), "--seed", str(AUG["seed"]), "--mixup", str(AUG["mixup"]),
            "--freqm", str(AUG["freqm"]), "--timem", str(AUG["timem"]), *extra]
    return CliRunner().invoke(app, args, terminal_width=300)


def _cnn(stage: str) -> list[str]:
    return [f"{stage}/classifier.backbone = @backbones.efficientnet", f"{stage}/classifier.pooler = @poolers.mean",
            *[f"{stage}/{line}" for line in TINY_CNN.strip().splitlines()]]


@pytest.mark.parametrize("direction", ["cnn_to_ast", "ast_to_cnn"])
def test_replay_equals_online_logit_kd(tmp_path: Path, direction: str) -> None:
    cnn = _cnn("teacher" if direction == "cnn_to_ast" else "student")
    data, online, replay = tmp_path / "data", tmp_path / "online", tmp_path / "replay"
    _run(online, data, *cnn, "experiment.stages = ['teacher']")
    shutil.copytree(online / "eq" / "teacher", replay / "eq" / "teacher")
    _run(online, data, *cnn, "experiment.stages = ['teacher', 'student']",
         "student/train.strategy = @strategies.logit_kd")
    res = _views_cli(online / "eq" / "teacher", data, "--dtype", "float32")
    assert res.exit_code == 0, res.output
    store = data / "teacher_views" / "eq-teacher"
    _run(replay, data, *cnn, "experiment.stages = ['teacher', 'student']",
         "student/train.strategy = @strategies.replay_kd", f"strategies.replay_kd.store = '{store}'")

    a = [json.loads(x) for x in (online / "eq" / "student" / "steps.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (replay / "eq" / "student" / "steps.jsonl").read_text().splitlines()]
    assert len(a) == len(b) >= 6  # 2 epochs × 3 steps
    loss_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    wa = torch.load(online / "eq" / "student" / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(replay / "eq" / "student" / "checkpoints" / "last.pt", weights_only=True)["model"]
    weight_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].numel())
    print(f"{direction}: max |Δ loss| = {loss_diff:.3g}, max |Δ weight| = {weight_diff:.3g}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-5
    assert any(r.get("loss") for r in a)


def test_views_depend_on_seed_epoch_key_only() -> None:
    mix, spec = Mixup(0.5, 10.0), SpecAugment(8, 12)
    a = draw_views(["x", "y", "z"], 1, 7, mix, spec, (32, 50))
    b = draw_views(["x", "y", "z"], 1, 7, mix, spec, (32, 50))
    c = draw_views(["x", "y", "z"], 2, 7, mix, spec, (32, 50))
    assert a.same_as(b) and not c.same_as(a)
    assert (a.freq_mask[:, 1] < 8).all() and (a.time_mask[:, 1] < 12).all()
    assert ((a.lam == 1) | ((a.lam > 0) & (a.lam < 1))).all()


# -- bad input: another teacher, other settings, too few views, missing or truncated shards --------------------

@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trained tiny teacher stage and its 2-view store (fp16, the default)."""
    tmp = tmp_path_factory.mktemp("views")
    data, runs = tmp / "data", tmp / "runs"
    _run(runs, data, "experiment.stages = ['teacher']")
    res = _views_cli(runs / "eq" / "teacher", data)
    assert res.exit_code == 0, res.output
    assert "clip-views" in res.output and "strategies.replay_kd.store" in res.output
    return dict(data=data, teacher=runs / "eq" / "teacher" / "checkpoints" / "best.pt",
                store=data / "teacher_views" / "eq-teacher")


def _replay(made: dict, store: Path | None = None, teacher: Path | None = None, **changes):
    from cmkd.data.stream import webdataset
    from cmkd.distill.losses import CE
    from cmkd.registry import call_with_context, strategies

    settings = dict(AUG, world_size=1, num_workers=0, epochs=2)
    settings.update(changes.pop("settings", {}))
    return call_with_context(strategies.get("replay_kd"), loss=CE(), multilabel=False,
                             dataset=webdataset(str(made["data"]), num_workers=0),
                             resolve_teacher=lambda ref: str(teacher or made["teacher"]), view_settings=settings,
                             store=str(store or made["store"]), **changes)


def test_store_manifest_records_what_it_was_made_for(made: dict) -> None:
    doc = json.loads((made["store"] / "views.json").read_text())
    assert doc["views"] == 2 and doc["seed"] == 3 and doc["batch_size"] == 4 and doc["world_size"] == 1
    assert doc["dtype"] == "float16" and len(doc["teacher_sha256"]) == 64 and len(doc["data_sha256"]) == 64
    assert [s["name"] for s in doc["shards"]] == ["e0000-r000.npz", "e0001-r000.npz"]
    with np.load(made["store"] / "e0000-r000.npz", allow_pickle=False) as npz:
        assert npz["logits"].dtype == np.float16 and npz["logits"].shape == (doc["steps_per_epoch"] * 4, 4)
    strat = _replay(made)
    keys, views, z = strat.store.batch(0, 0, 0)
    assert len(keys) == 4 and z.shape == (4, 4) and z.dtype == torch.float32


def test_mismatches_name_what_differs(made: dict, tmp_path: Path) -> None:
    from cmkd.distill.view_store import ViewStoreError

    with pytest.raises(ViewStoreError, match=r"seed: store 3, run 4; .*mixup: store 0.5, run 0.0"):
        _replay(made, settings=dict(seed=4, mixup=0.0))
    other = tmp_path / "other.pt"
    other.write_bytes(made["teacher"].read_bytes() + b"\0")
    with pytest.raises(ViewStoreError, match="teacher_sha256: store"):
        _replay(made, teacher=other)
    with pytest.raises(ViewStoreError, match=r"holds 2 views \(epochs\) per clip but the run trains 3 epochs.*cycle"):
        _replay(made, settings=dict(epochs=3))
    assert _replay(made, settings=dict(epochs=3), cycle=True).data_epoch(2) == 0
    strat = _replay(made)
    keys, views, _ = strat.store.batch(1, 0, 0)
    with pytest.raises(ViewStoreError, match="epoch 2, rank 0, step 0: the stored batch holds clips"):
        strat.replay(1, 0, 0, list(reversed(keys)), views)
    views.lam[0] = 0.25
    with pytest.raises(ViewStoreError, match="stored views .* differ"):
        strat.replay(1, 0, 0, keys, views)


def test_missing_and_truncated_shards_are_named(made: dict, tmp_path: Path) -> None:
    from cmkd.distill.view_store import ViewStoreError

    copy = tmp_path / "store"
    shutil.copytree(made["store"], copy)
    (copy / "e0001-r000.npz").unlink()
    with pytest.raises(ViewStoreError, match=r"shard\(s\) e0001-r000.npz missing"):
        _replay(made, store=copy)
    shutil.copy(made["store"] / "e0001-r000.npz", copy / "e0001-r000.npz")
    blob = (copy / "e0000-r000.npz").read_bytes()
    (copy / "e0000-r000.npz").write_bytes(blob[: len(blob) // 2])
    strat = _replay(made, store=copy)
    with pytest.raises(ViewStoreError, match="shard e0000-r000.npz is unreadable or truncated"):
        strat.store.batch(0, 0, 0)
    with pytest.raises(ViewStoreError, match=r"no view store at .*views.json missing"):
        _replay(made, store=tmp_path / "nothing")


def test_cli_bad_input_is_one_error_line(made: dict) -> None:
    res = _views_cli(made["teacher"].parent.parent, made["data"], "--dtype", "bfloat16")
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    res = _views_cli(made["teacher"].parent.parent, made["data"])
    assert res.exit_code == 2 and "already holds a view store" in res.output


def test_on_error_skip_counts_unreadable_shards_and_trains_on_gt(made: dict, tmp_path: Path) -> None:
    from cmkd.data.stream import webdataset
    from cmkd.distill.losses import CE
    from cmkd.registry import call_with_context, strategies

    copy = tmp_path / "store"
    shutil.copytree(made["store"], copy)
    (copy / "e0001-r000.npz").write_bytes(b"not a zip")
    ds = webdataset(str(made["data"]), num_workers=0, on_error="skip")
    strat = call_with_context(strategies.get("replay_kd"), loss=CE(), multilabel=False, dataset=ds,
                              resolve_teacher=lambda ref: str(made["teacher"]),
                              view_settings=dict(AUG, world_size=1, num_workers=0, epochs=2), store=str(copy))
    keys, views, z = strat.store.batch(0, 0, 0)
    strat.replay(0, 0, 0, keys, views)
    loss, logs = strat(None, torch.zeros(4, 4), torch.eye(4), keys=keys)
    assert float(logs["kd_skipped"]) == 0 and float(logs["loss_kd"]) > 0
    with pytest.warns(UserWarning, match="e0001-r000.npz is unreadable"):
        strat.replay(1, 0, 0, keys, views)
    strat.replay(1, 0, 1, keys, views)
    loss, logs = strat(None, torch.zeros(4, 4), torch.eye(4), keys=keys)
    assert strat.skipped == {"e0001-r000.npz": 2} and float(logs["kd_skipped"]) == 1
    assert loss.item() == pytest.approx(CE()(torch.zeros(4, 4), torch.eye(4)).item())


def test_each_rank_gets_its_own_shard_of_its_own_batches(made: dict, tmp_path: Path) -> None:
    """--world-size 2: per epoch one shard per rank, holding exactly that rank's training batches."""
    from cmkd.data.stream import webdataset
    from cmkd.distill.view_store import ViewStore

    out = tmp_path / "ddp-views"
    res = _views_cli(made["teacher"].parent.parent, made["data"], "--world-size", "2", "--out", str(out))
    assert res.exit_code == 0, res.output
    store = ViewStore.open(str(out))
    assert sorted(store.shards) == [(0, 0), (0, 1), (1, 0), (1, 1)] and store.meta["world_size"] == 2
    ds = webdataset(str(made["data"]), num_workers=0)
    steps = ds.steps_per_epoch(AUG["batch_size"], 2)
    for epoch in range(2):
        for rank in range(2):
            loader = ds.train_loader(AUG["batch_size"], epoch=epoch, seed=AUG["seed"], rank=rank, world_size=2)
            for step, batch in zip(range(steps), loader):
                assert store.batch(epoch, rank, step)[0] == list(batch["key"])


class _Stop(Exception):
    pass


def test_replay_resumed_mid_epoch_ends_with_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay run stopped in step 5 of 6 (resumes from step 4, mid-epoch 2) equals one that never stopped."""
    from cmkd.train import hooks

    data, straight, broken = tmp_path / "data", tmp_path / "straight", tmp_path / "broken"
    _run(straight, data, "experiment.stages = ['teacher']")
    shutil.copytree(straight / "eq" / "teacher", broken / "eq" / "teacher")
    assert _views_cli(straight / "eq" / "teacher", data).exit_code == 0  # fp16, the default
    store = data / "teacher_views" / "eq-teacher"
    student = ["experiment.stages = ['teacher', 'student']", "student/train.strategy = @strategies.replay_kd",
               f"strategies.replay_kd.store = '{store}'", "train.checkpoint_every = 1", "train.log_every = 1"]
    _run(straight, data, *student)

    class StopAt4:
        def on_step_end(self, trainer, logs) -> None:
            if trainer.state.position.step == 5:  # last.pt holds step 4: epoch 2, step 1 of 3
                raise _Stop

    monkeypatch.setattr(hooks, "callbacks", [StopAt4()])
    with pytest.raises(_Stop):
        _run(broken, data, *student)
    assert torch.load(broken / "eq" / "student" / "checkpoints" / "last.pt", weights_only=True)["step_in_epoch"] == 1
    monkeypatch.setattr(hooks, "callbacks", [])
    _run(broken, data, *student, resume=True)
    a = torch.load(straight / "eq" / "student" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(broken / "eq" / "student" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
