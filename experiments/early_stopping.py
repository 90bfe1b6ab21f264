"""Train an attacker until its validation score stops improving, keeping the best weights.

Early stopping with a patience and a max-steps cap, and step decay of the learning rate on
each plateau (reduce-on-plateau): every ``eval_every`` steps the model is scored on held-out
data; a score above the best by more than ``min_delta`` is kept (a copy of the weights). After
``patience`` evaluations without one, the best weights are restored and the learning rate is
multiplied by ``lr_factor``, at most ``lr_drops`` times; the next plateau ends the training::

    step() -> train loss  (x eval_every)  -> evaluate() -> score  -> improved? keep : wait
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class StopRule:
    """When to evaluate, when to give up, the hard cap."""

    max_steps: int = 6000
    eval_every: int = 50
    patience: int = 6  # evaluations without improvement before a learning-rate drop or the stop
    min_delta: float = 0.01  # an improvement smaller than this does not count
    lr_drops: int = 2
    lr_factor: float = 0.3

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError(f"max_steps, eval_every and patience must be >= 1: {self}")


@dataclass
class LearningCurve:
    """One point per evaluation: the step, the mean train loss since the last one, the score."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_score: list[float] = field(default_factory=list)
    best_step: int = 0
    best_score: float = float("-inf")
    stopped_early: bool = False  # True: a plateau ended it; False: max_steps did

    @property
    def steps_run(self) -> int:
        return self.step[-1] if self.step else 0


def train_until_plateau(model: nn.Module, opt: torch.optim.Optimizer, step: Callable[[], float],
                        evaluate: Callable[[], float], rule: StopRule) -> LearningCurve:
    """Run ``step`` (one optimiser step, returns its loss) until ``rule`` stops it; ``model``
    ends with the weights of the best ``evaluate`` score (higher is better) and in eval mode."""
    curve = LearningCurve()
    best_state = copy.deepcopy(model.state_dict())
    waited, drops, losses = 0, 0, []
    for t in range(1, rule.max_steps + 1):
        model.train()
        losses.append(step())
        if t % rule.eval_every and t != rule.max_steps:
            continue
        model.eval()
        with torch.no_grad():
            score = float(evaluate())
        curve.step.append(t)
        curve.train_loss.append(sum(losses) / len(losses))
        curve.val_score.append(score)
        losses = []
        if score > curve.best_score + rule.min_delta:
            curve.best_step, curve.best_score, waited = t, score, 0
            best_state = copy.deepcopy(model.state_dict())
            continue
        if score > curve.best_score:  # within min_delta: keep the better weights, keep waiting
            curve.best_step, curve.best_score = t, score
            best_state = copy.deepcopy(model.state_dict())
        waited += 1
        if waited < rule.patience:
            continue
        model.load_state_dict(best_state)
        if drops == rule.lr_drops:
            curve.stopped_early = True
            break
        drops, waited = drops + 1, 0
        for g in opt.param_groups:
            g["lr"] *= rule.lr_factor
    model.load_state_dict(best_state)
    model.eval()
    return curve
