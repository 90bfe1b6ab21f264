"""The client-held ``noise-secret``: it keys the feature-noise seed (so a server holding the
run seed cannot regenerate the noise), the recompute still sees the sent features, empty
keeps the run seed, and no reply carries it (sim/model/feature_noise.py, sim/training/node.py)."""

import pytest
import torch
from conftest import scratch_cfg
from flwr.app import RecordDict
from flwr.common.serde import recorddict_to_proto

from sim.config import ConfigError, SplitConfig
from sim.model.feature_noise import secret_noise_seed
from sim.training import client as client_ops
from sim.training.client import client_batch, client_runtime, micro_batch, release_tag
from sim.training.client_handlers import client_evaluate, client_init_codec, client_train
from sim.training.node import NodeIdentity, node_identity
from sim.training.server import initial_client_weights
from sim.wire.arrays import record_to_arrays
from sim.wire.messages import eval_request, train_request

SECRET = "s3cr3t-noise-key-7f1c2a"


@pytest.fixture(params=[0.0, 1.0], ids=["per-image", "clipped"])
def noise_cfg(request, tmp_path) -> SplitConfig:
    return scratch_cfg(
        num_server_rounds=1, local_steps=2, steps_per_exchange=1, batch_size=4, num_samples=60, hidden_size=32,
        image_size=16, patch_size=4, compressor="identity", identity_dtype="fp32", bits=16,
        feature_noise=0.5, feature_noise_clip=request.param, out_dir=str(tmp_path), run_name="run",
    )


def runtime(cfg: SplitConfig, secret: str = ""):
    rt = client_runtime(cfg, 0, 2, noise_secret=secret)
    client_ops.load_weights(rt, initial_client_weights(cfg))
    return rt


def sent(rt) -> torch.Tensor:
    """The image stream's features of round 1, step 0, as they go into the codec."""
    with torch.no_grad():
        return rt.model.stream_inputs(client_batch(rt, micro_batch(rt, 1, 0), tag=release_tag(rt, "train", 1, 0))).image


# ----------------------------------------------------------------------------- node config
def test_node_config_takes_a_noise_secret_and_keeps_it_out_of_repr_and_errors():
    base = {"partition-id": 0, "num-partitions": 2}
    assert node_identity(base).noise_secret == ""
    node = node_identity({**base, "noise-secret": SECRET})
    assert node.noise_secret == SECRET and SECRET not in repr(node)
    with pytest.raises(ConfigError, match="unknown node config keys") as err:
        node_identity({**base, "noise-secret": SECRET, "noise-secrets": "x"})
    assert SECRET not in str(err.value)
    with pytest.raises(ConfigError, match="partition-id") as err:
        node_identity({"partition-id": "zero", "num-partitions": 2, "noise-secret": SECRET})
    assert SECRET not in str(err.value)


def test_secret_seed_is_keyed_deterministic_and_apart_from_the_run_seed():
    s = secret_noise_seed(7, SECRET)
    assert s == secret_noise_seed(7, SECRET) and 0 <= s < 2**63
    assert len({s, secret_noise_seed(8, SECRET), secret_noise_seed(7, SECRET + "x"), 7}) == 4
    assert secret_noise_seed(7, "k" * 500) != secret_noise_seed(7, "k" * 499)  # longer than a blake2b key
    with pytest.raises(ValueError, match="empty"):
        secret_noise_seed(7, "")


# ----------------------------------------------------------------------------- the features sent
def test_secret_changes_the_noise_and_empty_keeps_the_run_seed(noise_cfg):
    plain = sent(runtime(noise_cfg))
    assert runtime(noise_cfg).model.noise_seed == noise_cfg.seed
    with_secret = runtime(noise_cfg, SECRET)
    assert with_secret.model.noise_seed == secret_noise_seed(noise_cfg.seed, SECRET)
    a = sent(with_secret)
    assert torch.equal(a, sent(runtime(noise_cfg, SECRET)))
    assert not torch.equal(a, plain)
    assert not torch.equal(a, sent(runtime(noise_cfg, "another secret")))
    # the cached model is shared: an empty secret after a set one is the run seed again, bitwise
    rt = runtime(noise_cfg)
    assert rt.model.noise_seed == noise_cfg.seed and torch.equal(sent(rt), plain)


def test_recompute_in_a_later_message_sees_the_features_sent_with_the_secret(noise_cfg, monkeypatch):
    rt = runtime(noise_cfg, SECRET)
    encoded = []
    real_encode = rt.model.encode
    monkeypatch.setattr(rt.model, "encode",
                        lambda b: (encoded.append(rt.model.stream_inputs(b).image), real_encode(b))[1])
    client_ops.encode_steps(rt, 1, [0, 1])
    monkeypatch.undo()
    runtime(noise_cfg)  # another node's message in between, without a secret, on the same cached model
    rt = runtime(noise_cfg, SECRET)  # the next message rebuilds the runtime, as a fresh ClientApp process does
    recomputed = []

    def capture(model, opt, batches, *args):
        with torch.no_grad():
            recomputed.extend(model.stream_inputs(b).image for b in batches)
        return []

    monkeypatch.setattr(client_ops, "client_apply_grads", capture)
    client_ops.apply_steps(rt, 1, [0, 1], [None, None])
    assert len(encoded) == len(recomputed) == 2
    assert all(torch.equal(e, r) for e, r in zip(encoded, recomputed))


# ----------------------------------------------------------------------------- the handlers
def test_handlers_use_the_secret_and_no_reply_carries_it(noise_cfg):
    weights = initial_client_weights(noise_cfg)
    secret_node = NodeIdentity(0, 2, noise_secret=SECRET)

    def train_reply(node):
        return client_train(train_request(noise_cfg, 1, 0, [], [0], False, weights=weights), RecordDict(), node)

    with_secret, plain = train_reply(secret_node), train_reply(NodeIdentity(0, 2))
    values = [record_to_arrays(r.array_records["features"])["codes.values"] for r in (with_secret, plain)]
    assert values[0].shape == values[1].shape and (values[0] != values[1]).any()

    state = RecordDict()
    replies = [with_secret, client_evaluate(eval_request(noise_cfg, 1, weights), state, secret_node),
               client_init_codec(eval_request(noise_cfg, 1, weights), RecordDict(), secret_node)]
    seed = str(secret_noise_seed(noise_cfg.seed, SECRET)).encode()
    for content in [*replies, state]:
        wire = recorddict_to_proto(content).SerializeToString()
        assert SECRET.encode() not in wire and seed not in wire
