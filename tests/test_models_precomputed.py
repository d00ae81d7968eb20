"""The network with its neighbour indices fed in (`models/_precomputed.py`), the peer benchmark's input."""
import pytest
import torch

from models import create_model
from models._precomputed import NeighbourIndices, PrecomputedPointNeXt


@pytest.mark.parametrize("variant", ["pointnext_s", "pointnext_b"])  # SA stages only; InvResMLP blocks too
def test_precomputed_network_equals_the_normal_forward_in_fp32(variant):
    torch.manual_seed(0)
    model = create_model(variant, num_classes=5, width=8).eval()
    xyz = torch.rand(2, 128, 3, generator=torch.Generator().manual_seed(1))
    feats = xyz.transpose(1, 2).contiguous()
    indices = torch.jit.script(NeighbourIndices.of(model))(xyz)  # scripted, as the benchmark times it
    with torch.no_grad():
        expected = model(xyz, feats)
        assert torch.equal(PrecomputedPointNeXt(model)(xyz, feats, *indices), expected)  # bit for bit
        # negative control: other neighbourhoods give other logits, so the equality above is not vacuous
        shuffled = [i.flip(-1).roll(1, dims=1) for i in indices]
        assert not torch.allclose(PrecomputedPointNeXt(model)(xyz, feats, *shuffled), expected)


def test_neighbour_indices_pair_centres_with_balls_per_searching_block():
    model = create_model("pointnext_s", num_classes=5, width=8).eval()
    indices = NeighbourIndices.of(model)(torch.rand(3, 64, 3))
    assert [tuple(i.shape) for i in indices] == [(3, 32), (3, 32, 32), (3, 16), (3, 16, 32), (3, 8), (3, 8, 32),
                                                 (3, 4), (3, 4, 32)]
