"""A local Flower deployment on loopback: one SuperLink, N SuperNodes, ``flwr run``.

This is the deployment runtime (not the simulation engine) on one machine, as a
hospital federation would run it across machines::

    flower-superlink  (TLS, SuperNode authentication, no runtime dependency install)
      ^  HTTPS Fleet API          ^ HTTPS Control API
      |                           |
    flower-supernode x N          flwr run <app> <connection> --run-config ...
    (--node-config "partition-id=i num-partitions=N", own SSH key pair)

:func:`make_tls_certificates` writes a throw-away CA and a server certificate for
``127.0.0.1``/``localhost`` with ``cryptography``; :func:`make_node_key` an EC P-384
key pair in OpenSSH format (what ``flower-supernode --auth-supernode-private-key``
and ``flwr supernode register`` read). :class:`LocalDeployment` starts and stops the
processes, each in its own process group so that a SuperNode (and the ClientApp
processes it spawned) can be killed as a unit to test faults. docs/deployment.md
explains the same steps for real machines.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CONNECTION = "local-deploy"


# ----------------------------------------------------------------------------- keys and certificates
def make_tls_certificates(out: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path, Path]:
    """A self-signed CA plus a server certificate and key for ``hosts``; returns
    ``(ca.pem, server.pem, server.key)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    valid = {"not_valid_before": now - dt.timedelta(minutes=5), "not_valid_after": now + dt.timedelta(days=2)}

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitvlm test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = out / "ca.pem", out / "server.pem", out / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format for SuperNode authentication."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / f"{name}.key", out / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    priv.chmod(0o600)
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return priv, pub


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the deployment
@dataclass
class RunOutcome:
    run_id: int | None
    status: str
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status.startswith("finished:completed")


