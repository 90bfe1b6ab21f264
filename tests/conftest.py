"""Shared fixtures: a tiny config that trains in seconds."""

import pytest
import torch

from sim.config import SplitConfig

torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg(tmp_path) -> SplitConfig:
    return SplitConfig(
        num_server_rounds=1, local_steps=2, steps_per_exchange=1, batch_size=4, num_samples=120,
        hidden_size=32, image_size=16, patch_size=4, out_dir=str(tmp_path), run_name="run",
    )


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside a Flower run need a task identity (the runtime sets one)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
