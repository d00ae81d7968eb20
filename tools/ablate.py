"""The paper's tables, regenerated from run directories: main, kd (α × T), schedule, qconfig, bits.

    python tools/ablate.py table=main                        # runs what is missing, writes results/main/
    python tools/ablate.py table=kd seeds=[0]                # the α × T grid: table + heat map
    python tools/ablate.py table=bits jobs=2                 # two runs at a time (one torch thread each: threads=1)
    python tools/ablate.py table=main collect_only=true      # tables from existing runs only
    python tools/ablate.py table=main profile=full 'overrides=["dataset.root=/data/modelnet40_ply_hdf5_2048"]'
    python tools/ablate.py table=main collect_only=true 'wandb_dirs=[/sync/wandb]'   # from W&B offline runs
    python tools/ablate.py table=kd launcher=submitit_slurm   # one hydra multirun per row, seeds in parallel

Each (row, seed) is one call of an existing tool (`train_kd_qat.py`, `quantize.py`, and
`search_qconfig.py` before a searched row) in its own process and run directory,
`results/<table>/runs/<profile>/<row>/seed<S>/`, with `'+experiment=[<profile>,<row preset>]'`:
a failing run cannot take the others down, and a finished run is not repeated (same settings).
With `launcher=<hydra launcher>` each row is instead one hydra multirun over its seeds (same dirs).
Then every cell is read back from the runs' metrics.json / log.jsonl (runtime/tables.py) and
written as `results/<table>/<profile>.md`, `.csv` and PNG figures.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from runtime import tables
from runtime.config import ConfigError
from runtime.exits import hydra_entry, main_guard
from runtime.pipeline import write_json
from runtime.rundir import refuse_if_in_use, remove_if_empty
from runtime.wandb_offline import find_offline_runs, read_offline_run


class AblateError(ConfigError):
    """A table, row or option that cannot work; printed as one line, exit 2 (runtime/exits.py)."""


@dataclass(frozen=True)
class Run:
    """One configuration of a table, run once per seed."""

    name: str                       # run directory name (results/<table>/runs/<profile>/<name>/seed<S>)
    experiment: str                 # configs/experiment/<experiment>.yaml (after the profile preset)
    tool: str = "train_kd_qat.py"
    extra: tuple[str, ...] = ()     # overrides beyond the preset (the kd grid's α and T)
    search: bool = False            # takes qat.qconfig from this seed's qconfig search


@dataclass(frozen=True)
class Row:
    label: str
    run: Run
    params: tuple[Any, ...] = ()    # grid coordinates (kd table)
    compare: str | None = None      # name of the row this one is compared with (paired Δ OA, same seeds)


SEARCH = "search"  # run name of the qconfig search that searched rows depend on


# ---- the tables ------------------------------------------------------------------------------------
def table_rows(cfg: DictConfig) -> list[Row]:
    """The rows of `cfg.table` from `cfg.tables`, restricted to `cfg.rows` when given."""
    if cfg.table not in cfg.tables:
        raise AblateError(f"table={cfg.table}: use one of {', '.join(cfg.tables)}")
    spec = cfg.tables[cfg.table]
    shared = table_overrides(cfg)
    if "grid" in spec:
        (row_key, row_values), (col_key, col_values) = spec.grid.items()
        rows = []
        # no KD term at α = 0: T changes nothing, so one run (the first T) serves the whole row, and
        # every KD cell is compared with it (the paired Δ answers "does distillation help here?")
        zero = next((a for a in row_values if row_key == "distill.alpha" and float(a) == 0.0), None)
        no_kd = None if zero is None else f"alpha{zero}_T{col_values[0]}"
        for a in row_values:
            for t in col_values:
                run_t = col_values[0] if no_kd and float(a) == 0.0 else t
                rows.append(Row(f"α={a}, T={t}", Run(f"alpha{a}_T{run_t}", spec.experiment,
                                                     extra=(f"{row_key}={a}", f"{col_key}={run_t}", *shared)), (a, t),
                                compare=no_kd if float(a) != 0.0 else None))
    else:
        rows = [Row(r.label, Run(r.name, r.experiment, r.get("tool", "train_kd_qat.py"),
                                 (*(r.get("overrides") or ()), *shared), search=bool(r.get("search"))),
                    compare=r.get("compare"))
                for r in spec.rows]
        names = {r.run.name for r in rows}
        for row in rows:
            if row.compare is not None and row.compare not in names:
                raise AblateError(f"tables.{cfg.table}: row {row.run.name} compares with {row.compare!r}, "
                                  f"which is not a row; use one of {sorted(names)}")
    if cfg.rows is not None:
        unknown = set(cfg.rows) - {r.run.name for r in rows}
        if unknown:
            raise AblateError(f"rows={list(cfg.rows)}: no row {sorted(unknown)} in table {cfg.table}; "
                              f"rows are {[r.run.name for r in rows]}")
        rows = [r for r in rows if r.run.name in cfg.rows]
    return rows


def table_overrides(cfg: DictConfig) -> tuple[str, ...]:
    """The table's own settings for every run of it (its search included), e.g. the bit width it is run at."""
    return tuple(cfg.tables[cfg.table].get("overrides") or ())


