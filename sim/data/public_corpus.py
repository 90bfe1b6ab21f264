"""Procedural, deterministic *public* pretraining corpus ("public shapes world").

This is the project's stand-in for the public data a pretrained model was trained
on. It is a richer sibling of the private shapes world of :mod:`sim.data.synthetic`
and is disjoint from every client's private data: the private synthetic images
have plain black or grey backgrounds, which no public image has (guarantee below),
and the privacy case studies (:mod:`sim.data.casestudy`) are real photographs that
ship with scikit-image, not drawings.

Scenes
------
Each image shows 1-4 objects (count uniform) in distinct cells (uniform) of the
same centred 3x3 grid as the private set, with the same geometry
(``synthetic._layout``), so "left of", "above", columns and rows mean the same
thing. An object has five independent, uniformly drawn attributes:

* shape   :data:`SHAPES`: the private ``circle, square, triangle, cross`` (same
  masks, :func:`synthetic.shape_masks`) plus ``diamond`` (``|u| + |v| < 1``),
  ``ring`` (``0.5 <= r <= 1``) and ``bar`` (a horizontal band of half-height
  ``0.25`` plus half a pixel), all in the square ``[-1, 1]^2`` of the object box.
  The seven masks are pairwise distinct from 4 px up.
* colour  :data:`COLOURS`: the six private colours with the RGB values of
  ``synthetic.PALETTE``, plus ``orange``, ``cyan`` and ``pink`` (:data:`PALETTE`;
  every pair differs by more than 80 in RGB distance).
* size    ``large``: the private object size (7 px at 32 px, 14 px at 64 px),
  filling its cell but for the private gap; ``small``: ``round(0.7 * large)``
  clipped to ``[3, large - 1]`` (5 px at 32 px, 10 px at 64 px), centred in the
  cell. Small objects are 3-4 px in images below 32 px, and 3 px (at 16-18 and
  20-23 px) is too small to tell a circle from a square; from 24 px up every
  answer is determined by the pixels.
* texture ``solid``: every mask pixel has the palette colour; ``striped``: vertical
  stripes ``w = max(1, large // 7)`` px wide (1 px at 32 px, 2 px at 64 px)
  counted from the object box's left edge, odd stripes drawn in the dark shade
  ``rint(0.55 * rgb)`` (:data:`DARK_PALETTE`), even stripes in the palette colour.
* jitter  two uniforms in ``[-1, 1]`` (rounded to 3 decimals) scaled by the
  object's slack: large objects use the private rule (0 px at 32 and 64 px), small
  ones ``min(inner, cell - 1 - small - inner, max(1, cell // 16))`` px with
  ``inner = (cell - small) // 2`` (+-1 px at 32 and 64 px). Every object stays
  inside ``[0, cell - 1)`` of its cell, so neighbours never touch.

Backgrounds (:data:`BACKGROUND_NAMES`, uniform): plain ``navy``, ``forest`` and
``brown`` (:data:`PLAIN_BACKGROUNDS`); ``gradient``, a vertical blend from
``(20, 36, 80)`` at the top to ``(80, 36, 20)`` at the bottom (row centres, rounded);
``noise``, ``(30, 40, 64)`` plus integer noise in ``[-6, 6]`` per pixel and channel:
the splitmix64 hash of ``scene.noise_seed * 2**32 + k`` modulo 13, minus 6, where
``k`` is the flat (row, column, channel) index (vectorised, seeded per scene).

Disjointness guarantee: no public background pixel is a grey level (``R = G = B``):
plain backgrounds are not grey, the gradient has ``G = 36`` and ``R + B = 100 +- 1``
on every row (grey would need ``R + B = 72``), and noise keeps ``B >= 58 > 36 >= R``.
Every private pixel that is not an object is ``(0, 0, 0)`` or ``(48, 48, 48)``, and
every private grid cell holds at least one such pixel (objects leave a gap in their
cell), while at least five of the nine cells of a public image are empty and hold
only non-grey background. Hence no public image equals a private synthetic image of
any size; in particular the margin around the grid (4 px at 32 px) is never black
or grey anywhere.

Questions
---------
Every image gets one question, its type drawn uniformly from
:data:`PUBLIC_QUESTION_TYPES` (1/8 each); when the drawn type has no well-defined
question for a scene, the scene is resampled (the type is kept), so every answer
is a deterministic function of the image and the question. The first five types
use the private templates and answer words of :mod:`sim.data.synthetic` verbatim
(over the larger shape and colour sets):

* ``colour``     ``what colour is the <shape> ?`` (that shape is unique)
* ``shape``      ``what shape is the <colour> object ?`` (that colour is unique)
* ``count``      ``how many objects are there ?`` / ``how many <colour> objects
  are there ?`` / ``how many <shape>s are there ?`` -> ``zero`` .. ``four``
  (1/3 each; a colour or shape present in the scene with probability 3/4, else
  any one)
* ``position``   ``which column is <anchor> in ?`` -> left / center / right;
  ``which row is <anchor> in ?`` -> top / middle / bottom
* ``relational`` ``what colour|shape is the object <rel> <anchor> ?``, ``<rel>``
  one of ``left of`` / ``right of`` / ``above`` / ``below`` (strictly smaller /
  larger grid column / row, any row / column), asked only when exactly one
  object stands in that relation to the anchor

and three are new:

* ``size``       ``what size is <anchor> ?`` -> small / large
* ``texture``    ``what texture is <anchor> ?`` -> solid / striped, or (1/2 each)
  ``is <anchor> striped ?`` -> yes / no
* ``caption``    ``describe the image .`` -> the canonical caption below

An anchor is ``the <shape>`` (shape unique in the scene) or ``the <colour> object``
(colour unique), exactly as in the private set; size and texture never enter
anchors. Caption grammar (a deterministic function of the scene)::

    caption := phrase ( " , " phrase )*          one phrase per object
    phrase  := "a " size " " [ "striped " ] colour " " shape

with objects in reading order (grid row, then column), solid objects without a
texture word, e.g. ``a large red circle , a small striped blue square``. Other
answers are single lowercase words; questions are lowercase words separated by
single spaces ending in `` ?`` (the caption request ends in `` .``).

Determinism: scenes are drawn in blocks of :data:`BLOCK` samples, block ``b`` from
``numpy.random.default_rng([seed, b])``, so the output depends only on
``(num_samples, seed, image_size)`` and is prefix-stable (the first ``k`` of ``n``
samples equal the ``k``-sample corpus). Scenes (:class:`PublicScene`) do not depend
on the image size; :func:`render_public_scenes` draws them with vectorised
scatters, and :func:`answer_public_question` re-derives an answer from a scene and
question text, independently of the generator's own bookkeeping (tests use it).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import numpy as np

from . import synthetic
from .synthetic import (
    COLUMN_WORDS,
    GRID,
    MAX_OBJECTS,
    NUMBER_WORDS,
    RELATIONS,
    ROW_WORDS,
    AmbiguousQuestion,
    _check_size,
    _layout,
)
from .types import VQAExample

__all__ = [
    "AmbiguousQuestion",
    "PublicObject",
    "PublicSample",
    "PublicScene",
    "all_public_questions",
    "answer_public_question",
    "describe_scene",
    "generate_public_corpus",
    "generate_public_samples",
    "public_object_box",
    "public_shape_masks",
    "public_vocabulary",
    "render_public_scene",
    "render_public_scenes",
]

SHAPES: tuple[str, ...] = synthetic.SHAPES + ("diamond", "ring", "bar")
SHAPE_PLURALS: dict[str, str] = {**synthetic.SHAPE_PLURALS, "diamond": "diamonds", "ring": "rings", "bar": "bars"}
COLOURS: tuple[str, ...] = synthetic.COLOURS + ("orange", "cyan", "pink")
PALETTE: dict[str, tuple[int, int, int]] = {
    **synthetic.PALETTE,
    "orange": (255, 140, 0),
    "cyan": (40, 220, 230),
    "pink": (250, 130, 190),
}
STRIPE_SHADE = 0.55
DARK_PALETTE: dict[str, tuple[int, int, int]] = {
    c: tuple(int(v) for v in np.rint(np.array(rgb) * STRIPE_SHADE)) for c, rgb in PALETTE.items()
}
SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("solid", "striped")
YES_NO: tuple[str, ...] = ("no", "yes")
PLAIN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "navy": (16, 24, 72),
    "forest": (20, 60, 32),
    "brown": (76, 48, 24),
}
GRADIENT_ENDS: tuple[tuple[int, int, int], tuple[int, int, int]] = ((20, 36, 80), (80, 36, 20))
NOISE_BASE: tuple[int, int, int] = (30, 40, 64)
NOISE_AMPLITUDE = 6
BACKGROUND_NAMES: tuple[str, ...] = (*PLAIN_BACKGROUNDS, "gradient", "noise")
PUBLIC_QUESTION_TYPES: tuple[str, ...] = synthetic.QUESTION_TYPES + ("size", "texture", "caption")
CAPTION_QUESTION = "describe the image ."
CAPTION_WORDS: tuple[str, ...] = (",", "a")
PUBLIC_ANSWERS: tuple[str, ...] = (
    COLOURS + SHAPES + NUMBER_WORDS + COLUMN_WORDS + ROW_WORDS + SIZES + TEXTURES + YES_NO
)  # single-word answers; captions are built from these and CAPTION_WORDS

BLOCK = 256
SMALL_FRACTION = 0.7
_SCATTER_PIXELS = 1 << 21
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class PublicObject(NamedTuple):
    """One object: attribute names, grid cell, and jitter in [-1, 1] (fraction of the slack)."""

    shape: str
    colour: str
    size: str
    texture: str
    row: int
    col: int
    jitter_y: float = 0.0
    jitter_x: float = 0.0


class PublicScene(NamedTuple):
    """A size-independent scene: background name, objects (distinct cells), noise seed (``noise`` only)."""

    background: str
    objects: tuple[PublicObject, ...]
    noise_seed: int = 0


class PublicSample(NamedTuple):
    """A scene with its question, answer and question type (no pixels)."""

    scene: PublicScene
    question: str
    answer: str
    qtype: str


# ----------------------------------------------------------------------------- geometry
@functools.lru_cache(maxsize=32)
def public_shape_masks(size: int) -> np.ndarray:
    """Boolean masks ``(len(SHAPES), size, size)``; the first four are ``synthetic.shape_masks``."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # v: down, u: right
    r2 = u**2 + v**2
    eps = 1e-9  # decides pixel centres that lie on a boundary the same way on every side
    diamond = np.abs(u) + np.abs(v) <= 1.0 - eps  # strict: at 4 px a closed diamond equals the circle
    ring = (r2 <= 1.0 + eps) & (r2 >= 0.25 - eps)
    bar = np.abs(v) <= 0.25 + 1.0 / size + eps
    masks = np.concatenate([synthetic.shape_masks(size), np.stack([diamond, ring, bar])])
    masks.setflags(write=False)
    return masks


