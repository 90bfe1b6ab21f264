"""Benchmarks of the compressors alone: P2 (wire efficiency), P4 (entropy coding) and
P6 (encode/decode speed against ``vector_quantize_pytorch.FSQ``).

Each function returns rows ``{figure, setting, repeat, value, ...}`` for
:mod:`experiments.bench`; nothing here asserts a target.

* P6 times ``client.forward`` (encode) + ``client.pack`` and ``server.unpack`` on a
  fixed fp32 tensor ``(B, N, D)`` and divides its MB/s (of fp32 features) by the
  MB/s of ``vector_quantize_pytorch.FSQ`` forward on the same tensor, at the same
  number of levels per dimension, under ``torch.no_grad`` and the same thread count.
* P2 builds the real uplink ``Message`` of :mod:`sim.wire.messages` (codes, side info,
  token ids) for growing payloads and divides Flower's serialised size
  (:func:`sim.wire.arrays.wire_bytes`) by the information payload.
* P4 entropy-codes trained 2-bit RD-FSQ codes (a short reference training run) with
  :mod:`sim.compress.entropy_coding` and divides the coded bytes by the empirical
  entropy bound ``H * n / 8``; the coding time per sample is reported beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from sim.compress import unpack_bits
from sim.compress.entropy_coding import empirical_entropy_bits, encoded_nbytes, entropy_decode, entropy_encode
from sim.config import SplitConfig

from .common import SCRATCH


def _cfg(**kw) -> SplitConfig:
    """The from-scratch config (:data:`experiments.common.SCRATCH`) with ``kw`` changed."""
    return SplitConfig.from_run_config(SCRATCH).replace(**kw)

P6_METHODS = ("rdfsq", "fsq", "nf")


def _best_of(fn: Callable[[], object], repeats: int, inner: int) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def p6_codec_speed(bits: int = 2, shape: tuple[int, int, int] = (64, 64, 128), repeats: int = 5, inner: int = 5,
                   seed: int = 0) -> list[dict]:
    """Encode+pack and unpack+decode MB/s of each codec ÷ ``FSQ`` forward MB/s.

    The reference is timed right before each codec direction, so both see the same
    machine load; the ratio of each such pair is one row."""
    from vector_quantize_pytorch import FSQ

    torch.manual_seed(seed)
    x = torch.randn(*shape)
    mb = x.numel() * 4 / 1e6
    # The reference quantises the same D values per token at the same 2^b levels per
    # dimension (no projections), in eval mode without autograd: its fastest setting.
    fsq = FSQ(levels=[2**bits] * shape[-1]).eval()
    rows = []
    for method in P6_METHODS:
        cfg = _cfg(compressor=method, bits=bits, hidden_size=shape[-1], seed=seed, nf_block=min(64, shape[-1]))
        spec = cfg.codec("image", shape[-1])
        client, server = spec.client(), spec.server()
        client.eval()
        server.eval()
        with torch.no_grad():
            payload = client.pack(client(x))
            timed = {
                "encode+pack": lambda: client.pack(client(x)),
                "unpack+decode": lambda: server.unpack(payload, shape),
            }
            if hasattr(client, "proj"):
                # Not a codec direction: the learned projection that starts the encode, timed
                # alone so the report can show how much of FSQ's time it takes by itself.
                timed["projection alone (part of encode)"] = lambda: client.proj(x)
            for what, fn in timed.items():
                ref_s = _best_of(lambda: fsq(x), repeats, inner)
                secs = _best_of(fn, repeats, inner)
                rows.append({
                    "figure": "P6", "setting": f"{method} b={bits} {what}", "value": ref_s / secs,
                    "unit": "× FSQ" if what in ("encode+pack", "unpack+decode") else "× FSQ (part)",
                    "mb_per_s": mb / secs, "fsq_mb_per_s": mb / ref_s,
                })
    return rows


def p2_wire_efficiency(payload_samples: tuple[int, ...] = (1, 8, 32, 160)) -> list[dict]:
    """Flower-serialised bytes ÷ information payload for real uplink train replies."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from sim.data.batches import TextBatch
    from sim.training.transport import ensure_task_identity
    from sim.wire.arrays import arrays_to_record, concat_payloads, payload_bytes, wire_bytes
    from sim.wire.messages import UPLINK_INFO
    from sim.wire.text import encode_train_text

    ensure_task_identity()  # a Message built outside a Flower run needs placeholder ids
    rows = []
    for method, bits in (("rdfsq", 2), ("identity", 16)):
        cfg = _cfg(compressor=method, bits=min(bits, 8) if method == "rdfsq" else 2)
        client = cfg.codec("image", cfg.hidden_size).client()
        client.eval()
        rng = np.random.default_rng(0)
        for samples in payload_samples:
            with torch.no_grad():
                payload = client.pack(client(torch.randn(samples, cfg.num_image_tokens, cfg.hidden_size)))
            lens = rng.integers(8, 14, size=samples)
            ids = torch.as_tensor(rng.integers(0, 60, size=(samples, int(lens.max()))))
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, -2:] = True
            text = TextBatch(ids=ids, lens=torch.as_tensor(lens), loss_mask=mask)
            content = RecordDict({
                "features": arrays_to_record(concat_payloads([payload]).arrays()),
                "text": arrays_to_record(encode_train_text(text, 64)),
                "meta": ConfigRecord({"partition-id": 0, "round": 1, "exchange": 1, "samples": samples}),
            })
            msg = Message(content, dst_node_id=1, message_type="train.split_step")
            info = payload_bytes(content, UPLINK_INFO)
            rows.append({
                "figure": "P2", "setting": f"{method} {samples} samples", "value": wire_bytes(msg) / info,
                "unit": "wire/payload", "payload_bytes": info, "wire_bytes": wire_bytes(msg),
            })
    return rows


