"""Centralised pretraining of the tiny VLM on the public corpus: no split, no federation.

The model is the one the split runs use (SigLIP tower -> TinyLLaVA connector -> Llama,
:mod:`sim.model.towers`), trained end to end on :mod:`sim.data.public_corpus` with the
same text layout, loss and greedy decoding as split learning (:mod:`sim.data.batches`,
:mod:`sim.training.split_step`): image tokens after the first question, cross-entropy on
the answer tokens, AdamW with linear warm-up and cosine decay. Pixels go through the
tower's image processor, prompts through the tokenizer's chat template, and all three are
saved with the weights, so that ``init=<dir>`` fine-tunes exactly what was pretrained.

Determinism: the corpus, the initialisation and the batch order are functions of the
recipe's seed; with the same recipe, thread count and library versions the run repeats
its losses bitwise and writes the same bytes (tests/test_pretrain.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sim.config import FROM_SCRATCH, SplitConfig
from sim.data.batches import TokenisedExamples, eval_text, pixels, tokenise, train_text
from sim.data.casestudy import CASE_STUDY_VOCABULARIES
from sim.data.public_corpus import (
    PUBLIC_QUESTION_TYPES,
    generate_public_corpus,
    public_vocabulary,
)
from sim.data.tokenizer import DEFAULT_CHAT_TEMPLATE, build_subword_tokenizer
from sim.model import build_llm, build_vision_tower, make_connector, sequence_logits
from sim.model.pretrained import save_checkpoint
from sim.model.processor import image_processor
from sim.model.towers import patch_tokens
from sim.training.schedule import warmup_cosine
from sim.training.split_step import (
    answer_loss,
    first_answer_index,
    image_split,
    server_generate,
)

from .recipe import Recipe

IMAGE_POSITION = "after-question"  # the split runs' default layout (sim.config.keys)
CURVE_FILE = "learning_curve.csv"


class UnsplitVLM(nn.Module):
    """Tower + connector + LLM in one module, with the split server's decoding interface."""

    def __init__(self, tower: nn.Module, connector: nn.Module, llm: nn.Module) -> None:
        super().__init__()
        self.tower, self.connector, self.llm = tower, connector, llm

    def image_embeds(self, px: torch.Tensor) -> torch.Tensor:
        return self.connector(patch_tokens(self.tower, px))

    def sequence_logits(self, img: torch.Tensor, txt: torch.Tensor, split: torch.Tensor | None = None) -> torch.Tensor:
        return sequence_logits(self.llm, img, txt, split)


def model_config(recipe: Recipe) -> SplitConfig:
    """The run config whose ``tiny`` models have the recipe's shape (what the builders read):
    from scratch, so the towers are built from config, not loaded from the default checkpoint."""
    return SplitConfig.from_run_config(FROM_SCRATCH).replace(
        seed=recipe.seed, image_size=recipe.image_size, patch_size=recipe.patch_size, hidden_size=recipe.hidden_size,
        vision_layers=recipe.vision_layers, llm_layers=recipe.llm_layers,
    )


def checkpoint_tokenizer():
    """Word pieces for the public corpus's words and the case studies' task words (what a
    general-purpose tokenizer would know; the pretraining never sees the latter), with
    character fallback for any other text, and a chat template."""
    words = set(public_vocabulary())
    for vocabulary in CASE_STUDY_VOCABULARIES.values():
        words.update(vocabulary())
    return build_subword_tokenizer(sorted(words), chat_template=DEFAULT_CHAT_TEMPLATE)


def corpus(recipe: Recipe, tok) -> tuple[TokenisedExamples, TokenisedExamples, list[str], list[str]]:
    """Tokenised training corpus and test set (the test set follows the training corpus in
    the same seeded stream), and their question types."""
    examples = generate_public_corpus(recipe.num_samples + recipe.test_samples, recipe.seed, recipe.image_size)
    train, test = examples[: recipe.num_samples], examples[recipe.num_samples :]
    return tokenise(train, tok), tokenise(test, tok), [e.qtype for e in train], [e.qtype for e in test]


