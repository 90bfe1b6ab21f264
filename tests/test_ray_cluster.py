"""``python -m sim run --ray-address`` on a real two-node Ray cluster (docs/performance.md,
"A real Ray cluster").

Two ``ray start`` raylets on this machine, one CPU each (a head with a ``head`` resource and
a worker with a ``worker2`` resource), so the two ClientApp actors (``client-cpus=1``) cannot
share a node. After the run a separate driver reads the cluster's GCS: which node each
``ClientAppActor`` lived on and which actor executed each ``ClientAppActor.run`` task
(``ray.timeline()``; an actor task's id ends with its actor's id). ``ray.util.state`` would
say the same but needs the dashboard (``ray[default]``), which ``flwr[simulation]`` does not
install. The per-step losses must be bitwise those of ``--in-process``.

Ray is cleaned up by process session, not with ``ray stop`` (which stops every Ray on the
machine): each ``ray start`` runs in a new session, and every process left in those sessions
(GCS, raylets, agents, workers) is terminated, then killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest

from conftest import SMALL, run_cli

RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
OBJECT_STORE = str(256 * 1024 * 1024)

# What the GCS knows after the run, printed as JSON by a driver of its own.
PLACEMENT = """
import json, sys
import ray
from ray._private.state import actors
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = {n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]}
actor_node = {a: info["Address"]["NodeID"] for a, info in actors().items() if info["ActorClassName"] == "ClientAppActor"}
runs = [e["args"]["task_id"][16:] for e in ray.timeline() if e["cat"] == "task::ClientAppActor.run"]
print(json.dumps({"nodes": nodes, "actor_node": actor_node, "runs": runs}))
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def session_pids(sids: set[int]) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) in sids:
                    pids.append(int(name))
            except OSError:  # gone meanwhile
                pass
    return pids


class LoopbackCluster:
    """A head and one worker raylet on this machine, every port chosen free, in ``temp_dir``."""

    def __init__(self, temp_dir: str):
        self.temp_dir, self.sids = temp_dir, set()
        self.port, *self._ports = free_ports(15)

    def _node_ports(self) -> list[str]:
        names = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc",
                 "runtime-env-agent", "metrics-export")
        return [f"--{name}-port={self._ports.pop()}" for name in names]

    def _ray_start(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [RAY, "start", "--num-cpus=1", f"--object-store-memory={OBJECT_STORE}", "--disable-usage-stats",
               *self._node_ports(), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.sids.add(proc.pid)  # the session every process it starts stays in
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return subprocess.CompletedProcess(cmd, proc.returncode, out)

    def start_head(self) -> subprocess.CompletedProcess:
        return self._ray_start("--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
                               "--include-dashboard=false", f"--dashboard-port={self._ports.pop()}",
                               f"--ray-client-server-port={self._ports.pop()}", '--resources={"head": 1}')

    def start_worker(self) -> subprocess.CompletedProcess:
        return self._ray_start(f"--address=127.0.0.1:{self.port}", '--resources={"worker2": 1}')

    def stop(self) -> None:
        """SIGTERM every process of the ``ray start`` sessions, SIGKILL what is left after 20 s."""
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            for pid in session_pids(self.sids):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + grace
            while session_pids(self.sids) and time.monotonic() < deadline:
                time.sleep(0.5)
        left = session_pids(self.sids)
        assert not left, f"Ray processes still running: {left}"


@pytest.mark.slow
@pytest.mark.skipif(RAY is None, reason="the ray CLI is not installed")
def test_simulation_on_a_two_node_ray_cluster(tmp_path, in_process_run):
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    cluster = LoopbackCluster(temp_dir)
    try:
        t0 = time.monotonic()
        head = cluster.start_head()
        if head.returncode != 0:
            pytest.skip(f"'ray start --head' is impossible on this machine:\n{head.stdout[-2000:]}")
        worker = cluster.start_worker()
        assert worker.returncode == 0, worker.stdout[-3000:]
        start_s = time.monotonic() - t0

        t0 = time.monotonic()
        out = tmp_path / "run"
        proc = run_cli(out, 2, SMALL, "--ray-address", f"127.0.0.1:{cluster.port}")
        run_s, load = time.monotonic() - t0, os.getloadavg()[0]
        assert proc.returncode == 0, proc.stderr[-3000:]

        query = subprocess.run([sys.executable, "-c", PLACEMENT, f"127.0.0.1:{cluster.port}"],
                               capture_output=True, text=True, timeout=300)
        assert query.returncode == 0, query.stderr[-3000:]
        seen = json.loads(query.stdout.strip().splitlines()[-1])
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)

    # (a) placement: two nodes, one actor on each, and both executed ClientApp messages
    by_resource = {label: node for node, resources in seen["nodes"].items()
                   for label in ("head", "worker2") if label in resources}
    assert len(seen["nodes"]) == 2 and set(by_resource) == {"head", "worker2"}
    assert sorted(seen["actor_node"].values()) == sorted(by_resource.values())
    runs_per_node = {label: sum(seen["actor_node"].get(a) == node for a in seen["runs"])
                     for label, node in by_resource.items()}
    assert all(n > 0 for n in runs_per_node.values()), runs_per_node
    # every message the server sent (the ledger's downlink rows) was one ClientAppActor.run
    ledger = pd.read_csv(out / "ledger.csv")
    assert sum(runs_per_node.values()) == (ledger.direction == "down").sum()

    # (b) the same run as in process: bitwise the same losses, the same accuracies
    assert json.loads((out / "config.json").read_text())["client-cpus"] == 1.0
    assert (out / "steps.csv").read_bytes() == (in_process_run / "steps.csv").read_bytes()
    a, b = pd.read_csv(out / "metrics.csv"), pd.read_csv(in_process_run / "metrics.csv")
    assert a.accuracy.tolist() == b.accuracy.tolist()
    print(f"\nray cluster: start {start_s:.1f} s, run {run_s:.1f} s, load average (1 min) {load:.2f}, "
          f"ClientAppActor.run per node {runs_per_node}")
