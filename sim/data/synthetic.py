"""Procedural, deterministic synthetic VQA ("shapes world").

Each image shows 1-4 flat objects on a plain black or dark-grey background. An
object is a (shape, colour) pair, shapes from :data:`SHAPES`, colours from
:data:`COLOURS` (well separated in RGB). Objects sit in distinct cells of a centred
3x3 grid, so they never overlap and "left of" / "above" are unambiguous.

Layout: a cell is ``image_size // 4`` px wide and the grid leaves a margin of half a
cell on every side; an object fills its cell but for a gap of ``max(1, cell // 8)``
px (7 px objects in 8 px cells at 32 px; below 20 px, where that would make objects
smaller than 4 px, cells are ``image_size // 3`` wide instead). Cells therefore start on multiples of
``image_size / 8``: with the default ViT patch of 4 px at 32 px (and e.g. patch 14 at
224 px) every object covers exactly 2x2 patches and no patch holds parts of two
objects. Measured on the default tiny model, this learns colour and shape questions
markedly faster than unaligned 10 px cells (docs/results-spine.md).

Every image gets one question, its type drawn uniformly from
:data:`QUESTION_TYPES`:

* ``colour``     ``what colour is the <shape> ?`` (that shape is unique)
* ``shape``      ``what shape is the <colour> object ?`` (that colour is unique)
* ``count``      ``how many objects are there ?`` / ``how many <colour> objects
  are there ?`` / ``how many <shape>s are there ?`` -> ``zero`` .. ``four``
* ``position``   ``which column is <anchor> in ?`` -> left / center / right;
  ``which row is <anchor> in ?`` -> top / middle / bottom (the grid cell)
* ``relational`` ``what colour|shape is the object <rel> <anchor> ?`` where
  ``<rel>`` is ``left of`` / ``right of`` / ``above`` / ``below``, meaning a
  strictly smaller / larger grid column / row (any row / column). It is asked
  only when exactly one object stands in that relation to the anchor.

An anchor is ``the <shape>`` (shape unique in the scene) or ``the <colour>
object`` (colour unique). When the drawn type has no well-defined question for a
scene, the scene is resampled, so every answer is a deterministic function of the
image and the question. Answers are single lowercase words; questions are
lowercase words separated by single spaces and end with `` ?``.

Scenes (:class:`Scene`) do not depend on the image size; :func:`render_scenes`
draws them with precomputed shape masks in one vectorised scatter, and
:func:`answer_question` re-derives an answer from a scene and question text
(independently of the generator's own bookkeeping; tests use it).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import numpy as np

from .types import VQAExample

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "purple")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (160, 50, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "grey": (48, 48, 48)}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
COLUMN_WORDS: tuple[str, ...] = ("left", "center", "right")
ROW_WORDS: tuple[str, ...] = ("top", "middle", "bottom")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "relational")
ANSWERS: tuple[str, ...] = COLOURS + SHAPES + NUMBER_WORDS + COLUMN_WORDS + ROW_WORDS

GRID = 3
MAX_OBJECTS = 4
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 384
_SCATTER_PIXELS = 1 << 21
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class SceneObject(NamedTuple):
    """One object: shape and colour names, grid cell, and jitter in [-1, 1] (fraction of the slack)."""

    shape: str
    colour: str
    row: int
    col: int
    jitter_y: float = 0.0
    jitter_x: float = 0.0


class Scene(NamedTuple):
    """A size-independent scene description: background name and objects (distinct cells)."""

    background: str
    objects: tuple[SceneObject, ...]


class SyntheticSample(NamedTuple):
    """A scene with its question, answer and question type (no pixels)."""

    scene: Scene
    question: str
    answer: str
    qtype: str


class AmbiguousQuestion(ValueError):
    """A question that has no unique answer for a scene."""


# ----------------------------------------------------------------------------- geometry
def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int | np.integer) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"synthetic image_size must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}"
        )


@functools.lru_cache(maxsize=32)
def shape_masks(size: int) -> np.ndarray:
    """Boolean masks ``(len(SHAPES), size, size)`` of every shape drawn ``size`` px across.

    The cross is diagonal (an X) so it stays distinct from the circle at 4 px.
    """
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # v: down, u: right
    half_px = 1.0 / size
    circle = u**2 + v**2 <= 1.0
    square = np.ones((size, size), dtype=bool)
    triangle = np.abs(u) <= (v + 1.0) / 2.0 + half_px
    cross = np.abs(np.abs(u) - np.abs(v)) <= max(0.2, 1.5 * half_px)
    masks = np.stack([circle, square, triangle, cross])
    masks.setflags(write=False)
    return masks


def _layout(image_size: int) -> tuple[int, int, int, int]:
    """(object size, cell size, grid offset, max jitter in px) for an image size."""
    cell = image_size // (GRID + 1)
    s = cell - max(1, cell // 8)
    if s < 4:  # below 20 px: shapes need 4 px to stay distinct, so use the whole width
        cell, s = image_size // GRID, max(4, round(image_size / 4))
    off = (image_size - GRID * cell) // 2
    jmax = max(0, (cell - s) // 2 - 1)  # keeps >= 1 px between neighbouring objects
    return s, cell, off, jmax


def object_size(image_size: int) -> int:
    """Side in pixels of every object drawn at ``image_size``."""
    return _layout(image_size)[0]


# ----------------------------------------------------------------------------- rendering
def render_scenes(scenes: list[Scene], image_size: int) -> np.ndarray:
    """Draw scenes into a ``(N, H, W, 3)`` uint8 array (one vectorised scatter).

    Parameters
    ----------
    scenes : list of Scene
    image_size : int
        Side in pixels, in [16, 384].
    """
    _check_size(image_size)
    n = len(scenes)
    s, cell, off, jmax = _layout(image_size)
    shape_id = {name: i for i, name in enumerate(SHAPES)}
    colour_id = {name: i for i, name in enumerate(COLOURS)}
    bg_names = list(BACKGROUNDS)
    bg_rgb = np.array([BACKGROUNDS[b] for b in bg_names], dtype=np.uint8)
    pal = np.array([PALETTE[c] for c in COLOURS], dtype=np.uint8)

    bg = np.array([bg_names.index(sc.background) for sc in scenes], dtype=np.int64)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    images[:] = bg_rgb[bg][:, None, None, :]

    rows = [(i, shape_id[o.shape], colour_id[o.colour], o.row, o.col, o.jitter_y, o.jitter_x)
            for i, sc in enumerate(scenes) for o in sc.objects]
    if not rows:
        return images
    arr = np.array(rows, dtype=np.float64)
    img_i, shp, col = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64)
    base = off + (cell - s) // 2
    y0 = base + arr[:, 3].astype(np.int64) * cell + np.rint(arr[:, 5] * jmax).astype(np.int64)
    x0 = base + arr[:, 4].astype(np.int64) * cell + np.rint(arr[:, 6] * jmax).astype(np.int64)

    masks = shape_masks(s)
    obj_bg = bg_rgb[bg[img_i]]
    ar = np.arange(s)
    step = max(1, _SCATTER_PIXELS // (s * s))  # bounds the (M, s, s) index temporaries
    for a in range(0, len(rows), step):
        sl = slice(a, a + step)
        patches = np.where(masks[shp[sl]][..., None], pal[col[sl]][:, None, None, :], obj_bg[sl][:, None, None, :])
        ys = (y0[sl, None] + ar)[:, :, None]
        xs = (x0[sl, None] + ar)[:, None, :]
        images[img_i[sl, None, None], ys, xs] = patches
    return images


def render_scene(scene: Scene, image_size: int) -> np.ndarray:
    """Draw one scene as an ``(H, W, 3)`` uint8 array."""
    return render_scenes([scene], image_size)[0]


def object_box(obj: SceneObject, image_size: int) -> tuple[int, int, int]:
    """Top-left ``(y, x)`` and side ``s`` in pixels of an object's bounding box."""
    s, cell, off, jmax = _layout(image_size)
    base = off + (cell - s) // 2
    y = base + obj.row * cell + int(np.rint(obj.jitter_y * jmax))
    x = base + obj.col * cell + int(np.rint(obj.jitter_x * jmax))
    return y, x, s


