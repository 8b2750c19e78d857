"""results.md (and the "Results on real audio" section of docs/distillation.md) from the runs."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

from study import ledger, plot, runs, stats
from study.results import (
    Cell,
    budgets,
    collect,
    count,
    findings,
    imprecise,
    ladder,
    probe_runs_text,
    probe_scores,
    train_seconds,
    vs_baseline,
)
from study.runs import Group, fmt_time
from study.setup import ALL, CELLS, CORE, DATASETS, MODEL, NAMES, REPO, SIZES, TAU_HIGH

TAU_STAGES = [s for s in ALL if s not in CORE]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def machine() -> str:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), no GPU; Python {platform.python_version()}, "
            f"torch {torch.__version__}; "
            "each `cmkd run` on 1 thread, niced")


def probe_section(probe: list[Group], chosen: dict[str, int | None], overrides: dict[str, int]) -> list[str]:
    runs_text = probe_runs_text()
    L = ["## The epoch budget (probe)", "",
         f"**Rule.** Under a cosine schedule the curve of one long run rises to its end, so it does not show where "
         f"a shorter run would plateau. The probe therefore trains **AST alone** as separate full runs on a ladder "
         f"of budgets, scores each run as the **mean eval accuracy over its last k epochs** (k = 10 % of the "
         f"budget, at least 3), averages the probe runs, and takes as the budget the **smallest rung whose next "
         f"rung adds less than {stats.GAIN_PP:.0f} pp**. While every step adds more, the ladder grows by "
         f"{runs.PROBE_STEP} epochs at a time, and the grid waits for it. The same budget is used for every cell "
         "of the dataset, KD cells included. The probe runs at the chosen budget are also the grid's AST-alone runs "
         "of their split and seed (the same gin, split, seed and budget): the budget was chosen on the eval "
         "split, as every setting of a small study without a third split is, and on the AST alone, never on "
         "a KD cell.", ""]
    scores = probe_scores(probe)
    for ds in scores:
        lad = ladder(probe, ds)
        keys = sorted({(g.split, g.seed) for g in probe if g.dataset == ds})  # every probe run, finished or not
        L += [f"**{NAMES[ds]}** (probe runs: {runs_text[ds]}):", "",
              "| epochs | k | " + " | ".join(f"{s} seed {d} (%)" for s, d in keys) + " | mean (%) | "
              "gain over the previous rung (pp) | train time per run |",
              "|---" * (len(keys) + 5) + "|"]
        prev = None
        for e in sorted(scores[ds]):
            v = scores[ds][e]
            cells = [pct(v[k]) if k in v else "running / to run" for k in keys]
            mean = statistics.fmean(lad[e]) if lad.get(e) else None
            gain = f"{100 * (mean - prev):+.1f}" if mean is not None and prev is not None else "–"
            secs = [train_seconds(g, "ast") for g in probe if g.dataset == ds and g.epochs == e and g.summary("ast")]
            L.append(f"| {e} | {stats.last_k(e)} | " + " | ".join(cells) +
                     f" | {pct(mean) if mean is not None else '–'} | {gain} | "
                     f"{fmt_time(statistics.fmean(secs)) if secs else '–'} |")
            prev = mean if mean is not None else prev
        b, plateau = stats.choose_budget(lad)
        if ds in overrides:
            rule = f"the rule gives {b}" if plateau else "the rule has not settled yet"
            verdict = f"**{overrides[ds]} epochs, set by hand (--budget)**; {rule}"
        elif b is None:
            verdict = "**not chosen yet** (fewer than two rungs finished by every probe run)"
        elif plateau:
            verdict = f"**{b} epochs** (the next rung adds less than {stats.GAIN_PP:.0f} pp)"
        else:
            pending = next((e for e in sorted(lad) if not lad[e]), "?")
            verdict = (f"**not chosen yet**: the AST alone was still improving by at least {stats.GAIN_PP:.0f} pp "
                       f"per rung up to {b} epochs, so the {pending}-epoch rung runs before the grid")
        L += ["", f"Budget for {NAMES[ds]}: {verdict}.", ""]
    return L


def cell_table(cells: dict[str, Cell], k: int) -> list[str]:
    L = [f"| cell | student | accuracy % (mean ± sd of last-{k} means) | runs | − same model alone (pp, paired) "
         "| SE of that difference (pp) | ≤ 2 pp? | runs for SE 2 pp | − its teacher (pp, paired) "
         "| train time per run |",
         "|---" * 10 + "|"]
    for stage, (label, cls, teacher, _) in CELLS.items():
        c = cells.get(stage)
        if c is None:
            continue
        m, sd = stats.mean_sd(list(c.scores.values()))
        sd_t = f" ± {pct(sd)}" if sd == sd else ""
        if teacher:
            d = vs_baseline(cells, stage)
            dm, se = stats.mean_se(d.diffs)
            dsd = stats.mean_sd(d.diffs)[1]
            vb = f"{100 * dm:+.1f} ({sum(x > 0 for x in d.diffs)}/{d.n} better)" if d.n else "–"
            se_t = pct(se) if se == se else "–"
            ok = (("yes" if se <= stats.TARGET_SE else "no") if d.n >= stats.MIN_RUNS
                  else f"< {stats.MIN_RUNS} runs") if se == se else "–"
            need = str(stats.runs_needed(dsd, stats.TARGET_SE)) if dsd == dsd else "–"
            tv = stats.paired(c.scores, cells[teacher].scores) if teacher in cells else []
            vt = f"{100 * statistics.fmean(tv):+.1f}" if tv else "–"
        else:
            vb, se_t, ok, need, vt = "(baseline)", "–", "–", "–", "–"
        L.append(f"| {label} | {cls} ({c.params / 1e6:.2f} M) | **{pct(m)}**{sd_t} | {len(c.scores)} | {vb} | {se_t} | "
                 f"{ok} | {need} | {vt} | {fmt_time(statistics.fmean(c.seconds))} |")
    return L


def in_short(results: dict[str, dict[str, Cell]], chosen: dict[str, Any]) -> list[str]:
    """Per dataset, what KD at τ = 1 did to each student against the same model alone: where it ended
    (the table's difference, resolved or not) and where its mean gap peaked during training."""
    L = ["**In short** (each KD student at τ = 1 − the same model alone; the peak is that of the mean gap curve "
         "in the figure, within one run's cosine schedule, so not what a shorter budget would give):", ""]
    for ds in [d for d in DATASETS if d in results]:
        parts = []
        for stage in [s for s in CORE if CELLS[s][2] and s in results[ds]]:
            d = vs_baseline(results[ds], stage)
            gaps = plot.gap_curves(results[ds], stage, stats.last_k(chosen[ds]))
            if not d.n or not gaps:
                continue
            epochs, mean, _ = plot.band(gaps)  # the figure's gap panel (percent)
            top = max(range(len(mean)), key=mean.__getitem__)
            m, se = stats.mean_se(d.diffs)
            parts.append(f"{CELLS[stage][0]} {100 * m:+.1f} ± {100 * se:.1f} pp, {d.direction()} "
                         f"(its gap peaked at {mean[top]:+.1f} pp at epoch {epochs[top]} of {len(mean)})")
        if parts:
            L.append(f"- {NAMES[ds]}: " + "; ".join(parts) + ".")
    return L + [""]


def verdict(results: dict[str, dict[str, Cell]], chosen: dict[str, Any], complete: bool) -> list[str]:
    """Finding by finding, the paired differences as measured and whether they are resolved (95 % CI)."""
    L = in_short(results, chosen)
    L += ["Generated from the table above: each line is a paired difference of last-k means (mean ± its "
          "standard error over the paired runs) and whether its 95 % confidence interval (Student's t with "
          "n − 1 degrees of freedom: ±12.7 SE for 2 runs, ±4.3 for 3, ±2.3 for 10) excludes zero." +
          ("" if complete else " With a partial grid these are provisional."), ""]
    names = [ds for ds in DATASETS if ds in results]
    for title, _ in findings({}):
        L.append(f"- **{title}.**")
        lines = [f"  - {NAMES[ds]}: {d.what}: {d.text()} — {d.resolved()}."
                 for ds in names for d in dict(findings(results[ds]))[title] if d.n]
        L += lines or ["  - no paired runs finished yet."]
    L += ["- **KD helps most on small data.** Not tested by this grid: each dataset has one training-set size "
          "(and the two datasets differ in more than size).", ""]
    return L


def write(args: Any, gins: dict[str, Path], probe: list[Group], grid: list[Group], md: Path) -> str:
    chosen = budgets(probe, args.budget)
    results = collect(grid)
    png = md.with_suffix(".png")
    plot.draw(probe, results, png, {ds: chosen.get(ds) for ds in gins})
    p_done, p_all = count(probe)
    g_done, g_all = count(grid) if grid else (0, 0)
    secs = sum(train_seconds(g, s) for g in probe for s in g.stages) + sum(
        s for r in results.values() for c in r.values() for s in c.seconds)
    complete = g_all and g_done == g_all
    e, f, m = SIZES["esc10"], SIZES["fsdd"], MODEL
    L = ["# CMKD on real audio: a small-scale study, trained to a measured budget", "",
         "Written by `benchmarks/cmkd_study.py` (code in `benchmarks/study/`) from the runs' per-epoch metrics; "
         "every figure here is computed by that script from finished runs. Method: Gong et al. 2022 (CMKD) as "
         "implemented by cmkd (`docs/distillation.md`).", ""]
    if not complete:
        L += [f"> {remaining(probe, grid, args.jobs, args.tau_seeds)}", ">"]
        L += [f"> **Partial results.** Budget probe: {p_done} of {p_all} runs finished. Grid: {g_done} of the {g_all} "
              "stage runs planned so far finished" +
              (" (the plan grows by a seed while a difference is imprecise, then by the τ pass)" if grid else
               " (the grid starts once the probe has chosen the budgets)") +
              ". The study resumes with the command below; every number here will change as runs finish.", ""]
    L += [f"- **Command:** `{args.command}` (probe: `--probe`; tables only: `--report-only`)",
          f"- **Machine:** {machine()}; {args.jobs} `cmkd run` processes at a time, sharing the 2 cores with other "
          f"work (load average when written: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}).",
          f"- **Wall time:** {wall_text(args.work)}; {fmt_time(secs)} of training summed over the finished "
          "stage runs (each epoch's wall time, so it includes the time the study was paused, SIGSTOP, while "
          "benchmarks were timed on a quiet machine).",
          "- **No pretrained weights** (nothing can be downloaded here): every model starts from random weights; "
          "the paper starts both from ImageNet.", ""]
    L += probe_section(probe, chosen, args.budget)
    L += ["## Setup", "",
          f"- **ESC-10** (400 clips, 10 classes): 5-fold cross-validation on the given folds (train on four, 320 "
          f"clips). Clips cut to {e['clip_seconds']} s (random window in training, the first {e['clip_seconds']} s "
          f"in evaluation; {e['frames']} frames).",
          "- **FSDD** (spoken digits, 6 speakers): speaker-disjoint 3-fold cross-validation, one pair of speakers "
          "held out in turn (nicolas + theo, george + jackson, lucas + yweweler); takes 0–24 of each speaker and "
          "digit (1000 training, 500 evaluation clips); 1 s at 16 kHz (100 frames); normalisation from the "
          "training speakers.",
          f"- **Front end:** Kaldi fbank (25 ms / 10 ms), {e['n_mels']} mel bins; SpecAugment (ESC-10 "
          f"{e['freqm']}/{e['timem']}, FSDD {f['freqm']}/{f['timem']}); no mixup.",
          f"- **Models:** CNN `{m['cnn']}` (Adam lr {m['cnn_lr']}); AST patches 16×16 stride 10, embed "
          f"{m['ast_dim']}, depth {m['ast_depth']}, {m['ast_heads']} heads (Adam lr {m['ast_lr']}). Batch 32, cosine "
          f"schedule, {m['warmup_epochs']} warm-up epochs, the dataset's budget for every stage.",
          f"- **KD:** `strategies.logit_kd` (λ = {m['lam']}, τ on the teacher's logits only), "
          f"τ = 1 and τ = {TAU_HIGH}; "
          "the teacher is its stage's last checkpoint of the same run (same split and seed).",
          f"- **Seeds, by rule:** each dataset's grid starts on seed {args.seeds[0]} over all its splits and takes "
          f"the next seed (of {args.seeds}) while the paired difference of a KD cell from the same model alone has "
          f"a standard error above {100 * stats.TARGET_SE:.0f} pp or fewer than {stats.MIN_RUNS} runs. Once its "
          f"seeds settle, the τ = {TAU_HIGH} pass adds the τ stages to the runs of "
          + ("all its seeds." if args.tau_seeds is None else f"its first {args.tau_seeds} seed(s)"
             + (" (not run: --no-tau)." if not args.tau_seeds else ".")),
          "- **Score of a run:** the mean eval accuracy over its last k epochs (k = 10 % of the budget); no epoch "
          "is picked on the eval split. Paired differences compare runs of the same split and seed; their "
          "standard error treats the (split, seed) runs as independent.", ""]
    for ds in DATASETS:
        if ds not in results:
            continue
        k = stats.last_k(chosen[ds])
        seeds = sorted({key[1] for c in results[ds].values() for key in c.scores})
        splits = sorted({key[0] for c in results[ds].values() for key in c.scores})
        L += [f"## {NAMES[ds]}: {chosen[ds]} epochs, {len(splits)} split(s) × seeds {seeds}", "",
              seed_state([g for g in grid if g.dataset == ds], results[ds]), ""]
        L += cell_table(results[ds], k) + [""]
    L += [f"![CMKD study]({png.name})", "",
          "The figure: per dataset, the budget probe's AST curves (left); the eval curves of each student "
          "against the same model alone (mean ± standard error over the finished runs); and (right) the gap "
          "itself, run by run: KD student − the same model alone on the same split and seed, as the moving mean "
          "of the last k epochs, mean ± SE over the paired runs. Its last point is the table's paired "
          "difference; the curve shows when the gap opens or closes.", "",
          "## Do the paper's findings hold at this scale?", ""]
    L += verdict(results, chosen, bool(complete)) if results else ["No grid run has finished yet.", ""]
    L += ["## Reproduce", "", "```", "python benchmarks/cmkd_study.py --probe", "python benchmarks/cmkd_study.py",
          "```", "", "Commands the script runs (one per dataset, split, seed and pass), for example:", "", "```"]
    shown = set()
    for g in probe + grid:
        if (g.dataset, len(g.stages)) not in shown:
            shown.add((g.dataset, len(g.stages)))
            L.append(shlex.join(g.command()))
    L += ["```", ""]
    for ds, path in gins.items():
        L += [f"`{ds}.gin`:", "", "```", path.read_text().rstrip(), "```", ""]
    text = "\n".join(L)
    md.write_text(text)
    if args.docs:
        update_docs(REPO / "docs" / "distillation.md", results, chosen, md, bool(complete))
    return text


def seed_state(grid: list[Group], cells: dict[str, Cell]) -> str:
    """Where the seed rule stands for one dataset's grid."""
    core = [g for g in grid if g.stages == CORE]
    used = sorted({g.seed for g in core})
    loose = ", ".join(CELLS[s][0] for s in imprecise(cells))
    if any(g.summary(s) is None for g in core for s in CORE):
        return (f"**Seeds {used}:** seed {used[-1]} is still running; once it has finished, the rule decides whether "
                "another seed is needed.")
    if not loose:
        return (f"**Seeds {used}, settled:** every KD cell's paired standard error is at most "
                f"{100 * stats.TARGET_SE:.0f} pp, over at least {stats.MIN_RUNS} runs.")
    return f"**Seeds {used}, all the seeds given:** {loose} still above {100 * stats.TARGET_SE:.0f} pp."


def wall_text(work: Path) -> str:
    spans = ledger.intervals(work)
    old = ledger.legacy(work)
    parts = []
    if spans:
        parts.append(f"{fmt_time(ledger.union_seconds(spans))} with at least one invocation running "
                     f"({len(spans)} invocation(s) since intervals are kept, between "
                     f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(min(s for s, _ in spans)))} and "
                     f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(max(e for _, e in spans)))} UTC)")
    if old and old.get("invocations"):  # wall_time.json, the ledger before intervals: ended invocations only
        span = old.get("last_end", old["first_start"]) - old["first_start"]
        parts.append(f"plus {fmt_time(old['running'])} recorded by {old['invocations']} invocation(s) in the "
                     f"older ledger ({fmt_time(span)} from the first start to its "
                     "last end; it missed invocations killed at a session's end and may overlap the above)")
    return "; ".join(parts) or "no invocation has run yet"


