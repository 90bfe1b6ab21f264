"""SplitFedStrategy without the simulator: FedAvg of mock replies, schedule, sampling."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from sim.ledger import Ledger, NetworkModel
from sim.server_ops import build_server, exchange_schedule, fedavg, sample_partitions
from strategies import SplitFedStrategy


def mock_final_reply(partition: int, value: float, examples: int) -> Message:
    content = RecordDict(
        {
            "meta": ConfigRecord({"partition-id": partition, "round": 1, "exchange": 1, "num-examples": examples}),
            "weights": ArrayRecord.from_torch_state_dict({"w": torch.full((3,), value), "b": torch.tensor([value])}),
        }
    )
    req = Message(RecordDict(), dst_node_id=100 + partition, message_type="train.split_step")
    return Message(content, reply_to=req)


def test_fedavg_of_two_replies_is_the_sample_weighted_blend(tiny_cfg):
    # Prepare
    strategy = SplitFedStrategy(tiny_cfg, build_server(tiny_cfg), Ledger(NetworkModel(10, 20)))
    replies = [mock_final_reply(0, 1.0, examples=1), mock_final_reply(1, 4.0, examples=2)]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: (1*1 + 2*4) / 3 = 3
    out = arrays.to_torch_state_dict()
    assert torch.allclose(out["w"], torch.full((3,), 3.0)) and torch.allclose(out["b"], torch.tensor([3.0]))
    assert metrics["num-clients"] == 2


def test_invalid_final_reply_is_left_out_of_fedavg(tiny_cfg):
    strategy = SplitFedStrategy(tiny_cfg, build_server(tiny_cfg), Ledger(NetworkModel(10, 20)))
    bad = mock_final_reply(1, float("nan"), examples=5)
    arrays, _ = strategy.aggregate_train(1, [mock_final_reply(0, 2.0, 1), bad])
    assert torch.equal(arrays.to_torch_state_dict()["b"], torch.tensor([2.0]))


def test_fedavg_weights_by_examples():
    a, b = {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 5.0])}
    assert torch.equal(fedavg([a, b], [1, 1])["x"], torch.tensor([2.0, 3.5]))
    assert torch.equal(fedavg([a, b], [1, 3])["x"], torch.tensor([2.5, 4.25]))


def test_exchange_schedule_fuses_backward_with_next_forward(tiny_cfg):
    cfg = tiny_cfg.replace(local_steps=5, steps_per_exchange=2)
    assert exchange_schedule(cfg) == [([], [0, 1]), ([0, 1], [2, 3]), ([2, 3], [4]), ([4], [])]


def test_client_sampling_is_seeded_and_sized(tiny_cfg):
    cfg = tiny_cfg.replace(fraction_train=0.3)
    parts = list(range(20))
    s1 = sample_partitions(parts, cfg, 3)
    assert s1 == sample_partitions(parts, cfg, 3) and len(s1) == 6 and s1 == sorted(set(s1))
    assert s1 != sample_partitions(parts, cfg, 4) or s1 != sample_partitions(parts, cfg, 5)
