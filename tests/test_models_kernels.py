"""Compiled neighbour ops (`models._C`) against the pure-PyTorch reference: identical indices.

The reference itself is checked against literal transcriptions of the CUDA kernels in
tests/test_models_neighbors.py; here every comparison is exact equality with it.
"""
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from models import _kernels, create_model
from models import neighbors as N

needs_kernels = pytest.mark.skipif(not _kernels.available(), reason="models._C is not built "
                                   "(python setup.py build_ext --inplace)")


def compiled_and_pure(fn, *args):
    """`fn(*args)` through the compiled ops, then through the pure-PyTorch reference."""
    compiled = fn(*args)
    with _kernels.pure_torch():
        return compiled, fn(*args)


def assert_fps_identical(xyz: torch.Tensor, npoint: int) -> None:
    compiled, pure = compiled_and_pure(N.furthest_point_sample, xyz, npoint)
    assert compiled.dtype == torch.long and torch.equal(compiled, pure)


def assert_ball_query_identical(radius: float, nsample: int, support: torch.Tensor, query: torch.Tensor) -> None:
    compiled, pure = compiled_and_pure(N.ball_query, radius, nsample, support, query)
    assert compiled.dtype == torch.long and torch.equal(compiled, pure)


def lattice(side: int) -> torch.Tensor:
    """An integer grid, (1, side³, 3): exact distance ties everywhere."""
    return torch.stack(torch.meshgrid(*[torch.arange(float(side))] * 3, indexing="ij"), -1).reshape(1, -1, 3)


def test_kernels_are_built_when_required():
    if os.environ.get("KDQAT_REQUIRE_KERNELS") != "1":
        pytest.skip("KDQAT_REQUIRE_KERNELS=1 not set")
    assert _kernels.available(), "models._C is missing: build it with `python setup.py build_ext --inplace`"


def test_pure_torch_switch_is_scoped_and_reference_survives():
    xyz = torch.rand(1, 8, 3)
    with _kernels.pure_torch():
        assert not _kernels.use_kernels(xyz)
    assert _kernels.use_kernels(xyz) == _kernels.available()
    assert not _kernels.use_kernels(xyz.half()) and not _kernels.use_kernels(xyz, xyz.double())


@needs_kernels
@pytest.mark.parametrize("batch, num_points, npoint", [(1, 1024, 512), (3, 70, 20), (2, 100, 100), (4, 37, 1),
                                                       (1, 1, 1), (2, 513, 257), (5, 2048, 64)])
def test_fps_matches_reference_on_random_clouds(batch, num_points, npoint):
    xyz = torch.randn(batch, num_points, 3, generator=torch.Generator().manual_seed(num_points))
    assert_fps_identical(xyz, npoint)


@needs_kernels
@pytest.mark.parametrize("side, npoint", [(4, 64), (5, 125), (6, 100), (10, 500)])
def test_fps_matches_reference_on_lattices_with_exact_ties(side, npoint):
    assert_fps_identical(lattice(side), npoint)


@needs_kernels
def test_fps_matches_reference_with_duplicates_and_coincident_clouds():
    grid = lattice(4)
    assert_fps_identical(torch.cat([grid, grid[:, :36], grid[:, 10:30]], dim=1), 120)  # fewer distinct than npoint
    assert_fps_identical(torch.zeros(2, 50, 3), 50)  # every distance zero
    assert_fps_identical(torch.tensor([[[0.0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]]]), 5)


@needs_kernels
def test_fps_matches_reference_for_float64_and_strided_input():
    gen = torch.Generator().manual_seed(7)
    assert_fps_identical(torch.rand(2, 300, 3, generator=gen, dtype=torch.float64), 150)
    wide = torch.rand(2, 3, 300, generator=gen)
    assert_fps_identical(wide.transpose(1, 2), 100)  # (B, N, 3) view of a (B, 3, N) tensor
    assert_fps_identical(torch.rand(2, 600, 3, generator=gen)[:, ::2], 100)
    assert_fps_identical(lattice(5).double() * 0.1, 60)  # near-ties after rounding


@needs_kernels
def test_fps_compiled_refuses_bad_npoint_like_the_reference():
    with pytest.raises(ValueError, match="npoint"):
        torch.ops.kdqat_C.furthest_point_sample(torch.rand(1, 4, 3), 5)
    with pytest.raises(ValueError, match="npoint"):
        N.furthest_point_sample(torch.rand(1, 4, 3), 0)


