"""Streaming benchmark: clips/s delivered to the training loop, from local shards, from S3, and
from a per-file map-style Dataset in the style of the AST reference code; plus memory at 1x/10x.

    python benchmarks/stream.py                        # ESC-10 from /work/shared/data/esc10
    python benchmarks/stream.py --epochs 3 --workers 2 --batch-size 48 --readme benchmarks/README.md

Steps: `cmkd prepare esc50` the ESC-10 release (400 clips, 5 s, 16 kHz FLAC) into shards in a temp
dir; copy them into a bucket of a loopback moto_server; then, with the same DataLoader workers and
batch size, time whole epochs (worker start-up included, as in training) of
  local     datasets.webdataset over the local shards → batched cmkd Fbank in the main process
  s3        the same shards read from s3:// (moto on 127.0.0.1)
  per-file  a map-style Dataset: soundfile.read one file + torchaudio.compliance.kaldi.fbank in
            __getitem__ (ast src/dataloader.py style), shuffled DataLoader
Rounds are interleaved (local, s3, per-file, local, ...) so load drifts hit all alike. A 'waves only'
round shows what the host CPU delivers when the fbank runs on an accelerator.
The same readers are then timed over a --steady Nx copy (default 5x), where starting the workers and
their S3 sessions is a smaller part of an epoch.

Memory: one streaming epoch of the dataset (1x) and of a 10x larger one (the shard list repeated via
symlinks, 10x the samples in dataset.json), each in a fresh process, with the RSS of the main process
and of its workers and the PSS of all of them sampled through the epoch and filed by training step
(:class:`MemoryTrace`). Dataset size and time are kept apart: (i) the peaks over the first K steps
(K = the 1x epoch's length) of the 1x and the 10x run compare equal amounts of work on datasets of
different size; (ii) the 10x run's memory at steps K, 2K, ... shows whether it grows with time and
whether that growth levels off. To find the cause of any growth, both epochs are repeated with the
fbank off (the data pipeline alone), and the 10x epoch with ``malloc_trim(0)`` after every step, with
``MALLOC_ARENA_MAX=2`` and with ``MALLOC_MMAP_THRESHOLD_=1048576``. The README section states, from the
measured values, whether each aim of the issue was met.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine, markdown_table, median  # noqa: E402
from _memory import MemoryTrace, memory_report, peak  # noqa: E402

DEFAULT_SRC = "/work/shared/data/esc10"
FOLDS = ["fold1", "fold2", "fold3", "fold4", "fold5"]
FRAMES = 512  # 5 s clips (gin/data/esc50.gin)


# -- the three readers -----------------------------------------------------------------------------------
class PerFileDataset(torch.utils.data.Dataset):
    """The reference style: one audio file per item, Kaldi fbank computed in the worker."""

    def __init__(self, items: list[tuple[str, int]], num_classes: int, norm: tuple[float, float]):
        self.items, self.num_classes, self.norm = items, num_classes, norm

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import soundfile as sf
        import torchaudio

        path, label = self.items[i]
        data, sr = sf.read(path, dtype="float32")
        wave = torch.from_numpy(data).reshape(1, -1)
        wave = wave - wave.mean()
        fbank = torchaudio.compliance.kaldi.fbank(wave, htk_compat=True, sample_frequency=sr, use_energy=False,
                                                  window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max(0, FRAMES - fbank.shape[0])))[:FRAMES]
        target = torch.zeros(self.num_classes)
        target[label] = 1.0
        return (fbank - self.norm[0]) / (2 * self.norm[1]), target


def stream_epoch(root: str, workers: int, batch: int, epoch: int, splits: list[str] | str, fbank: bool = True,
                 frames: int = FRAMES, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> int:
    """One training epoch of datasets.webdataset + batched Fbank on the 'device'; returns clips delivered.
    ``on_step(i, batch)`` runs after batch ``i`` (the memory trace files its samples by it)."""
    from cmkd.audio.features import Fbank
    from cmkd.registry import datasets

    ds = datasets.get("webdataset")(root=root, train_split=splits, num_workers=workers)
    fb = Fbank(sample_rate=ds.sample_rate, target_frames=frames, dataset_norm=(ds.norm.mean, ds.norm.std))
    clips = 0
    for i, b in enumerate(ds.train_loader(batch, epoch=epoch)):
        if fbank:  # False: what a GPU host's CPU does (the fbank then runs on the accelerator)
            with torch.inference_mode():
                fb(b["wave"])
        clips += b["wave"].shape[0]
        if on_step is not None:
            on_step(i, b)
    return clips


def memory_epoch(root: str, splits: list[str], workers: int, batch: int, fbank: bool = True, trim: bool = False,
                 frames: int = FRAMES, interval: float = 0.1) -> dict[str, Any]:
    """One streaming epoch under a :class:`MemoryTrace`: clips, seconds, per-step peaks (KiB) and the size
    of the stream cursor's state at the first and the last step. ``trim``: ``malloc_trim(0)`` after each step."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6") if trim else None
    state_bytes: list[int] = []

    with MemoryTrace(interval) as mem:
        def on_step(i: int, b: dict[str, Any]) -> None:
            if libc is not None:
                libc.malloc_trim(0)
            state_bytes.append(len(b["stream_state"][1]))
            mem.step(i)

        t = time.perf_counter()
        clips = stream_epoch(root, workers, batch, 0, splits, fbank=fbank, frames=frames, on_step=on_step)
        seconds = time.perf_counter() - t
    return dict(clips=clips, seconds=seconds, steps=mem.current, per_step=mem.per_step(),
                state_bytes=[state_bytes[0], state_bytes[-1]])


