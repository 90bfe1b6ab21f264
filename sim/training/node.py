"""A client's identity, from its Flower node config."""

from __future__ import annotations

from dataclasses import dataclass

from sim.config import ConfigError


@dataclass(frozen=True)
class NodeIdentity:
    """Who a client is, from its node config (``--node-config`` on a SuperNode).

    ``data-path`` (optional) is this site's own LLaVA JSON file: the node then trains
    on all of it instead of partition ``partition`` of the run's shared dataset.
    ``state-dir`` (optional) is where it keeps its optimiser checkpoints."""

    partition: int
    num_partitions: int
    data_path: str = ""
    state_dir: str = ""


NODE_KEYS = ("partition-id", "num-partitions", "data-path", "state-dir")


def node_identity(node_config: dict) -> NodeIdentity:
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if unknown:
        raise ConfigError(f"unknown node config keys {unknown}; allowed: {', '.join(NODE_KEYS)}")
    try:
        node = NodeIdentity(int(node_config["partition-id"]), int(node_config["num-partitions"]),
                            str(node_config.get("data-path", "")), str(node_config.get("state-dir", "")))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            "node config needs integer 'partition-id' and 'num-partitions' "
            "(set by the simulation, or --node-config on a SuperNode)"
        ) from None
    if not 0 <= node.partition < node.num_partitions:
        raise ConfigError(f"node config 'partition-id' {node.partition} is outside [0, {node.num_partitions})")
    return node
