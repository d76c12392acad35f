"""TLS and SuperNode authentication on loopback, for real: certificates and node keys from
scripts/make_certs.sh, ``flower-superlink`` with TLS and ``--enable-supernode-auth``, one
SuperNode whose public key is registered with ``flwr supernode register`` and one whose key
is not. The registered node completes a FlexLoRA round; the other is refused."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.flower, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "flower"))

SETTINGS = {"strategy": "flexlora", "num-server-rounds": 1, "seed": 3, "num-heldout": 1, "local-steps": 1,
            "batch-size": 4, "threads": 1, "eval-max-new-tokens": 4, "min-nodes": 1, "node-wait-s": 90.0,
            "round-timeout-s": 180.0, "evaluate": False}


def test_registered_node_completes_a_round_and_unregistered_node_is_refused(tmp_path):
    import flower_deploy as fd

    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(certs), "2"], check=True,
                   capture_output=True)
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = fd.free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{fd.CONNECTION}"\n\n[superlink.{fd.CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n', encoding="utf-8")
    env = {**__import__("os").environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    dep = fd.Deployment(tmp_path, env, port)
    bindir = Path(sys.executable).parent
    out = tmp_path / "out"
    try:
        link = dep.spawn("superlink", [str(bindir / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
                                       "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile",
                                       str(certs / "server.key"), "--enable-supernode-auth",
                                       "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                       "--port", str(port), "--database", str(tmp_path / "state.db")])
        fd._wait_listening(port, link, tmp_path / "superlink.log")
        reg = subprocess.run([str(bindir / "flwr"), "supernode", "register", str(certs / "nodes" / "node-0.pub"),
                              fd.CONNECTION], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        nodes = []
        for i in (0, 1):
            node_home = tmp_path / f"node-{i}"
            node_home.mkdir()
            nodes.append(dep.spawn(f"supernode-{i}", [
                str(bindir / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                str(certs / "ca.crt"), "--auth-supernode-private-key", str(certs / "nodes" / f"node-{i}"),
                "--port", str(fd.free_port()), "--max-wait-time", "60",
                "--node-config", "partition-id=0 num-partitions=1"], env={**env, "FLWR_HOME": str(node_home)}))
        proc = dep.run({**SETTINGS, "output-dir": str(out)}, timeout=400)
        time.sleep(1)
        refused_rc = nodes[1].poll()   # None: still running, i.e. not refused
        logs = dep.logs()
    finally:
        dep.stop()
    results = out / "flower-results.json"
    assert results.exists(), f"no results file; flwr run said:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}\n{logs}"
    doc = json.loads(results.read_text())
    assert doc["status"] == "ok", f"{doc.get('error')}\n{logs}"
    assert doc["rounds_completed"] == 1 and doc["rounds"][0]["clients"] == 1
    assert len(doc["nodes"]) == 1, doc["nodes"]
    # Flower 1.42: an unregistered key cannot activate the node (exit code 305)
    refused = (tmp_path / "supernode-1.log").read_text(errors="replace")
    accepted = (tmp_path / "supernode-0.log").read_text(errors="replace")
    assert "Failed to activate SuperNode" in refused and "Exit Code: 305" in refused, refused[-3000:]
    assert "Failed to activate SuperNode" not in accepted, accepted[-3000:]
    assert refused_rc not in (None, 0), refused_rc
