"""Privacy case-study VQA sets built from images that ship inside scikit-image.

Three datasets, each ``generate_<name>_vqa(num_samples, seed, image_size)`` ->
``list[VQAExample]`` with one single-turn question per image, one-word answers
from a closed vocabulary, and ``qtype`` naming the question kind:

========== ================================ ===================================
dataset    question (``qtype``)              answers
========== ================================ ===================================
pathology  how much brown stain is there ?   low / medium / high
           (``stain_level``)
           is this tile strongly stained ?   no / yes
           (``stain_strength``)
           are there many nuclei ?           no / yes
           (``nuclei``)
retina     is there a large blood vessel ?   no / yes
           (``vessel``)
           how bright is this region ?       dark / medium / bright
           (``brightness``)
           which side is brighter ?          left / right
           (``side``)
faces      is there a face ?  (``face``)     no / yes
           how bright is the image ?         dark / medium / bright
           (``brightness``)
           is the contrast high ?            no / yes
           (``contrast``)
========== ================================ ===================================

Data flow: seeded tile / crop draw (-> jitter for faces) -> PIL bilinear resize
to ``image_size`` (Pillow widens the triangle filter when downscaling, so it
anti-aliases) -> rotate / mirror -> statistic of the *output* pixels -> answer.

Label rules (all statistics are computed from the returned ``(S, S, 3)`` uint8
image, so every answer except ``face`` is a function of the pixels the model
sees, given the thresholds below):

* pathology, with ``hed = skimage.color.rgb2hed(image)`` (Ruifrok & Johnston
  colour deconvolution into optical densities; computed by
  :func:`hematoxylin_dab`, same formula):

  - ``stain_level``: DAB-positive fraction ``mean(hed[..., 2] > 0.06)``. 0.06 is
    Otsu's threshold of the DAB channel of the whole 512x512 slide (0.0622),
    rounded; it segments the brown membranes and cytoplasm.
  - ``stain_strength``: mean DAB density of the DAB-positive pixels (the
    *intensity* a pathologist scores separately from the positive area), set to
    0 when fewer than 5% of the pixels are DAB-positive.
  - ``nuclei``: haematoxylin-positive fraction ``mean(hed[..., 0] > 0.035)``, a
    proxy for nuclear density, not a nucleus count. 0.035 marks the blue stromal
    and grey-blue epithelial nuclei at full resolution (15% of the slide); the
    Otsu value (0.024) also takes in DAB cross-talk.

* retina, with ``g`` the green channel and ``luma = image @ (0.2125, 0.7154,
  0.0721)`` (the weights of ``skimage.color.rgb2gray``):

  - ``vessel``: fraction of pixels whose black top-hat of ``g`` (grey closing
    with a ``k x k`` square, ``k = 2 * floor(3 * S / 32 + 0.5) + 1``, reflect
    borders, minus ``g``) is at least 12 grey levels. The top-hat keeps thin
    dark structures (vessels; also the few microaneurysm dots and the pigment
    rim of the optic disc). Almost every fundus tile holds some capillary, so
    "yes" means more vessel than the median tile, i.e. a clearly visible one.
  - ``brightness``: mean luma.
  - ``side``: mean luma of the right ``S // 2`` columns minus the left ``S // 2``
    columns (the middle column of odd sizes is ignored).

* faces, with ``v`` the grey value (all three channels are equal):

  - ``face``: the source image is one of the first 100 of ``lfw_subset()`` (a
    human label, not a pixel statistic; see below).
  - ``brightness``: mean of ``v``; ``contrast``: standard deviation of ``v``.

Cut points and margins. Apart from ``side`` and ``face``, each question splits a
statistic into ``K`` classes at reference quantiles, with a margin band around
every cut: tiles whose statistic falls in a band are never asked that question
(a new tile is drawn), so each answer is unambiguous and classes stay balanced.
With margin ``m = 0.05`` the band of cut ``k = 1 .. K-1`` spans the reference
quantiles ``[p_k - m, p_k + m]`` with ``p_k = k w + (2k - 1) m`` and
``w = (1 - 2 m (K - 1)) / K`` (``K = 2``: the 45th-55th percentiles; ``K = 3``:
26.7th-36.7th and 63.3rd-73.3rd), which leaves each class ``w`` of the
reference mass. The reference set is :data:`REFERENCE_TILES` tiles drawn with
:data:`REFERENCE_SEED` by the same sampler at the requested ``image_size``
(``numpy.quantile``, linear interpolation), so the cuts are deterministic; see
:func:`case_study_thresholds`. ``side`` uses the fixed band ``[-2, 2]`` grey
levels (left if below, right if above); ``face`` the fixed cut 0.5 on the 0/1
source label. An answer's index is the number of bands the statistic exceeds.
The reference costs about 1 s per dataset at 32 px (11 s at 224 px), once per
process and size. Bands at 32 px (rounded):

* pathology: stain_level (0.264, 0.386), (0.660, 0.742); stain_strength
  (0.0909, 0.0937); nuclei (0.121, 0.147)
* retina: vessel (0.103, 0.122); brightness (99.3, 100.3), (108.1, 113.4)
* faces: brightness (64.7, 86.2), (119.8, 131.6); contrast (36.2, 41.1)

Question kinds are drawn uniformly, so each gets a third of the examples, and
within a kind every answer gets between 0.75/K and 1.25/K of them (K answers;
the tests check this). Faces, whose sources are fixed in advance, come closest
to the bounds: ``medium`` brightness is about 0.39.

Sources and augmentation:

* pathology: square tiles of side U{64..128} px at a uniform position in the
  slide, rotated by a uniform multiple of 90 degrees and mirrored with p=1/2.
* retina: with p=3/4 a fundus tile (side U{64..160} px of ``retina()``, kept
  only if at least 98% of it lies inside the fundus disc, the disc being
  ``max(R, G, B) > 30`` after a 3-step binary opening and hole filling); with
  p=1/4 a tile of side U{48..96} px of ``microaneurysms()`` (grey, copied to
  three channels; about half the resolution of the fundus photograph, so
  vessels come out at similar widths). Rotations and mirroring as above.
* faces: every block of 200 consecutive examples uses each of the 200 source
  images once, in a seeded random order (pool ``all``; see "Pools"); :func:`faces_sources` returns that
  assignment (its first ``n`` entries do not depend on ``num_samples``), so a
  caller can split train/test *by source image*, e.g. an attacker's auxiliary
  set disjoint from the victim's images. Augmentation: a square crop of side
  U{21..25} px at a uniform offset, mirroring with p=1/2, then contrast scaled
  about the crop mean by a factor log-uniform in [0.8, 1.25] and brightness
  shifted by U[-0.1, 0.1] of full scale (clipped).

Pools: the federation's data versus public auxiliary data. Every generator takes
``pool`` in :data:`POOLS`. ``all`` (the default of the functions) draws from the
whole source images as described above. ``private`` and ``public`` split the
sources into two disjoint parts, so that an attacker can hold same-domain images
that no client holds (the feature-inversion study, ``experiments/inversion.py``):

* pathology and retina: the slide (``ihc``, 512 px) and the fundus photograph
  (``retina()``, 1411 px) are cut into a 4 x 4 grid of cells (128 and 352 px); the
  four anti-diagonal cells :data:`PUBLIC_CELLS` (a quarter of the area, one cell
  in every grid row and column, so every part of the tissue is represented) are
  public. A ``public`` tile lies inside one public cell (cell drawn uniformly,
  then side and position as above, within the cell); a ``private`` tile is drawn
  as in ``all`` and redrawn until it shares no pixel with a public cell (about a
  quarter to a third of the draws are kept). ``microaneurysms()`` is wholly
  private, so the retina public pool holds fundus tiles only (each draw that would
  be a microaneurysm tile becomes a fundus tile). The cells cover different
  tissue: measured answer shares at 32 px differ from the ``all`` pool (e.g.
  pathology ``stain_level`` low/medium/high is 0.33/0.30/0.37 in ``all``, about
  0.14/0.49/0.38 in ``public`` and 0.40/0.25/0.34 in ``private``), a realistic
  domain shift between an attacker's public images and a hospital's own.
* faces: :data:`PUBLIC_FACE_SOURCES` (images 80-99 and 180-199: 20 faces, 20
  non-faces) are public, the other 160 private; blocks of consecutive examples
  then cycle through the pool's sources (blocks of 160 or 40 instead of 200).

The ``dataset=pathology|retina|faces`` run values load the ``private`` pool (see
``sim/data/__init__.py``). Answer thresholds always come from the ``all`` reference,
so a statistic gets the same answer in every pool; class shares in the private
and public pools follow their own content (e.g. the bottom of the slide).

Provenance and licences (quoted from the scikit-image 0.26 docstrings; the
installed ``skimage/data/README.txt`` only explains ``download_all`` and holds
no credits):

* ``immunohistochemistry()`` (``ihc.png``, 512x512 RGB): "This picture shows
  colonic glands where the IHC expression of FHL2 protein is revealed with DAB.
  Hematoxylin counterstaining is applied to enhance the negative parts of the
  tissue. This image was acquired at the Center for Microscopy And Molecular
  Imaging (CMMI). No known copyright restrictions."
* ``retina()`` (``retina.jpg``, 1411x1411 RGB): "This image was downloaded from
  wikimedia <https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg>.
  This file is made available under the Creative Commons CC0 1.0 Universal
  Public Domain Dedication." Reference: Häggström, M. (2014), "Medical gallery
  of Mikael Häggström 2014", WikiJournal of Medicine 1(2),
  doi:10.15347/wjm/2014.008.
* ``microaneurysms()`` (``microaneurysms.png``, 102x102 grey): "Detail from an
  image of the retina (green channel). The image is a crop of image 07_dr.JPG
  from the High-Resolution Fundus (HRF) Image Database [...] No copyright
  restrictions. CC0 given by owner (Andreas Maier)." Reference: Budai et al.
  (2013), Robust Vessel Segmentation in Fundus Images, Int. J. Biomed. Imaging,
  doi:10.1155/2013/154860.
* ``lfw_subset()`` (``lfw_subset.npy``, 200x25x25): "100 first images are faces
  and subsequent 100 are non-faces. [...] The faces were randomly selected from
  the LFW dataset and the non-faces were extracted from the background of the
  same dataset. The cropped ROIs have been resized to a 25 x 25 pixels."
  (Huang et al., Labeled Faces in the Wild, http://vis-www.cs.umass.edu/lfw/).
  scikit-image states no licence for this file. LFW faces are news photographs
  of real, named people: treat them as personal data (which is the point of the
  case study) and do not publish derived images. The array is float64 in [0, 1]
  although the docstring says uint8; it is rounded to ``uint8(255 v)`` here.
  The face / non-face order was also checked by eye: 0-99 are centred faces,
  100-199 background, though a few background crops hold part of a face (125 an
  eye, 130 a mouth; 124, 126 and 180 fragments), so "no" means "no centred face".

Confounds worth knowing in privacy experiments: non-face crops are darker on
average (mean grey 76 vs 116 before jitter), so ``brightness`` carries face
information; ``microaneurysms()`` tiles are grey and all show vessels.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import data as skdata
from skimage.color.colorconv import hed_from_rgb

from .types import VQAExample

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 384
REFERENCE_SEED = 20240601
REFERENCE_TILES = 4096
MARGIN = 0.05

DAB_THRESHOLD = 0.06
HEMATOXYLIN_THRESHOLD = 0.035
MIN_POSITIVE_FRACTION = 0.05
PATHOLOGY_TILE_SIDES = (64, 128)

FUNDUS_TILE_SIDES = (64, 160)
MICROANEURYSM_TILE_SIDES = (48, 96)
MICROANEURYSM_PROBABILITY = 0.25
FUNDUS_LEVEL = 30
MIN_INSIDE_FRACTION = 0.98
TOPHAT_LEVEL = 12
SIDE_MARGIN = 2.0
LUMA_WEIGHTS = (0.2125, 0.7154, 0.0721)

NUM_FACES = 100
NUM_FACE_SOURCES = 200
FACE_CROP_SIDES = (21, 25)
FACE_CONTRAST_RANGE = (0.8, 1.25)
FACE_BRIGHTNESS_SHIFT = 0.1

POOLS = ("all", "private", "public")
POOL_GRID = 4  # slides are cut into a 4 x 4 grid of cells ...
PUBLIC_CELLS = ((0, 3), (1, 1), (2, 2), (3, 0))  # ... whose anti-diagonal (row, column) cells are public
PUBLIC_FACE_SOURCES = tuple(range(80, 100)) + tuple(range(180, 200))  # 20 faces + 20 non-faces

_CHUNK_PIXELS = 1 << 22
_MAX_ROUNDS = 10_000
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class Question(NamedTuple):
    """One question kind: text, the statistic it thresholds, answers in ascending order of it."""

    qtype: str
    text: str
    statistic: str
    answers: tuple[str, ...]
    fixed_bands: tuple[tuple[float, float], ...] | None = None  # None: reference-quantile bands


class _Spec(NamedTuple):
    """How one dataset draws sources and tiles, renders them and measures them."""

    name: str
    questions: tuple[Question, ...]
    sources: Callable[[np.random.Generator, int, str], np.ndarray]
    draw: Callable[[np.random.Generator, np.ndarray, str], dict[str, np.ndarray]]
    render: Callable[[dict[str, np.ndarray], int], np.ndarray]
    statistics: Callable[[np.ndarray, np.ndarray, int], dict[str, np.ndarray]]


# ----------------------------------------------------------------------------- helpers
def _check_args(num_samples: int, seed: int, image_size: int, pool: str = "all") -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    for key, value, lo in (("num_samples", num_samples, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
            raise ValueError(f"{key} must be an int >= {lo}, got {value!r}")
    if (isinstance(image_size, bool) or not isinstance(image_size, int | np.integer)
            or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
        raise ValueError(f"image_size must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}")


def _resize(tile: np.ndarray, size: int) -> np.ndarray:
    """PIL bilinear resize of an (h, w) or (h, w, 3) uint8 tile to ``size`` x ``size``."""
    img = Image.fromarray(np.ascontiguousarray(tile))
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))


def _orient(tile: np.ndarray, rot: int, flip: int) -> np.ndarray:
    tile = np.rot90(tile, int(rot))
    return tile[:, ::-1] if flip else tile


def _square_tiles(rng: np.random.Generator, n: int, sides: tuple[int, int], height: int, width: int) -> dict:
    side = rng.integers(sides[0], sides[1] + 1, n)
    y = np.floor(rng.random(n) * (height - side + 1)).astype(np.int64)
    x = np.floor(rng.random(n) * (width - side + 1)).astype(np.int64)
    return {"side": side, "y": y, "x": x}


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _quantile_bands(values: np.ndarray, k: int) -> tuple[tuple[float, float], ...]:
    """Margin bands around the ``k - 1`` cuts that leave each class the same reference mass."""
    w = (1.0 - 2.0 * MARGIN * (k - 1)) / k
    bands = []
    for j in range(1, k):
        p = j * w + (2 * j - 1) * MARGIN
        lo, hi = np.quantile(values, [p - MARGIN, p + MARGIN])
        bands.append((float(lo), float(hi)))
    return tuple(bands)


def classify(values: np.ndarray, bands: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Answer index per value (number of bands strictly exceeded), or -1 inside a band."""
    v = np.asarray(values, dtype=np.float64)[:, None]
    b = np.asarray(bands, dtype=np.float64).reshape(-1, 2)
    inside = ((v >= b[:, 0]) & (v <= b[:, 1])).any(axis=1)
    return np.where(inside, -1, (v > b[:, 1]).sum(axis=1))


