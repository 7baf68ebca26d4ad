"""Errors a user can cause and fix: :class:`ScanLakeError`, and how other failures become one.

Everything the CLI prints is one sentence naming the cause and the fix (docs/architecture.md,
'Trust'). :func:`user_error` turns the failures of the parts we build on (an object store that
stopped answering, a full disk) into that sentence wherever in the flow they surface: in our storage
module, in Prefect's result storage or in MLflow's artifact upload.
"""

from __future__ import annotations

import errno

#: Exception class names (anywhere in the ``__cause__``/``__context__`` chain) that mean the
#: connection to a server failed or timed out: botocore's, aiohttp's, fsspec's and the builtins.
TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ProxyConnectionError",
        "ClientConnectorError",
        "ClientConnectionError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "FSTimeoutError",
        "ConnectionError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "ConnectionAbortedError",
        "BrokenPipeError",
        "TimeoutError",
        "IncompleteRead",
        "IncompleteReadError",
        "ClientPayloadError",
        "ResponseStreamingError",
    }
)

#: S3 error codes of an answer that asks for another try later (throttling, a server error).
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
    }
)

#: HTTP statuses of an answer worth another try.
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})


class ScanLakeError(Exception):
    """A problem the user can fix; the message is one sentence naming the cause and the fix.

    The CLI prints it without a traceback and exits non-zero. Tasks never retry on it.
    """


class StorageUnavailableError(ScanLakeError):
    """The object store stopped answering and our retries with backoff did not bring it back."""


class WorkspaceFileError(ScanLakeError):
    """A file read back from the workspace is unreadable, malformed or inconsistent (damaged or
    written by someone else): the sentence names the file, what is wrong and what to delete."""


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _transient_answer(exc: BaseException) -> bool:
    """Whether ``exc`` is a botocore ``ClientError`` for throttling or a server error."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in TRANSIENT_CODES or status in TRANSIENT_STATUSES


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a transient fault worth another try after a
    pause: a lost, refused or timed-out connection, a cut answer, a 5xx answer or throttling.
    A missing object, a denied request and a :class:`ScanLakeError` (a decided outcome, e.g.
    retries already spent) are not; neither is anything else (a programming error)."""
    for item in _chain(exc):
        if isinstance(item, ScanLakeError | FileNotFoundError | PermissionError):
            return False
        if any(cls.__name__ in TRANSIENT_NAMES for cls in type(item).__mro__):
            return True
        if _transient_answer(item):
            return True
    return False


def storage_unavailable(endpoint: str, action: str, exc: BaseException) -> StorageUnavailableError:
    """The sentence for an object store that stopped answering during ``action``."""
    return StorageUnavailableError(
        f"The object store {endpoint} stopped answering while {action} "
        f"({type(exc).__name__}): check that it is up and reachable, then rerun the same command; "
        "finished stages are kept and will not be redone."
    )


def user_error(exc: BaseException) -> ScanLakeError | None:
    """``exc`` as a :class:`ScanLakeError` when a user can fix its cause, else None.

    Recognised: our own errors anywhere in the chain, lost connections to the object store
    (raised by MLflow's artifact upload, which the storage module's retries do not wrap),
    denied access and a full disk.
    """
    chain = _chain(exc)
    for item in chain:
        if isinstance(item, ScanLakeError):
            return item
    if is_transient(exc):
        from tasks.settings import MachineSettings

        return storage_unavailable(
            MachineSettings().s3_endpoint_name, "the pipeline was writing its results", exc
        )
    for item in chain:
        if isinstance(item, PermissionError):
            return ScanLakeError(
                f"Access was denied ({item}): check that the credentials (AWS_ACCESS_KEY_ID) "
                "may read the lake and write the workspace, and the file permissions of local "
                "folders."
            )
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT):
            return ScanLakeError(
                f"No space left on the device ({item}): free some space or point --workspace "
                "and SCAN_LAKE_STATE_DIR elsewhere, then rerun the same command."
            )
    return None


#: Attribute that names the stage an exception stopped the flow in (:func:`mark_stage`).
STAGE_ATTRIBUTE = "scan_lake_stage"


def mark_stage(exc: BaseException, stage: str) -> None:
    """Note on ``exc`` that it stopped stage ``stage`` (kept when already noted: the innermost
    stage wins)."""
    if getattr(exc, STAGE_ATTRIBUTE, None) is None:
        setattr(exc, STAGE_ATTRIBUTE, stage)


def stage_of(exc: BaseException) -> str | None:
    """The stage ``exc`` (or what caused it) stopped, if :func:`mark_stage` noted one."""
    for item in _chain(exc):
        stage = getattr(item, STAGE_ATTRIBUTE, None)
        if isinstance(stage, str):
            return stage
    return None
