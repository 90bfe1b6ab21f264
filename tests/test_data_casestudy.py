"""Case-study datasets from scikit-image images: shapes, determinism, vocabulary, labels re-derived from pixels.

The label rules are re-implemented here from the documented constants (Beer-Lambert
colour deconvolution, skimage's black top-hat, plain means), not imported from the module.
"""

import re
from collections import Counter

import numpy as np
import pytest
from skimage.color import rgb2gray
from skimage.color.colorconv import hed_from_rgb
from skimage.data import lfw_subset
from skimage.morphology import black_tophat, footprint_rectangle

from sim.data import VQAExample
from sim.data.casestudy import (
    CASE_STUDY_DATASETS,
    CASE_STUDY_VOCABULARIES,
    case_study_questions,
    case_study_thresholds,
    classify,
    faces_sources,
    generate_faces_vqa,
    generate_retina_vqa,
)

TOKEN = re.compile(r"\w+|[^\w\s]")
N = 1500
SIZE = 32


@pytest.fixture(scope="module")
def sets() -> dict[str, list[VQAExample]]:
    return {name: fn(N, 11, SIZE) for name, fn in CASE_STUDY_DATASETS.items()}


def _answer_of(value: float, bands) -> int:
    """Documented rule: the number of bands exceeded; -1 inside a band."""
    for lo, hi in bands:
        if lo <= value <= hi:
            return -1
    return sum(value > hi for _, hi in bands)


def _check_rederived(examples, name, size, statistic_of):
    bands = case_study_thresholds(name, size)
    qs = {q.qtype: q for q in case_study_questions(name)}
    seen = Counter()
    for ex in examples:
        q = qs[ex.qtype]
        if q.statistic not in statistic_of:
            continue
        value = statistic_of[q.statistic](ex.image)
        assert _answer_of(value, bands[ex.qtype]) == q.answers.index(ex.answer), (ex.qtype, value, ex.answer)
        seen[ex.qtype] += 1
    assert set(seen) == {t for t, q in qs.items() if q.statistic in statistic_of}


# ----------------------------------------------------------------------------- generic
@pytest.mark.parametrize("name", list(CASE_STUDY_DATASETS))
@pytest.mark.parametrize("size", [16, 21])
def test_shapes_dtypes_small_sizes(name, size):
    exs = CASE_STUDY_DATASETS[name](40, 2, size)
    assert len(exs) == 40
    for ex in exs:
        assert isinstance(ex, VQAExample)
        assert ex.image.shape == (size, size, 3) and ex.image.dtype == np.uint8
        assert len(ex.turns) == 1 and ex.question.endswith(" ?")
        assert not ex.image.flags.writeable


@pytest.mark.parametrize("name", list(CASE_STUDY_DATASETS))
def test_deterministic_and_seed_sensitive(name, sets):
    fn = CASE_STUDY_DATASETS[name]
    a, b, c = fn(60, 4, SIZE), fn(60, 4, SIZE), fn(60, 5, SIZE)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [(x.turns, x.qtype) for x in a] == [(y.turns, y.qtype) for y in b]
    assert sum(np.array_equal(x.image, y.image) for x, y in zip(a, c)) < 3
    assert [x.turns for x in a] != [y.turns for y in c]
    assert fn(0, 4, SIZE) == []


@pytest.mark.parametrize("name", list(CASE_STUDY_DATASETS))
def test_closed_vocabulary(name, sets):
    vocab = CASE_STUDY_VOCABULARIES[name]()
    assert vocab == sorted(set(vocab))
    qs = {q.qtype: q for q in case_study_questions(name)}
    for ex in sets[name]:
        q = qs[ex.qtype]
        assert ex.question == q.text and ex.answer in q.answers
        assert set(TOKEN.findall(ex.question)) | {ex.answer} <= set(vocab)
    assert {ex.qtype for ex in sets[name]} == set(qs)
    assert CASE_STUDY_DATASETS[name].__name__ == f"generate_{name}_vqa"


@pytest.mark.parametrize("name", list(CASE_STUDY_DATASETS))
def test_class_balance(name, sets):
    """Every answer of every question kind holds a fair share (bounds documented in the module)."""
    for q in case_study_questions(name):
        counts = Counter(ex.answer for ex in sets[name] if ex.qtype == q.qtype)
        total = sum(counts.values())
        assert total > N / 3 * 0.85
        k = len(q.answers)
        for a in q.answers:
            share = counts[a] / total
            assert 0.75 / k <= share <= 1.25 / k, (q.qtype, dict(counts))


@pytest.mark.parametrize("name", list(CASE_STUDY_DATASETS))
def test_bands_ordered_and_per_size(name):
    for size in (16, SIZE):
        for qtype, bands in case_study_thresholds(name, size).items():
            flat = [v for band in bands for v in band]
            assert flat == sorted(flat), (qtype, bands)
    assert case_study_thresholds(name, SIZE) == case_study_thresholds(name, SIZE)


