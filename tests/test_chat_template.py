"""Chat templates in batches.tokenise, and the deterministic subword tokenizer."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from sim.data import synthetic_vocabulary
from sim.data.batches import eval_text, tokenise
from sim.data.tokenizer import (
    CHAT_MARKERS, DEFAULT_CHAT_TEMPLATE, build_subword_tokenizer, build_word_tokenizer, load_tokenizer,
)
from sim.data.types import VQAExample

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TEXTS = ["what colour is the circle", "red", "how many squares are there", "two", "is it left", "yes"]


def _image() -> np.ndarray:
    return np.zeros((8, 8, 3), np.uint8)


EXAMPLES = [
    VQAExample(_image(), (("what colour is the circle", "red"),), "colour"),
    VQAExample(_image(), (("how many squares are there", "two"), ("is it left", "yes")), "count"),
]


def _word_tok(template: str | None = TEMPLATE):
    tok = build_word_tokenizer(TEXTS)
    if template is not None:
        tok.add_special_tokens({"additional_special_tokens": list(CHAT_MARKERS)})  # markers are single tokens
        tok.chat_template = template
    return tok


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("make", [_word_tok, lambda: build_subword_tokenizer(TEXTS, TEMPLATE),
                                  lambda: build_subword_tokenizer(TEXTS, DEFAULT_CHAT_TEMPLATE)])
def test_template_renders_each_human_turn(make):
    tok = make()
    user, assistant = tok.convert_tokens_to_ids(list(CHAT_MARKERS))
    eos = tok.eos_token_id
    data = tokenise(EXAMPLES, tok)
    # one turn: <user> question <assistant> answer <eos>; the mask on answer + eos only
    q, a = _ids(tok, "what colour is the circle"), _ids(tok, "red")
    assert data.ids[0].tolist() == [user, *q, assistant, *a, eos]
    assert data.loss_mask[0].tolist() == [False] * (len(q) + 2) + [True] * (len(a) + 1)
    assert data.first_turn_len[0] == data.prompt_len[0] == len(q) + 2
    # two turns: each rendered the same way, concatenated
    q1, a1, q2, a2 = (_ids(tok, t) for t in ("how many squares are there", "two", "is it left", "yes"))
    h1, h2 = [user, *q1, assistant], [user, *q2, assistant]
    assert data.ids[1].tolist() == [*h1, *a1, eos, *h2, *a2, eos]
    assert data.loss_mask[1].tolist() == [False] * len(h1) + [True] * (len(a1) + 1) + [False] * len(h2) + [True] * (len(a2) + 1)
    assert data.first_turn_len[1] == len(h1)
    assert data.prompt_len[1] == len(h1) + len(a1) + 1 + len(h2)
    prompts, answers = eval_text(data, np.arange(2))
    assert prompts[1].tolist() == [*h1, *a1, eos, *h2] and prompts[1][-1] == assistant
    assert [x.tolist() for x in answers] == [a, a2]
    for ids, mask in zip(data.ids, data.loss_mask):  # every masked token is an answer or eos, never a marker
        assert not np.isin(ids[mask], [user, assistant]).any()


def test_without_template_unchanged():
    tok = _word_tok(template=None)
    assert not tok.chat_template
    data = tokenise(EXAMPLES, tok)
    eos = tok.eos_token_id
    q1, a1, q2, a2 = (_ids(tok, t) for t in ("how many squares are there", "two", "is it left", "yes"))
    assert data.ids[1].tolist() == [*q1, *a1, eos, *q2, *a2, eos]
    assert data.first_turn_len[1] == len(q1) and data.prompt_len[1] == len(q1) + len(a1) + 1 + len(q2)
    assert data.loss_mask[1].tolist() == [False] * len(q1) + [True] * (len(a1) + 1) + [False] * len(q2) + [True] * (len(a2) + 1)


def test_template_survives_save_and_load(tmp_path):
    """A checkpoint directory's tokenizer (tokenizer=<dir>) brings its template."""
    tok = _word_tok()
    tok.save_pretrained(tmp_path)
    for back in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(str(tmp_path))):
        assert back.chat_template == TEMPLATE
        want, got = tokenise(EXAMPLES, tok), tokenise(EXAMPLES, back)
        assert all(np.array_equal(x, y) for x, y in zip(got.ids, want.ids))
        assert np.array_equal(got.first_turn_len, want.first_turn_len)


# ----------------------------------------------------------------------------- subword tokenizer
def test_subword_known_words_whole_unknown_spelled():
    words = synthetic_vocabulary()
    tok = build_subword_tokenizer(words)
    for w in ("what", "colour", "circle", "red"):
        ids = _ids(tok, w)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [w]
    ids = _ids(tok, "nuclei")
    assert len(ids) > 1 and tok.unk_token_id not in ids
    assert tok.decode(ids) == "nuclei"
    text = "what colour are the nuclei? 42 cells, a_b!"
    ids = _ids(tok, text.upper())  # lowercased by the normaliser
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert set(CHAT_MARKERS).isdisjoint(tok.get_vocab())  # no template: no markers


def test_subword_is_deterministic():
    words = ["zebra", "apple", "Apple", "mango"]
    a, b = build_subword_tokenizer(words), build_subword_tokenizer(list(reversed(words)))
    assert a.get_vocab() == b.get_vocab()
    vocab = a.get_vocab()
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:7] == [
        "<pad>", "<unk>", "<bos>", "<eos>", "apple", "mango", "zebra"]


def test_subword_save_load_keeps_vocab_and_template(tmp_path):
    tok = build_subword_tokenizer(TEXTS, DEFAULT_CHAT_TEMPLATE)
    assert set(CHAT_MARKERS) <= set(tok.all_special_tokens)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.get_vocab() == tok.get_vocab()
    assert back.chat_template == DEFAULT_CHAT_TEMPLATE
    text = "<user> what colour is the nuclei <assistant>"
    assert _ids(back, text) == _ids(tok, text)
    assert _ids(back, "<user>") == [tok.convert_tokens_to_ids("<user>")]
    for t in (tok, back):
        assert all(np.array_equal(x, y) for x, y in zip(tokenise(EXAMPLES, t).ids, tokenise(EXAMPLES, tok).ids))
