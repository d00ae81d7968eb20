"""`tools/search_qconfig.py`: its helpers, and the tool end to end on a tiny synthetic configuration."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _tools as tools
from _tools import ROOT, load_tool

tool = load_tool("search_qconfig")


from qat.search import Budget, greedy_search
from test_qat_search import fp32_count_latency
from test_qat_sensitivity import fragile_analysis

TINY = [
    "dataset.train_per_class=6", "dataset.test_per_class=3", "dataset.num_points=128",
    "model.width=8", "teacher.epochs=1", "train.batch_size=16", "train.eval_batch_size=16",
    "train.num_workers=0", "bench.threads=1", "search.latency_repeats=2", "search.options=[fp32,act:minmax]",
]
PNG = b"\x89PNG\r\n\x1a\n"


def run_tool(tmp_path: Path, *overrides: str, run_dir: str = "run", check: bool = True) -> subprocess.CompletedProcess:
    return tools.run_tool("search_qconfig.py", tmp_path, *TINY, f"hydra.run.dir={tmp_path / run_dir}", *overrides,
                          check=check, threads=1)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("search")
    run_tool(tmp_path)
    return tmp_path / "run"


# ---- helpers (fast) ---------------------------------------------------------------------------
def test_reused_neighbourhoods_give_the_same_logits_and_restore_the_functions():
    from models import create_model, neighbors

    originals = neighbors.furthest_point_sample, neighbors.ball_query
    model = create_model("pointnext-s", num_classes=4, width=8).eval()
    xyz = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(0))
    memo = neighbors.NeighborhoodMemo()
    with torch.no_grad():
        plain = model(xyz)
        with tool.reused_neighbourhoods(memo=memo):
            first = model(xyz)
        filled = len(memo)  # one FPS and one ball query per set abstraction that samples
        with tool.reused_neighbourhoods(memo=memo):
            again = model(xyz.clone())  # served from the memo: equal bytes, another tensor
    assert torch.equal(first, plain) and torch.equal(again, plain)
    assert filled == 8 and len(memo) == filled
    assert (neighbors.furthest_point_sample, neighbors.ball_query) == originals


def test_plots_and_tables_are_written_for_a_search(tmp_path):
    _, proxy, sensitivity = fragile_analysis()
    result = greedy_search(proxy, sensitivity, Budget(max_fp32_layers=1), fp32_count_latency)
    fp32 = {"latency_ms": 10.0, "size_mb": 1.0, "accuracy": 100.0}
    tool.plot_sensitivity(sensitivity, tmp_path / "sensitivity.png")
    tool.plot_pareto(result, fp32, {"batch": 1, "threads": 1}, tmp_path / "pareto.png")
    for name in ("sensitivity.png", "pareto.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    rows = list(csv.DictReader(tool.csv_table(sensitivity.rows()).splitlines()))
    assert [row["layer"] for row in rows] == [layer.name for layer in sensitivity.ranking()]


# ---- the tool end to end (slow) -----------------------------------------------------------------
@pytest.mark.slow
def test_run_directory_holds_the_spec_the_report_and_the_plots(finished_run):
    run = finished_run
    for name in ("config.yaml", "qconfig.yaml", "sensitivity.md", "sensitivity.csv", "search.json"):
        assert (run / name).is_file(), name
    for name in ("sensitivity.png", "pareto.png"):
        assert (run / name).read_bytes().startswith(PNG), name
    payload = json.loads((run / "search.json").read_text())
    for key in ("fp32", "all_int8", "chosen", "verdict", "sensitivity", "candidates", "budget", "latency"):
        assert key in payload, key
    assert payload["latency"]["threads"] == 1 and payload["chosen"]["reproduced"]["equal"]
    assert len(payload["sensitivity"]["layers"]) == 18  # every conv/linear of PointNeXt-S
    assert {"fp32_kl", "act:minmax_kl", "alone_kl", "sqnr_alone_db"} <= payload["sensitivity"]["layers"][0].keys()
    assert payload["chosen"]["fp32_layers"] <= payload["budget"]["max_fp32_layers"]
    verdict = payload["verdict"]
    assert verdict["achieved"] == ((verdict["beats_all_int8"] and verdict["latency_le_fp32"])
                                   or verdict["no_layer_matters"])
    assert verdict["statement"] in (run / "sensitivity.md").read_text()
    assert len(list(csv.DictReader((run / "sensitivity.csv").open()))) == 18


@pytest.mark.slow
def test_written_spec_reproduces_the_reported_accuracy_and_loads_in_train_kd_qat(finished_run):
    from omegaconf import OmegaConf

    from runtime import pipeline

    from runtime.config import validate_config
    import qat
    from models import load_checkpoint
    from qat.sensitivity import PTQProxy

    run = finished_run
    payload = json.loads((run / "search.json").read_text())
    cfg = OmegaConf.load(run / "config.yaml")
    d = pipeline.build_data(cfg)
    model = pipeline.build_model(cfg.teacher.model, cfg.teacher.width, cfg, d)
    load_checkpoint(model, run / "teacher" / "final.pt")
    calib, select = tool.search_batches(cfg, d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tool ran
    try:
        proxy = PTQProxy(model.eval(), calib, select)  # no neighbour memo here: it must not matter
        spec = qat.load_spec(run / "qconfig.yaml")
        scores = proxy.score(proxy.quantize(spec)[1])
    finally:
        torch.set_num_threads(threads)
    assert spec.to_dict() == payload["chosen"]["spec"]
    assert scores.accuracy == payload["chosen"]["accuracy"]
    assert scores.kl == pytest.approx(payload["chosen"]["kl"], rel=1e-4, abs=1e-9)
    cfg.qat.qconfig = str(run / "qconfig.yaml")
    validate_config(cfg)  # what tools/train_kd_qat.py qat.qconfig=PATH checks first
    qat.build_qconfig_mapping(qat.spec_from_config(cfg.qat), qat=True, model=model)


@pytest.mark.parametrize("override, message", [
    ("budget.max_fp32_layers=-1", "budget.max_fp32_layers=-1: use an integer >= 0"),
    ("search.options=[int4]", "option 'int4' is unknown"),
    ("search.calib_batches=0", "search.calib_batches=0: use an integer >= 1"),
])
def test_bad_search_config_fails_with_one_line_before_any_work(override, message):
    """validate_search_config, called before any data or teacher: the tool's one line and exit 2 for it
    are tests/test_bad_input.py's (search_bad_budget_key, end to end)."""
    from hydra import compose, initialize_config_dir
    from runtime.config import ConfigError

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        good = compose("search_qconfig", overrides=TINY)
        bad = compose("search_qconfig", overrides=[*TINY, override])
    tool.validate_search_config(good)  # negative control: TINY itself passes
    with pytest.raises(ConfigError, match=re.escape(message)):
        tool.validate_search_config(bad)


