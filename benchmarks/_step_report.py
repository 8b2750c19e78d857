"""The step benchmark's results (benchmarks/step.py): medians, ratios, memory and MFU per case
(``summarize``, the replay comparison included) and the printed table (``table``)."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import machine, markdown_table, median, spread
from _step_measure import Case


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
    replay = {}  # issue 20: replay's cost against online KD and no KD, the store's size, the one-time scoring
    for direction in {c.name.split("/")[0] for c in cases}:
        t = {v: median(by_name[f"{direction}/{v}"].times) for v in ("cmkd", "no_kd", "replay_kd", "teacher_views")
             if f"{direction}/{v}" in by_name}
        if "replay_kd" in t:
            case = by_name[f"{direction}/replay_kd"]
            replay[direction] = dict(
                replay_over_online=t["replay_kd"] / t["cmkd"] if "cmkd" in t else None,
                replay_over_no_kd=t["replay_kd"] / t["no_kd"] if "no_kd" in t else None,
                bytes_per_clip_view=getattr(case, "bytes_per_clip_view", None),
                views_s_per_clip_view=t["teacher_views"] / case.batch if "teacher_views" in t else None)
    return dict(benchmark="step", device=str(device), shapes=args.shapes, steps=args.steps, rounds=args.rounds,
                replay=replay,
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
    for d, r in sorted(res.get("replay", {}).items()):
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        text += (f"\nreplay {d}: replay ÷ online {fmt(r['replay_over_online'], '.3f')}, replay ÷ no-KD "
                 f"{fmt(r['replay_over_no_kd'], '.3f')}, {fmt(r['bytes_per_clip_view'], '.0f')} bytes per clip-view, "
                 f"teacher-logits --views: {fmt(r['views_s_per_clip_view'], '.3g')} s per clip-view (once)")
    for d, p in res["parity"].items():
        text += (f"\nloss parity {d}: cmkd {p['cmkd']:.6f} vs reference {p['reference']:.6f} "
                 f"(rel. diff {p['rel_diff']:.1e})")
    return text
