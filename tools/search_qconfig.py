"""Per-layer quantization sensitivity and a qconfig search for an FP32 PointNeXt.

    python tools/search_qconfig.py                                        # the (cached) synthetic teacher
    python tools/search_qconfig.py teacher.ckpt=PATH budget.max_fp32_layers=3
    python tools/search_qconfig.py budget.max_latency_ratio=1.1 budget.max_size_mb=1.0
    python tools/search_qconfig.py 'search.bits=[8,6,4,fp32]' budget.packed_like=w4a8   # mixed precision
    python tools/train_kd_qat.py qat.qconfig=<run dir>/qconfig.yaml       # then KD-QAT with the chosen spec

Mixed precision (`search.bits`, qat/mixed.py, where the sensitivity measure is justified): per-layer
weight bits (and FP32 where it pays) under a packed-size budget, activations at qat.activation_bits;
writes qconfig.yaml, mixed_precision.md (every configuration evaluated, val and test accuracy),
pareto.png (val and test accuracy against packed size) and search.json. The rest of this docstring
is the per-layer FP32 / observer search (the default, `search.bits=null`).

Static PTQ is the fast proxy (qat/sensitivity.py): every configuration is calibrated on training
clouds, converted to int8 and scored on the val split (carved from the training clouds,
`dataset.val_fraction`; the search refuses to run without one). The test split is read once, after
the choice, for the held-out figures of FP32 / all-int8 / searched. Writes into the hydra run directory:
qconfig.yaml (the chosen spec, reloaded and re-scored before the run ends), sensitivity.md /
sensitivity.csv (layers ranked), sensitivity.png, pareto.png (accuracy vs latency and size of every
configuration evaluated), search.json (everything measured), config.yaml (resolved), and
log.jsonl + teacher/ when the FP32 model was trained in this run.
"""
from __future__ import annotations

import contextlib
import csv
import io
import itertools
import math
from pathlib import Path
from typing import Any, Iterator


import hydra
import matplotlib
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

import data
import qat
from distill import seed_everything
from models import neighbors
from qat.search import Budget, Candidate, SearchResult, greedy_search, serialized_size_mb
from qat.mixed import FP32_BITS, bits_sensitivity, choose, evaluate, greedy_path
from qat.mixed import packed_like_mb, parse_widths
from qat.sensitivity import PTQProxy, Sensitivity, analyse, option_choice
from runtime.logger import RunLogger
from runtime.measure import latency_ms
from runtime import pipeline, tables
from runtime.config import ConfigError, check_overrides, pick_device, validate_config, wants_resume
from runtime.exits import hydra_entry, main_guard
from runtime.rundir import RunDirectory, remove_if_empty
from runtime.workflow import calibration_loader


