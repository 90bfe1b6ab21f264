"""ClientApp: thin message handlers; the logic is in :mod:`sim.training.client_handlers`.

Each handler reads the node's identity from ``context.node_config`` (``partition-id``
and ``num-partitions``, set by the simulation or ``--node-config``; optionally a
site's own ``data-path``, ``state-dir`` and ``noise-secret``, see docs/deployment.md),
runs the client handler on the message content and the node's ``context.state``, and
replies. An exception becomes Flower's error reply; the server drops the client for that round.

In deployment every message runs in a fresh process that imports this module first, so
its imports are timed in groups (torch, transformers' modelling core, the project) and
reported with the first reply (``timing-s``, :mod:`sim.training.timing`; docs/deployment.md).
"""

from __future__ import annotations

import time

_FIRST_LINE = time.time()
import torch  # noqa: E402,F401 - timed apart: the project imports it first

_AFTER_TORCH = time.time()
import transformers.modeling_utils  # noqa: E402,F401 - timed apart: every tower import starts here

_AFTER_TRANSFORMERS = time.time()
from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from sim.training.client_handlers import client_evaluate, client_hello, client_init_codec, client_train  # noqa: E402
from sim.training.node import node_identity  # noqa: E402
from sim.training.timing import mark_clientapp_import  # noqa: E402

mark_clientapp_import(_FIRST_LINE, _AFTER_TORCH, _AFTER_TRANSFORMERS, time.time())
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
