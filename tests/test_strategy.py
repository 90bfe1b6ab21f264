"""SplitFedStrategy without the simulator: FedAvg of mock replies, schedule, sampling,
the run config as the only configuration, and the evaluation aggregate."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from sim.training.client_handlers import client_evaluate
from sim.training.server import build_server, exchange_schedule, fedavg, initial_client_weights, sample_partitions
from sim.training.transport import InProcessTransport
from sim.wire.ledger import Ledger, NetworkModel
from sim.wire.messages import EVALUATE
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


def strategy_for(cfg) -> SplitFedStrategy:
    return SplitFedStrategy(cfg, build_server(cfg), Ledger(NetworkModel(10, 20)))


def test_fedavg_of_two_replies_is_the_sample_weighted_blend(tiny_cfg):
    # Prepare
    strategy = strategy_for(tiny_cfg)
    replies = [mock_final_reply(0, 1.0, examples=1), mock_final_reply(1, 4.0, examples=2)]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: (1*1 + 2*4) / 3 = 3
    out = arrays.to_torch_state_dict()
    assert torch.allclose(out["w"], torch.full((3,), 3.0)) and torch.allclose(out["b"], torch.tensor([3.0]))
    assert metrics["num-clients"] == 2
    # the strategy is glue: its engine computes the same average
    avg, n = strategy.engine.fedavg(1, replies)
    assert n == 2 and all(torch.equal(avg[k], out[k]) for k in out)


def test_invalid_final_reply_is_left_out_of_fedavg(tiny_cfg):
    strategy = strategy_for(tiny_cfg)
    bad = mock_final_reply(1, float("nan"), examples=5)
    arrays, metrics = strategy.aggregate_train(1, [mock_final_reply(0, 2.0, 1), bad])
    assert torch.equal(arrays.to_torch_state_dict()["b"], torch.tensor([2.0]))
    assert metrics["num-clients"] == 1
    assert strategy.aggregate_train(1, [bad]) == (None, None)  # nothing valid: no aggregate


def test_fedavg_weights_by_examples():
    a, b = {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 5.0])}
    assert torch.equal(fedavg([a, b], [1, 1])["x"], torch.tensor([2.0, 3.5]))
    assert torch.equal(fedavg([a, b], [1, 3])["x"], torch.tensor([2.5, 4.25]))


def test_exchange_schedule_fuses_backward_with_next_forward(tiny_cfg):
    cfg = tiny_cfg.replace(local_steps=5, steps_per_exchange=2)
    assert exchange_schedule(cfg) == [([], [0, 1]), ([0, 1], [2, 3]), ([2, 3], [4]), ([4], [])]


def test_client_sampling_is_seeded_and_sized(tiny_cfg):
    cfg = tiny_cfg.replace(fraction_train=0.3, fraction_evaluate=0.3)
    parts = list(range(20))
    rounds = range(1, 21)

    def valid(sample):
        return len(sample) == 6 and sample == sorted(set(sample)) and set(sample) <= set(parts)

    train = [sample_partitions(parts, cfg, r) for r in rounds]
    assert all(valid(s) for s in train)
    assert train == [sample_partitions(list(reversed(parts)), cfg, r) for r in rounds]  # seeded, order-free
    assert len({tuple(s) for s in train}) > 1  # the sample depends on the round
    ev = [sample_partitions(parts, cfg, r, evaluation=True) for r in rounds]
    assert all(valid(s) for s in ev)
    assert ev == [sample_partitions(parts, cfg, r, evaluation=True) for r in rounds]
    # evaluation draws from its own stream: at the same fraction it picks other clients
    assert sum(t != e for t, e in zip(train, ev)) >= 15, list(zip(train, ev))
    # another seed, other samples
    assert train != [sample_partitions(parts, cfg.replace(seed=cfg.seed + 1), r) for r in rounds]
    # fraction 1.0 takes every client
    assert sample_partitions(parts, tiny_cfg, 3) == parts == sample_partitions(parts, tiny_cfg, 3, evaluation=True)


class UnusableGrid:
    """A Grid that fails the test if the strategy touches it."""

    def __getattr__(self, name):
        raise AssertionError(f"the strategy used the grid ({name}) before rejecting its config")


@pytest.mark.parametrize("key", ["train_config", "evaluate_config"])
def test_start_rejects_a_strategy_config(tiny_cfg, key):
    strategy = strategy_for(tiny_cfg)
    arrays = ArrayRecord.from_torch_state_dict(initial_client_weights(tiny_cfg))
    with pytest.raises(ValueError, match="only configuration"):
        strategy.start(UnusableGrid(), arrays, num_rounds=1, **{key: ConfigRecord({"lr": 0.1})})
    with pytest.raises(ValueError, match="only configuration"):
        strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), UnusableGrid())
    with pytest.raises(ValueError, match="only configuration"):
        strategy.configure_evaluate(1, arrays, ConfigRecord({"local-steps": 3}), UnusableGrid())


class CountingTransport(InProcessTransport):
    """Records how many messages each exchange carried."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.batches: list[int] = []

    def exchange(self, messages, timeout_s):
        self.batches.append(len(messages))
        return super().exchange(messages, timeout_s)


