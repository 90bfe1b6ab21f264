"""Public pretraining corpus: determinism, answers, type mix, pixels, disjointness from private data."""

import itertools
import re
from collections import Counter

import numpy as np
import pytest

from sim.data import synthetic
from sim.data.public_corpus import (
    BACKGROUND_NAMES,
    BLOCK,
    CAPTION_QUESTION,
    COLOURS,
    DARK_PALETTE,
    PALETTE,
    PLAIN_BACKGROUNDS,
    PUBLIC_ANSWERS,
    PUBLIC_QUESTION_TYPES,
    SHAPES,
    SIZES,
    TEXTURES,
    AmbiguousQuestion,
    PublicObject,
    PublicScene,
    all_public_questions,
    answer_public_question,
    describe_scene,
    generate_public_corpus,
    generate_public_samples,
    gradient_image,
    noise_images,
    public_object_box,
    public_shape_masks,
    public_vocabulary,
    render_public_scene,
    render_public_scenes,
    small_size,
    stripe_width,
)
from sim.data.types import VQAExample

TOKEN = re.compile(r"\w+|[^\w\s]")
PRIVATE_BACKGROUNDS = [np.array(rgb, dtype=np.uint8) for rgb in synthetic.BACKGROUNDS.values()]
PHRASE = rf"a (small|large)( striped)? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"


@pytest.fixture(scope="module")
def samples():
    return generate_public_samples(6000, seed=3)


# ----------------------------------------------------------------------------- determinism
def test_deterministic_bitwise_and_seed_dependent():
    a = generate_public_corpus(300, seed=7, image_size=32)
    b = generate_public_corpus(300, seed=7, image_size=32)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [(x.turns, x.qtype) for x in a] == [(y.turns, y.qtype) for y in b]
    c = generate_public_corpus(300, seed=8, image_size=32)
    assert [x.turns for x in a] != [x.turns for x in c]
    assert sum(np.array_equal(x.image, y.image) for x, y in zip(a, c)) == 0


def test_prefix_stable_across_blocks():
    k, n = BLOCK + 17, 3 * BLOCK + 5
    short, long = generate_public_corpus(k, seed=2), generate_public_corpus(n, seed=2)
    assert len(short) == k and len(long) == n
    assert all(np.array_equal(x.image, y.image) and x.turns == y.turns for x, y in zip(short, long))
    assert generate_public_samples(0, seed=2) == []


def test_texts_do_not_depend_on_image_size():
    small = generate_public_corpus(120, seed=1, image_size=16)
    large = generate_public_corpus(120, seed=1, image_size=64)
    assert [e.turns for e in small] == [e.turns for e in large]


def test_corpus_matches_samples_and_renderer():
    samples = generate_public_samples(200, seed=4)
    corpus = generate_public_corpus(200, seed=4, image_size=32)
    images = render_public_scenes([s.scene for s in samples], 32)
    for s, ex, img in zip(samples, corpus, images):
        assert isinstance(ex, VQAExample) and ex.turns == ((s.question, s.answer),) and ex.qtype == s.qtype
        assert np.array_equal(ex.image, img) and not ex.image.flags.writeable
    assert np.array_equal(render_public_scene(samples[0].scene, 32), images[0])


# ----------------------------------------------------------------------------- texts
def test_answers_rederived_from_scene(samples):
    for s in samples[:3000]:
        assert answer_public_question(s.scene, s.question) == s.answer, s
        cells = [(o.row, o.col) for o in s.scene.objects]
        assert 1 <= len(cells) <= 4 and len(set(cells)) == len(cells)


def test_private_answerer_agrees_on_private_types(samples):
    """The five private types use the private templates: synthetic.answer_question agrees when it can parse."""
    parsed = 0
    for s in samples:
        if s.qtype not in synthetic.QUESTION_TYPES:
            continue
        try:
            got = synthetic.answer_question(s.scene, s.question)
        except AmbiguousQuestion:  # a public-only shape or colour word
            continue
        assert got == s.answer, s
        parsed += 1
    assert parsed > 1000


def test_type_mix_is_uniform(samples):
    counts = Counter(s.qtype for s in samples)
    assert set(counts) == set(PUBLIC_QUESTION_TYPES) and len(PUBLIC_QUESTION_TYPES) == 8
    assert PUBLIC_QUESTION_TYPES[:5] == synthetic.QUESTION_TYPES
    for qtype in PUBLIC_QUESTION_TYPES:
        assert 0.105 < counts[qtype] / len(samples) < 0.145, counts


