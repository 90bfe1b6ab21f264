"""The client's message handlers: pure functions of (request content, client state, node).

The Flower ClientApp (``clients/client_app.py``) wraps each one in ``@app.<category>``;
the in-process transport (:mod:`sim.training.transport`) calls them directly, so both
runtimes run exactly this code. Weights and optimiser state persist in the client's
``state`` (Flower's ``context.state``) between messages.
"""

from __future__ import annotations

import time

from flwr.app import RecordDict

from sim.config import ConfigError, SplitConfig
from sim.config.faults import EVAL, inject
from sim.model import synced_names
from sim.wire.arrays import WireError, meta_int, record_state, state_record
from sim.wire.messages import (
    MAX_STEPS, TIMING_KEY, eval_reply, hello_reply, init_reply, parse_train_request, train_reply,
)
from sim.wire.streams import decode_grad_records, micro_batch_shapes

from .client import (
    ClientRuntime, apply_steps, client_runtime, encode_eval, encode_steps, get_optimiser_state, get_weights,
    init_codec_state, load_optimiser_state, load_weights, micro_batch,
)
from .client_checkpoint import load_optimiser_file, save_optimiser_file
from .node import NodeIdentity
from .timing import client_timing


def _client_config(content: RecordDict, state: RecordDict, node: NodeIdentity) -> SplitConfig:
    """The run config (sent with the first message of a round, kept in ``state``),
    with this node's own ``data-path`` if it has one."""
    if "config" in content.config_records:
        state["client.config"] = content.config_records["config"]
    if "client.config" not in state.config_records:
        raise WireError("no run config: the first message of a round must carry 'config'")
    cfg = SplitConfig.from_run_config(dict(state.config_records["client.config"]))
    if node.data_path:
        if cfg.dataset != "llava-json":
            raise ConfigError(f"node config 'data-path' is set but the run's dataset is {cfg.dataset!r}, not 'llava-json'")
        if cfg.tokenizer_source == "auto":
            raise ConfigError("node config 'data-path' needs the run's 'tokenizer' to be a shared directory: "
                              "tokenizer=auto would build a different vocabulary on every site")
        cfg = cfg.replace(data_path=node.data_path)
    elif cfg.dataset == "llava-json" and not cfg.data_path:
        raise ConfigError("the run config leaves 'data-path' empty, so this SuperNode needs --node-config data-path=...")
    return cfg


def _restore(cfg: SplitConfig, content: RecordDict, state: RecordDict, node: NodeIdentity, resumed_from: int = 0) -> ClientRuntime:
    """The client runtime with this client's weights (the request's, else its own) and
    optimiser state (its own, else the checkpoint of a resumed run, else fresh)."""
    rt = client_runtime(cfg, node.partition, node.num_partitions, own_data=bool(node.data_path),
                        noise_secret=node.noise_secret)
    source = content if "weights" in content.array_records else state
    key = "weights" if source is content else "client.weights"
    if key not in source.array_records:
        raise WireError("no client weights: the first message of a round must carry 'weights'")
    load_weights(rt, record_state(source.array_records[key]))
    optim = state.array_records.get("client.optim")
    if optim is not None:
        load_optimiser_state(rt, record_state(optim))
    else:
        load_optimiser_state(rt, load_optimiser_file(cfg, node, resumed_from) if resumed_from > 0 else None)
    return rt


def _timed_restore(cfg: SplitConfig, content: RecordDict, state: RecordDict, node: NodeIdentity,
                   resumed_from: int = 0) -> tuple[ClientRuntime, float]:
    """:func:`_restore` and how long it took (the ``rebuild`` part of ``timing-s``)."""
    t0 = time.perf_counter()
    rt = _restore(cfg, content, state, node, resumed_from)
    return rt, time.perf_counter() - t0


def _timed(reply: RecordDict, t0: float, rebuild_s: float) -> RecordDict:
    """Add meta ``timing-s`` to a reply whose handler started at ``t0``: this process's
    start-up (its first message only) and the handler's rebuild and compute
    (:mod:`sim.training.timing`)."""
    total = time.perf_counter() - t0
    reply.config_records["meta"][TIMING_KEY] = client_timing(rebuild_s, max(0.0, total - rebuild_s))
    return reply


