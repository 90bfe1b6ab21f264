"""split-point=vit-ln1:k: the client/server halves of the vision tower against the unsplit
``transformers`` SigLIP model, the residual modes, LoRA and the config checks."""

import pytest
import torch
from conftest import scratch_cfg
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from sim.config import ConfigError, SplitConfig, active_streams
from sim.data.tokenizer import get_tokenizer
from sim.model import ClientBatch, build_client_model, build_server_model, client_state_names
from sim.model.vit_split import VisionHead, VisionTail


def tower(layers: int = 3) -> SiglipVisionModel:
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, image_size=16,
        patch_size=4, vision_use_head=False)).eval()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_head_and_tail_compose_to_the_unsplit_tower(k):
    t = tower()
    px = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        x, h = VisionHead(t, k)(px)
        out = VisionTail(t, k)(h, x)
        ref = t(pixel_values=px).last_hidden_state
        # the head's h is LN1 of block k applied to block k's input
        body = t.vision_model if hasattr(t, "vision_model") else t
        assert torch.equal(h, body.encoder.layers[k].layer_norm1(x))
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_rebuilding_the_residual_from_h_is_not_the_tower():
    t = tower()
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        x, h = VisionHead(t, 0)(px)
        assert not torch.allclose(VisionTail(t, 0)(h, h), t(pixel_values=px).last_hidden_state, atol=1e-3)


def test_clip_towers_and_bad_blocks_are_refused():
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=4))
    with pytest.raises(ValueError, match="SigLIP"):
        VisionHead(clip, 0)
    with pytest.raises(ValueError, match="outside"):
        VisionTail(tower(2), 2)


def cfg_for(tiny_cfg, **kw) -> SplitConfig:
    return tiny_cfg.replace(compressor="identity", identity_dtype="fp32", nf_block=32, **kw)


@pytest.mark.parametrize("mode", ["rebuild", "transmit"])
def test_split_model_halves_match_the_unsplit_tower(tiny_cfg, mode):
    """Lossless codecs (fp32 identity) on both streams: the server's image tokens are the
    connector applied to the unsplit tower's output (transmit) or to a tower whose block
    k residual is LN1's output (rebuild)."""
    cfg = cfg_for(tiny_cfg, split_point="vit-ln1:1", residual_mode=mode, residual_compressor="identity")
    client = build_client_model(cfg)
    server = build_server_model(cfg, len(get_tokenizer(cfg)))
    assert active_streams(cfg) == (("image", "residual") if mode == "transmit" else ("image",))
    assert client.codecs().names() == tuple(active_streams(cfg)) == server.codecs().names()
    # the client keeps only embeddings, block 0 and LN1 of block 1; the server the rest + connector
    names = client_state_names(client)
    assert not any("post_layernorm" in n or "connector" in n for n in names)
    assert any(n.startswith("tower.layers.0.") for n in names) and any(n.startswith("tower.ln1.") for n in names)
    assert not any(n.startswith("tower.layers.1") for n in names)
    assert any(n.startswith("tail.attn.") for n, _ in server.named_parameters()) and server.connector is not None
    px = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    full = build_client_model(cfg.replace(split_point="connector")).tower  # same seed: the same initial tower
    with torch.no_grad():
        encs = client.encode(ClientBatch(px))
        got = server.image_embeds(encs.map(lambda _, e: e.y))
        x, h = client.tower(px)
        if mode == "transmit":
            want = server.connector(full(pixel_values=px).last_hidden_state)
        else:
            want = server.connector(server.tail(h, h))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_split_point_config_errors():
    with pytest.raises(ConfigError, match="split-point"):
        scratch_cfg(split_point="vit-ln2:0")
    with pytest.raises(ConfigError, match="vision-layers"):
        scratch_cfg(split_point="vit-ln1:5", vision_layers=2)
    with pytest.raises(ConfigError, match="residual stream"):
        scratch_cfg(split_point="vit-ln1:0", residual_mode="transmit", hidden_size=32)  # nf-block 64 > 32
    assert scratch_cfg(split_point="vit-ln1:1").split_block == 1 and SplitConfig().split_block is None


def test_lora_trains_only_adapters_and_starts_as_the_base_model(tiny_cfg):
    base = build_server_model(tiny_cfg, len(get_tokenizer(tiny_cfg)))
    lora = build_server_model(tiny_cfg.replace(llm_lora_rank=4), len(get_tokenizer(tiny_cfg)))
    trainable = [n for n, p in lora.llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for n, p in lora.llm.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in lora.codec.parameters())  # the codec's server half still trains
    y = torch.randn(2, tiny_cfg.num_image_tokens, tiny_cfg.hidden_size)
    ids = torch.randint(4, 20, (2, 5))
    with torch.no_grad():  # LoRA's B starts at zero: the adapted model is the base model
        assert torch.allclose(lora.logits(y, ids), base.logits(y, ids), atol=1e-5)
