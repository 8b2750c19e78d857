"""CMKD on real audio: CNN alone, AST alone, CNN→AST, AST→CNN, self-KD (and τ = 2.5), trained to a
budget measured on the AST's curves.

    python benchmarks/cmkd_study.py --probe      # 1. the epoch budget: AST alone on a ladder of budgets
    python benchmarks/cmkd_study.py              # 2. the grid at the probe's budgets (resumes; many CPU-hours)
    python benchmarks/cmkd_study.py --report-only   # results.md / results.png from the runs finished so far
    python benchmarks/cmkd_study.py --quick      # a smoke check in minutes (results under --work/quick)

Data (read only, never copied into the repository): /work/shared/data/esc10 (5 folds) and
/work/shared/data/fsdd (6 speakers; 3 held-out speaker pairs). `cmkd prepare` writes shards into
--work; every (dataset, split, seed) is one `cmkd run` of a gin file this script writes, whose
single-model stages ARE the teachers of its KD stages. A finished stage is reused, so a stopped
study continues where it was. The figures in results.md are computed from the runs' metrics by
this script (benchmarks/study/), never typed in.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import ledger, runs  # noqa: E402
from study.setup import DATASETS, FSDD_PAIRS, REPO, fsdd_root, prepare_esc10, prepare_fsdd  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/work/shared/data"), help="holds esc10/ and fsdd/")
    p.add_argument("--work", type=Path, default=Path("/tmp/cmkd_study2"),
                   help="prepared shards, gin files, runs and logs (outside the repository)")
    p.add_argument("--probe", action="store_true", help="run the budget probe (AST alone on the epoch ladder)")
    p.add_argument("--seeds", default="0,1,2,3",
                   help="the seeds the grid may use, in order: a dataset takes the next while a KD cell's paired "
                        "standard error is above 2 pp")
    p.add_argument("--folds", default="1,2,3,4,5", help="ESC-10 folds held out in turn")
    p.add_argument("--pairs", default="0,1,2", help="FSDD speaker pairs held out in turn (indices into "
                                                     f"{['-'.join(x) for x in FSDD_PAIRS]})")
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help="what this invocation trains; the report covers every dataset with runs")
    p.add_argument("--tau-seeds", type=int, default=None,
                   help="how many of a dataset's seeds (the first) the τ = 2.5 pass runs on, once they settle "
                        "(default: all, so the τ cells pair with the same runs as the others)")
    p.add_argument("--no-tau", dest="tau_seeds", action="store_const", const=0, help="skip the τ = 2.5 pass")
    p.add_argument("--budget", action="append", default=[], metavar="DATASET=EPOCHS",
                   help="override the probe's budget (e.g. --budget esc10=100)")
    p.add_argument("--jobs", type=int, default=2, help="`cmkd run` processes at a time (each on 1 thread)")
    p.add_argument("--quick", action="store_true", help="tiny smoke check: rungs of 1 and 2 epochs, 1 seed, 1 split")
    p.add_argument("--report-only", action="store_true", help="only rewrite results.md/.png from finished runs")
    p.add_argument("--out", type=Path, default=None, help="results markdown (default benchmarks/results.md; "
                                                         "--quick: <work>/quick/results.md)")
    p.add_argument("--no-docs", dest="docs", action="store_false",
                   help="leave docs/distillation.md alone (--quick and --out never touch it: it links results.md)")
    args = p.parse_args()
    if args.out is not None:
        args.docs = False
    args.command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    if args.quick:
        args.docs, args.work, args.tau_seeds = False, args.work / "quick", 0
        args.seeds, args.folds, args.pairs = "0", "1", "0"
        runs.PROBE_RUNGS, runs.PROBE_STEP = {"esc10": [1, 2], "fsdd": [1, 2]}, 1
        runs.PROBE_RUNS = {k: v[:1] for k, v in runs.PROBE_RUNS.items()}
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    args.folds = [int(f) for f in str(args.folds).split(",") if f != ""]
    args.pairs = [int(f) for f in str(args.pairs).split(",") if f != ""]
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.budget = {k: int(v) for k, v in (b.split("=") for b in args.budget)}
    work = args.work.resolve()
    if REPO in work.parents or work == REPO:
        p.error(f"--work {work} is inside the repository; the prepared audio must stay outside it")
    args.work = work
    return args


def started(work: Path, ds: str) -> bool:
    return any((work / "runs").glob(f"{ds}-*"))


def prepare(args: argparse.Namespace, logs: Path) -> None:
    if "esc10" in args.datasets:
        prepare_esc10(args.data / "esc10", args.work / "data" / "esc10", logs / "prepare.log")
    if "fsdd" in args.datasets:
        for pair in FSDD_PAIRS:
            prepare_fsdd(args.data / "fsdd", fsdd_root(args.work, pair), pair, logs / "prepare.log")


def plan(args: argparse.Namespace, gins: dict[str, Path]) -> tuple[list, dict, list]:
    """The probe's groups, the budgets it has settled (or --budget) and the grid at those budgets
    (both grow as runs finish: see results.probe_plan and results.grid_plan)."""
    from study import results

    probe = results.probe_plan(args.work, gins)
    budgets = results.budgets(probe, args.budget)
    known = {ds: e for ds, e in budgets.items() if e is not None and ds in gins}
    grid = results.grid_plan(args.work, {ds: gins[ds] for ds in known}, known, args.seeds, args.folds, args.pairs,
                             args.tau_seeds)
    return probe, budgets, grid


def main() -> None:
    from study import report

    args = parse()
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gins = runs.write_gins(args.work, args.datasets)
    probe, budgets, grid = plan(args, gins)
    if not args.report_only:
        pick = 0 if args.probe else 2  # which of plan()'s lists this invocation runs
        if not args.probe and (missing := [ds for ds in args.datasets if budgets.get(ds) is None]):
            raise SystemExit(f"no settled budget for {missing}: run --probe to the end first (or pass "
                             "--budget DATASET=EPOCHS)")
        to_run = (probe, budgets, grid)[pick]
        print(f"work dir {args.work}; {len(to_run)} groups; commands like:\n  {shlex.join(to_run[0].command())}",
              flush=True)
        with ledger.Ledger(args.work):  # the study may be stopped and continued: its wall time adds up
            prepare(args, logs)
            runs.run_groups(to_run, args.jobs, logs)
            # Finished runs may grow the plan (a rising ladder's next rung, the grid's next seed, the τ
            # pass once the seeds settle): run what is new, until nothing is.
            while len(more := plan(args, gins)[pick]) > len(to_run):
                to_run = more
                runs.run_groups(to_run, args.jobs, logs)
    # --datasets picks what this invocation trains; the report covers every dataset of the study that
    # has runs, so one dataset's driver finishing never writes the other's tables away.
    args.datasets = [ds for ds in DATASETS if ds in args.datasets or started(args.work, ds)]
    gins = runs.write_gins(args.work, args.datasets)
    probe, budgets, grid = plan(args, gins)
    md = args.out or (args.work / "results.md" if args.quick else REPO / "benchmarks" / "results.md")
    report.write(args, gins, probe, grid, md)
    print(f"wrote {md} and {md.with_suffix('.png')}")


if __name__ == "__main__":
    main()
