"""Communication cost and latency (Quantized-TinyLLaVA's cost table; AlignedVQ's Table 3 and Figure 6).

``python -m experiments.comm`` does three things:

1. **Whole training runs through Flower.** For each method (``--methods``, default
   identity fp16, RD-FSQ b = 2, Top-K b = 2 and VQ b = 2) one ``python -m sim run``
   (Ray simulation, the bit sweep's budget and client count) in its own process; its
   ledger (one row per message, bytes as Flower serialised them) gives the bytes of the
   whole run by direction and message kind, per training sample, and the simulated time
   of every exchange at 0.25, 0.5, 1, 2 and 4 Mbit/s (``rtt + bytes * 8 / bandwidth``
   per client, the slowest client per exchange, :class:`sim.wire.ledger.NetworkModel`).
2. **Per inference sample.** The ``evaluate.split_infer`` reply of one client, built by
   the real handler: the codes of one image plus its question's token ids (the answer
   ids and question types in that reply are only there for scoring).
3. **Cloud-only with JPEG** (AlignedVQ's baseline): the same test images JPEG-compressed
   by Pillow at quality 10 and 90, and six natural photographs shipped with
   scikit-image resized to 336x336 (the paper's CLIP input) for its scale. Latency per
   inference sample = edge compute + transmission + cloud compute up to the LLM (the
   LLM is left out, as in the paper), with compute measured on this CPU (one thread).
   Its accuracy: the identity run's final model (the whole model, as the cloud would run
   it) evaluated on every client's test images after a JPEG round trip at each quality.

Outputs under ``--out``: ``comm.csv`` (one row per Flower run), ``comm_latency.csv``
(method x bandwidth), ``comm_jpeg.csv``, ``comm_jpeg_accuracy.csv``, ``comm.json``, ``comm.md`` and
``comm_latency.png``. Flower run directories go to ``--runs`` (default ``runs/comm``)
and are reused when they hold a finished run.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .common import (  # noqa: E402
    QUICK_BUDGET,
    SWEEP_BUDGET,
    SWEEP_CLIENTS,
    method_overrides,
    ready_runtimes,
    setup_logging,
)

log = logging.getLogger("experiments.comm")

BANDWIDTHS_MBPS = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_METHODS = "identity:16,rdfsq:2,topk:2,vq:2"
QUICK_METHODS = "identity:16,rdfsq:2"
JPEG_QUALITIES = (10, 90)
PAPER_IMAGE_SIZE = 336  # CLIP ViT-L/336 input of LLaVA-1.5 (LLaVA-AlignedVQ, arXiv 2411.05961, section 4.3)
PAPER_TOKENS, PAPER_DIM, PAPER_VQ_BITS = 577, 1024, 12  # LLaVA-AlignedVQ Table 3: features (1, 577, 1024), 2^12 codes
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


# ------------------------------------------------------------------ 1. whole runs through Flower
def parse_methods(s: str) -> list[tuple[str, int]]:
    out = []
    for item in s.split(","):
        name, _, bits = item.strip().partition(":")
        try:
            method_overrides(name, int(bits or 16))
            out.append((name, int(bits or 16)))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"bad method {item!r} (want name:bits): {err}") from None
    return out


def flower_run(method: str, bits: int, base: dict, clients: int, runs: Path) -> Path:
    """``python -m sim run`` for one method in a subprocess; returns its run directory (reused if finished)."""
    run_dir = (runs / f"{method}-b{bits}").resolve()
    if (run_dir / "summary.json").exists():
        log.info("reusing the finished run %s", run_dir)
        return run_dir
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} holds an unfinished run; remove it to run again")
    cfg = {**base, **method_overrides(method, bits)}
    cmd = [sys.executable, "-m", "sim", "run", "--clients", str(clients), "--out", str(run_dir)]
    for k, v in cfg.items():
        cmd += ["-c", f"{k}={v}"]
    runs.mkdir(parents=True, exist_ok=True)
    log.info("flower run: %s", " ".join(cmd[1:]))
    t0 = time.perf_counter()
    with (runs / f"{method}-b{bits}.log").open("w") as logf:
        rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not (run_dir / "summary.json").exists():
        raise RuntimeError(f"python -m sim run failed (exit {rc}); see {runs / f'{method}-b{bits}.log'}")
    log.info("flower run %s b=%d done in %.0f s", method, bits, time.perf_counter() - t0)
    return run_dir


def exchange_seconds(ledger: pd.DataFrame, bandwidth_mbps: float, rtt_ms: float) -> pd.Series:
    """Simulated seconds of every exchange: per client ``rtt + bytes*8/bw`` (both directions), slowest client."""
    from sim.wire.ledger import NetworkModel

    net = NetworkModel(bandwidth_mbps, rtt_ms)
    per_node = ledger.groupby(["kind", "round", "exchange", "node"]).wire_bytes.sum()
    return per_node.map(net.client_seconds).groupby(level=["kind", "round", "exchange"]).max()


def ledger_stats(run_dir: Path, method: str, bits: int) -> tuple[dict, list[dict]]:
    """Totals of one Flower run from its ledger, and its latency rows per bandwidth."""
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    led = pd.read_csv(run_dir / "ledger.csv")
    train = led[led.kind == "train.split_step"]
    up, down = train[train.direction == "up"], train[train.direction == "down"]
    samples = int(summary["samples_seen"])
    codes_up = up[up.samples > 0]
    grads_down = down[down.exchange > 0]
    row = {
        "method": method, "bits": bits, "clients": summary["clients"], "rounds": summary["rounds"],
        "samples": samples, "accuracy": summary["accuracy"], "wall_s": summary["wall_s"],
        "total_bytes": int(led.wire_bytes.sum()),
        "uplink_bytes": int(summary["uplink_bytes"]), "downlink_bytes": int(summary["downlink_bytes"]),
        "train_codes_up_bytes": int(codes_up.wire_bytes.sum()),
        "train_grads_down_bytes": int(grads_down.wire_bytes.sum()),
        "train_weights_down_bytes": int(down[down.exchange == 0].wire_bytes.sum()),
        "train_weights_up_bytes": int(up[up.samples == 0].wire_bytes.sum()),
        "eval_bytes": int(led[led.kind == "evaluate.split_infer"].wire_bytes.sum()),
        "hello_bytes": int(led[led.kind == "query.hello"].wire_bytes.sum()),
        "up_wire_bytes_per_sample": codes_up.wire_bytes.sum() / samples,
        "feature_bytes_per_sample": codes_up.feature_bytes.sum() / samples,
        "down_grad_wire_bytes_per_sample": grads_down.wire_bytes.sum() / samples,
        "train_bytes_per_sample": train.wire_bytes.sum() / samples,
        "messages": len(led),
    }
    if int(led.wire_bytes.sum()) != row["uplink_bytes"] + row["downlink_bytes"]:
        raise ValueError(f"{run_dir}: the ledger rows do not add up to summary.json's totals")
    lat = []
    for bw in BANDWIDTHS_MBPS:
        sec = exchange_seconds(led, bw, float(cfg["rtt-ms"]))
        tr = sec.loc["train.split_step"]
        first = tr[tr.index.get_level_values("exchange") == 0]
        steady = tr[tr.index.get_level_values("exchange") > 0]
        lat.append({"method": method, "bits": bits, "bandwidth_mbps": bw, "rtt_ms": float(cfg["rtt-ms"]),
                    "round_start_exchange_s": float(first.median()), "steady_exchange_s": float(steady.median()),
                    "run_network_s": float(sec.sum())})
    return row, lat


# ------------------------------------------------------------------ 2. one inference sample
def inference_bytes(cfg, clients: int) -> dict:
    """Bytes of one inference sample, from the real ``evaluate.split_infer`` reply of partition 0."""
    from flwr.app import Message, RecordDict

    from sim.training.client_handlers import client_evaluate
    from sim.training.node import NodeIdentity
    from sim.training.transport import ensure_task_identity
    from sim.wire.arrays import payload_bytes, record_to_arrays, wire_bytes
    from sim.wire.messages import EVALUATE, eval_request

    ensure_task_identity()
    _, _, weights = ready_runtimes(cfg, clients)
    reply = client_evaluate(eval_request(cfg, 1, weights), RecordDict(), NodeIdentity(0, clients))
    meta = reply.config_records["meta"]
    n, micro = int(meta["eval-count"]), int(meta["micro-batches"])
    text = record_to_arrays(reply.array_records["text"])
    question = sum(text[k].nbytes for k in ("prompt_ids", "prompt_lens", "prompt_split"))
    feature = payload_bytes(reply, ("features",)) / (micro * cfg.batch_size)  # codes cover whole micro-batches
    return {
        "feature_bytes": feature, "question_bytes": question / n, "inference_up_bytes": feature + question / n,
        "eval_reply_wire_bytes_per_sample": wire_bytes(Message(reply, dst_node_id=1, message_type=EVALUATE)) / n,
    }


def _per_sample_seconds(fn, reps: int) -> float:
    """The fastest of ``reps`` timed calls (after a warm-up): the least disturbed by other jobs on the machine."""
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def compute_seconds(cfg, clients: int, batch: int = 32, reps: int = 7) -> dict:
    """Per-sample compute on this CPU: client encode + pack (edge); server unpack, decode and, for a
    split inside the vision tower, its remaining blocks and the connector (cloud, up to the LLM)."""
    from sim.compress.streams import Streams
    from sim.data.batches import pixels
    from sim.model.processor import image_processor

    rt, server, _ = ready_runtimes(cfg, clients)
    rt.model.eval()
    server.model.eval()
    px = pixels(rt.data, np.arange(batch) % len(rt.data), image_processor(rt.cfg))
    payload = rt.model.codec.pack(rt.model(px))
    shape = (batch, server.tokens, server.dim)
    edge = _per_sample_seconds(lambda: rt.model.codec.pack(rt.model(px)), reps) / batch
    cloud = _per_sample_seconds(
        lambda: server.model.image_embeds(Streams(server.model.codec.unpack(payload, shape))), reps) / batch
    server.model.train()
    rt.model.train()
    return {"edge_s": edge, "cloud_s": cloud}


# ------------------------------------------------------------------ 3. JPEG cloud-only
def jpeg_bytes(img: np.ndarray, quality: int) -> tuple[int, bytes]:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()), buf.getvalue()


def jpeg_decode(blob: bytes) -> np.ndarray:
    """A JPEG back to an (H, W, 3) uint8 RGB array (writable, as a tensor needs)."""
    return np.array(Image.open(io.BytesIO(blob)).convert("RGB"))


def photos_336() -> dict[str, np.ndarray]:
    """Natural photographs bundled with scikit-image, RGB, resized (bicubic) to 336x336."""
    import skimage.data

    out = {}
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        out[name] = np.asarray(img.resize((PAPER_IMAGE_SIZE, PAPER_IMAGE_SIZE), Image.BICUBIC))
    return out


@torch.no_grad()
def jpeg_table(cfg, clients: int, n_images: int = 256, reps: int = 7) -> tuple[list[dict], dict]:
    """JPEG bytes of the benchmark's images and of 336x336 photos; cloud-only compute per sample."""
    from sim.compress import pack_bits
    from sim.data.batches import pixels
    from sim.model.processor import image_processor
    from sim.training.client import client_runtime

    rows = []
    rt = client_runtime(cfg.replace(compressor="identity", bits=16), 0, clients)
    idx = np.arange(min(n_images, len(rt.data)))
    imgs = rt.data.images[torch.from_numpy(idx)].permute(0, 2, 3, 1).numpy()
    for q in JPEG_QUALITIES:
        sizes = [jpeg_bytes(im, q)[0] for im in imgs]
        rows.append({"images": f"benchmark {imgs.shape[1]}x{imgs.shape[2]}", "format": f"JPEG-{q}",
                     "bytes_mean": float(np.mean(sizes)), "bytes_std": float(np.std(sizes, ddof=1)), "n": len(sizes)})
    rows.append({"images": f"benchmark {imgs.shape[1]}x{imgs.shape[2]}", "format": "raw RGB uint8",
                 "bytes_mean": float(imgs[0].nbytes), "bytes_std": 0.0, "n": len(imgs)})
    photos = photos_336()
    for q in JPEG_QUALITIES:
        sizes = [jpeg_bytes(im, q)[0] for im in photos.values()]
        rows.append({"images": f"{len(photos)} scikit-image photos {PAPER_IMAGE_SIZE}x{PAPER_IMAGE_SIZE}",
                     "format": f"JPEG-{q}", "bytes_mean": float(np.mean(sizes)), "bytes_std": float(np.std(sizes, ddof=1)),
                     "n": len(sizes)})
    rows.append({"images": f"paper scale ({PAPER_TOKENS}x{PAPER_DIM} features)", "format": "fp16 features",
                 "bytes_mean": float(np.zeros((PAPER_TOKENS, PAPER_DIM), np.float16).nbytes), "bytes_std": 0.0, "n": 1})
    vq = pack_bits(np.zeros(PAPER_TOKENS, np.int64), PAPER_VQ_BITS)
    rows.append({"images": f"paper scale ({PAPER_TOKENS}x{PAPER_DIM} features)", "format": f"VQ {PAPER_VQ_BITS}-bit indices (packed)",
                 "bytes_mean": float(vq.nbytes), "bytes_std": 0.0, "n": 1})
    # cloud-only compute: JPEG encode on the edge; decode + vision tower + connector in the cloud
    rt.model.eval()
    batch = imgs[:32]
    timing = {}
    for q in JPEG_QUALITIES:
        blobs = [jpeg_bytes(im, q)[1] for im in batch]
        enc = _per_sample_seconds(lambda: [jpeg_bytes(im, q) for im in batch], reps) / len(batch)
        dec = _per_sample_seconds(lambda: [jpeg_decode(b) for b in blobs], reps) / len(batch)
        timing[f"JPEG-{q}"] = {"edge_s": enc, "decode_s": dec}
    px = pixels(rt.data, idx[:32], image_processor(rt.cfg))
    tower = _per_sample_seconds(lambda: rt.model.features(px), reps) / len(batch)
    rt.model.train()
    for t in timing.values():
        t["cloud_s"] = t.pop("decode_s") + tower
    return rows, timing


