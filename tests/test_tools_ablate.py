"""tools/ablate.py: every table cell comes from the run directories, missing runs are shown as missing.

Most tests fabricate run directories (metrics.json as the tools write it) and build the tables
from them; one slow test runs `table=main` end to end on a tiny configuration.
"""
import csv
import io
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from _tools import ROOT, TINY, load_tool, run_tool, tool_env

ablate = load_tool("ablate")

from runtime import pipeline
from runtime.config import validate_config
from runtime import tables
from runtime.metric_names import logged_from_metrics
from runtime.wandb_offline import find_offline_runs, read_offline_run

MAIN_ROWS = ["fp32", "static", "qat", "kd_qat", "kd_qat_searched"]
LABELS = {"fp32": "FP32 teacher", "static": "static PTQ", "qat": "QAT", "kd_qat": "KD-QAT",
          "kd_qat_searched": "KD-QAT + searched qconfig"}


# ---- fabricated run directories ---------------------------------------------------------------------
def fp32_figures(oa=71.0, size_mb=2.0, ms_b1=10.0, ms_b32=60.0) -> dict:
    return {"oa": oa, "macc": oa - 1, "size_mb": size_mb,
            "latency_ms": {"threads": 2, "num_points": 256, "batch_1": ms_b1, "batch_1_minmax": [ms_b1, ms_b1],
                           "batch_32": ms_b32, "batch_32_minmax": [ms_b32, ms_b32]}}


def fake_metrics(seed: int, method: str = "kd_qat", oa=70.0, ms_b32=30.0, **fp32) -> dict:
    """A metrics.json shaped like the tools' (FP32 runs carry no `fp32` reference: they are it)."""
    if method == "fp32":
        return {"method": "fp32", "seed": seed, "num_points": 256, **fp32_figures(oa=oa, ms_b32=ms_b32)}
    m = {"method": method, "seed": seed, "num_points": 256, "fp32": fp32_figures(**fp32),
         **fp32_figures(oa=oa, size_mb=0.5, ms_b1=5.0, ms_b32=ms_b32)}
    if method != "static":
        m["fakequant"] = {"oa": oa + 0.5, "macc": oa}
    return m


