"""Split fine-tuning from the pretrained checkpoint against centralised fine-tuning of it.

For each seed, on the run config given (the default: the shipped checkpoint, RD-FSQ at 2
bits on the default case study, 4 clients):

* ``zero_shot``: the checkpoint on the clients' test sets, before any fine-tuning and
  without a compressor (tower -> connector -> LLM);
* ``inserted``: the same right after the compressor is inserted (round 0 of the split run);
* ``split``: the split run itself (the in-process reference, whose losses equal the
  Flower simulation's bitwise; docs/architecture.md), accuracy per round;
* ``centralized``: centralised fine-tuning of the same checkpoint, no split and identity
  features: one model trained on exactly the split run's micro-batches (all clients'
  concatenated, in the same order), with the same steps, stages, learning rates and
  frozen parts, evaluated on the same test examples;

and the retention ``split / centralized`` (Quantized-TinyLLaVA, arXiv 2511.23402, Tables
3-4), paired by seed: mean ± standard error of the paired differences.

    python -m experiments.foundation --seeds 0 1 2 --out experiments/results/foundation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sim.config import SplitConfig
from sim.data import load_examples
from sim.data.batches import eval_text, pixels, step_indices, train_text
from sim.data.tokenizer import get_tokenizer
from sim.model import build_client_model, build_server_model, set_stage
from sim.model.processor import image_processor
from sim.run.cli import parse_overrides
from sim.training.client import client_runtime
from sim.training.reference import evaluate_global, run_reference
from sim.training.schedule import lr_at, make_optimiser, set_lr
from sim.training.server import build_server, initial_client_weights
from sim.training.split_step import (
    answer_loss,
    first_answer_index,
    image_split,
    server_generate,
    trainable,
)

CLIENTS = 4


class Centralized:
    """The checkpoint fine-tuned without a split: the client half's tower and connector and
    the server half's LLM as one model, no compressor, one optimiser."""

    def __init__(self, cfg: SplitConfig, clients: int) -> None:
        self.cfg = cfg.replace(compressor="identity", bits=16)
        self.tok = get_tokenizer(self.cfg)
        self.runtimes = [client_runtime(self.cfg, p, clients) for p in range(clients)]
        self.data = self.runtimes[0].data
        self.processor = image_processor(self.cfg)
        torch.manual_seed(cfg.seed)
        self.client = build_client_model(self.cfg, len(self.tok))
        self.server = build_server_model(self.cfg, len(self.tok))
        self.params = trainable(self.client.tower) + trainable(self.client.connector) + self.server.llm_finetuned
        self.opt = make_optimiser(self.cfg, self.params)
        examples = load_examples(cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed, cfg.on_bad_record,
            cfg.data_allow_outside_paths)
        self.qtypes = [e.qtype for e in examples]
        self.test_idx = np.concatenate([rt.test_idx for rt in self.runtimes])

    def step_batch(self, rnd: int, step: int) -> np.ndarray:
        """The split run's server micro-batch: every client's micro-batch, in partition order."""
        bs = self.cfg.batch_size_at(rnd)
        return np.concatenate([rt.train_idx[step_indices(len(rt.train_idx), bs, self.cfg.seed, rt.partition, rnd, step)]
                               for rt in self.runtimes])

    def train_step(self, rnd: int, step: int) -> float:
        idx = self.step_batch(rnd, step)
        img = self.client.features(pixels(self.data, idx, self.processor))
        text = train_text(self.data, idx, self.tok.pad_token_id)
        txt = self.server.text_embeds(text.ids)
        split = image_split(self.cfg.image_position, first_answer_index(text))
        loss = answer_loss(self.server.sequence_logits(img, txt, split), text, img.shape[1])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        set_lr(self.opt, lr_at(self.cfg, rnd, step))
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact match on the clients' test sets (the split run's evaluation examples)."""
        prompts, answers = eval_text(self.data, self.test_idx)
        hits: dict[str, list[bool]] = {}
        bs = self.cfg.eval_batch_size
        for start in range(0, len(self.test_idx), bs):
            idx = self.test_idx[start:start + bs]
            img = self.client.features(pixels(self.data, idx, self.processor))
            split = image_split(self.cfg.image_position, torch.as_tensor(self.data.first_turn_len[idx]))
            pred = server_generate(self.server, img, prompts[start:start + bs], self.tok.eos_token_id,
                                   self.tok.pad_token_id, self.cfg.max_answer_tokens, split)
            for i, p, a in zip(idx, pred, answers[start:start + bs]):
                hits.setdefault(self.qtypes[i], []).append(list(p) == [int(t) for t in a])
        out = {"accuracy": float(np.mean([h for v in hits.values() for h in v]))}
        out.update({f"accuracy_{k}": float(np.mean(v)) for k, v in sorted(hits.items())})
        return out

    def run(self) -> list[dict[str, float]]:
        """Accuracy after every round (round 0: the checkpoint as it is)."""
        rows = [{"round": 0, **self.evaluate()}]
        for rnd in range(1, self.cfg.num_server_rounds + 1):
            set_stage(self.server, self.cfg.stage_at(rnd))
            losses = [self.train_step(rnd, s) for s in range(self.cfg.local_steps)]
            rows.append({"round": rnd, "train_loss": float(np.mean(losses)), **self.evaluate()})
        return rows


def inserted_accuracy(cfg: SplitConfig, clients: int) -> float:
    """Accuracy of the split model right after the compressor is inserted (before round 1)."""
    torch.manual_seed(cfg.seed)
    counts = evaluate_global(cfg, build_server(cfg), initial_client_weights(cfg), clients, 1)  # as round 1 evaluates
    correct, total = counts["all"]
    return correct / total


def one_seed(cfg: SplitConfig, clients: int) -> dict:
    t0 = time.perf_counter()
    central = Centralized(cfg, clients).run()
    central_s = time.perf_counter() - t0
    inserted = inserted_accuracy(cfg, clients)
    t0 = time.perf_counter()
    split = run_reference(cfg, clients)
    split_s = time.perf_counter() - t0
    return {
        "seed": cfg.seed, "zero_shot": central[0]["accuracy"], "inserted": inserted,
        "split": split.accuracy[-1], "centralized": central[-1]["accuracy"],
        "split_rounds": split.accuracy, "centralized_rounds": [r["accuracy"] for r in central[1:]],
        "centralized_detail": central, "split_s": round(split_s, 1), "centralized_s": round(central_s, 1),
    }


def paired(rows: list[dict], a: str, b: str) -> tuple[float, float]:
    """Mean and standard error of the paired differences ``a - b`` over seeds."""
    d = np.array([r[a] - r[b] for r in rows])
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def markdown_table(df: pd.DataFrame) -> str:
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def report(rows: list[dict], cfg: SplitConfig, command: str) -> str:
    df = pd.DataFrame([{k: r[k] for k in ("seed", "zero_shot", "inserted", "split", "centralized", "split_s",
                                           "centralized_s")} for r in rows])
    df["retention"] = df["split"] / df["centralized"]
    diff, se = paired(rows, "split", "centralized")
    conv = [abs(r["centralized_rounds"][-1] - r["centralized_rounds"][-2]) for r in rows
            if len(r["centralized_rounds"]) > 1]
    lines = [
        "# Split fine-tuning from the checkpoint vs centralised fine-tuning",
        "",
        f"Command: `{command}`  ",
        f"Config: init `{cfg.init}`, dataset `{cfg.dataset}`, {cfg.compressor} b={cfg.bits}, stage `{cfg.stage}`"
        f" (align-rounds {cfg.align_rounds}), {cfg.num_server_rounds} rounds x {cfg.local_steps} steps, "
        f"{CLIENTS} clients; 1-minute load average at the end {os.getloadavg()[0]:.2f}",
        "",
        markdown_table(df),
        "",
        f"Mean accuracy: split {df['split'].mean():.4f}, centralised {df['centralized'].mean():.4f}, "
        f"retention {df['split'].mean() / df['centralized'].mean():.4f} (mean of {len(df)} seeds).  ",
        f"Paired difference split - centralised: {diff:+.4f} ± {se:.4f} (s.e.).  ",
        f"Centralised convergence: |last - previous round| per seed = "
        f"{', '.join(f'{c:.4f}' for c in conv)}.",
        "",
        "Per round (accuracy):",
        "",
    ]
    for r in rows:
        lines.append(f"- seed {r['seed']}: split {', '.join(f'{a:.3f}' for a in r['split_rounds'])}; "
                     f"centralised {', '.join(f'{a:.3f}' for a in r['centralized_rounds'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--out", default="experiments/results/foundation")
    ap.add_argument("-c", "--config", action="append", metavar="KEY=VALUE", help="override a run-config key")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as each simulated client computes (client-cpus = 1)
    base = SplitConfig.from_run_config(parse_overrides(args.config or []))
    rows = [one_seed(base.replace(seed=s), args.clients) for s in args.seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.foundation " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "foundation.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "foundation.md").write_text(report(rows, base, command))
    print((out / "foundation.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
