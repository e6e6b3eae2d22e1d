import pytest
import torch

from metagg.layout import ParamLayout
from metagg.models import build_model, parse_model_spec


@pytest.mark.parametrize(
    "spec,shape,d",
    [
        ("mlp:20:sigmoid", (1, 8, 8), 64 * 20 + 20 + 20 * 10 + 10),
        ("mlp:40:sigmoid", (1, 8, 8), 64 * 40 + 40 + 40 * 10 + 10),
        ("mlp:20,20:sigmoid", (1, 8, 8), 64 * 20 + 20 + 20 * 20 + 20 + 210),
        ("mlp:20:relu", (64,), 1510),
        ("mlp:128,128:relu", (1, 28, 28), 784 * 128 + 128 + 128 * 128 + 128 + 1290),
        ("linear", (1, 8, 8), 650),
    ],
)
def test_mlp_sizes(spec, shape, d):
    model = build_model(spec, shape, 10)
    assert ParamLayout.from_module(model).size == d
    assert model(torch.zeros(3, *shape)).shape == (3, 10)


@pytest.mark.parametrize("spec", ["cnn:ji2019", "cnn:c10"])
def test_cnns_forward(spec):
    model = build_model(spec, (3, 32, 32), 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_c10_architecture():
    model = build_model("cnn:c10", (3, 32, 32), 10)
    assert model.conv0.stride == (2, 2)
    assert [m.out_channels for m in (model.conv0, model.conv1, model.conv2)] == [32, 64, 64]


def test_names_shared_across_sizes():
    a = ParamLayout.from_module(build_model("mlp:20:sigmoid", (64,), 10))
    b = ParamLayout.from_module(build_model("mlp:40:sigmoid", (64,), 10))
    assert a.names == b.names == ("hidden0.weight", "hidden0.bias", "output.weight", "output.bias")


@pytest.mark.parametrize("spec", ["mlp:20", "mlp:x:relu", "mlp:20:swish", "resnet", "cnn:foo"])
def test_bad_specs(spec):
    with pytest.raises(ValueError, match=r"spec|activation|hidden"):
        parse_model_spec(spec)


def test_cnn_needs_images():
    with pytest.raises(ValueError, match="image inputs"):
        build_model("cnn:c10", (64,), 10)
