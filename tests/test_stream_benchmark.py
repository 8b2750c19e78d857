"""benchmarks/stream.py on a tiny tone dataset: its epoch functions (streaming, per-file baseline),
the per-step memory trace and the honesty of the memory verdict; and the shared-memory collate
of cmkd's data workers, which the benchmark relies on and must not silently regress."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from tones import SR, tone, write_tone_dataset

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "stream.py"
CLASSES = ["low", "mid", "high"]
N, BATCH, FRAMES = 24, 8, 64  # 3 steps of 8 clips; 0.5 s clips are 48 frames


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cmkd_bench_stream", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> dict:
    import cmkd.data.stream  # noqa: F401 - registers datasets.webdataset

    root = tmp_path_factory.mktemp("tones")
    clips = [(f"k{i:02d}", [CLASSES[i % 3]], 0.5) for i in range(N)]
    write_tone_dataset(str(root / "x1"), {"train": clips}, classes=CLASSES, multilabel=False, max_count=6)
    items = []
    for i, (key, labels, seconds) in enumerate(clips):  # the same clips as files, for the per-file baseline
        path = root / "files" / f"{key}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, tone(200.0 * (1 + CLASSES.index(labels[0])), seconds), SR)
        items.append((str(path), CLASSES.index(labels[0])))
    return {"root": root, "x1": str(root / "x1"), "items": items}


def test_stream_and_per_file_epochs_deliver_every_clip(bench, tones):
    torch.set_num_threads(1)
    seen = []
    clips = bench.stream_epoch(tones["x1"], 1, BATCH, 0, ["train"], frames=FRAMES,
                               on_step=lambda i, b: seen.append((i, b["wave"].shape)))
    assert clips == N and [i for i, _ in seen] == [0, 1, 2]
    assert all(shape == (BATCH, SR // 2) for _, shape in seen)
    assert bench.stream_epoch(tones["x1"], 1, BATCH, 1, "train", fbank=False, frames=FRAMES) == N
    assert bench.per_file_epoch(tones["items"], len(CLASSES), 1, BATCH) == N
    x, target = bench.PerFileDataset(tones["items"], len(CLASSES), (0.0, 1.0))[0]
    assert x.shape == (bench.FRAMES, 128) and target.tolist() == [1.0, 0.0, 0.0]


def test_memory_trace_by_step_and_the_report(bench, tones):
    one = bench.memory_epoch(tones["x1"], ["train"], 1, BATCH, frames=FRAMES, interval=0.02)
    big = bench.scaled_copy(Path(tones["x1"]), tones["root"] / "x3", 3, ["train"])
    three = bench.memory_epoch(big, ["train"], 1, BATCH, frames=FRAMES, interval=0.02, trim=True)
    assert (one["clips"], one["steps"], three["clips"], three["steps"]) == (N, 3, 3 * N, 9)
    for run in (one, three):
        assert len(run["per_step"]) == run["steps"]
        for step in run["per_step"]:  # one worker: its RSS is in every step's sample
            assert step["main_rss"] > step["main_heap"] > 0 and step["workers_rss"] > 0 and step["pss"] > 0
    first, last = three["state_bytes"]
    assert 0 < first and last <= first * 1.05, "the stream cursor's state grows with the samples read"

    report = bench.memory_report({"1x": one, "3x": three}, "1x", "3x", 1)
    assert report["verdict"].startswith(("**met", "**not met")), report["verdict"]
    assert "| 3x: main RSS |" in report["text"] and "MiB after step | 3 | 6 | 9 |" in report["text"]


def test_the_child_process_reports_its_epoch(bench, tones):
    out = bench.run_child(tones["x1"], ["train"], 1, BATCH, fbank=False)
    assert out["clips"] == N and out["steps"] == 3 and len(out["per_step"]) == 3


def _run(per_step_main_mib: list[float], pss_mib: float = 500.0) -> dict:
    kib = [int(v * 1024) for v in per_step_main_mib]
    return dict(clips=8 * len(kib), seconds=1.0, steps=len(kib), state_bytes=[100, 100],
                per_step=[dict(main_rss=v, main_heap=v // 2, workers_rss=400 * 1024, pss=int(pss_mib * 1024))
                          for v in kib])


def test_memory_verdict_says_what_was_measured(bench):
    flat_1x = _run([700.0] * 4)
    levelling = _run([700.0] * 4 + [700.0 + 50 * i for i in range(1, 9)] + [1100.0] * 8)
    still_growing = _run([700.0] * 4 + [700.0 + 50 * i for i in range(1, 17)])
    bigger = _run([900.0] * 20, pss_mib=800.0)
    flat = _run([700.0] * 20)

    met = bench.memory_report({"1x": flat_1x, "5x": levelling}, "1x", "5x", 2)
    assert met["verdict"].startswith("**met**") and "after step 12 and then stays within 2%" in met["verdict"]
    assert "1100 MiB" in met["verdict"] and "for the remaining 8 steps" in met["verdict"]
    growing = bench.memory_report({"1x": flat_1x, "5x": still_growing}, "1x", "5x", 2)
    assert growing["verdict"].startswith("**met for dataset size, not shown for time**")
    assert bench.memory_report({"1x": flat_1x, "5x": bigger}, "1x", "5x", 2)["verdict"].startswith("**not met**")
    offs = {"1x, fbank off": _run([650.0] * 4), "5x, fbank off": _run([650.0] * 20)}
    excess = bench.memory_report({"1x": flat_1x, "5x": bigger, **offs}, "1x", "5x", 2)["verdict"]
    assert excess.startswith("**not met as measured**") and "the data pipeline alone) 1.00x, 1.00x and 1.00x" in excess
    offs["5x, fbank off"] = bigger
    assert bench.memory_report({"1x": flat_1x, "5x": flat, **offs}, "1x", "5x", 2)["verdict"].startswith("**not met**")
    quiet = bench.memory_report({"1x": flat_1x, "5x": flat}, "1x", "5x", 2)
    assert quiet["verdict"].startswith("**met**") and "does not grow with steps either" in quiet["verdict"]

    causes = {"5x": levelling, "5x, fbank off": flat, "5x, malloc_trim(0) after each step": flat,
              "5x, MALLOC_ARENA_MAX=2": levelling}
    text = bench.memory_report({"1x": flat_1x, **causes}, "1x", "5x", 2)["text"]
    assert "fbank off 0 MiB" in text and "Without the fbank the main process stays flat" in text
    assert "no leak" in text and "Fewer malloc arenas do not help" in text
    text = bench.memory_report({"1x": flat_1x, "5x": levelling, "5x, fbank off": levelling}, "1x", "5x", 2)["text"]
    assert "Without the fbank" not in text and "no leak" not in text


# -- the collate the benchmark measures -------------------------------------------------------------
class _SharedProbe(torch.utils.data.IterableDataset):
    """Iterates a cmkd stream *inside* the DataLoader worker and reports whether its batches' tensors were
    stacked into shared memory there (in the main process every tensor from a worker is shared anyway)."""

    def __init__(self, stream: torch.utils.data.IterableDataset):
        self.stream = stream

    def __iter__(self):
        for batch in self.stream:
            yield {"wave": batch["wave"].is_shared(), "target": batch["target"].is_shared(),
                   "in_worker": torch.utils.data.get_worker_info() is not None}


def test_collate_stacks_into_shared_memory_in_a_worker(tones):
    from cmkd.data.sampling import collate
    from cmkd.registry import datasets

    samples = [{"key": f"k{i}", "wave": torch.randn(16), "target": torch.zeros(3)} for i in range(4)]
    assert not collate(samples)["wave"].is_shared()  # the main process: a plain stack
    ds = datasets.get("webdataset")(root=tones["x1"], num_workers=1)
    for stream in (ds.train_loader(BATCH).dataset, ds.eval_loader(BATCH, split="train").dataset):
        loader = torch.utils.data.DataLoader(_SharedProbe(stream), batch_size=None, num_workers=1)
        flags = list(loader)
        assert flags and all(f == {"wave": True, "target": True, "in_worker": True} for f in flags), flags
