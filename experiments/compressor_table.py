"""The compressor table: bytes, speed and distortion of every registered codec.

``python -m experiments.compressor_table [--quick]`` ::

    1. train the tiny model from scratch briefly (experiments.common.SCRATCH; sim.training.reference.run_reference,
       rdfsq 2 bits, 2 clients)
    2. fixed batch: 8 micro-batches of the trained client's features on its test split,
       at the connector (every codec) and after LN1 of ViT block 0 (AlignedVQ's split)
    3. per codec x bits (every codec in the registry that serves the image stream, at its
       widths; plus named option studies): encode+pack each micro-batch, put the payloads of all 8 in
       the uplink record exactly as the protocol does (sim.wire.streams), wrap it in a real
       Flower Message and measure it (sim.wire.wire_bytes); unpack+decode on the server
       half; time both; compare the reconstruction with the codec's target
    4. entropy coding of the trained 2-bit RD-FSQ codes against the empirical entropy

Every codec sees the same features. Learned pre-/post-projections (RD-FSQ, FSQ) are set
to the identity and AlignedVQ's DLP starts as the identity (gamma = 0), so the numbers
measure the quantiser, not a random projection. The reconstruction target is what the
server half is designed to rebuild: ``x`` for identity, NF, top-k and VQ; ``tanh(x)`` for
FSQ; the clipped-and-scaled ``e`` in [-1, 1] for RD-FSQ (``x`` clipped to its range with
``rdfsq-send-range``). ``nmse`` = MSE / mean(target^2) makes the spaces comparable.
AlignedVQ's codebook is fitted (k-means) on 4 other micro-batches of the same split.

Writes ``<out>/compressors.csv``, ``<out>/compressors_entropy.csv``,
``<out>/compressors.md``, ``<out>/compressors_config.json``; without ``--quick`` the
markdown also replaces the generated block of ``docs/compressors.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from flwr.app import Message, RecordDict

from sim.compress import codec_names, get_codec
from sim.compress.codecs.fsq import FSQClient
from sim.compress.codecs.rdfsq import RDFSQClient, batch_stats, clip_and_scale
from sim.compress.entropy_coding import empirical_entropy_bits, wrap_index
from sim.config import SplitConfig
from sim.model.vit_split import VisionHead
from sim.settings import codec_settings
from sim.training.client import client_batch, client_runtime, eval_indices, load_weights, micro_batch, pack_streams
from sim.training.reference import run_reference
from sim.training.server import build_server, initial_client_weights, sync_round_state
from sim.training.transport import ensure_task_identity
from sim.wire.arrays import arrays_to_record, decode_stream, encode_stream, wire_bytes
from sim.wire.streams import FEATURE_RECORDS, decode_payload_records, micro_batch_shapes, payload_records

from .common import SCRATCH

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compressors.md"
BEGIN, END = "<!-- compressor-table:begin -->", "<!-- compressor-table:end -->"
WIRE_LIMIT, WIRE_MIN_PAYLOAD, ENTROPY_LIMIT = 1.02, 16 * 1024, 1.05


@dataclass(frozen=True)
class Variant:
    """One row: a compressor at some bits, with extra run-config keys."""

    name: str
    bits: int
    split: str = "connector"  # which features: "connector" or "vit-ln1:0"
    extra: dict = field(default_factory=dict)
    label: str = ""

    def cfg(self, base: SplitConfig) -> SplitConfig:
        return base.replace(compressor=self.name, bits=self.bits, **self.extra)


SPLIT_LABELS = {"vit-ln1:0": "LN1 of block 0"}


def codec_variants(name: str, bits: tuple[int, ...], token_bits: tuple[int, ...]) -> list[Variant]:
    """A registered codec at its widths (per value: ``bits``; per token: ``token_bits``; no
    width: 16) with its default settings, on the features at the split its module asks for
    (``Codec.sweep``); labelled with its default choices."""
    codec = get_codec(name)
    split = codec.sweep.get("split-point", "connector")
    lo, hi = codec.bit_range
    widths = [16] if codec.bit_unit is None else [b for b in (token_bits if codec.bit_unit == "token" else bits) if lo <= b <= hi]
    label = ", ".join([str(s.default) for _, s in codec_settings(name, codec.Settings) if isinstance(s.choices, tuple)]
                      + ([SPLIT_LABELS[split]] if split in SPLIT_LABELS else []))
    return [Variant(name, b, split=split, label=label) for b in widths]


def variants(quick: bool) -> list[Variant]:
    """Every registered codec that serves the image stream, then named option studies."""
    bits = (1, 2) if quick else (1, 2, 3, 4)
    vq_bits = (2, 4) if quick else (1, 2, 3, 4, 6, 8, 10, 12, 16)
    out = [v for name in sorted(codec_names("image"), key=lambda n: (n != "identity", n))
           for v in codec_variants(name, bits, vq_bits)]
    out += [
        Variant("rdfsq", 2, extra={"rdfsq_stats": "global"}, label="global"),
        Variant("rdfsq", 2, extra={"rdfsq_send_range": True}, label="per-dim, range sent"),
        Variant("nf", 4, extra={"nf_codebook": "qlora"}, label="qlora"),
        Variant("nf", 4, extra={"nf_codebook": "qlora", "nf_double_quant": True}, label="qlora, double quant"),
        Variant("rdfsq", 2, extra={"entropy_coding": "ans"}, label="per-dim + ANS"),
        Variant("rdfsq", 2, extra={"entropy_coding": "zstd"}, label="per-dim + zstd"),
    ]
    vb = vq_bits[-2] if quick else 12
    out += [
        Variant("vq", vb, split="vit-ln1:0", extra={"entropy_coding": "ans"}, label="LN1 of block 0 + ANS"),
        Variant("vq", vb, split="vit-ln1:0", extra={"residual_mode": "transmit"}, label="+ residual NF 4-bit"),
    ]
    return out


# ----------------------------------------------------------------------------- data
def train(quick: bool, seed: int) -> tuple[SplitConfig, dict]:
    """The from-scratch model (:data:`experiments.common.SCRATCH`) trained briefly with the default
    compressor (rdfsq, 2 bits)."""
    over = dict(num_server_rounds=1, seed=seed)
    if quick:
        over |= dict(local_steps=4, steps_per_exchange=2, warmup_steps=1, batch_size=4, num_samples=160,
                     hidden_size=32, image_size=16, patch_size=4, nf_block=32)
    else:
        over |= dict(local_steps=150, steps_per_exchange=25, warmup_steps=30, num_samples=2000)
    cfg = SplitConfig.from_run_config(SCRATCH).replace(**over)
    t0 = time.perf_counter()
    res = run_reference(cfg, num_partitions=2, evaluate_rounds=False)
    log.info("trained %d steps x 2 clients in %.0f s, last losses %s", cfg.local_steps, time.perf_counter() - t0,
             [round(x, 3) for x in res.step_losses[-3:]])
    return cfg, res.client_weights


@dataclass
class Features:
    connector: list[torch.Tensor]  # eval micro-batches (B,N,D)
    ln1: list[torch.Tensor]  # LN1 output of block 0 (B,N,Dv)
    residual: list[torch.Tensor]  # the residual stream entering block 0 (B,N,Dv)
    fit_ln1: list[torch.Tensor]  # other micro-batches, for the k-means fit
    fit_residual: list[torch.Tensor]
    rt: object


@torch.no_grad()
def features(cfg: SplitConfig, weights: dict, micro_batches: int, fit_batches: int) -> Features:
    rt = client_runtime(cfg, 0, 2)
    load_weights(rt, weights)
    head = VisionHead(rt.model.tower, 0)
    test_idx, _ = eval_indices(rt)
    train_idx = rt.train_idx
    b = cfg.batch_size

    def batches(idx: np.ndarray, count: int) -> list[np.ndarray]:
        idx = idx[np.arange(count * b) % len(idx)]
        return [idx[i * b : (i + 1) * b] for i in range(count)]

    conn, ln1, res, fit_ln1, fit_res = [], [], [], [], []
    for chunk in batches(test_idx, micro_batches):
        px = client_batch(rt, chunk).pixels
        conn.append(rt.model.features(px))
        x, h = head(px)
        ln1.append(h)
        res.append(x)
    for chunk in batches(train_idx, fit_batches):
        x, h = head(client_batch(rt, chunk).pixels)
        fit_ln1.append(h)
        fit_res.append(x)
    return Features(conn, ln1, res, fit_ln1, fit_res, rt)


# ----------------------------------------------------------------------------- codecs
def identity_projections(client, server) -> None:
    """RD-FSQ / FSQ: learned projections before and after the grid set to the identity."""
    with torch.no_grad():
        for mod in (getattr(client, "proj", None), getattr(server, "proj", None)):
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.eye(mod.in_features))
                mod.bias.zero_()


def target(client, x: torch.Tensor) -> torch.Tensor:
    """What the server half is designed to rebuild (see the module docstring)."""
    if isinstance(client, RDFSQClient):
        if client.send_range:
            mu, sigma = batch_stats(x, client.stats)
            half = (3 * sigma).clamp_min(1e-6)
            return torch.minimum(torch.maximum(x, mu - half), mu + half)
        return clip_and_scale(x, client.stats)
    if isinstance(client, FSQClient):
        return torch.tanh(x)
    return x


def unexplained_variance(y: torch.Tensor, t: torch.Tensor) -> float:
    """1 - R^2 of the best per-dimension affine map ``a y + b -> t`` (T, D): the distortion
    no learned per-dimension rescaling on the server could remove (scale-free)."""
    yc, tc = y.double() - y.double().mean(0), t.double() - t.double().mean(0)
    var_y = (yc**2).sum(0)
    a = torch.where(var_y > 0, (yc * tc).sum(0) / var_y.clamp_min(1e-300), torch.zeros_like(var_y))
    resid = tc - a * yc
    return float((resid**2).sum() / (tc**2).sum().clamp_min(1e-300))


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after a warm-up (one call if the warm-up took > 1 s)."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > 1.0:
        repeats = 1
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(v: Variant, base: SplitConfig, feats: Features, repeats: int, seed: int) -> dict:
    cfg = v.cfg(base)
    vit = v.split != "connector"
    xs = feats.ln1 if vit else feats.connector
    dim = xs[0].shape[-1]
    torch.manual_seed(seed)
    spec = cfg.codec("image", dim)
    client, server = spec.client(), spec.server()
    identity_projections(client, server)
    client.eval()
    if client.needs_init:  # AlignedVQ's k-means codebook, RD-FSQ's EMA statistics: fitted on other micro-batches
        client.init_from(torch.cat(feats.fit_ln1 if vit else feats.connector))
        server.load_synced(client.state_dict())
    streams = {"image": (client, server, xs)}
    if vit and cfg.residual_mode == "transmit":
        rspec = cfg.replace(split_point="vit-ln1:0").codec("residual", dim)
        streams["residual"] = (rspec.client(), rspec.server(), feats.residual)

    samples = sum(x.shape[0] for x in xs)
    payload = code = ideal = 0
    enc_s = dec_s = 0.0
    record = {}
    y_hats = {}
    for s, (c, srv, inputs) in streams.items():
        with torch.no_grad():
            encs = [c(x) for x in inputs]
            payloads = [c.pack(e) for e in encs]
        shapes = [tuple(x.shape) for x in inputs]
        entropy = cfg.entropy(s)
        arrays = encode_stream(payloads, [c.index_layout(sh) for sh in shapes], entropy)
        record[FEATURE_RECORDS[s]] = arrays_to_record(arrays)
        payload += sum(a.nbytes for a in arrays.values())
        code += sum(p.code_bytes for p in payloads)
        ideal += sum(p.ideal_bits for p in payloads) / 8

        def enc_all(c=c, inputs=inputs, shapes=shapes, entropy=entropy):
            with torch.no_grad():
                ps = [c.pack(c(x)) for x in inputs]
            encode_stream(ps, [c.index_layout(sh) for sh in shapes], entropy)

        def dec_all(srv=srv, arrays=arrays, shapes=shapes, entropy=entropy, s=s):
            with torch.no_grad():
                return [srv(y) for y in decode_stream(arrays, srv, shapes, entropy, s)]

        enc_s += median_time(enc_all, repeats)
        dec_s += median_time(dec_all, repeats)
        y_hats[s] = decode_stream(arrays, srv, shapes, entropy, s)
        if not all(torch.equal(y, e.y) for y, e in zip(y_hats[s], encs)):
            raise RuntimeError(f"{v}: the server's decode of the {s} stream differs from the client's y")

    msg = Message(RecordDict(record), dst_node_id=1, message_type="train.split_step")  # codes + side info only
    wire = wire_bytes(msg)
    y = torch.cat(y_hats["image"])
    t = target(client, torch.cat(xs))
    mse = float(F.mse_loss(y, t))
    fp16 = 2 * math.prod(xs[0].shape[1:])  # fp16 bytes of one sample's features at the split
    n_per = math.prod(xs[0].shape[1:])
    return {
        "compressor": v.name, "bits": v.bits, "variant": v.label, "split": v.split,
        "entropy_coding": cfg.entropy_coding, "samples": samples,
        "payload_bytes_per_sample": payload / samples,
        "wire_bytes_per_sample": wire / samples,
        "theoretical_bytes_per_sample": ideal / samples,
        "code_bytes_per_sample": code / samples,
        "bits_per_value": 8 * payload / samples / n_per,
        "ratio_fp16_codes": fp16 / (code / samples),
        "ratio_fp16_all": fp16 / (wire / samples),
        "wire_over_payload": wire / payload,
        "message_payload_bytes": payload,
        "encode_us_per_sample": 1e6 * enc_s / samples,
        "decode_us_per_sample": 1e6 * dec_s / samples,
        "mse": mse,
        "nmse": mse / float((t**2).mean()),
        "unexplained_variance": unexplained_variance(y.reshape(-1, dim), t.reshape(-1, dim)),
        "nominal_ratio": client.nominal_ratio() if hasattr(client, "nominal_ratio") else float("nan"),
        "cosine": float(F.cosine_similarity(y.reshape(-1, dim), t.reshape(-1, dim), dim=-1).mean()),
    }


@torch.no_grad()
def entropy_rows(feats: Features) -> list[dict]:
    """The trained 2-bit RD-FSQ codes of the fixed batch, entropy-coded as one message."""
    codec = feats.rt.model.codec
    codec.eval()
    encs = [codec(x) for x in feats.connector]
    codes = np.concatenate([e.codes.numpy().reshape(-1) for e in encs])
    layouts = [codec.index_layout(tuple(x.shape)) for x in feats.connector]
    packed = {"codes.index": np.concatenate([codec.pack(e).codes["index"] for e in encs])}
    h_bits = empirical_entropy_bits(codes, codec.levels)
    rows = []
    for method in ("ans", "zstd"):
        coded = wrap_index(packed, layouts, method)
        nbytes = sum(a.nbytes for a in coded.values())
        rows.append({
            "codes": "trained rdfsq (per-dim)", "bits": codec.bits, "method": method, "count": codes.size,
            "entropy_bits_per_symbol": h_bits / codes.size, "entropy_bound_bytes": h_bits / 8,
            "fixed_width_bytes": packed["codes.index"].nbytes, "coded_bytes": nbytes,
            "coded_over_entropy": nbytes / (h_bits / 8),
        })
    return rows


def framing_rows() -> list[dict]:
    """Flower's framing alone: one uint8 array of n bytes in a ``features`` record."""
    rows = []
    for n in (4096, 16384, 32768, 65536, 262144, 1 << 20):
        rec = arrays_to_record({"codes.index": np.zeros(n, np.uint8)})
        wire = wire_bytes(Message(RecordDict({"features": rec}), dst_node_id=1, message_type="train.split_step"))
        rows.append({"payload_bytes": n, "wire_bytes": wire, "overhead_bytes": wire - n, "wire_over_payload": wire / n})
    return rows


