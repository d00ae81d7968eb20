"""Where metrics go: the console, `log.jsonl` in the run directory, and optionally W&B.

Metric names are stable (`train/loss`, `train/task_loss`, `train/kd_loss`, `train/lr`,
`val/oa_fakequant`, `val/oa_fp32`, `qat/fake_quant_fraction`, `test/oa_int8`, ...) so sweeps and
dashboards can rely on them. Library code never logs: it returns dicts that land here.
Under torchrun only rank 0 logs (console, log.jsonl, W&B); the other ranks' loggers are silent.
"""
from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() on construction (see `progress`)

from distill import distributed

__all__ = ["RunLogger", "progress"]


def progress(iterable: Iterable, desc: str) -> Iterable:
    """Progress bar over batches (tqdm; quiet when stderr is not a terminal, e.g. in CI logs, and off
    on torchrun ranks other than 0).

    It must iterate the loader exactly once: every `iter(DataLoader)` draws a worker seed from
    the loader's generator, which shifts the shuffle that follows. `tqdm.auto` (an asyncio
    subclass) creates an extra iterator up front, so a run's order would depend on whether a
    bar is drawn, and torchrun ranks with and without a bar would shard different permutations.
    """
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=None if distributed.is_main() else True)


def _wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


# What one epoch's console line shows, in order: (metric name without the phase prefix, label, format).
# Everything else (task/KD loss split, mAcc, observer and BN state, skipped steps) stays in
# log.jsonl and W&B.
_EPOCH_FIELDS = (
    ("train/loss_epoch", "loss", "{:.3f}"),
    ("val/oa_fp32", "val OA", "{:.2f}%"),
    ("val/oa_fakequant", "val OA", "{:.2f}%"),
    ("train/lr", "lr", "{:.2e}"),
    ("qat/fake_quant_fraction", "fake-quant", "{:.0%}"),
)


def epoch_line(metrics: dict[str, Any]) -> str | None:
    """One short line for an end-of-epoch record (`teacher epoch 3: loss 2.687, val OA 17.71%, ...`),
    None for any other record. A phase prefix (`teacher/`) names the phase; none means the student."""
    epoch_key = next((key for key in metrics if key == "epoch" or key.endswith("/epoch")), None)
    if epoch_key is None:
        return None
    phase = epoch_key[: -len("/epoch")] if "/" in epoch_key else "student"
    prefix = "" if phase == "student" else f"{phase}/"
    shown = [f"{label} {fmt.format(metrics[prefix + key])}" for key, label, fmt in _EPOCH_FIELDS
             if isinstance(metrics.get(prefix + key), (int, float))]
    return f"{phase} epoch {int(metrics[epoch_key]) + 1}: " + ", ".join(shown)


class RunLogger:
    """Console + `log.jsonl` always; W&B when `logger=wandb`.

    With `logger.mode=auto`, W&B runs online only when credentials are present and falls back
    to offline mode otherwise (or when the online start fails), saying where the run was saved.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, job_type: str = "train") -> None:
        self.run_dir = run_dir
        self.jsonl = run_dir / "log.jsonl"
        self.wandb_run = None
        self.enabled = distributed.is_main()  # rank 0 speaks for the job
        if cfg.logger.name == "wandb" and self.enabled:
            self.wandb_run = self._start_wandb(cfg, job_type)

    def _start_wandb(self, cfg: DictConfig, job_type: str) -> Any:
        import wandb

        mode = cfg.logger.mode
        if mode == "auto":
            mode = "online" if _wandb_credentials_present() else "offline"
        kwargs = dict(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            tags=list(cfg.logger.tags),
            job_type=job_type,
            dir=str(self.run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        try:
            run = wandb.init(mode=mode, **kwargs)
        except Exception as err:  # no network, bad key: keep the run, log offline
            if mode == "offline":
                raise
            self.console(f"W&B online start failed ({type(err).__name__}); logging offline instead")
            mode = "offline"
            run = wandb.init(mode=mode, **kwargs)
        if mode == "offline":
            self.console(f"W&B offline run saved in {run.dir}; upload later with `wandb sync {Path(run.dir).parent}`")
        return run

    def console(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One record: to log.jsonl, to W&B, and a compact line to the console."""
        if not self.enabled:
            return
        record = {"step": step, **metrics} if step is not None else dict(metrics)
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
        if self.wandb_run is not None:
            # W&B's own step must only grow, while each phase restarts its optimizer step.
            self._to_wandb(lambda run: run.log(metrics if step is None else {**metrics, "trainer/step": step}))
        line = epoch_line(metrics)
        if line:
            self.console(line)

    def _to_wandb(self, call: Any) -> None:
        """`call(run)`; a W&B failure mid-run (service gone, disk, network) stops W&B logging, not the run."""
        try:
            call(self.wandb_run)
        except Exception as err:  # whatever wandb raises: the run and log.jsonl matter more than the dashboard
            self.wandb_run = None
            self.console(f"W&B logging failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                         f"the run goes on, metrics are logged to {self.jsonl}")

    def summary(self, metrics: dict[str, Any]) -> None:
        def write(run: Any) -> None:
            for key, value in metrics.items():
                run.summary[key] = value

        if self.wandb_run is not None:
            self._to_wandb(write)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self._to_wandb(lambda run: run.finish())
