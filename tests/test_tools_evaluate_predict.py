"""`tools/evaluate.py` and `tools/predict.py` on one finished tiny KD-QAT run."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import data

from _tools import (ROOT, TINY_CLASSES, TINY_DATA, TINY_TRAIN, TINY_TRAIN_PER_CLASS, ConstantClass, assert_learned,
                    run_tool)

DATA = TINY_DATA
TRAIN = TINY_TRAIN + ["train.epochs=1"]
K = TINY_CLASSES
TEST_PER_CLASS = 10  # TINY_DATA's dataset.test_per_class


def run(workdir: Path, tool: str, *args: str) -> subprocess.CompletedProcess:
    return run_tool(tool, workdir, *args, check=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """(workdir, run dir) of tools/train_kd_qat.py: teacher/final.pt, student/last.pt, model_int8.pt, metrics.json."""
    workdir = tmp_path_factory.mktemp("evaluate")
    proc = run(workdir, "train_kd_qat.py", *DATA, *TRAIN, f"hydra.run.dir={workdir / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, workdir / "run"


def evaluate(workdir: Path, checkpoint: Path, name: str, *overrides: str) -> dict:
    proc = run(workdir, "evaluate.py", f"checkpoint={checkpoint}", *DATA, "model.width=8", "train.eval_batch_size=16",
               f"hydra.run.dir={workdir / name}", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / name / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((workdir / name / "eval.json").read_text())


# ---- evaluate -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_int8_artifact_reproduces_the_accuracy_in_metrics_json(finished_run):
    workdir, run_dir = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = evaluate(workdir, run_dir / "model_int8.pt", "eval_int8")
    assert result["kind"] == "int8" and result["split"] == "test"
    assert_learned(metrics["oa"], "int8 student")
    assert result["oa"] == pytest.approx(metrics["oa"], abs=1e-9)
    assert result["macc"] == pytest.approx(metrics["macc"], abs=1e-9)
    assert result["per_class_acc"] == pytest.approx(metrics["per_class_acc"], abs=1e-9)
    confusion = np.array(result["confusion"])
    assert confusion.shape == (K, K) and confusion.sum(axis=1).tolist() == [TEST_PER_CLASS] * K
    assert 100 * np.trace(confusion) / confusion.sum() == pytest.approx(result["oa"])



@pytest.mark.slow
def test_evaluate_of_another_artifact_does_not_reproduce_the_reported_accuracy(finished_run, tmp_path):
    """Negative control of the test above: evaluate reads the artifact it is given, and the comparison sees it."""
    workdir, run_dir = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fake = tmp_path / "model_int8.pt"
    torch.jit.script(ConstantClass()).save(str(fake))
    (tmp_path / "model_int8.json").write_text((run_dir / "model_int8.json").read_text())  # the run's own sidecar
    result = evaluate(workdir, fake, "eval_constant")
    assert result["oa"] == pytest.approx(100 / K)
    assert result["oa"] != pytest.approx(metrics["oa"], abs=1e-9)


@pytest.mark.slow
def test_evaluate_qat_checkpoint_rebuilds_the_student_and_matches_its_fakequant_accuracy(finished_run):
    workdir, run_dir = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = evaluate(workdir, run_dir / "student" / "last.pt", "eval_qat", "model.width=32")  # width: the run's config
    assert result["kind"] == "qat"
    assert_learned(metrics["fakequant"]["oa"], "fake-quant student")
    assert (result["oa"], result["macc"]) == pytest.approx((metrics["fakequant"]["oa"], metrics["fakequant"]["macc"]))


@pytest.mark.slow
def test_evaluate_fp32_checkpoint_matches_the_fp32_figures_and_a_direct_evaluation(finished_run):
    workdir, run_dir = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = evaluate(workdir, run_dir / "teacher" / "final.pt", "eval_fp32")
    assert result["kind"] == "fp32"
    assert_learned(metrics["fp32"]["oa"], "FP32 model")
    assert (result["oa"], result["macc"]) == pytest.approx((metrics["fp32"]["oa"], metrics["fp32"]["macc"]))
    from omegaconf import OmegaConf

    import data
    from models import create_model, load_checkpoint

    cfg = OmegaConf.load(run_dir / "config.yaml")
    test = data.build_dataset(cfg.dataset, "test")
    batch = next(iter(data.build_loader(test, len(test), shuffle=False)))
    model = create_model("pointnext-s", num_classes=K, width=8)
    load_checkpoint(model, run_dir / "teacher" / "final.pt")
    with torch.no_grad():
        reference = data.classification_metrics(model.eval()(batch["xyz"], batch["feats"]), batch["label"], K)
    assert result["confusion"] == reference["confusion"].tolist()


@pytest.mark.slow
def test_evaluate_train_split_reads_every_training_cloud(finished_run):
    workdir, run_dir = finished_run
    result = evaluate(workdir, run_dir / "model_int8.pt", "eval_train", "split=train")
    train = data.build_dataset(OmegaConf.load(run_dir / "config.yaml").dataset, "train")  # train minus the val clouds
    assert result["split"] == "train" and result["num_clouds"] == len(train) > K * TINY_TRAIN_PER_CLASS * 0.8


@pytest.mark.slow
def test_evaluate_refuses_an_artifact_without_its_sidecar_in_one_line(finished_run, tmp_path):
    workdir, run_dir = finished_run
    lone = tmp_path / "model_int8.pt"
    lone.write_bytes((run_dir / "model_int8.pt").read_bytes())
    proc = run(workdir, "evaluate.py", f"checkpoint={lone}", *DATA, f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(lone) in last and "model_int8.json" in last


# ---- predict ------------------------------------------------------------------------------------
def write_ply(path: Path, xyz: np.ndarray, binary: bool) -> None:
    """A PLY with an extra vertex property and a face element after the vertices, as exporters write."""
    header = (f"ply\nformat {'binary_little_endian' if binary else 'ascii'} 1.0\ncomment test\n"
              f"element vertex {len(xyz)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n")
    if binary:
        rows = np.zeros(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1")])
        rows["x"], rows["y"], rows["z"], rows["red"] = xyz[:, 0], xyz[:, 1], xyz[:, 2], 200
        path.write_bytes(header.encode() + rows.tobytes())
    else:
        path.write_text(header + "".join(f"{x!r} {y!r} {z!r} 200\n" for x, y, z in xyz.tolist()))


def predictions(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """'NAME (N points): a 0.5, b 0.25' lines -> {NAME: [(a, 0.5), (b, 0.25)]}."""
    result = {}
    for line in stdout.strip().splitlines():
        name, ranked = line.split(" points): ")
        pairs = [choice.rsplit(" ", 1) for choice in ranked.split(", ")]
        result[name.rsplit(" (", 1)[0]] = [(label, float(p)) for label, p in pairs]
    return result


@pytest.fixture(scope="module")
def cloud() -> np.ndarray:
    """A float32 cloud of 200 points (more than the artifact's 64) off the origin and not unit-scaled."""
    return (np.random.default_rng(0).normal(size=(200, 3)) * 3 + 5).astype(np.float32)


@pytest.mark.slow
def test_predict_gives_one_answer_for_the_same_cloud_in_every_format(finished_run, cloud, tmp_path):
    workdir, run_dir = finished_run
    np.save(tmp_path / "a.npy", cloud)
    np.save(tmp_path / "b_six_columns.npy", np.hstack([cloud, -cloud]))
    np.savetxt(tmp_path / "c.txt", np.hstack([cloud, np.ones((200, 2))]))  # extra columns ignored
    np.savetxt(tmp_path / "d.xyz", cloud, delimiter=",")
    write_ply(tmp_path / "e_ascii.ply", cloud, binary=False)
    write_ply(tmp_path / "f_binary.ply", cloud, binary=True)
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["data"] = np.stack([cloud, cloud])  # every cloud of the file, in order
    (tmp_path / "notes.md").write_text("not a cloud: skipped in a directory\n")
    proc = run(workdir, "predict.py", f"artifact={run_dir / 'model_int8.pt'}", f"input={tmp_path}", f"topk={K}")
    assert proc.returncode == 0, proc.stderr
    result = predictions(proc.stdout)
    names = ["a.npy", "b_six_columns.npy", "c.txt", "d.xyz", "e_ascii.ply", "f_binary.ply", "g.h5[0]", "g.h5[1]"]
    assert list(result) == [str(tmp_path / n) for n in names]  # sorted files, every cloud of the h5
    first = result[str(tmp_path / "a.npy")]
    assert all(ranked == first for ranked in result.values())
    probs = [p for _, p in first]  # all classes: even an axis swap would move some of them
    assert len(first) == K and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=0.01)


