"""Simulation core for split learning of a tiny vision-language model on Flower.

Everything both sides share lives here: the typed config, the model halves, the
compressors and bit packing, the wire schema, the communication ledger, the data
and the plain-PyTorch split step that the Flower apps and the in-process reference
trainer both call.
"""
