"""Results tables from run directories: per-run figures, mean ± std over seeds, Markdown/CSV, figures.

Every cell is computed from files the tools wrote (`metrics.json`, `log.jsonl`, or a W&B offline
run), never typed. A run that is missing or failed contributes nothing to a mean and is counted:
a cell shows how many seeds it averages (`n=2/3`), and a cell with no run shows `—`, never 0.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from atomic_io import atomic_write
from runtime.metric_names import metrics_from_logged

__all__ = [
    "Column", "Record", "Cell", "MAIN_COLUMNS", "QAT_COLUMNS", "figures_from_metrics", "figures_from_wandb",
    "read_run_dir", "aggregate", "format_cell", "Delta", "paired_delta", "format_delta", "delta_cells", "table_markdown", "table_csv", "grid_markdown",
    "grid_delta_markdown", "epoch_curves",
    "BITS_COLUMNS", "plot_pareto", "plot_curves", "plot_heatmap", "read_json", "MISSING", "STATUS_FILE",
]

MISSING = "—"
STATUS_FILE = "ablate_status.json"  # written by tools/ablate.py next to each run it launched


# ---- what a run measured -------------------------------------------------------------------------
def _eval_batch_key(latency: dict[str, Any]) -> str | None:
    """The eval-batch latency key of a `latency_ms` dict (`batch_32`), the one that is not batch 1."""
    keys = [k for k in latency if re.fullmatch(r"batch_\d+", k) and k != "batch_1"]
    return max(keys, key=lambda k: int(k.split("_")[1])) if keys else None


def figures_from_metrics(m: dict[str, Any]) -> dict[str, float]:
    """The table's figures of one run, from its metrics.json (FP32 runs are their own reference).

    Ratios divide by the FP32 reference the run measured itself, in the same process: on a noisy
    machine that is fairer than dividing by another run's FP32 latency.
    """
    ref = m.get("fp32", m)
    lat, ref_lat = m.get("latency_ms") or {}, ref.get("latency_ms") or {}
    batch = _eval_batch_key(lat)
    out: dict[str, float] = {"oa": m.get("oa"), "macc": m.get("macc"), "size_mb": m.get("size_mb"),
                             "size_mb_packed": m.get("size_mb_packed"),
                             "ms_b1": lat.get("batch_1"), "ms_bB": lat.get(batch) if batch else None,
                             "threads": lat.get("threads"), "eval_batch": int(batch.split("_")[1]) if batch else None,
                             "num_points": m.get("num_points"), "fq_oa": (m.get("fakequant") or {}).get("oa")}
    if out["size_mb"] is not None and ref.get("size_mb"):
        out["size_ratio"] = out["size_mb"] / ref["size_mb"]
    if out["ms_b1"] and ref_lat.get("batch_1"):
        out["speedup_b1"] = ref_lat["batch_1"] / out["ms_b1"]
    if out["ms_bB"] and batch and ref_lat.get(batch):
        out["speedup_bB"] = ref_lat[batch] / out["ms_bB"]
    if out["oa"] is not None and ref.get("oa") is not None:
        out["delta_oa"] = out["oa"] - ref["oa"]
    return {k: float(v) for k, v in out.items() if v is not None}


_RATIOS = ("delta_oa", "size_ratio", "speedup_b1", "speedup_bB")


def figures_from_wandb(summary: dict[str, Any]) -> dict[str, float]:
    """The figures a W&B run's summary holds; a whole metrics.json under `metrics` wins when logged.

    The summary's logged names are read back into metrics.json's layout by the one mapping
    (`runtime/metric_names.py`), then handled as a metrics.json. Ratios need the FP32 reference:
    without `test/oa_fp32` in the summary, none (a metrics.json without `fp32` is an FP32 run, its
    own reference; a summary without it is only incomplete).
    """
    if isinstance(summary.get("metrics"), dict):
        return figures_from_metrics(summary["metrics"])
    metrics = metrics_from_logged(summary)
    figures = figures_from_metrics(metrics)
    return figures if "fp32" in metrics else {k: v for k, v in figures.items() if k not in _RATIOS}


@dataclass
class Record:
    """One (row, seed) of a table: its figures when it finished, else why it did not."""

    status: str                       # ok | failed | missing
    figures: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val/oa_fakequant)
    reason: str = ""
    source: str = ""


def epoch_curves(log_records: Sequence[dict[str, Any]], key: str = "val/oa_fakequant") -> list[tuple[int, float]]:
    """(epoch, value) of the student's per-epoch validation records (teacher records are prefixed)."""
    points = {}
    for rec in log_records:
        if "epoch" in rec and isinstance(rec.get(key), (int, float)):
            points[int(rec["epoch"])] = float(rec[key])  # a resumed epoch: the last record wins
    return sorted(points.items())


