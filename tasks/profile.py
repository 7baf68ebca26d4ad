"""The lake profile behind the automatic settings (:mod:`scan_core.auto`): how many objects the
lake holds and what a sample of its images looks like (size, colour), read before the lake scan
because the scan decodes every image at the working size and channels the profile decides.

The sample is deterministic (evenly spaced over the sorted object keys), so an unchanged lake
gives the same profile and the same settings.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from scan_core.auto import ImageSample, LakeProfile, is_colourful
from scan_core.config import ImageConfig
from scan_core.images import ImageDecodeError, inspect_image, to_8bit_mode
from tasks.lake import lake_objects, refusal
from tasks.settings import MachineSettings
from tasks.storage import Storage

logger = logging.getLogger(__name__)

#: Images read to profile a lake.
SAMPLE_SIZE = 64


def sample_keys(keys: list[str], count: int = SAMPLE_SIZE) -> list[str]:
    """``count`` keys evenly spaced over the sorted ``keys`` (all of them when fewer)."""
    ordered = sorted(keys)
    if len(ordered) <= count:
        return ordered
    picks = np.linspace(0, len(ordered) - 1, count).round().astype(int)
    return [ordered[i] for i in sorted(set(picks.tolist()))]


def sample_image(data: bytes, max_pixels: int = ImageConfig().max_pixels) -> ImageSample | None:
    """Size and colour of one image (None when it is not a usable image)."""
    try:
        info = inspect_image(data, max_pixels)
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((64, 64))
            rgb = np.asarray(to_8bit_mode(image, 3, 0))
    except (ImageDecodeError, OSError, ValueError):
        return None
    return ImageSample(width=info.width, height=info.height, colour=is_colourful(rgb))


def profile_lake(lake_url: str, workspace_url: str) -> LakeProfile:
    """List the lake and profile a sample of its images."""
    settings = MachineSettings()
    lake, workspace = Storage(lake_url, settings), Storage(workspace_url, settings)
    objects = [
        o for o in lake_objects(lake, workspace) if refusal(o, settings.max_object_bytes) is None
    ]
    samples: list[ImageSample] = []
    for _, data in lake.read_many(sample_keys([o.key for o in objects]), errors="return"):
        if isinstance(data, bytes):
            sample = sample_image(data)
            if sample is not None:
                samples.append(sample)
    profile = LakeProfile(num_objects=len(objects), samples=tuple(samples))
    logger.info(
        "lake profile: %d objects; %d sampled images, median short side %d px, %.0f%% colour",
        profile.num_objects,
        len(samples),
        profile.median_side,
        100 * profile.colour_fraction,
    )
    return profile
