"""The site's warm worker (sim/training/site_worker.py): the same replies and state as the
handlers in process, errors passed through, and every way it can fail falls back safely."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from sim.compress.streams import Streams
from sim.training import site_worker
from sim.training.client_handlers import client_evaluate, client_train
from sim.training.node import NodeIdentity
from sim.training.server import initial_client_weights
from sim.wire.messages import CLIENT_TIMING, TIMING_KEY, eval_request, train_request

ROOT = Path(__file__).resolve().parents[1]
NODE_CONFIG = {"partition-id": 0, "num-partitions": 2}
NODE = NodeIdentity(0, 2)
VOLATILE = {TIMING_KEY, "compute-s"}  # wall times: differ between any two runs


@pytest.fixture
def worker_dir():
    d = Path(tempfile.mkdtemp(prefix="svw-test-"))  # short: a socket path has about 100 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_worker(d: Path, name: str = "w") -> tuple[subprocess.Popen, Path]:
    sock, ready = d / f"{name}.sock", d / f"{name}.ready"
    proc = subprocess.Popen([sys.executable, "-m", "sim", "worker", "--socket", str(sock), "--ready-file", str(ready),
                             "--watch-pid", str(os.getpid()), "--threads", str(torch.get_num_threads())], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"worker exited: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "worker not ready"
        time.sleep(0.1)
    return proc, sock


@pytest.fixture(scope="module")
def worker():
    """One worker for the module's tests (its start imports torch and transformers)."""
    d = Path(tempfile.mkdtemp(prefix="svw-test-"))
    proc, sock = start_worker(d)
    yield proc, sock
    proc.terminate()
    assert proc.wait(30) == 0
    assert not sock.exists()  # removed on the way out
    shutil.rmtree(d, ignore_errors=True)


def same_records(a: RecordDict, b: RecordDict) -> None:
    assert set(a.array_records) == set(b.array_records) and set(a.config_records) == set(b.config_records)
    for name, rec in a.array_records.items():
        other = b.array_records[name]
        assert list(rec) == list(other), name
        for k in rec:
            assert np.array_equal(rec[k].numpy(), other[k].numpy()), (name, k)
    for name, rec in a.config_records.items():
        assert {k: v for k, v in rec.items() if k not in VOLATILE} == \
               {k: v for k, v in b.config_records[name].items() if k not in VOLATILE}, name


def exchanges(cfg):
    grads = [Streams(torch.full((cfg.batch_size, cfg.num_image_tokens, cfg.hidden_size), 1e-3))]
    return [
        ("train.split_step", lambda: train_request(cfg, 1, 0, [], [0], False, weights=initial_client_weights(cfg))),
        ("train.split_step", lambda: train_request(cfg, 1, 1, [0], [], True, grads=grads)),
        ("evaluate.split_infer", lambda: eval_request(cfg, 1, initial_client_weights(cfg))),
    ]


def test_worker_gives_the_handlers_replies_and_state(tiny_cfg, worker):
    """A round's messages through the worker: replies and context.state equal to the
    in-process handlers', bit for bit (timings aside); timing-s names no torch import."""
    _, sock = worker
    local_state, remote_state = RecordDict(), RecordDict()
    digest = site_worker.code_digest()
    for kind, request in exchanges(tiny_cfg):
        handler = client_train if kind.startswith("train") else client_evaluate
        local = handler(request(), local_state, NODE)
        remote = site_worker.forward(str(sock), kind, request(), remote_state, NODE_CONFIG, digest, time.time(), 0.01)
        same_records(local, remote)
        same_records(local_state, remote_state)
        timing = remote.config_records["meta"][TIMING_KEY]
        assert len(timing) == len(CLIENT_TIMING) and timing[2:4] == [0.0, 0.0] and timing[4] == 0.01
        assert timing[6] > 0
    assert "client.weights" in remote_state.array_records


