import pytest
import torch
from torch import nn

from metagg.layout import ParamLayout
from metagg.models import build_model


def test_round_trip_module():
    model = build_model("mlp:20,20:sigmoid", (1, 8, 8), 10)
    layout = ParamLayout.from_module(model)
    params = dict(model.named_parameters())
    assert layout.size == sum(p.numel() for p in model.parameters())
    flat = layout.flatten(params)
    assert flat.shape == (layout.size,)
    back = layout.unflatten(flat)
    assert list(back) == list(params)
    for name, p in params.items():
        assert torch.equal(back[name], p)


def test_unflatten_views_share_memory():
    layout = ParamLayout.from_shapes({"w": (2, 3), "b": (3,)})
    flat = torch.arange(9.0)
    views = layout.unflatten(flat)
    views["b"][0] = 100.0
    assert flat[6] == 100.0
    assert torch.equal(views["w"], torch.arange(6.0).view(2, 3))


def test_batched_flatten_unflatten():
    layout = ParamLayout.from_shapes({"w": (2, 3), "b": (3,)})
    stacked = torch.randn(5, 4, layout.size)
    views = layout.unflatten(stacked)
    assert views["w"].shape == (5, 4, 2, 3)
    assert torch.equal(layout.flatten(views), stacked)


def test_slices_offsets_and_json():
    layout = ParamLayout.from_shapes({"a": (4,), "b": (2, 2), "c": ()})
    assert [s.slice for s in layout] == [slice(0, 4), slice(4, 8), slice(8, 9)]
    assert layout["b"].offset == 4
    assert ParamLayout.from_json(layout.to_json()) == layout


def test_errors_name_the_problem():
    layout = ParamLayout.from_shapes({"w": (2, 3)})
    with pytest.raises(ValueError, match="has 5 entries, layout has 6"):
        layout.unflatten(torch.zeros(5))
    with pytest.raises(ValueError, match="'w' has shape"):
        layout.flatten({"w": torch.zeros(3, 2)})
    with pytest.raises(KeyError, match="missing"):
        layout.flatten({})


def test_any_module_and_frozen_params_skipped():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)
    layout = ParamLayout.from_module(model)
    assert "0.bias" not in layout
    assert layout.names == ("0.weight", "2.weight", "2.bias")
    flat = layout.from_module_params(model)
    assert flat.dtype == torch.float32 and flat.shape == (layout.size,)
