"""Device, precision, gradient checkpointing and bf16 on the wire (sim/model/device.py, issue 18).

No GPU here: these check that ``device=auto`` is the CPU and changes nothing, that the
keys reach the models, that bf16 autocast runs on the CPU, that fp16 loss scaling keeps
gradients that fp16 alone would lose, and that bf16 tensors survive the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import scratch_cfg
from flwr.app import Array, ArrayRecord, RecordDict
from transformers import LlamaConfig, LlamaForCausalLM

from sim.config import ConfigError, SplitConfig
from sim.data.batches import TextBatch
from sim.model import build_client_model, build_llm
from sim.model.device import (
    autocast,
    check_precision,
    client_device,
    resolve_device,
    server_device,
)
from sim.run.cli import ray_backend_config
from sim.training.reference import run_reference
from sim.training.split_step import scaled_grads
from sim.wire.arrays import BF16, payload_bytes, record_state, state_record
from sim.wire.schema import Arrays, Expect, Schema, validate, weight_spec


def _body(tower):
    return getattr(tower, "vision_model", tower)  # transformers 5 flattened SiglipVisionModel


@pytest.fixture
def small(tiny_cfg) -> SplitConfig:
    return tiny_cfg.replace(checkpoint=False)


# ----------------------------------------------------------------------------- device keys
def test_auto_is_the_cpu_without_a_gpu():
    assert not torch.cuda.is_available()  # this test documents the CPU-only CI machine
    cfg = SplitConfig()
    assert (cfg.device, cfg.server_device, cfg.precision) == ("auto", "same", "fp32")
    assert client_device(cfg) == server_device(cfg) == torch.device("cpu")


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CPU", "tpu"])
def test_bad_device_values_are_config_errors(value):
    with pytest.raises(ConfigError, match="'device'"):
        SplitConfig.from_run_config({"device": value})
    with pytest.raises(ConfigError, match="'server-device'"):
        SplitConfig.from_run_config({"server-device": value})


def test_a_cuda_device_that_is_not_there_is_named():
    cfg = SplitConfig.from_run_config({"server-device": "cuda:1"})  # valid syntax: where it runs decides
    with pytest.raises(ConfigError, match="'server-device' is 'cuda:1'.*no CUDA device"):
        server_device(cfg)
    with pytest.raises(ConfigError, match="'device' is 'cuda'"):
        resolve_device("cuda")


def test_fp16_needs_an_accelerator():
    with pytest.raises(ConfigError, match="'precision' is fp16 but 'device' is cpu"):
        SplitConfig.from_run_config({"precision": "fp16", "device": "cpu"})
    cfg = SplitConfig.from_run_config({"precision": "fp16"})  # auto: refused where it resolves to the CPU
    with pytest.raises(ConfigError, match="fp16 but the device is the CPU"):
        client_device(cfg)
    check_precision(torch.device("cpu"), "bf16")  # bf16 CPU autocast is allowed


def test_fp32_is_no_autocast_context_at_all():
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_explicit_cpu_is_bitwise_auto(small):
    """device=auto on a machine without a GPU is the run of before these keys: the same as
    naming the CPU, step by step and weight by weight."""
    auto = run_reference(small, num_partitions=2, evaluate_rounds=False)
    cpu = run_reference(small.replace(device="cpu", server_device="cpu"), num_partitions=2, evaluate_rounds=False)
    assert auto.step_losses == cpu.step_losses
    assert all(torch.equal(auto.client_weights[k], cpu.client_weights[k]) for k in auto.client_weights)


# ----------------------------------------------------------------------------- Ray resources
def test_client_gpus_become_ray_resources():
    cfg = SplitConfig(client_gpus=0.25)
    bc = ray_backend_config(cfg, gpus=2)
    assert bc["client_resources"]["num_gpus"] == 0.25 and bc["init_args"]["num_gpus"] == 2
    assert ray_backend_config(SplitConfig())["init_args"]["num_gpus"] == 0  # the default: no GPUs for Ray
    assert ray_backend_config(cfg, "auto")["client_resources"]["num_gpus"] == 0.25


def test_ray_gpu_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="'client-gpus' is 0.5 but this machine has no GPU"):
        ray_backend_config(SplitConfig(client_gpus=0.5), gpus=0)
    with pytest.raises(ConfigError, match="'device' is 'cuda:0' but 'client-gpus' is 0"):
        ray_backend_config(SplitConfig(device="cuda:0"))


# ----------------------------------------------------------------------------- precision
def test_bf16_autocast_runs_the_towers_in_bf16_and_hands_the_codec_fp32(small):
    cfg = small.replace(precision="bf16")
    model = build_client_model(cfg)
    seen = {}
    fc1 = _body(model.tower).encoder.layers[0].mlp.fc1  # a Linear: bf16 under autocast (LayerNorms stay fp32)
    fc1.register_forward_hook(lambda m, i, o: seen.update(tower=o.dtype))
    x = model.features(torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1)
    assert seen["tower"] == torch.bfloat16 and x.dtype == torch.float32
    fp32 = run_reference(small, num_partitions=2, evaluate_rounds=False).step_losses
    bf16 = run_reference(cfg, num_partitions=2, evaluate_rounds=False).step_losses
    assert np.all(np.isfinite(bf16)) and bf16 != fp32  # it trains, and autocast really changed the compute
    assert bf16 == run_reference(cfg, num_partitions=2, evaluate_rounds=False).step_losses  # still deterministic


def test_fp16_loss_scaling_keeps_gradients_fp16_would_flush():
    x = torch.full((4,), 1.0, requires_grad=True)
    def tiny():  # d/dx = 1e-8: below fp16's smallest subnormal
        return (x.half() * 1e-4).sum() * 1e-4

    (plain,) = torch.autograd.grad(tiny(), [x])
    assert torch.all(plain == 0)  # what fp16 without scaling delivers
    (scaled,) = scaled_grads(tiny(), [x], fp16=True)
    assert torch.allclose(scaled, torch.full((4,), 1e-8), rtol=0.01)
    def big():  # S * 1000 overflows fp16 until S <= 64
        return (x.half() * 1000).sum()

    (g,) = scaled_grads(big(), [x], fp16=True)
    assert torch.equal(g, torch.full((4,), 1000.0))
    assert scaled_grads(big(), [x], fp16=False)[0].tolist() == [1000.0] * 4


def test_fp16_training_path_runs_end_to_end(small, monkeypatch):
    """The fp16 code path (autocast + loss scaling on both sides), run on the CPU's fp16
    autocast by lifting the CPU refusal: it trains, close to fp32 and not equal to it."""
    from sim.model import device

    monkeypatch.setattr(device, "check_precision", lambda dev, precision: None)
    fp32 = run_reference(small, num_partitions=2, evaluate_rounds=False).step_losses
    fp16 = run_reference(small.replace(precision="fp16"), num_partitions=2, evaluate_rounds=False).step_losses
    assert fp16 != fp32 and np.allclose(fp16, fp32, rtol=0.02)


# ----------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("split", ["connector", "vit-ln1:1"])
def test_gradient_checkpointing_is_on_and_changes_no_result(small, split):
    cfg = small.replace(split_point=split, vision_layers=2)
    on = cfg.replace(gradient_checkpointing=True)
    model = build_client_model(on)
    layers = model.tower.layers if split != "connector" else _body(model.tower).encoder.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not any(layer.gradient_checkpointing for layer in (_body(build_client_model(cfg).tower).encoder.layers
                                                              if split == "connector" else []))
    ref = run_reference(on, num_partitions=2, evaluate_rounds=False)
    llm_layers = ref.server.model.llm.model.layers
    assert all(layer.gradient_checkpointing for layer in llm_layers)
    # recomputing a block on the CPU gives bitwise its first forward: the same training
    assert ref.step_losses == run_reference(cfg, num_partitions=2, evaluate_rounds=False).step_losses


def test_pretrained_models_load_as_fp32_master_weights(tmp_path, small):
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2))
    llm.to(torch.bfloat16).save_pretrained(tmp_path / "llm")
    loaded = build_llm(small.replace(llm=str(tmp_path / "llm")), 64)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


# ----------------------------------------------------------------------------- bf16 on the wire
def test_flower_cannot_pack_bf16_and_we_can():
    state = {"w": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(5), "n": torch.arange(4)}
    with pytest.raises(TypeError):
        ArrayRecord.from_torch_state_dict(state)
    rec = state_record(state)
    assert rec["w"].dtype == BF16 and rec["w"].shape == (3, 5)
    back = record_state(rec)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())
    # every other dtype is exactly what Flower writes
    plain = {k: v for k, v in state.items() if k != "w"}
    ours, flowers = state_record(plain), ArrayRecord.from_torch_state_dict(plain)
    assert all(ours[k].data == flowers[k].data and ours[k].dtype == flowers[k].dtype for k in plain)
    # and the bf16 array survives Flower's own serialisation
    again = Array.inflate(rec["w"].deflate(), children={c: o for c, o in rec["w"].children.items()})
    assert torch.equal(record_state(ArrayRecord({"w": again}))["w"], state["w"])


def test_bf16_weights_pass_the_schema_and_count_two_bytes(small):
    w = {"a": torch.ones(4, 4, dtype=torch.bfloat16), "b": torch.zeros(3)}
    spec = weight_spec(w)
    assert spec == {"a": (BF16, (4, 4)), "b": ("float32", (3,))}
    from flwr.app import ConfigRecord

    content = RecordDict({"meta": ConfigRecord({}), "weights": state_record(w)})
    schema = Schema("test", {}, {"weights": Arrays(dtypes=frozenset({"float32"}), max_elements=1 << 20)})
    validate(content, schema, Expect(weights=spec))
    assert payload_bytes(content, ("weights",)) == 16 * 2 + 3 * 4
    with pytest.raises(Exception, match="bfloat16"):  # a bf16 weight where fp32 is expected is rejected
        validate(content, schema, Expect(weights=weight_spec({"a": torch.ones(4, 4), "b": torch.zeros(3)})))


def test_text_batch_moves_only_when_it_must():
    t = TextBatch(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3, 3]), torch.ones(2, 3, dtype=torch.bool))
    assert t.to(torch.device("cpu")) is t


def test_scratch_cfg_defaults_reach_the_models():
    cfg = scratch_cfg(precision="bf16", hidden_size=32, image_size=16, patch_size=4)
    assert build_client_model(cfg).precision == "bf16"
