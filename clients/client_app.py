"""ClientApp: thin message handlers; the logic lives in :mod:`sim.protocol`.

Each handler reads the node's identity from ``context.node_config`` (``partition-id``
and ``num-partitions``, set by the simulation or ``--node-config``; optionally a
site's own ``data-path`` and ``state-dir``, see docs/deployment.md), runs the client
op, and replies. Weights and optimiser state persist in ``context.state``. An
exception becomes Flower's error reply; the server drops the client for that round.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from sim.protocol import client_evaluate, client_hello, client_init_codec, client_train, node_identity

app = ClientApp()


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return Message(client_hello(context.state, node_identity(context.node_config)), reply_to=msg)


@app.query("init_codec")
def init_codec(msg: Message, context: Context) -> Message:
    return Message(client_init_codec(msg.content, context.state, node_identity(context.node_config)), reply_to=msg)


@app.train("split_step")
def split_step(msg: Message, context: Context) -> Message:
    return Message(client_train(msg.content, context.state, node_identity(context.node_config)), reply_to=msg)


@app.evaluate("split_infer")
def split_infer(msg: Message, context: Context) -> Message:
    return Message(client_evaluate(msg.content, context.state, node_identity(context.node_config)), reply_to=msg)