def trained_rdfsq_codes(bits: int = 2, steps: int = 100, batches: int = 8, seed: int = 0) -> np.ndarray:
    """Codes of ``batches`` micro-batches from the client model after a short reference run."""
    from sim.training.client import client_runtime, encode_steps, load_weights
    from sim.training.reference import run_reference

    cfg = _cfg(compressor="rdfsq", bits=bits, num_server_rounds=1, local_steps=steps,
               warmup_steps=min(100, steps // 4), seed=seed, num_samples=2000)
    res = run_reference(cfg, 1, evaluate_rounds=False)
    rt = client_runtime(cfg, 0, 1)
    load_weights(rt, res.client_weights)
    enc = encode_steps(rt, 2, list(range(batches)))
    n = cfg.batch_size * cfg.num_image_tokens * cfg.hidden_size
    return np.concatenate([unpack_bits(p.image.codes["index"], bits, n) for p in enc.payloads]).astype(np.int64)


def p4_entropy_coding(codes: np.ndarray, bits: int, samples: int, repeats: int = 3) -> list[dict]:
    """Entropy-coded bytes ÷ (empirical entropy × count / 8), with coding time per sample."""
    rows = []
    bound = empirical_entropy_bits(codes, 2**bits) / 8  # n * H(p_hat) bits, the i.i.d. source-coding bound
    for method in ("ans", "zstd"):
        arrays = entropy_encode(codes, 2**bits, method)
        if not np.array_equal(entropy_decode(arrays, 2**bits, codes.size, method), codes):
            raise AssertionError(f"{method} round trip is not lossless")
        coded = encoded_nbytes(arrays)
        enc_s = _best_of(lambda: entropy_encode(codes, 2**bits, method), repeats, 1)
        dec_s = _best_of(lambda: entropy_decode(arrays, 2**bits, codes.size, method), repeats, 1)
        rows.append({
            "figure": "P4", "setting": f"rdfsq b={bits} {method}", "value": coded / bound, "unit": "coded/bound",
            "coded_bytes": coded, "bound_bytes": round(bound, 1), "fixed_bytes": codes.size * bits / 8,
            "encode_us_per_sample": enc_s / samples * 1e6, "decode_us_per_sample": dec_s / samples * 1e6,
        })
    return rows
