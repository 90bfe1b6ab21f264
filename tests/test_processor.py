"""Pixels go through the vision tower's own image processor (sim.model.processor, batches.pixels)."""

import numpy as np
import pytest
import torch
from conftest import SCRATCH
from transformers import SiglipVisionConfig, SiglipVisionModel

from sim.config import SplitConfig
from sim.data.batches import TokenisedExamples, pixels, process_images
from sim.model.processor import _TinyProcessor, image_processor

MEAN, STD = (0.2, 0.3, 0.4), (0.1, 0.2, 0.3)


def _data(n: int = 12, size: int = 32, seed: int = 0) -> TokenisedExamples:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    images[0, :, 0, :4] = [[0, 1, 127, 255]] * 3  # the extremes and the middle
    ids = tuple(np.zeros(2, np.int64) for _ in range(n))
    return TokenisedExamples(torch.from_numpy(images), ids, tuple(np.ones(2, bool) for _ in range(n)),
                             np.ones(n, np.int64), np.ones(n, np.int64), np.zeros(n, np.int64))


def _save_tower(path, size: int = 32, processor: bool = True, mean=MEAN, std=STD) -> str:
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=32, patch_size=8))
    tower.save_pretrained(path)
    if processor:
        _TinyProcessor(size={"height": size, "width": size}, image_mean=list(mean), image_std=list(std)).save_pretrained(path)
    return str(path)


def _cfg(vision_tower: str, image_size: int = 32) -> SplitConfig:
    return SplitConfig.from_run_config({**SCRATCH, "vision-tower": vision_tower, "image-size": image_size,
                                        "llm": "tiny"})


def test_tiny_default_equals_old_formula():
    cfg = _cfg("tiny")
    proc = image_processor(cfg)
    assert image_processor(cfg) is proc  # cached per config
    assert tuple(proc.image_mean) == tuple(proc.image_std) == (0.5, 0.5, 0.5)
    data = _data()
    idx = np.array([3, 0, 7, 0, 11])
    got = pixels(data, idx, proc)
    old = data.images[torch.from_numpy(idx)].float().div_(127.5).sub_(1.0)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 32, 32)
    assert (got - old).abs().max().item() <= 1e-6
    assert got[1, 0, 0, :4].tolist() == pytest.approx([-1.0, 1 / 127.5 - 1, 127 / 127.5 - 1, 1.0], abs=1e-6)


def test_pretrained_directory_brings_its_processor(tmp_path):
    cfg = _cfg(_save_tower(tmp_path / "tower"))
    proc = image_processor(cfg)
    assert tuple(proc.image_mean) == pytest.approx(MEAN) and tuple(proc.image_std) == pytest.approx(STD)
    data = _data()
    idx = np.array([0, 5, 2])
    got = pixels(data, idx, proc)
    x = data.images[idx].numpy().astype(np.float64)
    want = (x / 255.0 - np.array(MEAN)[None, :, None, None]) / np.array(STD)[None, :, None, None]
    assert got.dtype == torch.float32 and got.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    # and not the tiny default
    assert not torch.allclose(got, pixels(data, idx, image_processor(_cfg("tiny"))))


def test_directory_without_processor_config_is_a_clear_error(tmp_path):
    path = _save_tower(tmp_path / "bare", processor=False)
    with pytest.raises(ValueError, match="preprocessor_config.json") as e:
        image_processor(_cfg(path))
    assert path in str(e.value) and "save_pretrained" in str(e.value)


def test_processor_of_another_size_is_rejected(tmp_path):
    path = _save_tower(tmp_path / "tower64", size=64)
    with pytest.raises(ValueError, match=r"32x32 images into 64x64") as e:
        image_processor(_cfg(path))
    assert "image-size" in str(e.value)


def test_cached_pixels_equal_a_fresh_call_and_are_copies(tmp_path):
    proc = image_processor(_cfg(_save_tower(tmp_path / "tower")))
    data = _data(n=20, seed=1)
    first = pixels(data, np.array([4, 9, 4]), proc)
    fresh = process_images(data.images[torch.tensor([4, 9, 4])], proc)
    assert torch.equal(first, fresh)
    assert int(data._pixel_cache[id(proc)].done.sum()) == 2  # only the rows asked for
    first.zero_()  # callers may modify what they get
    again = pixels(data, np.array([9, 4, 17]), proc)
    assert torch.equal(again, process_images(data.images[torch.tensor([9, 4, 17])], proc))


def test_cache_off_above_the_budget(monkeypatch):
    from sim.data import batches

    monkeypatch.setattr(batches, "PIXEL_CACHE_MAX_BYTES", 10)
    proc = image_processor(_cfg("tiny"))
    data = _data(n=6)
    idx = np.array([5, 1, 5])
    for _ in range(2):
        got = batches.pixels(data, idx, proc)
        assert torch.equal(got, process_images(data.images[torch.from_numpy(idx)], proc))
    assert data._pixel_cache[id(proc)].disabled and data._pixel_cache[id(proc)].values is None

