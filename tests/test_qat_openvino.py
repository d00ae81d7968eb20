"""The OpenVINO IR of our int8 model (`qat/openvino.py`) computes that int8 model, on OpenVINO's runtime.

The chain is checked link by link, each against the one before, each with a negative control:
the index-fed graph equals the normal forward, the float twin equals the converted int8 model,
the per-point grid equals the grid after the gather, and the exported IR, run by OpenVINO,
classifies like the TorchScript artifact.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

import qat
import qat.fx
from models import create_model
from models._precomputed import NeighbourIndices, index_fed
from qat import openvino as qov
from qat.export import read_sidecar
from test_qat_standin import one_thread  # noqa: F401 (autouse fixture)

N = 128  # points per cloud


def clouds(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    xyz = torch.rand(batch, N, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return xyz, xyz.transpose(1, 2).contiguous()


def calibrated(variant: str) -> torch.fx.GraphModule:
    """A PTQ-calibrated model whose logits depend on the cloud: BN statistics of real activations
    (random BN statistics leave near-constant logits, which would hide a wrong grid upstream).

    Min-max calibrated on every cloud these tests feed it, so no activation leaves its 7-bit range:
    beyond it, int8 kernels on CPUs without AVX-512 VNNI (fbgemm's and oneDNN's alike) saturate
    each u8 x s8 pair sum at int16, and the int8 model no longer computes what its exact float
    twin does (measured on an AVX2 CPU: up to 9 output steps apart on PointNeXt-B; 0-1 in range).
    """
    torch.manual_seed(0)
    model = create_model(variant, num_classes=6, width=8)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for seed in range(30, 34):
            model(*clouds(8, seed))
    model.eval()
    prepared = qat.prepare_ptq(model, qat.QConfigSpec(activation_observer="minmax"), clouds(2, 0))
    qat.calibrate(prepared, [clouds(64, seed) for seed in (1, 2, 5, 7, 11, 21, 31)])  # all the clouds used below
    return prepared


@pytest.fixture(scope="module", params=["pointnext_s", "pointnext_b"])  # SA stages; InvResMLP local groups too
def prepared(request) -> torch.fx.GraphModule:
    return calibrated(request.param)


def output_step(int8: torch.nn.Module) -> float:
    """One step of the int8 model's output grid (its last layer's scale): what one requantization may round by."""
    return float([m for m in int8.modules() if isinstance(m, torch.ao.nn.quantized.Linear)][-1].scale)


def twin_and_searches(prepared: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list]:
    return index_fed(qov.fake_quant_twin(qat.fx.convert(prepared, int8_neighbor_leaves=False)))


@pytest.mark.parametrize("variant", ["pointnext_s", "pointnext_b"])
def test_index_fed_graph_equals_the_model_and_reads_its_searches_from_the_leaves(variant):
    model = create_model(variant, num_classes=6, width=8).eval()
    fed, searches = index_fed(torch.fx.symbolic_trace(model))
    assert searches == NeighbourIndices.of(model).searches
    xyz, feats = clouds(3, 7)
    indices = NeighbourIndices(searches)(xyz)
    with torch.no_grad():
        expected = model(xyz, feats)
        assert torch.equal(fed(xyz, feats, *indices), expected)
        # negative control: other neighbourhoods, other logits
        assert not torch.allclose(fed(xyz, feats, *[i.flip(-1).roll(1, dims=1) for i in indices]), expected)


def test_float_twin_computes_the_converted_int8_model(prepared):
    int8 = qat.convert(prepared)
    twin, searches = twin_and_searches(prepared)
    xyz, feats = clouds(8, 11)
    with torch.no_grad():
        expected, got = int8(xyz, feats), twin(xyz, feats, *NeighbourIndices(searches)(xyz))
    # float vs integer rounding may move a logit by an output step or two, no more
    assert float((got - expected).abs().max()) <= 2 * output_step(int8)


def test_float_twin_reads_every_grid_negative_control(prepared):
    """A twin one output grid off (the first conv's, a quarter as wide) no longer matches: the test above can fail."""
    int8 = qat.convert(prepared)
    plain = qat.fx.convert(prepared, int8_neighbor_leaves=False)
    first_conv = next(m for m in plain.modules() if isinstance(m, torch.ao.nn.quantized.Conv1d))
    first_conv.scale = first_conv.scale / 4  # a grid a quarter as wide: large outputs clip
    twin, searches = index_fed(qov.fake_quant_twin(plain))
    xyz, feats = clouds(8, 11)
    with torch.no_grad():
        expected, got = int8(xyz, feats), twin(xyz, feats, *NeighbourIndices(searches)(xyz))
    assert float((got - expected).abs().max()) > 2 * output_step(int8)


def test_quantizing_per_point_before_the_gather_changes_no_value(prepared):
    twin, searches = twin_and_searches(prepared)
    moved = qov.quantize_before_gather(twin_and_searches(prepared)[0])
    assert sum(1 for n in moved.graph.nodes if n.target is torch.fake_quantize_per_tensor_affine) < sum(
        1 for n in twin.graph.nodes if n.target is torch.fake_quantize_per_tensor_affine)  # one fewer per leaf
    xyz, feats = clouds(4, 5)
    indices = NeighbourIndices(searches)(xyz)
    with torch.no_grad():
        assert torch.equal(moved(xyz, feats, *indices), twin(xyz, feats, *indices))
        # negative control: a grid twice as fine before the gather changes the grouped values
        for node in moved.graph.nodes:
            if len(node.args) == 7 and isinstance(node.args[6], tuple):
                scale, zero_point = node.args[6]
                node.args = (*node.args[:6], (scale / 2, zero_point))
        moved.recompile()
        assert not torch.equal(moved(xyz, feats, *indices), twin(xyz, feats, *indices))


def test_int8_neighbour_leaves_are_refused_by_name(prepared):
    with pytest.raises(ValueError, match="int8_neighbor_leaves=False"):
        index_fed(qat.convert(prepared))


def test_export_without_openvino_is_one_line_naming_the_extra(prepared, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(ImportError, match=r"\.\[openvino\]"):
        qov.export_openvino(prepared, tmp_path / "m.xml", {}, clouds(2, 0))
    assert list(tmp_path.iterdir()) == []


def openvino_logits(network: torch.fx.GraphModule, xyz: torch.Tensor, feats: torch.Tensor,
                    indices: list[torch.Tensor]) -> torch.Tensor:
    import openvino as ov
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trace's notes on shape checks, as in export_openvino
        model = ov.convert_model(network, example_input=(xyz, feats, *indices))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    return torch.from_numpy(compiled([t.numpy() for t in (xyz, feats, *indices)])[0])


def test_openvino_keeps_the_residual_requantization_only_when_guarded(prepared):
    """What `keep_residual_requantization` is for: unguarded, OpenVINO fuses each residual add
    into a convolution and skips one requantization, which compounds (8-wide untrained PointNeXt-S
    / -B: 0.24 / 0.41 of the logits' spread between clouds, 91 / 81 % top-1 agreement)."""
    pytest.importorskip("openvino")
    int8 = qat.convert(prepared)
    network, searches = twin_and_searches(prepared)
    qov.quantize_before_gather(network)
    xyz, feats = clouds(64, 21)
    indices = NeighbourIndices(searches)(xyz)
    with torch.no_grad():
        expected = int8(xyz, feats)
    unguarded = openvino_logits(network, xyz, feats, indices)
    guarded = openvino_logits(qov.keep_residual_requantization(network), xyz, feats, indices)
    assert float((guarded - expected).abs().max()) <= 2 * output_step(int8)
    assert float((unguarded - expected).abs().max()) > 2 * output_step(int8)  # the negative control


def test_openvino_ir_computes_the_torchscript_artifacts_int8_model(prepared, tmp_path):
    pytest.importorskip("openvino")
    path = qov.export_openvino(prepared, tmp_path / "model_int8_openvino.xml", {"num_points": N}, clouds(2, 0))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[:5] == ["model_int8_openvino.bin", "model_int8_openvino.json", "model_int8_openvino.xml",
                         "model_int8_openvino_search.json", "model_int8_openvino_search.pt"]
    assert names[5:] in ([], ["model_int8_openvino_search_kdqat_C.so"])  # the compiled ops, when built; no staging left
    # the search holds no int8 weights, so no engine to pack them for (the TorchScript artifact's does: test_qat_deploy)
    assert "int8_engine" not in read_sidecar(tmp_path / "model_int8_openvino_search.pt")
    runner = qov.OpenVinoRunner(path, threads=1)
    int8 = qat.convert(prepared)
    artifact = qat.load_int8(qat.export_int8(int8, tmp_path / "model_int8.pt", {}, None))
    xyz, feats = clouds(64, 21)
    with torch.no_grad():
        expected = artifact(xyz, feats)
    got = runner(xyz, feats)
    assert float((got - expected).abs().max()) <= 2 * output_step(int8)  # as the twin: rounding, no more
    assert torch.equal(runner(xyz), got)  # feats default to the coordinates, as the artifact's
    assert torch.equal(qat.load_int8(path)(xyz, feats), got)  # `.xml` loads through the one artifact loader
    # negative control: the same network on other neighbourhoods
    shuffled = runner.network(xyz, feats, [i.flip(-1).roll(1, dims=1) for i in runner.search(xyz)])
    assert float((shuffled - expected).abs().max()) > 2 * output_step(int8)


def test_export_refuses_a_path_that_is_not_xml(prepared, tmp_path):
    pytest.importorskip("openvino")
    with pytest.raises(ValueError, match=r"\.xml"):
        qov.export_openvino(prepared, tmp_path / "model.pt", {}, clouds(2, 0))


PROBE = (  # a fresh interpreter, cwd outside the repo: torch, openvino and the exported files, no project code
    "import json, os, sys, numpy, torch, openvino\n"
    "xml, clouds, out = sys.argv[1:]\n"
    "here = os.path.dirname(xml)\n"
    "search_file = os.path.join(here, json.load(open(xml[:-4] + '.json'))['search'])\n"
    "library = json.load(open(search_file[:-3] + '.json')).get('kernels')\n"
    "if library:  # the search sidecar's `load` line\n"
    "    torch.ops.load_library(os.path.join(here, library))\n"
    "search = torch.jit.load(search_file)\n"
    "xyz, feats = torch.load(clouds)\n"
    "network = openvino.Core().compile_model(xml, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})\n"
    "logits = network([t.numpy() for t in (xyz, feats, *search(xyz))])[0]\n"
    "assert 'models' not in sys.modules and 'qat' not in sys.modules\n"
    "torch.save(torch.from_numpy(numpy.ascontiguousarray(logits)), out)\n"
)


def test_the_ir_runs_without_the_project(prepared, tmp_path):
    """A deployment with torch and openvino only: the probe above, in `python -I` outside the repo,
    gives the runner's logits (which the test above checks against the int8 model, with its
    negative control)."""
    pytest.importorskip("openvino")
    import subprocess

    (tmp_path / "ir").mkdir()
    path = qov.export_openvino(prepared, tmp_path / "ir" / "model_int8_openvino.xml", {}, clouds(2, 0))
    xyz, feats = clouds(16, 31)
    torch.save((xyz, feats), tmp_path / "clouds.pt")
    (tmp_path / "probe.py").write_text(PROBE)
    subprocess.run([sys.executable, "-I", str(tmp_path / "probe.py"), str(path), str(tmp_path / "clouds.pt"),
                    str(tmp_path / "logits.pt")], cwd=tmp_path, check=True, timeout=300,
                   env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"})
    probe_logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.allclose(probe_logits, qov.OpenVinoRunner(path, threads=1)(xyz, feats), atol=1e-6)
