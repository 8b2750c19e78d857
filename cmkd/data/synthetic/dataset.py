"""The built-in dataset: procedural sound events written once as real shards, then streamed.

It goes through the same ``dataset.json`` + tar shard format as real data, so the demo and the
tests exercise the real writer and reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from rich.progress import Progress

from cmkd.data.manifest import Manifest
from cmkd.data.synthetic import sounds
from cmkd.data.writer import DatasetWriter
from cmkd.errors import ConfigError
from cmkd.registry import datasets

GENERATOR_VERSION = 1  # bump when sounds.py changes what a seed produces


def cache_home() -> Path:
    return Path(os.environ.get("CMKD_CACHE", Path.home() / ".cache" / "cmkd"))


@datasets.register("synthetic")
def synthetic_dataset(
    num_classes: int = 10,
    multilabel: bool = False,
    train_samples: int = 1000,
    eval_samples: int = 200,
    clip_seconds: float = 2.0,
    sample_rate: int = 16000,
    seed: int = 0,
    shard_size: int = 100,
    root: str | None = None,
    num_workers: int = 2,
    shuffle_buffer: int = 256,
) -> Any:
    """Procedural sound events (tones, chirps, noise bursts, clicks, ...), deterministic by seed.

    Shards are written on first use under ``root`` (default: a cache folder keyed by these
    settings) and reused afterwards.
    """
    from cmkd.data.stream import webdataset  # late: stream imports the registry users

    for name, value, least in [("num_classes", num_classes, 1), ("train_samples", train_samples, 1),
                               ("eval_samples", eval_samples, 1), ("shard_size", shard_size, 1)]:
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"datasets.synthetic.{name} = {value!r}: must be an integer >= {least}")
    if num_classes > len(sounds.CLASSES):
        raise ConfigError(f"datasets.synthetic.num_classes = {num_classes}: the built-in set has "
                          f"{len(sounds.CLASSES)} sound classes; use at most that many")
    settings = dict(num_classes=num_classes, multilabel=multilabel, train=train_samples, eval=eval_samples,
                    clip_seconds=clip_seconds, sample_rate=sample_rate, seed=seed, shard_size=shard_size,
                    version=GENERATOR_VERSION)
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(root) if root else cache_home() / "synthetic" / f"{'ml' if multilabel else 'sl'}{num_classes}-{tag}"
    if not (target / "dataset.json").exists():
        _generate(target, settings)
    return webdataset(root=str(target), num_workers=num_workers, shuffle_buffer=shuffle_buffer)


def _generate(target: Path, s: dict[str, Any]) -> None:
    # Write into a private folder, then rename: concurrent ranks never see half a dataset.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    classes = list(sounds.CLASSES[: s["num_classes"]])
    kwargs = dict(num_classes=s["num_classes"], multilabel=s["multilabel"], sample_rate=s["sample_rate"],
                  clip_seconds=s["clip_seconds"])
    try:
        with Progress(transient=True) as bar, DatasetWriter(
            str(tmp), name="synthetic", classes=classes, multilabel=s["multilabel"], sample_rate=s["sample_rate"],
            clip_seconds=s["clip_seconds"], max_count=s["shard_size"],
        ) as writer:
            for split in ("train", "eval"):
                task = bar.add_task(f"generating synthetic {split}", total=s[split])
                for key, wave, labels in sounds.iter_clips(s[split], seed=s["seed"], split=split, **kwargs):
                    writer.write(split, key, wave, labels)
                    bar.advance(task)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is identical
            if not (target / "dataset.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Manifest.load(str(target))  # fail here, loudly, if what we wrote does not read back