@needs_kernels
@pytest.mark.parametrize("batch, num_support, num_query, radius, nsample", [
    (1, 1024, 512, 0.1, 32), (2, 500, 200, 0.2, 32), (3, 64, 64, 0.35, 16), (1, 50, 13, 1.5, 64), (4, 10, 3, 0.05, 8)])
def test_ball_query_matches_reference_on_random_clouds(batch, num_support, num_query, radius, nsample):
    gen = torch.Generator().manual_seed(num_support)
    support, query = torch.rand(batch, num_support, 3, generator=gen), torch.rand(batch, num_query, 3, generator=gen)
    assert_ball_query_identical(radius, nsample, support, query)
    assert_ball_query_identical(radius, nsample, support, support)  # the local_group case


@needs_kernels
def test_ball_query_matches_reference_for_sparse_empty_and_centre_only_balls():
    gen = torch.Generator().manual_seed(0)
    support = torch.rand(2, 50, 3, generator=gen)
    query = torch.cat([support[:, :10], torch.full((2, 3, 3), 5.0)], dim=1)  # three empty balls
    assert_ball_query_identical(0.2, 8, support, query)
    isolated = torch.arange(20.0).repeat(3, 1).T.reshape(1, 20, 3)  # 1.7 apart: each ball holds its centre only
    assert_ball_query_identical(0.5, 4, isolated, isolated)
    assert_ball_query_identical(1.0, 8, support[:, :3] * 0.01, support[:, :1])  # nsample > N


@needs_kernels
@pytest.mark.parametrize("radius", [1.0, 2.0, 0.1, 0.2])  # 0.1, 0.2: r² rounds down in float32
def test_ball_query_matches_reference_on_lattices_with_points_on_the_sphere(radius):
    grid = lattice(5) * 0.1 if radius < 1 else lattice(5)
    assert_ball_query_identical(radius, 16, grid, grid)
    assert_ball_query_identical(radius, 16, grid.double(), grid.double())


@needs_kernels
def test_ball_query_matches_reference_a_few_ulp_around_the_sphere_and_on_strided_input():
    gen = torch.Generator().manual_seed(4)
    query = torch.rand(2, 6, 3, generator=gen) + 20.0
    directions = torch.nn.functional.normalize(torch.randn(2, 6, 20, 3, generator=gen), dim=-1)
    scale = 1 + torch.randint(-4, 5, (2, 6, 20, 1), generator=gen) * 1e-7
    support = (query.unsqueeze(2) + 0.3 * directions * scale).reshape(2, 120, 3)
    assert_ball_query_identical(0.3, 16, support, query)
    assert_ball_query_identical(0.3, 16, support.transpose(1, 2).contiguous().transpose(1, 2), query[:, ::2])


@needs_kernels
def test_shared_neighborhoods_serve_compiled_results():
    xyz = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(5))
    with N.shared_neighborhoods() as memo:
        first = N.furthest_point_sample(xyz, 16)
        assert N.furthest_point_sample(xyz.clone(), 16) is first
    assert (memo.hits, memo.misses) == (1, 1)
    with _kernels.pure_torch():
        assert torch.equal(first, N.furthest_point_sample(xyz, 16))


