"""The classifier: shapes, variants, checkpoint loading, FX tracing and int8 conversion."""
import copy

import pytest
import torch

from models import CheckpointError, create_model, list_models, load_checkpoint


def tiny(**kw):
    return create_model("pointnext-s", num_classes=5, width=8, **kw)


def test_create_model_knows_the_family():
    assert {"pointnext-s", "pointnext-b", "pointnext-l", "pointnext-xl"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'pointnet'"):
        create_model("pointnet")
    with pytest.raises(ValueError, match="bad override"):
        create_model("pointnext-s", widht=8)


@pytest.mark.parametrize("name", ["pointnext-s", "pointnext-b"])
def test_forward_gives_logits_for_default_and_explicit_features(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, width=8).eval()
    xyz = torch.rand(2, 64, 3)
    logits = model(xyz)
    assert logits.shape == (2, 5)
    assert torch.allclose(logits, model(xyz, xyz.transpose(1, 2).contiguous()))


def test_scanobjectnn_variant_takes_four_input_channels():
    model = create_model("pointnext-s", num_classes=15, in_channels=4, width=8).eval()
    assert model(torch.rand(2, 64, 3), torch.rand(2, 4, 64)).shape == (2, 15)


def test_state_dict_keys_follow_openpoints_naming():
    keys = create_model("pointnext-s").state_dict().keys()
    assert "encoder.encoder.0.0.convs.0.0.weight" in keys
    assert "encoder.encoder.1.0.skipconv.0.weight" in keys
    assert "prediction.head.4.0.bias" in keys
    assert len(keys) == 84


def test_load_checkpoint_accepts_openpoints_layout_with_module_prefix(tmp_path):
    src, dst = tiny().eval(), tiny().eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 7}, path)
    extras = load_checkpoint(dst, path)
    assert extras["epoch"] == 7
    xyz = torch.rand(2, 64, 3)
    assert torch.equal(src(xyz), dst(xyz))


def test_load_checkpoint_names_missing_and_mismatched_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_model("pointnext-s", num_classes=7, width=8).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatches: prediction\.head\.4\.0\.weight"):
        load_checkpoint(tiny(), path)
    extras = load_checkpoint(tiny(), path, strict=False)
    assert extras["skipped_keys"] == ["prediction.head.4.0.weight", "prediction.head.4.0.bias"]


class _Exploit:
    """Unpickling this runs `touch marker`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch '{self.marker}'",))


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tiny(), path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: unsafe loading would have run it
    assert marker.exists()


def test_load_checkpoint_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tiny(), tmp_path / "nope.pth")


def test_classifier_traces_with_neighbour_ops_as_leaves():
    graph = torch.fx.symbolic_trace(tiny()).graph
    leaves = {n.target.__name__ for n in graph.nodes if n.op == "call_function" and hasattr(n.target, "__name__")}
    assert {"sample_and_group", "group_all", "checked_inputs"} <= leaves  # the input check runs at run time
    assert "furthest_point_sample" not in leaves and "ball_query" not in leaves


@pytest.mark.parametrize("xyz, feats, message", [
    (torch.randn(2, 64), None, r"xyz \(B, N, 3\) expected, got shape \[2, 64\]"),
    (torch.randn(2, 64, 4), None, r"xyz \(B, N, 3\) expected, got shape \[2, 64, 4\]"),
    (torch.randint(0, 5, (2, 64, 3)), None, r"xyz \(B, N, 3\) must be floating point, got torch.int64"),
    (torch.randn(2, 15, 3), None, r"xyz \(B, N, 3\) has N=15 points, but the downsampling stages need N >= 16"),
    (torch.randn(2, 64, 3), torch.randn(2, 4, 64), r"feats \(B, C, N\) expected \[2, 3, 64\].*got \[2, 4, 64\]"),
    (torch.randn(2, 64, 3), torch.randn(2, 3, 63), r"feats \(B, C, N\) expected \[2, 3, 64\].*got \[2, 3, 63\]"),
    (torch.randn(2, 64, 3), torch.randn(2, 3, 64).double(), r"feats \(B, C, N\) is torch.float64 but xyz"),
])
def test_forward_refuses_wrong_inputs_with_a_value_error_naming_the_layout(xyz, feats, message):
    with pytest.raises(ValueError, match=message):
        tiny().eval()(xyz, feats)


def test_input_check_runs_in_traced_and_scripted_models_and_knows_the_strides():
    from torch.fx.experimental.optimization import fuse

    model = create_model("pointnext-s", num_classes=4, width=8, strides=(1, 4, 2, 2, 2, 1)).eval()
    assert model.min_points == 32
    traced = torch.fx.symbolic_trace(model)
    assert traced(torch.randn(1, 32, 3)).shape == (1, 4)
    with pytest.raises(ValueError, match=r"xyz \(B, N, 3\) has N=31 points"):
        traced(torch.randn(1, 31, 3))
    with pytest.raises(torch.jit.Error, match=r"ValueError: PointNeXtCls: xyz \(B, N, 3\) has N=31"):
        torch.jit.script(fuse(model))(torch.randn(1, 31, 3))  # the artifact's route: TorchScript's own error type


def test_fx_qat_prepare_and_convert_quantize_every_conv_and_linear():
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    torch.manual_seed(0)
    xyz = torch.rand(4, 128, 3)
    prepared = prepare_qat_fx(tiny().train(), get_default_qat_qconfig_mapping("fbgemm"), (xyz,))
    for _ in range(4):
        prepared(torch.rand(4, 128, 3))
    prepared(xyz).sum().backward()
    prepared.eval()
    int8 = convert_fx(copy.deepcopy(prepared))
    float_layers = [n for n, m in int8.named_modules() if type(m) in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)]
    assert float_layers == []
    quantized = [n for n, m in int8.named_modules() if type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized")
                 or type(m).__module__.startswith("torch.ao.nn.quantized")]
    assert len(quantized) >= 13  # 1 stem + 4×(2 convs + skip) + 2 global + 3 linear, fused where possible
    fake, real = prepared(xyz), int8(xyz)
    assert torch.equal(fake.argmax(1), real.argmax(1))
