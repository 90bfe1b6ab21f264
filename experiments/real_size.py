"""``python -m experiments.bench --real-size [--quick]``: real-size towers and LLMs, one split step each, on the CPU.

The architectures of TinyLLaVA (arXiv 2402.14289) and Quantized-TinyLLaVA (arXiv
2511.23402), from their real configurations, randomly initialised offline (no hub
download): the SigLIP towers of "Sigmoid Loss for Language Image Pre-Training" (arXiv
2303.15343) and two LLM shapes,

* towers: ``google/siglip-base-patch16-224`` (86 M; 196 tokens of 768) and
  ``google/siglip-so400m-patch14-384`` (400 M; 729 tokens of 1152);
* LLMs: a SmolLM-135M-shaped Llama (576 wide, 30 layers, 9 heads, 3 KV heads, vocabulary
  49 152) and a Qwen2-0.5B-shaped model (896 wide, 24 layers, 14 heads, 2 KV heads,
  vocabulary 151 936).

Each model is built from its ``transformers`` config, saved with ``save_pretrained`` into a
temporary directory (the tower with SigLIP's image processor, plus a tokenizer made by the
project's own builder) and loaded back through the project's ``vision-tower=<dir>`` /
``llm=<dir>`` ``from_pretrained`` path. For every tower × LLM pair, at ``split-point``
``connector`` and ``vit-ln1:k`` (k = half the tower's blocks), one split step runs end to
end through the real round engine, client handlers, codec (RD-FSQ at 2 bits, the clip range
sent), wire and ledger (:func:`sim.training.reference.run_reference`: one client, one round,
one micro-batch): encode, uplink, the server's LLM step, the gradient downlink, the client's
recompute and backward, FedAvg. Each row runs in a fresh interpreter, so its peak RSS
(``resource.getrusage``) is its own. Recorded per row: peak RSS, the round's time (train_s)
and its client part, the 1-minute load average at the start, and the uplink bytes per
sample from the ledger against the formula

    features: N·D·b/8 + 4·D/B   (RD-FSQ's fp16 centre and half-width per dimension, per micro-batch)
    text:     (2·T + 2·B + ⌈T/8⌉)/B   (uint16 ids, uint16 lengths, 1-bit loss mask; T tokens)

with their ratio (must be within 1 %). The memory-saving options (frozen tower, LoRA,
gradient checkpointing, the align stage) are rows of their own. ``--quick`` runs shrunken
shapes of the same structure in this process in seconds (CI; its RSS column is this
process's peak so far).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

# real hyperparameters (the hub configs of the named checkpoints)
TOWERS: dict[str, dict] = {
    "siglip-base-patch16-224": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
    "siglip-so400m-patch14-384": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                  "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
}
LLMS: dict[str, tuple[str, dict]] = {
    "smollm-135m": ("llama", {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                              "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                              "tie_word_embeddings": True}),
    "qwen2-0.5b": ("qwen2", {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                             "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                             "tie_word_embeddings": True}),
}
HUB_IDS = {"siglip-base-patch16-224": "google/siglip-base-patch16-224",
           "siglip-so400m-patch14-384": "google/siglip-so400m-patch14-384",
           "smollm-135m": "HuggingFaceTB/SmolLM-135M", "qwen2-0.5b": "Qwen/Qwen2-0.5B"}
# --quick: the same structure (SigLIP blocks, GQA, tied embeddings), shrunken
QUICK_TOWERS: dict[str, dict] = {
    "siglip-base-patch16-224": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "siglip-so400m-patch14-384": {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3,
                                  "num_attention_heads": 2, "image_size": 42, "patch_size": 14},
}
QUICK_LLMS: dict[str, tuple[str, dict]] = {
    "smollm-135m": ("llama", {**LLMS["smollm-135m"][1], "hidden_size": 48, "intermediate_size": 96,
                              "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
                              "vocab_size": 512}),
    "qwen2-0.5b": ("qwen2", {**LLMS["qwen2-0.5b"][1], "hidden_size": 56, "intermediate_size": 112,
                             "num_hidden_layers": 2, "num_attention_heads": 7, "num_key_value_heads": 1,
                             "vocab_size": 1024}),
}
BITS = 2


@dataclass(frozen=True)
class Row:
    """One measured split step: a pair, a split point and the options that differ from the base."""

    tower: str
    llm: str
    split: str  # "connector" or "vit-ln1"
    option: str = "frozen tower"
    overrides: dict = field(default_factory=dict)


BASE_OPTION = "frozen tower"
OPTIONS: dict[str, dict] = {  # the memory-saving options, on top of the base (frozen tower, full LLM)
    "frozen tower": {},
    "LoRA r=8": {"llm-lora-rank": 8},
    "gradient checkpointing": {"gradient-checkpointing": True},
    "LoRA r=8 + checkpointing": {"llm-lora-rank": 8, "gradient-checkpointing": True},
    "align stage (LLM frozen)": {"stage": "align", "align-batch-size": 0},  # 0: replaced by the batch size
    "tower trained": {"train-vision-tower": "true"},
    "tower trained + checkpointing": {"train-vision-tower": "true", "gradient-checkpointing": True},
}


def plan() -> list[Row]:
    """Every pair at both split points with the base options; the memory-saving options on
    the largest pair (LoRA, checkpointing, align) and the smallest (training the tower)."""
    rows = [Row(t, m, s) for t in TOWERS for m in LLMS for s in ("connector", "vit-ln1")]
    big, small = ("siglip-so400m-patch14-384", "qwen2-0.5b"), ("siglip-base-patch16-224", "smollm-135m")
    for opt in ("LoRA r=8", "gradient checkpointing", "LoRA r=8 + checkpointing", "align stage (LLM frozen)"):
        rows.append(Row(*big, "connector", opt, OPTIONS[opt]))
    for opt in ("tower trained", "tower trained + checkpointing"):
        rows.append(Row(*small, "connector", opt, OPTIONS[opt]))
    return rows


def quick_plan() -> list[Row]:
    """Every pair at both split points, plus each option once (on the smallest pair)."""
    rows = [Row(t, m, s) for t in TOWERS for m in LLMS for s in ("connector", "vit-ln1")]
    small = ("siglip-base-patch16-224", "smollm-135m")
    rows += [Row(*small, "connector", opt, o) for opt, o in OPTIONS.items() if opt != BASE_OPTION]
    return rows


# ----------------------------------------------------------------------------- model directories
def save_tower(name: str, shapes: dict, out: Path, seed: int = 0) -> Path:
    """A randomly initialised SigLIP tower of ``shapes`` with SigLIP's image processor, saved."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from sim.model.processor import SIGLIP_MEAN, SIGLIP_STD, _TinyProcessor

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(**shapes)
    SiglipVisionModel(cfg).save_pretrained(out / name)
    size = shapes["image_size"]
    _TinyProcessor(size={"height": size, "width": size}, do_resize=True, do_rescale=True, rescale_factor=1 / 255,
                   do_normalize=True, image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD)).save_pretrained(out / name)
    return out / name


