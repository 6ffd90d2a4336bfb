"""Start the cloud backend and the edge agent as child processes on loopback, and end them.

The demo and `python -m edge_agent ask` use these when no running service is named. Each child
gets a fresh random access token unless one is given (`child.token`; its clients send it as
`Authorization: Bearer …`): another user or a web page on this host cannot use it. Children
end with their parent: on normal exit and Ctrl-C (atexit, context manager), on SIGTERM (the
caller's handler), and even when the parent is killed outright (Linux PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from .. import ROOT



def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent():
    try:  # Linux only; elsewhere atexit and the context manager still end the child
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ChildService:
    """One service process; `url` answers /healthz once started; `token` is what /v1/* needs."""

    def __init__(self, name: str, args: list[str], url: str, env: dict | None = None,
                 token: str | None = None, wrap=None):
        self.name, self.args, self.url, self.token = name, args, url, token
        self.wrap = wrap or (lambda cmd: cmd)  # e.g. progvlm.net.kernel_link's `in_namespace`
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._stderr = None

    def start(self, timeout_s: float = 60.0) -> "ChildService":
        # a file, not a pipe: a pipe nobody reads fills up and blocks a chatty child
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.wrap([sys.executable, *self.args]), cwd=ROOT, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{err}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {self.url}/healthz within {timeout_s:.0f} s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._stderr:
            self._stderr.close()
            self._stderr = None

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()


def _model_args(vlm, mae) -> list[str]:
    return ([] if vlm is None else ["--vlm", str(vlm)]) + ([] if mae is None else ["--mae", str(mae)])


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cloud_service(port: int | None = None, token: str | None = None, host: str = "127.0.0.1",
                  vlm=None, mae=None, wrap=None, public_url: str | None = None,
                  batching: bool = False) -> ChildService:
    """The cloud backend; `token` (default: a fresh random one) is its PROGVLM_CLOUD_TOKEN.
    `wrap` runs its command line inside something (a network namespace), and `public_url`
    is where it is reached from here then (default: host and port)."""
    port = port or free_port(host)
    token = token or new_token()
    return ChildService("cloud backend", ["-m", "progvlm", "serve-cloud", "--host", host, "--port", str(port),
                                          *_model_args(vlm, mae), *(["--batching"] if batching else [])],
                        public_url or f"http://{host}:{port}",
                        {"PROGVLM_CLOUD_TOKEN": token}, token, wrap)


def edge_service(cloud_url: str, port: int | None = None, cloud_token: str | None = None,
                 host: str = "127.0.0.1", runtime: str = "pytorch", profile: str = "host",
                 vlm=None, mae=None, token: str | None = None) -> ChildService:
    """The edge agent for the cloud at `cloud_url` (which needs `cloud_token`); `token`
    (default: a fresh random one) is the agent's own PROGVLM_AGENT_TOKEN."""
    port = port or free_port(host)
    token = token or new_token()
    env = {"PROGVLM_AGENT_TOKEN": token, **({"PROGVLM_CLOUD_TOKEN": cloud_token} if cloud_token else {})}
    return ChildService("edge agent", ["-m", "edge_agent", "serve", "--host", host, "--port", str(port),
                                       "--cloud-url", cloud_url, "--runtime", runtime, "--profile", profile,
                                       *_model_args(vlm, mae)], f"http://{host}:{port}", env, token)
