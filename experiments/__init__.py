"""Reproducible experiment drivers: ``python -m experiments.<name>``. Among them:

* :mod:`experiments.bitsweep`  accuracy and bytes of every compressor at b = 1..5 (Quantized-TinyLLaVA, arXiv 2511.23402, Fig. 3, Tables 3-4)
* :mod:`experiments.entropy`   KDE entropy of the pre-quantisation features and the bit width it implies (Quantized-TinyLLaVA, arXiv 2511.23402, §3.2)
* :mod:`experiments.comm`      bytes of whole runs, per-exchange latency, JPEG cloud-only comparison (LLaVA-AlignedVQ, arXiv 2411.05961, Table 3, Fig. 6)
* :mod:`experiments.make_heldout` a LLaVA-format dataset of real images for the held-out sweep
* :mod:`experiments.claims`    docs/results.md: every tested claim of the two papers with a verdict
* :mod:`experiments.inversion` feature-inversion privacy study on the scikit-image case studies (privacy.md)

Each writes CSV/JSON first and builds its plots and Markdown from those files.
"""