def child_epoch(root: str, splits: str, workers: int, batch: int, fbank: bool, trim: bool) -> None:
    """``--child``: :func:`memory_epoch` in a fresh process, so earlier runs cannot inflate its memory."""
    import json

    import cmkd.data.stream  # noqa: F401 - registers datasets.webdataset

    torch.set_num_threads(1)
    print(json.dumps(memory_epoch(root, splits.split(","), workers, batch, fbank=fbank, trim=trim)))


def run_child(root: str, splits: list[str], workers: int, batch: int, fbank: bool = True, trim: bool = False,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    import json

    out = subprocess.run([sys.executable, __file__, "--child", root, ",".join(splits), "--workers", str(workers),
                          "--batch-size", str(batch)]
                         + ([] if fbank else ["--no-fbank"]) + (["--trim"] if trim else []),
                         capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_file_epoch(items: list[tuple[str, int]], classes: int, workers: int, batch: int) -> int:
    loader = torch.utils.data.DataLoader(PerFileDataset(items, classes, (-6.6268077, 5.358466)), batch_size=batch,
                                         shuffle=True, num_workers=workers)
    return sum(x.shape[0] for x, _ in loader)


def cpu_per_clip(items: list[tuple[str, int]], n: int = 48) -> dict[str, float]:
    """Milliseconds of one core per clip for each stage, measured here: what bounds a CPU-only machine."""
    import soundfile as sf

    from cmkd.audio.features import Fbank

    n = min(n, len(items))
    paths = [p for p, _ in items[:n]]
    t = time.perf_counter()
    waves = [torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in paths]
    decode = time.perf_counter() - t
    ds = PerFileDataset(items[:n], 10, (0.0, 1.0))
    t = time.perf_counter()
    for i in range(n):
        ds[i]
    kaldi = time.perf_counter() - t - decode  # __getitem__ decodes again; keep only the fbank part
    batch = torch.stack([w[:80000] for w in waves])
    t = time.perf_counter()
    with torch.inference_mode():
        Fbank(target_frames=FRAMES)(batch)
    batched = time.perf_counter() - t
    return {k: 1000 * v / n for k, v in dict(decode=decode, kaldi=kaldi, batched=batched).items()}


# -- setup -----------------------------------------------------------------------------------------------
def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe) if exe.exists() else "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    return proc, endpoint


def scaled_copy(src: Path, dest: Path, times: int, splits: list[str] = FOLDS) -> str:
    """A dataset ``times`` larger: the shards of ``splits`` symlinked ``times`` over, one 'train' split."""
    from cmkd.data.manifest import Manifest, Split, shard_pattern

    m = Manifest.load(str(src))
    shards = [Path(u) for s in splits for u in m.shard_urls(s)]
    dest.mkdir(parents=True)
    for i in range(times * len(shards)):
        os.symlink(shards[i % len(shards)], dest / f"train-{i:06d}.tar")
    total = sum(m.splits[s].samples for s in splits)
    Manifest(m.name, m.classes, m.multilabel, m.sample_rate, m.clip_seconds,
             {"train": Split(shard_pattern("train", times * len(shards)), times * total, 1)},
             norm=m.norm).save(str(dest))
    return str(dest)


def update_readme(path: Path, section: str) -> None:
    """Replace only the '## Streaming' section (up to the next '## ' heading); create the file if needed."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Streaming\n.*?(?=^## |\Z)", re.S | re.M)
    body = section.rstrip() + "\n\n"
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body
    path.write_text(text.rstrip() + "\n")


def time_rounds(cases: dict[str, Callable[[int], int]], epochs: int, loads: list[tuple],
                label: str = "") -> dict[str, list[float]]:
    """clips/s of each case's epochs, interleaved round by round; the load average after each round."""
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for epoch in range(epochs):
        for name, fn in cases.items():
            t = time.perf_counter()
            clips = fn(epoch)
            rates[name].append(clips / (time.perf_counter() - t))
            print(f"{label}epoch {epoch} {name}: {rates[name][-1]:.1f} clips/s", flush=True)
        loads.append(load_average())
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=DEFAULT_SRC, help="an ESC-50-layout folder (default: the shared ESC-10)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=48, help="48 as ast egs/esc50/run_esc.sh")
    ap.add_argument("--epochs", type=int, default=3, help="interleaved rounds per reader")
    ap.add_argument("--scale", type=int, default=10, help="the larger dataset for the memory check")
    ap.add_argument("--steady", type=int, default=5,
                    help="also time epochs over an Nx copy, where worker start-up is a small part (0: skip)")
    ap.add_argument("--shard-max-count", type=int, default=40)
    ap.add_argument("--readme", type=Path, help="write the table into this README's '## Streaming' section")
    ap.add_argument("--child", nargs=2, metavar=("ROOT", "SPLITS"), help=argparse.SUPPRESS)
    ap.add_argument("--no-fbank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trim", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_epoch(args.child[0], args.child[1], args.workers, args.batch_size, not args.no_fbank, args.trim)
    torch.set_num_threads(1)  # the 'device' is one CPU core here; the other is left to the workers
    import cmkd.data.stream  # noqa: F401 - registers datasets.webdataset
    from cmkd.data.manifest import Manifest
    from cmkd.data.recipes import PrepareOptions, prepare

    tmp = Path(tempfile.mkdtemp(prefix="cmkd-stream-bench-"))
    moto = None
    try:
        load0 = load_average()
        t_start = t0 = time.perf_counter()
        prepare("esc50", args.src, str(tmp / "local"), PrepareOptions(workers=1, shard_max_count=args.shard_max_count),
                quiet=True)
        prep_s = time.perf_counter() - t0
        local = str(tmp / "local")
        m = Manifest.load(local)
        n_clips = sum(m.splits[s].samples for s in FOLDS)
        n_shards = sum(len(m.shard_urls(s)) for s in FOLDS)
        moto, endpoint = start_moto()
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(local + "/", "bench/esc10/", recursive=True)
        meta = [ln.split(",") for ln in (Path(args.src) / "meta" / "esc50.csv").read_text().splitlines()[1:]]
        items = [(str(Path(args.src) / "audio" / r[0]), m.classes.index(r[3])) for r in meta]
        cases: dict[str, Callable[[int], int]] = {
            "local": lambda e: stream_epoch(local, args.workers, args.batch_size, e, FOLDS),
            "s3": lambda e: stream_epoch("s3://bench/esc10", args.workers, args.batch_size, e, FOLDS),
            "per-file": lambda e: per_file_epoch(items, len(m.classes), args.workers, args.batch_size),
            "local-nofbank": lambda e: stream_epoch(local, args.workers, args.batch_size, e, FOLDS, fbank=False),
        }
        loads = [load0]
        rates = time_rounds(cases, args.epochs, loads)
        steady: dict[str, list[float]] = {}
        if args.steady > 1:  # the same readers over an Nx copy: start-up (workers, S3 sessions) amortized
            steady_root = scaled_copy(Path(local), tmp / f"steady{args.steady}", args.steady)
            fs.put(steady_root + "/", f"bench/steady{args.steady}/", recursive=True)  # put reads through the symlinks
            steady_cases: dict[str, Callable[[int], int]] = {
                "local": lambda e: stream_epoch(steady_root, args.workers, args.batch_size, e, ["train"]),
                "s3": lambda e: stream_epoch(f"s3://bench/steady{args.steady}", args.workers, args.batch_size, e,
                                             ["train"]),
                "per-file": lambda e: per_file_epoch(items * args.steady, len(m.classes), args.workers,
                                                     args.batch_size),
            }
            steady = time_rounds(steady_cases, args.epochs, loads, label=f"{args.steady}x ")
        per_clip = cpu_per_clip(items)
        big = scaled_copy(Path(local), tmp / f"x{args.scale}", args.scale)
        x1, xn = "1x", f"{args.scale}x"
        runs = {  # name: run_child keyword arguments (besides root/splits); all but the first read the big copy
            x1: {}, xn: {}, f"{x1}, fbank off": dict(fbank=False), f"{xn}, fbank off": dict(fbank=False),
            f"{xn}, malloc_trim(0) after each step": dict(trim=True),
            f"{xn}, MALLOC_ARENA_MAX=2": dict(env={"MALLOC_ARENA_MAX": "2"}),
            f"{xn}, MALLOC_MMAP_THRESHOLD_=1048576": dict(env={"MALLOC_MMAP_THRESHOLD_": "1048576"}),
        }
        mem: dict[str, dict[str, Any]] = {}
        for name, kw in runs.items():
            root, splits = (local, FOLDS) if name.startswith(x1) else (big, ["train"])
            mem[name] = run_child(root, splits, args.workers, args.batch_size, **kw)
            print(f"memory {name}: {mem[name]['steps']} steps in {mem[name]['seconds']:.0f} s, peak MiB "
                  f"{ {k: round(v / 1024) for k, v in peak(mem[name]['per_step']).items()} }", flush=True)
        loads.append(load_average())
        info = machine()
        loc, s3, base, nofb = (median(rates[k]) for k in ("local", "s3", "per-file", "local-nofbank"))
        rows = [["local shards (webdataset)", loc, f"{loc / base:.2f}x", "-"],
                ["S3 shards (moto on loopback)", s3, f"{s3 / base:.2f}x", f"{s3 / loc:.2f}x"],
                ["per-file map Dataset (AST style)", base, "1.00x", "-"],
                ["local shards, fbank left to an accelerator (waves only)", nofb, f"{nofb / base:.2f}x", "-"]]
        memory = memory_report(mem, x1, xn, args.workers)
        if steady:
            sl, ss, sb = (median(steady[k]) for k in ("local", "s3", "per-file"))
            steady_rows = [["local shards (webdataset)", sl, f"{sl / sb:.2f}x", "-"],
                           ["S3 shards (moto on loopback)", ss, f"{ss / sb:.2f}x", f"{ss / sl:.2f}x"],
                           ["per-file map Dataset (AST style)", sb, "1.00x", "-"]]
            steady_text = [
                f"The same readers over a {args.steady}x copy of the shards ({args.steady * n_clips} clips an epoch, "
                f"{args.epochs} interleaved epochs each), where starting the workers and their S3 sessions is a "
                f"smaller part of an epoch:",
                "",
                markdown_table(["reader", "clips/s (median)", "vs per-file", "vs local"], steady_rows),
                "",
            ]
            steady_aims = (f" Over the {args.steady}x epochs: local {sl / sb:.2f}x the per-file baseline, "
                           f"S3 {ss / sl:.2f}x local.")
        else:
            steady_text, steady_aims = [], ""
        cmd = "python benchmarks/stream.py " + " ".join(sys.argv[1:])
        speed_ok, s3_ok = loc >= 2 * base, s3 >= 0.8 * loc
        section = "\n".join([
            "## Streaming",
            "",
            f"`{cmd.strip()}` — {info['cpus']} cores ({info['cpu']}), torch {info['torch']}, "
            f"{'GPU ' + info['gpu'] + ' (unused)' if 'gpu' in info else 'no GPU'}: the 'device' is the main process on "
            f"1 CPU thread. Load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in loads[0])}, after each "
            f"round: {', '.join(f'{x[0]:.1f}' for x in loads[1:])}; the rounds are interleaved and compared by their "
            f"medians, so load drifts hit all readers alike. The whole run took {time.perf_counter() - t_start:.0f} s.",
            "",
            "Aims of the issue, as measured here:",
            f"- local shards >= 2x the per-file baseline: **{'met' if speed_ok else 'not met'}** "
            f"({loc:.1f} vs {base:.1f} clips/s = {loc / base:.2f}x).",
            f"- S3 on loopback >= 0.8x local: **{'met' if s3_ok else 'not met'}** "
            f"({s3:.1f} vs {loc:.1f} clips/s = {s3 / loc:.2f}x).",
            f"- memory flat when the dataset is {args.scale}x larger: {memory['verdict']}",
            *([f"- {steady_aims.strip()}"] if steady_aims else []),
            "",
            f"{'ESC-10' if args.src == DEFAULT_SRC else args.src} ({n_clips} clips of {m.clip_seconds:g} s, "
            f"{m.sample_rate // 1000} kHz FLAC) prepared with `cmkd prepare esc50` in {prep_s:.0f} s into "
            f"{n_shards} shards; {args.workers} DataLoader worker(s), batch "
            f"{args.batch_size}, {args.epochs} interleaved epochs each; an epoch includes worker start-up, as in "
            f"training. Streaming: decode + random crop in the workers, batched `Fbank` (512 frames) in the main "
            f"process. Per-file: `soundfile.read` + `torchaudio.compliance.kaldi.fbank` per item in the workers.",
            "",
            markdown_table(["reader", "clips/s (median)", "vs per-file", "vs local"], rows),
            "",
            *steady_text,
            f"What limits the numbers: every reader is CPU-bound. One core's milliseconds per clip, measured in this "
            f"run: FLAC decode {per_clip['decode']:.1f}, per-clip Kaldi fbank {per_clip['kaldi']:.1f}, batched "
            f"`Fbank` {per_clip['batched']:.1f}. So a CPU-only machine bounds the streaming/per-file ratio near "
            f"({per_clip['decode']:.1f} + {per_clip['kaldi']:.1f}) / ({per_clip['decode']:.1f} + "
            f"{per_clip['batched']:.1f}) = "
            f"{(per_clip['decode'] + per_clip['kaldi']) / (per_clip['decode'] + per_clip['batched']):.2f}x; "
            f"with the fbank on a GPU the host CPU only decodes (last row of the table: {nofb / base:.2f}x). "
            f"Streaming reads {n_shards} sequential tar files instead of {n_clips} small files and moves the fbank "
            "out of the workers into one batched call. "
            "S3 adds one HTTP stream per shard and moto's Python server on the same "
            "cores.",
            "",
            memory["text"],
        ])
        print("\n" + section)
        if args.readme:
            update_readme(args.readme, section)
            print(f"\nwrote the Streaming section of {args.readme}")
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
