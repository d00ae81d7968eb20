"""The run logger: one short console line per epoch; W&B failing mid-run must not take the run down."""
import json

from omegaconf import OmegaConf

from runtime.logger import RunLogger, epoch_line


def test_epoch_line_names_the_phase_and_shows_loss_val_oa_lr():
    line = epoch_line({"teacher/train/loss_epoch": 2.6871, "teacher/train/task_loss_epoch": 2.6871,
                       "teacher/val/oa_fp32": 17.708, "teacher/val/macc_fp32": 17.7, "teacher/train/lr": 5e-5,
                       "teacher/epoch": 3})
    assert line == "teacher epoch 4: loss 2.687, val OA 17.71%, lr 5.00e-05"


def test_epoch_line_of_the_student_shows_the_fake_quant_state():
    line = epoch_line({"train/loss_epoch": 1.25, "val/oa_fakequant": 70.5, "train/lr": 1e-4,
                       "qat/fake_quant_fraction": 0.5, "qat/bn_frozen": 1.0, "epoch": 0})
    assert line == "student epoch 1: loss 1.250, val OA 70.50%, lr 1.00e-04, fake-quant 50%"


def test_step_records_print_nothing():
    assert epoch_line({"train/loss": 2.0, "train/lr": 1e-3}) is None


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
