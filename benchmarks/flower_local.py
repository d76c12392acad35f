"""Local Flower processes for the benchmarks: a ``flower-superlink`` (Deployment or Simulation
Engine) and SuperNodes on 127.0.0.1, ``FLWR_HOME`` in a given folder, free ports, ``--insecure``,
no runtime dependency installation, and ``flwr run``. Every process started here runs in its own
process group and is stopped (the whole group) when the context exits, also on failure.
``flwr run`` exits 0 even when the run fails: callers read the ServerApp's results file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from server.runtimes.flower.loopback import free_port, stop_process_groups, toml_value, wait_listening

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "flexlora-bench"
BIN = Path(sys.executable).parent


class Flower:
    """A SuperLink (plus SuperNodes added with :meth:`supernode`) under ``root``."""

    def __init__(self, root: Path, *, simulation: bool, threads: int = 1) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        home = root / "flwr-home"
        home.mkdir(exist_ok=True)
        self.port = free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n', encoding="utf-8")
        self.env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": str(threads),
                    "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.procs: dict[str, subprocess.Popen] = {}
        argv = [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(self.port), "--database", str(root / "state.db")]
        if simulation:
            argv.append("--simulation")
        link = self.spawn("superlink", argv)
        self._wait_listening(self.port, link, "superlink")

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def spawn(self, name: str, argv: list[str], env: Mapping | None = None) -> subprocess.Popen:
        with open(self.log(name), "wb") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=dict(env or self.env),
                                    cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def _wait_listening(self, port: int, proc: subprocess.Popen, name: str, timeout: float = 60.0) -> None:
        wait_listening(port, proc, lambda: f"{name} exited with {proc.returncode}: {self.log(name).read_text()[-2000:]}",
                       lambda t: f"{name}: nothing listening on {port} after {t:g} s", timeout)

    def supernode(self, name: str, node_config: str, env: Mapping | None = None) -> subprocess.Popen:
        home = self.root / name
        home.mkdir(exist_ok=True)
        return self.spawn(name, [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                 f"127.0.0.1:{self.port}", "--port", str(free_port()),
                                 "--node-config", node_config],
                          env={**self.env, **(env or {}), "FLWR_HOME": str(home)})

    def kill(self, name: str) -> None:
        """SIGKILL a process group (a SuperNode and the ClientApp it runs)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()

    def run(self, run_config: Mapping, *, federation: Mapping | None = None, timeout: float = 600.0,
            log_name: str = "flwr-run") -> subprocess.CompletedProcess:
        argv = [str(BIN / "flwr"), "run", str(REPO), CONNECTION, "--stream", "--run-config",
                " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
        if federation:
            argv += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())]
        with open(self.log(log_name), "w") as fh:
            return subprocess.run(argv, env=self.env, cwd=self.root, stdout=fh, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout)

    def stop(self) -> None:
        stop_process_groups(self.procs.values(), grace=15)


@contextlib.contextmanager
def flower(root: Path, *, simulation: bool, threads: int = 1) -> Iterator[Flower]:
    fl = None
    try:
        fl = Flower(root, simulation=simulation, threads=threads)
        yield fl
    finally:
        if fl is not None:
            fl.stop()
