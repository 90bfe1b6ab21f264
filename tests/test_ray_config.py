"""Ray settings of ``python -m sim run``: local (sized for the machine) or a running cluster."""

from __future__ import annotations

from sim.config import SplitConfig
from sim.run.cli import ray_backend_config


def test_local_ray_is_sized_for_this_machine():
    cfg = SplitConfig(client_cpus=1.0)
    bc = ray_backend_config(cfg)
    assert bc["client_resources"]["num_cpus"] == 1.0
    assert bc["init_args"]["object_store_memory"] == 512 * 1024 * 1024
    assert "address" not in bc["init_args"]


def test_cluster_address_leaves_resources_to_the_cluster():
    bc = ray_backend_config(SplitConfig(client_cpus=2.0), "auto")
    assert bc["init_args"]["address"] == "auto"
    assert "num_cpus" not in bc["init_args"] and "object_store_memory" not in bc["init_args"]
    assert bc["client_resources"]["num_cpus"] == 2.0
