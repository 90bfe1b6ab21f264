"""Split-learning strategies for Flower's ServerApp."""

from .split_fed import SplitFedStrategy

__all__ = ["SplitFedStrategy"]
