"""An in-process Flower ``Grid`` for fast fault and resume tests.

Every pushed message is handed straight to the real ``ClientApp`` (``clients.client_app``)
with a per-node ``Context``, as the simulation engine does, minus Ray and its polling.
The runtimes' failure semantics are reproduced from the flwr 1.41 source:

* a ClientApp that raises -> an error reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``);
* a node listed in ``gone`` -> no reply at all, and it is no longer listed by
  ``get_node_ids`` (a crashed SuperNode once the SuperLink marks it offline).

``tamper(request, reply)`` may replace the reply a client produced: return a message,
a list of messages (several replies to one request), or None (the reply never arrives).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from clients.client_app import app as client_app

Tamper = Callable[[Message, Message], "Message | list[Message] | None"]


class LoopbackGrid(Grid):
    def __init__(self, num_nodes: int, node_configs: list[dict] | None = None, tamper: Tamper | None = None) -> None:
        self.contexts: dict[int, Context] = {}
        for i in range(num_nodes):
            node_id = 1000 + i  # stable ids, so ledgers of separate runs compare equal
            cfg = {"partition-id": i, "num-partitions": num_nodes} | ((node_configs or [{}] * num_nodes)[i])
            self.contexts[node_id] = Context(run_id=1, node_id=node_id, node_config=cfg, state=RecordDict(), run_config={})
        self.tamper = tamper
        self.gone: set[int] = set()
        self.pull_interval = 0.001
        self.handled: list[Message] = []  # every request a client handled
        self._replies: dict[str, list[Message]] = {}

    # -- Grid API
    @property
    def run(self):  # pragma: no cover - not used by the strategy
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:  # pragma: no cover
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # pragma: no cover
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.gone]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node in self.gone:
                continue
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as err:  # what the simulation's worker does with a raising ClientApp
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err)}:<'{err}'>"), reply_to=msg)
            self.handled.append(msg)
            out = self.tamper(msg, reply) if self.tamper else reply
            out = [] if out is None else out if isinstance(out, list) else [out]
            for r in out:
                r.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._replies[msg.metadata.message_id] = out
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for i in message_ids:
            out += self._replies.pop(i, [])
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


def request_where(msg: Message) -> tuple[str, int, int]:
    """(message type, round, exchange) of a request (exchange -1 when it has none)."""
    meta = msg.content.config_records.get("meta", {})
    return msg.metadata.message_type, int(meta.get("round", 0)), int(meta.get("exchange", -1))
