"""Uplink streams through the real message builders, handlers and parsers: codec
initialisation, entropy-coded records, the residual and text streams, synced codec
state, and the text-mode=quantized privacy contract."""

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict

from sim.config import active_streams
from sim.model import state_needs_init
from sim.training.client import client_batch, client_runtime, load_weights, micro_batch
from sim.training.client_handlers import client_evaluate, client_init_codec, client_train
from sim.training.node import NodeIdentity
from sim.training.server import build_server, evaluate, fedavg, initial_client_weights, server_steps, sync_round_state
from sim.wire.arrays import WireError, arrays_to_record, payload_bytes, record_to_arrays, wire_bytes
from sim.wire.messages import (
    eval_request, init_request, parse_eval_reply, parse_init_reply, parse_train_reply, train_request,
)
from sim.wire.streams import FEATURE_RECORDS, GRAD_RECORDS

NODE = NodeIdentity(partition=0, num_partitions=2)

CONFIGS = {
    "vq-vit-rebuild-ans": dict(compressor="vq", bits=5, split_point="vit-ln1:0", entropy_coding="ans"),
    "vq-vit-transmit": dict(compressor="vq", bits=4, split_point="vit-ln1:1", residual_mode="transmit",
                            residual_compressor="nf", residual_bits=3, nf_block=32, grad_compressor="fp16"),
    "rdfsq-ema-range-zstd": dict(compressor="rdfsq", rdfsq_stats="ema", rdfsq_send_range=True, entropy_coding="zstd"),
    "rdfsq-text-quantized": dict(compressor="rdfsq", text_mode="quantized", entropy_coding="ans"),
    "topk-text-fsq": dict(compressor="topk", bits=4, text_mode="quantized", text_compressor="fsq", text_bits=3,
                          grad_compressor="nf", grad_bits=4),
}


def ready(cfg):
    """Server runtime and the global client state after the codec initialisation exchange."""
    server = build_server(cfg)
    w = initial_client_weights(cfg)
    if state_needs_init(server.model.specs(), w):
        reply = client_init_codec(init_request(cfg, w), RecordDict(), NODE)
        assert set(reply.array_records) == {"codec-state"}
        update = parse_init_reply(reply, cfg)
        assert update and set(update) <= set(w)
        w = {**w, **update}
        assert not state_needs_init(server.model.specs(), w)
    return server, sync_round_state(server, w)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streams_round_trip_through_the_protocol(tiny_cfg, name):
    cfg = tiny_cfg.replace(steps_per_exchange=2, **CONFIGS[name])
    server, w = ready(cfg)
    state = RecordDict()
    reply = client_train(train_request(cfg, 1, 0, [], [0, 1], False, weights=w), state, NODE)
    streams = active_streams(cfg)
    assert {FEATURE_RECORDS[s] for s in streams} <= set(reply.array_records)
    up = parse_train_reply(reply, cfg, server.model.codecs(), server.tokens, server.dim, server.vocab_size, server.pad_id, 2, False)
    # the server decodes bitwise what the client's straight-through output was
    rt = client_runtime(cfg, 0, 2)
    load_weights(rt, w)
    for i, step in enumerate((0, 1)):
        with torch.no_grad():
            encs = rt.model.encode(client_batch(rt, micro_batch(rt, 1, step)))
        got = up.y_hats[i]
        assert got.names() == tuple(streams) == encs.names()
        for s in streams:
            assert torch.equal(got[s], encs[s].y), s
    # server steps, downlink gradients of every stream, the client's update, FedAvg and the fold
    _, grads = server_steps(server, 1, [0, 1], [up.y_hats], [up.texts])
    req = train_request(cfg, 1, 1, [0, 1], [], True, grads=grads[0])
    assert {GRAD_RECORDS[s] for s in streams} == set(req.array_records)
    final = client_train(req, state, NODE)
    done = parse_train_reply(final, cfg, server.model.codecs(), server.tokens, server.dim, server.vocab_size, server.pad_id, 0, True)
    assert set(done.weights) == set(w)
    new = sync_round_state(server, fedavg([done.weights, w], [2, 1]))
    assert any(not torch.equal(new[k], w[k]) for k in w)
    ev = client_evaluate(eval_request(cfg, 1, new), RecordDict(), NODE)
    e = parse_eval_reply(ev, cfg, server.model.codecs(), server.tokens, server.dim, server.vocab_size)
    c, n = evaluate(server, e.y_hats, e.prompts, e.answers, e.qtypes, e.splits)["all"]
    assert 0 <= c <= n == len(e.answers)


def test_entropy_coded_record_replaces_the_fixed_width_codes(tiny_cfg):
    plain_cfg = tiny_cfg.replace(bits=2)
    sizes = {}
    for method in ("none", "ans", "zstd"):
        cfg = plain_cfg.replace(entropy_coding=method)
        server, w = ready(cfg)
        reply = client_train(train_request(cfg, 1, 0, [], [0, 1], False, weights=w), RecordDict(), NODE)
        names = set(record_to_arrays(reply.array_records["features"]))
        want = {"none": {"codes.index"}, "ans": {"side.ans_counts", "codes.ans_words"}, "zstd": {"codes.zstd"}}
        assert names == want[method]
        up = parse_train_reply(reply, cfg, server.model.codecs(), server.tokens, server.dim, server.vocab_size, server.pad_id, 2, False)
        sizes[method] = (payload_bytes(reply, ("features",)), up.y_hats)
        # what the ledger measures is what is sent: the coded arrays
        msg = Message(reply, dst_node_id=1, message_type="train.split_step")
        assert wire_bytes(msg) > payload_bytes(reply, ("features", "text"))
    for method in ("ans", "zstd"):
        assert len(sizes[method][1]) == len(sizes["none"][1]) == 2
        assert all(torch.equal(a.image, b.image) for a, b in zip(sizes[method][1], sizes["none"][1]))  # lossless
    assert sizes["ans"][0] < sizes["none"][0]  # trained or not, 2-bit RD-FSQ codes are not uniform


