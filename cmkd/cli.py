"""The `cmkd` command. Flags say how to run; everything that defines an experiment is gin."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import List, Optional

import typer

from cmkd.commands.common import (
    OUT_OF_MEMORY,
    RANK_ERRORS,
    USER_ERRORS,
    debugging,
    exit_code,
    fail,
    fail_verbatim,
    first_failed,
    mark_failed,
    message,
    rank_error,
    usage_error,
)

# Command bodies import what they use late, on purpose: `cmkd --help` and each command start
# without loading torch and the modules of the other commands.

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Audio classifiers with CNN/Transformer cross-model knowledge distillation (CMKD).",
)


def _one_line_usage_errors() -> None:
    from typer import rich_utils

    rich_utils.rich_format_error = usage_error  # typer calls it for every usage error it prints


_one_line_usage_errors()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error (also: CMKD_DEBUG=1)"),
) -> None:
    if debug:
        os.environ["CMKD_DEBUG"] = "1"  # read where errors become one line; ranks launched later inherit it
    if not debugging():  # a warning is a line for the user, not Python's file:line and source excerpt
        import warnings

        warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    from rich.markup import escape

    from cmkd.console import console

    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


@app.command()
def run(
    configs: List[str] = typer.Argument(..., help="gin files or shipped recipe names "
                                        "(cnn_to_ast.gin, esc50/cnn_to_ast; "
                                        "`cmkd recipes` lists them); later ones override earlier"),
    bind: List[str] = typer.Option([], "-b", "--bind", help="gin binding overriding the files, e.g. 'train.epochs=3'"),
    run_dir: str = typer.Option("runs", help="where runs/<experiment>/<stage>/ go (a path or fsspec URL)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1,
                                       help="processes (GPUs) on this machine; >1 launches DDP"),
    resume: bool = typer.Option(
        False, "--resume", help="continue stages that stopped part-way from their last checkpoint"),
    max_restarts: int = typer.Option(
        0, "--max-restarts", min=0,
        help="restart all processes this often after a failure (torch elastic); restarts resume"),
    allow_config_change: bool = typer.Option(
        False, "--allow-config-change",
        help="with --resume: go on with settings that differ from last.pt's (recorded in the checkpoint and summary)"),
    force_unlock: bool = typer.Option(
        False, "--force-unlock", help="take a stage folder's lock held by another (dead) run"),
) -> None:
    """Run an experiment: every stage in order (a finished stage is reused), then compare them."""
    if (nproc_per_node > 1 or max_restarts > 0) and "LOCAL_RANK" not in os.environ:
        _launch_local(nproc_per_node, max_restarts)
        return
    # A restarted elastic worker must pick up where the failed attempt left off.
    resume = resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    from cmkd import config, plugins
    from cmkd.experiment import run_experiment
    from cmkd.train import distributed

    plugins.load_all()
    try:
        text = config.parse(configs, bind)
        env = distributed.init(device)
        try:
            # @record: under torchrun, the agent's failure report shows this rank's traceback.
            distributed.record(run_experiment)(run_dir, text, env, resume=resume,
                                               allow_config_change=allow_config_change, force_unlock=force_unlock)
        except BaseException:
            if env.distributed:  # no teardown: see main()
                global _RANK_FAILED
                _RANK_FAILED = True
                mark_failed(env.rank)
            else:
                distributed.shutdown()
            raise
        distributed.shutdown()
    except USER_ERRORS as err:  # config values in the message hold brackets ([...], [@...]): verbatim
        fail_verbatim(message(err), exit_code(err))
    except MemoryError:
        fail(OUT_OF_MEMORY)


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
    if not debugging():  # the agent logs each stopped rank at WARNING/ERROR; the one line below says it all
        for logger_name in list(logging.root.manager.loggerDict):
            if logger_name.startswith("torch.distributed.elastic"):
                logging.getLogger(logger_name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="cmkd-rank-errors-") as errors:
        os.environ[RANK_ERRORS] = errors  # ranks with a user error leave its line here instead of N copies
        try:
            torchrun.main(["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
                           "-m", "cmkd", *rest])
            return
        except ChildFailedError as err:  # the agent has stopped the other ranks; say which one failed first
            rank = first_failed(errors)
            if rank not in err.failures:
                rank = err.get_first_failure()[0]
            name, code, said = err.name, err.failures[rank].exitcode, rank_error(errors, rank)
        finally:
            del os.environ[RANK_ERRORS]  # this process's own error line is printed, not left in a file
    if said is not None:
        fail_verbatim(f"{said} (rank {rank} of {nproc}; the other processes were stopped)", code=code)
    fail(f"{name}: rank {rank} (of {nproc}) exited with code {code} and the other processes were stopped; "
         f"its error is printed above", code=code if code > 0 else 1)


@app.command()
def registry(kind: Optional[str] = typer.Argument(None, help="one kind, e.g. backbones")) -> None:
    """List every registered component and where it came from (plugins included)."""
    from rich.table import Table

    from cmkd import plugins
    from cmkd.console import out
    from cmkd.registry import REGISTRIES

    statuses = plugins.load_all()
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
    for p in statuses:
        if p.error:
            out.print(f"[yellow]plugin {p.name!r} ({p.module} from {p.distribution}) failed to load:[/] {p.error}")


@app.command()
def recipes() -> None:
    """List the recipes shipped with cmkd: names that `cmkd run` finds from any folder."""
    from cmkd import config
    from cmkd.console import out

    out.print(f"recipes in {config.recipes_dir()} (`cmkd run NAME`, e.g. `cmkd run cnn_to_ast.gin`):",
              highlight=False, soft_wrap=True)
    for name in config.list_recipes():
        out.print(f"  {name}", highlight=False)


def _register_command_modules() -> None:
    import importlib

    from cmkd.commands import COMMAND_MODULES

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(app)


_register_command_modules()


_RANK_FAILED = False  # set by `run` when this rank of a multi-process job failed


def main() -> None:
    try:
        app()
    except BaseException as err:
        if not _RANK_FAILED:
            raise
        # A failed rank leaves at once, its error out, without tearing down its process group: its peers
        # may be mid-collective, and gloo closing under their traffic throws inside its I/O thread, which
        # aborts this process (exit -6) and the launcher blames a crash, not the error. The kernel closes
        # the sockets; a peer that fails on that is told apart by mark_failed.
        import traceback

        code = err.code if isinstance(err, SystemExit) else 1
        if not isinstance(err, SystemExit):
            traceback.print_exception(err)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    main()
