"""A site's warm worker: the client's message handlers in a process that outlives a message.

flwr 1.41 handles every message a SuperNode receives in a fresh ``flwr-clientapp``
process, which imports torch and transformers and rebuilds the model, tokenizer and data
before it handles the message; that is about three quarters of a deployment exchange
(docs/performance.md, "Where a deployment exchange's time goes"). A site that runs
``python -m sim worker --socket PATH`` beside its SuperNode, and gives the SuperNode
``--node-config "... worker-socket=PATH"``, keeps all of that warm: the per-message
ClientApp imports only this module (stdlib and flwr), forwards the message content, its
``context.state`` and the node config over the Unix socket, and replies with what the
worker's handler returned. The handlers are :data:`sim.training.client_handlers.HANDLERS`,
the same functions the simulation and the in-process reference call, so the results are
the same (``tests/test_site_worker.py``; the deployment test runs through a worker).

What it keeps of Flower's security model (docs/deployment.md, "A warm worker per site"):

* **nothing listens on the network**: a Unix domain socket, created ``0600`` (umask) in a
  directory the worker's user owns and no one else can write; the worker refuses a peer
  whose uid (``SO_PEERCRED``) is not its own, and the ClientApp refuses a socket another
  user owns (the message, the node config and its ``noise-secret`` go only to the site's
  own user). TLS and node authentication between SuperNode and SuperLink are unchanged;
* **the state stays Flower's**: weights and optimiser state live in ``context.state`` as
  before; the worker returns the updated state with the reply and keeps only caches;
* **the same code**: the ClientApp sends a digest of the app's code (the FAB it was
  installed from); a worker running other code answers ``code-mismatch`` and the
  ClientApp handles the message itself;
* **it fails safe**: a worker that is not running, dies mid-message or answers garbage
  makes the ClientApp handle that message itself from the untouched ``context.state``
  (slower, same result); a handler that raises in the worker raises in the ClientApp, so
  the server sees the same error reply as without a worker.

Framing (both directions): ``SVW1``, a 4-byte header length, a JSON header, then per
blob an 8-byte length and its bytes; blobs are RecordDicts as Flower's own protobuf
(``flwr.common.serde.recorddict_to_proto``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from .startup import CLIENTAPP_COMMAND, process_start

log = logging.getLogger(__name__)

SOCKET_KEY = "worker-socket"  # the node-config key naming the worker's socket
TIMING_KEY = "timing-s"  # sim.wire.messages.TIMING_KEY (not imported: it pulls in torch)
TIMING_PARTS = 7  # len(sim.wire.messages.CLIENT_TIMING): start, load, 3 imports, rebuild, compute
MAGIC = b"SVW1"
MAX_HEADER = 1 << 16
MAX_BLOB = 1 << 34  # 16 GiB: a bound on what a peer can make us allocate, far above any message
APP_ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("sim", "clients")  # what a handler runs; the digest covers their .py files


class WorkerUnavailable(Exception):
    """The worker could not handle the message (not running, died, other code, bad
    frame): the caller handles it itself."""


class WorkerHandlerError(RuntimeError):
    """The handler raised inside the worker (its type and message are in the text)."""


def code_digest(root: Path = APP_ROOT) -> str:
    """sha256 over the relative paths and bytes of the handlers' code under ``root``."""
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for p in sorted((root / d).rglob("*.py")):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- framing
def _send(sock: socket.socket, header: dict, blobs: list[bytes]) -> None:
    head = json.dumps({**header, "blobs": len(blobs)}).encode()
    parts = [MAGIC, struct.pack(">I", len(head)), head]
    for b in blobs:
        parts += [struct.pack(">Q", len(b)), b]
    sock.sendall(b"".join(parts))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[dict, list[bytes]]:
    if _recv_exact(sock, 4) != MAGIC:
        raise ValueError("not a site-worker frame")
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_HEADER:
        raise ValueError(f"header of {n} bytes exceeds {MAX_HEADER}")
    header = json.loads(_recv_exact(sock, n))
    if not isinstance(header, dict) or not isinstance(header.get("blobs"), int) or not 0 <= header["blobs"] <= 4:
        raise ValueError("malformed header")
    blobs = []
    for _ in range(header["blobs"]):
        (size,) = struct.unpack(">Q", _recv_exact(sock, 8))
        if size > MAX_BLOB:
            raise ValueError(f"blob of {size} bytes exceeds {MAX_BLOB}")
        blobs.append(_recv_exact(sock, size))
    return header, blobs


def _to_bytes(rd: RecordDict) -> bytes:
    return recorddict_to_proto(rd).SerializeToString()


def _from_bytes(b: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(b))