@pytest.mark.slow
def test_predict_probabilities_are_the_softmax_of_the_artifacts_logits(finished_run, cloud, tmp_path):
    workdir, run_dir = finished_run
    few = cloud[:50]  # fewer points than the artifact's 64: repeated in order up to 64
    np.save(tmp_path / "few.npy", few)
    proc = run(workdir, "predict.py", f"artifact={run_dir / 'model_int8.pt'}", f"input={tmp_path / 'few.npy'}",
               f"topk={K}")
    assert proc.returncode == 0, proc.stderr
    printed = predictions(proc.stdout)[str(tmp_path / "few.npy")]
    from data.transforms import center_and_normalize

    xyz = center_and_normalize(torch.from_numpy(np.resize(few, (64, 3))))[None]  # (1, 64, 3)
    names = json.loads((run_dir / "model_int8.json").read_text())["class_names"]
    probs = torch.jit.load(str(run_dir / "model_int8.pt"))(xyz, xyz.transpose(1, 2)).softmax(dim=1)[0]
    assert sorted(name for name, _ in printed) == sorted(names)  # topk=K: every class once
    assert [p for _, p in printed] == pytest.approx(sorted(probs.tolist(), reverse=True), abs=5e-4)
    for name, p in printed:  # (int8 logits tie often, so the order among equal probabilities is free)
        assert p == pytest.approx(probs[names.index(name)].item(), abs=5e-4)


