"""The pretraining recipe: model shape, corpus size and optimisation, with a ``--quick`` variant.

One frozen dataclass; ``python -m sim pretrain --set key=value`` overrides a field (kebab or
snake case). The defaults are the recipe of the shipped checkpoint (docs/foundation.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sim.settings import ConfigError


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    num_samples: int = 40_000  # public training corpus (sim/data/public_corpus.py)
    test_samples: int = 2_000  # public test set: drawn after the training corpus, same generator
    curve_samples: int = 400  # test samples scored at every curve point (the last point: all of them)
    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 128
    vision_layers: int = 2
    llm_layers: int = 2
    steps: int = 10_000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    eval_every: int = 1_000
    threads: int = 2  # torch threads: results are bitwise reproducible for a given thread count

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, pairs: dict[str, str]) -> Recipe:
        """A copy with ``key=value`` overrides (kebab or snake case), values coerced to the field's type."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, raw in pairs.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"unknown pretraining setting {key!r}; known: {', '.join(sorted(fields))}")
            kind = type(getattr(self, name))
            try:
                changes[name] = kind(float(raw)) if kind is int and "e" in str(raw).lower() else kind(raw)
            except ValueError:
                raise ConfigError(f"pretraining setting {key!r} must be {kind.__name__}, got {raw!r}") from None
        out = dataclasses.replace(self, **changes)
        out.check()
        return out

    def check(self) -> None:
        for name in ("num_samples", "test_samples", "curve_samples", "steps", "batch_size", "eval_every", "threads",
                     "hidden_size", "vision_layers", "llm_layers", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretraining setting {name!r} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size or self.hidden_size % 16:
            raise ConfigError("pretraining: patch-size must divide image-size and hidden-size must be a multiple of 16")
        if not 0 < self.lr <= 1:
            raise ConfigError(f"pretraining setting 'lr' must be in (0, 1], got {self.lr}")


RECIPE = Recipe()
QUICK = Recipe(num_samples=256, test_samples=64, curve_samples=32, image_size=16, hidden_size=32, vision_layers=1,
               llm_layers=1, steps=12, batch_size=8, warmup_steps=2, eval_every=6, threads=1)