# ----------------------------------------------------------------------------- ClientApp side
def check_socket(path: str) -> Path:
    """``path`` as a socket this user owns; :class:`WorkerUnavailable` otherwise."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as err:
        raise WorkerUnavailable(f"no worker socket at {p}: {err}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise WorkerUnavailable(f"{p} is not a socket")
    if st.st_uid != os.getuid():
        raise WorkerUnavailable(f"{p} belongs to uid {st.st_uid}, not to this user ({os.getuid()}): not used")
    return p


def call(path: str, message_type: str, content: RecordDict, state: RecordDict, node_config: dict,
         digest: str) -> tuple[RecordDict, RecordDict, float]:
    """Have the worker at ``path`` handle one message: ``(reply content, new state, seconds
    of the call)``. :class:`WorkerUnavailable` if it cannot (the caller handles the message
    itself); :class:`WorkerHandlerError` if the handler raised."""
    p = check_socket(path)
    t0 = time.perf_counter()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(p))
            _send(sock, {"type": message_type, "node-config": node_config, "code": digest},
                  [_to_bytes(content), _to_bytes(state)])
            header, blobs = _recv(sock)
    except (OSError, EOFError, ValueError) as err:
        raise WorkerUnavailable(f"worker at {p}: {type(err).__name__}: {err}") from None
    status = header.get("status")
    if status == "error":
        raise WorkerHandlerError(str(header.get("error", "the worker's handler raised")))
    if status != "ok" or len(blobs) != 2:
        raise WorkerUnavailable(f"worker at {p} answered {status!r}: {header.get('error', '')}")
    try:
        reply, new_state = _from_bytes(blobs[0]), _from_bytes(blobs[1])
    except Exception as err:  # noqa: BLE001 - any decoding failure means: do it here
        raise WorkerUnavailable(f"worker at {p} sent an undecodable reply: {err}") from None
    return reply, new_state, time.perf_counter() - t0


def forward(path: str, message_type: str, content: RecordDict, state: RecordDict, node_config: dict, digest: str,
            first_line: float, imports_s: float) -> RecordDict:
    """:func:`call`, then ``state`` updated and the reply's ``timing-s`` made this
    process's: its own ``start`` and ``load`` (up to ``first_line``), no torch or
    transformers import, ``imports_s`` as the project's import, the worker's ``rebuild``,
    and as ``compute`` the rest of the call (the worker's compute, serialisation and the
    socket; :mod:`sim.training.timing`)."""
    reply, new_state, call_s = call(path, message_type, content, state, node_config, digest)
    replace_state(state, new_state)
    meta = reply.config_records.get("meta")
    timing = meta.get(TIMING_KEY) if meta is not None else None
    if isinstance(timing, list) and len(timing) == TIMING_PARTS:
        start, load = process_start(first_line) if Path(sys.argv[0]).name == CLIENTAPP_COMMAND else (0.0, 0.0)
        rebuild = float(timing[5])
        meta[TIMING_KEY] = [max(0.0, float(x)) for x in (start, load, 0.0, 0.0, imports_s, rebuild, call_s - rebuild)]
    return reply


def replace_state(state: RecordDict, new_state: RecordDict) -> None:
    """Make ``state`` (the Context's) hold exactly ``new_state``'s records."""
    for key in list(state.keys()):
        del state[key]
    for key, record in new_state.items():
        state[key] = record


# ----------------------------------------------------------------------------- worker side
def _handle(header: dict, blobs: list[bytes], digest: str) -> tuple[dict, list[bytes]]:
    from .client_handlers import HANDLERS
    from .node import node_identity

    if header.get("code") != digest:
        return {"status": "code-mismatch", "error": "this worker runs other code than the ClientApp's FAB"}, []
    handler = HANDLERS.get(header.get("type"))
    node_config = header.get("node-config")
    if handler is None or not isinstance(node_config, dict) or len(blobs) != 2:
        return {"status": "bad-request", "error": f"unknown message type {header.get('type')!r} or malformed request"}, []
    content, state = _from_bytes(blobs[0]), _from_bytes(blobs[1])
    try:
        reply = handler(content, state, node_identity(node_config))
    except Exception as err:  # noqa: BLE001 - the ClientApp re-raises it: Flower's error reply
        log.warning("handler %s raised: %s: %s", header["type"], type(err).__name__, err)
        return {"status": "error", "error": f"{type(err).__name__}: {err}"}, []
    return {"status": "ok"}, [_to_bytes(reply), _to_bytes(state)]


def _peer_uid(conn: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None  # not Linux: the socket's 0600 mode is the only check
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _bind(path: Path) -> socket.socket:
    parent = path.parent
    st = parent.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{parent} must belong to this user and not be writable by others (chmod 700 it)")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a stale socket left by a worker that died
        else:
            raise FileExistsError(f"a worker is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return True


def serve(path: str, idle_timeout_s: float = 3600.0, watch_pid: int = 0, ready: Path | None = None,
          threads: int = 0) -> int:
    """Serve messages on the Unix socket ``path``, one at a time, until SIGTERM/SIGINT,
    ``idle_timeout_s`` without a message, or process ``watch_pid`` (e.g. the SuperNode)
    exiting. ``ready`` is touched once it listens and the handlers are imported.
    ``threads``: torch's intra-op threads (0: torch's default, as in a ``flwr-clientapp``
    process, so that a message handled without the worker gives the same floats)."""
    import torch

    import sim.training.client_handlers  # noqa: F401 - the heavy imports, once, before the first message

    if threads:
        torch.set_num_threads(threads)

    p = Path(path).expanduser().resolve()
    digest = code_digest()
    sock = _bind(p)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    sock.settimeout(1.0)
    log.info("site worker listening on %s (code %s)", p, digest[:12])
    if ready is not None:
        ready.touch()
    last = time.monotonic()
    try:
        while not stopping:
            if watch_pid and not _alive(watch_pid):
                log.info("process %d exited: stopping", watch_pid)
                break
            if time.monotonic() - last > idle_timeout_s:
                log.info("idle for %.0f s: stopping", idle_timeout_s)
                break
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            last = time.monotonic()
            with conn:
                conn.settimeout(None)
                uid = _peer_uid(conn)
                if uid is not None and uid != os.getuid():
                    log.warning("refused a connection from uid %d", uid)
                    continue
                try:
                    header, blobs = _recv(conn)
                    reply = _handle(header, blobs, digest)
                    _send(conn, *reply)
                except (OSError, EOFError, ValueError) as err:
                    log.warning("dropped a request: %s: %s", type(err).__name__, err)
            last = time.monotonic()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        try:
            p.unlink()
        except OSError:
            pass
    return 0

