"""The servable model of a run: an ``mlflow.pyfunc`` model that takes images and returns the
run's stable cluster ids.

Input: a pandas DataFrame with a column ``image`` (the bytes of a PNG, JPEG, WebP, GIF, BMP or
TIFF file; base64 in a JSON request) or a column ``uri`` (a local path or an ``s3://`` URL of
one); a row may use either. Output: one row per input row with ``cluster`` (the stable cluster id
of the run, as in its ``assignments.parquet``), ``confidence`` (the largest probability) and
``probabilities`` (one per cluster, in the order of the ``cluster_ids`` of the model's metadata).
The model bundles the preprocessing of the run (:func:`scan_core.images.decode_image` under the
run's :class:`~scan_core.config.ImageConfig`, then :class:`scan_core.transforms.IdentityTransform`
inside :func:`scan_core.inference.predict_probabilities`) and its one cluster head, in stable id
order (the assign stage reordered the outputs).

**Nothing is unpickled.** The model is logged in MLflow's ``loader_module`` form:
``mlflow.pyfunc.load_model`` reads the ``MLmodel`` file with ``yaml.safe_load``, imports the
module it names (this one, from the installed scan-lake package, never from the artifact store:
no ``code_paths`` are logged) and calls its :func:`_load_pyfunc` with the model's ``data``
folder (read in ``mlflow/pyfunc/__init__.py``, ``load_model`` and
``_save_model_with_loader_module_and_data_path``, MLflow 3.17: no ``cloudpickle`` on that path;
the input example is JSON). :func:`_load_pyfunc` reads JSON and a ``torch.save``'d state_dict
with ``weights_only=True``. Whoever can rewrite the artifact store could still rewrite
``MLmodel`` to name another loader (MLflow's ``python_model`` loader unpickles):
:func:`load_model` checks the ``MLmodel`` file before loading.

``uri`` inputs are read only under allowed roots (the run's lake, plus
``SCAN_LAKE_SERVING_URI_ROOTS``), so a served model does not read whatever file a request names.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from scan_core.config import ImageConfig
from scan_core.images import ImageDecodeError, decode_image
from scan_core.inference import predict_probabilities
from scan_core.models import ClusteringModel
from tasks import checkpoints, tracking
from tasks.errors import ScanLakeError
from tasks.settings import MachineSettings
from tasks.storage import Storage, unsafe_key
from tasks.tracking import TrackingRef

logger = logging.getLogger(__name__)

#: The pyfunc model's data folder: weights, architecture, serving description.
SERVING_FILE = "serving.json"
#: Artifact path of the model in its run.
MODEL_ARTIFACT = "model"
#: Images predicted at once.
BATCH_SIZE = 256


class ServingDescription(BaseModel):
    """What :func:`_load_pyfunc` needs besides the weights: ids, preprocessing, lake."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    cluster_ids: list[int]
    image: ImageConfig
    lake: str


