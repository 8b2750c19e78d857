"""`--resume` honours the config: the operative config is compared with the one saved in
``last.pt``. A change that makes the run something else (optimizer, schedule, batch size, model,
data, seed, loss, strategy...) is refused unless ``--allow-config-change``; a change of how the
run is executed (logging, workers, checkpoint cadence, retries) is allowed with a note;
``train.epochs`` may grow (a longer run of the same schedule is what "train on" means)."""

from __future__ import annotations

from typing import Any

from cmkd.config import ConfigError, _bindings

# Parameter names that change how a run executes, never what it learns.
HARMLESS = frozenset({
    "log_every", "log_steps", "num_workers", "prefetch_factor", "checkpoint_every", "retries", "backoff",
    "on_error", "compile", "deterministic",
})


def _relevant(key: str, scope: str) -> bool:
    *scopes, name = key.split("/")
    return not name.startswith("experiment.") and all(s == scope for s in scopes)


def config_changes(saved: str, current: str, scope: str) -> list[tuple[str, str, str]]:
    """``(binding, old, new)`` for every binding the stage sees that differs between the configs."""
    old, new = _bindings(saved), _bindings(current)
    return [(k, old.get(k, "(unset)"), new.get(k, "(unset)"))
            for k in sorted(k for k in old.keys() | new.keys() if _relevant(k, scope)) if old.get(k) != new.get(k)]


def _harmless(key: str, old: str, new: str) -> bool:
    param = key.rsplit(".", 1)[-1]
    if param in HARMLESS:
        return True
    if key.rsplit("/", 1)[-1] == "train.epochs":  # more epochs: the same run, trained on
        try:
            return int(new) >= int(old)
        except ValueError:
            return False
    return False


def check_resume(saved: str, current: str, stage: str, directory: str, allow: bool,
                 step_in_epoch: int) -> tuple[list[str], list[str]]:
    """Refuse a resume whose config makes it another run; returns (notes, recorded changes).

    ``recorded`` are the changes accepted with ``--allow-config-change`` (kept in the checkpoint
    and the summary); ``notes`` are the harmless ones. A batch-size change needs an epoch boundary
    even when allowed: the stream position inside an epoch is counted in batches."""
    changes = config_changes(saved, current, stage)
    notes = [f"{k}: {o} → {n}" for k, o, n in changes if _harmless(k, o, n)]
    serious = [(k, o, n) for k, o, n in changes if not _harmless(k, o, n)]
    listed = "\n    ".join(f"{k}: {o} → {n}" for k, o, n in serious)
    if serious and not allow:
        raise ConfigError(
            f"--resume of stage {stage!r} ({directory}) with a config that makes it another run; changed "
            f"since its last.pt:\n    {listed}\n  Either train anew in a new run folder (--run-dir or "
            f"experiment.name), or pass --resume --allow-config-change to continue with these settings (the change "
            f"is recorded in the checkpoint and summary.json)")
    if step_in_epoch and any(k.rsplit("/", 1)[-1] == "train.batch_size" for k, _, _ in serious):
        raise ConfigError(
            f"--resume of stage {stage!r} ({directory}): train.batch_size changed, but last.pt stopped {step_in_epoch} "
            f"steps into an epoch, where the stream position counts batches; resume with the old batch size to the end "
            f"of the epoch, or train anew")
    return notes, [f"{k}: {o} → {n}" for k, o, n in serious]


def record(payload: dict[str, Any]) -> list[str]:
    """The config changes accepted so far (stored as one string per change)."""
    return [str(c) for c in payload.get("config_changes", [])]
