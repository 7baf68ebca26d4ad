"""Declared pyarrow schemas of every table the pipeline writes (docs/architecture.md,
'Storage layout').

``image_id`` (the SHA-256 of the object's bytes) is the key everywhere; tables that must cover
every lake object (the catalog, the assignments) also carry its ``uri``.
"""

from __future__ import annotations

import pyarrow as pa

#: Everything the lake scan learned about each object; kept between runs to skip re-reading.
LAKE_INDEX = pa.schema(
    [
        ("key", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
        ("image_id", pa.string()),
        ("reason", pa.string()),  # null when the object is a usable image
        ("format", pa.string()),
        ("mode", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

#: A lake scan's snapshot: the index rows plus uri and label (input of the catalog stage).
LISTING = LAKE_INDEX.append(pa.field("uri", pa.string())).append(pa.field("label", pa.int32()))

CATALOG = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("label", pa.int32()),  # null when the lake has no labels sidecar or no label for it
    ]
)

QUARANTINE = pa.schema([("uri", pa.string()), ("reason", pa.string())])

#: The pixel store: decoded uint8 pixels ``(channels, size, size)`` in C order, per image_id.
PIXELS = pa.schema([("image_id", pa.string()), ("pixels", pa.binary())])

NEIGHBORS = pa.schema(
    [
        ("image_id", pa.string()),
        ("neighbor_ids", pa.list_(pa.string())),
        ("similarities", pa.list_(pa.float32())),
    ]
)

ASSIGNMENTS = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("cluster", pa.int32()),
        ("confidence", pa.float32()),
        ("probabilities", pa.list_(pa.float32())),
    ]
)

IMAGE_IDS = pa.schema([("image_id", pa.string())])

#: The guard's two candidate partitions, per unique image (:mod:`tasks.guard`).
PARTITIONS = pa.schema(
    [("image_id", pa.string()), ("model_cluster", pa.int32()), ("kmeans_cluster", pa.int32())]
)


def embeddings_schema(dim: int) -> pa.Schema:
    """Embeddings table: ``image_id`` and a ``fixed_size_list<float32>[dim]`` embedding."""
    return pa.schema([("image_id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


#: Per-cluster growth between a run and the previous run of its lake (:mod:`tasks.lineage`),
#: counted in unique images; ``cluster`` is the stable id.
CLUSTER_LINEAGE = pa.schema(
    [
        ("cluster", pa.int32()),
        ("status", pa.string()),  # kept | born | vanished
        ("previous_size", pa.int64()),
        ("size", pa.int64()),
        ("growth", pa.int64()),
        ("stayed", pa.int64()),
        ("moved_in", pa.int64()),
        ("moved_out", pa.int64()),
        ("new_images", pa.int64()),
        ("removed_images", pa.int64()),
    ]
)

#: Duplicate report, one row per pair: ``exact`` pairs are two lake objects with one content hash
#: (``image_id == duplicate_id``, similarity 1, hamming 0, cosine 1); ``near`` pairs are two images
#: that are one picture after an edit (:mod:`scan_core.duplicates`), ``image_id < duplicate_id``,
#: each with the first lake object (by URI) holding it: ``similarity`` is the correlation of their
#: canonical views, ``hamming`` the distance of their perceptual hashes, ``cosine`` the similarity
#: of their embeddings (null when none were compared).
DUPLICATES = pa.schema(
    [
        ("kind", pa.string()),
        ("image_id", pa.string()),
        ("duplicate_id", pa.string()),
        ("uri", pa.string()),
        ("duplicate_uri", pa.string()),
        ("similarity", pa.float32()),
        ("hamming", pa.int32()),
        ("cosine", pa.float32()),
    ]
)