def read_run_dir(path: Path, seed: int, expected_overrides: Sequence[str] | None = None) -> Record:
    """The Record of one run directory: ok only with a readable metrics.json of the right seed.

    Args:
        expected_overrides: The overrides tools/ablate.py would launch this run with; a run it
            launched with others (its status file says so) is stale and counts as missing.
    """
    path = Path(path)
    if not path.is_dir():
        return Record("missing", reason="never run", source=str(path))
    status = read_json(path / STATUS_FILE)
    if status is not None and expected_overrides is not None and status.get("overrides") != list(expected_overrides):
        return Record("missing", reason="made with other settings (stale); rerun", source=str(path))
    if status is not None and status.get("returncode") not in (0, None):
        return Record("failed", reason=status.get("reason") or f"exit code {status['returncode']}", source=str(path))
    if status is not None and status.get("reason"):
        return Record("failed", reason=status["reason"], source=str(path))
    metrics = read_json(path / "metrics.json")
    if metrics is None:
        why = "metrics.json unreadable" if (path / "metrics.json").exists() else "no metrics.json (killed or running)"
        return Record("failed", reason=why, source=str(path))
    if metrics.get("seed") is not None and metrics["seed"] != seed:
        return Record("failed", reason=f"metrics.json has seed {metrics['seed']}, expected {seed}", source=str(path))
    log = []
    if (path / "log.jsonl").is_file():
        for line in (path / "log.jsonl").read_text().splitlines():
            try:
                log.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    try:
        figures = figures_from_metrics(metrics)
    except (TypeError, ValueError, AttributeError, IndexError) as err:  # a hand-edited or foreign metrics.json
        return Record("failed", reason=f"metrics.json malformed ({type(err).__name__}: {str(err).splitlines()[0][:80]})",
                      source=str(path))
    return Record("ok", figures, epoch_curves(log), source=str(path))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is absent, unreadable or not an object."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8 text
        return None
    return payload if isinstance(payload, dict) else None


# ---- mean ± std over seeds -----------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    mean: float | None
    std: float | None   # sample std (n − 1); None below two runs
    n: int
    expected: int