def lr_at(recipe: Recipe, step: int) -> float:
    return warmup_cosine(recipe.lr, step, recipe.steps, recipe.warmup_steps, recipe.min_lr_ratio)


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) example indices: a fresh seeded permutation every epoch."""
    epochs = -(-steps * batch_size // n)
    rng = np.random.default_rng([seed, 1])
    flat = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return flat[: steps * batch_size].reshape(steps, batch_size)


def train_loss(model: UnsplitVLM, data: TokenisedExamples, idx: np.ndarray, processor, pad_id: int) -> torch.Tensor:
    img = model.image_embeds(pixels(data, idx, processor))
    text = train_text(data, idx, pad_id)
    txt = model.llm.get_input_embeddings()(text.ids)
    split = image_split(IMAGE_POSITION, first_answer_index(text))
    return answer_loss(model.sequence_logits(img, txt, split), text, img.shape[1])


@torch.no_grad()
def evaluate(model: UnsplitVLM, data: TokenisedExamples, qtypes: list[str], processor, tok, limit: int,
             batch_size: int = 64) -> dict[str, float]:
    """Exact match (greedy decoding) overall and per question type on the first ``limit`` test examples."""
    model.eval()
    n = min(limit, len(data))
    prompts, answers = eval_text(data, np.arange(n))
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        img = model.image_embeds(pixels(data, idx, processor))
        split = image_split(IMAGE_POSITION, torch.as_tensor(data.first_turn_len[idx]))
        max_new = max(len(answers[i]) for i in idx) + 1
        pred = server_generate(model, img, [prompts[i] for i in idx], tok.eos_token_id, tok.pad_token_id, max_new, split)
        for i, p in zip(idx, pred):
            hits[qtypes[i]].append(list(p) == [int(a) for a in answers[i]])
    model.train()
    out = {"accuracy": float(np.mean([h for v in hits.values() for h in v]))}
    out.update({f"accuracy_{t}": float(np.mean(hits[t])) for t in PUBLIC_QUESTION_TYPES if hits[t]})
    return out


def pretrain(recipe: Recipe, out: Path, command: list[str] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate, and write the checkpoint directory ``out``; returns the manifest."""
    torch.set_num_threads(recipe.threads)
    cfg = model_config(recipe)
    tok = checkpoint_tokenizer()
    processor = image_processor(cfg)
    train, test, _, test_types = corpus(recipe, tok)
    torch.manual_seed(recipe.seed)
    model = UnsplitVLM(build_vision_tower(cfg), make_connector(recipe.hidden_size, recipe.hidden_size),
                       build_llm(cfg, len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    order = batch_order(len(train), recipe.batch_size, recipe.steps, recipe.seed)
    curve: list[dict[str, float]] = []
    window: list[float] = []
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        loss = train_loss(model, train, order[step], processor, tok.pad_token_id)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step)
        opt.step()
        window.append(float(loss.detach()))
        last = step + 1 == recipe.steps
        if (step + 1) % recipe.eval_every == 0 or last:
            limit = len(test) if last else recipe.curve_samples
            metrics = evaluate(model, test, test_types, processor, tok, limit)
            curve.append({"step": step + 1, "train_loss": float(np.mean(window)), "test_samples": min(limit, len(test)),
                          **metrics})
            window = []
            log(f"step {step + 1}/{recipe.steps}: loss {curve[-1]['train_loss']:.4f}, test exact match "
                f"{metrics['accuracy']:.1%} ({time.perf_counter() - t0:.0f} s)")
    wall = time.perf_counter() - t0
    manifest = {
        "command": " ".join(command if command is not None else sys.argv),
        "recipe": recipe.to_dict(),
        "data": {"corpus": "sim.data.public_corpus.generate_public_corpus", "train_samples": recipe.num_samples,
                 "test_samples": recipe.test_samples, "seed": recipe.seed, "image_size": recipe.image_size,
                 "test_set": "the next test_samples of the same seeded stream"},
        "seed": recipe.seed,
        "steps": recipe.steps,
        "final_metrics": curve[-1],
        "image_position": IMAGE_POSITION,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        "wall_s": round(wall, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_curve(out / CURVE_FILE, curve)
    save_checkpoint(out, model.tower, model.connector, model.llm, tok, processor, manifest)
    return json.loads((out / "manifest.json").read_text())


def _write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    keys = list(dict.fromkeys(k for row in curve for k in row))
    lines = [",".join(keys)] + [",".join(_fmt(row.get(k, "")) for k in keys) for row in curve]
    path.write_text("\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
