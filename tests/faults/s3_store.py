"""A real S3 server process (moto) that keeps its objects when it is killed and restarted.

moto_server keeps everything in memory, so a restarted one is empty — unlike a real object
store, whose data outlives its front end. Here moto's own request recorder is the store's
write-ahead log: every mutating request (PUT, POST, DELETE) is appended to ``LOG`` before it is
served, and a new process replays ``LOG`` into its in-memory backend on a private port *before*
it opens the public one. A client therefore sees "connection refused" while the store is down
and the very same objects once it is back — never an empty store.

    python s3_store.py HOST PORT LOG      # serves until killed

``S3Store`` starts, kills (SIGKILL) and restarts that process on the same port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def serve(host: str, port: int, log: str) -> None:
    os.environ["MOTO_RECORDER_FILEPATH"] = log
    from moto.moto_api import recorder
    from moto.server import ThreadedMotoServer

    record = recorder._record_request  # noqa: SLF001 - moto's recorder has no method filter

    def record_mutations(request, body=None):  # reads change nothing: keep the log small
        if request.method not in ("GET", "HEAD"):
            record(request, body)

    recorder._record_request = record_mutations  # type: ignore[method-assign]  # noqa: SLF001
    if os.path.exists(log) and os.path.getsize(log):
        private = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        private.start()  # same process, same in-memory backend as the public server below
        host_port = private.get_host_and_port()
        recorder.replay_recording(target_host=f"http://{host_port[0]}:{host_port[1]}")
    recorder.start_recording()
    public = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    public.start()
    print(f"ready http://{host}:{port}", flush=True)
    signal.pause()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Store:
    """The store process: ``start()``, ``kill()`` (SIGKILL), ``start()`` again on the same port."""

    def __init__(self, log: Path, port: int | None = None):
        self.log, self.port = Path(log), port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "127.0.0.1", str(self.port), str(self.log)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    out = self.proc.stdout.read() if self.proc.poll() is not None else ""
                    self.kill()
                    raise RuntimeError(f"the S3 store did not start on {self.endpoint}: {out[-2000:]}")
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def require_credentials(self) -> None:
        """From now on refuse requests whose key moto's IAM does not know (InvalidAccessKeyId, 403)
        or does not allow (AccessDenied). moto's INITIAL_NO_AUTH_ACTION_COUNT set to 0, through its
        /moto-api/reset-auth: set at start instead, nothing could be written into the store first.
        A restarted process accepts any key again."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})  # form-encoded: moto reads ''
        urllib.request.urlopen(request, timeout=10).close()

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
