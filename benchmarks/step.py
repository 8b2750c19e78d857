"""Training-step benchmark: clips/s of a full step for CNN→AST and AST→CNN distillation.

    python benchmarks/step.py --shapes small                  # CPU, small models, a few steps
    python benchmarks/step.py --shapes paper --steps 1 --rounds 2
    python benchmarks/step.py --device cuda --shapes paper --workers 8 --flops --peak-tflops 790

A step is: next batch → (mixup) → featurize + SpecAugment → student forward → teacher forward →
loss → backward → optimizer step. Variants, on identical weights and the same clips:
  cmkd        cmkd as it ships: Fbank on the device, strategies.logit_kd (teacher under
              inference_mode; bf16 on CUDA), EfficientNet channels-last, fused SDPA attention,
              bf16 autocast + fused AdamW on CUDA, the loop's optimizer settings (adam, wd 5e-7)
  reference   the reference code's style (benchmarks/_reference.py): per-clip kaldi.fbank and masks
              in the Dataset (workers, or a Python loop with --workers 0), fp32, NCHW, unfused
              attention, Adam's for-loop update, teacher under no_grad
  no_kd       cmkd with strategies.none: no teacher (cmkd / no_kd = the cost of KD)
  offline_kd  cmkd with strategies.offline_kd: teacher logits looked up by key (mixup off, as it
              requires; the stored values are seeded random numbers: the step's cost does not depend on them)
  compiled    cmkd with train.compile (student and teacher through torch.compile); only with --compile
Variants run interleaved, round by round; medians and their ratios are reported together with
how long each step waited for data, peak memory, and (with --flops) FLOPs per clip and MFU.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import current_rss_mb, emit, load_average, machine, markdown_table, median, spread, sync  # noqa: E402
from _reference import (  # noqa: E402
    NORM,
    ReferenceClips,
    SyntheticClips,
    reference_models,
    reference_optimizer,
    reference_step,
)

import cmkd.distill.strategies  # noqa: E402,F401 - registers logit_kd, offline_kd, none
from cmkd.audio.augment import Mixup, SpecAugment  # noqa: E402
from cmkd.audio.features import Fbank  # noqa: E402
from cmkd.device import autocast  # noqa: E402
from cmkd.distill.losses import BCE  # noqa: E402
from cmkd.distill.offline import save_teacher_logits  # noqa: E402
from cmkd.models.classifier import build_classifier  # noqa: E402
from cmkd.registry import backbones, heads, strategies  # noqa: E402
from cmkd.train.optim import build_optimizer  # noqa: E402
from cmkd.train.pipeline import DataWait, compile_models  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # The paper's: EfficientNet-B2, AST-base (DeiT-base 768/12/12, stride 10), 10 s → 128 × 1024,
    # AudioSet's 527 classes.
    "paper": dict(n_mels=128, frames=1024, seconds=10.0, cnn="efficientnet_b2", embed_dim=768, depth=12, heads=12,
                  classes=527, freqm=48, timem=192, batch={"cpu": 2, "cuda": {"ast": 12, "cnn": 24}}),
    # Small enough for a loaded laptop CPU: B0, a 4-block 192-wide AST, 2.56 s clips.
    "small": dict(n_mels=64, frames=256, seconds=2.56, cnn="efficientnet_b0", embed_dim=192, depth=4, heads=3,
                  classes=50, freqm=12, timem=48, batch={"cpu": 8, "cuda": {"ast": 32, "cnn": 32}}),
    # For tests and dry runs: timm's 0.1 M-parameter EfficientNet, a 2-block 32-wide AST, 1 s clips.
    "tiny": dict(n_mels=32, frames=100, seconds=1.0, cnn="test_efficientnet", embed_dim=32, depth=2, heads=2,
                 classes=10, freqm=8, timem=20, batch={"cpu": 2, "cuda": {"ast": 2, "cnn": 2}}),
}
LR = {"ast": 5e-5, "cnn": 5e-4}  # gin/models.gin AST_LR / CNN_LR
DIRECTIONS = {"cnn_to_ast": ("cnn", "ast"), "ast_to_cnn": ("ast", "cnn")}
VARIANTS = ("cmkd", "reference", "no_kd", "offline_kd", "compiled")
N_CLIPS = 64


def build_model(kind: str, shape: dict[str, Any], device: torch.device) -> nn.Module:
    """The paper's CNN (efficientnet + mean + linear) or AST (ast + token + LayerNorm/linear), via cmkd's registries."""
    in_shape = (shape["n_mels"], shape["frames"])
    if kind == "cnn":
        bb = backbones.get("efficientnet")(name=shape["cnn"], pretrained=False)
        head = heads.get("linear")(in_dim=bb.out_dim, num_classes=shape["classes"])
        model = build_classifier(shape["classes"], in_shape, backbone=bb, pooler="mean", head=head)
    else:
        bb = backbones.get("ast")(in_shape=in_shape, embed_dim=shape["embed_dim"], depth=shape["depth"],
                                  num_heads=shape["heads"], pretrained=False)
        head = heads.get("linear")(in_dim=bb.out_dim, num_classes=shape["classes"], norm=True)
        model = build_classifier(shape["classes"], in_shape, backbone=bb, pooler="token", head=head)
    return model.to(device)


def loader(dataset: torch.utils.data.Dataset, batch: int, workers: int,
           device: torch.device) -> torch.utils.data.DataLoader:
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9,
                                             generator=torch.Generator().manual_seed(0))
    kwargs: dict[str, Any] = dict(batch_size=batch, sampler=sampler, num_workers=workers,
                                  pin_memory=device.type == "cuda", drop_last=True)
    if workers:
        kwargs["prefetch_factor"] = 2  # cmkd's default (webdataset.prefetch_factor)
    return torch.utils.data.DataLoader(dataset, **kwargs)


class Case:
    """One (direction, variant): its models, optimizer, loader and step; records per-step times."""

    def __init__(self, name: str, step: Callable[[], float], waits_from: Callable[[bool], DataWait], batch: int,
                 owned: tuple[Any, ...], student: nn.Module, teacher: nn.Module | None):
        self.name, self._step, self._wrap, self.batch, self.owned = name, step, waits_from, batch, owned
        self.student, self.teacher = student, teacher  # the models one step runs (for FLOPs)
        self.state_mb = 0.0  # set after the warm-up step, once gradients and optimizer state exist
        self.times: list[float] = []
        self.waits: list[float] = []
        self.losses: list[float] = []

    def run(self, steps: int, device: torch.device, fresh: bool, timed: bool = True) -> None:
        waits = self._wrap(fresh)
        if fresh:  # workers start with this iterator; its first step waits for them, untimed
            self._step()
        for _ in range(steps):
            sync(device)
            before = waits.seconds
            t0 = time.perf_counter()
            self.losses.append(self._step())
            sync(device)
            if timed:
                self.times.append(time.perf_counter() - t0)
                self.waits.append(waits.seconds - before)


def state_bytes(*objs: Any) -> int:
    """Bytes of parameters, buffers, gradients and optimizer state (the step's resident memory)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for o in objs:
        if isinstance(o, nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                add(t)
                if t.grad is not None:
                    add(t.grad)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
    return total


def make_cases(shape: dict[str, Any], direction: str, variants: list[str], device: torch.device, batch: int,
               workers: int, tmp: str) -> list[Case]:
    t_kind, s_kind = DIRECTIONS[direction]
    torch.manual_seed(0)
    teacher0, student0 = build_model(t_kind, shape, device), build_model(s_kind, shape, device)
    clips = SyntheticClips(N_CLIPS, shape["seconds"], shape["classes"])
    cases: list[Case] = []
    lr = LR[s_kind]
    for variant in variants:
        name = f"{direction}/{variant}"
        if variant == "reference":
            student, teacher = reference_models(student0, teacher0)
            teacher.requires_grad_(False)
            opt = reference_optimizer(student.parameters(), lr)
            ds = ReferenceClips(clips, shape["n_mels"], shape["frames"], shape["freqm"], shape["timem"], mixup=0.5)
            data = loader(ds, batch, workers, device)
            holder: dict[str, Any] = {}

            def wrap(fresh: bool, data=data, holder=holder, student=student, teacher=teacher, opt=opt) -> DataWait:
                if fresh or "step" not in holder:
                    holder["waits"] = DataWait()
                    holder["it"] = holder["waits"].wrap(iter(data))
                    holder["step"] = reference_step(student, teacher, opt, holder["it"], device)
                return holder["waits"]

            def step(holder=holder) -> float:
                return holder["step"]()

            cases.append(Case(name, step, wrap, batch, (student, teacher, opt), student, teacher))
            continue
        student = copy.deepcopy(student0)
        teacher = copy.deepcopy(teacher0) if variant in ("cmkd", "compiled") else None  # others run no teacher
        strat = _strategy(variant, teacher, shape, device, clips, tmp, direction)
        if variant == "compiled":
            compile_models(student, *strat.teachers)
        opt = build_optimizer(student.parameters(), device, name="adam", lr=lr, weight_decay=5e-7, betas=(0.95, 0.999))
        featurizer = Fbank(n_mels=shape["n_mels"], target_frames=shape["frames"], mean=NORM[0], std=NORM[1]).to(device)
        specaug = SpecAugment(shape["freqm"], shape["timem"])
        mix = None if variant == "offline_kd" else Mixup(0.5, 10.0)
        data = loader(clips, batch, workers, device)
        holder = {}

        def wrap(fresh: bool, data=data, holder=holder) -> DataWait:
            if fresh or "it" not in holder:
                holder["waits"] = DataWait()
                holder["it"] = holder["waits"].wrap(iter(data))
            return holder["waits"]

        step = cmkd_step(student, strat, opt, featurizer, specaug, mix, holder, device)
        teachers = list(getattr(strat, "teachers", []))
        first_teacher = teachers[0] if teachers else None
        cases.append(Case(name, step, wrap, batch, (student, *teachers, opt), student, first_teacher))
    return cases


def _strategy(variant: str, teacher: nn.Module | None, shape: dict[str, Any], device: torch.device,
              clips: SyntheticClips, tmp: str, direction: str) -> Any:
    loss = BCE()
    if variant == "no_kd":
        return strategies.get("none")(loss=loss)
    if variant == "offline_kd":
        url = f"{tmp}/{direction}-teacher.npy"
        rng = np.random.default_rng(0)
        logits = rng.standard_normal((len(clips), shape["classes"]), dtype=np.float32)
        save_teacher_logits(url, [clips.key(i) for i in range(len(clips))], logits, {"multilabel": True})
        return strategies.get("offline_kd")(loss=loss, multilabel=True, device=device, logits=url)
    return strategies.get("logit_kd")(loss=loss, multilabel=True, load_teacher=lambda ref: teacher, device=device,
                                      lam=0.5, tau=1.0)


def cmkd_step(student: nn.Module, strat: Any, optimizer: torch.optim.Optimizer, featurizer: nn.Module,
              specaug: SpecAugment, mix: Mixup | None, holder: dict[str, Any],
              device: torch.device) -> Callable[[], float]:
    """The body of cmkd.train.trainer.Trainer.step, as it ships (kept in step with it by tests)."""
    gen = torch.Generator().manual_seed(0)
    student.train()

    def step() -> float:
        batch = next(holder["it"])
        wave = batch["wave"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        if mix is not None:
            wave, target = mix(wave, target, generator=gen)
        with autocast(device, True):
            x = featurizer(wave, augment=specaug)
            logits = student(x)
            loss, _ = strat(x, logits.float(), target, keys=batch["key"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())  # the loop reads the loss every step, too

    return step


class PeakRSS:
    """Samples this process's resident memory while a case runs (CPU); CUDA uses the allocator's peak."""

    def __init__(self, device: torch.device, every_s: float = 0.005):
        self.device, self.every = device, every_s
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = current_rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, current_rss_mb())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss_mb())

    @property
    def above_base(self) -> float:
        return max(0.0, self.peak - self.base)


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS, so the next case's resident baseline is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def count_flops(case: Case, shape: dict[str, Any], device: torch.device) -> float:
    """Model FLOPs of one step per clip: 3 × the student's forward (forward + backward) + the teacher's forward.

    Forwards are counted by torch.utils.flop_counter.FlopCounterMode. Its backward formula for
    convolutions ignores groups (a depthwise conv's weight gradient counts as a dense conv's:
    ~40× too much for EfficientNet), so the backward is taken as the usual 2 × forward. Attention
    is counted through SDPA's math backend: the counter has no formula for the fused CPU kernel
    (it would count 0 for it), and the math backend's matmuls are the same model FLOPs.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 1, shape["n_mels"], shape["frames"], device=device)

    def forward_flops(model: nn.Module) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), autocast(device, True), sdpa_kernel(SDPBackend.MATH):
            model(x)
        return counter.get_total_flops()

    return 3 * forward_flops(case.student) + (forward_flops(case.teacher) if case.teacher is not None else 0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    shape = SHAPES[args.shapes]
    variants = [v for v in args.variants if v != "compiled" or args.compile]
    if args.compile and "compiled" not in variants:
        variants.append("compiled")
    workers = args.workers if args.workers is not None else (0 if device.type == "cpu" else 8)
    all_cases: list[Case] = []
    batches: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for direction in args.directions:
            student_kind = DIRECTIONS[direction][1]
            b = args.batch or (shape["batch"]["cpu"] if device.type == "cpu" else shape["batch"]["cuda"][student_kind])
            batches[direction] = b
            all_cases += make_cases(shape, direction, variants, device, b, workers, tmp)
        parity = {d: loss_parity(shape, d, device) for d in args.directions} if args.parity else {}
        fresh = workers > 0
        for case in all_cases:  # warm-up: allocator, kernels, compilation, a loader pass
            case.run(1, device, fresh=True, timed=False)
            case.state_mb = state_bytes(*case.owned) / 2**20
        load_start = load_average()
        mem: dict[str, list[float]] = {c.name: [] for c in all_cases}
        for r in range(args.rounds):
            order = all_cases[r % len(all_cases):] + all_cases[: r % len(all_cases)]  # rotate: no case always first
            for case in order:
                with PeakRSS(device) as peak:
                    case.run(args.steps, device, fresh=fresh)
                mem[case.name].append(peak.above_base)
        load_end = load_average()
        process_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        flops = {c.name: count_flops(c, shape, device) for c in all_cases if not c.name.endswith("/compiled")} \
            if args.flops else {}
        for c in all_cases:  # the compiled step does the same arithmetic as cmkd's
            if c.name.endswith("/compiled") and c.name.replace("compiled", "cmkd") in flops:
                flops[c.name] = flops[c.name.replace("compiled", "cmkd")]
        measured = measure_peak_tflops(device) if args.measure_peak else None
    res = summarize(args, device, shape, all_cases, batches, mem, flops, parity, workers, load_start, load_end)
    res.update(process_peak_mb=process_peak_mb, measured_peak_tflops=measured)
    if measured:
        for r in res["results"]:
            if "gflop_per_clip" in r:
                r["mfu_measured_peak"] = r["gflop_per_clip"] * 1e9 * r["clips_per_s"] / (measured * 1e12)
    return res


def measure_peak_tflops(device: torch.device) -> float:
    """The dense matrix rate this device reaches: bf16 8192³ on CUDA, fp32 2048³ elsewhere (random data)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        if i >= 3:  # warm-up: handles, clocks
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / median(times) / 1e12


def loss_parity(shape: dict[str, Any], direction: str, device: torch.device) -> dict[str, float]:
    """The first loss of cmkd's path vs the reference path on one batch, same weights, augmentation off."""
    t_kind, s_kind = DIRECTIONS[direction]
    torch.manual_seed(0)
    teacher, student = build_model(t_kind, shape, device), build_model(s_kind, shape, device)
    clips = SyntheticClips(4, shape["seconds"], shape["classes"])
    batch = torch.utils.data.default_collate([clips[i] for i in range(2)])
    strat = _strategy("cmkd", teacher, shape, device, clips, "", direction)
    featurizer = Fbank(n_mels=shape["n_mels"], target_frames=shape["frames"], mean=NORM[0], std=NORM[1]).to(device)
    wave, target = batch["wave"].to(device), batch["target"].to(device)
    with torch.no_grad(), autocast(device, True):
        x = featurizer(wave)
        ours = float(strat(x, student(x).float(), target)[0])
    ref_student, ref_teacher = reference_models(student, teacher)
    ref_teacher.float()
    ds = ReferenceClips(clips, shape["n_mels"], shape["frames"], 0, 0, mixup=0.0, augment=False)
    xr = torch.stack([ds[i]["fbank"] for i in range(2)]).to(device)
    with torch.no_grad():
        from _reference import reference_kd_loss

        ref = float(reference_kd_loss(ref_student(xr), ref_teacher(xr), target))
    return dict(cmkd=ours, reference=ref, rel_diff=abs(ours - ref) / abs(ref))


def summarize(args: argparse.Namespace, device: torch.device, shape: dict[str, Any], cases: list[Case],
              batches: dict[str, int], mem: dict[str, list[float]], flops: dict[str, float],
              parity: dict[str, Any], workers: int, load_start: tuple, load_end: tuple) -> dict[str, Any]:
    rows = []
    by_name = {c.name: c for c in cases}
    for c in cases:
        direction, variant = c.name.split("/")
        t = median(c.times)
        base = {v: median(by_name[f"{direction}/{v}"].times) for v in ("reference", "cmkd")
                if f"{direction}/{v}" in by_name}
        row = dict(direction=direction, variant=variant, batch=c.batch, steps=len(c.times), step_s=t,
                   clips_per_s=c.batch / t, spread=spread(c.times),
                   vs_reference=base["reference"] / t if "reference" in base else None,
                   vs_cmkd=base["cmkd"] / t if "cmkd" in base else None,
                   data_wait_fraction=sum(c.waits) / max(1e-9, sum(c.times)),
                   steps_waiting=sum(w > 0.005 for w in c.waits), state_mb=c.state_mb,
                   step_peak_mb=median(mem[c.name]), first_loss=c.losses[0] if c.losses else None)
        row["peak_mb"] = row["state_mb"] + row["step_peak_mb"]  # its weights, grads, optimizer state + the step's peak
        if c.name in flops:
            row["gflop_per_clip"] = flops[c.name] / 1e9
            if args.peak_tflops:
                row["mfu"] = flops[c.name] * row["clips_per_s"] / (args.peak_tflops * 1e12)
        rows.append(row)
    return dict(benchmark="step", device=str(device), shapes=args.shapes, steps=args.steps, rounds=args.rounds,
                workers=workers, batches=batches, machine=machine(), load_start=load_start, load_end=load_end,
                peak_tflops=args.peak_tflops, parity=parity, results=rows)


def table(res: dict[str, Any]) -> str:
    cols = ["direction", "variant", "batch", "clips/s", "step s", "× reference", "× cmkd", "spread",
            "data wait", "steps waiting", "peak MB"]
    has_flops = any("gflop_per_clip" in r for r in res["results"])
    has_measured = any("mfu_measured_peak" in r for r in res["results"])
    if has_flops:
        cols += ["GFLOP/clip", "MFU"] + (["MFU (measured peak)"] if has_measured else [])
    rows = []
    for r in res["results"]:
        row = [r["direction"], r["variant"], r["batch"], r["clips_per_s"], r["step_s"], r["vs_reference"] or "-",
               r["vs_cmkd"] or "-", r["spread"], f"{r['data_wait_fraction']:.1%}", f"{r['steps_waiting']}/{r['steps']}",
               r["peak_mb"]]
        if has_flops:
            row += [r.get("gflop_per_clip", "-"), f"{r['mfu']:.1%}" if "mfu" in r else "-"]
            if has_measured:
                row.append(f"{r['mfu_measured_peak']:.1%}" if "mfu_measured_peak" in r else "-")
        rows.append(row)
    m = res["machine"]
    head = (f"step benchmark: {res['shapes']} shapes on {res['device']} ({m.get('gpu') or m.get('cpu')}, "
            f"{m['cpus']} CPUs, {m['threads']} threads), {res['steps']} step(s) × {res['rounds']} interleaved rounds, "
            f"{res['workers']} loader workers, load average {res['load_start'][0]:.1f} → {res['load_end'][0]:.1f}")
    text = head + "\n\n" + markdown_table(cols, rows)
    if res.get("measured_peak_tflops"):
        rate = res["measured_peak_tflops"]
        text += "\nmeasured dense matrix rate: " + (f"{rate:.1f} TFLOP/s" if rate >= 1 else f"{rate * 1e3:.0f} GFLOP/s")
    if res.get("peak_tflops"):
        text += f"; MFU against a nominal {res['peak_tflops']:g} TFLOP/s"
    if res.get("process_peak_mb"):
        text += f"\nGPU memory, all cases resident together: max allocated {res['process_peak_mb']:.0f} MiB"
    for d, p in res["parity"].items():
        text += (f"\nloss parity {d}: cmkd {p['cmkd']:.6f} vs reference {p['reference']:.6f} "
                 f"(rel. diff {p['rel_diff']:.1e})")
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over all timed steps")
    p.add_argument("--batch", type=int, default=None, help="clips per step (default: 2 paper / 8 small on CPU; "
                                                            "the recipes' 12 AST / 24 CNN on CUDA)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0 on CPU, 8 on CUDA)")
    p.add_argument("--directions", nargs="+", choices=sorted(DIRECTIONS), default=list(DIRECTIONS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["cmkd", "reference", "no_kd", "offline_kd"])
    p.add_argument("--compile", action="store_true", help="add the torch.compile'd variant (slow to start)")
    p.add_argument("--flops", action="store_true", help="count FLOPs per clip (torch.utils.flop_counter)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU (H200 bf16: 790)")
    p.add_argument("--measure-peak", action="store_true", help="also measure the dense matrix rate and report MFU "
                                                               "against it")
    p.add_argument("--no-parity", dest="parity", action="store_false", help="skip the first-loss parity check")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args)
    emit(res, args.json, table(res))
    return res


if __name__ == "__main__":
    main()
