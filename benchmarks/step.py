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
  replay_kd   cmkd with strategies.replay_kd: the views drawn as online, the stored fp16 logits of those views
              read from a real view store (random values; keys cycle through the store: the cost is the same)
  teacher_views  what `cmkd teacher-logits --views K` does per batch, once: views → featurize → teacher forward;
              its step time ÷ batch is the one-time cost per clip-view
  compiled    cmkd with train.compile (student and teacher through torch.compile); only with --compile
Variants run interleaved, round by round; medians and their ratios are reported together with
how long each step waited for data, peak memory, and (with --flops) FLOPs per clip and MFU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, load_average  # noqa: E402
from _step_cases import DIRECTIONS, SHAPES, VARIANTS, loss_parity, make_cases  # noqa: E402
from _step_measure import Case, PeakRSS, count_flops, measure_peak_tflops, state_bytes  # noqa: E402
from _step_report import summarize, table  # noqa: E402

N_CLIPS = 64  # synthetic clips per direction, cycled by every case's loader (make_cases)


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
            all_cases += make_cases(shape, direction, variants, device, b, workers, tmp, N_CLIPS)
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
