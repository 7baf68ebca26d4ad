"""The pixel store: decoded images keyed by image_id, so stages load tensors without re-decoding.

Shards ``<workspace>/pixels/<image-config-key>/part-*.parquet`` hold ``(image_id, pixels)`` rows,
pixels being the uint8 ``(channels, size, size)`` array in C order. The catalog step appends a shard
with only the images not stored yet. Every shard read back must have the declared schema
(:data:`tasks.schemas.PIXELS`) and every pixel value the size of one image; a shard that fails is
a :class:`~tasks.errors.WorkspaceFileError` naming it and the store folder to delete.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from scan_core.config import ImageConfig
from tasks.errors import ScanLakeError
from tasks.schemas import PIXELS
from tasks.storage import Storage

PIXELS_DIR = "pixels"


def store_dir(image_config_key: str) -> str:
    """Workspace-relative folder of the pixel store for one image config."""
    return f"{PIXELS_DIR}/{image_config_key}"


def shard_paths(workspace: Storage, image_config_key: str) -> list[str]:
    """Workspace-relative paths of the store's shards."""
    prefix = store_dir(image_config_key)
    return [o.key for o in workspace.list_objects(prefix) if o.key.endswith(".parquet")]


def stored_ids(workspace: Storage, image_config_key: str) -> set[str]:
    """The image_ids the store already holds.

    Raises:
        WorkspaceFileError: a shard is not a pixel store shard.
    """
    shards = shard_paths(workspace, image_config_key)
    if not shards:
        return set()
    table = workspace.read_table(shards, columns=["image_id"], schema=PIXELS)
    return set(table["image_id"].to_pylist())


def write_shard(
    workspace: Storage,
    image_config_key: str,
    ids: list[str],
    pixels: list[bytes],
    name: str | None = None,
) -> str:
    """Append one shard (named ``part-<name>.parquet``, a random name without ``name``; a
    shard named by its content is written again, with the same content, when its work is
    retried); return its path."""
    table = pa.table({"image_id": ids, "pixels": pixels}, schema=PIXELS)
    rel = f"{store_dir(image_config_key)}/part-{name or uuid.uuid4().hex}.parquet"
    workspace.write_table(rel, table, image_config_key)
    return rel


def shard_ids(workspace: Storage, image_config_key: str) -> dict[str, list[str]]:
    """The image_ids of every shard of the store, by shard path.

    Raises:
        WorkspaceFileError: a shard is not a pixel store shard.
    """
    return {
        shard: workspace.read_table(shard, columns=["image_id"], schema=PIXELS)[
            "image_id"
        ].to_pylist()
        for shard in shard_paths(workspace, image_config_key)
    }


def load_pixels(
    workspace: Storage,
    image_config_key: str,
    ids: list[str],
    config: ImageConfig,
    shards: list[str] | None = None,
) -> torch.Tensor:
    """uint8 tensor ``(len(ids), channels, size, size)`` of the images ``ids``, in that order,
    read from ``shards`` (default: every shard of the store).

    Raises:
        ScanLakeError: when an image is missing from the store (the workspace was edited by hand).
        WorkspaceFileError: a shard is not a pixel store shard, or holds pixels of another size.
    """
    shape = (config.channels, config.size, config.size)
    per_image = int(np.prod(shape))
    if shards is None:
        shards = shard_paths(workspace, image_config_key)
    out = np.empty((len(ids), *shape), dtype=np.uint8)
    if not ids:
        return torch.from_numpy(out)
    if not shards:
        raise ScanLakeError(
            f"The pixel store {store_dir(image_config_key)} is empty: rerun the pipeline so the "
            "catalog step decodes the lake again."
        )
    wanted: dict[str, list[int]] = {}
    for row, image_id in enumerate(ids):
        wanted.setdefault(image_id, []).append(row)
    flat = out.reshape(len(ids), per_image)
    found: set[str] = set()
    for shard in shards:
        table = workspace.read_table(shard, schema=PIXELS)
        sizes = pc.min_max(pc.binary_length(table["pixels"])).as_py()
        if table["pixels"].null_count or {sizes["min"], sizes["max"]} - {per_image, None}:
            raise workspace.bad_file(
                shard, f"holds pixels that are not {config.channels}x{config.size}x{config.size}"
            )
        for id_chunk, pixel_chunk in zip(
            table["image_id"].chunks, table["pixels"].chunks, strict=True
        ):
            offsets = np.frombuffer(pixel_chunk.buffers()[1], dtype=np.int32)
            offsets = offsets[pixel_chunk.offset : pixel_chunk.offset + len(pixel_chunk) + 1]
            data = np.frombuffer(pixel_chunk.buffers()[2], dtype=np.uint8)
            for i, image_id in enumerate(id_chunk.to_pylist()):
                rows = wanted.get(image_id)
                if rows is None or image_id in found:
                    continue
                start = offsets[i]
                flat[rows] = data[start : start + per_image]
                found.add(image_id)
        if len(found) == len(wanted):
            break
    if len(found) != len(wanted):
        raise missing_images(image_config_key, [i for i in wanted if i not in found])
    return torch.from_numpy(out)


def missing_images(image_config_key: str, missing: list[str]) -> ScanLakeError:
    """The one sentence for images the pixel store should hold and does not."""
    return ScanLakeError(
        f"{len(missing)} images (e.g. {missing[0][:12]}) are missing from the pixel store "
        f"{store_dir(image_config_key)}: delete that folder and rerun the pipeline."
    )


def group_by_shard(
    workspace: Storage, image_config_key: str, ids: list[str]
) -> list[tuple[str, list[str]]]:
    """The store shards that hold the images ``ids`` (each image in the first shard, by path,
    that holds it) with the images each holds, in the shard's order; shards holding none of
    them are left out.

    Raises:
        ScanLakeError: an image is in no shard.
        WorkspaceFileError: a shard is not a pixel store shard.
    """
    remaining = set(ids)
    groups: list[tuple[str, list[str]]] = []
    for shard, shard_image_ids in sorted(shard_ids(workspace, image_config_key).items()):
        mine = [i for i in dict.fromkeys(shard_image_ids) if i in remaining]
        if mine:
            remaining.difference_update(mine)
            groups.append((shard, mine))
        if not remaining:
            break
    if remaining:
        raise missing_images(image_config_key, sorted(remaining))
    return groups


def stream_pixels(
    workspace: Storage, image_config_key: str, ids: list[str], config: ImageConfig
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The images ``ids`` one store shard at a time: ``(rows, images)`` with ``rows`` their
    positions in ``ids`` and ``images`` uint8 ``(len(rows), channels, size, size)``; memory
    holds one shard's pixels, never the whole lake's.

    Raises:
        ScanLakeError: an image is missing from the store.
        WorkspaceFileError: a shard is not a pixel store shard.
    """
    position: dict[str, int] = {}
    for row, image_id in enumerate(ids):
        position.setdefault(image_id, row)
    for shard, mine in group_by_shard(workspace, image_config_key, ids):
        rows = np.array([position[i] for i in mine], dtype=np.int64)
        yield rows, load_pixels(workspace, image_config_key, mine, config, [shard])


def png_bytes(pixels: torch.Tensor) -> bytes:
    """PNG bytes of one decoded image, uint8 ``(channels, size, size)`` as the store holds it
    (greyscale for one channel, RGB for three)."""
    from scan_core.data import encode_png

    array = pixels.numpy()
    return encode_png(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0).copy())