def save_llm(name: str, kind: str, shapes: dict, out: Path, seed: int = 1) -> Path:
    """A randomly initialised causal LM (``llama`` or ``qwen2``) of ``shapes``, saved."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    cfg = (LlamaConfig if kind == "llama" else Qwen2Config)(**shapes)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out / name)
    return out / name


def save_tokenizer(out: Path) -> Path:
    """The project's word-level tokenizer of the synthetic data (its ids fit every LLM's embeddings)."""
    from sim.data import synthetic_vocabulary
    from sim.data.tokenizer import build_word_tokenizer

    build_word_tokenizer(synthetic_vocabulary()).save_pretrained(out / "tokenizer")
    return out / "tokenizer"


# ----------------------------------------------------------------------------- one row
def row_config(row: Row, dirs: dict[str, str], towers: dict, batch: int, device: str) -> dict:
    """The run config of one row (kebab-case)."""
    from sim.config.keys import FROM_SCRATCH

    t = towers[row.tower]
    k = t["num_hidden_layers"] // 2
    over = dict(row.overrides)
    if over.get("align-batch-size") == 0:
        over["align-batch-size"] = batch
    return {
        **FROM_SCRATCH, "vision-tower": dirs[row.tower], "llm": dirs[row.llm], "tokenizer": dirs["tokenizer"],
        "image-size": t["image_size"], "dataset": "synthetic", "num-samples": 16, "test-fraction": 0.25,
        "num-server-rounds": 1, "local-steps": 1, "steps-per-exchange": 1, "batch-size": batch, "warmup-steps": 0,
        "compressor": "rdfsq", "bits": BITS, "rdfsq-stats": "per-dim", "rdfsq-send-range": True,
        "split-point": "connector" if row.split == "connector" else f"vit-ln1:{k}", "residual-mode": "rebuild",
        "train-vision-tower": "false", "checkpoint": False, "device": device,
        "client-cpus": float(os.cpu_count() or 1),  # the in-process client computes with every core, as the server
        **over,
    }


def measure(config: dict) -> dict:
    """One split step of ``config`` through the round engine; bytes against the formula."""
    import torch

    from sim.config import SplitConfig
    from sim.model import image_token_count, stream_width
    from sim.model.device import client_device
    from sim.training.client import client_runtime, micro_batch
    from sim.training.reference import run_reference
    from sim.wire.messages import TRAIN

    cfg = SplitConfig.from_run_config(config)
    load = os.getloadavg()[0]
    dev = client_device(cfg)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    res = run_reference(cfg, num_partitions=1, evaluate_rounds=False)
    total_s = time.perf_counter() - t0
    rep = res.reports[0]
    up = [r for r in res.ledger.rows if r.direction == "up" and r.kind == TRAIN and r.feature_bytes > 0]
    samples = sum(r.samples for r in up)
    B, N, D = cfg.batch_size_at(1), image_token_count(cfg), stream_width(cfg, "image")
    rt = client_runtime(cfg, 0, 1)
    T = sum(len(rt.data.ids[i]) for i in micro_batch(rt, 1, 0))
    feat_formula = (math.ceil(B * N * D * BITS / 8) + 4 * D) / B
    text_formula = (2 * T + 2 * B + math.ceil(T / 8)) / B
    feat = sum(r.feature_bytes for r in up) / samples
    total = sum(r.payload_bytes for r in up) / samples
    def params(m, trainable: bool) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)

    client = rt.model
    return {
        "loss": res.step_losses[0], "N": N, "D": D, "B": B, "text_tokens": T,
        "uplink_feature_bytes_per_sample": feat, "feature_formula": feat_formula, "feature_ratio": feat / feat_formula,
        "uplink_bytes_per_sample": total, "total_formula": feat_formula + text_formula,
        "total_ratio": total / (feat_formula + text_formula),
        "step_s": rep.train_s, "client_s": rep.client_compute_s, "build_s": total_s - rep.train_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "gpu_peak_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else float("nan"),
        "load_1min": load, "device": str(dev),
        "client_params_m": params(client, False) / 1e6, "client_trainable_m": params(client, True) / 1e6,
        "server_params_m": params(res.server.model, False) / 1e6,
        "server_trainable_m": params(res.server.model, True) / 1e6,
    }


def _child(argv: list[str]) -> int:
    """``python -m experiments.real_size --child build|row JSON``: one build or row in this interpreter."""
    what, spec = argv[0], json.loads(argv[1])
    if what == "build":
        out = Path(spec["out"])
        if spec["kind"] == "tower":
            save_tower(spec["name"], spec["shapes"], out)
        else:
            save_llm(spec["name"], spec["kind"], spec["shapes"], out)
        print(json.dumps({"ok": True}))
    else:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(measure(spec)))
    return 0


def _in_child(what: str, spec: dict, timeout: float = 3600) -> dict:
    cmd = [sys.executable, "-m", "experiments.real_size", "--child", what, json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the table
def run(quick: bool, out: Path, batch: int = 1, device: str = "cpu", workdir: Path | None = None,
        rows: list[Row] | None = None) -> pd.DataFrame:
    """Build the models (once each), measure every row, write ``real_size.{csv,md}`` into ``out``."""
    towers, llms = (QUICK_TOWERS, QUICK_LLMS) if quick else (TOWERS, LLMS)
    rows = rows if rows is not None else (quick_plan() if quick else plan())
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="real-size-", dir=workdir) as tmp:
        root = Path(tmp)
        dirs = {"tokenizer": str(save_tokenizer(root))}
        for name in sorted({r.tower for r in rows}):
            spec = {"out": tmp, "name": name, "kind": "tower", "shapes": towers[name]}
            save_tower(name, towers[name], root) if quick else _in_child("build", spec)
            dirs[name] = str(root / name)
        for name in sorted({r.llm for r in rows}):
            kind, shapes = llms[name]
            spec = {"out": tmp, "name": name, "kind": kind, "shapes": shapes}
            save_llm(name, kind, shapes, root) if quick else _in_child("build", spec)
            dirs[name] = str(root / name)
        results = []
        for row in rows:
            config = row_config(row, dirs, towers, batch, device)
            head = {"tower": row.tower, "llm": row.llm, "split": config["split-point"], "option": row.option}
            if quick:
                m = measure(config)
            else:  # a full-size row that fails (out of memory, ...) is reported, and the others still run
                try:
                    m = _in_child("row", config)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    results.append({**head, "error": str(err)[-500:]})
                    print(f"{row.tower} x {row.llm} {config['split-point']} [{row.option}]: FAILED {err}", flush=True)
                    continue
            results.append({**head, **m})
            print(f"{row.tower} x {row.llm} {config['split-point']} [{row.option}]: {m['step_s']:.1f} s, "
                  f"{m['peak_rss_gb']:.2f} GB, features x{m['feature_ratio']:.4f}", flush=True)
    df = pd.DataFrame(results)
    cmd = "python -m experiments.bench --real-size" + (" --quick" if quick else "") + (
        f" --batch-size {batch}" if batch != 1 else "")
    write_report(df, out, cmd, time.perf_counter() - t_start, quick)
    return df


def machine_info() -> dict:
    """What the report says of the machine (as ``experiments.bench``'s, which imports this module)."""
    import platform

    import flwr
    import torch

    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "flwr": flwr.__version__,
        "cuda": torch.version.cuda or "none", "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write_report(df: pd.DataFrame, out: Path, command: str, wall_s: float, quick: bool) -> None:
    from .common import table_cell as _fmt

    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "real_size.csv", index=False)
    info = machine_info()
    ok = df.dropna(subset=["feature_ratio"]) if "feature_ratio" in df else df.iloc[:0]
    worst = float((ok[["feature_ratio", "total_ratio"]] - 1).abs().max().max()) if len(ok) else float("nan")
    cols = ["tower", "llm", "split", "option", "N", "D", "B", "uplink_feature_bytes_per_sample", "feature_formula",
            "feature_ratio", "uplink_bytes_per_sample", "total_formula", "total_ratio", "peak_rss_gb", "gpu_peak_gb",
            "step_s", "client_s", "load_1min", "client_trainable_m", "server_trainable_m", "loss"]
    lines = [
        "# Real-size split steps" + (" (--quick: shrunken shapes)" if quick else ""), "",
        f"Command: `{command}` ({wall_s / 60:.1f} min). Machine: " + ", ".join(f"{k} {v}" for k, v in info.items())
        + f"; device {', '.join(sorted(set(df['device'].dropna()))) if 'device' in df else '?'}.",
        "",
        "One split step per row (one client, one micro-batch, one round: encode, uplink, the LLM step, the gradient "
        "downlink, the client's recompute and backward, FedAvg) through the real round engine, client handlers, "
        f"codec (RD-FSQ, b = {BITS}, clip range sent), wire and ledger; experiments/real_size.py has the details. "
        "Models: " + ", ".join(f"`{k}` (hub `{v}`)" for k, v in HUB_IDS.items()) + ", built from their real "
        "configurations" + (" (shrunken here)" if quick else "") + ", randomly initialised, saved and loaded through "
        "`vision-tower=<dir>` / `llm=<dir>`.",
        "",
        ("* `uplink_feature_bytes_per_sample` (ledger) against `feature_formula` = N·D·b/8 + 4·D/B (RD-FSQ's fp16 "
         "centre and half-width per dimension, per micro-batch); `uplink_bytes_per_sample` adds the text "
         "(`total_formula` = the features + (2·T + 2·B + ⌈T/8⌉)/B: uint16 ids, lengths, 1-bit loss mask). "
         f"Largest |ratio − 1| over all rows: {worst:.2e} (target ≤ 1 %)."),
        "* `peak_rss_gb`: the row's own interpreter (resource.getrusage), models built and loaded, one step, Adam's "
        "state allocated" + ("; in --quick all rows share one process, so it is that process's peak so far" if quick
                             else "") + ". `gpu_peak_gb`: torch.cuda.max_memory_allocated (n/a on the CPU).",
        ("* `step_s`: the round's train_s (both exchanges, the server step, FedAvg), `client_s` its client part; "
         "`load_1min`: the 1-minute load average when the row started (the machine is shared)."),
        "* `client_trainable_m` / `server_trainable_m`: trainable parameters (millions) of each half.",
        "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
    ]
    for _, r in df.iterrows():
        if "error" in r and isinstance(r["error"], str):
            lines.append(f"| {r['tower']} | {r['llm']} | {r['split']} | {r['option']} | failed: {r['error'][-200:]} |")
            continue
        lines.append("| " + " | ".join("n/a" if c == "gpu_peak_gb" and math.isnan(r[c]) else _fmt(r[c]) for c in cols)
                     + " |")
    (out / "real_size.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m experiments.real_size", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    run(args.quick, Path(args.out), args.batch_size, args.device)
    print((Path(args.out) / "real_size.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