def aggregate(values: Sequence[float | None], expected: int) -> Cell:
    """Mean and sample std of the values that exist; `None` (missing or failed runs) is counted, not averaged."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return Cell(None, None, 0, expected)
    return Cell(statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None,
                len(present), expected)


def format_cell(cell: Cell, fmt: str = "{:.2f}") -> str:
    """`72.25 ± 0.50`, with `(n=2/3)` when runs are missing, `— (n=0/3)` when none finished."""
    if cell.mean is None:
        return f"{MISSING} (n=0/{cell.expected})"
    text = fmt.format(cell.mean)
    if cell.std is not None:  # same decimals as the mean, never a sign
        text += " ± " + fmt.replace("+", "").format(cell.std)
    return text + (f" (n={cell.n}/{cell.expected})" if cell.n < cell.expected else "")


# ---- paired differences over seeds ---------------------------------------------------------------
@dataclass(frozen=True)
class Delta:
    mean: float | None
    low: float | None    # 95 % confidence interval of the mean paired difference; None below three pairs
    high: float | None
    n: int               # seeds where both runs finished

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired_delta(values: Sequence[float | None], reference: Sequence[float | None], level: float = 0.95) -> Delta:
    """Mean of the per-seed differences `values[s] - reference[s]` with a paired t interval.

    Why paired t over seeds: the rows of one seed share their teacher (and data order), so most of
    a seed's luck is common to its rows and cancels in the difference; the seeds are the
    independent replicates. t rather than a bootstrap because n is 3 to 5 seeds, where a
    bootstrap over seeds has only a handful of distinct resamples. Interval:
    mean ± t_{(1+level)/2, n-1} · sd / √n over the seeds where both runs finished. With fewer
    than 3 pairs no interval is given: two OA differences on a finite test set can coincide (equal
    cloud counts), and a zero spread would read as a zero-width, "significant" interval.
    """
    from scipy import stats

    diffs = [v - r for v, r in zip(values, reference) if v is not None and r is not None
             and not math.isnan(v) and not math.isnan(r)]
    if not diffs:
        return Delta(None, None, None, 0)
    mean = statistics.fmean(diffs)
    if len(diffs) < 3:
        return Delta(mean, None, None, len(diffs))
    half = float(stats.t.ppf((1 + level) / 2, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Delta(mean, mean - half, mean + half, len(diffs))


def format_delta(delta: Delta) -> str:
    """`+1.23 [-0.40, +2.86]`, with `*` when the interval excludes zero; `—` with no pair."""
    if delta.mean is None:
        return MISSING
    if delta.low is None:
        return f"{delta.mean:+.2f} (n={delta.n})"
    return f"{delta.mean:+.2f} [{delta.low:+.2f}, {delta.high:+.2f}]" + ("*" if delta.significant else "")


def _values(records: Sequence[Record], key: str) -> list[float | None]:
    return [r.figures.get(key) if r.status == "ok" else None for r in records]


def delta_cells(rows: Sequence[tuple[str, Sequence[Record]]], compare: Sequence[str | None],
                key: str = "oa") -> tuple[list[str], list[list[Delta | None]]]:
    """Two paired columns per row: Δ`key` vs FP32 and Δ`key` vs the row named in `compare` (same seeds).

    Δ vs FP32 pairs each run with the FP32 model it measured itself (`delta_oa` of metrics.json:
    the teacher of that seed); Δ vs a row pairs the two rows' runs of each seed. `compare[i]` is
    the label of row i's reference row, or None. Records must be in the same seed order.
    """
    by_label = {label: records for label, records in rows}
    cells = []
    for (label, records), ref in zip(rows, compare):
        vs_fp32 = paired_delta(_values(records, "delta_oa"), [0.0] * len(records)) if key == "oa" else None
        vs_row = paired_delta(_values(records, key), _values(by_label[ref], key)) if ref else None
        cells.append([vs_fp32, vs_row])
    return [f"Δ{key.upper()} vs FP32, 95 % CI", f"Δ{key.upper()} vs compared row, 95 % CI"], cells


# ---- tables --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    key: str        # figure name (figures_from_metrics)
    header: str     # may hold {batch}: the eval batch size
    fmt: str = "{:.2f}"


MAIN_COLUMNS = (
    Column("oa", "OA %"), Column("macc", "mAcc %"), Column("size_mb", "size MB", "{:.3f}"),
    Column("size_ratio", "size ×FP32", "{:.3f}"), Column("ms_b1", "ms b=1", "{:.1f}"),
    Column("ms_bB", "ms b={batch}", "{:.1f}"), Column("speedup_b1", "speed-up b=1"),
    Column("speedup_bB", "speed-up b={batch}"), Column("delta_oa", "ΔOA pts", "{:+.2f}"),
)
# Ablations of the quantized student: its fake-quant OA too (what the training validated).
QAT_COLUMNS = (
    Column("oa", "int8 OA %"), Column("macc", "int8 mAcc %"), Column("fq_oa", "fake-quant OA %"),
    Column("delta_oa", "ΔOA vs FP32 pts", "{:+.2f}"), Column("size_mb", "size MB", "{:.3f}"),
    Column("ms_bB", "ms b={batch}", "{:.1f}"), Column("speedup_bB", "speed-up b={batch}"),
)

# The bits table: accuracy against the packed size the bit widths buy (qat/export.py: packed_size_mb).
BITS_COLUMNS = (
    Column("oa", "int8 OA %"), Column("fq_oa", "fake-quant OA %"), Column("size_mb_packed", "packed MB", "{:.4f}"),
    Column("size_mb", "artifact MB", "{:.3f}"),
)


def _row_cells(records: Sequence[Record], columns: Sequence[Column]) -> list[Cell]:
    return [aggregate([r.figures.get(c.key) if r.status == "ok" else None for r in records], len(records))
            for c in columns]


def table_markdown(rows: Sequence[tuple[str, Sequence[Record]]], columns: Sequence[Column], batch: int | str,
                   compare: Sequence[str | None] | None = None) -> str:
    """One line per row: label, the cells (mean ± std over its seeds), runs finished / expected.

    `compare` (one entry per row: the label of the row it is compared with, or None) adds the
    paired columns of `delta_cells`: Δ OA vs FP32 and vs that row, 95 % CI, `*` if it excludes 0.
    """
    header = ["", *[c.header.format(batch=batch) for c in columns]]
    deltas = None
    if compare is not None:
        names, deltas = delta_cells(rows, compare)
        header += [*names, "compared with"]
    header.append("runs")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (label, records) in enumerate(rows):
        cells = [format_cell(cell, c.fmt) for cell, c in zip(_row_cells(records, columns), columns)]
        if deltas is not None:
            cells += [MISSING if d is None else format_delta(d) for d in deltas[i]] + [compare[i] or MISSING]
        ok = sum(r.status == "ok" for r in records)
        lines.append("| " + " | ".join([label, *cells, f"{ok}/{len(records)}"]) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: Sequence[tuple[str, Sequence[Record]]], columns: Sequence[Column],
              extra: dict[str, Sequence[str]] | None = None, compare: Sequence[str | None] | None = None) -> str:
    """Machine-readable twin of the Markdown: per column its mean, std and n (empty when missing);
    with `compare`, the paired Δ OA vs FP32 and vs the compared row (mean, CI low/high, n)."""
    extra = extra or {}
    deltas = delta_cells(rows, compare)[1] if compare is not None else None
    header = ["row", *extra, *[f"{c.key}_{s}" for c in columns for s in ("mean", "std", "n")],
              *([f"{d}_{s}" for d in ("delta_oa_vs_fp32", "delta_oa_vs_row") for s in ("mean", "low", "high", "n")]
                if deltas is not None else []), "runs_ok", "runs_expected"]
    lines = [",".join(header)]
    for i, (label, records) in enumerate(rows):
        values = [label, *[vals[i] for vals in extra.values()]]
        for cell in _row_cells(records, columns):
            values += ["" if cell.mean is None else repr(cell.mean), "" if cell.std is None else repr(cell.std),
                       str(cell.n)]
        for delta in deltas[i] if deltas is not None else []:
            delta = delta or Delta(None, None, None, 0)
            values += ["" if v is None else repr(v) for v in (delta.mean, delta.low, delta.high)] + [str(delta.n)]
        values += [str(sum(r.status == "ok" for r in records)), str(len(records))]
        lines.append(",".join(f'"{v}"' if "," in v else v for v in values))
    return "\n".join(lines) + "\n"


def grid_markdown(grid: dict[tuple[Any, Any], Sequence[Record]], row_values: Sequence[Any], col_values: Sequence[Any],
                  row_name: str, col_name: str, key: str = "oa") -> str:
    """A 2-D table (rows × columns of a sweep) of one figure, mean ± std (n) per cell."""
    return _grid_table(row_values, col_values, row_name, col_name, lambda r, c: format_cell(
        aggregate([x.figures.get(key) if x.status == "ok" else None for x in grid[(r, c)]], len(grid[(r, c)]))))


def grid_delta_markdown(grid: dict[tuple[Any, Any], Sequence[Record]], reference: Sequence[Record],
                        row_values: Sequence[Any], col_values: Sequence[Any], row_name: str, col_name: str,
                        key: str = "oa") -> str:
    """The 2-D table of paired differences: each cell's runs minus `reference`'s, seed by seed (paired_delta)."""
    ref = _values(reference, key)
    return _grid_table(row_values, col_values, row_name, col_name,
                       lambda r, c: format_delta(paired_delta(_values(grid[(r, c)], key), ref)))


def _grid_table(row_values: Sequence[Any], col_values: Sequence[Any], row_name: str, col_name: str,
                cell: Callable[[Any, Any], str]) -> str:
    lines = ["| " + " | ".join([f"{row_name} \\ {col_name}", *[str(c) for c in col_values]]) + " |",
             "|" + "---|" * (len(col_values) + 1)]
    lines += ["| " + " | ".join([str(r), *[cell(r, c) for c in col_values]]) + " |" for r in row_values]
    return "\n".join(lines) + "\n"


# ---- figures -------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Atomic PNG write (temp file + rename), then the figure is closed."""
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        _pyplot().close(fig)


