"""The message protocol without the simulator: what goes up, validation, accounting."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from sim.compress import packed_nbytes
from sim.compress.streams import Streams
from sim.model import build_client_model
from sim.training.client_handlers import client_evaluate, client_train
from sim.training.node import NodeIdentity
from sim.training.server import build_server, initial_client_weights
from sim.wire.arrays import WireError, arrays_to_record, payload_bytes, record_to_arrays, wire_bytes
from sim.wire.messages import eval_request, parse_eval_reply, parse_train_reply, train_request

NODE = NodeIdentity(partition=0, num_partitions=2)


def first_exchange(cfg, encode=(0,)):
    state = RecordDict()
    req = train_request(cfg, 1, 0, [], list(encode), False, weights=initial_client_weights(cfg))
    return client_train(req, state, NODE), state


def feature_count(cfg):
    return cfg.batch_size * cfg.num_image_tokens * cfg.hidden_size


@pytest.mark.parametrize("compressor,bits", [("rdfsq", 2), ("rdfsq", 3), ("identity", 16)])
def test_no_uplink_array_carries_pixels(tiny_cfg, compressor, bits):
    cfg = tiny_cfg.replace(compressor=compressor, bits=bits)
    reply, state = first_exchange(cfg, encode=(0, 1))
    n = feature_count(cfg)
    code_bytes = packed_nbytes(n, bits) if compressor == "rdfsq" else 2 * n
    allowed = {
        ("features", "codes.index" if compressor == "rdfsq" else "codes.values"): (
            np.uint8 if compressor == "rdfsq" else np.float16, 2 * code_bytes // (1 if compressor == "rdfsq" else 2)
        ),
        ("text", "ids"): (np.uint16, None),
        ("text", "lens"): (np.uint16, 2 * cfg.batch_size),
        ("text", "mask"): (np.uint8, None),
    }
    seen = set()
    for rname, rec in reply.array_records.items():
        for aname, arr in record_to_arrays(rec).items():
            key = (rname, aname)
            assert key in allowed, f"unexpected uplink array {key}"
            dtype, size = allowed[key]
            assert arr.dtype == dtype and arr.ndim == 1
            if size is not None:
                assert arr.size == size
            seen.add(key)
    assert seen == set(allowed)
    text = record_to_arrays(reply.array_records["text"])
    assert text["ids"].size == int(text["lens"].sum()) < 40 * 2 * cfg.batch_size  # a few words per sample
    pixel_bytes = 2 * cfg.batch_size * 3 * cfg.image_size**2
    assert text["ids"].nbytes + text["mask"].nbytes < pixel_bytes / 10


def test_final_and_eval_replies_carry_only_weights_codes_and_tokens(tiny_cfg):
    cfg = tiny_cfg
    _, state = first_exchange(cfg)
    server = build_server(cfg)
    grads = [Streams(torch.zeros(cfg.batch_size, cfg.num_image_tokens, cfg.hidden_size))]
    final = client_train(train_request(cfg, 1, 1, [0], [], True, grads=grads), state, NODE)
    names = {n for n, p in build_client_model(cfg).named_parameters() if p.requires_grad}
    assert set(final.array_records) == {"weights"} and set(final.array_records["weights"]) == names
    up = parse_train_reply(final, cfg, server.model.codecs(), server.tokens, server.dim, server.vocab_size, server.pad_id, 0, True)
    assert up.num_examples > 0 and set(up.weights) == names

    ev = client_evaluate(eval_request(cfg, 1, initial_client_weights(cfg)), RecordDict(), NODE)
    assert set(ev.array_records) == {"features", "text"}
    assert set(record_to_arrays(ev.array_records["text"])) == {
        "prompt_ids", "prompt_lens", "answer_ids", "answer_lens", "qtype", "prompt_split"}
    e = parse_eval_reply(ev, cfg, server.model.codecs(), server.tokens, server.dim, server.vocab_size)
    assert len(e.prompts) == len(e.answers) == len(e.qtypes) > 0


def test_server_decodes_what_the_client_encoded(tiny_cfg):
    cfg = tiny_cfg
    reply, _ = first_exchange(cfg, encode=(0, 1))
    server = build_server(cfg)
    up = parse_train_reply(reply, cfg, server.model.codecs(), server.tokens, server.dim, server.vocab_size, server.pad_id, 2, False)
    assert len(up.y_hats) == 2 and all(y.names() == ("image",) for y in up.y_hats)
    assert up.y_hats[0].image.shape == (cfg.batch_size, cfg.num_image_tokens, cfg.hidden_size)
    # 2-bit RD-FSQ decodes to the 4-level grid {-1, -1/3, 1/3, 1} (float32), nothing else
    values = torch.cat([y.image for y in up.y_hats]).flatten()
    grid = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0], dtype=torch.float32)
    on_grid = torch.isin(values, grid)
    assert on_grid.all(), f"{int((~on_grid).sum())} decoded values off the 4-level grid: {torch.unique(values[~on_grid])[:8]}"
    assert len(torch.unique(values)) >= 2  # not a constant output
    assert all(t.loss_mask.any() for t in up.texts)


def _mutations():
    def drop(rec, name):
        return lambda r: r.array_records[rec].pop(name)

    def replace(rec, name, fn):
        def go(r):
            a = record_to_arrays(r.array_records[rec])[name]
            new = arrays_to_record({name: fn(a)})
            r.array_records[rec][name] = new[name]

        return go

    return {
        "missing features": lambda r: r.array_records.pop("features"),
        "missing text": lambda r: r.array_records.pop("text"),
        "missing meta": lambda r: r.config_records.pop("meta"),
        "truncated codes": replace("features", "codes.index", lambda a: a[:-1]),
        "codes wrong dtype": replace("features", "codes.index", lambda a: a.astype(np.int16)),
        "token id out of vocab": replace("text", "ids", lambda a: np.full_like(a, 60000)),
        "lens do not add up": replace("text", "lens", lambda a: a + 1),
        "empty mask": replace("text", "mask", lambda a: np.zeros_like(a)),
        "ids wrong dtype": replace("text", "ids", lambda a: a.astype(np.float32)),
        "missing lens": drop("text", "lens"),
        "bad partition id": lambda r: r.config_records["meta"].__setitem__("partition-id", -3),
    }


@pytest.mark.parametrize("name", list(_mutations()))
def test_malformed_replies_are_rejected(tiny_cfg, name):
    reply, _ = first_exchange(tiny_cfg, encode=(0, 1))
    _mutations()[name](reply)
    s = build_server(tiny_cfg)
    with pytest.raises(WireError):
        parse_train_reply(reply, tiny_cfg, s.model.codecs(), s.tokens, s.dim, s.vocab_size, s.pad_id, 2, False)


def test_wire_bytes_frame_the_payload_tightly(tiny_cfg):
    # the default exchange: 8 micro-batches of 16 samples, 64 tokens x 128 dims at 2 bits
    cfg = tiny_cfg.replace(hidden_size=128, image_size=32, batch_size=16)
    reply, _ = first_exchange(cfg, encode=tuple(range(8)))
    msg = Message(reply, dst_node_id=1, message_type="train.split_step")
    payload = payload_bytes(reply, ("features", "text", "weights"))
    wire = wire_bytes(msg)
    codes = packed_nbytes(8 * feature_count(cfg), cfg.bits)
    assert codes == 8 * 16 * 64 * 128 * 2 // 8
    assert codes < payload < 1.02 * codes  # token ids are ~1% on top of the codes
    assert payload < wire < 1.02 * payload, (wire, payload)  # Flower's framing is < 2%


def test_weights_round_trip_exactly_through_records(tiny_cfg):
    w = initial_client_weights(tiny_cfg)
    back = ArrayRecord.from_torch_state_dict(w).to_torch_state_dict()
    assert all(torch.equal(w[k], back[k]) for k in w)
