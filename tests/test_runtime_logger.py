"""The run logger: W&B failing mid-run must not take the run down."""
import json

from omegaconf import OmegaConf

from runtime.logger import RunLogger


class DyingWandbRun:
    """A W&B run whose service went away after the start (what `wandb.log` raises then varies)."""

    def __init__(self):
        self.calls = 0
        self.summary = {}

    def log(self, metrics):
        self.calls += 1
        raise BrokenPipeError("wandb service process died")

    def finish(self):
        raise AssertionError("finish must not be called on a run that already failed")


def test_wandb_failing_mid_run_is_said_once_and_logging_goes_on_to_log_jsonl(tmp_path, capsys):
    logger = RunLogger(OmegaConf.create({"logger": {"name": "none"}}), tmp_path)
    logger.wandb_run = dying = DyingWandbRun()
    logger.log({"val/oa_fp32": 50.0}, step=1)
    logger.log({"val/oa_fp32": 60.0}, step=2)
    logger.summary({"oa": 60.0})
    logger.finish()
    assert dying.calls == 1  # W&B is dropped at its first failure
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["val/oa_fp32"] for r in records] == [50.0, 60.0]
    said = [line for line in capsys.readouterr().out.splitlines() if "W&B logging failed" in line]
    assert len(said) == 1 and "BrokenPipeError" in said[0] and str(tmp_path / "log.jsonl") in said[0]
