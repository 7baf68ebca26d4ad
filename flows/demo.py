"""The demo lake: real Fashion-MNIST images written as PNG objects plus a labels sidecar."""

from __future__ import annotations

import logging

import numpy as np
from prefect import flow

from scan_core.data import LABELS_SIDECAR, labels_table, lake_key, lake_objects, load_fashion_mnist
from tasks.errors import ScanLakeError
from tasks.storage import Storage

logger = logging.getLogger(__name__)

WRITE_BATCH = 1000


def write_demo_lake(lake_url: str, images: int = 20_000, start: int = 0) -> int:
    """Write Fashion-MNIST images ``start .. start + images - 1`` (train then test split) as PNG
    objects under ``lake_url``, and the labels sidecar for every image in the lake so far.

    Objects already present are not rewritten, so building twice is cheap and leaves the lake
    unchanged. Returns the number of objects written.

    Raises:
        ScanLakeError: the Debian package with the data set is missing, or too many images asked.
    """
    try:
        pixels, labels = load_fashion_mnist("all")
    except FileNotFoundError as exc:
        raise ScanLakeError(str(exc)) from exc
    end = start + images
    if images < 1 or end > len(pixels):
        raise ScanLakeError(
            f"The demo lake can hold 1 to {len(pixels)} Fashion-MNIST images, not "
            f"{start}..{end}: choose a smaller --images."
        )
    lake = Storage(lake_url)
    if lake.is_local:
        lake.fs.makedirs(lake.root, exist_ok=True)
    present = {o.key for o in lake.list_objects("images")}
    written = 0
    batch: dict[str, bytes] = {}
    for offset in range(start, end, WRITE_BATCH):
        chunk = pixels[offset : min(offset + WRITE_BATCH, end)]
        todo = [i for i in range(offset, offset + len(chunk)) if lake_key(i) not in present]
        if not todo:
            continue
        for key, data in lake_objects(chunk, start=offset):
            if key not in present:
                batch[lake.path(key)] = data
        if lake.is_local:
            for path in {p.rpartition("/")[0] for p in batch}:
                lake.fs.makedirs(path, exist_ok=True)
        lake.fs.pipe(batch)
        written += len(batch)
        batch = {}
    if written == 0 and lake.exists(LABELS_SIDECAR):
        return 0
    last = max(end, max((int(k.rsplit("/", 1)[1][:6]) + 1 for k in present), default=0))
    keys = [lake_key(i) for i in range(last)]
    sidecar = labels_table(keys, np.asarray(labels[:last]))
    lake.write_table(LABELS_SIDECAR, sidecar, "demo-lake")
    logger.info("demo lake %s: wrote %d of %d images", lake.url, written, images)
    return written


@flow(name="build_demo_lake")
def build_demo_lake(lake: str, images: int = 20_000, start: int = 0) -> int:
    """Prefect flow around :func:`write_demo_lake`."""
    return write_demo_lake(lake, images, start)
