"""A client's identity, from its Flower node config."""

from __future__ import annotations

from dataclasses import dataclass, field

from sim.config import ConfigError


@dataclass(frozen=True)
class NodeIdentity:
    """Who a client is, from its node config (``--node-config`` on a SuperNode).

    ``data-path`` (optional) is this site's own LLaVA JSON file: the node then trains
    on all of it instead of partition ``partition`` of the run's shared dataset.
    ``state-dir`` (optional) is where it keeps its optimiser checkpoints.
    ``noise-secret`` (optional) keys the ``feature-noise`` seed
    (:func:`sim.model.feature_noise.secret_noise_seed`) so that the server, which holds the
    run seed, cannot regenerate the noise; empty: the run seed alone, as before. A SuperNode's
    node config stays on it: in flwr 1.41 it goes into the Context the SuperNode builds
    (``flwr/supernode/start_client_internal.py``, line 371) and to its ClientApp processes
    over the local ClientAppIo API (``flwr/supernode/servicer/runtime/runtime_handlers.py``,
    line 119); no Fleet API request to the SuperLink carries it
    (``flwr/supernode/fleet_http_connection.py``). Kept out of ``repr``, never logged."""

    partition: int
    num_partitions: int
    data_path: str = ""
    state_dir: str = ""
    noise_secret: str = field(default="", repr=False)


NODE_KEYS = ("partition-id", "num-partitions", "data-path", "state-dir", "noise-secret", "worker-socket")
"""``worker-socket`` names the site's warm worker (:mod:`sim.training.site_worker`); it
does not change who the client is, so :class:`NodeIdentity` does not keep it."""


def node_identity(node_config: dict) -> NodeIdentity:
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if unknown:
        raise ConfigError(f"unknown node config keys {unknown}; allowed: {', '.join(NODE_KEYS)}")
    try:
        node = NodeIdentity(int(node_config["partition-id"]), int(node_config["num-partitions"]),
                            str(node_config.get("data-path", "")), str(node_config.get("state-dir", "")),
                            str(node_config.get("noise-secret", "")))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            "node config needs integer 'partition-id' and 'num-partitions' "
            "(set by the simulation, or --node-config on a SuperNode)"
        ) from None
    if not 0 <= node.partition < node.num_partitions:
        raise ConfigError(f"node config 'partition-id' {node.partition} is outside [0, {node.num_partitions})")
    return node
