"""Tokenised local data and micro-batch collation.

Text layout of one sample (image tokens first, the ``<image>`` placeholder removed)::

    [image tokens: N] [human_1] [gpt_1] <eos> [human_2] [gpt_2] <eos> ...

The loss mask covers every gpt turn and its ``<eos>``; evaluation prompts with
everything before the final gpt turn and scores the generated final answer.

With a tokenizer that has a chat template, each ``[human_i]`` is the template's rendering
of that turn alone (``apply_chat_template([{"role": "user", "content": human_i}],
add_generation_prompt=True)``, e.g. ``<user> question <assistant>``); the answers stay
plain ids + ``<eos>``. Pixels come from the vision tower's image processor
(:func:`sim.model.processor.image_processor`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import BaseImageProcessor, PreTrainedTokenizerBase

from .types import VQAExample

QTYPES = ("colour", "shape", "count", "position", "relational", "llava")


# Processed pixels of a whole dataset are cached only up to this size (float32 bytes);
# above it (large images, e.g. a pretrained tower at 384 px) every call processes its batch.
PIXEL_CACHE_MAX_BYTES = 512 * 2**20


@dataclass
class _PixelCache:
    processor: BaseImageProcessor  # held so that its id, the cache key, is not reused
    values: torch.Tensor | None = None  # (M,3,H,W) float32, rows valid where ``done``
    done: torch.Tensor | None = None  # (M,) bool
    disabled: bool = False  # the dataset's processed pixels exceed PIXEL_CACHE_MAX_BYTES


@dataclass(frozen=True)
class TokenisedExamples:
    """A dataset ready for batching: images as uint8 tensors, text as id arrays."""

    images: torch.Tensor  # (M,3,H,W) uint8
    ids: tuple[np.ndarray, ...]  # full text ids per example
    loss_mask: tuple[np.ndarray, ...]  # bool, True on answer tokens
    prompt_len: np.ndarray  # (M,) tokens before the final answer
    first_turn_len: np.ndarray  # (M,) tokens of the first question (the image goes after it)
    qtype: np.ndarray  # (M,) index into QTYPES
    # processed pixels per image processor, filled lazily by :func:`pixels` (not data: no compare/repr)
    _pixel_cache: dict[int, _PixelCache] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TextBatch:
    """Right-padded text of a micro-batch."""

    ids: torch.Tensor  # (B,T) int64, padded with pad id
    lens: torch.Tensor  # (B,) int64
    loss_mask: torch.Tensor  # (B,T) bool

    def to(self, device: torch.device) -> TextBatch:
        """The batch on ``device`` (itself when it is there already)."""
        if self.ids.device == torch.device(device):
            return self
        return TextBatch(self.ids.to(device), self.lens.to(device), self.loss_mask.to(device))


def tokenise(examples: list[VQAExample], tok: PreTrainedTokenizerBase) -> TokenisedExamples:
    """Tokenise every turn; the answer of each gpt turn is followed by eos.

    Without a chat template (``tok.chat_template`` unset) a human turn is its plain ids
    (``add_special_tokens=False``). With one, each human turn is rendered on its own as a
    one-message user conversation with the generation prompt, and the turns are
    concatenated: ``render(h_1) a_1 <eos> render(h_2) a_2 <eos> ...``. (Rendering the
    whole conversation at once would interleave the template's assistant markup with the
    answers and make the loss mask depend on the template; per-turn rendering keeps the
    answers, and the mask on them, exactly as without a template. A template that opens
    with a bos or system prompt repeats it in every turn.) The loss mask covers the
    answers and their eos only; ``first_turn_len`` is the length of the rendered first
    human part and ``prompt_len`` ends at the rendered last one."""
    ids, masks, prompt_len, first_len, qtypes = [], [], [], [], []
    eos = tok.eos_token_id
    human_ids = _chat_human_ids if getattr(tok, "chat_template", None) else _plain_ids
    for ex in examples:
        seq: list[int] = []
        mask: list[bool] = []
        for i, (human, gpt) in enumerate(ex.turns):
            h = human_ids(tok, human)
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


def _plain_ids(tok: PreTrainedTokenizerBase, human: str) -> list[int]:
    return list(tok(human, add_special_tokens=False).input_ids)


def _chat_human_ids(tok: PreTrainedTokenizerBase, human: str) -> list[int]:
    """A human turn rendered by the tokenizer's chat template, up to the assistant's cue."""
    out = tok.apply_chat_template(
        [{"role": "user", "content": human}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(out, Mapping):  # BatchEncoding (transformers 5's default is return_dict=True)
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):  # a batch of one conversation
        out = out[0]
    return [int(t) for t in out]


def process_images(images: torch.Tensor, processor: BaseImageProcessor) -> torch.Tensor:
    """(B,3,H,W) uint8 -> (B,3,H',W') float32 pixel values from ``processor``."""
    if len(images) == 0:
        raise ValueError("no images to process")
    hwc = list(images.permute(0, 2, 3, 1).numpy())
    return torch.as_tensor(processor(images=hwc, return_tensors="pt").pixel_values).float()


def pixels(data: TokenisedExamples, idx: np.ndarray, processor: BaseImageProcessor) -> torch.Tensor:
    """(B,3,H,W) float32 pixel values of examples ``idx``: ``processor(images=<HWC uint8
    arrays>, return_tensors="pt").pixel_values`` (the vision tower's own processor,
    :func:`sim.model.processor.image_processor`; for ``tiny``, ``x / 127.5 - 1``).

    The processor (PIL, per image) costs ~0.2-0.5 ms per 32x32 image against ~2 us for the
    plain formula, and every micro-batch is processed twice (encode, then the recompute),
    so each image's pixel values are cached on ``data`` the first time they are asked for
    (per processor; a processor is deterministic, so the cached values equal a fresh call).
    Only the rows used are filled; a dataset whose processed pixels would exceed
    :data:`PIXEL_CACHE_MAX_BYTES` is processed per call instead. Returns a fresh tensor."""
    idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.int64)
    cache = data._pixel_cache.get(id(processor))
    if cache is None:
        cache = data._pixel_cache[id(processor)] = _PixelCache(processor)
    if cache.disabled:
        return process_images(data.images[idx_t], processor)
    todo = torch.unique(idx_t[~cache.done[idx_t]]) if cache.done is not None else torch.unique(idx_t)
    if len(todo):
        fresh = process_images(data.images[todo], processor)
        if cache.values is None:
            if len(data) * fresh[0].numel() * 4 > PIXEL_CACHE_MAX_BYTES:
                cache.disabled = True
                return fresh[torch.searchsorted(todo, idx_t)]
            cache.values = torch.empty((len(data), *fresh.shape[1:]), dtype=torch.float32)
            cache.done = torch.zeros(len(data), dtype=torch.bool)
        cache.values[todo] = fresh
        cache.done[todo] = True
    return cache.values[idx_t]


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
