"""Weight averaging: the uniform mean of several epochs' (or checkpoints') state dicts.

As the PSLA/AST repositories do it (docs/reference.md, "Training recipes"): sum the state dicts of
the chosen epochs and divide by their number. Floating-point tensors (weights and
BatchNorm running statistics) are averaged, in float64 then cast back; integer buffers such
as BatchNorm's ``num_batches_tracked`` cannot be averaged meaningfully and are taken from the
last state dict.

``train.average_last = N`` averages the last N epochs of a stage into
``checkpoints/averaged.pt``; ``cmkd average CKPT... -o OUT`` does the same for given files.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from cmkd import checkpoint, saved_config, storage
from cmkd.console import console
from cmkd.train import distributed

StateDict = Mapping[str, torch.Tensor]

__all__ = ["LastEpochs", "RunningMean", "average_checkpoints", "average_state_dicts"]


class RunningMean:
    """The uniform mean of state dicts added one at a time (only one float64 sum in memory)."""

    def __init__(self, where: str = "average"):
        self.where = where
        self.count = 0
        self._sum: dict[str, torch.Tensor] = {}  # float tensors: float64 running sums
        self._last: dict[str, torch.Tensor] = {}  # integer buffers: the latest value
        self._dtypes: dict[str, torch.dtype] = {}
        self._shapes: dict[str, torch.Size] = {}

    def add(self, state: StateDict, name: str = "") -> None:
        label = name or f"state dict #{self.count + 1}"
        if self.count and set(state) != set(self._dtypes):
            missing, extra = sorted(set(self._dtypes) - set(state)), sorted(set(state) - set(self._dtypes))
            raise ValueError(
                f"{self.where}: {label} has other tensors than the first (missing {missing[:5]}, extra {extra[:5]}); "
                f"only checkpoints of the same model can be averaged"
            )
        for key, value in state.items():
            value = value.detach()
            if self.count:
                if value.shape != self._shapes[key] or value.dtype != self._dtypes[key]:
                    raise ValueError(
                        f"{self.where}: {label} has {key} of shape {tuple(value.shape)} {value.dtype}, the first "
                        f"has {tuple(self._shapes[key])} {self._dtypes[key]}; only the same model can be averaged"
                    )
            else:
                self._dtypes[key], self._shapes[key] = value.dtype, value.shape
            if value.is_floating_point():
                acc = value.to("cpu", torch.float64, copy=True)
                self._sum[key] = acc if not self.count else self._sum[key].add_(acc)
            else:
                self._last[key] = value.to("cpu", copy=True)  # integer buffers: the last one wins
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError(f"{self.where}: nothing to average; add at least one state dict")
        out: dict[str, torch.Tensor] = {}
        for key, dtype in self._dtypes.items():  # the first state dict's key order
            out[key] = (self._sum[key] / self.count).to(dtype) if key in self._sum else self._last[key].clone()
        return out


def average_state_dicts(states: Iterable[StateDict]) -> dict[str, torch.Tensor]:
    """Uniform mean of ``states`` (float tensors averaged; integer buffers from the last)."""
    mean = RunningMean("average_state_dicts")
    for state in states:
        mean.add(state)
    return mean.result()


class LastEpochs:
    """Averages epochs ``epochs - n + 1 .. epochs`` of a stage (``train.average_last = n``).

    Each of those epochs' weights is saved as a normal checkpoint,
    ``checkpoints/epochs/epoch-NNN.pt`` (as PSLA keeps every epoch's model), and averaged from
    the files at the end: that survives ``--resume`` and keeps no copies in memory. The files
    stay (``cmkd average`` / a checkpoint ensemble can reuse them); delete them to save disk.
    """

    def __init__(self, n: int, epochs: int, ckpt_dir: str):
        if n < 0 or n > epochs:
            raise ValueError(
                f"train.average_last = {n} must be between 0 (off) and train.epochs = {epochs}; PSLA averages "
                f"e.g. the last 20 of 40 epochs"
            )
        self.n, self.first, self.last = int(n), epochs - int(n) + 1, int(epochs)
        self.ckpt_dir = ckpt_dir

    @property
    def enabled(self) -> bool:
        return self.n > 0

    def epoch_url(self, epoch: int) -> str:
        return storage.join(self.ckpt_dir, "epochs", f"epoch-{epoch:03d}.pt")

    @property
    def url(self) -> str:
        return storage.join(self.ckpt_dir, "averaged.pt")

    def add(self, epoch: int, model: nn.Module, payload: dict[str, Any], env: distributed.DistEnv) -> None:
        """After each epoch (1-based): save its weights if it is one of the last ``n`` (rank 0 writes)."""
        if self.enabled and epoch >= self.first and env.is_main:
            checkpoint.save(self.epoch_url(epoch), dict(payload, model=model.state_dict()))

    def finish(self, model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]], meta: dict[str, Any],
               env: distributed.DistEnv) -> dict[str, Any] | None:
        """Average the saved epochs into ``averaged.pt``, evaluate it (on a copy of ``model``,
        which keeps its last weights) and return the record for summary.json, or None if off."""
        if not self.enabled:
            return None
        epochs = list(range(self.first, self.last + 1))
        if env.is_main:
            mean = RunningMean("train.average_last")
            for e in epochs:
                url = self.epoch_url(e)
                if not storage.exists(url):
                    raise checkpoint.CheckpointError(
                        f"train.average_last = {self.n}: {url} is missing, so epochs {epochs[0]}-{epochs[-1]} cannot "
                        f"be averaged; it is written at the end of each of those epochs — retrain the stage "
                        f"(delete {self.ckpt_dir}) or average what exists with `cmkd average`"
                    )
                mean.add(checkpoint.load(url)["model"], url)
            checkpoint.save(self.url, dict(meta, model=mean.result(), metrics={}, averaged_epochs=epochs))
        distributed.barrier(env)  # every rank evaluates the file rank 0 wrote
        averaged = copy.deepcopy(model)
        averaged.load_state_dict(checkpoint.load(self.url)["model"])
        metrics = evaluate(averaged)
        record = dict(epochs=epochs, **{f"eval_{k}": v for k, v in metrics.items()})
        if env.is_main:
            state = {k: v.detach().cpu() for k, v in averaged.state_dict().items()}
            checkpoint.save(self.url, dict(meta, model=state, metrics=record, averaged_epochs=epochs))
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            console.print(f"  averaged epochs {epochs[0]}-{epochs[-1]}: eval {shown} → {self.url}", highlight=False)
        distributed.barrier(env)  # a later stage on another rank may load averaged.pt at once
        return record


def _config_diff(a: str, b: str) -> str:
    lines = [ln for ln in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
             if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return "\n  ".join(lines[:6])


def average_checkpoints(urls: Sequence[str], out: str, allow_config_mismatch: bool = False) -> dict[str, Any]:
    """Average checkpoints of one model into ``out`` (a loadable cmkd checkpoint); returns its payload.

    They must share classes and architecture; by default their gin config too (the same run),
    since averaging separately trained models (other init or data) gives a broken model.
    """
    if len(urls) < 2:
        raise ValueError(f"cmkd average: got {len(urls)} checkpoint(s); give at least two to average")
    mean = RunningMean("cmkd average")
    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    for url in urls:
        ckpt = checkpoint.load(url)
        # The saved config is copied into the output: refuse one that could run code when loaded.
        saved_config.check(str(ckpt.get("config", "")), f"checkpoint {url}")
        if not first:
            first = ckpt
        else:
            for field in ("classes", "multilabel", "sample_rate", "clip_samples", "norm"):
                if ckpt.get(field) != first.get(field):
                    raise ValueError(
                        f"cmkd average: {url} has {field} = {str(ckpt.get(field))[:120]} but {urls[0]} has "
                        f"{str(first.get(field))[:120]}; only checkpoints of the same model and dataset can be averaged"
                    )
            if ckpt.get("config") != first.get("config") and not allow_config_mismatch:
                raise ValueError(
                    f"cmkd average: {url} and {urls[0]} have different configs:\n  "
                    f"{_config_diff(first.get('config', ''), ckpt.get('config', ''))}\n"
                    f"average epochs of one run; if they really are the same model (e.g. fine-tuned from one init), "
                    f"pass --allow-config-mismatch"
                )
        try:
            mean.add(ckpt["model"], url)
        except ValueError as err:
            raise ValueError(f"{err} ({url})") from None
        last = ckpt
    meta = {k: v for k, v in first.items()
            if k not in ("model", "optimizer", "scheduler", "metrics", "format", "format_version", "cmkd_version")}
    payload = dict(meta, model=mean.result(), epoch=last.get("epoch"), step=last.get("step"), metrics={},
                   averaged_from=[str(u) for u in urls])
    checkpoint.save(out, payload)
    return payload
