"""Process plumbing for Flower on 127.0.0.1: free ports, run-config values, waiting for a
SuperLink to listen, and stopping whole process groups. Used by the integration tests
(``tests/flower/flower_deploy.py``) and the benchmarks (``benchmarks/flower_local.py``), which
start SuperLinks and SuperNodes on loopback; it never starts anything by itself."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable

__all__ = ["free_port", "toml_value", "wait_listening", "stop_process_groups"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v) -> str:
    """A Python value as a TOML literal for ``flwr run --run-config``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def wait_listening(port: int, proc: subprocess.Popen, on_exit: Callable[[], str],
                   on_timeout: Callable[[float], str], timeout: float = 60.0) -> None:
    """Until something listens on 127.0.0.1:``port``; RuntimeError(on_exit()) if ``proc`` dies
    first, RuntimeError(on_timeout(timeout)) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(on_exit())
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(on_timeout(timeout))


def stop_process_groups(procs: Iterable[subprocess.Popen], grace: float) -> None:
    """SIGTERM every live process group (last started first), SIGKILL what is left after
    ``grace`` seconds, and reap them all."""
    procs = list(procs)
    for proc in reversed(procs):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
