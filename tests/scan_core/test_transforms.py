"""Augmentation kernels against exact values; transforms for shapes, ranges and seeding."""

import pytest
import torch

from scan_core import transforms as T


def img(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values).view(1, 1, len(values), len(values[0]))


def test_to_float_and_normalize() -> None:
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2)
    assert T.to_float(x).tolist() == [[[[0.0, 1.0]]]]
    assert T.normalize(T.to_float(x)).tolist() == [[[[-2.0, 2.0]]]]


def test_brightness_contrast_saturation_exact() -> None:
    x = img([[0.2, 0.6]])
    assert torch.allclose(T.adjust_brightness(x, torch.tensor([0.5])), img([[0.1, 0.3]]))
    # contrast 0 -> flat at the mean (0.4); 2 -> doubled distance from the mean
    assert torch.allclose(T.adjust_contrast(x, torch.tensor([0.0])), img([[0.4, 0.4]]))
    assert torch.allclose(T.adjust_contrast(x, torch.tensor([2.0])), img([[0.0, 0.8]]))
    rgb = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    gray = T.adjust_saturation(rgb, torch.tensor([0.0]))
    assert torch.allclose(gray, torch.full((1, 3, 1, 1), 0.299))
    assert torch.equal(T.adjust_saturation(x, torch.tensor([0.0])), x)  # 1 channel: no-op


def test_per_image_factors_are_independent() -> None:
    x = torch.ones(2, 1, 2, 2) * 0.5
    out = T.adjust_brightness(x, torch.tensor([0.0, 1.0]))
    assert out[0].max() == 0 and torch.equal(out[1], x[1])


def test_solarize_posterize_exact() -> None:
    x = img([[0.2, 0.8]])
    assert torch.allclose(T.solarize(x, torch.tensor([0.5])), img([[0.2, 0.2]]))
    y = torch.tensor([[255.0, 100.0]]).view(1, 1, 1, 2) / 255
    got = T.posterize(y, torch.tensor([4])) * 255
    assert got.round().tolist() == [[[[240.0, 96.0]]]]  # 255 & 0xF0, 100 & 0xF0
    assert torch.allclose(T.posterize(y, torch.tensor([8])), y)


def test_autocontrast_and_equalize() -> None:
    x = img([[0.25, 0.5, 0.75]])
    assert torch.allclose(T.autocontrast(x), img([[0.0, 0.5, 1.0]]))
    narrow = (torch.arange(64 * 64) % 16 + 100).float().view(1, 1, 64, 64) / 255
    eq = T.equalize(narrow)
    assert narrow.max() - narrow.min() < 0.06
    assert eq.max() - eq.min() > 0.8  # a narrow histogram is spread over the whole range


def test_sharpness_identity_and_blur() -> None:
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    assert torch.allclose(T.adjust_sharpness(x, torch.tensor([1.0])), x)
    blurred = T.adjust_sharpness(x, torch.tensor([0.0]))
    assert blurred[0, 0, 2, 2] == pytest.approx(5 / 13)
    assert blurred[0, 0, 1, 1] == pytest.approx(1 / 13)
    assert blurred[0, 0, 0, 0] == 0  # borders are kept


def test_identity_affine_and_full_crop_are_exact() -> None:
    x = torch.rand(3, 1, 6, 5)
    theta = T.geometric_theta(angle_deg=torch.zeros(3))
    assert torch.allclose(T.affine(x, theta), x, atol=1e-6)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    assert torch.allclose(T.resized_crop(x, boxes, torch.zeros(3, dtype=torch.bool)), x, atol=1e-6)
    flipped = T.resized_crop(x, boxes, torch.ones(3, dtype=torch.bool))
    assert torch.allclose(flipped, x.flip(-1), atol=1e-6)


def test_resized_crop_to_a_smaller_size() -> None:
    x = torch.rand(2, 1, 8, 8)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    no_flip = torch.zeros(2, dtype=torch.bool)
    # a full-image crop rendered at half the size samples the centres of 2x2 blocks
    half = T.resized_crop(x, full, no_flip, size=4)
    expected = torch.nn.functional.avg_pool2d(x, 2)
    assert half.shape == (2, 1, 4, 4) and torch.allclose(half, expected, atol=1e-6)
    # the top-left quarter at 4x4 is that quarter's pixels exactly
    quarter = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2)
    assert torch.allclose(T.resized_crop(x, quarter, no_flip, size=4), x[..., :4, :4], atol=1e-6)
    assert T.resized_crop(x, full, no_flip, size=None).shape == x.shape


def test_scaled_size_and_small_simclr_views() -> None:
    assert T.scaled_size(28, 1.0) is None
    assert T.scaled_size(28, 0.72) == 20
    assert T.scaled_size(10, 0.1) == 8  # never below the minimum
    assert T.scaled_size(6, 0.5) == 6  # nor above the image
    with pytest.raises(ValueError, match="scale"):
        T.scaled_size(28, 1.5)
    with pytest.raises(ValueError, match="size"):
        T.SimCLRTransform(size=0)
    x = (torch.rand(5, 3, 28, 28) * 255).to(torch.uint8)
    views = T.SimCLRTransform(size=20)(x, torch.Generator().manual_seed(0))
    assert views.shape == (5, 3, 20, 20)
    assert T.SimCLRTransform()(x).shape == (5, 3, 28, 28)