# ----------------------------------------------------------------------------- pathology
@functools.cache
def _ihc() -> np.ndarray:
    img = np.ascontiguousarray(skdata.immunohistochemistry())
    img.setflags(write=False)
    return img


def _touches_public(y: np.ndarray, x: np.ndarray, side: np.ndarray, height: int, width: int) -> np.ndarray:
    """Whether each tile shares a pixel with a public cell of a ``height`` x ``width`` image."""
    ch, cw = height // POOL_GRID, width // POOL_GRID
    hit = np.zeros(len(y), dtype=bool)
    for r, c in PUBLIC_CELLS:
        hit |= (y < (r + 1) * ch) & (y + side > r * ch) & (x < (c + 1) * cw) & (x + side > c * cw)
    return hit


def _pool_tiles(rng: np.random.Generator, n: int, sides: tuple[int, int], height: int, width: int, pool: str) -> dict:
    """Square tiles of a pool: anywhere (``all``), inside one public cell, or touching none (``private``)."""
    if pool == "all":
        return _square_tiles(rng, n, sides, height, width)
    if pool == "public":
        ch, cw = height // POOL_GRID, width // POOL_GRID
        if sides[1] > min(ch, cw):
            raise ValueError(f"tiles of side {sides[1]} do not fit the {ch} x {cw} public cells")
        cell = np.asarray(PUBLIC_CELLS)[rng.integers(0, len(PUBLIC_CELLS), n)].reshape(n, 2)
        t = _square_tiles(rng, n, sides, ch, cw)
        return {"side": t["side"], "y": t["y"] + cell[:, 0] * ch, "x": t["x"] + cell[:, 1] * cw}
    out = {k: np.zeros(n, np.int64) for k in ("side", "y", "x")}
    todo = np.arange(n)
    while todo.size:  # rejection: private tiles touch no public cell
        t = _square_tiles(rng, len(todo), sides, height, width)
        ok = ~_touches_public(t["y"], t["x"], t["side"], height, width)
        for k in out:
            out[k][todo[ok]] = t[k][ok]
        todo = todo[~ok]
    return out