def remaining(probe: list[Group], grid: list[Group], jobs: int, tau_seeds: int | None) -> str:
    """The work left, in epochs and CPU time: each stage at the seconds per epoch measured for that
    dataset and stage (a KD stage costs more than its student alone; a τ stage as its τ = 1 stage),
    or for the dataset until then. Plus what the grid may still add: another seed, the τ pass."""
    per_epoch: dict[tuple, list[float]] = {}
    left: dict[tuple, int] = {}
    seen = set()
    for g in probe + grid:
        for s in g.stages:
            if (g.run_dir, s) in seen:
                continue
            seen.add((g.run_dir, s))
            if g.summary(s) is not None:
                secs = [r["epoch_seconds"] for r in g.history(s)]
                per_epoch.setdefault((g.dataset, s), []).extend(secs)
                per_epoch.setdefault((g.dataset,), []).extend(secs)
            else:
                left[(g.dataset, s)] = left.get((g.dataset, s), 0) + g.epochs
    if not left:
        return "No stage run left to train."

    def cost(ds: str, stage: str, epochs: int) -> float:
        # the median: an epoch during which the study was paused (SIGSTOP, for a quiet benchmark) counts long
        return epochs * statistics.median(per_epoch.get((ds, stage)) or per_epoch.get((ds, stage.removesuffix("_tau")))
                                          or per_epoch[(ds,)])

    parts, cpu = [], 0.0
    for ds in dict.fromkeys(d for d, _ in left):
        epochs = sum(n for (d, _), n in left.items() if d == ds)
        costs = [cost(d, s, n) for (d, s), n in left.items() if d == ds and per_epoch.get((d,))]
        cpu += sum(costs)
        each = f" ≈ {fmt_time(sum(costs))} at the median seconds per epoch measured so far" if costs else ""
        parts.append(f"{NAMES[ds]} {epochs} stage-epochs{each}")
    waiting = sorted({NAMES[g.dataset] for g in probe} - {NAMES[g.dataset] for g in grid})
    grid_note = (f" ({' and '.join(waiting)}: the probe only; a grid's size is known once its budget is)"
                 if waiting else "")
    more = []
    for ds in dict.fromkeys(g.dataset for g in grid):
        core = [g for g in grid if g.dataset == ds and g.stages == CORE]
        if per_epoch.get((ds,)) and any(g.summary(s) is None for g in core for s in CORE):  # seeds not settled
            seed = len({g.split for g in core}) * sum(cost(ds, s, core[0].epochs) for s in CORE)
            n_tau = len({g.seed for g in core}) if tau_seeds is None else tau_seeds  # None: all (at least these)
            tau = len({g.split for g in core}) * n_tau * sum(cost(ds, s, core[0].epochs) for s in TAU_STAGES)
            more.append(f"{NAMES[ds]}: ≈ {fmt_time(seed)} for each seed the rule adds" +
                        (f", ≈ {fmt_time(tau)} for the τ pass once its seeds settle" if n_tau else ""))
    return (f"**Left to train:** {'; '.join(parts)}{grid_note} ≈ {fmt_time(cpu)} of process time, about "
            f"{fmt_time(cpu / max(1, jobs))} wall with {jobs} at a time (at this load)." +
            (f" Not planned yet: {'; '.join(more)}." if more else ""))


