"""The pretrained workflows end to end at tiny sizes, from locally built "pretrained" files:
an imported AST fine-tuned as the teacher then distilled into a CNN, the reverse from a PSLA
EfficientNet, and an imported model used as a frozen teacher as is (classes must line up)."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

from pretrained_files import hf_folder  # noqa: E402

from cmkd.cli import app  # noqa: E402
from cmkd.data.synthetic.sounds import CLASSES  # noqa: E402
from cmkd.train import checkpoint  # noqa: E402

GIN = Path(__file__).resolve().parents[1] / "gin"
TINY = [
    "PRETRAINED = False", "datasets.synthetic.train_samples = 16", "datasets.synthetic.eval_samples = 8",
    "datasets.synthetic.clip_seconds = 0.6", "datasets.synthetic.num_workers = 0", "datasets.synthetic.shard_size = 8",
    "featurizers.fbank.n_mels = 32", "featurizers.fbank.target_frames = 60",
    "backbones.ast.embed_dim = 96", "backbones.ast.depth = 2", "backbones.ast.num_heads = 4",
    "backbones.ast.mlp_ratio = 2.0", "backbones.efficientnet.name = 'test_efficientnet'",
    "train.epochs = 1", "train.mixup = 0.0", "train.freqm = 0", "train.timem = 0", "train.amp = False",
    "schedule.warmup_steps = 0", "teacher/train.batch_size = 8", "student/train.batch_size = 8",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CMKD_CACHE", str(tmp_path / "cache"))
    yield
    with gin.unlock_config():
        gin.clear_config()


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def run(tmp_path: Path, recipe: str, *bindings: str):
    args = ["run", GIN / recipe, "--run-dir", tmp_path / "runs", "--device", "cpu"]
    for b in [*TINY, *bindings]:
        args += ["-b", b]
    return cli(*args)


@pytest.mark.slow
def test_imported_ast_finetuned_then_distilled_into_cnn(tmp_path):
    # An "AudioSet" AST on 32 mel bins x 50 frames with its own 10 classes; the dataset has 60 frames.
    imported = tmp_path / "ast-audioset.pt"
    assert cli("import", hf_folder(tmp_path / "hf", n_mels=32, frames=50), "-o", imported).exit_code == 0
    result = run(tmp_path, "pretrained/audioset_ast_to_cnn.gin", f"IMPORTED_AST = '{imported}'")
    assert result.exit_code == 0, result.output
    teacher = checkpoint.load(str(tmp_path / "runs/audioset_ast_to_cnn/teacher/checkpoints/best.pt"))
    start = checkpoint.load(str(imported))["model"]
    # Fine-tuned from the import (lr 1e-5, two steps): the blocks barely moved; new head, longer pos_embed.
    key = "backbone.blocks.1.attn.qkv.weight"
    assert (teacher["model"][key] - start[key]).abs().max() < 1e-3
    assert teacher["model"]["backbone.pos_embed"].shape[1] == 2 + 2 * 5 != start["backbone.pos_embed"].shape[1]
    assert teacher["classes"] == list(CLASSES[:10])
    # The CNN student goes back out as a timm folder: timm rebuilds it with the same logits.
    import timm

    from cmkd.models.factory import load_model

    student = tmp_path / "runs/audioset_ast_to_cnn/student"
    assert cli("export", student, "--format", "hf", "-o", tmp_path / "cnn-timm").exit_code == 0
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'cnn-timm'}", pretrained=True).eval()
    ours = load_model(str(student / "checkpoints/best.pt"))
    x = torch.randn(2, 1, 32, 60)
    with torch.no_grad():
        assert (rebuilt(x) - ours.classifier(x)).abs().max() < 1e-5
    assert rebuilt.pretrained_cfg["label_names"] == list(CLASSES[:10])


@pytest.mark.slow
def test_psla_effnet_teacher_into_ast(tmp_path):
    pytest.importorskip("efficientnet_pytorch")
    from psla_reference import EffNetAttention

    torch.manual_seed(0)
    pth = tmp_path / "psla_b0.pth"
    torch.save({f"module.{k}": v for k, v in EffNetAttention(label_dim=5, b=0, head_num=4).state_dict().items()}, pth)
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\ne\n")
    imported = tmp_path / "psla.pt"
    done = cli("import", pth, "--classes", tmp_path / "classes.txt", "-o", imported)
    assert done.exit_code == 0, done.output
    result = run(tmp_path, "pretrained/psla_cnn_to_ast.gin", f"IMPORTED_PSLA = '{imported}'",
                 "backbones.psla_efficientnet.b = 0")
    assert result.exit_code == 0, result.output
    teacher = checkpoint.load(str(tmp_path / "runs/psla_cnn_to_ast/teacher/checkpoints/best.pt"))["model"]
    start = checkpoint.load(str(imported))["model"]
    key = "backbone.effnet._blocks.3._project_conv.weight"
    assert (teacher[key] - start[key]).abs().max() < 0.05  # started from the import, not from a random init
    assert "pooler.head_weight" not in teacher  # PSLA's attention head gave way to mean pooling + linear
    assert (tmp_path / "runs/psla_cnn_to_ast/student/checkpoints/best.pt").exists()


def test_imported_model_as_frozen_teacher_needs_the_same_classes(tmp_path):
    student = ["experiment.name = 'kd'", "experiment.stages = ['student']",
               "student/classifier.backbone = @backbones.efficientnet", "student/classifier.pooler = @poolers.mean",
               "student/train.strategy = @strategies.logit_kd", "strategies.logit_kd.lam = 0.5",
               "strategies.logit_kd.tau = 1.0", "student/optimizer.lr = 1e-3"]
    config = tmp_path / "kd.gin"
    config.write_text("include 'base.gin'\ninclude 'models.gin'\n")
    other = tmp_path / "other.pt"
    assert cli("import", hf_folder(tmp_path / "hf1", n_mels=32, frames=60), "-o", other).exit_code == 0
    args = ["run", config, "--run-dir", tmp_path / "runs", "--device", "cpu"]
    for b in [*TINY, *student, f"strategies.logit_kd.teacher = '{other}'"]:
        args += ["-b", b]
    refused = cli(*args)
    assert refused.exit_code == 2 and "sound_0" in refused.output and "classes" in refused.output, refused.output

    # Same names in the same order (as an AudioSet import on `cmkd prepare audioset` data): it teaches as is.
    same = tmp_path / "same.pt"
    folder = hf_folder(tmp_path / "hf2", n_mels=32, frames=60, names=list(CLASSES[:10]))
    assert cli("import", folder, "-o", same).exit_code == 0
    args[-1] = f"strategies.logit_kd.teacher = '{same}'"
    with gin.unlock_config():
        gin.clear_config()
    ok = cli(*args)
    assert ok.exit_code == 0, ok.output
    # ... and `cmkd eval` scores it on that data like any checkpoint.
    (data,) = (tmp_path / "cache" / "synthetic").iterdir()
    scored = cli("eval", same, data, "--json", "--workers", "0")
    assert scored.exit_code == 0, scored.output
