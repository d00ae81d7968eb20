"""`allow_changes=[train.epochs]`: extending a finished run, end to end (runtime/rundir.py, Engine.load_state_dict).

The semantics, stated honestly: the extended run is *not* the run that was planned with the new
length from the start. Its first epochs ran under the old schedule (annealed towards the old
end); from the resumed step on, the learning rate follows a fresh schedule planned for the new
length, exactly as a run of that length would have at the same step. Nothing else may change.
"""
import json
from pathlib import Path

import pytest

import _tools as tools
from _tools import TINY

EXTEND = ["train.log_every=1", "logger=none"]


def student_lrs(run: Path) -> dict[int, float]:
    """Optimizer step → the student's learning rate logged at that step (log.jsonl)."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/lr"] for r in records if "train/lr" in r and r.get("step") is not None}


@pytest.mark.slow
def test_extending_a_run_follows_the_new_lengths_schedule_from_the_resumed_step(tmp_path):
    short, planned = tmp_path / "short", tmp_path / "planned"
    tools.run_tool("train_kd_qat.py", tmp_path, *TINY, *EXTEND, "train.epochs=1", f"hydra.run.dir={short}", threads=1)
    tools.run_tool("train_kd_qat.py", tmp_path, *TINY, *EXTEND, "train.epochs=2", f"hydra.run.dir={planned}", threads=1)
    refused = tools.run_tool("train_kd_qat.py", tmp_path, *TINY, *EXTEND, "train.epochs=2", "optim.lr=0.05",
                             "resume=true", "allow_changes=[train.epochs]", f"hydra.run.dir={short}", check=False, threads=1)
    assert refused.returncode == 2 and "optim.lr" in refused.stderr  # only train.epochs may change
    first = student_lrs(short)
    tools.run_tool("train_kd_qat.py", tmp_path, *TINY, *EXTEND, "train.epochs=2", "resume=true",
                   "allow_changes=[train.epochs]", f"hydra.run.dir={short}", threads=1)
    resumed_at = max(first)
    after = {s: lr for s, lr in student_lrs(short).items() if s > resumed_at}
    plan = student_lrs(planned)
    assert after and after == {s: plan[s] for s in after}  # the fresh 2-epoch schedule from the resumed step on
    assert any(first[s] != plan[s] for s in first)  # ... while the first epoch ran under the 1-epoch schedule
