"""Backbones and heads: output shapes, normalisation, head selection."""

import pytest
import torch

from scan_core.models import (
    ClusterHeads,
    ClusteringModel,
    ResNetCifarBackbone,
    SimCLRProjectionHead,
    SmallCNNBackbone,
    TorchvisionResNetBackbone,
    build_backbone,
)


@pytest.mark.parametrize(
    ("name", "channels", "size", "dim"),
    [
        ("small_cnn", 1, 28, 64),
        ("small_cnn", 3, 17, 64),
        ("resnet18_cifar", 3, 16, 512),
        ("resnet18", 3, 32, 512),
        ("resnet18", 1, 32, 512),
        ("resnet50", 3, 32, 2048),
    ],
)
def test_backbone_shapes(name: str, channels: int, size: int, dim: int) -> None:
    net = build_backbone(name, channels).eval()
    assert net.out_dim == dim
    with torch.no_grad():
        out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, dim)


def test_backbone_validation() -> None:
    with pytest.raises(ValueError, match="Unknown backbone"):
        build_backbone("vgg", 3)
    with pytest.raises(ValueError, match="depth"):
        TorchvisionResNetBackbone(depth=34)
    with pytest.raises(ValueError, match="in_channels"):
        SmallCNNBackbone(in_channels=0)


def test_cifar_variant_keeps_resolution_in_stem() -> None:
    net = ResNetCifarBackbone(3)
    assert net.net.conv1.stride == (1, 1) and isinstance(net.net.maxpool, torch.nn.Identity)


def test_projection_head_is_normalised() -> None:
    head = SimCLRProjectionHead(64, 128)
    z = head(torch.randn(5, 64))
    assert z.shape == (5, 128)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)


def test_cluster_heads_and_keep_head() -> None:
    heads = ClusterHeads(8, num_clusters=3, num_heads=4)
    assert heads(torch.randn(5, 8)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="num_clusters"):
        ClusterHeads(8, 1)
    model = ClusteringModel(SmallCNNBackbone(1, width=4), num_clusters=3, num_heads=4)
    x = torch.randn(2, 1, 16, 16)
    model.eval()
    expected = model(x)[2]
    model.keep_head(2)
    assert torch.allclose(model(x)[0], expected)
    assert model.num_clusters == 3
    with pytest.raises(ValueError, match="out of range"):
        model.keep_head(5)
