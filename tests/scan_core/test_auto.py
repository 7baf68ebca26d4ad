"""Automatic settings: deterministic, valid, enough steps for small lakes, capped for large
ones, scaled to a budget."""

import math

import numpy as np
import pytest

from scan_core.auto import (
    ImageSample,
    LakeProfile,
    auto_config,
    choose_image,
    estimate_seconds,
    is_colourful,
    size_class,
)
from scan_core.config import PipelineConfig

GREY = LakeProfile(num_objects=1000, samples=tuple(ImageSample(28, 28, False) for _ in range(8)))
PHOTOS = LakeProfile(num_objects=1000, samples=tuple(ImageSample(96, 80, True) for _ in range(8)))


def test_colour_is_told_from_greyscale_saved_as_rgb() -> None:
    grey = np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), 3, axis=2)
    assert not is_colourful(grey)
    red = grey.copy()
    red[..., 0] = 255
    assert is_colourful(red)
    assert not is_colourful(grey[..., 0])


def test_size_class_is_a_power_of_two() -> None:
    assert size_class(200) == 256 and size_class(70_000) == 65536 and size_class(1) == 2
    assert size_class(60_000) == size_class(70_000)  # a lake growing within its class


def test_image_section_follows_the_samples_and_the_device() -> None:
    image, reasons = choose_image(GREY, "cpu")
    assert image == {"channels": 1, "size": 28} and "0% of 8" in reasons["image.channels"]
    image, reasons = choose_image(PHOTOS, "cpu")
    assert image == {"channels": 3, "size": 32} and "capped at 32" in reasons["image.size"]
    assert choose_image(PHOTOS, "cuda")[0]["size"] == 64
    tiny = LakeProfile(num_objects=10, samples=(ImageSample(8, 8, False),))
    assert choose_image(tiny, "cpu")[0]["size"] == 16
    assert choose_image(LakeProfile(0, ()), "cpu")[0] == {"channels": 1, "size": 28}


def steps(config: PipelineConfig, n: int, stage: str) -> int:
    section = config.pretext if stage == "pretext" else config.scan
    return section.epochs * math.ceil(n / section.batch_size)


@pytest.mark.parametrize("n", [200, 1000, 5000, 20_000, 70_000, 1_000_000])
def test_schedules_give_small_lakes_steps_and_cap_large_ones(n: int) -> None:
    chosen = auto_config(GREY, n, "cpu")
    config = chosen.config
    assert steps(config, size_class(n), "pretext") >= 1500
    assert steps(config, size_class(n), "scan") >= 250
    assert chosen.estimate["total"] > 0 and chosen.lines()
    assert config.pretext.augment == "photo" and config.image.channels == 1
    assert 5 <= config.neighbors.k <= 20
    if n >= 20_000:
        assert config.pretext.epochs <= 80 and config.scan.epochs <= 15
    assert auto_config(GREY, n, "cpu").config == config  # deterministic


def test_colour_photos_get_colour_and_the_gpu_a_resnet() -> None:
    colour = auto_config(PHOTOS, 5000, "cpu").config
    assert colour.pretext.augment == "photo" and colour.image.channels == 3
    gpu = auto_config(PHOTOS, 5000, "cuda").config
    assert gpu.pretext.backbone == "resnet18_cifar" and gpu.image.size == 64


def test_a_budget_scales_the_schedule_down_and_never_below_the_minimums() -> None:
    free = auto_config(GREY, 70_000, "cpu")
    budget = free.estimate["total"] / 2
    fitted = auto_config(GREY, 70_000, "cpu", budget_seconds=budget)
    assert fitted.config.pretext.epochs < free.config.pretext.epochs
    assert fitted.estimate["total"] <= budget * 1.05
    assert "budget" in fitted.reasons["pretext.epochs"]
    faster = auto_config(GREY, 70_000, "cpu", budget_seconds=budget, speed=2.0)
    assert faster.config.pretext.epochs > fitted.config.pretext.epochs
    starved = auto_config(GREY, 70_000, "cpu", budget_seconds=60)
    assert (
        steps(starved.config, 65536, "pretext") >= 1500 and "minimum" in starved.reasons["budget"]
    )


def test_estimate_grows_with_epochs() -> None:
    config = auto_config(GREY, 5000, "cpu").config
    more = config.with_overrides({"pretext.epochs": config.pretext.epochs * 2})
    assert estimate_seconds(more, 5000)["pretext"] == pytest.approx(
        2 * estimate_seconds(config, 5000)["pretext"]
    )
