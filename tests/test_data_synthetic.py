"""Synthetic VQA generator: determinism, vocabulary, answer correctness, pixels."""

import re
import time
from collections import Counter

import numpy as np
import pytest
from skimage.measure import label

from sim.data import ANSWERS, QUESTION_TYPES, VQAExample, generate_synthetic_vqa, synthetic_vocabulary
from sim.data.synthetic import (
    BACKGROUNDS,
    PALETTE,
    AmbiguousQuestion,
    Scene,
    SceneObject,
    all_questions,
    answer_question,
    generate_synthetic_samples,
    object_box,
    object_size,
    render_scene,
    render_scenes,
    shape_masks,
)

TOKEN = re.compile(r"\w+|[^\w\s]")


@pytest.fixture(scope="module")
def big() -> list[VQAExample]:
    return generate_synthetic_vqa(6000, seed=3, image_size=32)


def test_deterministic_bitwise():
    a = generate_synthetic_vqa(300, seed=7, image_size=32)
    b = generate_synthetic_vqa(300, seed=7, image_size=32)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [(x.turns, x.qtype) for x in a] == [(y.turns, y.qtype) for y in b]
    c = generate_synthetic_vqa(300, seed=8, image_size=32)
    assert [x.turns for x in a] != [x.turns for x in c]


def test_texts_do_not_depend_on_image_size():
    small = generate_synthetic_vqa(100, seed=1, image_size=16)
    large = generate_synthetic_vqa(100, seed=1, image_size=64)
    assert [e.turns for e in small] == [e.turns for e in large]


def test_vocabulary_covers_all_text_and_is_tight(big):
    vocab = synthetic_vocabulary()
    assert vocab == sorted(set(vocab)) == synthetic_vocabulary()
    used = set()
    for ex in big:
        for human, gpt in ex.turns:
            used |= set(TOKEN.findall(human)) | set(TOKEN.findall(gpt))
    assert used <= set(vocab)
    assert used == set(vocab)  # nothing in the vocabulary is dead weight


def test_question_and_answer_format(big):
    questions = set(all_questions())
    for ex in big:
        assert len(ex.turns) == 1
        q, a = ex.turns[0]
        assert q in questions
        assert re.fullmatch(r"[a-z]+( [a-z]+)* \?", q), q
        assert a in ANSWERS and re.fullmatch(r"[a-z]+", a)
        assert ex.answer == a and ex.qtype in QUESTION_TYPES


def test_type_balance(big):
    counts = Counter(ex.qtype for ex in big)
    assert set(counts) == set(QUESTION_TYPES)
    for qtype in QUESTION_TYPES:
        assert 0.17 < counts[qtype] / len(big) < 0.23, counts


def test_every_answer_occurs(big):
    assert set(ex.answer for ex in big) == set(ANSWERS)


def test_answers_rederived_from_scene():
    samples = generate_synthetic_samples(600, seed=11)
    for s in samples:
        assert answer_question(s.scene, s.question) == s.answer, s
        cells = [(o.row, o.col) for o in s.scene.objects]
        assert 1 <= len(cells) <= 4 and len(set(cells)) == len(cells)


def test_answer_question_rejects_ambiguity():
    two_circles = Scene("black", (SceneObject("circle", "red", 0, 0), SceneObject("circle", "blue", 0, 2)))
    with pytest.raises(AmbiguousQuestion):
        answer_question(two_circles, "what colour is the circle ?")
    row = Scene("black", (SceneObject("square", "red", 1, 0), SceneObject("circle", "blue", 1, 1),
                          SceneObject("cross", "green", 1, 2)))
    assert answer_question(row, "what colour is the object left of the circle ?") == "red"
    with pytest.raises(AmbiguousQuestion):
        answer_question(row, "what colour is the object right of the square ?")
    assert answer_question(row, "which column is the green object in ?") == "right"
    assert answer_question(row, "how many purple objects are there ?") == "zero"


@pytest.mark.parametrize("size", [16, 32, 50, 96])
def test_objects_visible_and_separate(size):
    samples = generate_synthetic_samples(150, seed=5)
    images = render_scenes([s.scene for s in samples], size)
    assert images.dtype == np.uint8 and images.shape == (150, size, size, 3)
    masks = shape_masks(object_size(size))
    for s, img in zip(samples, images):
        covered = np.zeros((size, size), dtype=bool)
        for o in s.scene.objects:
            y, x, side = object_box(o, size)
            assert 0 <= y and y + side <= size and 0 <= x and x + side <= size
            patch = img[y : y + side, x : x + side]
            shape_mask = masks[("circle", "square", "triangle", "cross").index(o.shape)]
            assert (patch[shape_mask] == PALETTE[o.colour]).all()
            covered[y : y + side, x : x + side] |= shape_mask
        assert (img[~covered] == BACKGROUNDS[s.scene.background]).all()
        # each object is its own connected blob of its colour (no touching neighbours)
        for colour, rgb in PALETTE.items():
            n = sum(o.colour == colour for o in s.scene.objects)
            _, found = label((img == rgb).all(-1), connectivity=2, return_num=True)
            assert found == n


@pytest.mark.parametrize("side", [4, 5, 8, 16, 96])
def test_shapes_distinct_at_every_size(side):
    m = shape_masks(side)
    for i in range(len(m)):
        assert m[i].any()
        for j in range(i + 1, len(m)):
            assert not np.array_equal(m[i], m[j])


def test_example_image_properties():
    ex = generate_synthetic_vqa(20, seed=0, image_size=17)
    for e in ex:
        assert e.image.shape == (17, 17, 3) and e.image.dtype == np.uint8
        assert not e.image.flags.writeable
        assert (e.image != e.image[0, 0]).any(-1).sum() >= 8  # at least one object drawn (an X at 4 px has 8 px)
    big = generate_synthetic_vqa(3, seed=0, image_size=384)
    assert big[0].image.shape == (384, 384, 3)
    one = render_scene(generate_synthetic_samples(1, seed=0)[0].scene, 32)
    assert np.array_equal(one, generate_synthetic_vqa(1, seed=0, image_size=32)[0].image)


@pytest.mark.parametrize("size", [8, 15, 385])
def test_rejects_unsupported_size(size):
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_vqa(2, seed=0, image_size=size)


def test_fast_enough():
    t = time.perf_counter()
    ex = generate_synthetic_vqa(10_000, seed=0, image_size=32)
    assert len(ex) == 10_000
    assert time.perf_counter() - t < 5.0  # ~0.3 s on one core; generous for loaded CI
