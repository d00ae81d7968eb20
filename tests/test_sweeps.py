"""configs/sweep/*.yaml: valid W&B sweeps over real config keys, optimising a metric the training logs.

Checked offline: W&B's own sweep-config validation (the `sweeps` package the W&B server uses),
the parameters against the composed hydra config of tools/train_kd_qat.py, every combination of
their values against the tool's own config validation, and the metric against the names the
tool passes to its logger (read from its source, so renaming a metric breaks this test).
"""
import ast
import itertools
import json
import sys
from pathlib import Path

import pytest
import sweeps
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from _tools import ROOT, TINY, run_tool

from runtime import pipeline

from runtime.config import ConfigError, validate_config
from runtime.metric_names import logged_from_metrics
from runtime.wandb_offline import find_offline_runs, read_offline_run

SWEEPS = sorted((ROOT / "configs" / "sweep").glob("*.yaml"))
_ABSENT = object()


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def fixed_args(sweep: dict) -> list[str]:
    """The command's literal hydra arguments (everything but W&B's ${...} macros)."""
    return [arg for arg in sweep["command"] if not arg.startswith("${")]


def compose_train(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train_kd_qat", overrides=overrides)


def candidates(spec: dict) -> list:
    """Values a parameter can take: its list, its constant, or the ends of its range."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


# A committed KD-QAT run's metrics.json: what tools/train_kd_qat.py translates into logged names.
KD_QAT_METRICS = sorted(ROOT.glob("results/*/runs/**/kd_qat*/**/metrics.json"))[0]


def logged_metric_names() -> set[str]:
    """The final names tools/train_kd_qat.py logs: runtime/metric_names.py's translation of a committed
    KD-QAT metrics.json (test and val), which the tool hands to its logger (checked from its source below)."""
    metrics = json.loads(KD_QAT_METRICS.read_text())
    return set(logged_from_metrics(metrics, "test")) | set(logged_from_metrics(metrics, "val"))


def translated_splits() -> set[str]:
    """The splits tools/train_kd_qat.py passes to `logged_from_metrics(metrics, split)`, from its AST."""
    tree = ast.parse((ROOT / "tools" / "train_kd_qat.py").read_text())
    return {node.args[1].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "logged_from_metrics"
            and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)}


def test_there_are_sweeps_and_the_training_logs_named_metrics():
    assert len(SWEEPS) >= 3
    assert {"test/oa_int8", "val/oa_int8"} <= logged_metric_names()
    assert translated_splits() == {"test", "val"}  # the tool logs both splits through the one mapping


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_passes_wandbs_own_validation(path):
    sweep = load(path)
    assert sweeps.schema_violations_from_proposed_config(sweep) == []
    config = sweeps.SweepConfig(sweep)  # raises jsonschema.ValidationError on what W&B would reject
    assert sweeps.next_run(config, []) is not None  # and W&B's controller can propose a first run


def test_wandb_validation_rejects_a_broken_sweep():
    """The check above can fail: a misspelt method and an inverted range are reported."""
    broken = load(SWEEPS[0]) | {"method": "bayesian"}
    broken["parameters"] = {"distill.alpha": {"min": 1.0, "max": 0.0}}
    assert len(sweeps.schema_violations_from_proposed_config(broken)) >= 2


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_runs_the_training_tool_with_hydra_key_value_arguments(path):
    sweep = load(path)
    assert sweep["program"] == "tools/train_kd_qat.py" and (ROOT / sweep["program"]).is_file()
    assert sweep["command"][:3] == ["${env}", "${interpreter}", "${program}"]
    assert sweep["command"][-1] == "${args_no_hyphens}"  # key=value, what hydra parses
    assert "logger=wandb" in fixed_args(sweep)  # otherwise the run never reports to the sweep


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_metric_is_one_the_training_logs(path):
    metric = load(path)["metric"]
    assert metric["name"] in logged_metric_names()
    assert metric["name"].startswith("val/")  # chosen on the val split; test is only reported
    assert metric["goal"] == "maximize"  # all our sweep metrics are accuracies


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_parameter_is_a_key_of_the_composed_config(path):
    sweep = load(path)
    cfg = compose_train(fixed_args(sweep))
    for name in sweep["parameters"]:
        assert OmegaConf.select(cfg, name, default=_ABSENT) is not _ABSENT, f"{path.name}: {name} is no config key"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_the_agents_arguments_compose_and_every_combination_validates(path):
    """The exact strings W&B's agent builds compose with hydra, and no value combination is rejected
    by the tool's config validation (e.g. observers frozen before fake quant starts)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = load(path)
    proposal = sweeps.next_run(sweeps.SweepConfig(sweep), [])
    args = create_sweep_command_args({"args": proposal.config})["args_no_hyphens"]
    cfg = compose_train(fixed_args(sweep) + args)
    validate_config(cfg)
    names = list(sweep["parameters"])
    for values in itertools.product(*(candidates(sweep["parameters"][n]) for n in names)):
        for name, value in zip(names, values):
            OmegaConf.update(cfg, name, value, merge=False)
        try:
            validate_config(cfg)
        except ConfigError as err:
            pytest.fail(f"{path.name}: {dict(zip(names, values))} is rejected: {err}")


@pytest.mark.slow
def test_a_tiny_training_run_puts_the_sweep_metric_in_its_wandb_summary(tmp_path):
    """End to end, offline: what the sweep optimises is really in the W&B run the tool writes."""
    run_dir = tmp_path / "run"
    # one epoch each: the property is where the figure goes, not how good it is
    run_tool("train_kd_qat.py", tmp_path, *TINY, "teacher.epochs=1", "train.epochs=1", "logger=wandb",
             f"hydra.run.dir={run_dir}")
    (offline,) = find_offline_runs(run_dir)
    summary = read_offline_run(offline).summary
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for path in SWEEPS:
        assert summary[load(path)["metric"]["name"]] == pytest.approx(metrics["val"]["oa"])
