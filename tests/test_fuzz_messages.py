"""Fuzzing the server's reply validation with malformed peer messages (hypothesis).

Valid replies of every message kind are produced by the real client handlers for
several compressors; hypothesis then applies one mutation that makes each of them
invalid by construction (wrong dtype or shape, out-of-range token ids / question
types / format bytes, NaN or inf in floats and side information, oversized arrays or
lists, missing or extra records, arrays and keys, wrong meta types, replayed round /
exchange / partition, broken ``.npy`` framing). The server-side parser must reject
every one with :class:`WireError`: any other exception is a crash, a return is an
accepted bad message. Both counts must be zero over at least 200 messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import scratch_cfg
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.training.client_handlers import client_evaluate, client_hello, client_train
from sim.training.node import NodeIdentity
from sim.training.server import build_server, exchange_schedule, initial_client_weights
from sim.wire.arrays import WireError
from sim.wire.messages import eval_request, hello_schema, parse_eval_reply, parse_train_reply, train_request
from sim.wire.schema import Expect, validate, weight_spec

NODE = NodeIdentity(partition=1, num_partitions=2)
COMPRESSORS = [("rdfsq", 2), ("identity", 16), ("topk", 4), ("nf", 3)]
MIN_MESSAGES = 200


@dataclass
class Base:
    """A valid reply, kept as plain data so every example rebuilds a fresh copy."""

    name: str
    kind: str  # "train", "final", "eval", "hello"
    arrays: dict[str, dict[str, np.ndarray]]
    meta: dict
    required_meta: tuple[str, ...]
    parse: object  # content -> result, raises WireError

    def content(self) -> RecordDict:
        rd = RecordDict({"meta": ConfigRecord({k: list(v) if isinstance(v, list) else v for k, v in self.meta.items()})})
        for rec, arrs in self.arrays.items():
            rd[rec] = ArrayRecord({k: Array(np.ascontiguousarray(v.copy())) for k, v in arrs.items()})
        return rd


def _plain(content: RecordDict) -> tuple[dict, dict]:
    arrays = {r: {k: a.numpy() for k, a in rec.items()} for r, rec in content.array_records.items()}
    meta = dict(content.config_records["meta"])
    return arrays, meta


def _bases() -> list[Base]:
    out = []
    for compressor, bits in COMPRESSORS:
        cfg = scratch_cfg(
            num_server_rounds=1, local_steps=2, steps_per_exchange=2, batch_size=2, num_samples=60, hidden_size=32,
            image_size=16, patch_size=4, compressor=compressor, bits=bits, nf_block=16, checkpoint=False,
        )
        server = build_server(cfg)
        s, w0 = server, initial_client_weights(cfg)
        positions = server.model.llm.config.max_position_embeddings - server.tokens
        state = RecordDict()
        (apply0, enc0), (apply1, enc1) = exchange_schedule(cfg)
        first = client_train(train_request(cfg, 3, 0, apply0, enc0, False, weights=w0), state, NODE)
        up = parse_train_reply(first, cfg, s.model.codecs(), s.tokens, s.dim, s.vocab_size, s.pad_id, len(enc0), False,
                               expect=Expect(3, 0, 1, max_text_tokens=positions))
        grads = [y.map(lambda _, t: torch.randn_like(t) * 1e-3) for y in up.y_hats]
        final = client_train(train_request(cfg, 3, 1, apply1, enc1, True, grads=grads), state, NODE)
        ev = client_evaluate(eval_request(cfg, 3, w0), RecordDict(), NODE)

        def train_parser(content, cfg=cfg, s=s, n=len(enc0), positions=positions):
            return parse_train_reply(content, cfg, s.model.codecs(), s.tokens, s.dim, s.vocab_size, s.pad_id, n, False,
                                     expect=Expect(3, 0, 1, max_text_tokens=positions))

        def final_parser(content, cfg=cfg, s=s, spec=weight_spec(w0), positions=positions):
            return parse_train_reply(content, cfg, s.model.codecs(), s.tokens, s.dim, s.vocab_size, s.pad_id, 0, True,
                                     expect=Expect(3, 1, 1, weights=spec, max_text_tokens=positions))

        def eval_parser(content, cfg=cfg, s=s, positions=positions):
            return parse_eval_reply(content, cfg, s.model.codecs(), s.tokens, s.dim, s.vocab_size,
                                    expect=Expect(3, partition=1, max_text_tokens=positions))

        for kind, reply, parser, required in (
            ("train", first, train_parser, ("partition-id", "round", "exchange", "samples", "mask-bytes")),
            ("final", final, final_parser, ("partition-id", "round", "exchange", "num-examples")),
            ("eval", ev, eval_parser, ("partition-id", "round", "eval-count", "micro-batches")),
        ):
            parser(reply)  # the unmodified reply is valid
            out.append(Base(f"{compressor}-{kind}", kind, *_plain(reply), required, parser))
    hello = client_hello(RecordDict(), RecordDict(), NODE)
    out.append(Base("hello", "hello", {}, dict(hello.config_records["meta"]), ("partition-id", "num-partitions"),
                    lambda c: validate(c, hello_schema())))
    return out


@pytest.fixture(scope="module")
def bases() -> list[Base]:
    return _bases()


# ----------------------------------------------------------------------------- mutations
NUMERIC = ["uint8", "uint16", "uint32", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]


def _pick_array(draw, base: Base, pred=lambda name, a: True) -> tuple[str, str] | None:
    choices = [(r, n) for r, arrs in base.arrays.items() for n, a in arrs.items() if pred(n, a)]
    return draw(st.sampled_from(choices)) if choices else None


def _set(content: RecordDict, rec: str, name: str, value: np.ndarray | Array) -> None:
    content.array_records[rec][name] = value if isinstance(value, Array) else Array(np.ascontiguousarray(value))


def mutate(draw, base: Base) -> tuple[str, RecordDict]:
    """One mutation that makes ``base`` invalid; returns (label, content)."""
    c = base.content()
    meta = c.config_records["meta"]
    ops = ["drop-meta-key", "extra-meta-key", "meta-type", "extra-record", "metric-record", "extra-config"]
    if base.kind != "hello":
        ops += ["replay", "dtype", "truncate", "extend", "oversize", "reshape", "drop-array", "drop-record",
                "extra-array", "framing"]
    if any(a.dtype.kind == "f" for arrs in base.arrays.values() for a in arrs.values()):
        ops.append("non-finite")
    if base.kind in ("train", "eval"):
        ops += ["token-out-of-range", "huge-list"]
    if base.kind == "eval":
        ops += ["qtype-out-of-range", "split-out-of-range"]
    if any(n == "side.format" for arrs in base.arrays.values() for n in arrs):
        ops.append("bad-format-byte")
    if base.kind == "train" or base.kind == "final":
        ops.append("aux-non-finite")
    op = draw(st.sampled_from(ops))

    if op == "drop-meta-key":
        del meta[draw(st.sampled_from(base.required_meta))]
    elif op == "extra-meta-key":
        meta[draw(st.sampled_from(["extra", "pixels", "round2", "__class__"]))] = draw(st.integers(0, 9))
    elif op == "meta-type":
        key = draw(st.sampled_from(base.required_meta))
        meta[key] = draw(st.sampled_from(["3", 3.5, True, [1, 2], b"x", -1 << 41]))
    elif op == "extra-record":
        c[draw(st.sampled_from(["pixels", "images", "extra"]))] = ArrayRecord({"x": Array(np.zeros(4, np.uint8))})
    elif op == "metric-record":
        c["stats"] = MetricRecord({"loss": 1.0})
    elif op == "extra-config":
        c["config"] = ConfigRecord({"lr": 1.0})
    elif op == "replay":
        key = draw(st.sampled_from([k for k in ("round", "exchange", "partition-id") if k in meta]))
        meta[key] = draw(st.integers(0, 50).filter(lambda v: v != meta[key]))
    elif op == "dtype":
        rec, name = _pick_array(draw, base)
        a = base.arrays[rec][name]
        _set(c, rec, name, a.astype(draw(st.sampled_from([d for d in NUMERIC if d != a.dtype.name])), copy=True))
    elif op == "truncate":
        rec, name = _pick_array(draw, base, lambda n, a: a.size > 0)
        a = base.arrays[rec][name].reshape(-1)
        _set(c, rec, name, a[: a.size - draw(st.integers(1, a.size))])
    elif op == "extend":
        rec, name = _pick_array(draw, base)
        a = base.arrays[rec][name].reshape(-1)
        _set(c, rec, name, np.concatenate([a, np.zeros(draw(st.integers(1, 64)), a.dtype)]))
    elif op == "oversize":
        rec, name = _pick_array(draw, base)
        a = base.arrays[rec][name].reshape(-1)
        _set(c, rec, name, np.zeros(max(1, a.size) * draw(st.integers(10, 40)) + 4096, a.dtype))
    elif op == "reshape":
        rec, name = _pick_array(draw, base, lambda n, a: a.size >= 2 and a.size % 2 == 0)
        a = base.arrays[rec][name]
        _set(c, rec, name, a.reshape(2, -1) if a.ndim == 1 else a.reshape(-1))
    elif op == "drop-array":
        rec, name = _pick_array(draw, base)
        del c.array_records[rec][name]
    elif op == "drop-record":
        del c.array_records[draw(st.sampled_from(sorted(base.arrays)))]
    elif op == "extra-array":
        rec = draw(st.sampled_from(sorted(base.arrays)))
        name = draw(st.sampled_from(["codes.extra", "side.extra", "extra", "ids2"]))
        _set(c, rec, name, np.zeros(draw(st.integers(1, 16)), np.uint8))
    elif op == "framing":
        rec, name = _pick_array(draw, base)
        good = c.array_records[rec][name]
        how = draw(st.sampled_from(["shape", "dtype", "cut", "huge-header", "stype", "object"]))
        if how == "shape":
            bad = Array(dtype=good.dtype, shape=tuple(good.shape) + (1,), stype=good.stype, data=good.data)
        elif how == "dtype":
            bad = Array(dtype="float64" if good.dtype != "float64" else "int8", shape=good.shape, stype=good.stype, data=good.data)
        elif how == "cut":
            bad = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[: len(good.data) - draw(st.integers(1, 8))])
        elif how == "huge-header":
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(good.dtype)), "fortran_order": False,
                      "shape": (1 << 40,)}
            buf = __import__("io").BytesIO()
            np.lib.format.write_array_header_1_0(buf, header)
            bad = Array(dtype=good.dtype, shape=(1 << 40,), stype=good.stype, data=buf.getvalue() + b"\0" * 64)
        elif how == "stype":
            bad = Array(dtype=good.dtype, shape=good.shape, stype="torch.Tensor", data=good.data)
        else:
            buf = __import__("io").BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
            bad = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buf.getvalue() + b"\0" * 8)
        op = f"framing-{how}"
        _set(c, rec, name, bad)
    elif op == "non-finite":
        rec, name = _pick_array(draw, base, lambda n, a: a.dtype.kind == "f" and a.size > 0)
        a = base.arrays[rec][name].copy()
        a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        _set(c, rec, name, a)
    elif op == "token-out-of-range":
        rec, name = _pick_array(draw, base, lambda n, a: n.endswith("ids") and a.size > 0)
        a = base.arrays[rec][name].copy()
        a[draw(st.integers(0, a.size - 1))] = draw(st.integers(2000, np.iinfo(a.dtype).max))  # vocab is a few hundred
        _set(c, rec, name, a)
    elif op == "huge-list":
        key = "mask-bytes" if "mask-bytes" in meta else "eval-count"
        meta[key] = [1] * 100_000 if key == "mask-bytes" else 1 << 40
    elif op == "qtype-out-of-range":
        a = base.arrays["text"]["qtype"].copy()
        a[draw(st.integers(0, a.size - 1))] = draw(st.integers(6, 255))
        _set(c, "text", "qtype", a)
    elif op == "split-out-of-range":
        a = base.arrays["text"]["prompt_split"].copy()
        a[draw(st.integers(0, a.size - 1))] = draw(st.integers(1000, 65535))
        _set(c, "text", "prompt_split", a)
    elif op == "bad-format-byte":
        rec, name = _pick_array(draw, base, lambda n, a: n == "side.format")
        a = base.arrays[rec][name].copy()
        a[draw(st.integers(0, a.size - 1))] = draw(st.integers(2, 255))
        _set(c, rec, name, a)
    elif op == "aux-non-finite":
        meta[draw(st.sampled_from(["client-aux-loss", "compute-s"]))] = draw(
            st.sampled_from([[math.nan], [math.inf], math.nan, -1.0, math.inf]))
    return op, c


def test_fuzzed_bad_messages_are_all_rejected_and_never_crash(bases):
    outcomes: dict[str, int] = {}
    accepted: list[str] = []

    @settings(max_examples=260, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(data=st.data())
    def check(data):
        base = data.draw(st.sampled_from(bases))
        op, content = mutate(data.draw, base)
        try:
            base.parse(content)
        except WireError:
            outcomes[op] = outcomes.get(op, 0) + 1
            return
        accepted.append(f"{base.name}: {op}")  # a crash (any other exception) propagates and fails the test

    check()
    assert not accepted, f"bad messages accepted: {accepted}"
    total = sum(outcomes.values())
    assert total >= MIN_MESSAGES, outcomes
    assert len(outcomes) >= 20, outcomes  # the mutations really are varied


def test_every_message_kind_and_compressor_is_covered(bases):
    assert {b.name.split("-")[0] for b in bases} >= {c for c, _ in COMPRESSORS}
    assert {b.kind for b in bases} == {"train", "final", "eval", "hello"}


# ----------------------------------------------------------------------------- the downlink
# The client validates the gradients the server sends (``decode_grad_records``): every
# registered gradient codec, taken from the registry, at two widths, with every other
# choice of its options and, when it has integer codes, with each ``grad-entropy-coding``.
GRAD_MICRO_BATCHES = 2


def _grad_variants() -> list[tuple[str, int, str, dict]]:
    from sim.compress import codec_names, get_codec
    from sim.settings import codec_settings

    out = []
    for name in codec_names("gradient"):
        cls = get_codec(name)
        lo, hi = cls.bit_range
        widths = [hi] if cls.bit_unit is None else sorted({lo, min(max(3, lo), hi)})
        for bits in widths:
            for ent in ("none", "ans", "zstd") if cls.gradient_integer_codes else ("none",):
                out.append((name, bits, ent, {}))
        for field, setting in codec_settings(name, cls.Settings):
            for choice in setting.allowed() or ():
                if choice != setting.default:
                    out.append((name, widths[-1], "none", {setting.attr: choice}))
    return out


@dataclass
class GradBase:
    name: str
    cfg: object
    arrays: dict[str, np.ndarray]
    shapes: object

    def content(self) -> RecordDict:
        return RecordDict({"grads": ArrayRecord({k: Array(np.ascontiguousarray(v.copy())) for k, v in self.arrays.items()})})


@pytest.fixture(scope="module")
def grad_bases() -> list[GradBase]:
    from sim.compress.streams import Streams
    from sim.wire.arrays import record_to_arrays
    from sim.wire.streams import decode_grad_records, micro_batch_shapes

    out = []
    for name, bits, ent, extra in _grad_variants():
        cfg = scratch_cfg(batch_size=2, hidden_size=32, image_size=16, patch_size=4, checkpoint=False,
                          grad_compressor=name, grad_bits=bits, grad_entropy_coding=ent, **extra)
        shapes = micro_batch_shapes(cfg, None, GRAD_MICRO_BATCHES)
        gen = torch.Generator().manual_seed(len(out))
        grads = [Streams(torch.randn(s, generator=gen) * 1e-3) for s in shapes.image]
        rd = train_request(cfg, 1, 1, list(range(GRAD_MICRO_BATCHES)), [], False, grads=grads)
        base = GradBase(f"{name}-b{bits}-{ent}{'-' + '-'.join(map(str, extra.values())) if extra else ''}", cfg,
                        record_to_arrays(rd.array_records["grads"]), shapes)
        decode_grad_records(base.content(), cfg, shapes)  # the unmodified record is valid
        out.append(base)
    return out


# mutations that make a record invalid by construction, and ones that may leave it valid
# (random code bits, large finite values): those must decode to finite gradients or be rejected
GRAD_INVALID = ["dtype", "truncate", "extend", "oversize", "reshape", "drop-array", "drop-record", "extra-array",
                "non-finite", "framing"]
GRAD_MAYBE = ["random-bytes", "huge-finite", "negative"]


def mutate_grads(draw, base: GradBase) -> tuple[str, RecordDict]:
    c = base.content()
    names = sorted(base.arrays)
    floats = [n for n in names if base.arrays[n].dtype.kind == "f" and base.arrays[n].size]
    ops = GRAD_INVALID + GRAD_MAYBE if floats else [o for o in GRAD_INVALID + GRAD_MAYBE
                                                    if o not in ("non-finite", "huge-finite", "negative")]
    op = draw(st.sampled_from(ops))
    name = draw(st.sampled_from(floats if op in ("non-finite", "huge-finite", "negative") else names))
    a = base.arrays[name].reshape(-1)
    if op == "dtype":
        _set(c, "grads", name, a.astype(draw(st.sampled_from([d for d in NUMERIC if d != a.dtype.name]))))
    elif op == "truncate":
        if a.size == 0:
            op = "extend"
        else:
            _set(c, "grads", name, a[: a.size - draw(st.integers(1, a.size))])
    if op == "extend":
        _set(c, "grads", name, np.concatenate([a, np.zeros(draw(st.integers(1, 64)), a.dtype)]))
    elif op == "oversize":
        _set(c, "grads", name, np.zeros(max(1, a.size) * draw(st.integers(10, 40)) + 4096, a.dtype))
    elif op == "reshape":
        _set(c, "grads", name, np.stack([a, a]))
    elif op == "drop-array":
        del c.array_records["grads"][name]
    elif op == "drop-record":
        del c.array_records["grads"]
    elif op == "extra-array":
        _set(c, "grads", draw(st.sampled_from(["codes.extra", "side.extra", "extra"])), np.zeros(4, np.uint8))
    elif op == "non-finite":
        bad = a.copy()
        bad[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        _set(c, "grads", name, bad)
    elif op == "framing":
        good = c.array_records["grads"][name]
        how = draw(st.sampled_from(["shape", "dtype", "cut"]))
        if how == "shape":
            bad = Array(dtype=good.dtype, shape=tuple(good.shape) + (1,), stype=good.stype, data=good.data)
        elif how == "dtype":
            bad = Array(dtype="float64" if good.dtype != "float64" else "int8", shape=good.shape, stype=good.stype,
                        data=good.data)
        else:
            bad = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[: len(good.data) - 1])
        op = f"framing-{how}"
        _set(c, "grads", name, bad)
    elif op == "random-bytes":  # out-of-range or corrupt codes, positions, histograms, ANS words, bit patterns
        raw = np.frombuffer(draw(st.binary(min_size=a.nbytes, max_size=a.nbytes)), dtype=np.uint8).copy()
        _set(c, "grads", name, raw.view(a.dtype) if a.nbytes else a)
    elif op == "huge-finite":
        _set(c, "grads", name, np.full_like(a, np.finfo(a.dtype).max * draw(st.sampled_from([1.0, -1.0]))))
    elif op == "negative":
        _set(c, "grads", name, -np.abs(a) - 1)
    return op, c


def test_fuzzed_bad_gradient_records_are_all_rejected_and_never_crash(grad_bases):
    from sim.wire.streams import decode_grad_records

    outcomes: dict[str, int] = {}
    accepted: list[str] = []

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(data=st.data())
    def check(data):
        base = data.draw(st.sampled_from(grad_bases))
        op, content = mutate_grads(data.draw, base)
        try:
            out = decode_grad_records(content, base.cfg, base.shapes)
        except WireError:
            outcomes[op] = outcomes.get(op, 0) + 1
            return
        # a crash (any other exception) propagates and fails the test
        if op not in GRAD_MAYBE:
            accepted.append(f"{base.name}: {op}")
        else:
            assert len(out) == GRAD_MICRO_BATCHES and all(torch.isfinite(o.image).all() for o in out), (base.name, op)
            assert [tuple(o.image.shape) for o in out] == list(base.shapes.image)
            outcomes[f"{op} (valid)"] = outcomes.get(f"{op} (valid)", 0) + 1

    check()
    print("gradient records:", sorted(outcomes.items()))
    assert not accepted, f"bad gradient records accepted: {accepted}"
    assert sum(v for k, v in outcomes.items() if "valid" not in k) >= MIN_MESSAGES, outcomes
    assert len(outcomes) >= 12, outcomes


def test_every_gradient_codec_is_fuzzed(grad_bases):
    from sim.compress import codec_names, get_codec

    assert {b.cfg.grad_compressor for b in grad_bases} == set(codec_names("gradient"))
    ent = {b.cfg.grad_compressor for b in grad_bases if b.cfg.grad_entropy_coding == "ans"}
    assert ent == {n for n in codec_names("gradient") if get_codec(n).gradient_integer_codes}