def _pathology_sources(rng: np.random.Generator, n: int, pool: str) -> np.ndarray:
    return np.zeros(n, dtype=np.int64)


def _pathology_draw(rng: np.random.Generator, sources: np.ndarray, pool: str) -> dict[str, np.ndarray]:
    n = len(sources)
    params = _pool_tiles(rng, n, PATHOLOGY_TILE_SIDES, *_ihc().shape[:2], pool)
    params["rot"] = rng.integers(0, 4, n)
    params["flip"] = rng.integers(0, 2, n)
    return params


def _pathology_render(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    src = _ihc()
    out = np.empty((len(p["side"]), size, size, 3), dtype=np.uint8)
    for i, (s, y, x, r, f) in enumerate(zip(p["side"], p["y"], p["x"], p["rot"], p["flip"])):
        out[i] = _orient(_resize(src[y:y + s, x:x + s], size), r, f)
    return out


@functools.cache
def _optical_density_table() -> np.ndarray:
    """``log(max(v / 255, 1e-6)) / log(1e-6)`` for every uint8 ``v``: the per-channel step of ``rgb2hed``."""
    table = np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)
    table.setflags(write=False)
    return table


def hematoxylin_dab(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and DAB optical densities of uint8 RGB ``(..., 3)`` pixels, as ``skimage.color.rgb2hed``.

    Same formula and stain matrix (``hed_from_rgb``), with the logarithm read
    from a 256-entry table: 5x faster, equal to ``rgb2hed`` to 1 ulp.
    """
    stains = np.maximum(_optical_density_table()[images] @ hed_from_rgb[:, [0, 2]], 0.0)
    return stains[..., 0], stains[..., 1]


def pathology_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """DAB-positive fraction, DAB intensity and haematoxylin-positive fraction of ``(N, S, S, 3)`` tiles."""
    hem, dab = hematoxylin_dab(images)
    positive = dab > DAB_THRESHOLD
    n_pos = positive.sum(axis=(1, 2))
    fraction = n_pos / (images.shape[1] * images.shape[2])
    intensity = (dab * positive).sum(axis=(1, 2)) / np.maximum(n_pos, 1)
    strength = np.where(fraction >= MIN_POSITIVE_FRACTION, intensity, 0.0)
    return {"dab_fraction": fraction, "dab_strength": strength,
            "hematoxylin_fraction": (hem > HEMATOXYLIN_THRESHOLD).mean(axis=(1, 2))}


PATHOLOGY_QUESTIONS: tuple[Question, ...] = (
    Question("stain_level", "how much brown stain is there ?", "dab_fraction", ("low", "medium", "high")),
    Question("stain_strength", "is this tile strongly stained ?", "dab_strength", ("no", "yes")),
    Question("nuclei", "are there many nuclei ?", "hematoxylin_fraction", ("no", "yes")),
)


# ----------------------------------------------------------------------------- retina
@functools.cache
def _fundus() -> tuple[np.ndarray, np.ndarray]:
    """The fundus photograph and the integral image ``(H+1, W+1)`` of its disc mask."""
    img = np.ascontiguousarray(skdata.retina())
    mask = ndi.binary_fill_holes(ndi.binary_opening(img.max(axis=-1) > FUNDUS_LEVEL, iterations=3))
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    img.setflags(write=False)
    integral.setflags(write=False)
    return img, integral


@functools.cache
def _microaneurysms() -> np.ndarray:
    img = np.ascontiguousarray(skdata.microaneurysms())
    img.setflags(write=False)
    return img


def fundus_inside_fraction(y: np.ndarray, x: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Fraction of each ``side`` x ``side`` tile at ``(y, x)`` of ``retina()`` that lies in the fundus disc."""
    _, ii = _fundus()
    inside = ii[y + side, x + side] - ii[y, x + side] - ii[y + side, x] + ii[y, x]
    return inside / (side.astype(np.float64) ** 2)


def _retina_sources(rng: np.random.Generator, n: int, pool: str) -> np.ndarray:
    ma = rng.random(n) < MICROANEURYSM_PROBABILITY
    return (ma & (pool != "public")).astype(np.int64)  # microaneurysms() is wholly private


def _retina_draw(rng: np.random.Generator, sources: np.ndarray, pool: str) -> dict[str, np.ndarray]:
    n = len(sources)
    fundus, _ = _fundus()
    side, y, x = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    ma = np.flatnonzero(sources == 1)
    t = _square_tiles(rng, len(ma), MICROANEURYSM_TILE_SIDES, *_microaneurysms().shape)
    side[ma], y[ma], x[ma] = t["side"], t["y"], t["x"]
    todo = np.flatnonzero(sources == 0)
    while todo.size:  # rejection: keep tiles inside the fundus disc
        t = _pool_tiles(rng, len(todo), FUNDUS_TILE_SIDES, *fundus.shape[:2], pool)
        ok = fundus_inside_fraction(t["y"], t["x"], t["side"]) >= MIN_INSIDE_FRACTION
        side[todo[ok]], y[todo[ok]], x[todo[ok]] = t["side"][ok], t["y"][ok], t["x"][ok]
        todo = todo[~ok]
    return {"source": sources, "side": side, "y": y, "x": x,
            "rot": rng.integers(0, 4, n), "flip": rng.integers(0, 2, n)}


def _retina_render(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    fundus, _ = _fundus()
    ma = _microaneurysms()
    out = np.empty((len(p["side"]), size, size, 3), dtype=np.uint8)
    for i, (src, s, y, x, r, f) in enumerate(zip(p["source"], p["side"], p["y"], p["x"], p["rot"], p["flip"])):
        if src == 0:
            out[i] = _orient(_resize(fundus[y:y + s, x:x + s], size), r, f)
        else:
            out[i] = _rgb(_orient(_resize(ma[y:y + s, x:x + s], size), r, f))
    return out


def tophat_size(image_size: int) -> int:
    """Side ``k`` of the square closing footprint of the vessel rule (7 at 32 px)."""
    return 2 * math.floor(3 * image_size / 32 + 0.5) + 1


def retina_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Vessel fraction, mean luma and right-minus-left luma of ``(N, S, S, 3)`` tiles."""
    size = images.shape[2]
    k = tophat_size(size)
    g = images[..., 1]
    tophat = ndi.grey_closing(g, size=(1, k, k), mode="reflect") - g  # closing >= g: no uint8 wrap
    luma = images @ np.asarray(LUMA_WEIGHTS)
    half = size // 2
    return {"vessel_fraction": (tophat >= TOPHAT_LEVEL).mean(axis=(1, 2)),
            "luma": luma.mean(axis=(1, 2)),
            "luma_right_minus_left": luma[:, :, size - half:].mean(axis=(1, 2)) - luma[:, :, :half].mean(axis=(1, 2))}


RETINA_QUESTIONS: tuple[Question, ...] = (
    Question("vessel", "is there a large blood vessel ?", "vessel_fraction", ("no", "yes")),
    Question("brightness", "how bright is this region ?", "luma", ("dark", "medium", "bright")),
    Question("side", "which side is brighter ?", "luma_right_minus_left", ("left", "right"),
             ((-SIDE_MARGIN, SIDE_MARGIN),)),
)


# ----------------------------------------------------------------------------- faces
@functools.cache
def _lfw() -> np.ndarray:
    faces = np.rint(np.clip(skdata.lfw_subset(), 0.0, 1.0) * 255.0).astype(np.uint8)
    faces.setflags(write=False)
    return faces


def face_pool_sources(pool: str) -> np.ndarray:
    """The ``lfw_subset()`` indices a pool draws from (``public``: :data:`PUBLIC_FACE_SOURCES`)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    ids = np.arange(NUM_FACE_SOURCES)
    public = np.isin(ids, PUBLIC_FACE_SOURCES)
    return {"all": ids, "private": ids[~public], "public": ids[public]}[pool]


def _faces_sources(rng: np.random.Generator, n: int, pool: str) -> np.ndarray:
    ids = face_pool_sources(pool)
    blocks = [ids[rng.permutation(len(ids))] for _ in range(-(-n // len(ids)))]
    return np.concatenate(blocks)[:n].astype(np.int64) if blocks else np.zeros(0, np.int64)


def _faces_draw(rng: np.random.Generator, sources: np.ndarray, pool: str) -> dict[str, np.ndarray]:
    n = len(sources)
    full = _lfw().shape[1]
    params = _square_tiles(rng, n, FACE_CROP_SIDES, full, full)
    params["source"] = sources
    params["flip"] = rng.integers(0, 2, n)
    lo, hi = np.log(FACE_CONTRAST_RANGE)
    params["contrast"] = np.exp(rng.uniform(lo, hi, n))
    params["shift"] = rng.uniform(-FACE_BRIGHTNESS_SHIFT, FACE_BRIGHTNESS_SHIFT, n) * 255.0
    return params


def _faces_render(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    lfw = _lfw()
    out = np.empty((len(p["side"]), size, size), dtype=np.uint8)
    for i, (src, s, y, x, f, a, b) in enumerate(
            zip(p["source"], p["side"], p["y"], p["x"], p["flip"], p["contrast"], p["shift"])):
        crop = lfw[src, y:y + s, x:x + s].astype(np.float64)
        m = crop.mean()
        crop = np.rint(np.clip((crop - m) * a + m + b, 0.0, 255.0)).astype(np.uint8)
        out[i] = _orient(_resize(crop, size), 0, f)
    return _rgb(out)


def faces_statistics(images: np.ndarray, sources: np.ndarray) -> dict[str, np.ndarray]:
    """Face label (1.0 for sources < 100), mean and standard deviation of the grey value."""
    v = images[..., 0].astype(np.float64)
    return {"is_face": (np.asarray(sources) < NUM_FACES).astype(np.float64),
            "brightness": v.mean(axis=(1, 2)), "contrast": v.std(axis=(1, 2))}


FACES_QUESTIONS: tuple[Question, ...] = (
    Question("face", "is there a face ?", "is_face", ("no", "yes"), ((0.5, 0.5),)),
    Question("brightness", "how bright is the image ?", "brightness", ("dark", "medium", "bright")),
    Question("contrast", "is the contrast high ?", "contrast", ("no", "yes")),
)


# ----------------------------------------------------------------------------- engine
_SPECS: dict[str, _Spec] = {
    "pathology": _Spec("pathology", PATHOLOGY_QUESTIONS, _pathology_sources, _pathology_draw, _pathology_render,
                       lambda im, src, size: pathology_statistics(im)),
    "retina": _Spec("retina", RETINA_QUESTIONS, _retina_sources, _retina_draw, _retina_render,
                    lambda im, src, size: retina_statistics(im)),
    "faces": _Spec("faces", FACES_QUESTIONS, _faces_sources, _faces_draw, _faces_render,
                   lambda im, src, size: faces_statistics(im, src)),
}


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent generators for sources, question kinds and tiles (sources never depend on the rest)."""
    sources, kinds, tiles = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))
    return sources, kinds, tiles


def _measure(spec: _Spec, params: dict[str, np.ndarray], sources: np.ndarray, image_size: int,
             keep_images: bool) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """Render and measure tiles in chunks of bounded size."""
    n = len(sources)
    step = max(1, _CHUNK_PIXELS // (image_size * image_size))
    images, stats = [], []
    for a in range(0, n, step):
        sub = {k: v[a:a + step] for k, v in params.items()}
        imgs = spec.render(sub, image_size)
        stats.append(spec.statistics(imgs, sources[a:a + step], image_size))
        if keep_images:
            images.append(imgs)
    if not stats:
        stats.append(spec.statistics(np.zeros((0, image_size, image_size, 3), np.uint8), sources, image_size))
    merged = {k: np.concatenate([s[k] for s in stats]) for k in stats[0]}
    if not keep_images:
        return None, merged
    return (np.concatenate(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)), merged


@functools.lru_cache(maxsize=32)
def _bands(name: str, image_size: int) -> tuple[tuple[tuple[float, float], ...], ...]:
    spec = _SPECS[name]
    src_rng, _, tile_rng = _streams(REFERENCE_SEED)
    sources = spec.sources(src_rng, REFERENCE_TILES, "all")
    _, stats = _measure(spec, spec.draw(tile_rng, sources, "all"), sources, image_size, keep_images=False)
    return tuple(q.fixed_bands if q.fixed_bands is not None else _quantile_bands(stats[q.statistic], len(q.answers))
                 for q in spec.questions)


def case_study_thresholds(name: str, image_size: int) -> dict[str, tuple[tuple[float, float], ...]]:
    """The ``(low, high)`` margin bands of every question of a dataset at an image size.

    A statistic below the first band gets the first answer, between bands ``j``
    and ``j + 1`` answer ``j + 1``, above the last band the last answer; inside
    a band the question is not asked. Computed once per process and size.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown case-study dataset {name!r}; expected one of {tuple(_SPECS)}")
    _check_args(0, 0, image_size)
    return {q.qtype: b for q, b in zip(_SPECS[name].questions, _bands(name, int(image_size)))}


def _generate(name: str, num_samples: int, seed: int, image_size: int, pool: str) -> list[VQAExample]:
    _check_args(num_samples, seed, image_size, pool)
    spec = _SPECS[name]
    n, size = int(num_samples), int(image_size)
    bands = _bands(name, size)
    src_rng, q_rng, tile_rng = _streams(seed)
    sources = spec.sources(src_rng, n, pool)
    kinds = q_rng.integers(0, len(spec.questions), n)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    answers = np.full(n, -1, dtype=np.int64)
    pending = np.arange(n)
    rounds = 0
    while pending.size:  # rejection rounds: redraw tiles whose statistic falls in a band
        if rounds == _MAX_ROUNDS:
            raise RuntimeError(f"{name}: {pending.size} examples still ambiguous after {_MAX_ROUNDS} rounds")
        rounds += 1
        imgs, stats = _measure(spec, spec.draw(tile_rng, sources[pending], pool), sources[pending], size,
                               keep_images=True)
        cls = np.full(len(pending), -1, dtype=np.int64)
        for qi, q in enumerate(spec.questions):
            sel = kinds[pending] == qi
            cls[sel] = classify(stats[q.statistic][sel], bands[qi])
        ok = cls >= 0
        images[pending[ok]] = imgs[ok]
        answers[pending[ok]] = cls[ok]
        pending = pending[~ok]
    qs = spec.questions
    return [VQAExample(images[i], ((qs[kinds[i]].text, qs[kinds[i]].answers[answers[i]]),), qs[kinds[i]].qtype)
            for i in range(n)]


# ----------------------------------------------------------------------------- public API
def generate_pathology_vqa(num_samples: int, seed: int, image_size: int = 32, pool: str = "all") -> list[VQAExample]:
    """IHC pathology tiles (``immunohistochemistry()``) with stain and nuclei questions.

    Parameters
    ----------
    num_samples : int
        Number of examples (>= 0).
    seed : int
        Non-negative seed; same arguments give bitwise-identical output.
    image_size : int
        Image side in pixels, in [16, 384].
    pool : {"all", "private", "public"}
        Which part of the source images to draw from (see "Pools" in the module
        docstring); ``dataset=pathology`` runs use ``private``.
    """
    return _generate("pathology", num_samples, seed, image_size, pool)


def generate_retina_vqa(num_samples: int, seed: int, image_size: int = 32, pool: str = "all") -> list[VQAExample]:
    """Fundus tiles (``retina()``, ``microaneurysms()``) with vessel and brightness questions (args as above)."""
    return _generate("retina", num_samples, seed, image_size, pool)


def generate_faces_vqa(num_samples: int, seed: int, image_size: int = 32, pool: str = "all") -> list[VQAExample]:
    """Augmented ``lfw_subset()`` crops with face, brightness and contrast questions (args as above).

    Example ``i`` shows source image ``faces_sources(num_samples, seed, pool)[i]``.
    """
    return _generate("faces", num_samples, seed, image_size, pool)


def faces_sources(num_samples: int, seed: int, pool: str = "all") -> np.ndarray:
    """Source index in ``lfw_subset()`` (0-99 faces, 100-199 non-faces) of each example of the faces set.

    Independent of ``image_size``, and a prefix of the same call with a larger
    ``num_samples``. Split by source, e.g.
    ``victim = np.isin(faces_sources(n, seed), victim_image_ids)``.
    """
    _check_args(num_samples, seed, MIN_IMAGE_SIZE, pool)
    return _faces_sources(_streams(seed)[0], int(num_samples), pool)


CASE_STUDY_DATASETS: dict[str, Callable[[int, int, int], list[VQAExample]]] = {
    "pathology": generate_pathology_vqa,
    "retina": generate_retina_vqa,
    "faces": generate_faces_vqa,
}


def case_study_questions(name: str) -> tuple[Question, ...]:
    """The question kinds of a dataset (qtype, text, statistic, answers)."""
    if name not in _SPECS:
        raise ValueError(f"unknown case-study dataset {name!r}; expected one of {tuple(_SPECS)}")
    return _SPECS[name].questions


def _vocabulary(name: str) -> list[str]:
    words: set[str] = set()
    for q in case_study_questions(name):
        for text in (q.text, *q.answers):
            words.update(_TOKEN_RE.findall(text))
    return sorted(words)


def pathology_vocabulary() -> list[str]:
    """Every token (``\\w+|[^\\w\\s]``) of every pathology question and answer, sorted."""
    return _vocabulary("pathology")


def retina_vocabulary() -> list[str]:
    """Every token of every retina question and answer, sorted."""
    return _vocabulary("retina")


def faces_vocabulary() -> list[str]:
    """Every token of every faces question and answer, sorted."""
    return _vocabulary("faces")


CASE_STUDY_VOCABULARIES: dict[str, Callable[[], list[str]]] = {
    "pathology": pathology_vocabulary,
    "retina": retina_vocabulary,
    "faces": faces_vocabulary,
}