@pytest.mark.parametrize("method", ["ans", "zstd"])
def test_corrupt_entropy_coded_records_are_rejected(tiny_cfg, method):
    cfg = tiny_cfg.replace(entropy_coding=method)
    server, w = ready(cfg)
    reply = client_train(train_request(cfg, 1, 0, [], [0, 1], False, weights=w), RecordDict(), NODE)
    arrays = record_to_arrays(reply.array_records["features"])
    key = "codes.ans_words" if method == "ans" else "codes.zstd"
    cases = [
        {**arrays, key: arrays[key][:-1]},  # truncated stream
        {k: v for k, v in arrays.items() if k != key},  # missing stream
        {**arrays, "codes.index": np.zeros(4, np.uint8)},  # plain codes mixed in
    ]
    if method == "ans":
        counts = arrays["side.ans_counts"].copy()
        counts[0] += 1
        cases.append({**arrays, "side.ans_counts": counts})  # histogram of the wrong length
        flipped = arrays[key].copy()
        flipped[len(flipped) // 2] ^= np.uint32(0x00F0F0F0)
        cases.append({**arrays, key: flipped})
    else:
        flipped = arrays[key].copy()
        flipped[-6] ^= np.uint8(0xFF)
        cases.append({**arrays, key: flipped})
    for bad in cases:
        broken = RecordDict({**reply.array_records, "features": arrays_to_record(bad), **reply.config_records})
        with pytest.raises(WireError):
            parse_train_reply(broken, cfg, server.model.codecs(), server.tokens, server.dim, server.vocab_size, server.pad_id, 2, False)


def test_quantized_text_sends_only_answer_ids(tiny_cfg):
    cfg = tiny_cfg.replace(text_mode="quantized")
    server, w = ready(cfg)
    reply = client_train(train_request(cfg, 1, 0, [], [0], False, weights=w), RecordDict(), NODE)
    text = record_to_arrays(reply.array_records["text"])
    assert set(text) == {"labels", "lens", "mask"}
    rt = client_runtime(cfg, 0, 2)
    idx = micro_batch(rt, 1, 0)
    answers = np.concatenate([rt.data.ids[i][rt.data.loss_mask[i]] for i in idx])
    np.testing.assert_array_equal(text["labels"], answers)  # the labels, nothing else, in clear
    up = parse_train_reply(reply, cfg, server.model.codecs(), server.tokens, server.dim, server.vocab_size, server.pad_id, 1, False)
    t = up.texts[0]
    assert (t.ids[~t.loss_mask] == server.pad_id).all()  # the server never holds question ids
    assert int(t.lens.sum()) == sum(len(rt.data.ids[i]) for i in idx) == up.y_hats[0]["text"].shape[1]
    ev = client_evaluate(eval_request(cfg, 1, w), RecordDict(), NODE)
    assert "prompt_ids" not in record_to_arrays(ev.array_records["text"])
    assert "text-features" in ev.array_records
    # the two quantisers are separate instances with their own weights
    assert rt.model.text_codec is not rt.model.codec
    assert not torch.equal(rt.model.text_codec.proj.weight, rt.model.codec.proj.weight)


def test_codec_init_is_deterministic_and_syncs_the_server(tiny_cfg):
    cfg = tiny_cfg.replace(compressor="vq", bits=4, split_point="vit-ln1:0")
    (s1, w1), (s2, w2) = ready(cfg), ready(cfg)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.equal(s1.model.codec.codebook, w1["codec.vq._codebook.embed"][0])
    assert torch.equal(s2.model.codec.codebook, s1.model.codec.codebook)
    assert bool(s1.model.codec.loaded)
    init = initial_client_weights(cfg)
    assert state_needs_init(s1.model.specs(), init) and not bool(init["codec.vq._codebook.initted"])


def test_init_reply_validation(tiny_cfg):
    cfg = tiny_cfg.replace(compressor="vq", bits=4)
    w = initial_client_weights(cfg)
    reply = client_init_codec(init_request(cfg, w), RecordDict(), NODE)
    state = reply.array_records["codec-state"].to_torch_state_dict()
    state["codec.vq._codebook.embed"][0, 0, 0] = float("nan")
    from flwr.app import ArrayRecord

    bad = RecordDict({"codec-state": ArrayRecord.from_torch_state_dict(state), **reply.config_records})
    with pytest.raises(WireError, match="NaN"):
        parse_init_reply(bad, cfg)
    state = reply.array_records["codec-state"].to_torch_state_dict()
    state["pixels.secret"] = torch.zeros(3)
    bad = RecordDict({"codec-state": ArrayRecord.from_torch_state_dict(state), **reply.config_records})
    with pytest.raises(WireError, match="no stream codec"):
        parse_init_reply(bad, cfg)