def test_handler_error_is_raised_and_other_code_is_refused(tiny_cfg, worker):
    _, sock = worker
    no_config = train_request(tiny_cfg, 1, 1, [], [0], False)  # not exchange 0: carries no config
    with pytest.raises(site_worker.WorkerHandlerError, match="WireError: no run config"):
        site_worker.call(str(sock), "train.split_step", no_config, RecordDict(), NODE_CONFIG, site_worker.code_digest())
    with pytest.raises(site_worker.WorkerUnavailable, match="code-mismatch"):
        site_worker.call(str(sock), "query.hello", RecordDict(), RecordDict(), NODE_CONFIG, "0" * 64)
    with pytest.raises(site_worker.WorkerHandlerError, match="unknown node config keys"):
        site_worker.call(str(sock), "query.hello", RecordDict(), RecordDict(), {**NODE_CONFIG, "typo": 1},
                         site_worker.code_digest())


def test_garbage_frames_are_dropped_and_the_worker_keeps_serving(worker):
    proc, sock = worker
    for junk in (b"GET / HTTP/1.1\r\n\r\n", site_worker.MAGIC + (1 << 30).to_bytes(4, "big"), b""):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock))
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            try:
                answer = s.recv(10)
            except ConnectionResetError:  # closed with our junk unread
                answer = b""
            assert answer == b""  # closed without an answer
    reply, _, _ = site_worker.call(str(sock), "query.hello", RecordDict(), RecordDict(), NODE_CONFIG,
                                   site_worker.code_digest())
    assert reply.config_records["meta"]["partition-id"] == 0 and proc.poll() is None


def clientapp_reply(kind: str, content: RecordDict, state: RecordDict, node_config: dict) -> RecordDict:
    from clients.client_app import _reply

    msg = Message(content, dst_node_id=1, message_type=kind)
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=state, run_config={})
    return _reply(msg, ctx).content


def test_clientapp_falls_back_when_the_worker_is_gone(tiny_cfg, worker_dir):
    """The ClientApp handles the message itself, with the same result, when the socket is
    missing, is not a socket, or its worker was killed (the state is left as it was)."""
    proc, sock = start_worker(worker_dir, "dead")
    proc.kill()
    proc.wait()
    not_a_socket = worker_dir / "file.sock"
    not_a_socket.write_text("")
    kind, request = exchanges(tiny_cfg)[0]
    expected = client_train(request(), RecordDict(), NODE)
    for path in (sock, not_a_socket, worker_dir / "missing.sock"):
        state = RecordDict()
        got = clientapp_reply(kind, request(), state, {**NODE_CONFIG, "worker-socket": str(path)})
        same_records(expected, got)
        assert "client.weights" in state.array_records


def test_clientapp_uses_the_worker(tiny_cfg, worker):
    _, sock = worker
    kind, request = exchanges(tiny_cfg)[0]
    state = RecordDict()
    got = clientapp_reply(kind, request(), state, {**NODE_CONFIG, "worker-socket": str(sock)})
    assert got.config_records["meta"][TIMING_KEY][2:4] == [0.0, 0.0]  # no torch import here: the worker's reply
    same_records(client_train(request(), RecordDict(), NODE), got)


def test_unsafe_places_are_refused(worker_dir):
    shared = worker_dir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="not be writable by others"):
        site_worker._bind(shared / "w.sock")
    regular = worker_dir / "w.sock"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        site_worker._bind(regular)
    assert regular.read_text() == "keep me"
    with pytest.raises(site_worker.WorkerUnavailable, match="not a socket"):
        site_worker.check_socket(str(regular))


def test_a_stale_socket_is_replaced_and_a_live_one_is_not(worker, worker_dir):
    _, live = worker
    with pytest.raises(FileExistsError, match="already listening"):
        site_worker._bind(live)
    stale = worker_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # bound, never listened: what a killed worker leaves
    fresh = site_worker._bind(stale)
    assert oct(stale.stat().st_mode & 0o777) == "0o600"
    fresh.close()


def test_digest_covers_the_handlers_code(tmp_path):
    for d in site_worker.CODE_DIRS:
        (tmp_path / d).mkdir()
        (tmp_path / d / "a.py").write_text("x = 1\n")
    before = site_worker.code_digest(tmp_path)
    (tmp_path / "sim" / "a.py").write_text("x = 2\n")
    assert site_worker.code_digest(tmp_path) != before
    assert site_worker.TIMING_KEY == TIMING_KEY and site_worker.TIMING_PARTS == len(CLIENT_TIMING)