def runs_in_order(rows: list[Row], profile: str, search: str = "search", shared: tuple[str, ...] = ()) -> list[Run]:
    """Distinct runs, a qconfig search (preset `<search>_<profile>`) before the first row that needs it."""
    runs: list[Run] = []
    for row in rows:
        if row.run.search and all(r.name != SEARCH for r in runs):
            runs.append(Run(SEARCH, f"{search}_{profile}", "search_qconfig.py", shared))
        if row.run not in runs:
            runs.append(row.run)
    return runs


def search_preset(cfg: DictConfig) -> str:
    """The table's search preset family: `search` (main, qconfig) or its own, e.g. `search_bits` (bits)."""
    return cfg.tables[cfg.table].get("search_experiment", "search")


def run_dir(cfg: DictConfig, run: Run, seed: int) -> Path:
    return Path(cfg.results_dir).resolve() / cfg.table / "runs" / cfg.profile / run.name / f"seed{seed}"


def run_overrides(cfg: DictConfig, run: Run, seed: int) -> list[str]:
    """Everything that determines a run's result (its status file records them; a change reruns it)."""
    overrides = [f"+experiment=[{cfg.profile},{run.experiment}]", f"seed={seed}", *run.extra]
    if run.search:
        overrides.append(f"qat.qconfig={run_dir(cfg, Run(SEARCH, ''), seed) / 'qconfig.yaml'}")
    return overrides + list(cfg.overrides)


def run_identity(cfg: DictConfig, run: Run, seed: int) -> list[str]:
    """`run_overrides` with the results folder as `<results>`: what a status file records and is compared
    with, so that moving results/ (or the repository) does not make finished runs look stale."""
    root = str(Path(cfg.results_dir).resolve())
    return [o.replace(root, "<results>") for o in run_overrides(cfg, run, seed)]


def logging_overrides(cfg: DictConfig, run: Run) -> list[str]:
    """Where a run logs (not part of its identity: switching W&B on does not rerun anything)."""
    if not cfg.wandb:
        return []
    return ["logger=wandb", f"logger.tags=[ablate.{cfg.table}.{cfg.profile}.{run.name}]"]


# ---- running ---------------------------------------------------------------------------------------
def finished(cfg: DictConfig, run: Run, seed: int) -> bool:
    """A usable result exists: launched here with these settings, or made by hand (no status file,
    e.g. by the equivalent hydra multirun), and finished (a search: qconfig.yaml; a row: metrics.json)."""
    path = run_dir(cfg, run, seed)
    status = tables.read_json(path / tables.STATUS_FILE)
    expected = run_identity(cfg, run, seed) if status is not None else None
    if run.name == SEARCH:
        return (path / "qconfig.yaml").is_file() and (status is None or (
            status.get("returncode") == 0 and status.get("overrides") == expected))
    return tables.read_run_dir(path, seed, expected).status == "ok"


