"""`qat.deploy`: convert → export → reload → verify, on a calibrated PointNeXt-S (width 8, 64 points, FX).

(The PT2E path, compiled at each batch size, runs end to end in tests/test_tools_pt2e.py.)
"""
from __future__ import annotations

import zipfile

import pytest
import torch

import qat
from models import create_model
from qat import QConfigSpec
from qat.export import packed_size_mb, read_sidecar
from test_qat_standin import one_thread  # noqa: F401 (autouse fixture)

N = 64  # points per cloud


def clouds(batch: int, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.rand(batch, N, 3, generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = create_model("pointnext-s", num_classes=5, width=8).eval()
    spec = QConfigSpec()
    prepared = qat.prepare_ptq(model, spec, clouds(2))
    qat.calibrate(prepared, [clouds(8, seed) for seed in range(3)], forward_fn=lambda m, batch: m(*batch))
    return model, spec, prepared


def test_deploy_measures_the_artifact_reloaded_from_disk(calibrated, tmp_path):
    model, spec, prepared = calibrated
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    seen = []

    def verify(runner):
        seen.append(runner)
        return runner(*clouds(3, 7))

    deployed = qat.deploy(prepared, spec, tmp_path, {"num_points": N}, example_inputs=clouds, batch_sizes=(1, 4),
                          float_model=model, verify=verify)
    assert deployed.artifact == tmp_path / "model_int8.pt" and read_sidecar(deployed.artifact)["num_points"] == N
    # verify ran on the file read back (TorchScript), not on the converted model in memory
    assert seen == [deployed.runner] and isinstance(deployed.runner, torch.jit.ScriptModule)
    assert not isinstance(deployed.int8, torch.jit.ScriptModule)  # control: the two are distinguishable
    assert torch.equal(deployed.verified, deployed.int8(*clouds(3, 7)))  # the file runs like the converted model
    assert deployed.size_mb == deployed.artifact.stat().st_size / 1e6
    assert deployed.size_mb_packed == packed_size_mb(model, spec) < deployed.size_mb
    assert deployed.backend == spec.backend and deployed.compile_s is None  # FX compiles nothing
    assert deployed.convert_s > 0
    assert all(torch.equal(v, before[k]) for k, v in prepared.state_dict().items())  # prepared left as it was


def test_load_deployed_runs_an_fx_artifact_as_loaded(calibrated, tmp_path):
    model, spec, prepared = calibrated
    deployed = qat.deploy(prepared, spec, tmp_path, {"num_points": N}, example_inputs=clouds, batch_sizes=(1,),
                          float_model=model)
    assert deployed.verified is None  # no verify asked for
    for compile in (True, False):
        runner, compile_s = qat.load_deployed(deployed.artifact, [clouds(2)], compile=compile)
        assert compile_s is None and torch.equal(runner(*clouds(2, 5)), deployed.runner(*clouds(2, 5)))


# ---- the artifact's neighbour ops (the `artifact` setting) ---------------------------------------
@pytest.mark.parametrize("built, expected", [(True, "kernels"), (False, "portable")])
def test_artifact_auto_is_the_compiled_ops_when_built(monkeypatch, built, expected):
    from models import _kernels
    monkeypatch.setattr(_kernels, "available", lambda: built)
    assert qat.artifact_mode("auto") == expected
    assert qat.artifact_mode("portable") == "portable"


def test_artifact_kernels_without_the_compiled_ops_is_one_line_naming_the_fix(monkeypatch):
    from models import _kernels
    monkeypatch.setattr(_kernels, "available", lambda: False)
    with pytest.raises(ValueError, match=r"^artifact=kernels: .* or use artifact=portable$"):
        qat.artifact_mode("kernels")
    with pytest.raises(ValueError, match="artifact=fast: use auto, portable or kernels"):
        qat.artifact_mode("fast")


def scripted_code(artifact) -> str:
    """The TorchScript source inside an artifact (its records are deflated)."""
    with zipfile.ZipFile(artifact) as archive:
        return "".join(archive.read(n).decode() for n in archive.namelist() if "/code/" in n and n.endswith(".py"))


def test_deploy_with_kernels_ships_their_library_and_runs_like_the_portable_file(calibrated, tmp_path):
    from models import _kernels
    if not _kernels.available():
        pytest.skip("models._C is not built")
    model, spec, prepared = calibrated
    files = {}
    for mode in ("portable", "kernels"):
        deployed = qat.deploy(prepared, spec, tmp_path / mode, {"num_points": N}, example_inputs=clouds,
                              batch_sizes=(1,), float_model=model, verify=lambda runner: runner(*clouds(3, 7)),
                              mode=mode)
        files[mode] = (deployed, sorted(p.name for p in (tmp_path / mode).iterdir()))
    (portable, portable_files), (kernels, kernels_files) = files["portable"], files["kernels"]
    assert portable.mode == "portable" and "kdqat_C" not in scripted_code(portable.artifact)
    assert kernels.mode == "kernels" and "kdqat_C" in scripted_code(kernels.artifact)
    assert set(kernels_files) - set(portable_files) == {"model_int8_kdqat_C.so"}  # the library travels with it
    assert read_sidecar(kernels.artifact)["load"] == "torch.ops.load_library('model_int8_kdqat_C.so')"
    assert torch.equal(kernels.verified, portable.verified)  # same logits, bit for bit


def test_an_artifact_is_a_function_of_the_model_alone(calibrated, tmp_path):
    """Saving writes the same bytes every time: torch draws a random `serialization_id` on each save
    (the control below), the artifact's is a hash of its content. And the artifact holds no dropout,
    whose scripted constants come in the order of Python's per-process string hashes (another
    process would write them in another order; tests/test_tools_reruns.py compares across processes)."""
    from qat.export import _save_compact, _torchscript_warnings_silenced, _without_dropout

    _, _, prepared = calibrated
    int8 = qat.convert(prepared)
    with _torchscript_warnings_silenced():
        scripted = torch.jit.script(_without_dropout(int8))
    for name in "ab":
        _save_compact(scripted, str(tmp_path / f"{name}.pt"))
        torch.jit.save(scripted, str(tmp_path / f"{name}_plain.pt"))
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert (tmp_path / "a_plain.pt").read_bytes() != (tmp_path / "b_plain.pt").read_bytes()  # torch's own save
    assert any(isinstance(m, torch.nn.Dropout) for m in int8.modules())  # control: there was one to remove
    artifact = qat.export_int8(int8, tmp_path / "model_int8.pt", {}, clouds(2))
    with zipfile.ZipFile(artifact) as archive:
        code = "".join(archive.read(n).decode() for n in archive.namelist() if n.endswith(".py"))
    assert "dropout" not in code.lower()


# ---- the int8 engine: one library packs every int8 model the project measures ----------------------
def test_convert_and_load_pack_for_the_project_engine_and_leave_the_process_setting_alone(calibrated, tmp_path,
                                                                                          monkeypatch):
    """Packing happens in `convert_fx` and in `torch.jit.load`: both run under oneDNN, whatever engine the
    process had chosen (torch's default `x86` would pick fbgemm on CPUs without AVX-512 VNNI), and the
    process keeps its own setting afterwards. The sidecar names the engine for users loading by hand."""
    if qat.preferred_int8_engine() != "onednn":
        pytest.skip("this torch build has no oneDNN quantized engine")
    model, spec, prepared = calibrated
    packed_under = []
    real_load, real_convert_fx = torch.jit.load, qat.fx.convert_fx

    def recording(real):
        def call(*args, **kwargs):
            packed_under.append(torch.backends.quantized.engine)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(torch.jit, "load", recording(real_load))
    monkeypatch.setattr(qat.fx, "convert_fx", recording(real_convert_fx))
    with qat.int8_engine("fbgemm"):  # a process that chose another engine (the negative control)
        deployed = qat.deploy(prepared, spec, tmp_path, {"num_points": N}, example_inputs=clouds, batch_sizes=(1,),
                              float_model=model)
        assert torch.backends.quantized.engine == "fbgemm"
        qat.load_int8(deployed.artifact, engine="fbgemm")  # asked for explicitly: honoured
    assert packed_under == ["onednn", "onednn", "fbgemm"]
    assert read_sidecar(deployed.artifact)["int8_engine"] == "onednn"


def test_an_engine_this_torch_lacks_is_refused_by_name():
    engine = torch.backends.quantized.engine
    with pytest.raises(ValueError, match="'avx9'.*" + qat.preferred_int8_engine()):
        with qat.int8_engine("avx9"):
            pass
    assert torch.backends.quantized.engine == engine
