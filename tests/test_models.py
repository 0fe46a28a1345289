"""Tests of gradosr.models: the built-in classifiers and the head utilities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradosr.errors import ConfigError
from gradosr.models import (
    CNN32,
    LeNet,
    ResNet18,
    available_models,
    build_model,
    find_head,
    find_head_name,
    reset_parameters,
    resize_head,
)

FEATURE_DIMS = {"lenet": 128, "cnn32": 128, "resnet18": 512}
CLASSES = {"lenet": LeNet, "cnn32": CNN32, "resnet18": ResNet18}

SHAPE_CASES = [
    (name, channels, size)
    for name in ("lenet", "cnn32")
    for channels in (1, 3)
    for size in (28, 32)
] + [("resnet18", 1, 32), ("resnet18", 3, 28)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batch-2 forwards are tiny: one intra-op thread avoids OpenMP sync overhead,
    which dominates (10x slower) when the 2 CPU cores are shared with other work."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Nested(nn.Module):
    """A user model whose head is nested in a Sequential and has no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Dropout(0.0), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def test_available_models() -> None:
    assert available_models() == ["lenet", "cnn32", "resnet18", "resnet50"]


def test_resnet50_is_imagenet_style() -> None:
    m = build_model("resnet50", 5, in_channels=3).eval()
    x = torch.randn(2, 3, 64, 64)
    assert m.forward_features(x).shape == (2, 2048) and m.feature_dim == 2048
    torch.testing.assert_close(m(x), m.head(m.forward_features(x)))
    assert 23e6 < sum(p.numel() for p in m.parameters()) < 24e6  # 23.5M + the 5-class head


@pytest.mark.parametrize(("name", "channels", "size"), SHAPE_CASES)
def test_forward_shapes_and_head_identity(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 5, channels).eval()
    assert isinstance(model, CLASSES[name])
    assert model.feature_dim == FEATURE_DIMS[name]
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
        assert feats.shape == (2, model.feature_dim)
        assert logits.shape == (2, 5)
        assert torch.equal(logits, model.head(feats))
    assert model.head.in_features == model.feature_dim
    assert model.head.out_features == 5


@pytest.mark.parametrize("name", ["lenet", "cnn32", "resnet18"])
def test_find_head_on_builtin_models(name: str) -> None:
    model = build_model(name, 4)
    assert find_head(model) is model.head
    assert find_head_name(model) == "head"
    params = dict(model.named_parameters())
    assert params["head.weight"] is model.head.weight
    assert params["head.bias"] is model.head.bias


@pytest.mark.parametrize("name", ["lenet", "cnn32", "resnet18"])
def test_parameter_names_do_not_depend_on_num_classes(name: str) -> None:
    names4 = [n for n, _ in build_model(name, 4).named_parameters()]
    names6 = [n for n, _ in build_model(name, 6).named_parameters()]
    assert names4 == names6
    assert names4[-2:] == ["head.weight", "head.bias"]
    resized = [n for n, _ in resize_head(build_model(name, 6), 4).named_parameters()]
    assert resized == names4


def test_find_head_on_sequential() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert find_head_name(model) == "3"
    assert find_head(model) is model[3]
    assert "3.weight" in dict(model.named_parameters())


def test_find_head_nested_and_head_attribute_not_linear() -> None:
    model = Nested()
    assert find_head_name(model) == "classifier.3"
    assert find_head(model) is model.classifier[3]

    class WithHeadBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    assert find_head_name(WithHeadBlock()) == "head.2"


def test_find_head_without_linear_raises() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ConfigError, match="cannot find the classification head"):
        find_head(model)
    with pytest.raises(ConfigError, match="cannot find the classification head"):
        find_head_name(model)


def test_resize_head_nested_user_model() -> None:
    torch.manual_seed(0)
    model = Nested().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = resize_head(model, 7)
    assert out is model
    new_head = model.classifier[3]
    assert isinstance(new_head, nn.Linear)
    assert (new_head.in_features, new_head.out_features) == (5, 7)
    assert new_head.bias is None
    assert new_head.weight.dtype == torch.float64
    assert model(torch.randn(2, 3, 2, 2, dtype=torch.float64)).shape == (2, 7)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for name, value in before.items():
        if name != "classifier.3.weight":
            assert torch.equal(after[name], value), name
    assert after["classifier.3.weight"].shape == (7, 5)


def test_resize_head_bare_linear_and_alias() -> None:
    bare = nn.Linear(4, 3)
    assert find_head_name(bare) == ""
    assert resize_head(bare, 5) is bare
    assert bare(torch.zeros(2, 4)).shape == (2, 5)

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
            self.head = self.classifier[1]

    model = Aliased()
    resize_head(model, 6)
    assert model.head is model.classifier[1]
    assert model.head.out_features == 6


def test_resize_head_builtin_model() -> None:
    model = build_model("lenet", 6).eval()
    old_fc = model.features[10].weight.detach().clone()
    resize_head(model, 3)
    assert isinstance(model.head, nn.Linear)
    assert model.head.out_features == 3
    assert model.head.bias is not None
    assert not model.head.training
    assert model.num_classes == 3
    assert torch.equal(model.features[10].weight, old_fc)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(ConfigError):
        resize_head(model, 1)


def test_reset_parameters_seeded() -> None:
    model = build_model("cnn32", 4)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 16, 16) + 3.0)  # move BatchNorm running stats
    bn = model.features[2]
    assert isinstance(bn, nn.BatchNorm2d)
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    rng_state = torch.random.get_rng_state()
    reset_parameters(model, seed=123)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.equal(first["head.weight"], before["head.weight"])
    assert not torch.equal(first["features.1.weight"], before["features.1.weight"])

    reset_parameters(model, seed=123)
    second = model.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key

    reset_parameters(model, seed=124)
    assert not torch.equal(model.state_dict()["head.weight"], first["head.weight"])
    reset_parameters(model)  # unseeded also works
    assert not torch.equal(model.state_dict()["head.weight"], first["head.weight"])


@pytest.mark.parametrize("name", ["lenet", "cnn32", "resnet18"])
@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.5, True, "4"])
def test_bad_num_classes(name: str, num_classes: object) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(name, num_classes)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [LeNet, CNN32, ResNet18])
@pytest.mark.parametrize("in_channels", [0, 2, 4, 1.0])
def test_bad_in_channels(cls: type[nn.Module], in_channels: object) -> None:
    with pytest.raises(ConfigError, match="in_channels"):
        cls(3, in_channels)


def test_numpy_integers_accepted() -> None:
    np = pytest.importorskip("numpy")
    model = build_model("lenet", np.int64(4), np.int64(3))
    assert model.head.out_features == 4 and type(model.num_classes) is int
    assert resize_head(model, np.int32(5)).head.out_features == 5


def test_unknown_model_name() -> None:
    with pytest.raises(ConfigError, match="lenet, cnn32, resnet18"):
        build_model("vgg16", 4)
    with pytest.raises(ValueError):  # ConfigError is also a ValueError
        build_model("", 4)
