"""ClientApp: thin message handlers; the logic is in :mod:`sim.training.client_handlers`.

Each handler reads the node's identity from ``context.node_config`` (``partition-id``
and ``num-partitions``, set by the simulation or ``--node-config``; optionally a
site's own ``data-path`` and ``state-dir``, see docs/deployment.md), runs the client
handler on the message content and the node's ``context.state``, and replies. An
exception becomes Flower's error reply; the server drops the client for that round.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from sim.training.client_handlers import client_evaluate, client_hello, client_init_codec, client_train
from sim.training.node import node_identity

app = ClientApp()


def _reply(handler, msg: Message, context: Context) -> Message:
    return Message(handler(msg.content, context.state, node_identity(context.node_config)), reply_to=msg)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return _reply(client_hello, msg, context)


@app.query("init_codec")
def init_codec(msg: Message, context: Context) -> Message:
    return _reply(client_init_codec, msg, context)


@app.train("split_step")
def split_step(msg: Message, context: Context) -> Message:
    return _reply(client_train, msg, context)


@app.evaluate("split_infer")
def split_infer(msg: Message, context: Context) -> Message:
    return _reply(client_evaluate, msg, context)