# ----------------------------------------------------------------------------- questions
def _anchors(objs: tuple[SceneObject, ...], shapes: tuple[str, ...] = SHAPES,
             colours: tuple[str, ...] = COLOURS) -> list[tuple[str, SceneObject]]:
    """Phrases that pick exactly one object: unique shapes, then unique colours (in the
    order of ``shapes``, ``colours``; the public corpus passes its larger sets)."""
    out = []
    for attr, names, fmt in (("shape", shapes, "the {}"), ("colour", colours, "the {} object")):
        for name in names:
            hits = [o for o in objs if getattr(o, attr) == name]
            if len(hits) == 1:
                out.append((fmt.format(name), hits[0]))
    return out


def _related(objs: tuple[SceneObject, ...], anchor: SceneObject, rel: str) -> list[SceneObject]:
    if rel == "left of":
        return [o for o in objs if o.col < anchor.col]
    if rel == "right of":
        return [o for o in objs if o.col > anchor.col]
    if rel == "above":
        return [o for o in objs if o.row < anchor.row]
    return [o for o in objs if o.row > anchor.row]


def _make_question(scene: Scene, qtype: str, p: tuple[float, float, float]) -> tuple[str, str] | None:
    """A (question, answer) of type ``qtype`` chosen with uniforms ``p``; None if none is well-defined."""
    objs = scene.objects
    if qtype == "colour":
        cands = [(o.shape, o.colour) for o in objs if sum(x.shape == o.shape for x in objs) == 1]
        if not cands:
            return None
        shape, colour = sorted(cands)[int(p[0] * len(cands))]
        return f"what colour is the {shape} ?", colour
    if qtype == "shape":
        cands = [(o.colour, o.shape) for o in objs if sum(x.colour == o.colour for x in objs) == 1]
        if not cands:
            return None
        colour, shape = sorted(cands)[int(p[0] * len(cands))]
        return f"what shape is the {colour} object ?", shape
    if qtype == "count":
        variant = int(p[0] * 3)
        if variant == 0:
            return "how many objects are there ?", NUMBER_WORDS[len(objs)]
        attr, names = ("colour", COLOURS) if variant == 1 else ("shape", SHAPES)
        present = [n for n in names if any(getattr(o, attr) == n for o in objs)]
        pool = present if p[2] < 0.75 else list(names)
        name = pool[int(p[1] * len(pool))]
        k = sum(getattr(o, attr) == name for o in objs)
        subject = f"{name} objects" if attr == "colour" else SHAPE_PLURALS[name]
        return f"how many {subject} are there ?", NUMBER_WORDS[k]
    if qtype == "position":
        anchors = _anchors(objs)
        if not anchors:
            return None
        phrase, obj = anchors[int(p[1] * len(anchors))]
        if p[0] < 0.5:
            return f"which column is {phrase} in ?", COLUMN_WORDS[obj.col]
        return f"which row is {phrase} in ?", ROW_WORDS[obj.row]
    if qtype == "relational":
        cands = []
        for phrase, anchor in _anchors(objs):
            for rel in RELATIONS:
                hits = _related(objs, anchor, rel)
                if len(hits) == 1:
                    for attr in ("colour", "shape"):
                        cands.append((f"what {attr} is the object {rel} {phrase} ?", getattr(hits[0], attr)))
        if not cands:
            return None
        return cands[int(p[0] * len(cands))]
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


