"""Tokenised local data and micro-batch collation.

Text layout of one sample (image tokens first, the ``<image>`` placeholder removed)::

    [image tokens: N] [human_1] [gpt_1] <eos> [human_2] [gpt_2] <eos> ...

The loss mask covers every gpt turn and its ``<eos>``; evaluation prompts with
everything before the final gpt turn and scores the generated final answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .types import VQAExample

QTYPES = ("colour", "shape", "count", "position", "relational", "llava")


@dataclass(frozen=True)
class TokenisedExamples:
    """A dataset ready for batching: images as uint8 tensors, text as id arrays."""

    images: torch.Tensor  # (M,3,H,W) uint8
    ids: tuple[np.ndarray, ...]  # full text ids per example
    loss_mask: tuple[np.ndarray, ...]  # bool, True on answer tokens
    prompt_len: np.ndarray  # (M,) tokens before the final answer
    first_turn_len: np.ndarray  # (M,) tokens of the first question (the image goes after it)
    qtype: np.ndarray  # (M,) index into QTYPES

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TextBatch:
    """Right-padded text of a micro-batch."""

    ids: torch.Tensor  # (B,T) int64, padded with pad id
    lens: torch.Tensor  # (B,) int64
    loss_mask: torch.Tensor  # (B,T) bool


def tokenise(examples: list[VQAExample], tok: PreTrainedTokenizerBase) -> TokenisedExamples:
    """Tokenise every turn; the answer of each gpt turn is followed by eos."""
    ids, masks, prompt_len, first_len, qtypes = [], [], [], [], []
    eos = tok.eos_token_id
    for ex in examples:
        seq: list[int] = []
        mask: list[bool] = []
        for i, (human, gpt) in enumerate(ex.turns):
            h = tok(human, add_special_tokens=False).input_ids
            g = tok(gpt, add_special_tokens=False).input_ids + [eos]
            if i == 0:
                first_len.append(len(h))
            if i == len(ex.turns) - 1:
                prompt_len.append(len(seq) + len(h))
            seq += h + g
            mask += [False] * len(h) + [True] * len(g)
        ids.append(np.asarray(seq, dtype=np.int64))
        masks.append(np.asarray(mask, dtype=bool))
        qtypes.append(QTYPES.index(ex.qtype) if ex.qtype in QTYPES else QTYPES.index("llava"))
    images = torch.from_numpy(np.stack([ex.image for ex in examples])).permute(0, 3, 1, 2).contiguous()
    return TokenisedExamples(
        images, tuple(ids), tuple(masks), np.asarray(prompt_len), np.asarray(first_len), np.asarray(qtypes)
    )


def pixels(data: TokenisedExamples, idx: np.ndarray) -> torch.Tensor:
    """(B,3,H,W) float pixels normalised to [-1, 1] (SigLIP's mean = std = 0.5)."""
    return data.images[torch.from_numpy(np.asarray(idx))].float().div_(127.5).sub_(1.0)


def pad_text(seqs: list[np.ndarray], masks: list[np.ndarray], pad_id: int) -> TextBatch:
    lens = [len(s) for s in seqs]
    T = max(lens)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.from_numpy(s)
        mask[i, : len(m)] = torch.from_numpy(m)
    return TextBatch(ids, torch.tensor(lens), mask)


def train_text(data: TokenisedExamples, idx: np.ndarray, pad_id: int) -> TextBatch:
    return pad_text([data.ids[i] for i in idx], [data.loss_mask[i] for i in idx], pad_id)


def eval_text(data: TokenisedExamples, idx: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Prompts (everything before the final answer) and final answers (without eos)."""
    prompts = [data.ids[i][: data.prompt_len[i]] for i in idx]
    answers = [data.ids[i][data.prompt_len[i] : -1] for i in idx]
    return prompts, answers


def step_indices(num_examples: int, batch_size: int, seed: int, partition: int, rnd: int, step: int) -> np.ndarray:
    """Indices of micro-batch ``step`` of round ``rnd``: a seeded per-round permutation, cycled."""
    perm = _round_permutation(num_examples, seed, partition, rnd)
    start = step * batch_size
    return perm[np.arange(start, start + batch_size) % num_examples]


@functools.lru_cache(maxsize=64)
def _round_permutation(n: int, seed: int, partition: int, rnd: int) -> np.ndarray:
    return np.random.default_rng([seed, partition, rnd]).permutation(n)