# ---- mixed precision end to end (slow) --------------------------------------------------------------
@pytest.mark.slow
def test_mixed_precision_search_fits_the_packed_budget_and_its_spec_trains_with_kd(tmp_path):
    run_tool(tmp_path, "search.bits=[8,4]", "budget.packed_mb=0.2", "search.path_evals=1", run_dir="bits")
    run = tmp_path / "bits"
    assert (run / "pareto.png").read_bytes().startswith(PNG) and (run / "mixed_precision.md").is_file()
    payload = json.loads((run / "search.json").read_text())
    chosen = payload["chosen"]
    assert chosen["packed_mb"] <= 0.2 < payload["candidates"][0]["packed_mb"]  # uniform W8 is over, the choice fits
    assert chosen["fp32_layers"] <= 2 and chosen["reproduced"]["equal"]
    assert all("oa" in c["report"] for c in payload["candidates"])  # test figures for every evaluated configuration
    assert chosen["accuracy"] == max(c["accuracy"] for c in payload["candidates"] if c["feasible"])
    spec = yaml_load(run / "qconfig.yaml")
    assert spec["weight_bits"] == 8 and any(o.get("weight_bits") == 4 for o in spec["module_overrides"].values())
    tools.run_tool("train_kd_qat.py", tmp_path, *tools.TINY, "train.epochs=1", f"qat.qconfig={run / 'qconfig.yaml'}",
                   f"hydra.run.dir={tmp_path / 'kd'}", threads=1)
    trained = (tmp_path / "kd" / "config.yaml").read_text()
    assert str(run / "qconfig.yaml") in trained and "oa" in json.loads((tmp_path / "kd" / "metrics.json").read_text())


def yaml_load(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("override, message", [
    ("search.bits=[8,4]", "search.bits needs a packed-size budget"),
    ("budget.packed_like=w4a8", "budget.packed_mb / budget.packed_like apply to the mixed-precision search"),
    ("search.bits=[8,1]", "search.bits: 1 is not a width"),
])
def test_bad_mixed_precision_config_is_refused_naming_the_field(override, message):
    from hydra import compose, initialize_config_dir
    from runtime.config import ConfigError

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        good = compose("search_qconfig", overrides=["search.bits=[8,4]", "budget.packed_like=w4a8"])
        bad = compose("search_qconfig", overrides=[override])
    tool.validate_search_config(good)  # negative control: the same keys, well set, pass
    with pytest.raises(ConfigError, match=re.escape(message)):
        tool.validate_search_config(bad)
