"""The paper's gin recipes: every file parses; key bindings per stage; one tiny real KD run
(DDP on CPU) with weight averaging and the averaged teacher."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import gin
import pytest
import torch

from cmkd import components, config
from cmkd.bindings import macros
from cmkd.experiment import run_experiment
from cmkd.registry import REGISTRIES
from cmkd.train import checkpoint
from cmkd.train.averaging import average_state_dicts
from cmkd.train.checkpoint import CheckpointError
from cmkd.train.distributed import DistEnv

GIN = config.recipes_dir()
RECIPES = sorted(str(p.relative_to(GIN)) for p in GIN.rglob("*.gin"))
DATA_ROOT = "DATA_ROOT='/tmp/x'"
_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""", re.MULTILINE)


def _missing_includes(path: Path, seen: set[Path] | None = None) -> list[str]:
    """Included files that do not exist (yet), searched as cmkd.config does."""
    seen = seen if seen is not None else set()
    missing = []
    for inc in _INCLUDE.findall(path.read_text()):
        found = next((b / inc for b in (path.parent, GIN) if (b / inc).is_file()), None)
        if found is None:
            missing.append(inc)
        elif found not in seen:
            seen.add(found)
            missing += _missing_includes(found, seen)
    return missing


def _parse(recipe: str, *bindings: str) -> None:
    missing = _missing_includes(GIN / recipe)
    if missing:  # a broken include is a broken recipe: fail, never skip
        pytest.fail(f"{recipe} includes {missing}, not found next to it or in {GIN}")
    gin.clear_config()
    components.load_all()
    # DATA_ROOT only where the recipe uses it: binding a macro no file uses is an error (docs/configuration.md)
    texts = [(str(f), f.read_text().splitlines()) for f in config.gin_files([GIN / recipe])]
    config.parse([str(GIN / recipe)], [*([DATA_ROOT] if "DATA_ROOT" in macros(texts) else []), *bindings])


def _value(selector: str, scope: str | None = None) -> Any:
    """The value a stage's code receives: the scoped binding, else the unscoped one; macros resolved."""
    for sel in ([f"{scope}/{selector}"] if scope else []) + [selector]:
        try:
            v = gin.query_parameter(sel)
        except ValueError:
            continue
        while isinstance(v, gin.config.ConfigurableReference) and v.configurable.name == "macro":
            v = v.scoped_configurable_fn()
        if isinstance(v, gin.config.ConfigurableReference):
            return "@" + v.configurable.selector
        for kind, reg in REGISTRIES.items():  # a macro's value may be a registered component itself
            for entry in reg.entries():
                if v is entry.obj:
                    return f"@{kind}.{entry.name}"
        return v
    raise KeyError(f"{selector} is not bound (scope {scope})")


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_parses(recipe: str) -> None:
    _parse(recipe)


CNN = {"backbone": "@backbones.efficientnet", "pooler": "@poolers.mean"}
AST = {"backbone": "@backbones.ast", "pooler": "@poolers.token"}
# (recipe, teacher class, student class, per-class settings: lr, batch, epochs, average_last, decay start, every)
PAPER = {
    "fsd50k": dict(cnn=(5e-4, 24, 40, 20, 10, 5), ast=(5e-5, 12, 40, 20, 10, 5), mixup=0.5, masks=(48, 192),
                   balanced=True, warmup=1000, factor=0.5),
    "audioset/balanced": dict(cnn=(1e-3, 100, 60, 20, 35, 5), ast=(5e-5, 12, 25, 20, 10, 5), mixup=0.5, masks=(48, 192),
                              balanced=False, warmup=1000, factor=0.5, split=["balanced"]),
    "audioset/full": dict(cnn=(1e-4, 100, 30, 15, 10, 5), ast=(1e-5, 12, 5, 5, 2, 1), mixup=0.5, masks=(48, 192),
                          balanced=True, warmup=1000, factor=0.5, split=["balanced", "unbalanced"]),
    "esc50": dict(cnn=(5e-4, 48, 25, 0, 5, 1), ast=(1e-4, 48, 25, 0, 5, 1), mixup=0.0, masks=(24, 96),
                  balanced=False, warmup=0, factor=0.85),
}


def _recipe_file(setting: str, direction: str) -> str:
    return f"{setting}_{direction}.gin" if setting.startswith("audioset") else f"{setting}/{direction}.gin"