def test_question_and_answer_format(samples):
    questions = set(all_public_questions())
    assert set(synthetic.all_questions()) <= questions  # private templates are reused verbatim
    for s in samples:
        assert s.question in questions
        if s.qtype == "caption":
            assert s.question == CAPTION_QUESTION
            assert re.fullmatch(rf"{PHRASE}( , {PHRASE})*", s.answer), s.answer
        else:
            assert re.fullmatch(r"[a-z]+( [a-z]+)* \?", s.question), s.question
            assert s.answer in PUBLIC_ANSWERS and re.fullmatch(r"[a-z]+", s.answer)


def test_every_answer_and_attribute_occurs(samples):
    answers = {s.answer for s in samples if s.qtype != "caption"}
    assert answers == set(PUBLIC_ANSWERS)
    objs = [o for s in samples for o in s.scene.objects]
    assert {o.shape for o in objs} == set(SHAPES) and {o.colour for o in objs} == set(COLOURS)
    assert {o.size for o in objs} == set(SIZES) and {o.texture for o in objs} == set(TEXTURES)
    assert {s.scene.background for s in samples} == set(BACKGROUND_NAMES)


def test_caption_grammar_and_order():
    scene = PublicScene("navy", (
        PublicObject("square", "blue", "small", "striped", 1, 2),
        PublicObject("circle", "red", "large", "solid", 0, 1),
        PublicObject("bar", "pink", "large", "striped", 1, 0),
    ))
    want = "a large red circle , a large striped pink bar , a small striped blue square"
    assert describe_scene(scene) == want == answer_public_question(scene, CAPTION_QUESTION)


def test_answerer_on_hand_made_scene_and_ambiguity():
    row = PublicScene("brown", (
        PublicObject("ring", "orange", "small", "solid", 1, 0),
        PublicObject("diamond", "cyan", "large", "striped", 1, 1),
        PublicObject("ring", "green", "large", "solid", 1, 2),
    ))
    assert answer_public_question(row, "what colour is the object left of the diamond ?") == "orange"
    assert answer_public_question(row, "what size is the orange object ?") == "small"
    assert answer_public_question(row, "what texture is the diamond ?") == "striped"
    assert answer_public_question(row, "is the green object striped ?") == "no"
    assert answer_public_question(row, "how many rings are there ?") == "two"
    assert answer_public_question(row, "how many pink objects are there ?") == "zero"
    assert answer_public_question(row, "which column is the cyan object in ?") == "center"
    for bad in ("what colour is the ring ?", "what colour is the object right of the orange object ?",
                "what size is the square ?", "what is this ?"):
        with pytest.raises(AmbiguousQuestion):
            answer_public_question(row, bad)


def test_vocabulary_superset_and_tight(samples):
    vocab = public_vocabulary()
    assert vocab == sorted(set(vocab))
    assert set(synthetic.synthetic_vocabulary()) <= set(vocab)
    used = {t for s in samples for t in TOKEN.findall(s.question) + TOKEN.findall(s.answer)}
    assert used == set(vocab)


# ----------------------------------------------------------------------------- attributes and pixels
def test_attribute_sets_extend_the_private_ones():
    assert len(SHAPES) >= 7 and SHAPES[:4] == synthetic.SHAPES
    assert len(COLOURS) >= 9 and COLOURS[:6] == synthetic.COLOURS
    assert all(PALETTE[c] == rgb for c, rgb in synthetic.PALETTE.items())
    pal = np.array([PALETTE[c] for c in COLOURS], dtype=float)
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(pal, 2)) > 80
    assert SIZES == ("small", "large") and TEXTURES == ("solid", "striped")


def test_shapes_distinct_from_4_px():
    for side in range(4, 90):
        m = public_shape_masks(side)
        assert np.array_equal(m[:4], synthetic.shape_masks(side))
        assert np.array_equal(m[4:], m[4:, :, ::-1]) and np.array_equal(m[4:], m[4:, ::-1])  # symmetric
        for i, j in itertools.combinations(range(len(m)), 2):
            assert m[i].any() and not np.array_equal(m[i], m[j]), (side, SHAPES[i], SHAPES[j])


def test_sizes_at_32_and_64():
    assert (small_size(32), synthetic.object_size(32), stripe_width(32)) == (5, 7, 1)
    assert (small_size(64), synthetic.object_size(64), stripe_width(64)) == (10, 14, 2)


