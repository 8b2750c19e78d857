"""A tiny deterministic dataset for the DDP tests, registered as ``@datasets.ddp_toy``.

A ``cmkd run`` subprocess imports it through a gin ``import ddp_toy`` line (tests/ is on its
PYTHONPATH). Step ``s`` of epoch ``e`` always has the same global batch of
``global_batch`` clips; rank ``r`` of ``world_size`` gets exactly its slice
``[r * batch_size, (r + 1) * batch_size)``. So one process with ``train.batch_size =
global_batch`` and N processes with ``global_batch / N`` train on the very same examples,
which is what makes their loss trajectories comparable.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from cmkd.data.manifest import Norm
from cmkd.registry import datasets


class ToyDataset:
    """Implements the dataset interface the training loop uses (see cmkd/train/loop.py)."""

    def __init__(self, num_classes: int, steps: int, global_batch: int, eval_samples: int, clip_seconds: float,
                 sample_rate: int, seed: int, fail_rank: int, fail_step: int):
        self.classes = [f"class{i}" for i in range(num_classes)]
        self.num_classes, self.multilabel = num_classes, False
        self.sample_rate, self.clip_samples = sample_rate, int(round(clip_seconds * sample_rate))
        self.norm = Norm(mean=-6.0, std=4.0)
        self.steps, self.global_batch, self.eval_samples, self.seed = steps, global_batch, eval_samples, seed
        self.fail_rank, self.fail_step = fail_rank, fail_step

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        if batch_size * world_size != self.global_batch:
            raise ValueError(
                f"datasets.ddp_toy: train.batch_size {batch_size} x {world_size} process(es) must equal "
                f"global_batch {self.global_batch}; set train.batch_size = global_batch / nproc"
            )
        return self.steps

    def clip(self, split: str, index: int) -> tuple[torch.Tensor, int]:
        """A sine whose pitch encodes the label, plus noise; a pure function of (seed, split, index)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 2 + (split == "eval"))
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        t = torch.arange(self.clip_samples, dtype=torch.float64) / self.sample_rate
        tone = 0.3 * torch.sin(2 * math.pi * 300.0 * (1 + label) * t)
        noise = 0.05 * torch.randn(self.clip_samples, generator=gen, dtype=torch.float64)
        return (tone + noise).float(), label

    def batch(self, split: str, indices: list[int]) -> dict[str, Any]:
        waves, targets = [], torch.zeros(len(indices), self.num_classes)
        for row, i in enumerate(indices):
            wave, label = self.clip(split, i)
            waves.append(wave)
            targets[row, label] = 1.0
        return {"key": [f"{split}-{i}" for i in indices], "wave": torch.stack(waves), "target": targets}

    def train_loader(self, batch_size: int, *, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                     start_step: int = 0, resume: Any = None) -> Iterator[dict[str, Any]]:
        self.steps_per_epoch(batch_size, world_size)
        for step in range(start_step, self.steps):
            if rank == self.fail_rank and step == self.fail_step:
                raise RuntimeError(f"datasets.ddp_toy: planned failure on rank {rank} at step {step}")
            first = (epoch * self.steps + step) * self.global_batch + rank * batch_size
            yield self.batch("train", list(range(first, first + batch_size)))

    def eval_loader(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
        mine = list(range(self.eval_samples))[rank::world_size]  # every sample on exactly one rank
        for start in range(0, len(mine), batch_size):
            yield self.batch("eval", mine[start:start + batch_size])


@datasets.register("ddp_toy")
def ddp_toy(num_classes: int = 3, steps: int = 4, global_batch: int = 8, eval_samples: int = 7,
            clip_seconds: float = 0.5, sample_rate: int = 16000, seed: int = 0, fail_rank: int = -1,
            fail_step: int = -1) -> ToyDataset:
    """Fixed global batches split across ranks; ``fail_rank``/``fail_step`` make one rank raise."""
    return ToyDataset(num_classes, steps, global_batch, eval_samples, clip_seconds, sample_rate, seed,
                      fail_rank, fail_step)
