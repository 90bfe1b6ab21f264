"""Centralised pretraining of the tiny VLM on a public corpus (``python -m sim pretrain``).

:mod:`.recipe` holds the recipe (model shape, corpus, optimisation), :mod:`.train` the loop
that writes a checkpoint directory (:mod:`sim.model.pretrained`) for ``init=<dir>``.
docs/foundation.md describes the regime and records the shipped checkpoint's numbers.
"""