def test_classify():
    bands = ((0.2, 0.3), (0.6, 0.7))
    got = classify(np.array([0.0, 0.2, 0.25, 0.3, 0.31, 0.65, 0.71, 1.0]), bands)
    assert got.tolist() == [0, -1, -1, -1, 1, -1, 2, 2]
    assert classify(np.array([0.0, 1.0]), ((0.5, 0.5),)).tolist() == [0, 1]


@pytest.mark.parametrize("bad", [
    dict(num_samples=-1), dict(num_samples=2.5), dict(num_samples=True), dict(seed=-3), dict(seed=1.5),
    dict(image_size=8), dict(image_size=1000), dict(image_size=32.0),
])
@pytest.mark.parametrize("name", list(CASE_STUDY_DATASETS))
def test_bad_arguments(name, bad):
    args = dict(num_samples=4, seed=0, image_size=SIZE) | bad
    with pytest.raises(ValueError):
        CASE_STUDY_DATASETS[name](**args)


def test_bad_names_and_sources_args():
    with pytest.raises(ValueError, match="pathology"):
        case_study_thresholds("xray", SIZE)
    with pytest.raises(ValueError):
        case_study_questions("xray")
    with pytest.raises(ValueError):
        faces_sources(-1, 0)


# ----------------------------------------------------------------------------- pathology
def _hed(image: np.ndarray) -> np.ndarray:
    """Colour deconvolution (Ruifrok & Johnston) written out: OD = log(max(rgb, 1e-6)) / log(1e-6)."""
    rgb = np.maximum(image.astype(np.float64) / 255.0, 1e-6)
    return np.maximum((np.log(rgb) / np.log(1e-6)) @ hed_from_rgb, 0.0)


def _dab_fraction(img):
    return float((_hed(img)[..., 2] > 0.06).mean())


def _dab_strength(img):
    dab = _hed(img)[..., 2]
    pos = dab > 0.06
    return float(dab[pos].mean()) if pos.mean() >= 0.05 else 0.0


def _hem_fraction(img):
    return float((_hed(img)[..., 0] > 0.035).mean())


def test_pathology_answers_rederived_from_pixels(sets):
    stats = {"dab_fraction": _dab_fraction, "dab_strength": _dab_strength, "hematoxylin_fraction": _hem_fraction}
    _check_rederived(sets["pathology"][:300], "pathology", SIZE, stats)


def test_pathology_level_tracks_brown_area(sets):
    """High-stain tiles are browner (less blue) than low-stain ones, on raw RGB."""
    exs = [e for e in sets["pathology"] if e.qtype == "stain_level"]
    blue_minus_red = {a: np.mean([e.image[..., 2].mean() - e.image[..., 0].mean() for e in exs if e.answer == a])
                      for a in ("low", "high")}
    assert blue_minus_red["high"] < blue_minus_red["low"] - 20


# ----------------------------------------------------------------------------- retina
def _vessel_fraction(img):
    k = 2 * int(np.floor(3 * img.shape[0] / 32 + 0.5)) + 1  # 7 at 32 px
    return float((black_tophat(img[..., 1], footprint_rectangle((k, k))) >= 12).mean())


def _luma(img):
    return rgb2gray(img) * 255.0


def _side(img):
    luma, half = _luma(img), img.shape[1] // 2
    return float(luma[:, img.shape[1] - half:].mean() - luma[:, :half].mean())


def test_retina_answers_rederived_from_pixels(sets):
    stats = {"vessel_fraction": _vessel_fraction, "luma": lambda im: float(_luma(im).mean()),
             "luma_right_minus_left": _side}
    _check_rederived(sets["retina"][:300], "retina", SIZE, stats)
    odd = generate_retina_vqa(60, 3, 21)
    _check_rederived(odd, "retina", 21, stats)


def test_retina_side_margin_and_fundus_border(sets):
    for ex in sets["retina"]:
        if ex.qtype == "side":
            assert abs(_side(ex.image)) > 2.0
        colour = np.ptp(ex.image.astype(int), axis=-1).max() > 0
        if colour:  # fundus tiles: at most ~2% of the tile outside the disc (black border)
            assert (ex.image.max(axis=-1) < 30).mean() <= 0.05
    grey = sum(np.ptp(ex.image.astype(int), axis=-1).max() == 0 for ex in sets["retina"])
    assert 0.15 * N < grey < 0.35 * N  # microaneurysms() tiles, p = 1/4