def jpeg_images(images: torch.Tensor, quality: int) -> tuple[torch.Tensor, np.ndarray]:
    """Every image (uint8, (M,3,H,W)) through Pillow's JPEG encoder and decoder at ``quality``,
    and the encoded size of each."""
    out = torch.empty_like(images)
    sizes = np.empty(len(images), np.int64)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        sizes[i], blob = jpeg_bytes(img, quality)
        out[i] = torch.from_numpy(jpeg_decode(blob)).permute(2, 0, 1)
    return out, sizes


def jpeg_accuracy(run_dir: Path, clients: int) -> list[dict]:
    """Cloud-only accuracy (:func:`cloud_only_accuracy`) of the final model of the finished
    identity run in ``run_dir`` (its ``checkpoint.pt``)."""
    from sim.config import SplitConfig
    from sim.run.checkpoint import load_checkpoint
    from sim.training.server import build_server

    ckpt = load_checkpoint(run_dir)
    cfg = SplitConfig.from_run_config(ckpt.config)
    server = build_server(cfg)
    server.model.load_state_dict(ckpt.server_model)
    rows = cloud_only_accuracy(cfg, server, ckpt.client_weights, clients, ckpt.round)
    return [{**r, "run": str(run_dir)} for r in rows]


@torch.no_grad()
def cloud_only_accuracy(cfg, server, client_weights: dict, clients: int, rnd: int) -> list[dict]:
    """Exact match of a trained identity model when the clients' test images reach it raw or
    as JPEG-10 / JPEG-90 (decoded in the cloud).

    With an fp16 identity split, client half + server half is the whole model, so this is the
    cloud-only baseline of LLaVA-AlignedVQ (arXiv 2411.05961) on our benchmark: the model the cloud would run, fed the
    images a cloud-only deployment would receive. The model is not retrained on JPEG images
    (neither is the paper's). The raw row equals the run's own final accuracy."""
    from sim.training.client import client_runtime
    from sim.training.reference import evaluate_global
    from sim.training.server import sync_round_state

    if cfg.compressor != "identity":
        raise ValueError(f"the cloud-only baseline needs an identity model, not {cfg.compressor}")
    weights = sync_round_state(server, client_weights)
    raw = client_runtime(cfg, 0, clients).data.images
    variants = [("raw RGB uint8", raw, np.full(len(raw), raw[0].numel()))]
    variants += [(f"JPEG-{q}", *jpeg_images(raw, q)) for q in JPEG_QUALITIES]
    rows = []
    for name, images, sizes in variants:
        correct, total = evaluate_global(cfg, server, weights, clients, rnd, images=images)["all"]
        rows.append({"format": name, "bytes_mean": float(sizes.mean()), "accuracy": correct / total,
                     "correct": correct, "total": total, "round": rnd})
        log.info("cloud-only %s: %d/%d exact match", name, correct, total)
    return rows


