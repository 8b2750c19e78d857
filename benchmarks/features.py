"""Featurizer benchmark: cmkd's batched Fbank against per-clip ``torchaudio.compliance.kaldi.fbank``.

    python benchmarks/features.py                  # 8 clips of 10 s, 1 and 2 threads, CPU
    python benchmarks/features.py --device cuda --threads 1
    python benchmarks/features.py --json

Variants, on the same batch of 10 s clips (tones + noise, not silence):
  fbank          cmkd's featurizer as training runs it (on CPU: cache-sized slices, banded mel GEMM)
  fbank_oneshot  the same math on the whole batch at once (Fbank._frames_to_log_mel: the GPU path)
  kaldi          torchaudio's kaldi.fbank clip by clip (KaldiFbank; the AST/PSLA reference front end)
Reported: clips/s (median over interleaved rounds), the ratio to kaldi, max |diff| against kaldi
(log-mel, before normalization), and the machine's load. ``--floor`` adds what the hardware allows:
the FFT + mel arithmetic over a measured GEMM rate and the bytes in + out over a measured copy rate.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, interleaved, load_average, machine, markdown_table, median, spread  # noqa: E402

from cmkd.audio.features import Fbank, KaldiFbank  # noqa: E402

SR = 16000


def test_batch(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """Reproducible speech-level clips: two tones per clip plus noise (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    f0 = 200 + 1800 * torch.rand(batch, 1, generator=g)
    tones = 0.3 * torch.sin(2 * math.pi * f0 * t) + 0.1 * torch.sin(2 * math.pi * 3.1 * f0 * t)
    return (tones + 0.02 * torch.randn(batch, t.numel(), generator=g)).float()


def measure_floor(device: torch.device, fb: Fbank, wave: torch.Tensor) -> dict[str, float]:
    """Lower bounds from measured rates: arithmetic / GEMM rate and bytes / copy rate."""
    frames = fb.num_frames(wave.shape[1]) * wave.shape[0]
    n = fb.fft_size
    fft_flops = 2.5 * n * math.log2(n)  # a real FFT of n points, the usual count
    mel_flops = 2 * sum((hi - lo) * (b - a) for a, b, lo, hi in fb._mel_bands)  # only the non-zero filter taps
    flops = frames * (fft_flops + mel_flops + 6 * fb.window_size)
    bytes_moved = wave.numel() * 4 + frames * fb.n_mels * 4
    a, c = torch.randn(2048, 2048, device=device), torch.empty(2048, 2048, device=device)
    src, dst = torch.randn(32 * 2**20, device=device), torch.empty(32 * 2**20, device=device)  # 128 MB > any L3
    cases = {"gemm": lambda: torch.mm(a, a, out=c), "copy": lambda: dst.copy_(src)}
    t = interleaved(cases, rounds=5, device=device)
    gemm_rate = 2 * 2048**3 / median(t["gemm"]["wall"])
    copy_rate = 2 * src.numel() * 4 / median(t["copy"]["wall"])  # bytes read + written
    return dict(gflop=flops / 1e9, gemm_gflops=gemm_rate / 1e9, compute_floor_ms=flops / gemm_rate * 1e3,
                mbytes=bytes_moved / 1e6, copy_gbs=copy_rate / 1e9, memory_floor_ms=bytes_moved / copy_rate * 1e3)


def run(device: torch.device, batch: int, seconds: float, threads: list[int], rounds: int,
        floor: bool) -> dict:
    wave = test_batch(batch, seconds).to(device)
    fb, ref_fb = Fbank().to(device), KaldiFbank().to(device)

    def oneshot() -> torch.Tensor:  # Fbank's non-CPU path, run here on whatever device this is
        centered = wave - wave.mean(dim=1, keepdim=True)
        return fb._frames_to_log_mel(centered.unfold(1, fb.window_size, fb.window_shift)).transpose(1, 2)

    cases = {"fbank": lambda: fb.raw_log_mel(wave), "fbank_oneshot": oneshot, "kaldi": lambda: ref_fb.raw_log_mel(wave)}
    ref = ref_fb.raw_log_mel(wave)
    diffs = {k: float((fn() - ref).abs().max()) for k, fn in cases.items()}
    results = []
    saved = torch.get_num_threads()
    for n in threads:
        torch.set_num_threads(n)
        load_before = load_average()[0]
        t = interleaved(cases, rounds, device)
        med = {k: median(v["wall"]) for k, v in t.items()}
        cpu = {k: median(v["cpu"]) for k, v in t.items()}
        for k in cases:
            results.append(dict(variant=k, threads=n, clips_per_s=batch / med[k], ms_per_clip=1e3 * med[k] / batch,
                                cpu_ms_per_clip=1e3 * cpu[k] / batch, spread=spread(t[k]["wall"]),
                                speedup_vs_kaldi=med["kaldi"] / med[k],
                                cpu_speedup_vs_kaldi=cpu["kaldi"] / cpu[k] if cpu[k] > 0 else float("nan"),
                                max_abs_diff=diffs[k], load_before=load_before, load_after=load_average()[0]))
    torch.set_num_threads(saved)
    out = dict(benchmark="features", device=str(device), batch=batch, seconds=seconds, rounds=rounds,
               machine=machine(), results=results)
    if floor:
        out["floor"] = measure_floor(device, fb, wave)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8, help="clips per batch (default 8)")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10 s = 998 frames)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads to try")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds; medians are reported")
    p.add_argument("--floor", action="store_true", help="also measure GEMM and copy rates: the hardware floor")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the table")
    args = p.parse_args(argv)
    res = run(torch.device(args.device), args.batch, args.seconds, args.threads, args.rounds, args.floor)
    rows = [[r["variant"], r["threads"], r["clips_per_s"], r["ms_per_clip"], r["cpu_ms_per_clip"],
             r["speedup_vs_kaldi"], r["cpu_speedup_vs_kaldi"], r["spread"], f"{r['max_abs_diff']:.1e}",
             f"{r['load_before']:.1f}"] for r in res["results"]]
    table = markdown_table(["variant", "threads", "clips/s", "ms/clip", "CPU ms/clip", "× kaldi (wall)",
                            "× kaldi (CPU)", "spread", "max |Δ| vs kaldi", "load"], rows)
    table = (f"fbank benchmark: {args.batch} × {args.seconds:g} s clips on {args.device}, {args.rounds} interleaved "
             f"rounds, {res['machine'].get('cpu', '?')}, {res['machine']['cpus']} CPUs\n\n{table}")
    if "floor" in res:
        f = res["floor"]
        table += (f"\n\nfloor: {f['gflop']:.3f} GFLOP at a measured {f['gemm_gflops']:.0f} GFLOP/s GEMM rate = "
                  f"{f['compute_floor_ms']:.2f} ms; {f['mbytes']:.1f} MB in+out at {f['copy_gbs']:.1f} GB/s copy = "
                  f"{f['memory_floor_ms']:.2f} ms (per batch)")
    emit(res, args.json, table)
    return res


if __name__ == "__main__":
    main()