@pytest.mark.parametrize("direction", ["cnn_to_ast", "ast_to_cnn"])
@pytest.mark.parametrize("setting", list(PAPER))
def test_paper_recipe_bindings(setting: str, direction: str) -> None:
    _parse(_recipe_file(setting, direction))
    want = PAPER[setting]
    assert list(_value("experiment.stages")) == ["teacher", "student"]
    assert _value("experiment.name") == f"{setting.replace('/', '_')}_{direction}"
    classes = {"teacher": "cnn" if direction == "cnn_to_ast" else "ast"}
    classes["student"] = "ast" if classes["teacher"] == "cnn" else "cnn"
    for stage, cls in classes.items():
        arch = CNN if cls == "cnn" else AST
        assert _value("classifier.backbone", stage) == arch["backbone"]
        assert _value("classifier.pooler", stage) == arch["pooler"]
        lr, batch, epochs, avg, start, every = want[cls]
        got = tuple(_value(k, stage) for k in ("optimizer.lr", "train.batch_size", "train.epochs", "train.average_last",
                                                "schedule.decay_start_epoch", "schedule.decay_every"))
        assert got == (lr, batch, epochs, avg, start, every), (stage, cls)
        assert _value("train.mixup", stage) == want["mixup"]
        assert (_value("train.freqm", stage), _value("train.timem", stage)) == want["masks"]
        assert _value("schedule.warmup_steps", stage) == want["warmup"]
        assert _value("schedule.decay_factor", stage) == want["factor"]
        assert _value("schedule.kind", stage) == "step"
    assert _value("train.strategy", "student") == "@strategies.logit_kd"
    with pytest.raises(KeyError):
        _value("train.strategy", "teacher")  # the teacher trains on labels alone
    assert _value("strategies.logit_kd.teacher", "student") == "teacher"
    assert _value("strategies.logit_kd.lam", "student") == 0.5  # λ fixed (paper)
    assert _value("strategies.logit_kd.tau", "student") == 1.0
    assert _value("train.teacher_checkpoint", "student") == "best"
    assert _value("backbones.efficientnet.name") == "efficientnet_b2"
    assert _value("backbones.ast.stride") == 10 and _value("backbones.ast.embed_dim") == 768
    assert _value("datasets.webdataset.balanced") is want["balanced"]
    if "split" in want:
        assert list(_value("datasets.webdataset.train_split")) == want["split"]
    frames = {"fsd50k": 1024, "audioset/balanced": 1024, "audioset/full": 1024, "esc50": 512}[setting]
    assert _value("featurizers.fbank.target_frames") == frames  # from the data recipe, not synthetic.gin's 200
    if setting == "esc50":
        assert _value("train.loss") == "@losses.ce"


def test_tau_is_a_parameter_shared_by_every_strategy() -> None:
    _parse("fsd50k/ast_to_cnn.gin", "TAU = 2.5")
    for name in ("logit_kd", "hinton", "offline_kd", "ensemble"):
        assert _value(f"strategies.{name}.tau", "student") == 2.5
        assert _value(f"strategies.{name}.lam", "student") == 0.5


def test_self_and_iterative_kd_recipes() -> None:
    _parse("self_kd.gin")
    assert list(_value("experiment.stages")) == ["teacher", "student"]
    for stage in ("teacher", "student"):
        assert _value("classifier.backbone", stage) == "@backbones.efficientnet"
    assert _value("train.strategy", "student") == "@strategies.logit_kd"
    _parse("self_kd.gin", "SELF_BACKBONE = @backbones.ast", "SELF_LR = %AST_LR")
    assert _value("classifier.backbone", "student") == "@backbones.ast" and _value("optimizer.lr", "teacher") == 5e-5

    _parse("iterative_kd.gin")
    assert list(_value("experiment.stages")) == ["teacher", "student", "student2"]
    assert [_value("classifier.backbone", s) for s in ("teacher", "student", "student2")] == [
        "@backbones.efficientnet", "@backbones.ast", "@backbones.efficientnet"]
    assert _value("strategies.logit_kd.teacher", "student") == "teacher"
    assert _value("strategies.logit_kd.teacher", "student2") == "student"  # taught by the second stage
    assert _value("optimizer.lr", "student2") == 5e-4


# -- one tiny real run: 2 DDP ranks on CPU, teacher averaged over its last 2 epochs, student taught by it ----

