"""Shared record types of the data layer.

A :class:`VQAExample` is one image with one or more (human, gpt) turns; it is the
only thing the rest of the project sees of a dataset, whether synthetic or loaded
from LLaVA-style JSON. :class:`DataError` reports bad input data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file and record at fault."""


@dataclass(frozen=True, eq=False)
class VQAExample:
    """One image-conditioned conversation.

    Attributes
    ----------
    image : np.ndarray
        ``(H, W, 3)`` uint8 RGB pixels; made read-only on construction.
    turns : tuple of (str, str)
        ``(human, gpt)`` pairs in order; the ``<image>`` placeholder is already
        removed from the human text and whitespace stripped.
    qtype : str
        Question type (``colour``, ``shape``, ``count``, ``position``,
        ``relational`` for synthetic data; ``llava`` or the record's own type for
        JSON data).

    Notes
    -----
    Equality is identity (comparing images element-wise is rarely what is meant).
    """

    image: np.ndarray = field(repr=False)
    turns: tuple[tuple[str, str], ...]
    qtype: str

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"VQAExample.image must be a (H, W, 3) uint8 array, got {desc}")
        if not self.turns:
            raise ValueError("VQAExample.turns must hold at least one (human, gpt) pair")
        for turn in self.turns:
            if len(turn) != 2 or not all(isinstance(t, str) for t in turn):
                raise ValueError(f"VQAExample.turns entries must be (str, str) pairs, got {turn!r}")
        img.setflags(write=False)

    @property
    def answer(self) -> str:
        """The last gpt turn (the answer that evaluation scores)."""
        return self.turns[-1][1]

    @property
    def question(self) -> str:
        """The last human turn."""
        return self.turns[-1][0]
