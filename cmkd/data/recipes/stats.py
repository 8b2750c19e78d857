"""``cmkd stats``: recompute a prepared dataset's normalization statistics, with progress.

The same :class:`cmkd.data.stats.NormStats` the writer keeps while preparing, over the decoded
clips of one or several splits pooled, with a progress bar for long streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cmkd.data.manifest import Manifest, ManifestError, Norm


@dataclass
class StatsResult:
    manifest: Manifest
    splits: list[str]
    norm: Norm
    previous: Norm | None
    clips: int
    too_short: int
    written: bool


def default_splits(manifest: Manifest) -> list[str]:
    """``train`` if present, else every split that is not an eval split (ESC-50: all folds)."""
    from cmkd.data.stream import EVAL_SPLIT_NAMES

    if "train" in manifest.splits:
        return ["train"]
    return [s for s in manifest.splits if s not in EVAL_SPLIT_NAMES] or list(manifest.splits)


def recompute_stats(url: str, splits: list[str] | None = None, max_clips: int | None = None, *, write: bool = False,
                    quiet: bool = False, storage_options: dict[str, Any] | None = None) -> StatsResult:
    """Stream ``splits`` (pooled), return their fbank mean/std; ``write`` stores it in dataset.json."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one small fbank per clip: extra threads only contend
    try:
        return _recompute(url, splits, max_clips, write, quiet, storage_options)
    finally:
        torch.set_num_threads(threads)


def _recompute(url: str, splits: list[str] | None, max_clips: int | None, write: bool, quiet: bool,
               storage_options: dict[str, Any] | None) -> StatsResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cmkd.console import console
    from cmkd.data.sample_decoder import iter_samples
    from cmkd.data.stats import NormStats

    if max_clips is not None and max_clips < 2:
        raise ManifestError(f"--max-clips must be at least 2, got {max_clips}")
    manifest = Manifest.load(url, storage_options=storage_options)
    chosen = list(splits) if splits else default_splits(manifest)
    urls = [u for s in chosen for u in manifest.shard_urls(s)]  # raises naming the split if it is unknown
    total = sum(manifest.splits[s].samples for s in chosen)
    total = min(total, max_clips) if max_clips is not None else total
    acc = NormStats(manifest.sample_rate)
    progress = Progress(TextColumn("[bold]stats {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=quiet)
    with progress:
        task = progress.add_task("+".join(chosen), total=total)
        for sample in iter_samples(urls, sample_rate=manifest.sample_rate, class_index=None,
                                   storage_options=storage_options, format_version=manifest.format_version,
                                   fields=manifest.fields):
            if acc.clips + acc.too_short >= total:
                break
            acc.add(sample["wave"])
            progress.advance(task)
    try:
        norm = acc.result()
    except ValueError:
        raise ManifestError(f"{manifest.root}: split(s) {chosen} hold no usable clips ({acc.too_short} shorter than "
                            f"25 ms); pick a split with audio via --split") from None
    previous = manifest.norm
    if write:
        manifest.norm = norm
        manifest.save(manifest.root or url, storage_options=storage_options)
    return StatsResult(manifest, chosen, norm, previous, acc.clips, acc.too_short, write)
