"""ClientApp: thin message handlers; the logic is in :mod:`sim.training.client_handlers`.

Each handler reads the node's identity from ``context.node_config`` (``partition-id``
and ``num-partitions``, set by the simulation or ``--node-config``; optionally a
site's own ``data-path``, ``state-dir`` and ``noise-secret``, see docs/deployment.md),
runs the client handler on the message content and the node's ``context.state``, and
replies. An exception becomes Flower's error reply; the server drops the client for that round.

In deployment every message runs in a fresh process that imports this module first.
With node config ``worker-socket`` set, a site's warm worker handles the message
(:mod:`sim.training.site_worker`; docs/deployment.md): this module then imports only
stdlib and flwr, never torch or transformers, and handles the message itself only when
the worker cannot. Otherwise (and in the simulation) it imports the handlers on its first
message, timing the groups (torch, transformers' modelling core, the project), and
reports them with that reply (``timing-s``, :mod:`sim.training.timing`).
"""

from __future__ import annotations

import functools
import logging
import time

_FIRST_LINE = time.time()
from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from sim.training import site_worker  # noqa: E402 - stdlib and flwr only

_LIGHT_IMPORTS_S = time.time() - _FIRST_LINE
log = logging.getLogger(__name__)
app = ClientApp()


@functools.cache
def _local_handlers() -> dict:
    """The handlers, imported here (once per process) and timed for ``timing-s``."""
    t0 = time.time()
    import torch  # noqa: F401 - timed apart: the project imports it first

    t1 = time.time()
    import transformers.modeling_utils  # noqa: F401 - timed apart: every tower import starts here

    t2 = time.time()
    from sim.training.client_handlers import HANDLERS
    from sim.training.timing import mark_startup

    mark_startup(_FIRST_LINE, (t1 - t0, t2 - t1, time.time() - t2 + _LIGHT_IMPORTS_S))
    return HANDLERS


@functools.cache
def _digest() -> str:
    return site_worker.code_digest()


def _reply(msg: Message, context: Context) -> Message:
    node_config = dict(context.node_config)
    kind = msg.metadata.message_type
    if node_config.get(site_worker.SOCKET_KEY):
        try:
            content = site_worker.forward(node_config[site_worker.SOCKET_KEY], kind, msg.content, context.state,
                                          node_config, _digest(), _FIRST_LINE, _LIGHT_IMPORTS_S)
            return Message(content, reply_to=msg)
        except site_worker.WorkerUnavailable as err:
            log.warning("site worker not used, handling %s here: %s", kind, err)
    from sim.training.node import node_identity

    handler = _local_handlers()[kind]
    return Message(handler(msg.content, context.state, node_identity(node_config)), reply_to=msg)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@app.query("init_codec")
def init_codec(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@app.train("split_step")
def split_step(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@app.evaluate("split_infer")
def split_infer(msg: Message, context: Context) -> Message:
    return _reply(msg, context)
