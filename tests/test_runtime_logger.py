"""The console shows one short line per epoch; everything else goes to log.jsonl and W&B."""
from runtime.logger import epoch_line


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