def plot_pareto(rows: Sequence[tuple[str, Sequence[Record]]], path: Path, batch: int | str, title: str,
                x_key: str = "ms_bB", x_label: str | None = None,
                y_keys: Sequence[tuple[str, str]] = (("oa", "test OA %"),)) -> list[str]:
    """OA vs a cost (mean ± std over seeds); the Pareto front joined and starred.

    The cost is the figure `x_key`: latency at the eval batch by default, `size_mb_packed` for the
    bits table. `y_keys`: (figure, axis label) per panel, side by side (the search plots val and
    test accuracy). Returns the labels on the first panel's front (lowest cost first); rows without
    the figures are left out of the plot and named in its caption.
    """
    from qat.search import pareto_front  # (cost, accuracy) → indices no other point beats

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(y_keys), figsize=(6.4 * len(y_keys), 4.4), squeeze=False)
    fronts, absent = [], []
    for ax, (y_key, y_label) in zip(axes[0], y_keys):
        points, labels, errs = [], [], []
        for label, records in rows:
            lat, acc = (aggregate([r.figures.get(k) if r.status == "ok" else None for r in records], len(records))
                        for k in (x_key, y_key))
            if lat.mean is None or acc.mean is None:
                absent.append(label)
                continue
            points.append((lat.mean, acc.mean))
            errs.append((lat.std or 0.0, acc.std or 0.0))
            labels.append(label)
        front = pareto_front(points) if points else []
        fronts.append([labels[i] for i in front])
        for i, ((x, y), (ex, ey), label) in enumerate(zip(points, errs, labels)):
            on = i in front
            ax.errorbar(x, y, xerr=ex, yerr=ey, fmt="*" if on else "o", ms=11 if on else 6, capsize=3,
                        color="tab:red" if on else "tab:blue")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if len(front) > 1:
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="tab:red", lw=1,
                    label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_xlabel(x_label or f"latency, ms at batch {batch} (median, mean over seeds)")
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    absent = list(dict.fromkeys(absent))
    fig.suptitle(title + (f"\n(no figures: {', '.join(absent)})" if absent else ""), fontsize=9)
    _save(fig, path)
    return fronts[0]


