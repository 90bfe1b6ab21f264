"""The vision tower's image processor: how uint8 images become the tower's pixel values.

``vision-tower=tiny`` gets a ``SiglipImageProcessor`` (PIL backend) that resizes to
``image-size`` (a no-op: the data is already at that size), rescales by 1/255 and
normalises with SigLIP's mean = std = 0.5, i.e. ``x / 127.5 - 1``. A pretrained tower
brings its own processor (``preprocessor_config.json`` next to the weights, loaded with
``AutoImageProcessor.from_pretrained``), so a CLIP tower gets CLIP's mean and std.
:func:`sim.data.batches.pixels` runs the processor.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, BaseImageProcessor

from sim.config import TINY, SplitConfig

try:  # transformers 5: the PIL backend under its own name (no torchvision needed, no fallback warning)
    from transformers import SiglipImageProcessorPil as _TinyProcessor
except ImportError:  # transformers 4: the (PIL/numpy) slow processor
    from transformers import SiglipImageProcessor as _TinyProcessor

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


@functools.lru_cache(maxsize=8)
def image_processor(cfg: SplitConfig) -> BaseImageProcessor:
    """The image processor of ``cfg.vision_tower``, checked to output ``image-size`` pixels.

    ``tiny``: SigLIP's (resize to ``image-size``, rescale 1/255, mean = std = 0.5).
    Otherwise ``AutoImageProcessor.from_pretrained(vision_tower)``; a local directory
    without ``preprocessor_config.json`` raises ``ValueError`` saying how to add one.
    Cached per config (one instance per worker process)."""
    if cfg.vision_tower_source == TINY:
        proc = _TinyProcessor(
            size={"height": cfg.image_size, "width": cfg.image_size},
            do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD),
        )
    else:
        proc = _load(cfg.vision_tower_source)
    _check_size(proc, cfg)
    return proc


def _load(ref: str) -> BaseImageProcessor:
    path = Path(ref).expanduser()
    missing = (
        f"vision-tower {ref!r} has no image processor: the directory lacks preprocessor_config.json. "
        "Save the tower's image processor next to its weights, e.g. "
        f"AutoImageProcessor.from_pretrained(<the tower's hub id>).save_pretrained({ref!r})"
    )
    if path.is_dir() and not any((path / f).is_file() for f in PROCESSOR_FILES):
        raise ValueError(missing)
    try:
        return AutoImageProcessor.from_pretrained(ref)
    except OSError as e:
        raise ValueError(f"{missing} ({e})") from e


def _check_size(proc: BaseImageProcessor, cfg: SplitConfig) -> None:
    """The processor must turn an ``image-size`` square into an ``image-size`` square:
    run it once on a black image (covers resize, shortest-edge and centre-crop settings)."""
    probe = np.zeros((cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    shape = tuple(proc(images=[probe], return_tensors="pt").pixel_values.shape)
    want = (1, 3, cfg.image_size, cfg.image_size)
    if shape != want:
        raise ValueError(
            f"the image processor of vision-tower {cfg.vision_tower_source!r} turns {cfg.image_size}x{cfg.image_size} images "
            f"into {shape[-2]}x{shape[-1]} pixel values (size={getattr(proc, 'size', None)}, "
            f"crop_size={getattr(proc, 'crop_size', None)}); set image-size to the tower's input size or save a "
            f"processor whose output size is {cfg.image_size}"
        )