@needs_kernels
@pytest.mark.parametrize("name", ["pointnext-s", "pointnext-b"])
def test_pointnext_logits_are_bit_identical_with_compiled_and_pure_ops(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, width=8).eval()
    xyz = torch.rand(3, 128, 3, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        compiled, pure = compiled_and_pure(model, xyz)
    assert torch.equal(compiled, pure)


@needs_kernels
def test_fake_kernels_pass_opcheck():
    gen = torch.Generator().manual_seed(8)
    xyz = torch.rand(2, 40, 3, generator=gen)
    torch.library.opcheck(torch.ops.kdqat_C.furthest_point_sample, (xyz, 10))
    torch.library.opcheck(torch.ops.kdqat_C.ball_query, (xyz, xyz[:, :10], 0.3, 8))
    idx = torch.ops.kdqat_C.ball_query(xyz, xyz[:, :10], 0.3, 8)
    torch.library.opcheck(torch.ops.kdqat_C.group_points, (xyz, xyz[:, :10], torch.rand(2, 40, 6), idx, 0.3, True))


@needs_kernels
def test_torch_export_keeps_the_compiled_ops_as_single_nodes():
    class Neighbourhoods(torch.nn.Module):
        def forward(self, xyz: torch.Tensor) -> torch.Tensor:
            centres = N.gather_points(xyz, N.furthest_point_sample(xyz, 16))
            return N.ball_query(0.3, 8, xyz, centres)

    xyz = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(12))
    program = torch.export.export(Neighbourhoods(), (xyz,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("kdqat_C.furthest_point_sample.default") == 1
    assert targets.count("kdqat_C.ball_query.default") == 1
    assert torch.equal(program.module()(xyz), Neighbourhoods()(xyz))


@needs_kernels
def test_torch_export_keeps_grouping_as_aten_ops_even_in_inference():
    """The compiled grouping has no backward and would tie a PT2E program to this library."""
    class Group(torch.nn.Module):
        def forward(self, xyz: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
            return N.local_group(xyz, feats, 0.3, 8, True)

    xyz, feats = torch.rand(2, 64, 3), torch.randn(2, 4, 64)
    with torch.no_grad():
        program = torch.export.export(Group(), (xyz, feats))
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert "kdqat_C.group_points.default" not in targets and "aten.index_select.default" in targets
        assert torch.equal(program.module()(xyz, feats), Group()(xyz, feats))

@needs_kernels
def test_scripting_chooses_the_ops_per_call_and_leaves_default_scripts_portable():
    xyz = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(9))
    portable = torch.jit.script(N.furthest_point_sample)
    with_kernels = _kernels.script(N.furthest_point_sample, kernels=True)
    again = torch.jit.script(N.furthest_point_sample)
    assert "kdqat_C" in with_kernels.code and "kdqat_C" not in portable.code + again.code
    assert torch.equal(with_kernels(xyz, 16), portable(xyz, 16))




# ---- float grouping: the compiled op serves inference only, training keeps torch's autograd ----
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize_dp", [False, True])
def test_grouping_matches_reference_in_inference(dtype, normalize_dp):
    gen = torch.Generator().manual_seed(14)
    xyz, feats = torch.rand(3, 200, 3, generator=gen, dtype=dtype), torch.randn(3, 7, 200, generator=gen, dtype=dtype)
    with torch.no_grad():
        compiled, pure = compiled_and_pure(N.local_group, xyz, feats, 0.15, 16, normalize_dp)
        assert torch.equal(compiled, pure) and compiled.stride() == pure.stride()
        sparse = compiled_and_pure(N.sample_and_group, xyz, feats, 4, 0.05, 32, normalize_dp)  # padded balls
    assert all(torch.equal(c, p) and c.stride() == p.stride() for c, p in zip(*sparse))


@needs_kernels
def test_grouping_keeps_differentiable_torch_ops_when_a_gradient_is_needed():
    gen = torch.Generator().manual_seed(15)
    xyz, feats = torch.rand(2, 64, 3, generator=gen), torch.randn(2, 4, 64, generator=gen).requires_grad_()
    (grad,) = torch.autograd.grad(N.local_group(xyz, feats, 0.3, 8, True).square().sum(), feats)
    with _kernels.pure_torch():
        (expected,) = torch.autograd.grad(N.local_group(xyz, feats, 0.3, 8, True).square().sum(), feats)
    assert torch.equal(grad, expected)


@needs_kernels
def test_scripted_grouping_calls_the_compiled_op_only_with_kernels_and_without_gradients():
    gen = torch.Generator().manual_seed(17)
    xyz, feats = torch.rand(2, 64, 3, generator=gen), torch.randn(2, 5, 64, generator=gen)
    portable = torch.jit.script(N.local_group)
    with_kernels = _kernels.script(N.local_group, kernels=True)
    assert "kdqat_C::group_points" in str(with_kernels.inlined_graph)
    assert "kdqat_C" not in str(portable.inlined_graph)
    with torch.no_grad():
        assert torch.equal(with_kernels(xyz, feats, 0.3, 16, True), portable(xyz, feats, 0.3, 16, True))
    assert with_kernels(xyz, feats.requires_grad_(), 0.3, 16, True).grad_fn is not None

# ---- int8 grouping: the compiled gather writes what quantize_per_tensor(dp_fj) would, byte for byte ----
def assert_quantized_identical(compiled: torch.Tensor, pure: torch.Tensor) -> None:
    assert compiled.dtype == pure.dtype == torch.quint8
    assert (compiled.q_scale(), compiled.q_zero_point()) == (pure.q_scale(), pure.q_zero_point())
    assert compiled.shape == pure.shape and compiled.stride() == pure.stride()  # channels-last (B, 3 + C, M, K)
    assert torch.equal(compiled.int_repr(), pure.int_repr())


def quantized_feats(batch: int, channels: int, num_points: int, gen: torch.Generator) -> torch.Tensor:
    feats = torch.randn(batch, channels, num_points, generator=gen)
    return torch.quantize_per_tensor(feats, 0.03, 120, torch.quint8)


@needs_kernels
@pytest.mark.parametrize("normalize_dp", [False, True])
@pytest.mark.parametrize("batch, num_points, channels, radius, nsample, scale, zero_point", [
    (2, 256, 16, 0.15, 32, 0.011, 131), (3, 64, 5, 0.4, 16, 0.0047, 7), (1, 100, 1, 1.5, 64, 0.09, 250)])
def test_grouping_quantized_matches_reference_on_random_clouds(batch, num_points, channels, radius, nsample, scale,
                                                               zero_point, normalize_dp):
    gen = torch.Generator().manual_seed(num_points)
    xyz, feats = torch.rand(batch, num_points, 3, generator=gen), quantized_feats(batch, channels, num_points, gen)
    qparams = (torch.tensor(scale), torch.tensor(zero_point))
    assert_quantized_identical(*compiled_and_pure(N.local_group_quantized, xyz, feats, radius, nsample, normalize_dp,
                                                  *qparams))
    compiled, pure = compiled_and_pure(N.sample_and_group_quantized, xyz, feats, 4, radius, nsample, normalize_dp,
                                       *qparams, *qparams)
    assert all(torch.equal(c.int_repr() if c.is_quantized else c, p.int_repr() if p.is_quantized else p)
               for c, p in zip(compiled, pure))
    assert_quantized_identical(compiled[2], pure[2])


@needs_kernels
def test_grouping_quantized_matches_reference_on_halfway_points_clamping_and_padded_balls():
    """dp exactly on .5 steps of the grid (ties to even), on fbgemm's `x * (1/scale)` halfway case
    (127.5 by the product, 127.49999 by a division), far outside the grid (clamped), duplicates,
    and balls with fewer than K points (their indices repeat the first)."""
    halves = (torch.arange(-12, 12) + 0.5) * 0.25  # scale 0.25: dp / scale lands on k + 0.5 exactly
    support = torch.zeros(1, 40, 3)
    support[0, :24, 0], support[0, :24, 1], support[0, :24, 2] = halves, -halves, halves.flip(0)
    support[0, 24] = torch.tensor([0.273939937, -0.273939937, 0.0])  # fbgemm's example, scale 0.00214854861
    support[0, 25:28] = torch.tensor([[1e4, -1e4, 3.0], [-7e2, 7e2, 0.0], [0.1, 0.2, 0.3]])
    support[0, 28:] = support[0, 25:37].clone()  # duplicates
    query = torch.cat([torch.zeros(1, 1, 3), support[:, 25:28]], dim=1)
    idx = torch.tensor([[list(range(0, 32)), list(range(20, 40)) + [20] * 12, [25] * 32, [27, 39] + [27] * 30]])
    feats = torch.randn(1, 40, 6, generator=torch.Generator().manual_seed(3))
    for scale, zero_point in [(0.25, 0), (0.25, 128), (0.25, 255), (0.00214854861, 0), (0.003, 17)]:
        for normalize_dp, radius in [(False, 0.3), (True, 0.5), (True, 0.15)]:
            args = (query, support, feats, idx, radius, normalize_dp, torch.tensor(scale), torch.tensor(zero_point))
            assert_quantized_identical(*compiled_and_pure(N._dp_fj_quantized, *args))


@needs_kernels
def test_grouping_quantized_refuses_out_of_range_indices():
    xyz, feats = torch.rand(1, 10, 3), torch.zeros(1, 10, 4, dtype=torch.uint8)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.kdqat_C.group_points_quantized(xyz, xyz, feats, torch.full((1, 10, 2), 10), 0.1, False, 0.1, 0)


@needs_kernels
def test_grouping_quantized_has_no_fake_kernel_because_fake_tensors_have_no_quint8():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(NotImplementedError, match="quint8"):
        xyz = mode.from_tensor(torch.rand(1, 10, 3))
        torch.ops.kdqat_C.group_points_quantized(xyz, xyz, torch.zeros(1, 10, 4, dtype=torch.uint8),
                                                 torch.zeros(1, 10, 2, dtype=torch.long), 0.1, False, 0.1, 0)


@needs_kernels
def test_scripted_quantized_grouping_calls_the_compiled_op_only_with_kernels():
    gen = torch.Generator().manual_seed(13)
    xyz, feats = torch.rand(2, 64, 3, generator=gen), quantized_feats(2, 8, 64, gen)
    portable = torch.jit.script(N.local_group_quantized)
    with_kernels = _kernels.script(N.local_group_quantized, kernels=True)
    assert "kdqat_C::group_points_quantized" in str(with_kernels.inlined_graph)
    assert "kdqat_C" not in str(portable.inlined_graph)
    args = (xyz, feats, 0.3, 16, True, torch.tensor(0.02), torch.tensor(100))
    assert_quantized_identical(with_kernels(*args), portable(*args))

# ---- int8 artifacts: both modes load in a fresh interpreter without this project ----------------
PROBE = """import sys, torch
assert 'models' not in sys.modules
if sys.argv[4] != '-':
    torch.ops.load_library(sys.argv[4])
m = torch.jit.load(sys.argv[1])
torch.save(m(torch.load(sys.argv[2])), sys.argv[3])
"""


@pytest.fixture(scope="module")
def int8_model():
    import qat

    def clouds(batch, seed):
        return torch.rand(batch, 64, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    torch.manual_seed(0)
    prepared = qat.prepare_ptq(create_model("pointnext-s", num_classes=5, width=8).eval(), qat.QConfigSpec(),
                               (clouds(2, 0),))
    qat.calibrate(prepared, [(clouds(4, seed),) for seed in range(2)])
    return qat.convert(prepared), clouds(3, 11)



@needs_kernels
def test_int8_logits_are_bit_identical_with_compiled_and_pure_ops(int8_model):
    model, xyz = int8_model
    with torch.no_grad():
        compiled, pure = compiled_and_pure(model, xyz)
    assert torch.equal(compiled, pure)

@pytest.mark.parametrize("mode", ["portable", pytest.param("kernels", marks=needs_kernels)])
def test_int8_artifact_loads_in_a_bare_interpreter_and_gives_the_same_logits(int8_model, mode, tmp_path):
    from qat.export import export_int8, load_int8, read_sidecar

    model, xyz = int8_model
    path = export_int8(model, tmp_path / "model_int8.pt", {"num_points": 64}, mode=mode)
    sidecar = read_sidecar(path)
    library = tmp_path / sidecar["kernels"] if mode == "kernels" else None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model_int8.json", "model_int8.pt"] + ([library.name] if library else []))
    if library:
        assert sidecar["load"] == f"torch.ops.load_library('{library.name}')"
    (tmp_path / "probe.py").write_text(PROBE)
    torch.save(xyz, tmp_path / "xyz.pt")
    subprocess.run([sys.executable, "-I", str(tmp_path / "probe.py"), str(path), str(tmp_path / "xyz.pt"),
                    str(tmp_path / "logits.pt"), str(library) if library else "-"], cwd="/", check=True, timeout=300)
    with torch.no_grad():
        expected = model(xyz)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert torch.equal(load_int8(path)(xyz), expected)
    with zipfile.ZipFile(path) as archive:
        names_ops = any(b"kdqat_C" in archive.read(record) for record in archive.namelist())
    assert names_ops == (mode == "kernels") and ("kernels" in sidecar) == (mode == "kernels")


def test_export_refuses_an_unknown_mode(tmp_path):
    from qat.export import export_int8

    with pytest.raises(ValueError, match="mode='fast'"):
        export_int8(torch.nn.Identity(), tmp_path / "m.pt", {}, mode="fast")
    assert not list(tmp_path.iterdir())


@needs_kernels
def test_ball_query_on_non_finite_points_follows_the_cuda_kernel():
    """A NaN or infinite point is in no ball, and the other balls are unaffected, as in the kernel.

    (The pure-PyTorch reference differs here: its matmul prefilter turns the whole cloud's balls
    empty once one coordinate is not finite.)
    """
    from test_models_neighbors import ball_query_kernel_reference

    xyz = torch.rand(2, 50, 3, generator=torch.Generator().manual_seed(10))
    xyz[0, 7], xyz[1, 3, 1] = float("nan"), float("inf")
    assert torch.equal(N.ball_query(0.3, 8, xyz, xyz), ball_query_kernel_reference(0.3, 8, xyz, xyz))


@needs_kernels
def test_fps_matches_reference_with_nan_points():
    xyz = torch.rand(2, 50, 3, generator=torch.Generator().manual_seed(11))
    xyz[0, 7], xyz[1, 0, 1] = float("nan"), float("nan")
    assert_fps_identical(xyz, 10)
    assert_fps_identical(xyz, 50)
