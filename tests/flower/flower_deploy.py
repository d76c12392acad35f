"""A real Flower deployment on loopback for tests: one ``flower-superlink``, N ``flower-supernode``
processes (``--insecure``), ``FLWR_HOME`` in a temporary folder, free ports, and ``flwr run``.

Every process started here is stopped (its whole process group) when the context exits, also on
failure. ``flwr run`` exits 0 even when the run fails, so callers check the ServerApp's
results file.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from server.runtimes.flower.loopback import free_port, stop_process_groups, toml_value, wait_listening

REPO = Path(__file__).resolve().parents[2]
CONNECTION = "flexlora-loopback"


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    wait_listening(port, proc, lambda: f"process exited with {proc.returncode}: {log.read_text()[-2000:]}",
                   lambda t: f"nothing listening on port {port} after {t:g} s: {log.read_text()[-2000:]}",
                   timeout)


class Deployment:
    def __init__(self, root: Path, env: dict, port: int) -> None:
        self.root, self.env, self.port = root, env, port
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def spawn(self, name: str, argv: list[str], env: Mapping | None = None) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        fh = open(log, "wb")
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=dict(env or self.env),
                                cwd=self.root, start_new_session=True)
        fh.close()
        self.procs.append((proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(f"===== {log.name}\n{log.read_text(errors='replace')[-4000:]}" for _, log in self.procs)

    def run(self, run_config: Mapping, *, timeout: float = 300.0) -> subprocess.CompletedProcess:
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        return subprocess.run(["flwr", "run", str(REPO), CONNECTION, "--stream", "--run-config", overrides],
                              env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        stop_process_groups([proc for proc, _ in self.procs], grace=10)


@contextlib.contextmanager
def deployment(root: Path, node_configs: list[str], *, threads: int = 1) -> Iterator[Deployment]:
    """SuperLink + one SuperNode per ``--node-config`` string, all on 127.0.0.1."""
    root.mkdir(parents=True, exist_ok=True)
    home = root / "flwr-home"
    home.mkdir(exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    dep = Deployment(root, env, port)
    bindir = Path(sys.executable).parent
    try:
        link = dep.spawn("superlink", [str(bindir / "flower-superlink"), "--insecure",
                                       "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                       "--port", str(port), "--database", str(root / "state.db")])
        _wait_listening(port, link, root / "superlink.log")
        for i, node_config in enumerate(node_configs):
            node_home = root / f"node-{i}"
            node_home.mkdir(exist_ok=True)
            dep.spawn(f"supernode-{i}", [str(bindir / "flower-supernode"), "--insecure", "--superlink",
                                         f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config",
                                         node_config], env={**env, "FLWR_HOME": str(node_home)})
        yield dep
    finally:
        dep.stop()
