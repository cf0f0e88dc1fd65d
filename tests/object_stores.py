"""Object stores for the storage tests: fsspec's in-memory filesystem and a real S3 server.

``memory://`` is always there. The S3 store is moto's server (``moto.server.ThreadedMotoServer``),
started by the test session on a free loopback port and reached through s3fs, the backend
``s3://`` paths use in production; it needs ``moto[s3]``, ``flask``, ``flask-cors`` and ``s3fs``
(``requirements.txt``). Where they are missing, the S3 cases skip
and the memory cases still run.

The AWS environment is isolated for the server's lifetime: no credentials from the machine, no
instance-metadata lookups (which would leave the loopback), one region.
"""

from __future__ import annotations

import importlib.util
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pytest

S3_PACKAGES = ("moto", "s3fs", "flask", "flask_cors")
#: What moto accepts as credentials while it does not check them (its default).
S3_KEY = {"key": "testing", "secret": "testing"}


def s3_available() -> bool:
    """Whether moto's server and s3fs can be imported here."""
    return all(importlib.util.find_spec(name) is not None for name in S3_PACKAGES)


@dataclass(frozen=True)
class Store:
    """A fresh folder in a store: ``root`` (a URL) and the filesystem arguments to reach it."""

    kind: str
    root: str
    options: dict[str, Any] = field(default_factory=dict)
    endpoint: str | None = None

    def url(self, *parts: str) -> str:
        """The URL of ``parts`` under the root."""
        return "/".join((self.root, *parts))

    def filesystem(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.root, **self.options)[0]

    def files(self) -> list[str]:
        """Every object under the root, relative to it, sorted (a fresh listing)."""
        fs, path = fsspec.core.url_to_fs(self.root, **self.options)
        fs.invalidate_cache()
        if not fs.exists(path):
            return []
        return sorted(name[len(path.rstrip("/")) + 1 :] for name in fs.find(path))


class S3Server:
    """moto's S3 server on 127.0.0.1 with an isolated AWS environment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def options(self, **extra: Any) -> dict[str, Any]:
        """s3fs arguments for this server: the accepted key and the endpoint."""
        return {**S3_KEY, "client_kwargs": {"endpoint_url": self.endpoint}, **extra}

    def new_bucket(self) -> str:
        name = f"ibmd-{uuid.uuid4().hex[:12]}"
        fs = fsspec.filesystem("s3", **self.options())
        fs.mkdir(name)
        return name

    def require_credentials(self, count_before: int = 0) -> None:
        """Make the server check keys (moto's IAM authentication): unknown keys are refused."""
        import requests

        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=str(count_before).encode(), timeout=10)

    def accept_any_credentials(self) -> None:
        import requests

        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session (skips when moto or s3fs is not installed)."""
    if not s3_available():
        pytest.skip(f"the S3 server tests need {', '.join(S3_PACKAGES)} (requirements.txt)")
    with pytest.MonkeyPatch.context() as monkeypatch:
        server = S3Server(monkeypatch)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(params=["memory", "s3"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """A fresh, empty folder in each store kind: ``memory://`` and the S3 server's new bucket."""
    if request.param == "memory":
        root = f"memory:///ibmd-{uuid.uuid4().hex[:12]}"
        yield Store(kind="memory", root=root)
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket()
    yield Store(kind="s3", root=f"s3://{bucket}/project", options=server.options(), endpoint=server.endpoint)
