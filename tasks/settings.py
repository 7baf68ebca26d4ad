"""Machine settings: where state lives and how to reach S3 and MLflow.

Science settings live in :class:`scan_core.config.PipelineConfig`; everything that depends on the
machine (endpoints, credentials, local state) comes from the environment through
pydantic-settings, with ``SCAN_LAKE_`` prefixed variables and the standard AWS ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MachineSettings(BaseSettings):
    """Settings of the machine the pipeline runs on.

    Attributes:
        state_dir: Local state (MLflow database, Prefect home); default ``./.scan-lake``.
        s3_endpoint_url: S3 endpoint (``SCAN_LAKE_S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL``);
            empty for AWS itself.
        aws_access_key_id: ``AWS_ACCESS_KEY_ID``.
        aws_secret_access_key: ``AWS_SECRET_ACCESS_KEY``.
        aws_region: ``AWS_DEFAULT_REGION`` / ``AWS_REGION``.
        mlflow_tracking_uri: Default ``sqlite:///<state_dir>/mlflow.db``.
        mlflow_experiment: Experiment that receives the runs.
        mlflow_artifact_location: Artifact root for a new experiment; default: the MLflow
            default for a local workspace, ``<workspace>/_mlflow`` for an ``s3://`` one.
        mlflow_ui_url: Where the MLflow UI of a local store is served (e.g.
            ``http://127.0.0.1:5000`` after ``mlflow ui --backend-store-uri ...``), for links to
            runs; an ``http(s)://`` tracking URI is its own UI.
        registered_model: Name of the registered model the final model is registered under.
        serving_uri_roots: Comma-separated folders or ``s3://`` prefixes besides the run's lake
            that the served model may read ``uri`` inputs from (:mod:`tasks.serving`).
        read_batch: Objects read concurrently per batch while cataloguing.
        shard_images: Objects per shard of the lake scan and images per embedding shard, the
            units of parallel work (:mod:`tasks.parallel`; ``SCAN_LAKE_SHARD_IMAGES``).
        max_object_bytes: Lake objects larger than this are quarantined without being read.
        io_attempts: Tries of one object-store call that fails with a transient fault
            (``SCAN_LAKE_IO_ATTEMPTS``).
        io_backoff_seconds: Wait before the second try; it doubles before each further one
            (``SCAN_LAKE_IO_BACKOFF_SECONDS``).
        io_max_seconds: No further try of a call once this long has passed since its first try,
            counting the wait before it (``SCAN_LAKE_IO_MAX_SECONDS``).
        io_connect_timeout: Seconds to wait for a connection to the object store
            (``SCAN_LAKE_IO_CONNECT_TIMEOUT``).
        io_read_timeout: Seconds to wait for an answer on an open connection
            (``SCAN_LAKE_IO_READ_TIMEOUT``).

    **The retry policy** (one loop, transient faults only). A call to the object store is tried
    by :meth:`tasks.storage.Storage._io` and by nothing else: botocore is configured for one
    attempt per request (``retries.total_max_attempts = 1``; its ``max_attempts`` would count
    retries, not attempts), s3fs for one (``retries = 1`` on each
    filesystem the storage module opens), and no Prefect task retries. The loop tries a call
    again only when :func:`tasks.errors.is_transient` says the fault is transient (a lost,
    refused or timed-out connection, a 5xx answer, throttling); anything else (a missing
    object, a denied request, a :class:`~tasks.errors.ScanLakeError`, a programming error)
    surfaces at once. Worst case for one call: ``io_attempts`` HTTP requests (the batch reads of
    the lake scan retry only the requests that failed, each at most ``io_attempts`` times), and
    at most ``io_max_seconds`` plus one request's timeouts (``io_connect_timeout +
    io_read_timeout``) from the first try to the
    :class:`~tasks.errors.StorageUnavailableError` sentence. With the defaults: 4 requests, the
    waits 2 + 4 + 8 = 14 s, and the run gives up within 60 + 5 + 60 s. MLflow's artifact uploads
    go through MLflow's own boto3 client, with botocore's default retries (that one layer, no
    loop of ours around it).
    """

    model_config = SettingsConfigDict(env_prefix="SCAN_LAKE_", extra="ignore")

    state_dir: Path = Path(".scan-lake")
    s3_endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("SCAN_LAKE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
    )
    aws_access_key_id: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: str | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    aws_region: str | None = Field(
        None, validation_alias=AliasChoices("AWS_DEFAULT_REGION", "AWS_REGION")
    )
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "scan-lake"
    mlflow_artifact_location: str | None = None
    mlflow_ui_url: str | None = None
    registered_model: str = "scan-lake"
    serving_uri_roots: str = ""
    read_batch: int = Field(512, ge=1)
    shard_images: int = Field(4096, ge=1)
    max_object_bytes: int = Field(512 * 2**20, ge=1)
    io_attempts: int = Field(4, ge=1)
    io_backoff_seconds: float = Field(2.0, ge=0)
    io_max_seconds: float = Field(60.0, gt=0)
    io_connect_timeout: float = Field(5.0, gt=0)
    io_read_timeout: float = Field(60.0, gt=0)

    @property
    def s3_endpoint_name(self) -> str:
        """The S3 endpoint as a user would name it in a message."""
        return self.s3_endpoint_url or "AWS S3"

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI (a local sqlite store unless configured)."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.state_dir.resolve() / 'mlflow.db'}"

    @property
    def prefect_home(self) -> Path:
        """``PREFECT_HOME`` when the user set one, else ``<state_dir>/prefect``."""
        return Path(os.environ.get("PREFECT_HOME") or self.state_dir.resolve() / "prefect")

    def serving_roots(self) -> list[str]:
        """The extra roots of ``serving_uri_roots``, without blanks."""
        return [root.strip() for root in self.serving_uri_roots.split(",") if root.strip()]

    def s3_options(self) -> dict[str, object]:
        """Keyword arguments for ``s3fs.S3FileSystem``: endpoint, credentials, the timeouts,
        and one attempt per request (the retry policy above: the storage loop retries)."""
        options: dict[str, object] = {
            "config_kwargs": {
                "connect_timeout": self.io_connect_timeout,
                "read_timeout": self.io_read_timeout,
                "retries": {"total_max_attempts": 1, "mode": "standard"},
            }
        }
        client_kwargs: dict[str, object] = {}
        if self.s3_endpoint_url:
            client_kwargs["endpoint_url"] = self.s3_endpoint_url
        if self.aws_region:
            client_kwargs["region_name"] = self.aws_region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        if self.aws_access_key_id and self.aws_secret_access_key:
            options["key"] = self.aws_access_key_id
            options["secret"] = self.aws_secret_access_key
        return options


def prepare_environment(settings: MachineSettings) -> None:
    """Point Prefect and MLflow at this machine's state before either is used.

    Sets ``PREFECT_HOME`` (unless the user set it), a generous ephemeral-server start timeout
    (the first start migrates the database), no telemetry, and ``MLFLOW_S3_ENDPOINT_URL`` from
    the S3 endpoint so MLflow's artifact store reaches the same S3.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # our modules' records (storage retries, lake scan, training) reach the Prefect run logs
    # too; the flow also attaches Prefect's API handler to them itself (tasks/prefect_reports.py)
    # for processes that did not set this before importing Prefect (workers)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,scan_core")
    if settings.s3_endpoint_url:
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", settings.s3_endpoint_url)