def launch(cfg: DictConfig, run: Run, seed: int) -> tuple[int | None, str]:
    """Runs one tool in a fresh process and run directory, with `cfg.threads` torch threads (its
    OMP_NUM_THREADS: the figures depend on it); records the outcome in ablate_status.json."""
    path = run_dir(cfg, run, seed)
    refuse_if_in_use(path)  # a live run there (started by hand or another ablate.py): its PID, nothing removed
    if path.exists():
        shutil.rmtree(path)  # a failed or stale run of ours: start clean (log.jsonl appends)
    path.mkdir(parents=True)
    overrides = run_overrides(cfg, run, seed)
    status: dict[str, Any] = {"overrides": run_identity(cfg, run, seed), "tool": run.tool, "returncode": None,
                              "reason": ""}
    search_dir = run_dir(cfg, Run(SEARCH, ""), seed)
    if run.search and not (search_dir / "qconfig.yaml").is_file():
        status["reason"] = f"the qconfig search it needs did not finish (see {search_dir})"
        write_json(path / tables.STATUS_FILE, status)
        return None, status["reason"]
    python = cfg.python or sys.executable
    command = [python, str(ROOT / "tools" / run.tool), *overrides, *logging_overrides(cfg, run),
               f"hydra.run.dir={path}"]
    started, start = time.time(), time.monotonic()
    with open(path / "ablate_output.log", "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=run_env(cfg))
    status.update(returncode=proc.returncode, seconds=round(time.monotonic() - start, 1), command=command,
                  started=round(started, 1), ended=round(time.time(), 1), parallel_runs=cfg.jobs, threads=cfg.threads,
                  reason="" if proc.returncode == 0 else failure_reason((path / "ablate_output.log").read_text(),
                                                                         proc.returncode))
    write_json(path / tables.STATUS_FILE, status)
    return proc.returncode, status["reason"]


def run_env(cfg: DictConfig) -> dict[str, str]:
    """The environment of every launched run: `cfg.threads` torch threads (OMP_NUM_THREADS), since the
    figures depend on the thread count, whatever the machine's cores."""
    return dict(os.environ, OMP_NUM_THREADS=str(cfg.threads))


def failure_reason(output: str, returncode: int) -> str:
    """One line saying why a run failed: the tool's `error: ...` line, else the exception's."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error:"):
            return lines[i][:300]
        if re.match(r"^[\w.]*(Error|Exception|Interrupt):", lines[i]):
            message = lines[i] if not lines[i].endswith(":") or i + 1 == len(lines) else f"{lines[i]} {lines[i + 1]}"
            return message[:300]
    return f"exit code {returncode}"


def launch_multirun(cfg: DictConfig, run: Run, seeds: list[int]) -> tuple[int, str]:
    """One hydra multirun of `run` over `seeds` with `hydra/launcher=<cfg.launcher>` (e.g. submitit_slurm:
    the seeds run in parallel on a cluster), into the same run directories as `launch` uses."""
    ready = [s for s in seeds if not run.search or (run_dir(cfg, Run(SEARCH, ""), s) / "qconfig.yaml").is_file()]
    for seed in seeds:
        path = run_dir(cfg, run, seed)
        refuse_if_in_use(path)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        if seed not in ready:
            write_json(path / tables.STATUS_FILE, {"overrides": run_identity(cfg, run, seed), "returncode": None,
                                              "reason": "the qconfig search it needs did not finish"})
    if not ready:
        return 1, "no seed has its qconfig search"
    # the per-seed overrides with the seed as hydra's sweep axis (the searched spec path interpolates it)
    shared = [o.replace(f"seed{ready[0]}/", "seed${seed}/") for o in run_overrides(cfg, run, ready[0])
              if o != f"seed={ready[0]}"]
    base = run_dir(cfg, run, ready[0]).parent
    command = [cfg.python or sys.executable, str(ROOT / "tools" / run.tool), "-m", *shared,
               f"seed={','.join(map(str, ready))}", *logging_overrides(cfg, run), f"hydra/launcher={cfg.launcher}",
               f"hydra.sweep.dir={base}", "hydra.sweep.subdir=seed${seed}"]
    start = time.monotonic()
    with open(base / "ablate_multirun_output.log", "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=run_env(cfg))
    reason = failure_reason((base / "ablate_multirun_output.log").read_text(), proc.returncode)
    for seed in ready:  # a seed without metrics.json failed (or never started: the basic launcher stops at a failure)
        path = run_dir(cfg, run, seed)
        done = (path / "metrics.json").is_file() or (run.name == SEARCH and (path / "qconfig.yaml").is_file())
        write_json(path / tables.STATUS_FILE, {
            "overrides": run_identity(cfg, run, seed), "tool": run.tool, "command": command,
            "returncode": 0 if done else (proc.returncode or 1), "seconds": round(time.monotonic() - start, 1),
            "threads": cfg.threads,
            "reason": "" if done else (reason if proc.returncode else "no result written")})
    return proc.returncode, "" if proc.returncode == 0 else reason


def run_all(cfg: DictConfig, runs: list[Run]) -> None:
    """Every (seed, run) that has not finished: `jobs` at a time on this machine, or with `launcher=`
    one hydra multirun per row over its unfinished seeds."""
    if cfg.launcher:
        for i, run in enumerate(runs, 1):
            seeds = [s for s in cfg.seeds if cfg.rerun or not finished(cfg, run, s)]
            where = f"[{i}/{len(runs)}] {cfg.table}/{run.name} seeds {seeds}"
            if seeds:
                code, reason = launch_multirun(cfg, run, seeds)
                print(f"{where}: {'ok' if code == 0 else f'FAILED ({reason})'}", flush=True)
            else:
                print(f"{where}: finished earlier, kept", flush=True)
        return
    todo = [(seed, run) for seed in cfg.seeds for run in runs]
    pending = []
    for i, (seed, run) in enumerate(todo, 1):
        if not cfg.rerun and finished(cfg, run, seed):
            print(f"[{i}/{len(todo)}] {cfg.table}/{run.name} seed {seed}: finished earlier, kept", flush=True)
        else:
            pending.append((i, seed, run))
    in_order(pending, lambda seed, run: prerequisites(runs, seed, run), cfg.jobs,
             lambda i, seed, run: launch_logged(cfg, run, seed, f"[{i}/{len(todo)}] {cfg.table}/{run.name} seed {seed}"))


def prerequisites(runs: list[Run], seed: int, run: Run) -> list[tuple[int, Run]]:
    """What must end before (seed, run) starts: the seed's first run, which trains the seed's teacher
    into the cache (started beside it, a second run would train the same teacher again), and the
    seed's qconfig search for a searched row. A prerequisite that failed does not block: the run
    then trains its own teacher, or records that its search is missing."""
    needed = [(seed, runs[0])] if run != runs[0] else []
    if run.search:
        needed += [(seed, r) for r in runs if r.name == SEARCH and r != runs[0]]
    return needed


def in_order(pending: list[tuple], needs: Callable[..., list], jobs: int, start: Callable[..., None]) -> None:
    """Calls `start(*item)` for every item of `pending`, at most `jobs` at a time, each once every item
    `needs(*item[1:])` names that is still pending has returned; earlier items first (seed by seed, so
    early seeds complete first)."""
    waiting, running = list(pending), {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while waiting or running:
            unfinished = {tuple(item[1:]) for item in [*waiting, *running.values()]}
            for item in [item for item in waiting if not set(needs(*item[1:])) & unfinished][:jobs - len(running)]:
                waiting.remove(item)
                running[pool.submit(start, *item)] = item
            if not running:
                raise AblateError(f"runs wait on each other: {[item[1:] for item in waiting]}")  # a bug in `needs`
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                running.pop(future)
                future.result()  # a bug in start() surfaces here instead of being dropped


def launch_logged(cfg: DictConfig, run: Run, seed: int, where: str) -> None:
    print(f"{where}: {run.tool} {' '.join(run_overrides(cfg, run, seed))}", flush=True)
    start = time.monotonic()
    code, reason = launch(cfg, run, seed)
    outcome = "ok" if code == 0 else f"FAILED ({reason})"
    print(f"{where}: {outcome} in {time.monotonic() - start:.0f} s", flush=True)


# ---- collecting ------------------------------------------------------------------------------------
def wandb_records(cfg: DictConfig) -> dict[tuple[str, int], tables.Record]:
    """(run name, seed) → Record from W&B offline runs tagged ablate.<table>.<profile>.<run name>."""
    prefix = f"ablate.{cfg.table}.{cfg.profile}."
    found: dict[tuple[str, int], tables.Record] = {}
    for root in cfg.wandb_dirs:
        if not Path(root).exists():
            raise AblateError(f"wandb_dirs: {root} does not exist")
        for path in find_offline_runs(Path(root)):
            offline = read_offline_run(path)
            for tag in (t for t in offline.tags if t.startswith(prefix)):
                seed = offline.config.get("seed")
                figures = tables.figures_from_wandb(offline.summary)
                ok = offline.exit_code == 0 and "oa" in figures
                found[(tag[len(prefix):], seed)] = tables.Record(
                    "ok" if ok else "failed", figures if ok else {}, tables.epoch_curves(offline.history),
                    "" if ok else f"W&B run exited {offline.exit_code}", source=str(path))
    return found


def collect(cfg: DictConfig, rows: list[Row]) -> dict[tuple[str, int], tables.Record]:
    """A Record for every (run, seed): from its run directory, else from W&B, else missing."""
    from_wandb = wandb_records(cfg) if cfg.wandb_dirs else {}
    records = {}
    for run in {row.run for row in rows}:
        for seed in cfg.seeds:
            path = run_dir(cfg, run, seed)
            status = tables.read_json(path / tables.STATUS_FILE)  # none: a run made by hand, taken as it is
            record = tables.read_run_dir(path, seed, run_identity(cfg, run, seed) if status is not None else None)
            if record.status != "ok" and (run.name, seed) in from_wandb:
                record = from_wandb[(run.name, seed)]
            records[(run.name, seed)] = record
    return records


# ---- writing ---------------------------------------------------------------------------------------
def _stated(records: list[tables.Record], key: str) -> str:
    values = sorted({int(r.figures[key]) for r in records if r.status == "ok" and key in r.figures})
    return "/".join(map(str, values)) if values else "?"


def _relative(source: str, base: Path) -> str:
    """A run's path as seen from the table's folder, so the Markdown stays valid when results/ moves."""
    return os.path.relpath(source, base) if source.startswith("/") else source


def row_records(cfg: DictConfig, rows: list[Row],
                records: dict[tuple[str, int], tables.Record]) -> list[tuple[str, list[tables.Record]]]:
    """(label, one Record per seed) for each row, in the table's order."""
    return [(row.label, [records[(row.run.name, s)] for s in cfg.seeds]) for row in rows]


def write_outputs(cfg: DictConfig, rows: list[Row], records: dict[tuple[str, int], tables.Record]) -> Path:
    """`<profile>.md`, `<profile>.csv` and the figures of the table in results/<table>/."""
    out = Path(cfg.results_dir).resolve() / cfg.table
    out.mkdir(parents=True, exist_ok=True)
    spec = cfg.tables[cfg.table]
    columns = {"main": tables.MAIN_COLUMNS, "bits": tables.BITS_COLUMNS}.get(spec.columns, tables.QAT_COLUMNS)
    by_row = row_records(cfg, rows, records)
    label_of = {}  # a compared row left out by `rows=`: no comparison; a run serving several cells: the first
    for row in rows:
        label_of.setdefault(row.run.name, row.label)
    compare = [label_of.get(row.compare) for row in rows]
    everything = [r for _, rs in by_row for r in rs]
    batch = _stated(everything, "eval_batch")
    name = cfg.profile
    shared = "".join(f", {o}" for o in table_overrides(cfg))  # e.g. the bit width every run of the table used
    parts = [f"# Table `{cfg.table}`, profile `{cfg.profile}`, seeds {list(cfg.seeds)}{shared}\n"]
    extra = None
    if "grid" in spec:
        (row_key, row_values), (col_key, col_values) = spec.grid.items()
        grid = {row.params: recs for row, (_, recs) in zip(rows, by_row)}
        row_values = [a for a in row_values if any(p[0] == a for p in grid)]
        col_values = [t for t in col_values if any(p[1] == t for p in grid)]
        parts += [f"int8 OA % (rows {row_key}, columns {col_key}):\n", tables.grid_markdown(grid, row_values, col_values,
                                                                                        "α", "T")]
        no_kd = next((row.compare for row in rows if row.compare in label_of), None)  # not with rows= leaving α = 0 out
        if no_kd is not None:
            compared = [a for a in row_values if any(row.compare and row.params[0] == a for row in rows)]
            parts += [f"Δ int8 OA vs {label_of[no_kd]} (no distillation), points, paired over seeds, 95 % t "
                      f"interval, `*`: excludes zero:\n",
                      tables.grid_delta_markdown(grid, [records[(no_kd, s)] for s in cfg.seeds], compared,
                                                 col_values, "α", "T")]
        parts.append("All figures:\n")
        tables.plot_heatmap(grid, row_values, col_values, out / f"{name}_heatmap.png", row_key, col_key,
                       f"int8 OA, {cfg.table} table ({cfg.profile})")
        parts.append(f"![heat map]({name}_heatmap.png)\n")
        extra = {row_key: [str(r.params[0]) for r in rows], col_key: [str(r.params[1]) for r in rows]}
    parts.append(tables.table_markdown(by_row, columns, batch, compare))
    (out / f"{name}.csv").write_text(tables.table_csv(by_row, columns, extra, compare))
    latency = (f" Latency: median CPU ms, {_stated(everything, 'threads')} threads, {_stated(everything, 'num_points')} "
               f"points, end to end (neighbour search included), int8 timed from the reloaded TorchScript artifact; "
               f"size ratios, speed-ups and ΔOA are against the FP32 model measured in the same run."
               if any(c.key.startswith("ms_") for c in columns) else "")
    parts.append(
        f"\nCells: mean ± sample std over the seeds that finished; `(n=k/N)`: only k of N runs finished; "
        f"`{tables.MISSING}`: none did.{latency}\n\nΔ columns: mean paired difference of OA over the seeds where both runs finished, with a "
        f"95 % paired t interval over seeds (runtime/tables.py: paired_delta); `*`: the interval excludes zero. "
        f"Δ vs FP32 pairs each run with the FP32 model it quantized (that seed's teacher); Δ vs the compared row "
        f"pairs the two rows' runs of each seed.\n")
    if "grid" not in spec:
        x_key = "size_mb_packed" if spec.columns == "bits" else "ms_bB"
        x_label = "packed size, MB (bits × parameters + scales)" if x_key == "size_mb_packed" else None
        front = tables.plot_pareto(by_row, out / f"{name}_pareto.png", batch, f"{cfg.table} table ({cfg.profile})",
                                   x_key=x_key, x_label=x_label)
        parts.append(f"![accuracy vs {'packed size' if x_label else 'latency'}]({name}_pareto.png)\n\nPareto front "
                     f"(OA vs {'packed MB' if x_label else f'ms b={batch}'}): {', '.join(front) or 'none'}.\n")
    curves = [(label, recs) for (label, recs), row in zip(by_row, rows) if row.run.name in spec.get("curves", [])]
    if curves and tables.plot_curves(curves, out / f"{name}_curves.png", f"{cfg.table} table ({cfg.profile})"):
        parts.append(f"![validation curves]({name}_curves.png)\n")
    problems = [f"- {row.label}, seed {s}: {records[(row.run.name, s)].status} — {records[(row.run.name, s)].reason} "
                f"(`{_relative(records[(row.run.name, s)].source, out)}`)" for row in rows for s in cfg.seeds
                if records[(row.run.name, s)].status != "ok"]
    if problems:
        parts += ["\nMissing or failed runs (not in any mean):\n", *dict.fromkeys(problems)]
    statuses = [tables.read_json(run_dir(cfg, run, s) / tables.STATUS_FILE) or {}
                for run in runs_in_order(rows, cfg.profile, search_preset(cfg), table_overrides(cfg)) for s in cfg.seeds]
    parts.append(run_time_note(statuses))
    parts.append(f"\nRuns: `runs/{cfg.profile}/<row>/seed<S>/` (next to this file). Rebuilt by "
                 f"`python tools/ablate.py table={cfg.table} profile={cfg.profile} "
                 f"seeds=[{','.join(map(str, cfg.seeds))}] collect_only=true`.\n")
    (out / f"{name}.md").write_text("\n".join(parts))
    return out / f"{name}.md"


def run_time_note(statuses: list[dict]) -> str:
    """How long the runs took, from their status files: summed run time, and the span from the first
    start to the last end (the table's wall clock when one `ablate.py` call made every run), with the
    number of runs at a time, whose latency figures then shared the machine."""
    seconds = [s["seconds"] for s in statuses if s.get("seconds")]
    if not seconds:
        return ""
    note = f"\nRun time of the runs launched by tools/ablate.py (their {tables.STATUS_FILE}): " \
           f"{sum(seconds) / 60:.1f} min summed over {len(seconds)} runs"
    timed = [s for s in statuses if s.get("started") and s.get("ended")]
    if len(timed) == len(seconds):
        span = max(s["ended"] for s in timed) - min(s["started"] for s in timed)
        jobs = sorted({s.get("parallel_runs", 1) for s in timed})
        note += f"; first start to last end {span / 60:.1f} min, {'/'.join(map(str, jobs))} run(s) at a time"
        if jobs != [1]:
            note += " (latency figures measured beside another run: compare them within a run only)"
    return note + ".\n"


@hydra.main(config_path="../configs", config_name="ablate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # bad table, row or option: one line, exit 2, no empty folder left (runtime/exits.py)
    main_guard(lambda: run(cfg), on_user_error=lambda: remove_if_empty(HydraConfig.get().runtime.output_dir))


def run(cfg: DictConfig) -> None:
    rows = table_rows(cfg)
    if not cfg.seeds:
        raise AblateError("seeds=[]: give at least one seed, e.g. seeds=[0,1,2]")
    for key in ("jobs", "threads"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise AblateError(f"{key}={cfg[key]}: give a whole number, at least 1")
    if not (ROOT / "configs" / "experiment" / f"{cfg.profile}.yaml").is_file():
        raise AblateError(f"profile={cfg.profile}: no configs/experiment/{cfg.profile}.yaml; use quick or full")
    if not cfg.collect_only:
        run_all(cfg, runs_in_order(rows, cfg.profile, search_preset(cfg), table_overrides(cfg)))
    path = write_outputs(cfg, rows, collect(cfg, rows))
    print(path.read_text())
    print(f"tables and figures: {path.parent}")


if __name__ == "__main__":
    hydra_entry(main)