def small_size(image_size: int) -> int:
    """Side in pixels of a small object at ``image_size``."""
    large = synthetic.object_size(image_size)
    return int(min(large - 1, max(3, round(SMALL_FRACTION * large))))


def stripe_width(image_size: int) -> int:
    """Width in pixels of one stripe of a striped object at ``image_size``."""
    return max(1, synthetic.object_size(image_size) // 7)


def _geometry(image_size: int, size: str) -> tuple[int, int, int, int]:
    """(side, offset of the box in cell (0, 0), cell size, max jitter in px) of a size class."""
    s, cell, off, jmax = _layout(image_size)
    if size == "large":
        return s, off + (cell - s) // 2, cell, jmax
    t = small_size(image_size)
    inner = (cell - t) // 2
    return t, off + inner, cell, max(0, min(inner, cell - 1 - t - inner, max(1, cell // 16)))


def public_object_box(obj: PublicObject, image_size: int) -> tuple[int, int, int]:
    """Top-left ``(y, x)`` and side ``s`` in pixels of an object's bounding box."""
    side, base, cell, jmax = _geometry(image_size, obj.size)
    y = base + obj.row * cell + int(np.rint(obj.jitter_y * jmax))
    x = base + obj.col * cell + int(np.rint(obj.jitter_x * jmax))
    return y, x, side


# ----------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=32)
def gradient_image(image_size: int) -> np.ndarray:
    """The ``gradient`` background ``(S, S, 3)`` uint8 (read-only)."""
    t = (np.arange(image_size) + 0.5) / image_size
    top, bottom = (np.array(e, dtype=np.float64) for e in GRADIENT_ENDS)
    rows = np.rint(top + (bottom - top) * t[:, None]).astype(np.uint8)
    img = np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (image_size, image_size, 3)))
    img.setflags(write=False)
    return img


def _hash_noise(seeds: np.ndarray, n: int) -> np.ndarray:
    """``(len(seeds), n)`` integers in ``[-A, A]``: splitmix64 of ``seed * 2**32 + index``, mod ``2A + 1``, minus A."""
    h = (seeds.astype(np.uint64)[:, None] << np.uint64(32)) + np.arange(n, dtype=np.uint64)[None, :]
    h += np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps, as splitmix64 wants
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return (h % np.uint64(2 * NOISE_AMPLITUDE + 1)).astype(np.int16) - NOISE_AMPLITUDE


def noise_images(image_size: int, noise_seeds: list[int]) -> np.ndarray:
    """The ``noise`` backgrounds ``(N, S, S, 3)`` uint8 for noise seeds in ``[0, 2**31)``."""
    seeds = np.asarray(noise_seeds, dtype=np.int64).reshape(-1)
    if ((seeds < 0) | (seeds >= 2**31)).any():
        raise ValueError("noise_seed must be in [0, 2**31)")
    n = image_size * image_size * 3
    out = np.empty((len(seeds), image_size, image_size, 3), dtype=np.uint8)
    step = max(1, _SCATTER_PIXELS // n)  # bounds the uint64 temporaries
    for a in range(0, len(seeds), step):
        noise = _hash_noise(seeds[a : a + step], n).reshape(-1, image_size, image_size, 3)
        out[a : a + step] = np.array(NOISE_BASE, dtype=np.int16) + noise
    return out


def _background_ids(scenes: list[PublicScene]) -> np.ndarray:
    ids = {name: i for i, name in enumerate(BACKGROUND_NAMES)}
    bad = {sc.background for sc in scenes} - set(ids)
    if bad:
        raise ValueError(f"unknown background(s) {sorted(bad)}; expected one of {BACKGROUND_NAMES}")
    return np.array([ids[sc.background] for sc in scenes], dtype=np.int64)


def _render_backgrounds(scenes: list[PublicScene], image_size: int) -> np.ndarray:
    bg = _background_ids(scenes)
    images = np.empty((len(scenes), image_size, image_size, 3), dtype=np.uint8)
    for i, name in enumerate(BACKGROUND_NAMES):
        idx = np.flatnonzero(bg == i)
        if name in PLAIN_BACKGROUNDS:
            images[idx] = np.array(PLAIN_BACKGROUNDS[name], dtype=np.uint8)
        elif name == "gradient":
            images[idx] = gradient_image(image_size)
        elif len(idx):
            images[idx] = noise_images(image_size, [scenes[j].noise_seed for j in idx.tolist()])
    return images


def _object_table(scenes: list[PublicScene]) -> np.ndarray:
    """One row per object: image, shape, colour, size, texture, row, col, jitter y, jitter x."""
    ids = [{n: i for i, n in enumerate(names)} for names in (SHAPES, COLOURS, SIZES, TEXTURES)]
    try:
        rows = [(i, ids[0][o.shape], ids[1][o.colour], ids[2][o.size], ids[3][o.texture], o.row, o.col,
                 o.jitter_y, o.jitter_x) for i, sc in enumerate(scenes) for o in sc.objects]
    except KeyError as e:
        raise ValueError(f"unknown object attribute {e.args[0]!r}") from None
    return np.array(rows, dtype=np.float64).reshape(-1, 9)


def _scatter(images: np.ndarray, rows: np.ndarray, mask: np.ndarray, geometry: tuple[int, int, int, int],
             dark_cols: np.ndarray) -> None:
    """Write the mask pixels of objects ``rows`` (one shape and size class) into ``images``."""
    _, base, cell, jmax = geometry
    dy, dx = np.nonzero(mask)
    bright = np.array([PALETTE[c] for c in COLOURS], dtype=np.uint8)
    dark = np.array([DARK_PALETTE[c] for c in COLOURS], dtype=np.uint8)
    step = max(1, _SCATTER_PIXELS // len(dy))
    for a in range(0, len(rows), step):
        r = rows[a : a + step]
        img, col = r[:, 0].astype(np.int64), r[:, 2].astype(np.int64)
        y0 = base + r[:, 5].astype(np.int64) * cell + np.rint(r[:, 7] * jmax).astype(np.int64)
        x0 = base + r[:, 6].astype(np.int64) * cell + np.rint(r[:, 8] * jmax).astype(np.int64)
        use_dark = (r[:, 4] == 1)[:, None] & dark_cols[dx][None, :]
        rgb = np.where(use_dark[..., None], dark[col][:, None, :], bright[col][:, None, :])
        images[img[:, None], y0[:, None] + dy, x0[:, None] + dx] = rgb


def render_public_scenes(scenes: list[PublicScene], image_size: int) -> np.ndarray:
    """Draw scenes into a ``(N, H, W, 3)`` uint8 array (backgrounds, then one scatter per shape and size).

    Parameters
    ----------
    scenes : list of PublicScene
    image_size : int
        Side in pixels, in [16, 384].
    """
    _check_size(image_size)
    images = _render_backgrounds(scenes, image_size)
    table = _object_table(scenes)
    width = stripe_width(image_size)
    for size_id, size in enumerate(SIZES):
        geometry = _geometry(image_size, size)
        masks = public_shape_masks(geometry[0])
        dark_cols = (np.arange(geometry[0]) // width) % 2 == 1
        for shape_id in range(len(SHAPES)):
            rows = table[(table[:, 3] == size_id) & (table[:, 1] == shape_id)]
            if len(rows):
                _scatter(images, rows, masks[shape_id], geometry, dark_cols)
    return images


def render_public_scene(scene: PublicScene, image_size: int) -> np.ndarray:
    """Draw one scene as an ``(H, W, 3)`` uint8 array."""
    return render_public_scenes([scene], image_size)[0]


# ----------------------------------------------------------------------------- questions
def _anchors(objs: tuple[PublicObject, ...]) -> list[tuple[str, PublicObject]]:
    """Phrases that pick exactly one object: unique shapes, then unique colours (order of SHAPES, COLOURS)."""
    return synthetic._anchors(objs, SHAPES, COLOURS)


_related = synthetic._related  # the same relations on the same grid


def describe_scene(scene: PublicScene) -> str:
    """The canonical caption of a scene (grammar in the module docstring)."""
    phrases = []
    for o in sorted(scene.objects, key=lambda o: (o.row, o.col)):
        texture = "striped " if o.texture == "striped" else ""
        phrases.append(f"a {o.size} {texture}{o.colour} {o.shape}")
    return " , ".join(phrases)


_QA = tuple[str, str] | None
_Picks = tuple[float, float, float]


def _q_colour(objs: tuple[PublicObject, ...], p: _Picks) -> _QA:
    cands = sorted((o.shape, o.colour) for o in objs if sum(x.shape == o.shape for x in objs) == 1)
    if not cands:
        return None
    shape, colour = cands[int(p[0] * len(cands))]
    return f"what colour is the {shape} ?", colour


def _q_shape(objs: tuple[PublicObject, ...], p: _Picks) -> _QA:
    cands = sorted((o.colour, o.shape) for o in objs if sum(x.colour == o.colour for x in objs) == 1)
    if not cands:
        return None
    colour, shape = cands[int(p[0] * len(cands))]
    return f"what shape is the {colour} object ?", shape


def _q_count(objs: tuple[PublicObject, ...], p: _Picks) -> _QA:
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


def _q_position(objs: tuple[PublicObject, ...], p: _Picks) -> _QA:
    anchors = _anchors(objs)
    if not anchors:
        return None
    phrase, obj = anchors[int(p[1] * len(anchors))]
    if p[0] < 0.5:
        return f"which column is {phrase} in ?", COLUMN_WORDS[obj.col]
    return f"which row is {phrase} in ?", ROW_WORDS[obj.row]


def _q_relational(objs: tuple[PublicObject, ...], p: _Picks) -> _QA:
    cands = []
    for phrase, anchor in _anchors(objs):
        for rel in RELATIONS:
            hits = _related(objs, anchor, rel)
            if len(hits) == 1:
                for attr in ("colour", "shape"):
                    cands.append((f"what {attr} is the object {rel} {phrase} ?", getattr(hits[0], attr)))
    return cands[int(p[0] * len(cands))] if cands else None


def _q_size(objs: tuple[PublicObject, ...], p: _Picks) -> _QA:
    anchors = _anchors(objs)
    if not anchors:
        return None
    phrase, obj = anchors[int(p[0] * len(anchors))]
    return f"what size is {phrase} ?", obj.size


def _q_texture(objs: tuple[PublicObject, ...], p: _Picks) -> _QA:
    anchors = _anchors(objs)
    if not anchors:
        return None
    phrase, obj = anchors[int(p[0] * len(anchors))]
    if p[1] < 0.5:
        return f"what texture is {phrase} ?", obj.texture
    return f"is {phrase} striped ?", YES_NO[obj.texture == "striped"]


_MAKERS = {
    "colour": _q_colour, "shape": _q_shape, "count": _q_count, "position": _q_position,
    "relational": _q_relational, "size": _q_size, "texture": _q_texture,
}


def _make_question(scene: PublicScene, qtype: str, p: _Picks) -> _QA:
    """A (question, answer) of type ``qtype`` chosen with uniforms ``p``; None if none is well-defined."""
    if qtype == "caption":
        return CAPTION_QUESTION, describe_scene(scene)
    if qtype not in _MAKERS:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {PUBLIC_QUESTION_TYPES}")
    return _MAKERS[qtype](scene.objects, p)


@functools.cache
def all_public_questions() -> tuple[str, ...]:
    """Every question text the generator can produce (sorted)."""
    anchors = [f"the {s}" for s in SHAPES] + [f"the {c} object" for c in COLOURS]
    qs = [f"what colour is the {s} ?" for s in SHAPES]
    qs += [f"what shape is the {c} object ?" for c in COLOURS]
    qs += ["how many objects are there ?"]
    qs += [f"how many {c} objects are there ?" for c in COLOURS]
    qs += [f"how many {SHAPE_PLURALS[s]} are there ?" for s in SHAPES]
    qs += [f"which {axis} is {a} in ?" for axis in ("column", "row") for a in anchors]
    qs += [f"what {attr} is the object {rel} {a} ?"
           for attr in ("colour", "shape") for rel in RELATIONS for a in anchors]
    qs += [q.format(a) for q in ("what size is {} ?", "what texture is {} ?", "is {} striped ?") for a in anchors]
    qs += [CAPTION_QUESTION]
    return tuple(sorted(qs))


def public_vocabulary() -> list[str]:
    """Every token (``\\w+|[^\\w\\s]``) of every possible question and answer (captions included), sorted."""
    words = {t for q in all_public_questions() for t in _TOKEN_RE.findall(q)}
    words |= {t for a in PUBLIC_ANSWERS + CAPTION_WORDS for t in _TOKEN_RE.findall(a)}
    return sorted(words)


# ----------------------------------------------------------------------------- re-derivation
def _resolve(objs: tuple[PublicObject, ...], phrase: str) -> PublicObject:
    return synthetic._resolve(objs, phrase, SHAPES, COLOURS)


def _caption_by_cells(objs: tuple[PublicObject, ...]) -> str:
    """The caption, walking the grid cells in reading order."""
    at = {(o.row, o.col): o for o in objs}
    words: list[str] = []
    for cell in range(GRID * GRID):
        o = at.get(divmod(cell, GRID))
        if o is not None:
            words += [","] if words else []
            words += ["a", o.size] + (["striped"] if o.texture == "striped" else []) + [o.colour, o.shape]
    return " ".join(words)


def _answer_relational(objs: tuple[PublicObject, ...], attr: str, rel: str, phrase: str) -> str:
    anchor = _resolve(objs, phrase)
    axis, sign = {"left of": ("col", -1), "right of": ("col", 1), "above": ("row", -1), "below": ("row", 1)}[rel]
    hits = [o for o in objs if (getattr(o, axis) - getattr(anchor, axis)) * sign > 0]
    if len(hits) != 1:
        raise AmbiguousQuestion(f"{len(hits)} objects stand {rel} {phrase!r}")
    return getattr(hits[0], attr)


def _answer_count(objs: tuple[PublicObject, ...], subject: str) -> str:
    plural_to_shape = {v: k for k, v in SHAPE_PLURALS.items()}
    if subject == "objects":
        return NUMBER_WORDS[len(objs)]
    if (m := re.fullmatch(r"(\w+) objects", subject)) and m.group(1) in COLOURS:
        return NUMBER_WORDS[sum(o.colour == m.group(1) for o in objs)]
    if subject in plural_to_shape:
        return NUMBER_WORDS[sum(o.shape == plural_to_shape[subject] for o in objs)]
    raise AmbiguousQuestion(f"cannot parse count subject {subject!r}")


def answer_public_question(scene: PublicScene, question: str) -> str:
    """Derive the answer to a public-corpus question from a scene description.

    Raises
    ------
    AmbiguousQuestion
        If the question cannot be parsed or has no unique answer for the scene.
    """
    objs = scene.objects
    if question == CAPTION_QUESTION:
        return _caption_by_cells(objs)
    if m := re.fullmatch(r"what (colour|shape) is the object (left of|right of|above|below) (.+) \?", question):
        return _answer_relational(objs, m.group(1), m.group(2), m.group(3))
    if m := re.fullmatch(r"what colour is (the \w+) \?", question):
        return _resolve(objs, m.group(1)).colour
    if m := re.fullmatch(r"what shape is (the \w+ object) \?", question):
        return _resolve(objs, m.group(1)).shape
    if m := re.fullmatch(r"what (size|texture) is (.+) \?", question):
        return getattr(_resolve(objs, m.group(2)), m.group(1))
    if m := re.fullmatch(r"is (.+) striped \?", question):
        return "yes" if _resolve(objs, m.group(1)).texture == "striped" else "no"
    if m := re.fullmatch(r"how many (.+) are there \?", question):
        return _answer_count(objs, m.group(1))
    if m := re.fullmatch(r"which (column|row) is (.+) in \?", question):
        obj = _resolve(objs, m.group(2))
        return COLUMN_WORDS[obj.col] if m.group(1) == "column" else ROW_WORDS[obj.row]
    raise AmbiguousQuestion(f"cannot parse question {question!r}")


# ----------------------------------------------------------------------------- generation
def _check_count_and_seed(num_samples: int, seed: int) -> None:
    for name, value in (("num_samples", num_samples), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _draw_scenes(rng: np.random.Generator, m: int) -> list[PublicScene]:
    """``m`` random scenes (one round of rejection sampling)."""
    nobj = rng.integers(1, MAX_OBJECTS + 1, m).tolist()
    cells = np.argsort(rng.random((m, GRID * GRID)), axis=1, kind="stable")[:, :MAX_OBJECTS].tolist()
    sizes = (len(SHAPES), len(COLOURS), len(SIZES), len(TEXTURES))
    attrs = np.stack([rng.integers(0, k, (m, MAX_OBJECTS)) for k in sizes], axis=-1).tolist()
    jit = np.round(rng.random((m, MAX_OBJECTS, 2)) * 2.0 - 1.0, 3).tolist()
    bgs = rng.integers(0, len(BACKGROUND_NAMES), m).tolist()
    noise = rng.integers(1, 2**31, m).tolist()
    scenes = []
    for j in range(m):
        objs = tuple(
            PublicObject(SHAPES[a[0]], COLOURS[a[1]], SIZES[a[2]], TEXTURES[a[3]], c // GRID, c % GRID, *jt)
            for a, c, jt in zip(attrs[j][: nobj[j]], cells[j], jit[j])
        )
        bg = BACKGROUND_NAMES[bgs[j]]
        scenes.append(PublicScene(bg, objs, noise[j] if bg == "noise" else 0))
    return scenes


def _generate_block(seed: int, block: int) -> list[PublicSample]:
    """The ``BLOCK`` samples of block ``block`` (independent of how many samples were asked for)."""
    rng = np.random.default_rng([int(seed), block])
    qtypes = rng.integers(0, len(PUBLIC_QUESTION_TYPES), BLOCK).tolist()
    picks = rng.random((BLOCK, 3)).tolist()
    out: list[PublicSample | None] = [None] * BLOCK
    pending = list(range(BLOCK))
    while pending:  # rejection rounds: resample scenes that admit no question of their type
        retry = []
        for i, scene in zip(pending, _draw_scenes(rng, len(pending))):
            qtype = PUBLIC_QUESTION_TYPES[qtypes[i]]
            qa = _make_question(scene, qtype, picks[i])
            if qa is None:
                retry.append(i)
            else:
                out[i] = PublicSample(scene, qa[0], qa[1], qtype)
        pending = retry
    return out  # type: ignore[return-value]


def generate_public_samples(num_samples: int, seed: int) -> list[PublicSample]:
    """Scenes with questions and answers, without pixels (size-independent, prefix-stable).

    Parameters
    ----------
    num_samples : int
        Number of samples (>= 0).
    seed : int
        Non-negative seed; same arguments give the same output.
    """
    _check_count_and_seed(num_samples, seed)
    out: list[PublicSample] = []
    for block in range(-(-int(num_samples) // BLOCK)):
        out += _generate_block(seed, block)
    return out[:num_samples]


def generate_public_corpus(num_samples: int, seed: int, image_size: int = 32) -> list[VQAExample]:
    """Generate the deterministic public pretraining corpus.

    Parameters
    ----------
    num_samples : int
        Number of examples (>= 0).
    seed : int
        Non-negative seed; same arguments give bitwise-identical images and texts.
    image_size : int
        Image side in pixels, in [16, 384].

    Returns
    -------
    list of VQAExample
        One single-turn example per image, ``qtype`` from :data:`PUBLIC_QUESTION_TYPES`.
    """
    _check_size(image_size)
    samples = generate_public_samples(num_samples, seed)
    images = render_public_scenes([s.scene for s in samples], image_size)
    return [VQAExample(images[i], ((s.question, s.answer),), s.qtype) for i, s in enumerate(samples)]