@functools.cache
def all_questions() -> tuple[str, ...]:
    """Every question text the generator can produce (sorted)."""
    anchors = [f"the {s}" for s in SHAPES] + [f"the {c} object" for c in COLOURS]
    qs = [f"what colour is the {s} ?" for s in SHAPES]
    qs += [f"what shape is the {c} object ?" for c in COLOURS]
    qs += ["how many objects are there ?"]
    qs += [f"how many {c} objects are there ?" for c in COLOURS]
    qs += [f"how many {SHAPE_PLURALS[s]} are there ?" for s in SHAPES]
    qs += [f"which {axis} is {a} in ?" for axis in ("column", "row") for a in anchors]
    qs += [f"what {attr} is the object {rel} {a} ?" for attr in ("colour", "shape") for rel in RELATIONS for a in anchors]
    return tuple(sorted(qs))


def synthetic_vocabulary() -> list[str]:
    """Every token (``\\w+|[^\\w\\s]``) of every possible question and answer, sorted."""
    words = {t for q in all_questions() for t in _TOKEN_RE.findall(q)}
    words |= {t for a in ANSWERS for t in _TOKEN_RE.findall(a)}
    return sorted(words)


# ----------------------------------------------------------------------------- re-derivation
def _resolve(objs: tuple[SceneObject, ...], phrase: str, shapes: tuple[str, ...] = SHAPES,
             colours: tuple[str, ...] = COLOURS) -> SceneObject:
    m = re.fullmatch(r"the (\w+) object", phrase)
    if m and m.group(1) in colours:
        hits = [o for o in objs if o.colour == m.group(1)]
    else:
        m = re.fullmatch(r"the (\w+)", phrase)
        if not m or m.group(1) not in shapes:
            raise AmbiguousQuestion(f"cannot parse object phrase {phrase!r}")
        hits = [o for o in objs if o.shape == m.group(1)]
    if len(hits) != 1:
        raise AmbiguousQuestion(f"{phrase!r} matches {len(hits)} objects")
    return hits[0]


