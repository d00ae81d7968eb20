"""The class count of a run comes from the data's class list; `dataset.num_classes`, when typed, is a check.

A data set in ModelNet40's layout with another number of classes (here 3) trains and evaluates
without anyone typing `dataset.num_classes` (configs/dataset/modelnet40.yaml: null); a typed
count that disagrees with `shape_names.txt` stops the tool with exit 2 and one line.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import _tools as tools
from data.modelnet40 import write_modelnet40

CLASSES = ["chair", "lamp", "mug"]
ARGS = ["dataset=modelnet40", "dataset.num_points=64", "train.num_workers=0", "mode=fp32", "model.width=8",
        "teacher.epochs=1", "train.batch_size=16", "train.eval_batch_size=16", "bench.repeats=1"]


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three_classes")
    rng = np.random.default_rng(0)
    splits = {s: (rng.uniform(-1, 1, (n, 128, 3)), np.arange(n) % len(CLASSES)) for s, n in (("train", 40), ("test", 9))}
    write_modelnet40(root, splits, CLASSES)
    return root


@pytest.mark.slow
def test_modelnet40_layout_with_three_classes_trains_a_three_class_model_untyped(tmp_path, three_classes):
    run = tmp_path / "run"
    proc = tools.run_tool("train_kd_qat.py", tmp_path, *ARGS, f"dataset.root={three_classes}", f"hydra.run.dir={run}",
                          threads=1)
    assert "3 classes" in proc.stdout + proc.stderr
    head = torch.load(run / "teacher" / "final.pt", weights_only=True)["model"]["prediction.head.4.0.weight"]
    assert head.shape[0] == len(CLASSES)


@pytest.mark.slow
def test_typed_num_classes_that_disagrees_with_shape_names_is_one_line_naming_both_numbers(tmp_path, three_classes):
    run = tmp_path / "run"
    proc = tools.run_tool("train_kd_qat.py", tmp_path, *ARGS, f"dataset.root={three_classes}", "dataset.num_classes=40",
                          f"hydra.run.dir={run}", check=False, threads=1)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert all(word in lines[0] for word in ("dataset.num_classes=40", "has 3 classes", "shape_names.txt",
                                             "set dataset.num_classes=3")), lines[0]
    assert not run.exists()
