"""The fast paths of a training step compute what the plain fp32 path computes.

Batched CPU fbank (sliced, banded mel GEMM) vs torchaudio per clip; channels-last EfficientNet;
fused SDPA attention in the AST; the teacher under inference_mode (bf16 on CUDA); torch.compile;
the loop's data-wait measurement; and one whole training step of cmkd against the reference-style
fp32 step the benchmark compares with (benchmarks/_reference.py).
"""

from __future__ import annotations

import copy
import math
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cmkd.audio.features import Fbank, KaldiFbank
from cmkd.distill import strategies as strategies_mod
from cmkd.distill.losses import BCE
from cmkd.registry import backbones, strategies
from cmkd.train.loop import DataWait, compile_models
from cmkd.train.optim import build_optimizer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _reference  # noqa: E402
import _step_cases as step_cases  # noqa: E402
import step as step_bench  # noqa: E402

TINY = step_cases.SHAPES["tiny"]  # test_efficientnet, a 2-block 32-wide AST, 32 mel bins x 100 frames, 10 classes


def _waves(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    f0 = 150 + 2000 * torch.rand(batch, 1, generator=g)
    return (0.3 * torch.sin(2 * math.pi * f0 * t) + 0.02 * torch.randn(batch, t.numel(), generator=g)).float()


@pytest.fixture
def one_thread():
    """torchaudio's kaldi.fbank itself moves by ~1e-3 in near-floor bins between thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("n_mels,seconds,batch,chunk", [
    (128, 10.0, 3, Fbank.CPU_CHUNK_FRAMES),  # a slice per clip
    (128, 10.0, 2, 300),  # several slices per clip, the last one short
    (64, 0.6, 7, 200),  # several whole clips per slice, a short last group
    (80, 1.3, 5, 10**6),  # everything in one slice; a band count that does not divide n_mels
])
def test_cpu_fbank_matches_torchaudio_and_the_oneshot_path(n_mels, seconds, batch, chunk, one_thread):
    fb = Fbank(n_mels=n_mels, target_frames=200)
    fb.CPU_CHUNK_FRAMES = chunk
    wave = _waves(batch, seconds)
    ours = fb.raw_log_mel(wave)
    ref = KaldiFbank(n_mels=n_mels).raw_log_mel(wave)
    assert ours.shape == ref.shape == (batch, n_mels, fb.num_frames(wave.shape[1]))
    assert (ours - ref).abs().max() <= 1e-3
    centered = wave - wave.mean(1, keepdim=True)
    oneshot = fb._frames_to_log_mel(centered.unfold(1, fb.window_size, fb.window_shift)).transpose(1, 2)
    assert (ours - oneshot).abs().max() <= 1e-3  # the GPU path: same math, unsliced


def test_efficientnet_runs_channels_last_and_matches_nchw():
    torch.manual_seed(0)
    fast = backbones.get("efficientnet")(name="test_efficientnet", channels_last=True).eval()
    plain = copy.deepcopy(fast)
    plain.channels_last = False
    plain.to(memory_format=torch.contiguous_format)
    seen = {}
    fast.model.conv_stem.register_forward_hook(lambda m, i, o: seen.setdefault("fast", o))
    plain.model.conv_stem.register_forward_hook(lambda m, i, o: seen.setdefault("plain", o))
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        a, b = fast(x), plain(x)
    # The stem's output (32 channels) shows the layout the network runs in: the input was converted too.
    assert seen["fast"].is_contiguous(memory_format=torch.channels_last) and not seen["fast"].is_contiguous()
    assert seen["plain"].is_contiguous()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ast_attention_is_fused_sdpa_and_matches_unfused(monkeypatch):
    torch.manual_seed(0)
    ast = backbones.get("ast")(in_shape=(32, 100), embed_dim=32, depth=3, num_heads=2).eval()
    assert all(blk.attn.fused_attn for blk in ast.blocks)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    x = torch.randn(2, 1, 32, 100)
    with torch.no_grad():
        fused = ast(x)
    assert len(calls) == 3  # one fused kernel per block, no matmul-softmax-matmul
    (unfused,) = _reference.reference_models(ast)
    with torch.no_grad():
        plain = unfused(x)
    assert len(calls) == 3
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def _kd(teacher: torch.nn.Module, device: str = "cpu"):
    return strategies.get("logit_kd")(loss=BCE(), multilabel=True, load_teacher=lambda ref: teacher, device=device)


def test_teacher_runs_under_inference_mode_and_in_bf16_on_cuda():
    assert strategies_mod.teacher_dtype("cuda") == torch.bfloat16
    assert strategies_mod.teacher_dtype(torch.device("cpu")) == torch.float32
    torch.manual_seed(0)
    teacher = step_cases.build_model("ast", TINY, torch.device("cpu"))
    reference = copy.deepcopy(teacher).eval()
    strat = _kd(teacher)
    modes = []
    teacher.register_forward_pre_hook(lambda m, a: modes.append(torch.is_inference_mode_enabled()))
    x = torch.randn(2, 1, 32, 100)
    student_logits = torch.zeros(2, 10, requires_grad=True)
    (z,) = strat.teacher_logits(x, student_logits)
    assert modes == [True] and not z.is_inference() and z.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(z, reference(x))
    # What Strategy.to does on CUDA, here on the CPU: a bf16 teacher, fp32 features in, fp32 logits out.
    teacher.to(torch.bfloat16)
    (zb,) = strat.teacher_logits(x, student_logits)
    assert zb.dtype == torch.float32
    assert (zb - z).abs().max() < 0.05 * z.abs().max() + 0.05
    loss, _ = strat(x, student_logits, torch.zeros(2, 10))
    loss.backward()  # the teacher's logits enter the student's graph without complaint
    assert student_logits.grad is not None


def _fixed_batches(n: int, shape: dict) -> list[dict]:
    clips = _reference.SyntheticClips(2 * n, shape["seconds"], shape["classes"])
    return [torch.utils.data.default_collate([clips[2 * i], clips[2 * i + 1]]) for i in range(n)], clips


@pytest.mark.parametrize("direction", ["cnn_to_ast", "ast_to_cnn"])
def test_cmkd_step_matches_the_plain_fp32_reference_step(direction, one_thread):
    """Same weights, same clips, augmentation off: cmkd's fast step and the reference step agree."""
    t_kind, s_kind = step_cases.DIRECTIONS[direction]
    torch.manual_seed(0)
    device = torch.device("cpu")
    teacher0, student0 = step_cases.build_model(t_kind, TINY, device), step_cases.build_model(s_kind, TINY, device)
    batches, clips = _fixed_batches(3, TINY)
    ref_student, ref_teacher = _reference.reference_models(student0, teacher0)
    ref_teacher.requires_grad_(False)
    ref_data = _reference.ReferenceClips(clips, TINY["n_mels"], TINY["frames"], 0, 0, mixup=0.0, augment=False)
    ref_batches = iter([{"fbank": torch.stack([ref_data[2 * i]["fbank"], ref_data[2 * i + 1]["fbank"]]),
                         "target": b["target"]} for i, b in enumerate(batches)])
    ref_opt = _reference.reference_optimizer(ref_student.parameters(), 1e-3)
    ref = _reference.reference_step(ref_student, ref_teacher, ref_opt, ref_batches, device)
    student, teacher = copy.deepcopy(student0), copy.deepcopy(teacher0)
    opt = build_optimizer(student.parameters(), device, name="adam", lr=1e-3, weight_decay=5e-7, betas=(0.95, 0.999))
    featurizer = Fbank(n_mels=TINY["n_mels"], target_frames=TINY["frames"],
                       mean=_reference.NORM[0], std=_reference.NORM[1])
    holder = {"it": iter(batches)}
    ours = step_cases.cmkd_step(student, _kd(teacher), opt, featurizer, None, None, holder, device)
    for _ in range(3):  # the later steps compare the updated weights too
        a, b = ours(), ref()
        assert math.isfinite(a) and abs(a - b) <= 1e-4 * abs(b), (a, b)


def test_data_wait_counts_slow_batches():
    def batches():
        for i in range(6):
            if i in (0, 3, 4):
                time.sleep(0.03)
            yield i

    waits = DataWait(threshold_ms=10)
    t0 = time.perf_counter()
    assert list(waits.wrap(batches())) == list(range(6))
    rec = waits.record(time.perf_counter() - t0)
    assert rec["data_wait_steps"] == 2  # the first batch's wait is start-up, reported apart
    assert rec["data_wait_first_s"] >= 0.03 and rec["data_wait_s"] >= 0.09
    assert 0.5 < rec["data_wait_fraction"] <= 1.0


def _have_cpu_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


class _TinyConv(torch.nn.Module):
    """A conv + BatchNorm backbone: what matters here is compile vs eager, and inductor is slow to build big graphs."""

    out_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


@pytest.mark.slow
@pytest.mark.skipif(not _have_cpu_compiler(), reason="no C++ compiler: torch.compile's CPU backend (inductor) needs "
                                                     "one")
def test_compiled_model_trains_like_eager():
    from cmkd.models.classifier import Classifier
    from cmkd.models.heads import LinearHead
    from cmkd.models.poolers import MeanPool

    torch.manual_seed(0)
    eager = Classifier(_TinyConv(), MeanPool(), LinearHead(8, 10), num_classes=10, in_shape=(32, 50))
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    compile_models(compiled)  # what train.compile = True does to the student and the teachers
    assert list(compiled.state_dict()) == keys  # in place: checkpoints keep their keys
    x, y = torch.randn(4, 1, 32, 50), (torch.rand(4, 10) > 0.7).float()
    losses: dict[str, list[float]] = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(3):
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(float(loss.detach()))
    assert losses["eager"][2] < losses["eager"][0]  # it trains
    for a, b in zip(losses["compiled"], losses["eager"]):
        assert abs(a - b) <= 1e-4 * abs(b), losses


def test_features_benchmark_runs_and_reports_parity():
    sys.path.insert(0, str(BENCH))
    import features as feat_bench

    res = feat_bench.main(["--batch", "2", "--seconds", "1", "--threads", "1", "--rounds", "1", "--json"])
    by = {r["variant"]: r for r in res["results"]}
    assert set(by) == {"fbank", "fbank_oneshot", "kaldi"}
    assert by["fbank"]["max_abs_diff"] <= 1e-3 and by["fbank"]["clips_per_s"] > 0


@pytest.mark.slow
def test_step_benchmark_runs_every_variant(monkeypatch):
    monkeypatch.setattr(step_bench, "N_CLIPS", 8)
    res = step_bench.main(["--shapes", "tiny", "--steps", "1", "--rounds", "1", "--flops", "--json",
                           "--directions", "ast_to_cnn"])
    rows = {(r["direction"], r["variant"]): r for r in res["results"]}
    assert set(rows) == {("ast_to_cnn", v) for v in ("cmkd", "reference", "no_kd", "offline_kd")}
    assert rows[("ast_to_cnn", "no_kd")]["gflop_per_clip"] < rows[("ast_to_cnn", "cmkd")]["gflop_per_clip"]
    # Fused (SDPA) and unfused attention are the same model FLOPs; the counter must see both.
    assert rows[("ast_to_cnn", "cmkd")]["gflop_per_clip"] == pytest.approx(
        rows[("ast_to_cnn", "reference")]["gflop_per_clip"], rel=1e-6)
    for r in rows.values():
        assert r["clips_per_s"] > 0 and r["peak_mb"] > 0 and r["gflop_per_clip"] > 0
        assert 0 <= r["data_wait_fraction"] <= 1
    for d, p in res["parity"].items():
        assert p["rel_diff"] < 1e-4, (d, p)


@pytest.mark.slow
def test_training_loop_records_data_wait(tmp_path):
    """metrics.jsonl says how long the loop waited for data; the progress bar shows the share."""
    from helpers import TINY_AST, cmkd_env, read_jsonl, run_cmkd, write_gin

    gin = write_gin(tmp_path / "wait.gin", TINY_AST, """
experiment.name = 'wait'
experiment.stages = ['main']
train.dataset = @datasets.synthetic
datasets.synthetic.num_classes = 4
datasets.synthetic.train_samples = 24
datasets.synthetic.eval_samples = 8
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.shard_size = 8
datasets.synthetic.num_workers = 1
train.batch_size = 4
train.epochs = 2
""")
    res = run_cmkd(["run", gin, "--run-dir", tmp_path / "runs", "--device", "cpu"], env=cmkd_env(tmp_path),
                   cwd=tmp_path).check()
    for record in read_jsonl(tmp_path / "runs" / "wait" / "main" / "metrics.jsonl"):
        assert 0.0 <= record["data_wait_fraction"] <= 1.0
        assert record["data_wait_s"] >= record["data_wait_first_s"] > 0  # the first batch waits for the worker
        assert 0 <= record["data_wait_steps"] < 6
    assert "data wait" in res.stderr


@pytest.mark.slow  # 2 shared cores (load ~6): compiled run 122 s with a cold inductor cache, 43 s warm; eager 15 s
@pytest.mark.timeout(700)
@pytest.mark.skipif(not _have_cpu_compiler(), reason="no C++ compiler: torch.compile's CPU backend (inductor) needs "
                                                     "one")
def test_train_compile_true_trains_through_the_loop_like_eager(tmp_path):
    """`cmkd run` with train.compile = True on CPU: the real loop (featurizer, compiled student,
    optimizer, evaluation, checkpoints) trains a tiny AST for one epoch, writes checkpoints with
    the plain state_dict keys (load_model rebuilds them), and follows the eager run's losses.
    Same seed, same data, one thread: the two runs differ only in inductor's fused kernels, whose
    float32 reassociation moves a loss by ~1e-7 relative (measured: the 3 step losses equal, the
    eval loss 7e-8 apart); Adam can amplify that only for weights
    whose gradient is ~0, which by definition barely move the loss. So rel 1e-4 on every step's
    loss and on the eval loss is a wide margin that a wrong compiled graph (e.g. stale weights,
    dropped parameters) would still fail by orders of magnitude (steps move the loss by > 1e-3)."""
    from helpers import TINY_AST, cmkd_env, read_jsonl, run_cmkd, write_gin

    from cmkd.models.factory import load_model
    from cmkd.train import checkpoint

    gin = write_gin(tmp_path / "compile.gin", TINY_AST, """
experiment.name = 'compiled'
train.dataset = @datasets.synthetic
datasets.synthetic.num_classes = 4
datasets.synthetic.train_samples = 12
datasets.synthetic.eval_samples = 4
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.shard_size = 4
datasets.synthetic.num_workers = 0
train.batch_size = 4
train.log_steps = True
optimizer.lr = 3e-3
""")
    env = cmkd_env(tmp_path)
    runs: dict[bool, Path] = {}
    for compiled in (True, False):
        runs[compiled] = tmp_path / f"runs-{compiled}"
        run_cmkd(["run", gin, "--run-dir", runs[compiled], "--device", "cpu", "-b", f"train.compile = {compiled}"],
                 env=env, cwd=tmp_path, timeout=300).check()
    stage = runs[True] / "compiled" / "main"
    assert "train.compile = True" in (stage / "config.gin").read_text()
    steps = {c: [s["loss"] for s in read_jsonl(runs[c] / "compiled" / "main" / "steps.jsonl")] for c in runs}
    assert len(steps[True]) == len(steps[False]) == 3 and all(math.isfinite(v) for v in steps[True])
    assert min(abs(a - b) for a, b in zip(steps[False], steps[False][1:])) > 1e-3, steps  # the weights move
    for a, b in zip(steps[True], steps[False]):
        assert a == pytest.approx(b, rel=1e-4), steps
    (m1,), (m0,) = (read_jsonl(runs[c] / "compiled" / "main" / "metrics.jsonl") for c in (True, False))
    assert math.isfinite(m1["eval_loss"]) and m1["eval_loss"] == pytest.approx(m0["eval_loss"], rel=1e-4)
    best = checkpoint.load(str(stage / "checkpoints" / "best.pt"))
    assert not [k for k in best["model"] if "_orig_mod" in k]  # compiled in place: plain keys
    model = load_model(str(stage / "checkpoints" / "best.pt"))
    assert model.logits(torch.zeros(1, model.clip_samples)).isfinite().all()