def test_rotate_90_matches_rot90() -> None:
    x = torch.rand(1, 1, 4, 4)
    rotated = T.affine(x, T.geometric_theta(angle_deg=torch.tensor([90.0])))
    assert torch.allclose(rotated, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5) or torch.allclose(
        rotated, torch.rot90(x, -1, dims=(2, 3)), atol=1e-5
    )


def test_translate_moves_content() -> None:
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0
    moved = T.affine(
        x, T.geometric_theta(translate=(torch.tensor([0.25]), torch.tensor([0.0]))), fill=0.0
    )
    assert moved[0, 0, 1, 2] == pytest.approx(1.0)


def test_cutout_square_is_clipped() -> None:
    x = torch.ones(2, 1, 6, 6)
    out = T.cutout(x, torch.tensor([[0, 0], [3, 3]]), 4, fill=0.0)
    assert int((out[0] == 0).sum()) == 4  # 2x2 left inside the image at the corner
    assert int((out[1] == 0).sum()) == 16


def test_cutout_takes_a_side_per_image() -> None:
    x = torch.ones(3, 1, 8, 8)
    out = T.cutout(x, torch.tensor([[4, 4], [4, 4], [4, 4]]), torch.tensor([0, 1, 3]), fill=0.0)
    assert [int((o == 0).sum()) for o in out] == [0, 1, 9]
    assert out[2, 0, 3:6, 3:6].eq(0).all()  # rows/columns 4 - 3 // 2 = 3 .. 5


def test_strong_cutout_side_is_uniform_up_to_the_fraction() -> None:
    """As the official Cutout (``random.randint(1, length)``): every side from 1 to
    ``cutout_fraction * size`` pixels, each about equally often."""
    params = T.StrongTransform().make_params(28_000, 28, 28, torch.Generator().manual_seed(0))
    counts = torch.bincount(params.cutout_lengths, minlength=15)
    assert counts[0] == 0 and len(counts) == 15  # sides 1..14 (half of 28)
    assert counts[1:].min() > 1700 and counts[1:].max() < 2300  # 2,000 expected each
    none = T.StrongTransform(cutout_fraction=0.0).make_params(5, 28, 28, None)
    assert none.cutout_lengths.eq(0).all()


def test_crop_boxes_inside_image() -> None:
    g = torch.Generator().manual_seed(0)
    b = T.sample_crop_boxes(1000, (0.2, 1.0), generator=g)
    assert (b[:, :2] >= 0).all() and (b[:, :2] + b[:, 2:] <= 1 + 1e-6).all()
    area = b[:, 2] * b[:, 3]
    assert area.min() > 0.1 and area.max() <= 1.0


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "transform",
    [T.SimCLRTransform(), T.WeakTransform(), T.StrongTransform(), T.IdentityTransform()],
)
def test_transforms_shape_range_and_seed(channels: int, transform: torch.nn.Module) -> None:
    x = torch.randint(0, 256, (8, channels, 17, 11), dtype=torch.uint8)
    a = transform(x, torch.Generator().manual_seed(3))
    b = transform(x, torch.Generator().manual_seed(3))
    assert a.shape == (8, channels, 17, 11) and a.dtype == torch.float32
    assert torch.equal(a, b)
    lo, hi = T.normalize(torch.tensor(0.0)), T.normalize(torch.tensor(1.0))
    assert a.min() >= lo - 1e-5 and a.max() <= hi + 1e-5


def test_random_transforms_differ_between_calls() -> None:
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    for t in (T.SimCLRTransform(), T.StrongTransform()):
        assert not torch.equal(t(x, g), t(x, g))


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_transform_matches_ops_applied_image_by_image(channels: int) -> None:
    """The batched strong augmentation equals applying each drawn op to each image alone."""
    strong = T.StrongTransform()
    x = torch.rand(40, channels, 12, 12)
    params = strong.make_params(40, 12, 12, torch.Generator().manual_seed(3))
    batched = strong.transform(x.clone(), params)
    for i in range(40):
        one = T.resized_crop(x[i : i + 1], params.boxes[i : i + 1], params.flip[i : i + 1])
        for slot in range(strong.num_ops):
            name = T.STRONG_OPS[int(params.ops[i, slot])][0]
            one = T.apply_strong_op(one, name, params.magnitudes[i : i + 1, slot])
        one = T.cutout(one, params.cutout_centers[i : i + 1], params.cutout_lengths[i : i + 1])
        assert torch.allclose(batched[i : i + 1], one, atol=1e-5), f"image {i}"


@pytest.mark.parametrize("op", [name for name, _, _ in T.STRONG_OPS])
def test_every_strong_op_runs_on_both_channel_counts(op: str) -> None:
    for c in (1, 3):
        x = torch.rand(3, c, 9, 7)
        out = T.apply_strong_op(
            x, op, torch.tensor([0.1, 0.5, 0.9]) * (8 if op == "posterize" else 1)
        )
        assert out.shape == x.shape and out.min() >= -1e-6 and out.max() <= 1 + 1e-6


def test_strong_op_validation() -> None:
    with pytest.raises(ValueError, match="Unknown strong"):
        T.apply_strong_op(torch.rand(1, 1, 4, 4), "nope", torch.tensor([0.5]))
    with pytest.raises(ValueError, match="num_ops"):
        T.StrongTransform(num_ops=-1)
    with pytest.raises(ValueError, match="crop_scale_min"):
        T.SimCLRTransform(crop_scale_min=0.0)