def update_docs(docs: Path, results: dict[str, dict[str, Cell]], chosen: dict[str, Any], md: Path,
                complete: bool) -> None:
    """Replace the body of docs/distillation.md's "Results on real audio" section (only that section)."""
    heading = "## Results on real audio"
    text = docs.read_text()
    if heading not in text:
        print(f"warning: {docs} has no '{heading}' section; not updated")
        return
    start = text.index(heading) + len(heading)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    rel = os.path.relpath(md, docs.parent)
    lines = ["", "", "Small models trained **from scratch** on real audio with the paper's loss (`logit_kd`, λ = 0.5), "
             "each dataset for an epoch budget measured on the AST's own curves; a run is scored by its mean eval "
             "accuracy over the last 10 % of epochs. Paired differences against the same model trained alone, "
             f"with their standard errors, the curves and the commands: [{md.name}]({rel}).", ""]
    lines += [("**The grid is not finished;** the numbers below are from the runs finished so far. " if not complete
               else "") + "(The earlier study, 20 epochs on ESC-10 and 12 on FSDD, stopped while the AST was still "
              "underfitting; its tables are in the git history of results.md.)", ""]
    lines += ["| data | epochs | cell | runs | accuracy % | − same model alone (pp ± SE) |",
              "|---|---|---|---|---|---|"]
    for ds, cells in results.items():
        for stage, c in cells.items():
            m = statistics.fmean(c.scores.values())
            d = vs_baseline(cells, stage).text() if CELLS[stage][2] else "(baseline)"
            lines.append(f"| {NAMES[ds]} | {chosen[ds]} | {CELLS[stage][0]} | {len(c.scores)} | {pct(m)} | {d} |")
    if not results:
        lines.append("| – | – | no grid run finished yet | – | – | – |")
    lines += [""] + (in_short(results, chosen) if results else [])
    docs.write_text(text[:start] + "\n".join(lines) + ("\n" + text[end:] if end < len(text) else ""))