def _expected_patch(obj, image_size, background):
    """The pixels an object's box should hold, from the palette rules (not the renderer)."""
    side = public_object_box(obj, image_size)[2]
    mask = public_shape_masks(side)[SHAPES.index(obj.shape)]
    dark = (np.arange(side) // stripe_width(image_size)) % 2 == 1
    rgb = np.where((obj.texture == "striped") & dark[None, :, None], DARK_PALETTE[obj.colour], PALETTE[obj.colour])
    return mask, np.where(mask[..., None], rgb, background).astype(np.uint8)


@pytest.mark.parametrize("size", [32, 64])
def test_rendered_pixels_follow_the_rules(size):
    samples = generate_public_samples(300, seed=5)
    scenes = [s.scene for s in samples]
    images = render_public_scenes(scenes, size)
    backgrounds = render_public_scenes([sc._replace(objects=()) for sc in scenes], size)
    assert images.shape == (300, size, size, 3) and images.dtype == np.uint8
    centres = 0
    for sc, img, bg in zip(scenes, images, backgrounds):
        covered = np.zeros((size, size), dtype=bool)
        for o in sc.objects:
            y, x, side = public_object_box(o, size)
            mask, want = _expected_patch(o, size, bg[y : y + side, x : x + side])
            assert np.array_equal(img[y : y + side, x : x + side], want), o
            assert not (covered[y : y + side, x : x + side] & mask).any()  # objects never overlap
            covered[y : y + side, x : x + side] |= mask
            if o.size == "large" and o.texture == "solid" and o.shape != "ring":
                assert tuple(img[y + side // 2, x + side // 2]) == PALETTE[o.colour]
                centres += 1
        assert np.array_equal(img[~covered], bg[~covered])
    assert centres > 50


def test_small_objects_are_centred_and_jitter_at_most_one_pixel():
    off = synthetic._layout(32)[2]
    for jy in (-1.0, 0.0, 1.0):
        y, x, side = public_object_box(PublicObject("square", "red", "small", "solid", 0, 0, jy, 0.0), 32)
        assert side == 5 and x == off + 1 and y - (off + 1) == int(jy)
        assert off <= y and y + side <= off + 8 - 1  # leaves the private 1 px gap


@pytest.mark.parametrize("size", [16, 18, 32, 64, 384])
def test_no_background_pixel_is_a_grey_level(size):
    plain = [np.broadcast_to(np.array(rgb, dtype=np.uint8), (size, size, 3)) for rgb in PLAIN_BACKGROUNDS.values()]
    noise = noise_images(size, [1, 12345, 2**31 - 1])
    for img in [*plain, gradient_image(size), *noise]:
        assert not ((img[..., 0] == img[..., 1]) & (img[..., 1] == img[..., 2])).any()
    assert np.abs(noise.astype(int) - np.array([30, 40, 64])).max() <= 6
    assert len({n.tobytes() for n in noise}) == 3


@pytest.mark.parametrize("size", [32, 64])
def test_margin_never_private_background(size):
    images = np.stack([e.image for e in generate_public_corpus(400, seed=9, image_size=size)])
    off = synthetic._layout(size)[2]
    margin = np.ones((size, size), dtype=bool)
    margin[off : size - off, off : size - off] = False
    assert off > 0
    px = images[:, margin]
    for rgb in PRIVATE_BACKGROUNDS:
        assert not (px == rgb).all(-1).any()


def test_no_public_image_equals_a_private_one():
    public = {e.image.tobytes() for e in generate_public_corpus(2000, seed=0, image_size=32)}
    for seed in (0, 1):
        private = {e.image.tobytes() for e in synthetic.generate_synthetic_vqa(500, seed, 32)}
        assert not public & private


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("size", [8, 15, 385, 32.0])
def test_rejects_unsupported_size(size):
    with pytest.raises(ValueError, match="image_size"):
        generate_public_corpus(2, seed=0, image_size=size)


@pytest.mark.parametrize("kwargs", [{"num_samples": -1, "seed": 0}, {"num_samples": 2, "seed": -1},
                                    {"num_samples": 2.5, "seed": 0}, {"num_samples": 2, "seed": "x"},
                                    {"num_samples": True, "seed": 0}])
def test_rejects_bad_counts_and_seeds(kwargs):
    with pytest.raises(ValueError):
        generate_public_samples(**kwargs)
    with pytest.raises(ValueError):
        generate_public_corpus(**kwargs)


def test_rejects_bad_scenes():
    with pytest.raises(ValueError, match="background"):
        render_public_scenes([PublicScene("black", ())], 32)
    with pytest.raises(ValueError, match="attribute"):
        render_public_scenes([PublicScene("navy", (PublicObject("star", "red", "small", "solid", 0, 0),))], 32)
    with pytest.raises(ValueError, match="noise_seed"):
        noise_images(32, [-1])