SPY = textwrap.dedent('''
    """Test-only strategy: logit_kd, recording what one DDP rank sees of its teachers."""
    import json, os
    from torch import nn
    from cmkd.distill.strategies import LogitKD
    from cmkd.registry import call_with_context, strategies


    class Spy:
        def __init__(self, inner):
            self.inner, self.calls, self.teachers = inner, 0, inner.teachers

        def __call__(self, x, student_logits, targets, keys=None):
            if self.calls == 1:  # one backward has run: a teacher must still have no gradient
                rank = int(os.environ.get("RANK", "0"))
                params = [p for t in self.teachers for p in t.parameters()]
                state = [v for t in self.teachers for v in t.state_dict().values() if v.is_floating_point()]
                info = dict(ddp=[isinstance(t, nn.parallel.DistributedDataParallel) for t in self.teachers],
                            requires_grad=any(p.requires_grad for p in params),
                            grad=any(p.grad is not None for p in params),
                            training=any(m.training for t in self.teachers for m in t.modules()),
                            state_sum=float(sum(v.double().sum() for v in state)), keys=list(keys or []),
                            world_size=int(os.environ.get("WORLD_SIZE", "1")))
                with open(os.path.join(os.environ["KD_SPY_OUT"], f"rank{rank}.json"), "w") as f:
                    json.dump(info, f)
            self.calls += 1
            return self.inner(x, student_logits, targets, keys=keys)


    @strategies.register("spy_kd")
    def spy_kd(**context):
        return Spy(call_with_context(LogitKD, **context))
''')

TINY = [
    "import kd_spy", "student/train.strategy = @strategies.spy_kd", "experiment.stages = ['teacher', 'student']",
    "datasets.synthetic.train_samples = 32", "datasets.synthetic.eval_samples = 16",
    "datasets.synthetic.clip_seconds = 0.5", "datasets.synthetic.num_workers = 0", "datasets.synthetic.shard_size = 8",
    "featurizers.fbank.target_frames = 50", "featurizers.fbank.n_mels = 32",
    "backbones.ast.embed_dim = 16", "backbones.ast.depth = 1", "backbones.ast.num_heads = 2",
    "train.epochs = 3", "train.average_last = 2", "train.teacher_checkpoint = 'averaged'",
    "teacher/train.batch_size = 8", "student/train.batch_size = 8",
]


@pytest.mark.slow
def test_tiny_kd_run_with_averaged_teacher_under_ddp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kd_spy.py").write_text(SPY)
    spy_out = tmp_path / "spy"
    spy_out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "KD_SPY_OUT": str(spy_out), "CMKD_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [str(Path(sys.executable).with_name("cmkd")), "run", str(GIN / "demo.gin"),
           "--run-dir", str(tmp_path / "runs"), "--device", "cpu", "--nproc-per-node", "2"]
    for b in TINY:
        cmd += ["-b", b]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    teacher_dir = tmp_path / "runs" / "demo" / "teacher"
    ckpts = teacher_dir / "checkpoints"
    summary = json.loads((teacher_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["averaged"]["epochs"] == [2, 3] and "eval_accuracy" in summary["averaged"]
    assert sorted(p.name for p in (ckpts / "epochs").iterdir()) == ["epoch-002.pt", "epoch-003.pt"]
    averaged = checkpoint.load(str(ckpts / "averaged.pt"))
    epochs = [checkpoint.load(str(ckpts / "epochs" / f"epoch-00{e}.pt"))["model"] for e in (2, 3)]
    expected = average_state_dicts(epochs)
    for key, value in averaged["model"].items():
        assert torch.allclose(value.double(), expected[key].double(), atol=1e-6), key
    assert averaged["averaged_epochs"] == [2, 3] and averaged["metrics"]["epochs"] == [2, 3]
    averaged_sum = float(sum(v.double().sum() for v in averaged["model"].values() if v.is_floating_point()))

    student = json.loads((tmp_path / "runs" / "demo" / "student" / "summary.json").read_text())
    assert student["finished"] and "averaged" in student
    reports = [json.loads((spy_out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world_size"] == 2
        assert rep["ddp"] == [False]  # the teacher is never wrapped in DDP (only the student is)
        assert not rep["requires_grad"] and not rep["grad"] and not rep["training"]
        # the student learnt from the averaged teacher, not from best.pt or last.pt
        assert rep["state_sum"] == pytest.approx(averaged_sum, rel=1e-9)
        assert len(rep["keys"]) == 8  # the loop hands the strategy the batch's sample keys
    assert set(reports[0]["keys"]) != set(reports[1]["keys"])

    # A teacher stage without averaging: 'averaged' is a clear error, not a missing-file puzzle.
    # In-process, with the finished teacher stage reused and the student stage removed.
    (ckpts / "averaged.pt").unlink()
    shutil.rmtree(tmp_path / "runs" / "demo" / "student")
    monkeypatch.setenv("CMKD_CACHE", str(tmp_path / "cache"))
    gin.clear_config()
    components.load_all()
    text = config.parse([str(GIN / "demo.gin")], [b for b in TINY if "spy" not in b])
    with pytest.raises(CheckpointError, match=r"teacher/train.average_last = N.*delete its run folder"):
        run_experiment(str(tmp_path / "runs"), text, DistEnv())
