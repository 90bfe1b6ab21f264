"""Word-level tokenizer built offline with Hugging Face ``tokenizers``.

``tokenizer=auto`` builds a deterministic word-level vocabulary from the dataset's
text (for the synthetic and case-study sets, from their closed vocabularies, so
every party derives the same table without seeing data) and wraps it as
``PreTrainedTokenizerFast``; the run saves it with ``save_pretrained``. Any other value is a local directory or
hub id loaded with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sim.config import SplitConfig

from . import CASE_STUDY_VOCABULARIES, load_examples, synthetic_vocabulary

SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is the sorted set of words in ``texts``."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text)})
    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk_token"]))
    core.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIALS)


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """Load a pretrained tokenizer; make sure it has pad and eos tokens."""
    tok = AutoTokenizer.from_pretrained(ref)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {ref!r} has no eos token; answers need one to stop generation")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=8)
def _cached(tokenizer: str, dataset: str, data_path: str, image_size: int, num_samples: int, seed: int, on_bad: str):
    if tokenizer != "auto":
        return load_tokenizer(tokenizer)
    if dataset == "synthetic":
        return build_word_tokenizer(synthetic_vocabulary())
    if dataset in CASE_STUDY_VOCABULARIES:
        return build_word_tokenizer(CASE_STUDY_VOCABULARIES[dataset]())
    examples = load_examples(dataset, data_path, image_size, num_samples, seed, on_bad)
    return build_word_tokenizer(text for ex in examples for turn in ex.turns for text in turn)


def get_tokenizer(cfg: SplitConfig) -> PreTrainedTokenizerBase:
    """``tokenizer=auto``: a word-level table from the dataset's text; else from_pretrained."""
    return _cached(cfg.tokenizer, cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed, cfg.on_bad_record)