# ------------------------------------------------------------------ report
def plot_latency(lat: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, g in lat.groupby("name", sort=False):
        ax.plot(g.bandwidth_mbps, 1000 * g.total_s, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(BANDWIDTHS_MBPS, [str(b) for b in BANDWIDTHS_MBPS])
    ax.set(xlabel="bandwidth (Mbit/s)", ylabel="latency per inference sample (ms, log)",
           title="Edge compute + transmission + cloud compute up to the LLM")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, runs: pd.DataFrame, lat: pd.DataFrame, inf: pd.DataFrame, jpeg: pd.DataFrame,
                 jpeg_acc: pd.DataFrame, command: str, wall: float, budget: dict, notes: list[str]) -> None:
    mb = 1e6
    lines = [
        "# Communication cost and latency",
        "",
        f"Generated by `{command}` (wall time of this invocation {wall / 60:.1f} min; the Flower runs it made or "
        f"reused took {runs.wall_s.sum() / 60 if len(runs) else 0:.1f} min together) from `comm.csv`, `comm_latency.csv`, "
        "`comm_inference.csv`, `comm_jpeg.csv` and `comm_jpeg_accuracy.csv`; do not edit by hand. Bytes are what Flower serialised "
        "(ledger of `python -m sim run`) or the arrays the real handlers built; 1 MB = 10^6 bytes.",
        "",
        f"Training runs: {', '.join(f'{k}={v}' for k, v in budget.items())}.",
        "",
    ]
    for n in notes:
        lines += [f"> {n}", ""]
    if len(runs):
        lines += ["## A whole training run through Flower", "",
                  "| method | b | samples | exact match % | uplink MB | downlink MB | code replies up MB | gradients down MB | "
                  "weights down MB | weights up MB | eval MB | uplink B/sample | downlink (grad) B/sample |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for _, r in runs.iterrows():
            lines.append(
                f"| {r.method} | {r.bits} | {r.samples} | {100 * r.accuracy:.1f} | {r.uplink_bytes / mb:.2f} | "
                f"{r.downlink_bytes / mb:.2f} | {r.train_codes_up_bytes / mb:.2f} | {r.train_grads_down_bytes / mb:.2f} | "
                f"{r.train_weights_down_bytes / mb:.2f} | {r.train_weights_up_bytes / mb:.2f} | {r.eval_bytes / mb:.2f} | "
                f"{r.up_wire_bytes_per_sample:,.1f} | {r.down_grad_wire_bytes_per_sample:,.1f} |")
        ident = runs[runs.method == "identity"]
        if len(ident):
            i = ident.iloc[0]
            lines += ["", "`code replies` are the whole training replies that carry codes (codes, side information, token "
                      "ids and framing); `features` below is the codes and side information alone (the ledger's "
                      "`feature_bytes`).", "", "Reduction against identity (fp16 features, fp32 gradients):", "",
                      "| method | b | features | code replies | uplink total | whole run (both directions) |",
                      "|---|---|---|---|---|---|"]
            for _, r in runs[runs.method != "identity"].iterrows():
                lines.append(f"| {r.method} | {r.bits} | {100 * (1 - r.feature_bytes_per_sample / i.feature_bytes_per_sample):.2f}% | "
                             f"{100 * (1 - r.train_codes_up_bytes / i.train_codes_up_bytes):.1f}% | "
                             f"{100 * (1 - r.uplink_bytes / i.uplink_bytes):.1f}% | {100 * (1 - r.total_bytes / i.total_bytes):.1f}% |")
        lines += ["", "Simulated network time per exchange (one client's request + reply; `rtt` included, slowest client):", "",
                  "| method | b | Mbit/s | round-start exchange (weights) s | steady exchange s | whole run s |",
                  "|---|---|---|---|---|---|"]
        for _, r in lat[lat.kind == "train"].iterrows():
            lines.append(f"| {r.method} | {r.bits} | {r.bandwidth_mbps} | {r.round_start_exchange_s:.2f} | "
                         f"{r.steady_exchange_s:.3f} | {r.run_network_s:,.0f} |")
    lines += ["", "## One inference sample", "",
              "| method | b | feature B | question ids B | uplink B | eval reply wire B/sample (with scoring fields) |",
              "|---|---|---|---|---|---|"]
    for _, r in inf.iterrows():
        lines.append(f"| {r.method} | {r.bits} | {r.feature_bytes:,.1f} | {r.question_bytes:.1f} | "
                     f"{r.inference_up_bytes:,.1f} | {r.eval_reply_wire_bytes_per_sample:,.1f} |")
    lines += ["", "## Cloud-only with JPEG images (LLaVA-AlignedVQ, Table 3)", "",
              "| images | format | bytes (mean ± std) | n |", "|---|---|---|---|"]
    for _, r in jpeg.iterrows():
        lines.append(f"| {r.images} | {r.format} | {r.bytes_mean:,.1f} ± {r.bytes_std:,.1f} | {r.n} |")
    lines += ["", "LLaVA-AlignedVQ reports 26.47 KB (JPEG-90) and 4.14 KB (JPEG-10) per 336x336 VQA-v2 image and 0.845 KB "
                  "for AlignedVQ's 577 12-bit indices.", ""]
    if len(jpeg_acc):
        lines += ["Accuracy of the cloud-only baseline: the identity run's final model (client half + server half = "
                  "the whole model) on every client's test images, sent raw or as JPEG and decoded in the cloud; the "
                  "model was trained on raw images and is not retrained (as in the paper). Split rows: the final "
                  "accuracy of each Flower run above, with the uplink bytes of one inference sample's features.", "",
                  "| uplink | image bytes (mean) | exact match % | n |", "|---|---|---|---|"]
        for _, r in jpeg_acc.iterrows():
            lines.append(f"| cloud-only {r.format} | {r.bytes_mean:,.1f} | {100 * r.accuracy:.1f} | {r.total} |")
        feature_b = dict(zip(inf.method + " b=" + inf.bits.astype(str), inf.feature_bytes)) if len(inf) else {}
        for _, r in runs.iterrows():
            b = feature_b.get(f"{r.method} b={r.bits}", float("nan"))
            lines.append(f"| split {r.method} b={r.bits} | {b:,.1f} (features) | {100 * r.accuracy:.1f} | |")
        lines.append("")
    lines += ["## Latency per inference sample (LLaVA-AlignedVQ, Figure 6)", "",
              "Edge compute + uplink transmission (`bytes * 8 / bandwidth`, no RTT) + cloud compute up to the LLM, "
              "compute measured on this CPU with one thread, fastest of 7 repetitions (the least disturbed by other "
              "jobs; the paper: a Jetson edge and an A100 cloud). Split: edge = the client half and packing, "
              "cloud = unpacking, decoding and, for vq (split after LN1 of ViT block 0), the rest of the vision tower "
              "and the connector. Cloud-only JPEG: edge = JPEG encode, cloud = decode + vision tower + connector.", "",
              "| name | uplink B | edge ms | cloud ms | " + " | ".join(f"{b} Mbit/s ms" for b in BANDWIDTHS_MBPS) + " |",
              "|---|---|---|---|" + "---|" * len(BANDWIDTHS_MBPS)]
    per = lat[lat.kind == "inference"]
    for name, g in per.groupby("name", sort=False):
        g = g.set_index("bandwidth_mbps")
        r = g.iloc[0]
        lines.append(f"| {name} | {r.up_bytes:,.1f} | {1000 * r.edge_s:.2f} | {1000 * r.cloud_s:.2f} | "
                     + " | ".join(f"{1000 * g.loc[b, 'total_s']:.1f}" for b in BANDWIDTHS_MBPS) + " |")
    lines += ["", "![latency](comm_latency.png)", ""]
    (out / "comm.md").write_text("\n".join(lines))


# ------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.comm", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke version: tiny model, identity and rdfsq only")
    p.add_argument("--methods", type=parse_methods, help=f"name:bits list (default {DEFAULT_METHODS})")
    p.add_argument("--clients", type=int, default=SWEEP_CLIENTS)
    p.add_argument("--no-flower", action="store_true", help="skip the whole-run Flower simulations (sections 2-3 only)")
    p.add_argument("--out", type=Path, help="output folder (default experiments/results; runs/quick with --quick)")
    p.add_argument("--runs", type=Path, help="Flower run directories (default runs/comm; runs/quick/comm with --quick)")
    args = p.parse_args(argv)
    setup_logging()
    from sim.config import SplitConfig

    torch.set_num_threads(1)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    out = args.out or (Path("runs/quick") if args.quick else Path("experiments/results"))
    runs_dir = args.runs or (Path("runs/quick/comm") if args.quick else Path("runs/comm"))
    out.mkdir(parents=True, exist_ok=True)
    base = dict(QUICK_BUDGET if args.quick else SWEEP_BUDGET)
    methods = args.methods or parse_methods(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    notes = []
    run_rows, lat_rows, inf_rows = [], [], []
    failed = []
    for method, bits in methods:
        cfg = SplitConfig.from_run_config({**base, **method_overrides(method, bits)})
        if not args.no_flower:
            try:
                row, lat = ledger_stats(flower_run(method, bits, base, args.clients, runs_dir), method, bits)
                run_rows.append(row)
                lat_rows += [{**r, "kind": "train", "name": f"{method} b={bits}"} for r in lat]
            except (RuntimeError, FileExistsError, ValueError) as err:
                failed.append(f"{method} b={bits}: {err}")
                log.error("%s", failed[-1])
        try:
            inf = {"method": method, "bits": bits, **inference_bytes(cfg, args.clients), **compute_seconds(cfg, args.clients)}
        except RuntimeError as err:  # e.g. a codebook that only training initialises
            failed.append(f"{method} b={bits} (inference bytes): {err}")
            log.error("%s", failed[-1])
            continue
        inf_rows.append(inf)
        for bw in BANDWIDTHS_MBPS:
            tx = inf["inference_up_bytes"] * 8 / (bw * 1e6)
            lat_rows.append({"kind": "inference", "name": f"split {method} b={bits}", "method": method, "bits": bits,
                             "bandwidth_mbps": bw, "up_bytes": inf["inference_up_bytes"], "edge_s": inf["edge_s"],
                             "cloud_s": inf["cloud_s"], "transmit_s": tx, "total_s": inf["edge_s"] + tx + inf["cloud_s"]})
    cfg0 = SplitConfig.from_run_config(base)
    jpeg_rows, timing = jpeg_table(cfg0, args.clients)
    question = float(np.mean([r["question_bytes"] for r in inf_rows])) if inf_rows else 0.0
    for r in jpeg_rows:
        if r["images"].startswith("benchmark") and r["format"] in timing:
            t = timing[r["format"]]
            up = r["bytes_mean"] + question
            for bw in BANDWIDTHS_MBPS:
                tx = up * 8 / (bw * 1e6)
                lat_rows.append({"kind": "inference", "name": f"cloud-only {r['format']}", "method": r["format"], "bits": 0,
                                 "bandwidth_mbps": bw, "up_bytes": up, "edge_s": t["edge_s"], "cloud_s": t["cloud_s"],
                                 "transmit_s": tx, "total_s": t["edge_s"] + tx + t["cloud_s"]})
    jpeg_acc = []
    if any(r["method"] == "identity" for r in run_rows):
        ident_bits = next(b for m, b in methods if m == "identity")
        try:
            jpeg_acc = jpeg_accuracy(runs_dir / f"identity-b{ident_bits}", args.clients)
        except (RuntimeError, ValueError, OSError) as err:
            failed.append(f"cloud-only JPEG accuracy: {err}")
            log.error("%s", failed[-1])
    else:
        notes.append("no cloud-only JPEG accuracy: it evaluates the identity run's model, which was not run")
    runs, lat, inf_df, jpeg = pd.DataFrame(run_rows), pd.DataFrame(lat_rows), pd.DataFrame(inf_rows), pd.DataFrame(jpeg_rows)
    jpeg_acc_df = pd.DataFrame(jpeg_acc)
    jpeg_acc_df.to_csv(out / "comm_jpeg_accuracy.csv", index=False)
    runs.to_csv(out / "comm.csv", index=False)
    lat.to_csv(out / "comm_latency.csv", index=False)
    inf_df.to_csv(out / "comm_inference.csv", index=False)
    jpeg.to_csv(out / "comm_jpeg.csv", index=False)
    plot_latency(lat[lat.kind == "inference"], out / "comm_latency.png")
    wall = time.perf_counter() - t0
    notes += [f"failed: {f}" for f in failed]
    (out / "comm.json").write_text(json.dumps(
        {"wall_s": round(wall, 1), "load_1m_at_start": round(load0, 2), "flower_runs_wall_s": round(float(runs.wall_s.sum()) if len(runs) else 0.0, 1),
         "budget": base, "clients": args.clients, "methods": methods, "notes": notes},
        indent=2, default=str))
    command = ("python -m experiments.comm " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    write_report(out, runs, lat, inf_df, jpeg, jpeg_acc_df, command, wall, base, notes)
    print(f"wrote {out / 'comm.md'} in {wall:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
