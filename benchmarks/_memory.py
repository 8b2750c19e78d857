"""Memory of a process tree (main process + DataLoader workers) per training step, from /proc (no
psutil), and the streaming benchmark's memory verdict: flat with dataset size, growth with time."""

from __future__ import annotations

import os
import threading
from typing import Any

from _common import markdown_table


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(entry))
    return kids


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _kb(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    """PSS of the process's anonymous and shared memory (Pss_Anon + Pss_Shmem): what it and its relatives own.
    File pages (torch's libraries) are left out: their PSS splits them with every other process on the
    machine that maps them, so it moves with what else runs. Kernels without the split: the total Pss."""
    path, total = f"/proc/{pid}/smaps_rollup", 0
    try:
        with open(path) as f:
            next(f, None)  # the '[rollup]' address line
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return 0
    if "Pss_Anon" not in fields:
        return _kb(path, "Pss")
    for name in ("Pss_Anon", "Pss_Shmem"):
        total += int(fields.get(name, "0 kB").split()[0])
    return total


MEMORY_FIELDS = ("main_rss", "main_heap", "workers_rss", "pss")  # KiB: main_heap = main's RssAnon; pss: see _pss_kb


def tree_memory(pid: int | None = None) -> dict[str, int]:
    """Memory of a process and its descendants (DataLoader workers), in KiB: the main process's RSS
    and anonymous RSS (its heap), the workers' RSS summed (pages shared with the main process after
    fork count in each), and the anonymous + shared-memory PSS of all of them (:func:`_pss_kb`)."""
    pids = _tree(os.getpid() if pid is None else pid)
    rss = [_kb(f"/proc/{p}/status", "VmRSS") for p in pids]
    return dict(main_rss=rss[0], main_heap=_kb(f"/proc/{pids[0]}/status", "RssAnon"), workers_rss=sum(rss[1:]),
                pss=sum(_pss_kb(p) for p in pids), procs=len(pids))


class MemoryTrace:
    """This process tree's memory, filed by training step.

    A background thread samples :func:`tree_memory` every ``interval`` seconds and ``step(i)``, called
    when batch ``i`` is done, samples once more; a sample belongs to the step that was running when it
    began. ``per_step()`` is each step's peak, so a short spike inside a step is not lost between steps.
    """

    def __init__(self, interval: float = 0.1):
        self.interval, self.current = interval, 0
        self.samples: list[tuple[int, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _take(self) -> None:
        step = self.current
        self.samples.append((step, tree_memory()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.interval)

    def step(self, i: int) -> None:
        self.current = i
        self._take()
        self.current = i + 1

    def per_step(self, steps: int | None = None) -> list[dict[str, int]]:
        """The peak of every field in each step 0 .. steps-1 (default: up to the last step() call)."""
        n = self.current if steps is None else steps
        peaks: list[dict[str, int]] = [{} for _ in range(n)]
        for step, sample in self.samples:
            if step < n:
                for k in MEMORY_FIELDS:
                    peaks[step][k] = max(peaks[step].get(k, 0), sample[k])
        return peaks

    def __enter__(self) -> "MemoryTrace":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def peak(per_step: list[dict[str, int]], steps: int | None = None) -> dict[str, int]:
    """The peak of each field over the first ``steps`` steps (default: all)."""
    rows = per_step[:steps] if steps is not None else per_step
    return {k: max(r[k] for r in rows) for k in MEMORY_FIELDS}


SIZE_TOLERANCE = 1.10  # 10x/1x peak ratios up to this count as flat (fresh-process RSS differs by a few % run to run)
PLATEAU_TOLERANCE = 1.02  # 'levelled off': no later checkpoint more than 2% above


def checkpoints(k: int, n: int) -> list[int]:
    """Steps K, 2K, ... and the last step n (1-based counts of steps done)."""
    return sorted({*range(k, n + 1, k), n}) if k > 0 else [n]


def plateau(values: list[float], min_flat: int) -> int | None:
    """The first step (1-based) after which ``values`` (one per step) stay within PLATEAU_TOLERANCE of its
    value for at least ``min_flat`` more steps to the end; None if there is none (still growing, or too
    short a run to tell)."""
    for j, v in enumerate(values):
        if len(values) - 1 - j < min_flat:
            return None
        if max(values[j:]) <= PLATEAU_TOLERANCE * v:
            return j + 1
    return None


def memory_report(mem: dict[str, dict[str, Any]], x1: str, xn: str, workers: int) -> dict[str, str]:
    """The memory tables and the verdict, every figure from ``mem`` (runs from :func:`memory_epoch`).
    ``mem[x1]`` is the 1x epoch, ``mem[xn]`` the larger one; other keys starting with ``xn`` are its variants.
    With ``"<x1>, fbank off"`` and ``"<xn>, fbank off"`` both there, the size check is also made on the data
    pipeline alone (no featurizer in the main process)."""
    mib = 1 / 1024
    k, n = mem[x1]["steps"], mem[xn]["steps"]
    first = {name: peak(r["per_step"], k) for name, r in mem.items()}
    whole = {name: peak(r["per_step"]) for name, r in mem.items()}
    def ratios(small: str, big: str) -> dict[str, float]:
        return {f: first[big][f] / first[small][f] for f in ("main_rss", "workers_rss", "pss")}

    ratio = ratios(x1, xn)
    flat_size = max(ratio.values()) <= SIZE_TOLERANCE
    off1, offn = f"{x1}, fbank off", f"{xn}, fbank off"
    ratio_off = ratios(off1, offn) if off1 in mem and offn in mem else None
    flat_off = ratio_off is not None and max(ratio_off.values()) <= SIZE_TOLERANCE
    steps = checkpoints(k, n)
    at = {name: {f: [r["per_step"][c - 1][f] * mib for c in steps] for f in MEMORY_FIELDS}
          for name, r in mem.items() if name.startswith(xn)}
    growth = {name: (whole[name]["main_rss"] - first[name]["main_rss"]) * mib for name in at}
    g = growth[xn]
    grows = g > max(32.0, 0.05 * first[xn]["main_rss"] * mib)
    main_steps = [r["main_rss"] * mib for r in mem[xn]["per_step"]]
    levels = plateau(main_steps, min_flat=k)  # levelled off for at least as long as the whole 1x epoch

    size_rows = [[name, r["steps"], *(first[name][f] * mib for f in ("main_rss", "workers_rss", "pss")),
                  *(whole[name][f] * mib for f in MEMORY_FIELDS), r["clips"] / r["seconds"]] for name, r in mem.items()]
    size_table = markdown_table(
        ["run", "steps", f"main RSS, first {k} steps", f"workers RSS, first {k}", f"PSS, first {k}",
         "main RSS, epoch", "main heap, epoch", "workers RSS, epoch", "PSS, epoch", "clips/s"],
        size_rows)
    labels = {"main_rss": "main RSS", "main_heap": "main heap (RssAnon)", "workers_rss": "workers RSS",
              "pss": "PSS"}
    time_rows = [[f"{xn}: {labels[f]}", *(round(v) for v in at[xn][f])] for f in MEMORY_FIELDS]
    time_rows += [[f"{name}: main RSS", *(round(v) for v in at[name]["main_rss"])] for name in at if name != xn]
    time_table = markdown_table(["MiB after step"] + [str(c) for c in steps], time_rows)

    size_words = (f"over the first {k} steps (the 1x epoch's length) the {xn} dataset's peaks are "
                  f"{ratio['main_rss']:.2f}x (main RSS, {first[xn]['main_rss'] * mib:.0f} vs "
                  f"{first[x1]['main_rss'] * mib:.0f} MiB), {ratio['workers_rss']:.2f}x (workers RSS, "
                  f"{first[xn]['workers_rss'] * mib:.0f} vs {first[x1]['workers_rss'] * mib:.0f} MiB) and "
                  f"{ratio['pss']:.2f}x (PSS, {first[xn]['pss'] * mib:.0f} vs {first[x1]['pss'] * mib:.0f} MiB) "
                  f"of the 1x dataset's (flat: every ratio <= {SIZE_TOLERANCE:.2f})")
    if ratio_off is not None:
        size_words += (f"; with the fbank off (the data pipeline alone) {ratio_off['main_rss']:.2f}x, "
                       f"{ratio_off['workers_rss']:.2f}x and {ratio_off['pss']:.2f}x")
    epoch_words = (f"Over its whole {n}-step epoch the {xn} run peaks at {whole[xn]['main_rss'] * mib:.0f} MiB main "
                   "RSS "
                   f"and {whole[xn]['pss'] * mib:.0f} MiB PSS, {whole[xn]['main_rss'] / whole[x1]['main_rss']:.2f}x "
                   f"and {whole[xn]['pss'] / whole[x1]['pss']:.2f}x the {k}-step 1x epoch's")
    main_traj = at[xn]["main_rss"]
    if not grows:
        time_words = f"the main process does not grow with steps either ({g:.0f} MiB after step {k})"
    elif levels is not None:
        time_words = (f"that is growth with steps, not with size: the main RSS rises from {main_traj[0]:.0f} MiB after "
                      f"step {k} to {main_steps[levels - 1]:.0f} MiB after step {levels} and then stays within "
                      f"{(PLATEAU_TOLERANCE - 1) * 100:.0f}% of that for the remaining {n - levels} steps")
    else:
        time_words = (f"the main RSS grows with steps ({main_traj[0]:.0f} MiB after step {k}, "
                      f"{main_traj[-1]:.0f} after "
                      f"step {n}) and had not levelled off by the end of the run, so growth with time is not shown "
                      f"to be bounded")
    if not flat_size and flat_off:
        verdict = (f"**not met as measured**: {size_words}. The pipeline alone is flat, so the excess is the main "
                   f"process's growth with steps, which starts within the first {k} steps. "
                   f"{epoch_words}; {time_words}.")
    elif not flat_size or (ratio_off is not None and not flat_off):
        verdict = f"**not met**: {size_words}. {epoch_words}; {time_words}."
    elif not grows or levels is not None:
        verdict = f"**met**: {size_words}. {epoch_words}; {time_words}."
    else:
        verdict = f"**met for dataset size, not shown for time**: {size_words}. {epoch_words}; {time_words}."

    cause = [f"Growth of the main process after step {k} of the {xn} epoch (peak main RSS over the epoch minus over "
             f"the first {k} steps): as cmkd is {g:.0f} MiB"]
    cause += [f"{name[len(xn) + 2:]} {growth[name]:.0f} MiB" for name in at if name != xn]
    cause_text = "; ".join(cause) + "."
    if grows:
        off = next((growth[name] for name in at if name.endswith("fbank off")), None)
        trim = next((growth[name] for name in at if "malloc_trim" in name), None)
        arena = next((growth[name] for name in at if "MALLOC_ARENA_MAX" in name), None)
        if off is not None and off <= 0.25 * g:
            cause_text += (" Without the fbank the main process stays flat, so the growth comes from the CPU "
                           "featurizer's batch-sized temporaries, not from reading the stream.")
        if trim is not None and trim <= 0.25 * g:
            cause_text += (" `malloc_trim(0)` after each step gives it back to the system, so it is memory already "
                           "freed that glibc keeps in its heap instead of returning it, not objects anything still "
                           "holds: no leak.")
        if arena is not None:
            cause_text += (" Fewer malloc arenas do not help." if arena > 0.5 * g else " Fewer malloc arenas help too.")
        mmap = next((growth[name] for name in at if "MALLOC_MMAP_THRESHOLD_" in name), None)
        if mmap is not None and mmap <= 0.25 * g:
            cause_text += (" A fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_=1048576`: blocks of 1 MiB and more are "
                           "mapped and unmapped on free instead of coming from the heap) keeps it flat too, a setting "
                           "for CPU-only training hosts.")
        cause_text += (" None of this depends on the dataset's size (the first table compares equal step counts); on a "
                       "GPU host the fbank's temporaries are device memory.")
    sb = mem[xn]["state_bytes"]
    cause_text += (f" The stream cursor's state that every batch carries (RNG states, one shard position, the ids of "
                   f"the records in the shuffle buffer) was {sb[0]} bytes at the first step of the {xn} epoch and "
                   f"{sb[1]} at its last: it does not grow with the samples read. What the workers hold is bounded by "
                   f"the shuffle buffer (256 undecoded records each) and the prefetch queue.")

    text = "\n".join([
        f"Memory of the main process + {workers} DataLoader worker(s), each run one streaming epoch in a fresh "
        "process, sampled "
        f"every 0.1 s and at every step and filed by step. RSS sums count pages shared after fork once per process; "
        f"PSS is the anonymous + shared-memory PSS of all of them (shared pages split between them; library pages, "
        "whose PSS depends on what else runs on the machine, left out). "
        f"Columns 'first {k} steps' compare the same amount of work on the 1x and the {xn} "
        f"dataset; 'epoch' columns are whole-epoch peaks ({k} vs {n} steps):",
        "",
        size_table,
        "",
        f"The {xn} runs step by step (peak within each step, MiB):",
        "",
        time_table,
        "",
        cause_text,
    ])
    return {"verdict": verdict, "text": text}
