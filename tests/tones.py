"""Tone clips and tone datasets for tests: a sine whose pitch encodes the clip's first label.

A module of its own (not conftest.py) so tests anywhere under tests/ can import it by name:
`from tones import SR, tone, write_tone_dataset`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SR = 16000


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_tone_dataset(root: str, splits: dict[str, list[tuple[str, list[str], float]]], *, classes: list[str],
                       multilabel: bool = True, clip_seconds: float = 0.5, **kwargs: Any) -> Any:
    """Write ``{"train": [(key, labels, seconds), ...], ...}`` with DatasetWriter; returns the Manifest.

    Each clip is a sine whose pitch encodes its first label.
    """
    from cmkd.data.writer import DatasetWriter

    with DatasetWriter(root, name="tones", classes=classes, multilabel=multilabel, sample_rate=SR,
                       clip_seconds=clip_seconds, **kwargs) as ds:
        for split, clips in splits.items():
            ds.split(split)  # an empty list still makes an (empty) split
            for key, labels, seconds in clips:
                freq = 200.0 * (1 + classes.index(labels[0])) if labels else 100.0
                ds.write(split, key, tone(freq, seconds), labels)
    return ds.close()
