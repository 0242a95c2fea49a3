"""A loopback S3 (moto in server mode on 127.0.0.1) with dummy credentials in the environment."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from moto.server import ThreadedMotoServer

from gair_dataset import object_store

#: Dummy credentials: distinctive values, so a test can show they never reach a log or an error message.
ACCESS_KEY_ID = "AKIAGAIRTESTKEY7Q3Z"
SECRET_ACCESS_KEY = "gair-test-secret-Zk9vQ2mXr8Lp4Wn6"


@dataclass(frozen=True)
class LoopbackS3:
    """The running server's endpoint."""

    endpoint: str

    def new_bucket(self) -> str:
        """Create a fresh bucket; returns its ``s3://`` URL."""
        name = f"gair-{uuid.uuid4().hex[:12]}"
        fs, _ = object_store.filesystem(f"s3://{name}")
        fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="module")
def s3() -> Iterator[LoopbackS3]:
    """moto's S3 on a free port of 127.0.0.1; credentials and endpoint only through the environment."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "FSSPEC_S3_ENDPOINT_URL",
                     "AWS_ENDPOINT_URL_S3", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        try:
            yield LoopbackS3(endpoint)
        finally:
            server.stop()