# ----------------------------------------------------------------------------- faces
def test_faces_label_matches_source(sets):
    src = faces_sources(N, 11)
    assert src.shape == (N,) and src.dtype.kind == "i"
    for ex, s in zip(sets["faces"], src):
        assert np.array_equal(ex.image[..., 0], ex.image[..., 1]) and np.array_equal(ex.image[..., 0], ex.image[..., 2])
        if ex.qtype == "face":
            assert ex.answer == ("yes" if s < 100 else "no")
    for b in range(N // 200):  # every block of 200 uses every source image once
        assert sorted(src[200 * b:200 * (b + 1)].tolist()) == list(range(200))
    assert np.array_equal(faces_sources(300, 11), src[:300])
    assert not np.array_equal(faces_sources(300, 12), src[:300])


def _unit(a):
    a = a.reshape(len(a), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-9)


def test_faces_pixels_come_from_their_source():
    """Nearest source by normalised correlation (over small shifts and mirroring) is the recorded one."""
    from PIL import Image

    exs, src = generate_faces_vqa(200, 9, 25), faces_sources(200, 9)
    lfw = lfw_subset()
    w = 23
    cands = np.stack([np.asarray(Image.fromarray(e.image[..., 0]).resize((w, w), Image.Resampling.BILINEAR))
                      for e in exs])
    cands = _unit(np.concatenate([cands, cands[:, :, ::-1]]))  # (2N, w*w)
    windows = [_unit(lfw[:, dy:dy + w, dx:dx + w]) for dy in range(3) for dx in range(3)]
    scores = np.max([cands @ win.T for win in windows], axis=0)  # (2N, 200)
    best = np.argmax(np.maximum(scores[:len(exs)], scores[len(exs):]), axis=1)
    assert (best == src).mean() >= 0.85


def test_faces_answers_rederived_from_pixels(sets):
    stats = {"brightness": lambda im: float(im[..., 0].astype(np.float64).mean()),
             "contrast": lambda im: float(im[..., 0].astype(np.float64).std())}
    _check_rederived(sets["faces"][:300], "faces", SIZE, stats)


def test_faces_sources_independent_of_image_size():
    a, b = generate_faces_vqa(50, 1, 16), generate_faces_vqa(50, 1, 32)
    assert [x.qtype for x in a] == [x.qtype for x in b]
    assert [x.answer for x in a if x.qtype == "face"] == [x.answer for x in b if x.qtype == "face"]


# ----------------------------------------------------------------------------- pools
def test_all_pool_is_the_default():
    for name, fn in CASE_STUDY_DATASETS.items():
        a, b = fn(30, 5, 16), fn(30, 5, 16, "all")
        assert all(np.array_equal(x.image, y.image) and x.turns == y.turns for x, y in zip(a, b)), name
    with pytest.raises(ValueError, match="pool"):
        CASE_STUDY_DATASETS["faces"](4, 0, 16, "shared")


def test_face_pools_split_the_sources():
    from sim.data.casestudy import PUBLIC_FACE_SOURCES, face_pool_sources

    pub, priv = faces_sources(400, 2, "public"), faces_sources(640, 2, "private")
    assert set(pub.tolist()) == set(PUBLIC_FACE_SOURCES) and len(PUBLIC_FACE_SOURCES) == 40
    assert not set(priv.tolist()) & set(PUBLIC_FACE_SOURCES)
    assert sum(s < 100 for s in PUBLIC_FACE_SOURCES) == 20  # as many faces as non-faces
    for b in range(4):  # blocks of 160 cycle through the private sources
        assert sorted(priv[160 * b:160 * (b + 1)].tolist()) == face_pool_sources("private").tolist()


@pytest.mark.parametrize("shape,sides", [((512, 512), (64, 128)), ((1411, 1411), (64, 160))])
def test_slide_pools_share_no_pixel(shape, sides):
    """Public tiles lie inside one public cell; private tiles touch none (pathology and fundus geometry)."""
    from sim.data.casestudy import POOL_GRID, PUBLIC_CELLS, _pool_tiles

    rng = np.random.default_rng(0)
    ch, cw = shape[0] // POOL_GRID, shape[1] // POOL_GRID
    public = np.zeros(shape, bool)
    for r, c in PUBLIC_CELLS:
        public[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = True
    seen = np.zeros(shape, int)
    for pool, want in (("public", True), ("private", False)):
        t = _pool_tiles(rng, 400, sides, *shape, pool)
        assert ((t["side"] >= sides[0]) & (t["side"] <= sides[1])).all()
        for y, x, s in zip(t["y"], t["x"], t["side"]):
            assert y >= 0 and x >= 0 and y + s <= shape[0] and x + s <= shape[1]
            assert (public[y:y + s, x:x + s] == want).all(), (pool, y, x, s)
            seen[y:y + s, x:x + s] += 1 if want else 0
        if want:  # every public cell is used
            assert all(seen[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw].any() for r, c in PUBLIC_CELLS)


def test_retina_public_pool_is_fundus_only():
    exs = generate_retina_vqa(200, 4, 16, "public")
    assert all(np.ptp(ex.image.astype(int), axis=-1).max() > 0 for ex in exs)  # no grey microaneurysm tiles


@pytest.mark.parametrize("name", list(CASE_STUDY_DATASETS))
def test_private_and_public_pools_have_every_answer(name):
    for pool in ("private", "public"):
        exs = CASE_STUDY_DATASETS[name](600, 3, 16, pool)
        for q in case_study_questions(name):
            got = {ex.answer for ex in exs if ex.qtype == q.qtype}
            assert got == set(q.answers), (pool, q.qtype, got)