@hydra.main(config_path="../configs", config_name="search_qconfig", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # bad config, data or checkpoint: one line, exit 2, no run directory left (runtime/exits.py)
    main_guard(lambda: run(cfg), on_user_error=lambda: remove_if_empty(HydraConfig.get().runtime.output_dir))


# ---- set-up ----------------------------------------------------------------------------------
def validate_search_config(cfg: DictConfig) -> Budget:
    """The budget, after checking every search key; ConfigError names the key and the fix."""
    try:
        budget = Budget(**OmegaConf.to_container(cfg.budget))
        for label in cfg.search.options or []:
            option_choice(label)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    s = cfg.search
    for key, low, nullable in (("calib_batches", 1, False), ("eval_batches", 1, True), ("top_k", 1, True),
                               ("max_evals", 1, True), ("latency_batch", 1, False), ("latency_repeats", 1, False),
                               ("sqnr_clouds", 0, False)):
        value = s[key]
        if (value is None and not nullable) or (value is not None and (not isinstance(value, int) or value < low)):
            raise ConfigError(f"search.{key}={value}: use an integer >= {low}{' or null' if nullable else ''}")
    if not 0 <= s.min_kl_gain < 1:
        raise ConfigError(f"search.min_kl_gain={s.min_kl_gain}: use a fraction in [0, 1)")
    if s.get("bits"):
        try:
            parse_widths(list(s.bits))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if budget.packed_mb is None and budget.packed_like is None:
            raise ConfigError("search.bits needs a packed-size budget: set budget.packed_mb=MB or budget.packed_like=w4a8")
        for key in ("max_latency_ratio", "max_size_mb"):
            if getattr(budget, key) is not None:
                raise ConfigError(f"budget.{key}: not used by the mixed-precision search (every integer width runs on "
                                  "the same int8 kernels; FP32 layers are bounded by budget.max_fp32_layers); set it to null")
        if not isinstance(s.path_evals, int) or s.path_evals < 0:
            raise ConfigError(f"search.path_evals={s.path_evals}: use an integer >= 0")
    elif budget.packed_mb is not None or budget.packed_like is not None:
        raise ConfigError("budget.packed_mb / budget.packed_like apply to the mixed-precision search: "
                          "set search.bits (e.g. [8,6,4,fp32]) or remove them")
    if not cfg.dataset.get("val_fraction"):
        raise ConfigError("dataset.val_fraction=0: the search selects on the val split and never on test; "
                          "set dataset.val_fraction (e.g. 0.1)")
    return budget


@contextlib.contextmanager
def reused_neighbourhoods(enabled: bool = True, memo: neighbors.NeighborhoodMemo | None = None) -> Iterator[None]:
    """FPS and ball query computed once per distinct cloud, through `models.neighbors.shared_neighborhoods`.

    Exact: both depend only on coordinates, and every configuration sees the same float xyz
    (quantization never touches coordinates; they reach the neighbour leaves in float), so
    scoring ~100 configurations on the same clouds would recompute the same indices, which is
    most of a forward on CPU. Pass the same `memo` to every block to share it between them;
    default: a new one for this block. End-to-end latency is timed without it.
    """
    if not enabled:
        yield
        return
    with neighbors.shared_neighborhoods(memo):
        yield


def search_batches(cfg: DictConfig, d: pipeline.Data) -> tuple[list, list]:
    """(calibration inputs, selection (inputs, labels)): everything the search chooses with.

    Calibration: the first `search.calib_batches` batches of the un-augmented training clouds
    (the same loader as static PTQ in tools/quantize.py). Selection: the val split, cut to its
    first `search.eval_batches` batches. No test cloud: those are `report_batches`, read after.
    """
    calib = [(b["xyz"], b["feats"]) for b in itertools.islice(calibration_loader(cfg), cfg.search.calib_batches)]
    select = list(range(len(d.val)))
    if cfg.search.eval_batches is not None:
        select = select[: cfg.search.eval_batches * cfg.train.eval_batch_size]
    return calib, _scoring_batches(cfg, d.val, select)


def report_batches(cfg: DictConfig, d: pipeline.Data) -> list:
    """The whole test split as (inputs, labels): read once, after the choice, for the held-out figures."""
    return _scoring_batches(cfg, d.test, list(range(len(d.test))))


def _scoring_batches(cfg: DictConfig, split: Any, indices: list[int]) -> list:
    loader = data.build_loader(torch.utils.data.Subset(split, indices), cfg.train.eval_batch_size, shuffle=False)
    return [((b["xyz"], b["feats"]), b["label"]) for b in loader]


def report_metrics(model: torch.nn.Module, batches: list, num_classes: int, reuse: bool,
                   memo: neighbors.NeighborhoodMemo) -> dict[str, float]:
    """OA / mAcc (percent) on the held-out test split."""
    with reused_neighbourhoods(reuse, memo), torch.no_grad():
        preds = torch.cat([model(*inputs).argmax(dim=1) for inputs, _ in batches])
    result = data.classification_metrics(preds, torch.cat([labels for _, labels in batches]), num_classes)
    return {"oa": result["oa"], "macc": result["macc"]}


# ---- the run ---------------------------------------------------------------------------------
def run(cfg: DictConfig) -> None:
    # ---- set-up: validate everything before any work, then data and logging -------------------
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    validate_config(cfg)
    budget = validate_search_config(cfg)
    check_overrides(cfg, HydraConfig.get().overrides.task)
    owner = RunDirectory.open(run_dir, cfg, resume=wants_resume(cfg))  # locked, never clobbered (runtime/rundir.py)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    d = pipeline.build_data(cfg)
    pipeline.check_teacher_ckpt(cfg, d)
    owner.write_config(cfg)  # every check passed: the first byte written
    logger = RunLogger(cfg, run_dir, job_type="search")

    # ---- the FP32 model and the clouds every configuration is calibrated and scored on ----------
    fp32, source = pipeline.obtain_teacher(cfg, d, run_dir, logger, device)
    fp32 = fp32.cpu().eval()
    logger.console(f"FP32 model: {cfg.teacher.model} width {cfg.teacher.width}, {source}")
    calib, select = search_batches(cfg, d)
    reuse, memo = bool(cfg.search.reuse_neighbourhoods), neighbors.NeighborhoodMemo()  # one memo for every pass over these clouds
    logger.console(f"calibration {clouds(calib)} training clouds, selection {clouds(select)} val clouds")
    proxy = PTQProxy(fp32, calib, select, context=lambda: reused_neighbourhoods(reuse, memo))
    base_spec = qat.spec_from_config(cfg.qat)
    if cfg.search.get("bits"):
        run_bits(cfg, run_dir, d, fp32, proxy, base_spec, budget, logger, (calib, select), (reuse, memo))
        return
    batch, threads, network_only = cfg.search.latency_batch, cfg.bench.threads, bool(cfg.search.latency_network_only)
    timing_memo = neighbors.NeighborhoodMemo()  # latency_ms draws the same seeded clouds every call

    def measure_latency(model: torch.nn.Module, network: bool = network_only) -> float:
        """Median ms at `batch`; `network`: neighbour search memoised (computed once, in a warm-up run),
        so only what the configurations differ in is timed (the search is the same for all of them)."""
        with reused_neighbourhoods(network, timing_memo):
            return latency_ms(model, d.num_points, d.in_channels, (batch,), threads, cfg.search.latency_repeats,
                              seed=cfg.seed)[f"batch_{batch}"]

    # ---- sensitivity (static PTQ proxy), then the greedy search judged on int8 models ----------
    sensitivity = analyse(proxy, base_spec, options=cfg.search.options, quantize_alone=cfg.search.quantize_alone,
                          sqnr_clouds=cfg.search.sqnr_clouds, progress=logger.console)
    result = greedy_search(proxy, sensitivity, budget, measure_latency, top_k=cfg.search.top_k,
                           max_evals=cfg.search.max_evals, min_kl_gain=cfg.search.min_kl_gain, progress=logger.console)
    if not result.best.feasible:
        raise ConfigError(f"no configuration fits the budget (all-int8: {result.base.note}); relax budget.*")

    # ---- the chosen spec on disk, reloaded and re-scored: it is exactly the one evaluated -------
    spec_path = qat.save_spec(result.best.spec, run_dir / "qconfig.yaml")
    reloaded = qat.load_spec(spec_path)
    _, int8_reloaded = proxy.quantize(reloaded)
    reproduced = proxy.score(int8_reloaded)
    same = reloaded.to_dict() == result.best.spec.to_dict() and reproduced == result.best.scores
    if not same:  # kept in search.json and said loudly; the tests assert it never happens
        logger.console(f"WARNING: {spec_path} re-scores {reproduced}, the search measured {result.best.scores}")

    # ---- FP32 / all-int8 / searched side by side, on the val selection and the held-out test split --
    report = report_batches(cfg, d)  # the first test cloud the search reads: the choice is made

    def held_out(model: torch.nn.Module) -> dict[str, float]:
        return report_metrics(model, report, d.num_classes, reuse, memo)

    int8_base = proxy.quantize(result.base.spec)[1]
    summary = {
        "fp32": {**proxy.fp32.to_dict(), "report": held_out(fp32), "latency_ms": measure_latency(fp32),
                 "latency_end_to_end_ms": measure_latency(fp32, network=False), "size_mb": serialized_size_mb(fp32)},
        "all_int8": {**candidate_figures(result.base), "report": held_out(int8_base),
                     "latency_end_to_end_ms": measure_latency(int8_base, network=False)},
        "chosen": {**candidate_figures(result.best), "report": held_out(int8_reloaded),
                   "latency_end_to_end_ms": measure_latency(int8_reloaded, network=False),
                   "reproduced": {**reproduced.to_dict(), "equal": same}},
    }
    payload = {
        "method": "search", "model": cfg.teacher.model, "width": cfg.teacher.width, "dataset": cfg.dataset.name,
        "seed": cfg.seed, "num_points": d.num_points, "spec_path": spec_path.name,
        "data": {"calib_clouds": clouds(calib), "select_clouds": clouds(select), "report_clouds": clouds(report)},
        "latency": {"threads": threads, "batch": batch, "repeats": cfg.search.latency_repeats,
                    "network_only": network_only, "what": (
                        "median ms of the converted model (eager), "
                        + ("neighbour search excluded (memoised: the same for every configuration)" if network_only
                           else "end to end, neighbour search included"))},
        "search": OmegaConf.to_container(cfg.search, resolve=True), "budget": budget.to_dict(), **summary,
        "verdict": make_verdict(sensitivity, result, summary), "sensitivity": sensitivity.to_dict(),
        "candidates": result.to_dict()["candidates"],
    }

    # ---- report: Markdown + CSV ranking, plots, everything as JSON -------------------------------
    (run_dir / "sensitivity.md").write_text(markdown_report(payload, sensitivity, result))
    (run_dir / "sensitivity.csv").write_text(csv_table(sensitivity.rows()))
    plot_sensitivity(sensitivity, run_dir / "sensitivity.png")
    plot_pareto(result, summary["fp32"], payload["latency"], run_dir / "pareto.png")
    pipeline.write_json(run_dir / "search.json", payload)
    logger.summary({"search/accuracy": result.best.scores.accuracy, "search/latency_ms": result.best.latency_ms})
    logger.finish()
    logger.console(payload["verdict"]["statement"])
    logger.console(f"spec: {spec_path}  report: {run_dir / 'sensitivity.md'}")


def run_bits(cfg: DictConfig, run_dir: Path, d: pipeline.Data, fp32: torch.nn.Module, proxy: PTQProxy,
             base_spec: qat.QConfigSpec, budget: Budget, logger: RunLogger, batches: tuple[list, list],
             reuse_memo: tuple[bool, neighbors.NeighborhoodMemo]) -> None:
    """The mixed-precision search (`search.bits`, qat/mixed.py): per-layer weight bits under a packed budget.

    Chooses on val only (sensitivity, greedy, the int8 check); then reads the test split once
    (`report_batches`) for the held-out accuracy of every configuration it evaluated.
    """
    widths = parse_widths(list(cfg.search.bits))
    try:
        budget_mb = budget.packed_mb or packed_like_mb(fp32, base_spec, budget.packed_like)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    logger.console(f"mixed precision over weight widths {widths} (32 = FP32), activations {base_spec.activation_bits} "
                   f"bits, budget {budget_mb:.4f} MB packed" + (f" (= {budget.packed_like})" if budget.packed_like else ""))

    # ---- choose, on val: sensitivity, greedy path, int8 check of the evaluated configurations ----
    sens = bits_sensitivity(proxy, base_spec, widths, progress=logger.console)
    try:
        path = greedy_path(sens, budget_mb, budget.max_fp32_layers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    candidates = evaluate(proxy, sens, path, budget_mb, budget.max_fp32_layers, cfg.search.path_evals,
                          progress=logger.console)
    try:
        best = choose(candidates)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    spec_path = qat.save_spec(best.spec, run_dir / "qconfig.yaml")
    reloaded = qat.load_spec(spec_path)
    reproduced = proxy.score(proxy.quantize(reloaded)[1])
    same = reloaded.to_dict() == best.spec.to_dict() and reproduced == best.scores
    if not same:
        logger.console(f"WARNING: {spec_path} re-scores {reproduced}, the search measured {best.scores}")

    # ---- report: the choice is made; the test split is read once for every evaluated configuration --
    report = report_batches(cfg, d)
    reuse, memo = reuse_memo

    def held_out(model: torch.nn.Module) -> dict[str, float]:
        return report_metrics(model, report, d.num_classes, reuse, memo)

    fp32_entry = {"label": "FP32", **proxy.fp32.to_dict(), "packed_mb": qat.packed_size_mb(fp32, None),
                  "report": held_out(fp32)}
    evaluated = [{**c.to_dict(), "chosen": c is best, "report": held_out(c.int8)} for c in candidates]
    calib, select = batches
    payload = {
        "method": "search_bits", "model": cfg.teacher.model, "width": cfg.teacher.width, "dataset": cfg.dataset.name,
        "seed": cfg.seed, "num_points": d.num_points, "spec_path": spec_path.name, "budget": budget.to_dict(),
        "budget_mb": budget_mb, "widths": widths, "activation_bits": base_spec.activation_bits,
        "data": {"calib_clouds": clouds(calib), "select_clouds": clouds(select), "report_clouds": clouds(report)},
        "search": OmegaConf.to_container(cfg.search, resolve=True), "fp32": fp32_entry,
        "chosen": {**evaluated[candidates.index(best)], "reproduced": {**reproduced.to_dict(), "equal": same}},
        "candidates": evaluated, "greedy_path": path, "sensitivity": sens.rows(),
    }
    (run_dir / "mixed_precision.md").write_text(bits_markdown(payload))
    plot_bits_pareto(payload, run_dir / "pareto.png")
    pipeline.write_json(run_dir / "search.json", payload)
    logger.summary({"search/accuracy": best.scores.accuracy, "search/size_mb_packed": best.packed_mb})
    logger.finish()
    logger.console(f"chosen: {best.label}, val {best.scores.accuracy:.2f} %, test {payload['chosen']['report']['oa']:.2f} %, "
                   f"{best.packed_mb:.4f} MB packed (budget {budget_mb:.4f})")
    logger.console(f"spec: {spec_path}  report: {run_dir / 'mixed_precision.md'}")


def bits_markdown(payload: dict[str, Any]) -> str:
    """The mixed-precision report: every evaluated configuration, the chosen spec, the layers' sensitivities."""
    acts = payload["activation_bits"]
    lines = [
        f"# Mixed-precision search: {payload['model']} width {payload['width']} on {payload['dataset']}",
        "",
        f"Weight widths {payload['widths']} (32 = FP32), activations {acts} bits; budget "
        f"{payload['budget_mb']:.4f} MB packed (bits × parameters + scales, qat/export.py: packed_size_mb)"
        + (f", the size of uniform {payload['budget']['packed_like']}" if payload["budget"]["packed_like"] else "")
        + f", at most {payload['budget']['max_fp32_layers']} FP32 layers. Static PTQ on "
        f"{payload['data']['calib_clouds']} training clouds; chosen on {payload['data']['select_clouds']} val clouds "
        f"(the most accurate int8 model within budget); the {payload['data']['report_clouds']} test clouds were read "
        "once, after the choice, for the `test OA` column only. Sensitivity and greedy: qat/mixed.py.",
        "",
        "| configuration | packed MB | within budget | FP32 layers | val OA % | val KL | predicted KL | test OA % "
        "| test mAcc % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    f = payload["fp32"]
    lines.append(f"| FP32 | {f['packed_mb']:.4f} | | all | {f['accuracy']:.2f} | 0 | | {f['report']['oa']:.2f} "
                 f"| {f['report']['macc']:.2f} |")
    for c in payload["candidates"]:
        name = f"**{c['label']} (chosen)**" if c["chosen"] else c["label"]
        lines.append(f"| {name} | {c['packed_mb']:.4f} | {'yes' if c['feasible'] else 'no'} | {c['fp32_layers']} | "
                     f"{c['accuracy']:.2f} | {_cell(c['kl'])} | {_cell(c['predicted_kl'])} | {c['report']['oa']:.2f} "
                     f"| {c['report']['macc']:.2f} |")
    chosen = payload["chosen"]
    lines += ["", f"Chosen spec (`{payload['spec_path']}`, reloaded and re-scored equal: "
              f"{chosen['reproduced']['equal']}); layers not at {max(w for w in payload['widths'] if w != FP32_BITS)} "
              f"bits: {chosen['assignment'] or 'none'}", "", "```yaml",
              yaml.safe_dump(chosen["spec"], sort_keys=False).rstrip(), "```", "", "## Layers, most sensitive first", "",
              "`s_wB`: KL(FP32 ‖ int8) added on val when only this layer's weights go to B bits in the uniform model "
              "(negative for fp32: removed); `mb_wB`: packed MB that change adds.", ""]
    rows = payload["sensitivity"]
    columns = list(rows[0]) if rows else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_bits_pareto(payload: dict[str, Any], path: Path) -> None:
    """Val and test accuracy against packed size for every configuration evaluated (runtime/tables.py's plot)."""
    def record(entry: dict[str, Any]) -> tables.Record:
        return tables.Record("ok", {"size_mb_packed": entry["packed_mb"], "val_oa": entry["accuracy"],
                                    "oa": entry["report"]["oa"]})

    rows = [("FP32", [record(payload["fp32"])])]
    rows += [(c["label"] + (" (chosen)" if c["chosen"] else ""), [record(c)]) for c in payload["candidates"]]
    tables.plot_pareto(rows, path, "", f"mixed precision, budget {payload['budget_mb']:.3f} MB packed "
                       f"({len(payload['candidates'])} int8 configurations + FP32)", x_key="size_mb_packed",
                       x_label="packed size, MB (bits × parameters + scales)",
                       y_keys=(("val_oa", "val OA % (chooses)"), ("oa", "test OA % (report only)")))


def clouds(batches: list) -> int:
    """Clouds in calibration batches (tuples of inputs) or scoring batches ((inputs, labels))."""
    return sum(len(b[1]) if isinstance(b[0], tuple) else len(b[0]) for b in batches)


def candidate_figures(candidate: Candidate) -> dict[str, Any]:
    return {**candidate.scores.to_dict(), "latency_ms": candidate.latency_ms, "size_mb": candidate.size_mb,
            "fp32_layers": candidate.fp32_layers, "spec": candidate.spec.to_dict(), "index": candidate.index}


def make_verdict(sensitivity: Sensitivity, result: SearchResult, summary: dict[str, Any]) -> dict[str, Any]:
    """The honesty check: the searched spec beats all-int8 in accuracy at no more latency than FP32,
    or no layer matters: neither the all-int8 model nor any layer quantized alone is worse than FP32
    beyond noise (McNemar's test, `Scores.worse_than_fp32`)."""
    best, base, fp32 = result.best.scores, result.base.scores, sensitivity.fp32
    matter = sensitivity.layers_that_matter()
    beats = best.accuracy > base.accuracy
    fast = result.best.latency_ms <= summary["fp32"]["latency_ms"]
    nothing_lost = not base.worse_than_fp32()
    changes = ", ".join(f"{layer}: {label}" for layer, label in result.best.assignment.items()) or "none (all int8)"
    figures = (f"FP32 {fp32.accuracy:.2f} %, all-int8 {base.accuracy:.2f} %, searched {best.accuracy:.2f} % on "
               f"{sensitivity.clouds} selection clouds (one cloud = {sensitivity.one_cloud:.2f} points); "
               f"held-out test split: "
               f"FP32 {summary['fp32']['report']['oa']:.2f} %, all-int8 {summary['all_int8']['report']['oa']:.2f} %, "
               f"searched {summary['chosen']['report']['oa']:.2f} %; KL to FP32 {base.kl:.3g} -> {best.kl:.3g}; "
               f"{result.best.latency_ms:.1f} ms vs FP32 {summary['fp32']['latency_ms']:.1f} ms")
    if beats and fast:
        statement = f"the searched spec beats all-int8 at no more latency than FP32: {figures}; changes: {changes}"
    elif nothing_lost and not matter:
        statement = (f"no layer matters: neither all-int8 (lost {base.lost}, gained {base.gained} clouds against "
                     f"FP32) nor any layer quantized alone is worse than FP32 beyond noise, so there is no accuracy "
                     f"to recover: {figures}; changes kept for a lower KL: {changes}")
    else:
        statement = (f"not achieved: layers {matter or '(none singly)'} matter, but no configuration within the "
                     f"budget beat all-int8 at FP32 latency or better: {figures}; changes: {changes}")
    return {"beats_all_int8": beats, "latency_le_fp32": fast, "int8_loses_nothing": nothing_lost,
            "layers_that_matter": matter, "no_layer_matters": nothing_lost and not matter,
            "achieved": (beats and fast) or (nothing_lost and not matter), "statement": statement}


# ---- report files ----------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def csv_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: _cell(row.get(k)) for k in columns} for row in rows])
    return out.getvalue()


def markdown_report(payload: dict[str, Any], sensitivity: Sensitivity, result: SearchResult) -> str:
    lat = payload["latency"]
    lines = [
        f"# Quantization sensitivity: {payload['model']} width {payload['width']} on {payload['dataset']}",
        "",
        f"Static PTQ proxy: {payload['data']['calib_clouds']} calibration clouds (training split), scored on "
        f"{payload['data']['select_clouds']} selection clouds (the val split, carved from the training clouds); the "
        f"{payload['data']['report_clouds']} test clouds are held out for the `held-out OA` column. "
        f"KL: mean KL(FP32 ‖ int8) of the logits, nats. `ms`: {lat['what']}; `ms end to end`: neighbour search "
        f"included; both at batch {lat['batch']} with bench.threads={lat['threads']}. "
        "Size: serialized state dict.",
        "",
        f"**Verdict.** {payload['verdict']['statement']}.",
        "",
        "| model | accuracy % | lost / gained vs FP32 | agreement % | KL | held-out OA % | held-out mAcc % | ms "
        "| ms end to end | MB | FP32 layers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, key in (("FP32", "fp32"), ("all-int8", "all_int8"), ("searched", "chosen")):
        m = payload[key]
        cells = [f"{m['accuracy']:.2f}", f"{m['lost']} / {m['gained']}", f"{m['agreement']:.2f}", _cell(m["kl"]),
                 f"{m['report']['oa']:.2f}", f"{m['report']['macc']:.2f}", f"{m['latency_ms']:.1f}",
                 f"{m['latency_end_to_end_ms']:.1f}", f"{m['size_mb']:.3f}", str(m.get("fp32_layers", "all"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Searched spec (`{payload['spec_path']}`), {len(result.candidates)} configurations evaluated:", "",
              "```yaml", yaml.safe_dump(result.best.spec.to_dict(), sort_keys=False).rstrip(), "```", "",
              "## Layers, most sensitive first", "",
              "`alone`: only this layer int8, the rest FP32; `lost` / `gained`: clouds it gets wrong / right "
              "against FP32; `matters`: worse than FP32 beyond noise (McNemar, ~95 %). `SQNR in int8`: its output "
              "in the all-int8 model. `<option>_kl`: KL of the all-int8 model with only this layer changed "
              f"(all-int8 KL {_cell(sensitivity.base.kl)}, accuracy {sensitivity.base.accuracy:.2f} %).", ""]
    rows = sensitivity.rows()
    columns = [c for c in rows[0] if not c.endswith("_accuracy") or c == "alone_accuracy"] if rows else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_sensitivity(sensitivity: Sensitivity, path: Path) -> None:
    """Bars per layer, most sensitive on top: KL when quantized alone, and the KL its best option removes."""
    ranked = sensitivity.ranking()
    names = [layer.name for layer in ranked][::-1]
    alone = [layer.alone.kl if layer.alone else 0.0 for layer in ranked][::-1]
    best = [layer.best_option(sensitivity.base) for layer in ranked][::-1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 1.8), sharey=True)
    axes[0].barh(names, [max(v, 1e-12) for v in alone], color="tab:red")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("KL(FP32 ‖ int8) with only this layer quantized")
    colours = {None: "lightgrey", "fp32": "tab:blue"}
    axes[1].barh(names, [gain for _, gain in best], color=[colours.get(label, "tab:green") for label, _ in best])
    for y, (label, gain) in enumerate(best):
        axes[1].text(gain, y, f" {label or 'none'}", va="center", fontsize=7)
    axes[1].set_xlabel("KL removed from the all-int8 model by the best option (blue: fp32)")
    fig.suptitle("Per-layer quantization sensitivity (static PTQ proxy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(result: SearchResult, fp32: dict[str, Any], lat: dict[str, Any], path: Path) -> None:
    """Val accuracy against latency for every configuration evaluated, FP32 beside (runtime/tables.py's plot)."""
    what = "network latency" if lat.get("network_only") else "latency"

    def label(c: Candidate) -> str:
        name = "all-int8" if c is result.base else f"#{c.index}"
        name += " (searched)" if c is result.best else ""
        return name + ("" if c.feasible else " (over budget)")

    rows = [(label(c), [tables.Record("ok", {"latency_ms": c.latency_ms, "oa": c.scores.accuracy})])
            for c in result.candidates]
    rows.append(("FP32", [tables.Record("ok", {"latency_ms": fp32["latency_ms"], "oa": fp32["accuracy"]})]))
    tables.plot_pareto(rows, path, lat["batch"], f"{len(result.candidates)} configurations evaluated (converted int8)",
                       x_key="latency_ms", x_label=f"{what}, ms (batch {lat['batch']}, bench.threads={lat['threads']})",
                       y_keys=(("oa", "val accuracy on the selection clouds, %"),))


if __name__ == "__main__":
    hydra_entry(main)