def model_signature(num_clusters: int) -> Any:
    """The signature: ``image`` (binary) or ``uri`` (string) in; cluster, confidence and
    ``num_clusters`` probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema(
        [
            ColSpec(DataType.binary, "image", required=False),
            ColSpec(DataType.string, "uri", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(DataType.long, "cluster"),
            ColSpec(DataType.double, "confidence"),
            ColSpec(Array(DataType.double), "probabilities"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


class ClusterPredictor:
    """The loaded model: decode, run the cluster head, map outputs to stable ids.

    Args:
        network: The one-head clustering model, outputs in stable id order.
        description: Cluster ids, image config and lake of the run.
        uri_roots: URL prefixes ``uri`` inputs may name (default: the run's lake and
            ``SCAN_LAKE_SERVING_URI_ROOTS``).
    """

    def __init__(
        self,
        network: ClusteringModel,
        description: ServingDescription,
        uri_roots: list[str] | None = None,
    ) -> None:
        if network.num_clusters != len(description.cluster_ids):
            raise ScanLakeError(
                f"The served model has {network.num_clusters} outputs but its description names "
                f"{len(description.cluster_ids)} cluster ids: register the run's model again."
            )
        self.network = network.eval()
        self.description = description
        self.cluster_ids = np.asarray(description.cluster_ids, dtype=np.int64)
        if uri_roots is None:
            uri_roots = [description.lake, *MachineSettings().serving_roots()]
        self.roots = [Storage(root) for root in uri_roots]

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Cluster every row of ``model_input`` (a DataFrame with ``image`` and/or ``uri``).

        Raises:
            ScanLakeError: no usable column, a row with neither, a URI outside the allowed
                roots or unreadable, bytes that are not an image.
        """
        frame = pd.DataFrame(model_input)
        blobs = [self._bytes(frame, row) for row in range(len(frame))]
        config = self.description.image
        images = torch.empty(
            len(blobs), config.channels, config.size, config.size, dtype=torch.uint8
        )
        for row, blob in enumerate(blobs):
            try:
                images[row] = decode_image(blob, config)
            except ImageDecodeError as exc:
                raise ScanLakeError(
                    f"Row {row} is not an image the model can read ({exc.reason}): send PNG, "
                    "JPEG, WebP, GIF, BMP or TIFF bytes."
                ) from exc
        probabilities = np.zeros((0, len(self.cluster_ids)), dtype=np.float64)
        if blobs:
            probabilities = predict_probabilities(
                self.network, images, batch_size=BATCH_SIZE, device="cpu"
            ).astype(np.float64)
        return pd.DataFrame(
            {
                "cluster": self.cluster_ids[probabilities.argmax(axis=1)],
                "confidence": probabilities.max(axis=1),
                "probabilities": [row.tolist() for row in probabilities],
            }
        )

    def _bytes(self, frame: pd.DataFrame, row: int) -> bytes:
        image = frame["image"].iloc[row] if "image" in frame.columns else None
        uri = frame["uri"].iloc[row] if "uri" in frame.columns else None
        if _present(image):
            return _as_bytes(image, row)
        if _present(uri):
            return self.read_uri(str(uri), row)
        if "image" not in frame.columns and "uri" not in frame.columns:
            raise ScanLakeError(
                f"The input has no 'image' or 'uri' column (got {list(frame.columns)}): send "
                "image bytes in 'image' or a path or s3:// URL in 'uri'."
            )
        raise ScanLakeError(f"Row {row} has neither an 'image' nor a 'uri': fill one of them.")

    def read_uri(self, uri: str, row: int = 0) -> bytes:
        """The bytes of ``uri``, read through :class:`~tasks.storage.Storage` under an allowed
        root.

        Raises:
            ScanLakeError: another scheme, a path outside every allowed root, a missing object.
        """
        target = uri.strip()
        if "://" in target and not target.startswith(("s3://", "file://")):
            raise ScanLakeError(
                f"Row {row}: the uri '{uri}' is neither a local path nor an s3:// URL: send one, "
                "or the image bytes in 'image'."
            )
        if "://" not in target or target.startswith("file://"):
            target = os.path.realpath(target.removeprefix("file://"))
        for root in self.roots:
            prefix = root.url.rstrip("/") + "/"
            if not target.startswith(prefix):
                continue
            key = target[len(prefix) :]
            if unsafe_key(key) is not None:
                break
            try:
                return root.read_bytes(key)
            except FileNotFoundError as exc:
                raise ScanLakeError(
                    f"Row {row}: '{uri}' does not exist: check the path or URL."
                ) from exc
        raise ScanLakeError(
            f"Row {row}: '{uri}' is not under a root the model may read "
            f"({', '.join(r.url for r in self.roots)}): send the image bytes in 'image', or add "
            "its folder or prefix to SCAN_LAKE_SERVING_URI_ROOTS (comma-separated) where the "
            "model is served."
        )


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def _as_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):  # base64, as JSON requests carry bytes
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ScanLakeError(
                f"Row {row}: 'image' is a string but not base64: send the image bytes (base64 "
                "in a JSON request)."
            ) from exc
    raise ScanLakeError(
        f"Row {row}: 'image' holds a {type(value).__name__}, not bytes: send the image bytes."
    )


