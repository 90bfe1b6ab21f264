"""Split-learning strategies for Flower's ServerApp."""

from .split_fed import RoundReport, SplitFedStrategy

__all__ = ["RoundReport", "SplitFedStrategy"]