def text_recovery(quick: bool, seed: int, bits: int = 2) -> list[dict]:
    """What ``text-mode=quantized`` hides: train with it, then let the server map what it
    receives (decoded text codes through its own text codec) to the nearest row of the
    LLM's embedding table, which it holds. Reported: the share of question tokens (not
    the answers, which go up in clear as labels) it recovers, before and after training."""
    over = dict(num_server_rounds=1, seed=seed, text_mode="quantized", text_compressor="rdfsq", text_bits=bits)
    over |= (dict(local_steps=4, steps_per_exchange=2, warmup_steps=1, batch_size=4, num_samples=160, hidden_size=32,
                  image_size=16, patch_size=4, nf_block=32) if quick else
             dict(local_steps=100, steps_per_exchange=25, warmup_steps=20, num_samples=2000))
    cfg = SplitConfig.from_run_config(SCRATCH).replace(**over)
    res = run_reference(cfg, num_partitions=2, evaluate_rounds=False)
    with torch.no_grad():
        return [_recovery(cfg, label, weights, server, bits) for label, weights, server in
                (("initial", None, build_server(cfg)), ("trained", res.client_weights, res.server))]


def _recovery(cfg: SplitConfig, label: str, weights: dict | None, server, bits: int) -> dict:
    rt = client_runtime(cfg, 0, 2)
    if weights is None:
        weights = sync_round_state(server, initial_client_weights(cfg))  # the untrained model
    load_weights(rt, weights)
    table = server.model.llm.get_input_embeddings().weight
    # white-box: the server also holds the clients' (FedAvg'd) text-codec weights, so it can
    # project every vocabulary row the way a client does, standardise per dimension over the
    # vocabulary, and match by cosine against the received grid values (scale-free per token)
    z = rt.model.text_codec.proj(table)
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-6)
    hits = {"server half": 0, "white-box": 0}
    total = 0
    for step in range(8):
        idx = micro_batch(rt, 1, step)
        batch = client_batch(rt, idx)
        payloads = pack_streams(rt, rt.model.encode(batch))
        shapes = micro_batch_shapes(cfg, [sum(len(s) for s in batch.text)])
        record = RecordDict(payload_records(cfg, rt.model.codecs(), [payloads], shapes))  # as the wire carries it
        grid = decode_payload_records(record, cfg, server.model.codecs(), shapes)[0].text[0]
        guesses = {
            "server half": torch.cdist(server.model.text_codec(grid), table).argmin(-1).numpy(),
            "white-box": F.normalize(grid - grid.mean(0), dim=-1).matmul(F.normalize(z, dim=-1).T).argmax(-1).numpy(),
        }
        truth = np.concatenate(batch.text)
        question = ~np.concatenate([rt.data.loss_mask[i] for i in idx])
        for k, g in guesses.items():
            hits[k] += int((g[question] == truth[question]).sum())
        total += int(question.sum())
    return {"text_bits": bits, "model": label, "question_tokens": total,
            "recovered_server_half": hits["server half"] / total, "recovered_white_box": hits["white-box"] / total,
            "vocabulary": table.shape[0]}