def test_discovery_keeps_few_hellos_in_flight_and_learns_every_node(tiny_cfg, monkeypatch):
    import sim.training.engine as engine

    monkeypatch.setattr(engine, "HELLO_BATCH", 2)
    cfg = tiny_cfg.replace(expected_clients=5)
    strategy = strategy_for(cfg)
    transport = CountingTransport(5)
    strategy.engine.discover(transport, 1, timeout=60.0)
    assert transport.batches == [2, 2, 1]
    assert strategy.engine.partitions == {p: p + 1 for p in range(5)} and strategy.engine.live == set(range(5))
    rows = [r for r in strategy.engine.ledger.rows if r.kind == "query.hello"]
    assert len(rows) == 10  # one down and one up per node, every batch in the ledger


def test_aggregate_evaluate_scores_real_evaluation_replies(tiny_cfg):
    cfg = tiny_cfg.replace(fraction_evaluate=1.0)
    strategy = strategy_for(cfg)
    transport = InProcessTransport(2)
    strategy.engine.discover(transport, 1, timeout=60.0)  # learns node -> partition (query.hello)
    assert strategy.engine.partitions == {0: 1, 1: 2} and strategy.engine.live == {0, 1}
    arrays = ArrayRecord.from_torch_state_dict(initial_client_weights(cfg))
    requests = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), None))
    assert sorted(m.metadata.dst_node_id for m in requests) == [1, 2]
    assert all(m.metadata.message_type == EVALUATE for m in requests)
    replies = [Message(client_evaluate(m.content, RecordDict(), transport.nodes[m.metadata.dst_node_id]), reply_to=m)
               for m in requests]
    counts = {m.metadata.src_node_id: m.content.config_records["meta"]["eval-count"] for m in replies}
    assert all(n > 0 for n in counts.values())

    metrics = strategy.aggregate_evaluate(1, replies)
    assert isinstance(metrics, MetricRecord)
    assert metrics["eval-samples"] == sum(counts.values())
    assert "acc-all" in metrics and all(0.0 <= v <= 1.0 for k, v in metrics.items() if k.startswith("acc-"))
    assert len(metrics) > 2  # per question type too
    # the metric is the engine's exact-match score of the same replies
    c, n = strategy.engine.score_eval(1, replies)["all"]
    assert n == metrics["eval-samples"] and metrics["acc-all"] == pytest.approx(c / n)

    # one client's reply: only its samples count
    assert strategy.aggregate_evaluate(1, replies[:1])["eval-samples"] == counts[replies[0].metadata.src_node_id]
    # replies that echo another round are rejected: nothing to aggregate
    assert strategy.aggregate_evaluate(2, replies) is None
