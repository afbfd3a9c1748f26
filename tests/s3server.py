"""A real S3-compatible server on loopback for tests and benchmarks, with fault injection.

moto's standalone server (the one s3fs's own test suite runs against) serves HTTP on
127.0.0.1; a WSGI layer in front of it can, for requests matching a rule, reply 5xx,
delay the reply, or drop the connection after reading part of the request body.
Not a conftest: import it where needed (``from s3server import S3Server``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

# moto signs nothing, but botocore wants credentials; never real ones
for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
               ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_k, _v)


@dataclass
class Fault:
    """Act on up to ``times`` requests whose method is ``method`` and whose query string
    contains ``query`` (e.g. ``"partNumber"`` for UploadPart, ``"uploads"`` for
    CreateMultipartUpload; ``""`` matches any) and, when given, whose path contains
    ``path``. ``action``: ``"status"`` (reply ``status``), ``"delay"`` (sleep ``seconds``,
    then serve), ``"drop"`` (read ``after_bytes`` of the body, then reset the connection)."""

    method: str
    action: str
    query: str = ""
    path: str = ""
    times: int = 1
    status: int = 503
    seconds: float = 0.0
    after_bytes: int = 1024
    hits: int = 0

    def matches(self, environ: dict) -> bool:
        return (self.hits < self.times and environ["REQUEST_METHOD"] == self.method
                and self.query in environ.get("QUERY_STRING", "")
                and self.path in environ.get("PATH_INFO", ""))


class _Faults:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.rules: list[Fault] = []
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, str]] = []

    def __call__(self, environ: dict, start_response: Any) -> Any:
        with self.lock:
            self.log.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                             environ.get("QUERY_STRING", "")))
            rule = next((r for r in self.rules if r.matches(environ)), None)
            if rule is not None:
                rule.hits += 1
        if rule is not None:
            if rule.action == "delay":
                time.sleep(rule.seconds)
            elif rule.action == "status":
                _drain(environ)
                body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                        f"{'ServiceUnavailable' if rule.status == 503 else 'InternalError'}"
                        f"</Code><Message>injected</Message><RequestId>{uuid.uuid4().hex}"
                        "</RequestId></Error>").encode()
                start_response(f"{rule.status} Injected", [("Content-Type", "application/xml"),
                                                           ("Content-Length", str(len(body)))])
                return [body]
            elif rule.action == "drop":
                n = int(environ.get("CONTENT_LENGTH") or 0)
                environ["wsgi.input"].read(min(n, rule.after_bytes))
                sock = environ["werkzeug.socket"]
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00"
                                b"\x00\x00")  # RST, not FIN: the client sees a reset
                sock.close()
                raise ConnectionResetError("injected connection drop")
        return self.app(environ, start_response)


def _drain(environ: dict) -> None:
    n = int(environ.get("CONTENT_LENGTH") or 0)
    while n > 0:
        chunk = environ["wsgi.input"].read(min(n, 1 << 20))
        if not chunk:
            break
        n -= len(chunk)


class S3Server:
    """moto S3 on an ephemeral loopback port. ``with S3Server() as s3: fs = s3.fs()``."""

    def __init__(self) -> None:
        self.faults = _Faults(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, self.faults, threaded=True,
                                   request_handler=MotoRequestHandler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._shared: Any = None
        self._bucket: str | None = None
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    def start(self) -> S3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def storage_options(self, **config: Any) -> dict[str, Any]:
        """s3fs options for this server (``config`` goes to botocore's Config)."""
        return {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
                "config_kwargs": config}

    def fs(self, **config: Any) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options(**config))

    def shared_fs(self) -> Any:
        """One s3fs client reused across calls (making one costs ~0.3 s)."""
        if self._shared is None:
            self._shared = self.fs()
        return self._shared

    def prefix(self) -> str:
        """A fresh ``bucket/prefix`` in a bucket shared by this server's users."""
        if self._bucket is None:
            self._bucket = self.bucket()
        return f"{self._bucket}/p-{uuid.uuid4().hex[:12]}"

    def bucket(self, name: str | None = None) -> str:
        """Create a fresh bucket; returns its name."""
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        fs = self.shared_fs()
        fs.call_s3("create_bucket", Bucket=name)
        fs.invalidate_cache()
        return name

    def inject(self, *rules: Fault) -> None:
        with self.faults.lock:
            self.faults.rules = list(rules)

    def clear(self) -> None:
        with self.faults.lock:
            self.faults.rules = []
            self.faults.log = []