def _persist(rt: ClientRuntime, state: RecordDict) -> None:
    state["client.weights"] = state_record(get_weights(rt))
    state["client.optim"] = state_record(get_optimiser_state(rt))


def client_hello(content: RecordDict, state: RecordDict, node: NodeIdentity) -> RecordDict:
    """Handle ``query.hello``: the partition id."""
    t0 = time.perf_counter()
    return _timed(hello_reply(node.partition, node.num_partitions), t0, 0.0)


def client_train(content: RecordDict, state: RecordDict, node: NodeIdentity) -> RecordDict:
    """Handle ``train.split_step``: apply received gradients, encode the next micro-batches.

    The reply's ``meta.compute-s`` is the handler's own time, so the server can tell
    its clients' compute from the runtime's messaging cost; ``meta.timing-s`` splits it
    into rebuild and compute, after this process's start-up (:mod:`sim.training.timing`)."""
    t0 = time.perf_counter()
    req = parse_train_request(content)
    cfg = _client_config(content, state, node)
    inject(cfg.fault_inject, node.partition, req.round, req.exchange)
    rt, rebuild_s = _timed_restore(cfg, content, state, node, req.resumed_from)
    aux = None
    if req.apply:
        tokens = [sum(len(rt.data.ids[i]) for i in micro_batch(rt, req.round, s)) for s in req.apply]
        grads = decode_grad_records(content, rt.cfg, micro_batch_shapes(rt.cfg, tokens, len(req.apply)))
        aux = apply_steps(rt, req.round, req.apply, grads)
    enc = encode_steps(rt, req.round, req.encode) if req.encode else None
    reply = train_reply(
        rt.cfg, req, node.partition, rt.vocab_size, rt.model.codecs(), enc.payloads if enc else [],
        enc.texts if enc else [], aux, get_weights(rt) if req.final else None, len(rt.train_idx),
    )
    _persist(rt, state)
    if req.save_state:
        save_optimiser_file(cfg, node, req.round, get_optimiser_state(rt))
    reply.config_records["meta"]["compute-s"] = time.perf_counter() - t0
    return _timed(reply, t0, rebuild_s)


def evaluate_runtime(rt: ClientRuntime, rnd: int, partition: int) -> RecordDict:
    """The ``evaluate.split_infer`` reply of a runtime that holds the weights to evaluate."""
    payloads, prompts, answers, splits, qtypes, _ = encode_eval(rt, rnd)
    return eval_reply(rt.cfg, rnd, partition, rt.vocab_size, rt.model.codecs(), payloads, prompts, answers, splits,
                      qtypes, rt.bad_records)


def client_evaluate(content: RecordDict, state: RecordDict, node: NodeIdentity) -> RecordDict:
    """Handle ``evaluate.split_infer``: encode the local test set with the global weights."""
    t0 = time.perf_counter()
    cfg = _client_config(content, state, node)
    rnd = meta_int(content.config_records["meta"], "round", 1, MAX_STEPS)
    inject(cfg.fault_inject, node.partition, rnd, EVAL)
    rt, rebuild_s = _timed_restore(cfg, content, state, node)
    return _timed(evaluate_runtime(rt, rnd, node.partition), t0, rebuild_s)


def client_init_codec(content: RecordDict, state: RecordDict, node: NodeIdentity) -> RecordDict:
    """Handle ``query.init_codec``: initialise the codecs' data-dependent state from this
    client's own micro-batches and send back only that state."""
    t0 = time.perf_counter()
    rt, rebuild_s = _timed_restore(_client_config(content, state, node), content, state, node)
    full = init_codec_state(rt)
    return _timed(init_reply(node.partition, {k: full[k] for k in synced_names(rt.model)}), t0, rebuild_s)


HANDLERS = {"query.hello": client_hello, "query.init_codec": client_init_codec, "train.split_step": client_train,
            "evaluate.split_infer": client_evaluate}
"""Message type -> handler (the ClientApp registers the same four)."""
