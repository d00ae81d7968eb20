"""The PT2E backend (torch.export + torchao X86InductorQuantizer) on a tiny PointNeXt, and the dispatch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

from models import create_model, neighbor_ops, neighbors
import qat
from qat import QConfigSpec, QuantSchedule, SpecError, backend, fx, group_stages, pt2e

ROOT = Path(__file__).resolve().parents[1]
PT2E = QConfigSpec(backend="pt2e_x86")


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("pointnext_s", num_classes=5, width=8).train()


def clouds(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    xyz = torch.rand(batch, 64, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return xyz, xyz.transpose(1, 2).contiguous()


def train_steps(prepared: torch.nn.Module, steps: int = 3) -> list[float]:
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    prepared.train()
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = prepared(*clouds(8, step)).logsumexp(dim=1).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained():
    """(float model, prepared student after a few QAT steps)."""
    torch.set_num_threads(1)
    model = tiny()
    prepared = backend.prepare_qat(model, PT2E, clouds(2, 99))
    train_steps(prepared)
    return model, prepared


def test_backend_default_spec_selects_fx():
    assert QConfigSpec().backend == "fbgemm" and backend.for_spec(QConfigSpec()) is fx
    prepared = backend.prepare_qat(tiny(), QConfigSpec(), clouds(2, 0))
    assert backend.for_model(prepared) is fx and not pt2e.is_pt2e_model(prepared)


def test_spec_accepts_flow_names_for_backends():
    assert QConfigSpec(backend="fx_fbgemm").backend == "fbgemm"
    assert QConfigSpec(backend="fx_x86").backend == "x86"
    assert backend.for_spec(QConfigSpec(backend="pt2e_x86")) is pt2e
    with pytest.raises(SpecError, match="backend='pt2e_arm' is not allowed"):
        QConfigSpec(backend="pt2e_arm")


@pytest.mark.parametrize(
    "fields, where",
    [
        ({"weight": "per_tensor"}, r"^weight=per_tensor cannot be expressed with backend pt2e_x86"),
        ({"module_overrides": {"prediction.head.4.0": {"weight": "per_tensor"}}},
         r"^module_overrides\['prediction.head.4.0'\].weight=per_tensor cannot be expressed"),
        ({"type_overrides": {"Linear": {"weight": "per_tensor"}}}, r"^type_overrides\['Linear'\].weight=per_tensor"),
    ],
)
def test_spec_pt2e_refuses_per_tensor_weights_naming_the_field(fields, where):
    with pytest.raises(SpecError, match=where):
        QConfigSpec(backend="pt2e_x86", **fields)
    QConfigSpec(backend="fbgemm", **fields)  # FX expresses them


@pytest.mark.parametrize("name, problem", [
    ("encoder.encoder.1.0.conv.0", r"keep_fp32: the model has no module 'encoder.encoder.1.0.conv.0'; did you mean"),
    ("encoder.encoder.1.0.convs.0.1", r"'encoder.encoder.1.0.convs.0.1' is a BatchNorm\dd with no conv/linear inside"),
])
def test_both_backends_refuse_a_spec_naming_a_module_that_cannot_be_quantized_in_the_same_line(name, problem):
    """One check (`qat.spec.check_names`) before either backend traces: both accept the same specs."""
    for name_of_backend in ("fbgemm", "pt2e_x86"):
        with pytest.raises(SpecError, match=problem):
            backend.prepare_qat(tiny(), QConfigSpec(backend=name_of_backend, keep_fp32=[name]), clouds(2, 0))


def test_export_keeps_neighbour_search_as_one_op_per_call_for_any_batch():
    originals = neighbors.furthest_point_sample, neighbors.ball_query
    model = tiny().eval()
    graph = pt2e.export_model(model, clouds(2, 0))
    # four downsampling set abstractions: one FPS and one ball query each, no unrolled loop
    assert neighbor_ops.count_neighbor_ops(graph) == {"kdqat::furthest_point_sample": 4, "kdqat::ball_query": 4}
    assert len(graph.graph.nodes) < 400
    assert (neighbors.furthest_point_sample, neighbors.ball_query) == originals
    with pytest.raises(RuntimeError), neighbor_ops.exportable_neighbors():
        raise RuntimeError("export failed")
    assert (neighbors.furthest_point_sample, neighbors.ball_query) == originals
    for batch in (1, 3):
        assert torch.allclose(graph(*clouds(batch, batch)), model(*clouds(batch, batch)), atol=1e-5)


def test_prepare_qat_trains_and_leaves_the_float_model_untouched(trained):
    model, prepared = trained
    assert pt2e.is_pt2e_model(prepared) and backend.for_model(prepared) is pt2e
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny().state_dict().values()))
    trained_weight = dict(prepared.named_parameters())["prediction.head.4.0.weight"]
    assert not torch.equal(trained_weight, model.prediction.head[4][0].weight)
    assert len(backend.fake_quant_modules(prepared)) > 20


def test_ptq_converts_to_int8_close_to_float():
    """Static PTQ: calibrate, convert; the stem and residual Conv1d stay FP32 (no ReLU after them)."""
    model = tiny().eval()
    prepared = backend.prepare_ptq(model, PT2E, clouds(2, 0))
    with torch.no_grad():
        for seed in range(3):
            prepared(*clouds(8, seed))
        int8 = backend.convert(prepared)
        reference, quantized = model(*clouds(4, 7)), int8(*clouds(4, 7))
    assert (quantized - reference).abs().max() < 0.1 * reference.abs().max()
    assert backend.quantized_op_count(int8) == {"quantized": 13, "float": 5}
    assert backend.float_op_names(int8)[0] == "encoder.encoder.0.0.convs.0.0"


def test_eval_mode_disables_dropout_and_batch_statistics(trained):
    _, prepared = trained
    prepared.eval()
    with torch.no_grad(), backend.observers_disabled(prepared):
        first, second = prepared(*clouds(4, 3)), prepared(*clouds(4, 3))
        one = prepared(*clouds(1, 3))  # a batch of one: batch statistics would differ
    prepared.train()
    assert prepared.training
    assert torch.equal(first, second)
    assert torch.allclose(one[0], first[0], atol=1e-5)


def test_frozen_bn_keeps_running_statistics_in_train_mode(trained):
    _, prepared = trained
    stats = {k: v.clone() for k, v in prepared.state_dict().items() if k.endswith("running_mean")}
    backend.freeze_bn_stats(prepared)
    assert backend.bn_frozen(prepared) is True
    train_steps(prepared, steps=1)
    after = {k: v for k, v in prepared.state_dict().items() if k.endswith("running_mean")}
    assert all(torch.equal(stats[k], after[k]) for k in stats)
    backend.unfreeze_bn_stats(prepared)
    train_steps(prepared, steps=1)
    assert backend.bn_frozen(prepared) is False and prepared.training
    assert any(not torch.equal(stats[k], v) for k, v in prepared.state_dict().items() if k in stats)


def test_fake_quant_owners_follow_the_depth(trained):
    _, prepared = trained
    owners = backend.fake_quant_owners(prepared)
    assert len(owners) == len(backend.fake_quant_modules(prepared))
    stages = group_stages(owners, num_chunks=1)
    # the stem (its Conv1d stays FP32) has no fake quant: encoder stages 1-5, then the head
    assert stages == sorted(stages) and max(stages) == 5
    assert owners[0].startswith("encoder.encoder.1") and owners[-1].startswith("prediction")
    modules = backend.fake_quant_modules(prepared)
    backend.set_fake_quant(modules[:2], False)
    assert [int(m.fake_quant_enabled[0]) for _, m in modules[:3]] == [0, 0, 1]
    backend.set_fake_quant(modules, True)


def test_keep_fp32_and_overrides_reach_the_layers_they_name():
    """A conv inside a conv+BN+ReLU block is named like in FX; the block's pattern stays FP32 with it."""
    spec = QConfigSpec(backend="pt2e_x86", keep_fp32=["encoder.encoder.1.0.convs.0.0", "prediction.head.4"],
                       module_overrides={"prediction.head.4.0": {"activation_observer": "minmax"}},
                       type_overrides={"Conv2d": {"activation_observer": "histogram"}})
    prepared = backend.prepare_ptq(tiny().eval(), spec, clouds(2, 0))
    kept = backend.float_op_names(prepared)
    assert "encoder.encoder.1.0.convs.0.0" in kept and "prediction.head.4.0" not in kept  # longest name wins
    observers = {type(m).__name__ for _, m in pt2e._observers(prepared)}
    assert {"HistogramObserver", "MinMaxObserver"} <= observers
    with pytest.raises(ValueError, match="never saw data"):
        backend.convert(prepared)