def plot_curves(rows: Sequence[tuple[str, Sequence[Record]]], path: Path, title: str) -> bool:
    """Per-epoch validation OA of the fake-quant student: mean over seeds, band = min..max.

    Returns False (and writes nothing) when no row has a curve.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for label, records in rows:
        by_epoch: dict[int, list[float]] = {}
        for r in records:
            if r.status == "ok":
                for epoch, value in r.curve:
                    by_epoch.setdefault(epoch, []).append(value)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        mean = [statistics.fmean(by_epoch[e]) for e in epochs]
        n = max(len(v) for v in by_epoch.values())
        ax.plot([e + 1 for e in epochs], mean, "o-", label=f"{label} (n={n})")
        ax.fill_between([e + 1 for e in epochs], [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs],
                        alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("student epoch")
    ax.set_ylabel("val OA % (fake-quant student)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_heatmap(grid: dict[tuple[Any, Any], Sequence[Record]], row_values: Sequence[Any], col_values: Sequence[Any],
                 path: Path, row_name: str, col_name: str, title: str, key: str = "oa") -> None:
    """Heat map of one figure over a 2-D sweep; each cell annotated with mean, std and n (blank if missing)."""
    import numpy as np

    plt = _pyplot()
    values = np.full((len(row_values), len(col_values)), np.nan)
    fig, ax = plt.subplots(figsize=(1.3 * len(col_values) + 2.5, 0.8 * len(row_values) + 1.8))
    for i, r in enumerate(row_values):
        for j, c in enumerate(col_values):
            records = grid[(r, c)]
            cell = aggregate([x.figures.get(key) if x.status == "ok" else None for x in records], len(records))
            if cell.mean is not None:
                values[i, j] = cell.mean
            text = MISSING if cell.mean is None else f"{cell.mean:.2f}"
            if cell.std is not None:
                text += f"\n±{cell.std:.2f}"
            ax.text(j, i, f"{text}\nn={cell.n}/{cell.expected}", ha="center", va="center", fontsize=7)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="int8 OA %")
    ax.set_xticks(range(len(col_values)), [str(c) for c in col_values])
    ax.set_yticks(range(len(row_values)), [str(r) for r in row_values])
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    ax.set_title(title, fontsize=9)
    _save(fig, path)