def answer_question(scene: Scene, question: str) -> str:
    """Derive the answer to a synthetic question from a scene description.

    Raises
    ------
    AmbiguousQuestion
        If the question cannot be parsed or has no unique answer for the scene.
    """
    objs = scene.objects
    plural_to_shape = {v: k for k, v in SHAPE_PLURALS.items()}
    if m := re.fullmatch(r"what (colour|shape) is the object (left of|right of|above|below) (.+) \?", question):
        anchor = _resolve(objs, m.group(3))
        if m.group(2) in ("left of", "right of"):
            hits = [o for o in objs if (o.col - anchor.col) * (1 if m.group(2) == "right of" else -1) > 0]
        else:
            hits = [o for o in objs if (o.row - anchor.row) * (1 if m.group(2) == "below" else -1) > 0]
        if len(hits) != 1:
            raise AmbiguousQuestion(f"{question!r}: {len(hits)} objects stand in that relation")
        return hits[0].colour if m.group(1) == "colour" else hits[0].shape
    if m := re.fullmatch(r"what colour is (the \w+) \?", question):
        return _resolve(objs, m.group(1)).colour
    if m := re.fullmatch(r"what shape is (the \w+ object) \?", question):
        return _resolve(objs, m.group(1)).shape
    if question == "how many objects are there ?":
        return NUMBER_WORDS[len(objs)]
    if (m := re.fullmatch(r"how many (\w+) objects are there \?", question)) and m.group(1) in COLOURS:
        return NUMBER_WORDS[sum(o.colour == m.group(1) for o in objs)]
    if (m := re.fullmatch(r"how many (\w+) are there \?", question)) and m.group(1) in plural_to_shape:
        return NUMBER_WORDS[sum(o.shape == plural_to_shape[m.group(1)] for o in objs)]
    if m := re.fullmatch(r"which (column|row) is (.+) in \?", question):
        obj = _resolve(objs, m.group(2))
        return COLUMN_WORDS[obj.col] if m.group(1) == "column" else ROW_WORDS[obj.row]
    raise AmbiguousQuestion(f"cannot parse question {question!r}")


# ----------------------------------------------------------------------------- generation
def generate_synthetic_samples(num_samples: int, seed: int) -> list[SyntheticSample]:
    """Scenes with questions and answers, without pixels (size-independent).

    Parameters
    ----------
    num_samples : int
        Number of samples (>= 0).
    seed : int
        Seed of ``numpy.random.default_rng``; same arguments give the same output.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    rng = np.random.default_rng(seed)
    qtypes = rng.integers(0, len(QUESTION_TYPES), num_samples).tolist()
    picks = rng.random((num_samples, 3)).tolist()
    bg_names = list(BACKGROUNDS)
    out: list[SyntheticSample | None] = [None] * num_samples
    pending = list(range(num_samples))
    while pending:  # rejection rounds: resample scenes that admit no question of their type
        m = len(pending)
        nobj = rng.integers(1, MAX_OBJECTS + 1, m).tolist()
        cells = np.argsort(rng.random((m, GRID * GRID)), axis=1, kind="stable")[:, :MAX_OBJECTS].tolist()
        shapes = rng.integers(0, len(SHAPES), (m, MAX_OBJECTS)).tolist()
        colours = rng.integers(0, len(COLOURS), (m, MAX_OBJECTS)).tolist()
        bgs = rng.integers(0, len(bg_names), m).tolist()
        jit = np.round(rng.random((m, MAX_OBJECTS, 2)) * 2.0 - 1.0, 3).tolist()
        retry = []
        for j, i in enumerate(pending):
            objs = tuple(
                SceneObject(SHAPES[shapes[j][t]], COLOURS[colours[j][t]], cells[j][t] // GRID, cells[j][t] % GRID,
                            jit[j][t][0], jit[j][t][1])
                for t in range(nobj[j])
            )
            scene = Scene(bg_names[bgs[j]], objs)
            qtype = QUESTION_TYPES[qtypes[i]]
            qa = _make_question(scene, qtype, picks[i])
            if qa is None:
                retry.append(i)
            else:
                out[i] = SyntheticSample(scene, qa[0], qa[1], qtype)
        pending = retry
    return out  # type: ignore[return-value]


def generate_synthetic_vqa(num_samples: int, seed: int, image_size: int = 32) -> list[VQAExample]:
    """Generate a deterministic synthetic VQA dataset.

    Parameters
    ----------
    num_samples : int
        Number of examples.
    seed : int
        Seed; same arguments give bitwise-identical images and texts.
    image_size : int
        Image side in pixels, in [16, 384].

    Returns
    -------
    list of VQAExample
        One single-turn example per image.
    """
    _check_size(image_size)
    samples = generate_synthetic_samples(num_samples, seed)
    images = render_scenes([s.scene for s in samples], image_size)
    return [VQAExample(images[i], ((s.question, s.answer),), s.qtype) for i, s in enumerate(samples)]