@pytest.mark.parametrize("flow", ["fx", "pt2e"])
def test_schedule_drives_either_backend_through_the_package_dispatcher(trained, flow):
    """`qat.prepare_qat` and `QuantSchedule` are the same calls for both backends; so is the engine's
    `.train()` / `.eval()`, which keeps a frozen BN frozen (PT2E: a graph rewrite, not a flag)."""
    if flow == "pt2e":
        prepared = trained[1]
    else:
        prepared = qat.prepare_qat(tiny(), QConfigSpec(), clouds(2, 0))
        train_steps(prepared, steps=1)
    assert qat.backend.for_model(prepared) is (pt2e if flow == "pt2e" else fx)
    schedule = QuantSchedule(fake_quant_start_epoch=1, freeze_observer_epoch=2, freeze_bn_epoch=2)
    modules = qat.fake_quant_modules(prepared)

    def flags() -> tuple[set[int], set[int]]:
        return {int(m.fake_quant_enabled[0]) for _, m in modules}, {int(m.observer_enabled[0]) for _, m in modules}

    prepared.train()
    log = schedule.on_epoch_start(prepared, 0)
    assert log["qat/fake_quant_fraction"] == 0.0 and flags() == ({0}, {1}) and qat.bn_frozen(prepared) is False
    log = schedule.on_epoch_start(prepared, 2)
    assert log == {"qat/fake_quant_fraction": 1.0, "qat/observers_frozen": 1.0, "qat/bn_frozen": 1.0}
    assert flags() == ({1}, {0}) and qat.bn_frozen(prepared) is True
    prepared.eval()
    prepared.train()  # what the engine does around validation
    stats = {k: v.clone() for k, v in prepared.state_dict().items() if k.endswith("running_mean")}
    train_steps(prepared, steps=1)
    assert all(torch.equal(v, prepared.state_dict()[k]) for k, v in stats.items())  # still frozen in train mode
    with schedule.evaluating(prepared):
        assert flags()[1] == {0}
    QuantSchedule().on_epoch_start(prepared, 0)  # the trained fixture is shared: back to plain QAT
    assert flags() == ({1}, {1}) and qat.bn_frozen(prepared) is False


