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
    from cmkd.registry import RegistryError
    from cmkd.train.checkpoint import CheckpointError
    from cmkd.train.loop import TrainingError

    return (ConfigError, RegistryError, CheckpointError, TrainingError, AudioError, FileNotFoundError)


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
) -> None:
    """Run an experiment: every stage in order (a finished stage is reused), then compare them."""
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        _launch_local(nproc_per_node)
        return
    from cmkd import components, config
    from cmkd.experiment import run_experiment
    from cmkd.train import distributed

    components.load_all()
    try:
        text = config.parse(configs, bind)
        env = distributed.init(device)
        try:
            run_experiment(run_dir, text, env)
        finally:
            distributed.shutdown()
    except _user_errors() as err:
        fail(str(err))


def _launch_local(nproc: int) -> None:
    """Re-run this very command under torch's elastic launcher, one process per device."""
    from torch.distributed import run as torchrun

    argv = sys.argv[1:]
    rest = []
    skip = False
    for i, arg in enumerate(argv):  # drop our own --nproc-per-node; torchrun gets its own
        if skip:
            skip = False
            continue
        if arg == "--nproc-per-node":
            skip = True
            continue
        if arg.startswith("--nproc-per-node="):
            continue
        rest.append(arg)
    torchrun.main(["--standalone", f"--nproc-per-node={nproc}", "-m", "cmkd", *rest])


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