def write_run(results: Path, row: str, seed: int, metrics: dict | None, table="main", status: dict | None = None,
              curve: list[float] = ()) -> Path:
    path = results / table / "runs" / "quick" / row / f"seed{seed}"
    path.mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if status is not None:
        (path / tables.STATUS_FILE).write_text(json.dumps(status))
    if curve:
        lines = [{"step": 3, "train/loss": 1.0}]
        lines += [{"step": 10 * (e + 1), "epoch": e, "val/oa_fakequant": v} for e, v in enumerate(curve)]
        (path / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def write_main(results: Path, seeds=(0, 1, 2), **per_row) -> None:
    """Every main-table run; per_row[row] = list of OA per seed (default 70 + seed)."""
    for row in MAIN_ROWS:
        for seed in seeds:
            oa = per_row.get(row, [70.0 + s for s in seeds])[seeds.index(seed)]
            method = {"kd_qat_searched": "kd_qat"}.get(row, row)
            write_run(results, row, seed, fake_metrics(seed, method, oa=oa), curve=[oa - 2, oa - 1])


def ablate_cfg(results: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("ablate", overrides=[f"results_dir={results}", *overrides])


def build(results: Path, *overrides: str) -> tuple[str, dict[str, dict[str, str]]]:
    """Builds the table like `collect_only=true` does; returns its Markdown and CSV rows by label."""
    cfg = ablate_cfg(results, *overrides)
    rows = ablate.table_rows(cfg)
    md_path = ablate.write_outputs(cfg, rows, ablate.collect(cfg, rows))
    table = list(csv.DictReader(io.StringIO(md_path.with_suffix(".csv").read_text())))
    return md_path.read_text(), {r["row"]: r for r in table}


def build_csv(results: Path) -> dict[str, dict[str, str]]:
    """The main table's CSV rows by label, without drawing the figures (the same cells as `build`)."""
    cfg = ablate_cfg(results)
    rows = ablate.table_rows(cfg)
    text = tables.table_csv(ablate.row_records(cfg, rows, ablate.collect(cfg, rows)), tables.MAIN_COLUMNS)
    return {r["row"]: r for r in csv.DictReader(io.StringIO(text))}


def md_row(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


# ---- mean ± std, and honesty ----------------------------------------------------------------------------
def test_cell_is_the_mean_and_sample_std_over_seeds(tmp_path):
    write_main(tmp_path, kd_qat=[70.0, 72.0, 77.0])
    markdown, table = build(tmp_path)
    kd = table["KD-QAT"]
    assert float(kd["oa_mean"]) == pytest.approx(73.0)
    assert float(kd["oa_std"]) == pytest.approx(math.sqrt(((70 - 73) ** 2 + (72 - 73) ** 2 + (77 - 73) ** 2) / 2))
    assert kd["oa_n"] == "3" and kd["runs_ok"] == "3" and kd["runs_expected"] == "3"
    assert float(kd["delta_oa_mean"]) == pytest.approx(73.0 - 71.0)  # against each run's own FP32 figure
    cells = md_row(markdown, "KD-QAT")
    assert cells[1] == "73.00 ± 3.61" and cells[-1] == "3/3"
    assert float(table["FP32 teacher"]["size_ratio_mean"]) == 1.0  # FP32 is its own reference


# (path in metrics.json, amount added, CSV columns whose mean must move, the one that moves by amount / 3)
PERTURBATIONS = [
    (("oa",), 3.0, {"oa", "delta_oa"}, "oa"),
    (("macc",), 3.0, {"macc"}, "macc"),
    (("size_mb",), 0.3, {"size_mb", "size_ratio"}, "size_mb"),
    (("latency_ms", "batch_1"), 3.0, {"ms_b1", "speedup_b1"}, "ms_b1"),
    (("latency_ms", "batch_32"), 3.0, {"ms_bB", "speedup_bB"}, "ms_bB"),
    (("fp32", "oa"), 3.0, {"delta_oa"}, None),
    (("fp32", "size_mb"), 0.3, {"size_ratio"}, None),
    (("fp32", "latency_ms", "batch_1"), 3.0, {"speedup_b1"}, None),
    (("fp32", "latency_ms", "batch_32"), 3.0, {"speedup_bB"}, None),
]


@pytest.mark.parametrize("keys, amount, moved, primary", PERTURBATIONS, ids=["/".join(p[0]) for p in PERTURBATIONS])
def test_changing_a_number_in_one_metrics_json_changes_exactly_its_cells(tmp_path, keys, amount, moved, primary):
    write_main(tmp_path)
    before = build_csv(tmp_path)
    path = tmp_path / "main" / "runs" / "quick" / "kd_qat" / "seed1" / "metrics.json"
    metrics = json.loads(path.read_text())
    node = metrics
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] += amount
    path.write_text(json.dumps(metrics))
    after = build_csv(tmp_path)
    means = [c for c in before["KD-QAT"] if c.endswith("_mean")]
    assert {c[:-5] for c in means if before["KD-QAT"][c] != after["KD-QAT"][c]} == moved
    if primary:
        change = float(after["KD-QAT"][f"{primary}_mean"]) - float(before["KD-QAT"][f"{primary}_mean"])
        assert change == pytest.approx(amount / 3)
    for label in before:  # no other row moved
        if label != "KD-QAT":
            assert before[label] == after[label]


def test_missing_run_is_counted_not_averaged_and_never_zero(tmp_path):
    write_main(tmp_path, qat=[70.0, 74.0, 0.0])
    missing = tmp_path / "main" / "runs" / "quick" / "qat" / "seed2"
    for f in missing.iterdir():
        f.unlink()
    missing.rmdir()
    markdown, table = build(tmp_path)
    qat = table["QAT"]
    assert float(qat["oa_mean"]) == pytest.approx(72.0) and qat["oa_n"] == "2" and qat["runs_ok"] == "2"
    cells = md_row(markdown, "QAT")
    assert cells[1] == "72.00 ± 2.83 (n=2/3)" and cells[-1] == "2/3"
    assert "- QAT, seed 2: missing — never run" in markdown


def test_failed_runs_show_as_missing_with_the_reason(tmp_path):
    write_main(tmp_path)
    cfg = ablate_cfg(tmp_path)
    for seed in (0, 1, 2):  # every static run failed, one after writing a zero into metrics.json
        overrides = ablate.run_identity(cfg, ablate.Run("static", "main_static", "quantize.py"), seed)
        write_run(tmp_path, "static", seed, fake_metrics(seed, "static", oa=0.0) if seed == 0 else None,
                  status={"overrides": overrides, "returncode": 1, "reason": "error: qat.calib_batches=0: use >= 1"})
    (write_run(tmp_path, "kd_qat", 2, None) / "metrics.json").unlink()  # killed before it wrote metrics.json
    markdown, table = build(tmp_path)
    static = md_row(markdown, "static PTQ")
    assert static[1:10] == ["— (n=0/3)"] * 9 and static[-1] == "0/3"
    assert static[10:13] == ["—", "—", "—"]  # no pair: no Δ vs FP32, compared with no row
    assert table["static PTQ"]["oa_mean"] == "" and table["static PTQ"]["oa_n"] == "0"
    assert "- static PTQ, seed 0: failed — error: qat.calib_batches=0: use >= 1" in markdown
    assert md_row(markdown, "KD-QAT")[1] == "70.50 ± 0.71 (n=2/3)"
    assert "- KD-QAT, seed 2: failed — no metrics.json (killed or running)" in markdown


def test_runs_of_other_settings_or_another_seed_are_not_used(tmp_path):
    write_main(tmp_path)
    cfg = ablate_cfg(tmp_path)
    stale = ablate.run_identity(cfg, ablate.Run("qat", "main_qat"), 0)
    write_run(tmp_path, "qat", 0, fake_metrics(0, "qat"), status={"overrides": stale + ["train.epochs=9"],
                                                                   "returncode": 0, "reason": ""})
    write_run(tmp_path, "fp32", 1, fake_metrics(5, "fp32"))  # a copy of another seed's run
    markdown, table = build(tmp_path)
    assert table["QAT"]["oa_n"] == "2" and "QAT, seed 0: missing — made with other settings" in markdown
    assert table["FP32 teacher"]["oa_n"] == "2" and "metrics.json has seed 5, expected 1" in markdown


def test_moving_the_results_folder_keeps_finished_runs_valid(tmp_path):
    """A searched row records its qconfig path; relative to the results folder, so a move is no change."""
    run = ablate.Run("kd_qat_searched", "main_kd_qat_searched", search=True)
    before = ablate_cfg(tmp_path / "a")
    assert any(str(tmp_path / "a") in o for o in ablate.run_overrides(before, run, 0))  # the tool gets a real path
    assert ablate.run_identity(before, run, 0) == ablate.run_identity(ablate_cfg(tmp_path / "b"), run, 0)


def test_finished_runs_are_kept_and_stale_or_failed_ones_rerun(tmp_path):
    write_main(tmp_path)  # made by hand (no status file), e.g. by the equivalent hydra multirun: kept
    cfg = ablate_cfg(tmp_path)
    run = ablate.Run("qat", "main_qat")
    write_run(tmp_path, "qat", 0, fake_metrics(0, "qat", oa=90.0),
              status={"overrides": ablate.run_identity(cfg, run, 0), "returncode": 0, "reason": ""})
    write_run(tmp_path, "qat", 2, fake_metrics(2, "qat"), status={"overrides": ["seed=2"], "returncode": 0})
    write_run(tmp_path, "qat", 3, None)  # started, never finished
    assert [ablate.finished(cfg, run, s) for s in (0, 1, 2, 3, 4)] == [True, True, False, False, False]
    _, table = build(tmp_path)
    assert float(table["QAT"]["oa_mean"]) == pytest.approx((90 + 71) / 2) and table["QAT"]["oa_n"] == "2"


# ---- the tables' shapes and figures -----------------------------------------------------------------------
def test_main_table_marks_the_pareto_front_and_plots_the_validation_curves(tmp_path):
    for row, oa, ms in [("fp32", 71.0, 60.0), ("static", 69.0, 30.0), ("qat", 70.0, 31.0), ("kd_qat", 72.0, 30.5),
                        ("kd_qat_searched", 71.5, 35.0)]:
        method = {"kd_qat_searched": "kd_qat"}.get(row, row)
        for seed in (0, 1, 2):
            write_run(tmp_path, row, seed, fake_metrics(seed, method, oa=oa, ms_b32=ms), curve=[oa - 3, oa - 1])
    markdown, _ = build(tmp_path)
    assert "Pareto front (OA vs ms b=32): static PTQ, KD-QAT." in markdown
    assert "2 threads, 256 points" in markdown
    for png in ("quick_pareto.png", "quick_curves.png"):
        assert (tmp_path / "main" / png).stat().st_size > 5000 and f"]({png})" in markdown
    record = tables.read_run_dir(tmp_path / "main" / "runs" / "quick" / "qat" / "seed0", 0)
    assert record.curve == [(0, 67.0), (1, 69.0)]  # the student's epochs, from log.jsonl


def test_kd_table_is_the_alpha_by_temperature_grid_with_a_heat_map(tmp_path):
    cfg = ablate_cfg(tmp_path, "table=kd", "seeds=[0,1]")
    rows = ablate.table_rows(cfg)
    runs = ablate.runs_in_order(rows, "quick")
    assert len(rows) == 20 and len(runs) == 17  # α = 0 ignores T: one run serves its four cells
    for run in runs:
        alpha, temperature = (float(x.split("=")[1]) for x in run.extra[:2])
        assert run.extra[2:] == ("qat.weight_bits=4", "qat.activation_bits=4")  # the table's bit width
        for seed in (0, 1):
            write_run(tmp_path, run.name, seed, fake_metrics(seed, oa=50 + 10 * alpha + temperature + seed), table="kd")
    markdown, table = build(tmp_path, "table=kd", "seeds=[0,1]")
    assert md_row(markdown, "0.5")[1:] == [f"{55 + t + 0.5:.2f} ± 0.71" for t in (1, 2, 4, 8)]
    assert md_row(markdown, "0.0")[1:] == ["51.50 ± 0.71"] * 4  # the T = 1 run in every column
    assert table["α=0.75, T=8.0"]["distill.alpha"] == "0.75" and float(table["α=0.75, T=8.0"]["oa_mean"]) == 66.0
    assert (tmp_path / "kd" / "quick_heatmap.png").stat().st_size > 5000
    # each KD cell against α = 0 (no distillation), paired by seed: OA rises by 10α + T - 1 in every seed
    delta_grid = markdown[markdown.index("Δ int8 OA vs α=0.0, T=1.0"):markdown.index("All figures")]
    assert md_row(delta_grid, "0.5")[1:] == [f"{5 + t - 1:+.2f} (n=2)" for t in (1, 2, 4, 8)]
    assert "| 0.0 |" not in delta_grid
    assert float(table["α=0.5, T=4.0"]["delta_oa_vs_row_mean"]) == pytest.approx(8.0)
    assert table["α=0.0, T=4.0"]["delta_oa_vs_row_mean"] == ""  # α = 0 is the reference, not compared
    assert markdown.splitlines()[0].endswith("seeds [0, 1], qat.weight_bits=4, qat.activation_bits=4")


def test_unknown_table_row_or_profile_is_a_one_line_error(tmp_path):
    with pytest.raises(ablate.AblateError, match="table=nope: use one of main, kd, schedule, qconfig"):
        ablate.table_rows(ablate_cfg(tmp_path, "table=nope"))
    with pytest.raises(ablate.AblateError, match=r"no row \['qta'\] in table main"):
        ablate.table_rows(ablate_cfg(tmp_path, "rows=[qta]"))


def test_failure_reason_is_the_tools_error_line_or_the_exception():
    assert ablate.failure_reason("training...\nerror: dataset.root=/x: no such folder\n", 1) == \
        "error: dataset.root=/x: no such folder"
    traceback = "Error executing job with overrides: []\nTraceback:\n  File x\nRuntimeError:\n  boom\n\nSet the env\n"
    assert ablate.failure_reason(traceback, 1) == "RuntimeError: boom"
    assert ablate.failure_reason("", -9) == "exit code -9"


def test_every_row_preset_composes_with_both_profiles(tmp_path):
    """Each row's preset exists and composes with the tool it runs in, after quick and full."""
    runs = {}
    for table in ("main", "kd", "schedule", "qconfig"):
        cfg = ablate_cfg(tmp_path, f"table={table}")
        for run in ablate.runs_in_order(ablate.table_rows(cfg), "quick", shared=ablate.table_overrides(cfg)):
            runs.setdefault((run.tool, run.experiment), run)  # the kd grid: one preset, many cells
    assert len(runs) == 6 + 1 + 6 + 4  # main (its search too), kd, schedule, qconfig (sharing main's search)
    for run in runs.values():
        config_name = {"quantize.py": "quantize", "search_qconfig.py": "search_qconfig"}.get(run.tool, "train_kd_qat")
        # full: once per tool, and with the preset that swaps the qat group (its schedule keys must survive)
        full = run.experiment in ("main_static", "search_quick", "main_kd_qat", "qconfig_per_tensor")
        for profile in ("quick", "full") if full else ("quick",):
            experiment = run.experiment.replace("_quick", f"_{profile}")
            with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
                composed = compose(config_name, overrides=[f"+experiment=[{profile},{experiment}]", *run.extra])
            validate_config(composed)  # e.g. a schedule preset freezing observers before fake quant starts
            if profile == "full":
                assert composed.dataset.name == "modelnet40" and composed.model.width == 32
                assert composed.qat.freeze_observer_epoch == 15 and composed.train.epochs == 20
            if experiment == "qconfig_per_tensor":
                assert composed.qat.weight == "per_tensor" and composed.qat.weight_bits == 4  # its group and the width


# ---- W&B offline runs as a source ---------------------------------------------------------------------------
WANDB_SCRIPT = """
import sys, wandb
run = wandb.init(mode="offline", dir=sys.argv[1], project="p", tags=["ablate.main.quick.kd_qat"],
                 config={"seed": 2, "mode": "kd_qat"})
run.log({"epoch": 0, "val/oa_fakequant": 60.0})
run.log({"epoch": 1, "val/oa_fakequant": 64.0})
final = {"test/oa_int8": 66.5, "test/macc_int8": 66.0, "test/oa_fp32": 70.0, "test/oa_fakequant": 66.0,
         "test/size_mb_int8": 0.5, "test/latency_ms_int8_batch_1": 4.0}
run.log(final)
for k, v in final.items():
    run.summary[k] = v
run.finish()
"""


def test_wandb_summary_gives_the_figures_of_the_metrics_json_it_was_logged_from():
    from test_sweeps import KD_QAT_METRICS  # a committed KD-QAT run

    metrics = json.loads(KD_QAT_METRICS.read_text())
    summary = {**logged_from_metrics(metrics, "test"), **logged_from_metrics(metrics, "val")}  # what the run logged
    from_wandb, from_file = tables.figures_from_wandb(summary), tables.figures_from_metrics(metrics)
    assert {"oa", "macc", "size_mb", "ms_b1", "ms_bB", "fq_oa", "delta_oa"} <= from_wandb.keys()
    assert {k: from_file[k] for k in from_wandb} == pytest.approx(from_wandb)


def test_wandb_offline_runs_fill_the_cells_their_run_dirs_lack(tmp_path):
    wandb_dir = tmp_path / "wb"
    wandb_dir.mkdir()
    subprocess.run([sys.executable, "-c", WANDB_SCRIPT, str(wandb_dir)], check=True, env=tool_env(tmp_path),
                   capture_output=True, timeout=120)
    (offline,) = find_offline_runs(tmp_path / "wb")
    run = read_offline_run(offline)
    assert run.tags == ["ablate.main.quick.kd_qat"] and run.config["seed"] == 2 and run.exit_code == 0
    write_main(tmp_path)
    (tmp_path / "main" / "runs" / "quick" / "kd_qat" / "seed2" / "metrics.json").unlink()
    markdown, table = build(tmp_path, f"wandb_dirs=[{wandb_dir}]")
    kd = table["KD-QAT"]
    assert float(kd["oa_mean"]) == pytest.approx((70 + 71 + 66.5) / 3) and kd["oa_n"] == "3"
    assert float(kd["delta_oa_mean"]) == pytest.approx(((70 - 71) + (71 - 71) + (66.5 - 70)) / 3)
    assert kd["ms_bB_n"] == "2"  # the W&B summary holds no batch-32 latency: that cell stays at n=2
    assert md_row(markdown, "KD-QAT")[6].endswith("(n=2/3)")


# ---- end to end -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_main_table_end_to_end_on_a_tiny_config(tmp_path):
    overrides = "overrides=[" + ",".join(f"'{o}'" for o in TINY + ["dataset.test_per_class=2", "train.epochs=1"]) + "]"
    args = ["table=main", "seeds=[0]", f"results_dir={tmp_path / 'results'}", overrides]
    proc = run_tool("ablate.py", tmp_path, *args, threads=1)
    out = tmp_path / "results" / "main"
    markdown = (out / "quick.md").read_text()
    for name in ("quick.csv", "quick_pareto.png", "quick_curves.png"):
        assert (out / name).is_file(), name
    assert "FAILED" not in proc.stdout and "Missing or failed" not in markdown
    runs = out / "runs" / "quick"
    assert (runs / "search" / "seed0" / "qconfig.yaml").is_file()
    for row in MAIN_ROWS:  # each cell is its run's metrics.json
        metrics = json.loads((runs / row / "seed0" / "metrics.json").read_text())
        assert md_row(markdown, LABELS[row])[1] == f"{metrics['oa']:.2f}"
        assert md_row(markdown, LABELS[row])[-1] == "1/1"
    searched = (runs / "kd_qat_searched" / "seed0" / "config.yaml").read_text()
    assert str(runs / "search" / "seed0" / "qconfig.yaml") in searched  # the row trained with the searched spec
    again = run_tool("ablate.py", tmp_path, *args, threads=1)  # nothing is rerun, the table is rebuilt identically
    assert again.stdout.count("finished earlier, kept") == 6
    assert (out / "quick.md").read_text() == markdown
    collected = run_tool("ablate.py", tmp_path, *args, "collect_only=true")
    assert "finished earlier" not in collected.stdout and (out / "quick.md").read_text() == markdown


def run_with_fake_launch(monkeypatch, cfg, seconds: float = 0.05) -> tuple[list[Any], list[Any]]:
    """run_all with every launch replaced by a sleep; returns (the runs, the start/end events in order)."""
    events, live, lock = [], [], threading.Lock()

    def fake_launch(cfg, run, seed):
        with lock:
            live.append((seed, run.name))
            events.append(("start", seed, run.name, len(live)))
        time.sleep(seconds)
        with lock:
            live.remove((seed, run.name))
            events.append(("end", seed, run.name))
        return 0, ""

    monkeypatch.setattr(ablate, "launch", fake_launch)
    runs = ablate.runs_in_order(ablate.table_rows(cfg), cfg.profile)
    ablate.run_all(cfg, runs)
    return runs, events


def test_jobs_run_that_many_at_a_time_after_each_seeds_teacher_and_search(tmp_path, monkeypatch):
    """jobs=2: two runs at a time; but a seed's other runs wait for its first run (which trains the
    seed's teacher into the cache) and a searched row for its search."""
    runs, events = run_with_fake_launch(monkeypatch, ablate_cfg(tmp_path, "jobs=2"))
    order = [event[:3] for event in events]
    starts = [event for event in events if event[0] == "start"]
    assert sorted(e[1:3] for e in starts) == sorted((s, r.name) for s in (0, 1, 2) for r in runs)  # each once
    assert max(e[3] for e in starts) == 2
    for seed in (0, 1, 2):
        for run in runs[1:]:
            assert order.index(("start", seed, run.name)) > order.index(("end", seed, runs[0].name)), (seed, run)
        assert order.index(("start", seed, "kd_qat_searched")) > order.index(("end", seed, "search"))
    _, serial = run_with_fake_launch(monkeypatch, ablate_cfg(tmp_path / "serial"), seconds=0)
    assert {e[3] for e in serial if e[0] == "start"} == {1}


def test_every_run_gets_the_configured_torch_threads_whatever_the_machine(tmp_path, monkeypatch):
    """Figures depend on the thread count (float sums split across threads): a run is launched with
    `threads`, never the machine's default, and its status file says how many."""
    seen = []

    def fake_run(command, env=None, **kwargs):
        seen.append(env)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    run = ablate.Run("qat", "main_qat")
    for threads in (1, 3):
        for how in ("one process per run", "one hydra multirun per row"):
            cfg = ablate_cfg(tmp_path / f"{threads}{how[:3]}", f"threads={threads}")
            ablate.launch(cfg, run, 0) if how.startswith("one process") else ablate.launch_multirun(cfg, run, [0])
            status = json.loads((ablate.run_dir(cfg, run, 0) / tables.STATUS_FILE).read_text())
            assert seen[-1]["OMP_NUM_THREADS"] == str(threads) and status["threads"] == threads, how


@pytest.mark.slow
def test_launcher_runs_each_row_as_one_hydra_multirun_over_the_seeds(tmp_path):
    """`launcher=basic`: the same run directories and table, from one `-m seed=0,1` per row."""
    overrides = "overrides=[" + ",".join(f"'{o}'" for o in TINY + ["dataset.test_per_class=2", "train.epochs=1"]) + "]"
    args = ["table=main", "rows=[fp32,kd_qat]", "seeds=[0,1]", f"results_dir={tmp_path / 'results'}", overrides]
    proc = run_tool("ablate.py", tmp_path, *args, "launcher=basic", threads=1)
    assert "main/fp32 seeds [0, 1]: ok" in proc.stdout and "main/kd_qat seeds [0, 1]: ok" in proc.stdout
    runs = tmp_path / "results" / "main" / "runs" / "quick"
    assert (runs / "kd_qat" / "multirun.yaml").is_file()  # hydra's multirun record: it was one sweep
    markdown = (tmp_path / "results" / "main" / "quick.md").read_text()
    oas = [json.loads((runs / "kd_qat" / f"seed{s}" / "metrics.json").read_text())["oa"] for s in (0, 1)]
    assert md_row(markdown, "KD-QAT")[1].startswith(f"{sum(oas) / 2:.2f}") and md_row(markdown, "KD-QAT")[-1] == "2/2"
    again = run_tool("ablate.py", tmp_path, *args, "launcher=basic", threads=1)  # finished seeds are kept
    assert again.stdout.count("finished earlier, kept") == 2


# ---- paired statistics and the bits table ---------------------------------------------------------------
T_975_DF2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (tables)


def test_paired_delta_is_the_mean_difference_with_a_paired_t_interval():
    a, b = [72.0, 75.0, 71.0], [70.0, 71.0, 70.5]
    diffs = [2.0, 4.0, 0.5]
    mean, sd = sum(diffs) / 3, math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    delta = tables.paired_delta(a, b)
    assert delta.mean == pytest.approx(mean) and delta.n == 3
    assert delta.low == pytest.approx(mean - T_975_DF2 * sd / math.sqrt(3))
    assert delta.high == pytest.approx(mean + T_975_DF2 * sd / math.sqrt(3))
    assert not delta.significant and tables.format_delta(delta).endswith("]")  # the interval holds 0: no mark
    tight = tables.paired_delta([72.0, 73.0, 74.0], [70.0, 70.9, 72.1])  # the same +2 on every seed
    assert tight.significant and tables.format_delta(tight).endswith("*")
    assert tables.paired_delta([72.0, None, 74.0], [70.0, 71.0, None]).n == 1  # pairs only where both finished


BITS_ROWS = ["fp32", "static_w4a4", "qat_w4a4", "kd_qat_w4a4"]


def write_bits(results: Path, oa: dict[str, list[float]], fp32_oa=(71.0, 72.0, 70.0)) -> None:
    """Bits-table runs: every quantized run of seed s quantized the FP32 model of seed s (its teacher)."""
    for row in BITS_ROWS:
        for seed in range(3):
            method = row.split("_w")[0]
            m = fake_metrics(seed, method, oa=oa[row][seed])
            if method != "fp32":
                m["fp32"]["oa"] = fp32_oa[seed]
            m["size_mb_packed"] = 0.01 if method != "fp32" else 0.08
            write_run(results, row, seed, m, table="bits")


def test_bits_table_deltas_are_paired_over_seeds_against_fp32_and_the_compared_row(tmp_path):
    oa = {"fp32": [71.0, 72.0, 70.0], "static_w4a4": [20.0, 25.0, 15.0], "qat_w4a4": [60.0, 62.0, 58.0],
          "kd_qat_w4a4": [62.0, 63.5, 60.5]}
    write_bits(tmp_path, oa)
    markdown, table = build(tmp_path, "table=bits", f"rows=[{','.join(BITS_ROWS)}]")
    kd, qat_row = table["KD-QAT W4A4"], table["QAT W4A4"]
    expected = tables.paired_delta(oa["kd_qat_w4a4"], oa["qat_w4a4"])
    assert float(kd["delta_oa_vs_row_mean"]) == pytest.approx(sum([2.0, 1.5, 2.5]) / 3)
    assert float(kd["delta_oa_vs_row_low"]) == pytest.approx(2.0 - T_975_DF2 * 0.5 / math.sqrt(3))
    assert (float(kd["delta_oa_vs_row_low"]), float(kd["delta_oa_vs_row_high"])) == pytest.approx(
        (expected.low, expected.high))
    assert float(qat_row["delta_oa_vs_row_mean"]) == pytest.approx(40.0)  # vs static PTQ, same seeds
    assert float(kd["delta_oa_vs_fp32_mean"]) == pytest.approx(-9.0)  # each run against its own teacher
    assert float(kd["size_mb_packed_mean"]) == 0.01
    assert md_row(markdown, "KD-QAT W4A4")[5].endswith("*")  # [+0.76, +3.24] excludes zero
    assert md_row(markdown, "KD-QAT W4A4")[7] == "QAT W4A4"
    assert (tmp_path / "bits" / "quick_pareto.png").is_file()


def test_bits_table_pairs_by_seed_not_by_position_in_the_sorted_values(tmp_path):
    """Negative control of the pairing: the same values with the seeds of one row swapped change the interval."""
    oa = {"fp32": [71.0, 72.0, 70.0], "static_w4a4": [20.0, 25.0, 15.0], "qat_w4a4": [60.0, 62.0, 58.0],
          "kd_qat_w4a4": [62.0, 63.5, 60.5]}
    write_bits(tmp_path / "a", oa)
    write_bits(tmp_path / "b", {**oa, "kd_qat_w4a4": [60.5, 63.5, 62.0]})
    rows = f"rows=[{','.join(BITS_ROWS)}]"
    a, b = (build(tmp_path / x, "table=bits", rows)[1]["KD-QAT W4A4"] for x in "ab")
    assert a["delta_oa_vs_row_mean"] == b["delta_oa_vs_row_mean"] and a["oa_std"] == b["oa_std"]
    assert float(b["delta_oa_vs_row_high"]) - float(b["delta_oa_vs_row_low"]) > 3 * (
        float(a["delta_oa_vs_row_high"]) - float(a["delta_oa_vs_row_low"]))


@pytest.mark.parametrize("row", ["static_w6a8", "qat_w4a8", "kd_qat_w4a4"])
def test_bits_rows_compose_with_their_bit_preset(tmp_path, row):
    from qat import spec_from_config
    (run,) = [r.run for r in ablate.table_rows(ablate_cfg(tmp_path, "table=bits")) if r.run.name == row]
    config_name = "quantize" if run.tool == "quantize.py" else "train_kd_qat"
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        composed = compose(config_name, overrides=[f"+experiment=[quick,{run.experiment}]", *run.extra])
    validate_config(composed)
    spec = spec_from_config(composed.qat)
    assert f"w{spec.weight_bits}a{spec.activation_bits}" == row.rsplit("_", 1)[1]


def test_bits_table_mixed_row_trains_the_mixed_precision_search_of_its_seed(tmp_path):
    """The searched row of the bits table: its search runs first with the bits preset (per-layer weight bits at the
    uniform W4A8 packed size), and the row trains that seed's spec with KD, compared with KD-QAT W4A8."""
    from qat import spec_from_config
    cfg = ablate_cfg(tmp_path, "table=bits")
    rows = ablate.table_rows(cfg)
    (row,) = [r for r in rows if r.run.name == "kd_qat_mixed"]
    assert row.run.search and row.compare == "kd_qat_w4a8"
    runs = ablate.runs_in_order(rows, "quick", ablate.search_preset(cfg))
    search = runs.index(next(r for r in runs if r.name == ablate.SEARCH))
    assert runs[search].experiment == "search_bits_quick" and search < runs.index(row.run)
    assert f"qat.qconfig={ablate.run_dir(cfg, ablate.Run(ablate.SEARCH, ''), 0) / 'qconfig.yaml'}" in \
        ablate.run_overrides(cfg, row.run, 0)
    main = ablate_cfg(tmp_path, "table=main")  # negative control: the main table keeps its own search preset
    assert [r.experiment for r in ablate.runs_in_order(ablate.table_rows(main), "quick", ablate.search_preset(main))
            if r.name == ablate.SEARCH] == ["search_quick"]
    for profile in ("quick", "full"):
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            composed = compose("search_qconfig", overrides=[f"+experiment=[{profile},search_bits_{profile}]"])
            trained = compose("train_kd_qat", overrides=[f"+experiment=[{profile},{row.run.experiment}]"])
        validate_config(composed)
        assert composed.budget.packed_like == "w4a8" and 4 in composed.search.bits
        assert trained.mode == "kd_qat"
        assert spec_from_config(composed.qat).activation_bits == 8


def test_paired_delta_gives_no_interval_below_three_seeds():
    """Two seeds with the same difference (equal cloud counts) would make a zero-width 'significant' interval."""
    delta = tables.paired_delta([51.25, 54.0], [50.0, 52.75])
    assert delta.n == 2 and delta.low is None and not delta.significant
    assert tables.format_delta(delta) == "+1.25 (n=2)"


@pytest.mark.parametrize("table", ["kd", "schedule", "qconfig"])
def test_method_tables_run_every_run_and_their_search_at_the_separating_bit_width(tmp_path, table):
    cfg = ablate_cfg(tmp_path, f"table={table}")
    runs = ablate.runs_in_order(ablate.table_rows(cfg), "quick", ablate.search_preset(cfg), ablate.table_overrides(cfg))
    assert runs and all({"qat.weight_bits=4", "qat.activation_bits=4"} <= set(ablate.run_overrides(cfg, run, 0))
                        for run in runs)
    bits = ablate_cfg(tmp_path, "table=bits")  # negative control: the bits table sets the width per row
    assert ablate.table_overrides(bits) == ()
    assert {o for r in ablate.table_rows(bits) for o in r.run.extra} >= {"qat=w8a8", "qat=w4a4"}