# ----------------------------------------------------------------------------- report
def markdown(df: pd.DataFrame, ent: pd.DataFrame, cfg: SplitConfig, quick: bool, framing: pd.DataFrame,
             text: pd.DataFrame) -> str:
    def f(v, d=1):
        return f"{v:,.{d}f}"

    lines = [
        f"Features: {len(df) and int(df.samples.iloc[0])} test samples of the trained from-scratch model "
        f"({cfg.num_image_tokens} tokens x {cfg.hidden_size} dims per sample; fp16 = "
        f"{2 * cfg.num_image_tokens * cfg.hidden_size:,} bytes){' — QUICK run, not the acceptance numbers' if quick else ''}. "
        f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs.",
        "",
        "| compressor | b | variant | payload B/sample | wire B/sample | theoretical B/sample | ratio vs fp16 (codes) | ratio vs fp16 (all) | wire/payload | enc+pack µs/sample | unpack+dec µs/sample | NMSE | 1-R² (affine) | cosine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        lines.append(
            f"| {r.compressor} | {r.bits} | {r.variant} | {f(r.payload_bytes_per_sample)} | {f(r.wire_bytes_per_sample)} | "
            f"{f(r.theoretical_bytes_per_sample)} | {f(r.ratio_fp16_codes)} | {f(r.ratio_fp16_all)} | "
            f"{r.wire_over_payload:.4f} | {f(r.encode_us_per_sample)} | {f(r.decode_us_per_sample)} | "
            f"{r.nmse:.4f} | {r.unexplained_variance:.4f} | {r.cosine:.4f} |"
        )
    topk = df[df.compressor == "topk"]
    if len(topk):
        nominal = ", ".join(f"b={int(r.bits)}: {r.nominal_ratio:.1f}" for r in topk.itertuples())
        lines += ["", f"Top-k, the paper's nominal ratio H/k (no random share, no positions): {nominal}; "
                      "the true ratios are the 'ratio vs fp16 (all)' column."]
    big = df[df.message_payload_bytes >= WIRE_MIN_PAYLOAD]
    worst = big.wire_over_payload.max() if len(big) else float("nan")
    lines += [
        "",
        f"Wire ÷ payload for messages of ≥ 16 KB: worst {worst:.4f} over {len(big)} rows "
        f"(limit {WIRE_LIMIT}: {'met' if worst <= WIRE_LIMIT else 'NOT met'}).",
        "",
        "| codes | b | method | count | H (bits/symbol) | entropy bound B | fixed-width B | coded B | coded ÷ bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ent.itertuples():
        lines.append(
            f"| {r.codes} | {r.bits} | {r.method} | {r.count:,} | {r.entropy_bits_per_symbol:.4f} | "
            f"{f(r.entropy_bound_bytes)} | {r.fixed_width_bytes:,} | {r.coded_bytes:,} | {r.coded_over_entropy:.4f} |"
        )
    ans = ent[ent.method == "ans"].coded_over_entropy.max()
    lines += ["", f"ANS ÷ entropy bound: {ans:.4f} (limit {ENTROPY_LIMIT}: {'met' if ans <= ENTROPY_LIMIT else 'NOT met'}).",
              "", "Flower's framing of one array in one message:", "",
              "| payload B | wire B | overhead B | wire ÷ payload |", "|---|---|---|---|"]
    for r in framing.itertuples():
        lines.append(f"| {r.payload_bytes:,} | {r.wire_bytes:,} | {r.overhead_bytes:,} | {r.wire_over_payload:.4f} |")
    lines += ["", "Share of question tokens the server recovers under `text-mode=quantized` (RD-FSQ text codec): with "
              "its own text-codec half and embedding table (nearest row), and white-box with the clients' FedAvg'd "
              "text-codec weights too (cosine to every projected vocabulary row):", "",
              "| text bits | model | question tokens | server half | white-box | vocabulary |", "|---|---|---|---|---|---|"]
    for r in text.itertuples():
        lines.append(f"| {r.text_bits} | {r.model} | {r.question_tokens:,} | {r.recovered_server_half:.3f} | "
                     f"{r.recovered_white_box:.3f} | {r.vocabulary} |")
    return "\n".join(lines) + "\n"


def update_doc(md: str, path: Path = DOC) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no generated block ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{md}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.compressor_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few rows: a smoke test for CI (minutes -> seconds)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/compressors.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # per-sample latency on one core; small ops thrash a shared thread pool
    ensure_task_identity()
    t0 = time.perf_counter()
    cfg, weights = train(args.quick, args.seed)
    feats = features(cfg, weights, micro_batches=8, fit_batches=4 if args.quick else 16)
    rows = []
    for v in variants(args.quick):
        rows.append(measure(v, cfg, feats, repeats=3 if args.quick else 5, seed=args.seed))
        log.info("%s b=%d %s: %.1f B/sample, nmse %.4f", v.name, v.bits, v.label, rows[-1]["payload_bytes_per_sample"], rows[-1]["nmse"])
    df, ent = pd.DataFrame(rows), pd.DataFrame(entropy_rows(feats))
    framing, text = pd.DataFrame(framing_rows()), pd.DataFrame(text_recovery(args.quick, args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "compressors.csv", index=False)
    ent.to_csv(args.out / "compressors_entropy.csv", index=False)
    framing.to_csv(args.out / "compressors_framing.csv", index=False)
    text.to_csv(args.out / "compressors_text_recovery.csv", index=False)
    (args.out / "compressors_config.json").write_text(json.dumps({"config": cfg.to_run_config(), "quick": args.quick,
                                                                  "seed": args.seed}, indent=2, sort_keys=True))
    md = markdown(df, ent, cfg, args.quick, framing, text)
    (args.out / "compressors.md").write_text(md)
    if not args.quick and not args.no_doc:
        update_doc(md)
    log.info("done in %.0f s: %s", time.perf_counter() - t0, args.out / "compressors.csv")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