def write_model_data(
    folder: Path,
    network: ClusteringModel,
    architecture: dict[str, Any],
    description: ServingDescription,
) -> None:
    """Write the model's data folder: ``model.pt`` (state_dict), ``model.json`` (architecture,
    :func:`tasks.checkpoints.clustering_description`) and ``serving.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / checkpoints.CHECKPOINT).write_bytes(checkpoints.state_bytes(network))
    (folder / checkpoints.DESCRIPTION).write_text(json.dumps(architecture, indent=2))
    (folder / SERVING_FILE).write_text(description.model_dump_json(indent=2))


def _load_pyfunc(data_path: str) -> ClusterPredictor:
    """MLflow's entry point (``loader_module`` form): the predictor of a data folder.

    Raises:
        ScanLakeError: a missing or invalid description, or weights that are not a plain
            state_dict (loaded with ``weights_only=True``).
    """
    folder = Path(data_path).resolve()
    try:
        description = ServingDescription.model_validate_json((folder / SERVING_FILE).read_text())
    except (OSError, ValidationError) as exc:
        raise ScanLakeError(
            f"The model folder {folder} has no valid {SERVING_FILE} ({type(exc).__name__}): it "
            "is not a scan-lake model, or it was altered; register the run's model again."
        ) from exc
    network = checkpoints.load_clustering_model(Storage(str(folder.parent)), folder.name)
    return ClusterPredictor(network, description)


def load_model(model_uri: str, tracking_uri: str | None = None) -> Any:
    """``mlflow.pyfunc.load_model`` of a scan-lake model after checking its ``MLmodel`` file:
    the pyfunc flavour must name this module as its loader, with no code folder and no pickled
    Python model.

    Args:
        model_uri: e.g. ``models:/scan-lake@champion``.
        tracking_uri: The MLflow tracking URI (default: ``MLFLOW_TRACKING_URI`` or the machine
            settings').

    Raises:
        ScanLakeError: the model is not a scan-lake model in the loader-module form.
    """
    import mlflow
    import yaml

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or MachineSettings().tracking_uri
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, tracking_uri=uri, dst_path=tmp
        )
        meta = yaml.safe_load((Path(local) / "MLmodel").read_text()) or {}
        flavor = (meta.get("flavors") or {}).get("python_function") or {}
        if (
            flavor.get("loader_module") != __name__
            or flavor.get("code")
            or "python_model" in flavor
            or set(meta.get("flavors") or {}) - {"python_function"}
        ):
            raise ScanLakeError(
                f"The model {model_uri} is not a scan-lake model loaded by {__name__} (its "
                f"MLmodel names {flavor.get('loader_module')!r}, code {flavor.get('code')!r}): "
                "refusing to load it; check who can write the MLflow artifact store."
            )
        return mlflow.pyfunc.load_model(local)


def log_servable_model(
    ref: TrackingRef,
    run_id: str,
    network: ClusteringModel,
    architecture: dict[str, Any],
    description: ServingDescription,
    example_png: bytes,
    registered_name: str,
) -> str:
    """Log the model of a run (pyfunc, loader-module form) in MLflow run ``run_id`` and register
    it as a new version of ``registered_name`` (no alias: :mod:`tasks.promotion` decides).
    Returns the version."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "scan_lake_model"
        write_model_data(data, network, architecture, description)
        mlflow.set_tracking_uri(ref.tracking_uri)
        with mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                loader_module=__name__,
                data_path=str(data),
                signature=model_signature(len(description.cluster_ids)),
                input_example=pd.DataFrame({"image": [example_png]}),
                pip_requirements=tracking.model_requirements(),
                metadata={
                    "cluster_ids": list(description.cluster_ids),
                    "image": description.image.model_dump(mode="json"),
                    "lake": description.lake,
                },
                registered_model_name=registered_name,
            )
    return str(info.registered_model_version)
