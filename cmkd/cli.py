"""The `cmkd` command. Flags say how to run; everything that defines an experiment is gin."""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Audio classifiers with CNN/Transformer cross-model knowledge distillation (CMKD).",
)

def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors users can fix: printed as one clear message (exit code 2), not a traceback."""
    from cmkd.audio.io import AudioError
    from cmkd.config import ConfigError
    from cmkd.data.manifest import ManifestError
    from cmkd.data.stream import SampleError, ShardError
    from cmkd.registry import RegistryError
    from cmkd.storage import StorageError
    from cmkd.train.checkpoint import CheckpointError
    from cmkd.train.distributed import DistributedSetupError
    from cmkd.train.loop import TrainingError

    return (ConfigError, RegistryError, CheckpointError, TrainingError, AudioError, FileNotFoundError,
            DistributedSetupError, ManifestError, ShardError, SampleError, StorageError)


OUT_OF_MEMORY = ("out of memory (MemoryError); lower the batch size (train.batch_size), the number of data workers "
                 "(datasets.webdataset.num_workers) or the shuffle buffer, or use a machine with more RAM")


def fail(message: str, code: int = 2) -> None:
    from cmkd.train.progress import console

    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def run(
    configs: List[str] = typer.Argument(..., help="gin files (e.g. gin/cnn_to_ast.gin); later ones override earlier"),
    bind: List[str] = typer.Option([], "-b", "--bind", help="gin binding overriding the files, e.g. 'train.epochs=3'"),
    run_dir: str = typer.Option("runs", help="where runs/<experiment>/<stage>/ go (a path or fsspec URL)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="processes (GPUs) on this machine; >1 launches DDP"),
    resume: bool = typer.Option(False, "--resume", help="continue stages that stopped part-way from their last checkpoint"),
    max_restarts: int = typer.Option(0, "--max-restarts", help="restart all processes this often after a failure (torch elastic); restarts resume"),
    allow_config_change: bool = typer.Option(False, "--allow-config-change", help="with --resume: go on with settings that differ from last.pt's (recorded in the checkpoint and summary)"),
    force_unlock: bool = typer.Option(False, "--force-unlock", help="take a stage folder's lock held by another (dead) run"),
) -> None:
    """Run an experiment: every stage in order (a finished stage is reused), then compare them."""
    if (nproc_per_node > 1 or max_restarts > 0) and "LOCAL_RANK" not in os.environ:
        _launch_local(nproc_per_node, max_restarts)
        return
    # A restarted elastic worker must pick up where the failed attempt left off.
    resume = resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    from cmkd import components, config
    from cmkd.experiment import run_experiment
    from cmkd.train import distributed

    components.load_all()
    try:
        text = config.parse(configs, bind)
        env = distributed.init(device)
        try:
            # @record: under torchrun, the agent's failure report shows this rank's traceback.
            distributed.record(run_experiment)(run_dir, text, env, resume=resume,
                                               allow_config_change=allow_config_change, force_unlock=force_unlock)
        finally:
            distributed.shutdown()
    except _user_errors() as err:
        from rich.markup import escape  # config values in the message hold brackets ([...], [@...])

        fail(escape(_message(err)))
    except MemoryError:
        fail(OUT_OF_MEMORY)


def _message(err: BaseException) -> str:
    """The error's own message: without the DataLoader worker's traceback text and without the
    "In call to configurable 'train' (<function ...>)" lines gin appends on the way out."""
    import re

    from cmkd.data.stream import worker_error_message

    return re.sub(r"\n\s*In call to configurable '[^']*' \([^\n]*\)(?: in scope '[^']*')?", "",
                  worker_error_message(err))


def _launch_local(nproc: int, max_restarts: int = 0) -> None:
    """Re-run this very command under torch's elastic launcher, one process per device."""
    from torch.distributed import run as torchrun

    argv = sys.argv[1:]
    rest = []
    skip = False
    for arg in argv:  # drop our own launcher flags; torchrun gets its own
        if skip:
            skip = False
            continue
        if arg in ("--nproc-per-node", "--max-restarts"):
            skip = True
            continue
        if arg.startswith(("--nproc-per-node=", "--max-restarts=")):
            continue
        rest.append(arg)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent's shared TCPStore outlives a restart with the failed attempt's keys in it, so the
    # new ranks can read the dead rank 0's gloo/NCCL address and fail or hang (pytorch#135712).
    # Without sharing, each rendezvous round puts its store on a fresh port.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun.main(["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
                       "-m", "cmkd", *rest])
    except ChildFailedError as err:  # the agent has stopped the other ranks; say which one failed
        rank, failure = err.get_first_failure()
        fail(f"{err.name}: rank {rank} (of {nproc}) exited with code {failure.exitcode} and the other processes "
             f"were stopped; its error is printed above", code=failure.exitcode if failure.exitcode > 0 else 1)


@app.command()
def registry(kind: Optional[str] = typer.Argument(None, help="one kind, e.g. backbones")) -> None:
    """List every registered component and where it came from (plugins included)."""
    from rich.table import Table

    from cmkd import components
    from cmkd.registry import REGISTRIES
    from cmkd.train.progress import out

    plugins = components.load_all()
    kinds = [kind] if kind else list(REGISTRIES)
    for k in kinds:
        if k not in REGISTRIES:
            fail(f"unknown kind {k!r}; kinds are: {', '.join(REGISTRIES)}")
        t = Table(title=k, title_style="bold", show_lines=False)
        t.add_column("name")
        t.add_column("gin")
        t.add_column("origin")
        t.add_column("summary")
        for e in REGISTRIES[k].entries():
            t.add_row(e.name, f"@{k}.{e.name}", e.origin, e.doc)
        out.print(t)
    for p in plugins:
        if p.error:
            out.print(f"[yellow]plugin {p.name!r} ({p.module} from {p.distribution}) failed to load:[/] {p.error}")


def _register_command_modules() -> None:
    import importlib

    from cmkd.commands import COMMAND_MODULES

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(app)


_register_command_modules()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
