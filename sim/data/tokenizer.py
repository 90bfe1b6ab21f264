"""Word-level tokenizer built offline with Hugging Face ``tokenizers``.

``tokenizer=auto`` builds a deterministic word-level vocabulary from the dataset's
text (for the synthetic and case-study sets, from their closed vocabularies, so
every party derives the same table without seeing data) and wraps it as
``PreTrainedTokenizerFast``; the run saves it with ``save_pretrained``. Any other value is a local directory or
hub id loaded with ``AutoTokenizer.from_pretrained``.

:func:`build_subword_tokenizer` is the open-vocabulary variant for a pretrained
checkpoint: a fixed WordPiece table (known words whole, anything else spelled in
characters), optionally with a chat template (:data:`DEFAULT_CHAT_TEMPLATE`).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sim.config import SplitConfig

from . import CASE_STUDY_VOCABULARIES, load_examples, synthetic_vocabulary

SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
CHAT_MARKERS = ("<user>", "<assistant>")
# One user turn -> "<user> question <assistant>"; an assistant turn -> "<assistant> answer <eos>".
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<assistant> {{ m['content'] }} {{ eos_token }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
_CHARS = string.ascii_lowercase + string.digits + string.punctuation


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


def build_subword_tokenizer(words: Iterable[str], chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A deterministic WordPiece tokenizer (no training): every given word is one token and
    any other lowercase ASCII text is spelled in characters (``nuclei`` -> ``n ##u ##c ##l ##e ##i``).

    Vocabulary, in this order: :data:`SPECIALS`; with a ``chat_template``, the chat markers
    :data:`CHAT_MARKERS` (special tokens, never split); the sorted given words (lowercased,
    split like the input, so whole texts may be given); every character of
    ``ascii_lowercase + digits + punctuation``; and each of those characters' ``##``
    continuation form (punctuation included, so runs such as ``?!`` or ``a_b``, which the
    pre-tokenizer keeps together, do not fall back to ``<unk>``). Lowercase normaliser,
    ``Whitespace`` pre-tokenizer, WordPiece decoder."""
    pre = pre_tokenizers.Whitespace()
    norm = normalizers.Lowercase()
    known = sorted({w for text in words for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))})
    specials = [*SPECIALS.values(), *(CHAT_MARKERS if chat_template is not None else ())]
    vocab: dict[str, int] = {}
    for t in [*specials, *known, *_CHARS, *(f"##{c}" for c in _CHARS)]:
        vocab.setdefault(t, len(vocab))
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token=SPECIALS["unk_token"], max_input_chars_per_word=100))
    core.normalizer = norm
    core.pre_tokenizer = pre
    core.decoder = decoders.WordPiece()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIALS)
    if chat_template is not None:
        tok.add_special_tokens({"additional_special_tokens": list(CHAT_MARKERS)})
        tok.chat_template = chat_template
    return tok


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """Load a pretrained tokenizer; make sure it has pad and eos tokens."""
    tok = AutoTokenizer.from_pretrained(ref)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {ref!r} has no eos token; answers need one to stop generation")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=8)
def _cached(tokenizer: str, dataset: str, data_path: str, image_size: int, num_samples: int, seed: int, on_bad: str,
            outside_ok: bool):
    if tokenizer != "auto":
        return load_tokenizer(tokenizer)
    if dataset == "synthetic":
        return build_word_tokenizer(synthetic_vocabulary())
    if dataset in CASE_STUDY_VOCABULARIES:
        return build_word_tokenizer(CASE_STUDY_VOCABULARIES[dataset]())
    examples = load_examples(dataset, data_path, image_size, num_samples, seed, on_bad, outside_ok)
    return build_word_tokenizer(text for ex in examples for turn in ex.turns for text in turn)


def get_tokenizer(cfg: SplitConfig) -> PreTrainedTokenizerBase:
    """``tokenizer=auto``: a word-level table from the dataset's text; else from_pretrained."""
    return _cached(cfg.tokenizer_source, cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed,
                   cfg.on_bad_record, cfg.data_allow_outside_paths)
