"""ClientApp: thin message handlers; the logic lives in :mod:`sim.protocol`.

Each handler reads the node's identity from ``context.node_config`` (``partition-id``
and ``num-partitions``, set by the simulation or ``--node-config``), runs the
client op, and replies. Weights and optimiser state persist in ``context.state``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from sim.protocol import client_evaluate, client_hello, client_train, node_identity

app = ClientApp()


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return Message(client_hello(context.state, node_identity(context.node_config)), reply_to=msg)


@app.train("split_step")
def split_step(msg: Message, context: Context) -> Message:
    return Message(client_train(msg.content, context.state, node_identity(context.node_config)), reply_to=msg)


@app.evaluate("split_infer")
def split_infer(msg: Message, context: Context) -> Message:
    return Message(client_evaluate(msg.content, context.state, node_identity(context.node_config)), reply_to=msg)