def test_fx_path_works_without_torchao():
    code = (
        "import sys; sys.modules['torchao'] = None\n"  # makes `import torchao` fail
        "import torch, qat\nfrom qat import backend\nfrom models import create_model\n"
        "m = create_model('pointnext_s', num_classes=5, width=8).train()\n"
        "x = torch.rand(2, 64, 3)\n"
        "p = backend.prepare_qat(m, qat.QConfigSpec(), (x, x.transpose(1, 2).contiguous()))\n"
        "assert backend.for_model(p) is backend.fx\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.slow
def test_qat_int8_reproduces_fake_quant_compiled_and_reloaded(trained, tmp_path):
    """QAT convert (torchao re-traces ~100 BN-folding patterns: ~30 s), Inductor, the .pt2 artifact."""
    _, prepared = trained
    inputs = clouds(4, 11)
    prepared.eval()
    with torch.no_grad(), backend.observers_disabled(prepared):
        fake_quant = prepared(*inputs)
    prepared.train()
    int8 = backend.convert(prepared)
    with torch.no_grad():
        reference = int8(*inputs)
    assert torch.allclose(reference, fake_quant, atol=1e-4 * fake_quant.abs().max().item())
    compiled, seconds = pt2e.compile_int8(int8, inputs)
    assert seconds > 0
    assert torch.allclose(compiled(*inputs), reference, atol=1e-4 * reference.abs().max().item())
    path = pt2e.export_int8(int8, tmp_path / "model_int8.pt2", {"num_points": 64}, inputs)
    reloaded = pt2e.load_int8(path)
    with torch.no_grad():
        assert torch.allclose(reloaded(*inputs), reference, atol=1e-6)