@dataclass
class LocalDeployment:
    """SuperLink + ``num_supernodes`` SuperNodes on loopback, under ``workdir``.

    ``site_workers`` (default on) starts a warm worker beside each SuperNode
    (``python -m sim worker``, :mod:`sim.training.site_worker`) on a Unix socket in a
    private temporary directory, and gives the SuperNode its ``worker-socket``; each
    worker stops with this object, or when the process that made it exits. The workers
    share this machine's cores: ``worker_threads`` torch threads each (default: cores ÷
    SuperNodes, at least 1; a site alone on its machine would use all of them).
    ``node_configs[i]`` adds ``--node-config`` pairs for SuperNode ``i`` (its
    ``partition-id`` and ``num-partitions`` are always set), e.g. ``{"noise-secret": s}``
    (:mod:`sim.training.node`; ``python -m sim deploy`` sets none). They go on its command
    line, which local users can read, and on loopback the server shares the machine anyway:
    a secret here is for testing, not for secrecy. Use as a context manager;
    every process is stopped on exit. Logs are ``workdir/logs/*.log``.
    """

    workdir: Path
    num_supernodes: int
    app_dir: Path = Path(__file__).resolve().parents[2]
    tls: bool = True
    authenticate: bool = True
    node_configs: list[dict[str, object]] = field(default_factory=list)
    site_workers: bool = True
    worker_threads: int | None = None  # torch threads per worker; None: this machine's cores shared by the sites
    startup_timeout_s: float = 120.0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        if self.authenticate and not self.tls:
            raise ValueError("SuperNode authentication needs TLS")
        self.port = free_port()
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.certs = self.workdir / "certs"
        self.env = _environment(self.home)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        for d in (self.home, self.logs, self.certs):
            d.mkdir(parents=True, exist_ok=True)
        tls_args, conn_tls = ["--insecure"], "insecure = true"
        if self.tls:
            ca, cert, key = make_tls_certificates(self.certs)
            tls_args = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
            conn_tls = f'root-certificates = "{ca}"'
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{conn_tls}\n'
        )
        cmd = ["flower-superlink", *tls_args, "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(self.port)]
        if self.authenticate:
            cmd.append("--enable-supernode-auth")
        self._spawn("superlink", cmd)
        if self.site_workers:
            self._start_workers()
        self._wait_for_superlink()
        for i in range(self.num_supernodes):
            self.start_supernode(i)
        self.wait_for_nodes(self.num_supernodes)

    def start_supernode(self, i: int, register: bool = True) -> None:
        """Start SuperNode ``i`` with its own key pair; ``register=False`` leaves the key
        unknown to the SuperLink (an intruder, which authentication must keep out)."""
        node_cfg: dict[str, object] = {"partition-id": i, "num-partitions": self.num_supernodes}
        if self.site_workers and i < self.num_supernodes:
            node_cfg["worker-socket"] = str(self._worker_socket(i))
        if i < len(self.node_configs):
            node_cfg.update(self.node_configs[i])
        cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
               "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in node_cfg.items())]
        if self.tls:
            cmd += ["--root-certificates", str(self.certs / "ca.pem")]
        else:
            cmd.append("--insecure")
        if self.authenticate:
            priv, pub = make_node_key(self.certs, f"supernode-{i}")
            if register:
                self.flwr("supernode", "register", str(pub), CONNECTION, check=True)
            cmd += ["--auth-supernode-private-key", str(priv)]
        self._spawn(f"supernode-{i}", cmd)

    def _worker_socket(self, i: int) -> Path:
        return self.worker_dir / f"site-{i}.sock"

    def _start_workers(self) -> None:
        """One warm worker per SuperNode, all started at once; returns when all listen."""
        self.worker_dir = Path(tempfile.mkdtemp(prefix="svw-"))  # 0700; short: a socket path has ~100 bytes
        ready = [self.worker_dir / f"site-{i}.ready" for i in range(self.num_supernodes)]
        threads = self.worker_threads or max(1, (os.cpu_count() or 1) // self.num_supernodes)
        for i in range(self.num_supernodes):
            self._spawn(f"worker-{i}", [sys.executable, "-m", "sim", "worker", "--socket", str(self._worker_socket(i)),
                                        "--watch-pid", str(os.getpid()), "--ready-file", str(ready[i]),
                                        "--threads", str(threads)], cwd=self.app_dir)
        deadline = time.monotonic() + self.startup_timeout_s
        while not all(r.exists() for r in ready):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"site workers not ready after {self.startup_timeout_s} s; logs in {self.logs}")
            time.sleep(0.2)

    def kill_worker(self, i: int) -> None:
        """SIGKILL site worker ``i`` (its SuperNode's ClientApps then handle messages themselves)."""
        proc = self.procs.pop(f"worker-{i}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def kill_supernode(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and every process it started (its ClientApps)."""
        proc = self.procs.pop(f"supernode-{i}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def kill_serverapp(self) -> int:
        """SIGKILL every ServerApp process the SuperLink started (a server crash: nothing
        runs its exit handlers), then ``flwr stop`` the runs left unfinished so that their
        ``flwr run --stream`` returns; returns how many processes were killed."""
        import psutil

        apps = []
        for proc in psutil.Process(self.procs["superlink"].pid).children(recursive=True):  # via flower-superexec
            try:
                if any(Path(arg).name == "flwr-serverapp" for arg in proc.cmdline()[:2]):
                    proc.kill()
                    apps.append(proc)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(apps, timeout=30)
        for run_id in self.unfinished_runs():
            self.flwr("stop", str(run_id), CONNECTION)
        return len(apps)

    def close(self) -> None:
        for name in sorted(self.procs, key=lambda n: n == "superlink"):  # SuperNodes (and workers) first
            proc = self.procs[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            _kill_group_leftovers(proc.pid)
        self.procs.clear()
        if getattr(self, "worker_dir", None) is not None:
            shutil.rmtree(self.worker_dir, ignore_errors=True)
            self.worker_dir = None

    # ------------------------------------------------------------------ runs
    def run(self, run_config: dict[str, object], timeout_s: float = 900) -> RunOutcome:
        """``flwr run <app> <connection> --stream`` and the run's final status."""
        pairs = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        proc = self.flwr("run", str(self.app_dir), CONNECTION, "--stream", "--run-config", pairs, timeout=timeout_s)
        out = proc.stdout + proc.stderr
        started = "Successfully started run"
        run_id = int(out.split(started, 1)[1].split()[0]) if started in out else None
        status = self.run_status(run_id) if run_id is not None else "unknown"
        return RunOutcome(run_id, status, proc.returncode, out)

    def run_status(self, run_id: int) -> str:
        proc = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(proc.stdout).get("runs") or [{}]
        except json.JSONDecodeError:
            return "unknown"
        return f"{runs[0].get('status', 'unknown')} {runs[0].get('status-details', '')}".strip()

    def unfinished_runs(self) -> list[int]:
        """The ids of the runs the SuperLink has not marked finished."""
        proc = self.flwr("ls", CONNECTION, "--format", "json")
        try:
            runs = json.loads(proc.stdout).get("runs") or []
        except json.JSONDecodeError:
            return []
        return [int(r["run-id"]) for r in runs if not str(r.get("status", "")).startswith("finished")]

    def flwr(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=self.workdir)
        if check and proc.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def online_nodes(self) -> int:
        proc = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(proc.stdout).get("nodes") or []
        except json.JSONDecodeError:
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def wait_for_nodes(self, n: int) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while self.online_nodes() < n:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.online_nodes()} of {n} SuperNodes online; logs in {self.logs}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ helpers
    def _spawn(self, name: str, cmd: list[str], cwd: Path | None = None) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=cwd or self.workdir, start_new_session=True)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def _wait_for_superlink(self) -> None:
        import ssl
        import urllib.request

        scheme = "https" if self.tls else "http"
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.pem")) if self.tls else None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{self.port}/health", timeout=1, context=ctx) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"SuperLink not healthy after {self.startup_timeout_s} s; log in {self.logs}")


def _environment(home: Path) -> dict[str, str]:
    """Offline, isolated Flower home; the venv's console scripts first on PATH."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",  # how often SuperExec looks for a task (default 1 s)
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def _kill_group_leftovers(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["CONNECTION", "LocalDeployment", "RunOutcome", "free_port", "make_node_key", "make_tls_certificates"]
