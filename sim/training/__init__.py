"""Training: what each side computes and the round that ties them together.

* :mod:`.split_step` — one micro-batch on each side (plain PyTorch);
* :mod:`.client` / :mod:`.server` — the client's and the server's operations;
* :mod:`.client_handlers` — the client's message handlers (the ClientApp wraps them);
* :mod:`.engine` — the split round, once, over a transport;
* :mod:`.transport` — Flower's ``Grid``, or the clients in this process;
* :mod:`.reference` — the engine in process: the reference trainer;
* :mod:`.timing` — where each reply's time went (the client's ``timing-s``, ``timing.csv``);
* :mod:`.schedule`, :mod:`.client_checkpoint`, :mod:`.node` — learning rates, the
  client's optimiser files, its identity.
"""