@pytest.mark.slow
def test_predict_reports_each_bad_file_in_one_line_and_classifies_the_rest(finished_run, cloud, tmp_path):
    workdir, run_dir = finished_run
    np.save(tmp_path / "good.npy", cloud)
    (tmp_path / "empty.txt").write_text("")
    nan = cloud.copy()
    nan[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.savetxt(tmp_path / "two_columns.txt", cloud[:, :2])
    with h5py.File(tmp_path / "mixed.h5", "w") as f:
        f["data"] = np.stack([cloud, nan])  # the bad cloud fails, the good one is still classified
    proc = run(workdir, "predict.py", f"artifact={run_dir / 'model_int8.pt'}", f"input={tmp_path}")
    assert proc.returncode != 0
    assert list(predictions(proc.stdout)) == [str(tmp_path / "good.npy"), f"{tmp_path / 'mixed.h5'}[0]"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    expected = {"empty.txt": "no points", "mixed.h5[1]": "NaN/Inf", "nan.npy": "NaN/Inf",
                "two_columns.txt": "2 column(s) per point"}
    assert len(errors) == len(expected)
    for (name, problem), line in zip(sorted(expected.items()), errors):
        assert line.startswith(f"error: {tmp_path / name}: ") and problem in line and ";" in line  # the fix follows


@pytest.mark.slow
@pytest.mark.parametrize("filename, content, problem", [
    ("cloud.obj", "v 0 0 0\n", "unsupported file type '.obj'"),
    ("broken.ply", "ply\nformat ascii 1.0\nelement vertex 5\n", "not a PLY file"),
    ("ragged.txt", "0 0 0\n1 1\n", "unreadable"),
])
def test_predict_fails_a_single_bad_file_with_one_line_naming_it(finished_run, tmp_path, filename, content, problem):
    workdir, run_dir = finished_run
    (tmp_path / filename).write_text(content)
    proc = run(workdir, "predict.py", f"artifact={run_dir / 'model_int8.pt'}", f"input={tmp_path / filename}")
    assert proc.returncode == 2 and proc.stdout == ""  # bad input: runtime/exits.py
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"error: {tmp_path / filename}: ") and problem in first
