"""Model halves: from_pretrained loading from local directories, layouts, LLaVA JSON end to end."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from sim.data import generate_synthetic_vqa, synthetic_vocabulary, write_llava_json
from sim.data.tokenizer import build_word_tokenizer, get_tokenizer
from sim.model import build_client_model, build_server_model
from sim.training.reference import run_reference
from sim.training.server import build_server
from sim.training.split_step import image_split


def save_tiny_pretrained(tmp_path):
    """A tiny SigLIP tower, a tiny Llama and a tokenizer, saved as a user would have them."""
    tok = build_word_tokenizer(synthetic_vocabulary())
    tok.save_pretrained(tmp_path / "tok")
    torch.manual_seed(123)
    tower = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4))
    tower.save_pretrained(tmp_path / "vit")
    SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128))
    llm.save_pretrained(tmp_path / "llm")
    return tower, llm


def test_from_pretrained_loads_local_directories(tmp_path, tiny_cfg):
    tower, llm = save_tiny_pretrained(tmp_path)
    cfg = tiny_cfg.replace(vision_tower=str(tmp_path / "vit"), llm=str(tmp_path / "llm"), tokenizer=str(tmp_path / "tok"))
    client = build_client_model(cfg)
    server = build_server_model(cfg, len(get_tokenizer(cfg)))
    for name, p in tower.state_dict().items():
        assert torch.equal(client.tower.state_dict()[name], p), name
    for name, p in llm.state_dict().items():
        assert torch.equal(server.llm.state_dict()[name], p), name
    assert client.connector[0].in_features == 48 and client.connector[-1].out_features == 32
    # and it trains end to end with the loaded halves
    res = run_reference(cfg, num_partitions=2, evaluate_rounds=False)
    assert len(res.step_losses) == cfg.local_steps and all(np.isfinite(res.step_losses))


def test_image_after_zero_question_tokens_is_the_image_first_layout(tiny_cfg):
    server = build_server(tiny_cfg).model
    y = torch.randn(3, tiny_cfg.num_image_tokens, tiny_cfg.hidden_size)
    ids = torch.randint(4, 20, (3, 7))
    with torch.no_grad():
        first = server.logits(y, ids)
        split0 = server.logits(y, ids, torch.zeros(3, dtype=torch.long))
        split2 = server.logits(y, ids, torch.full((3,), 2))
    assert torch.allclose(first, split0, atol=1e-6)
    assert not torch.allclose(first, split2, atol=1e-3)


def test_before_last_token_reads_the_answer_out_at_a_text_token(tiny_cfg):
    """With image-position=before-last-token the image goes before the question's last
    token, so the logits that predict the first answer token sit on that text token."""
    server = build_server(tiny_cfg).model
    n = tiny_cfg.num_image_tokens
    y = torch.randn(2, n, tiny_cfg.hidden_size)
    ids = torch.randint(4, 20, (2, 6))
    first_len = torch.tensor([4, 5])
    split = image_split("before-last-token", first_len)
    assert split.tolist() == [3, 4] and image_split("after-question", first_len) is first_len
    assert image_split("first", first_len) is None
    ids2 = ids.clone()
    ids2[0, 3] = 3 if int(ids[0, 3]) != 3 else 4  # row 0's last question token
    with torch.no_grad():
        a, b = server.logits(y, ids, split), server.logits(y, ids2, split)
    readout = n + 3  # position of row 0's text token 3, which predicts token 4
    assert not torch.allclose(a[0, readout], b[0, readout])
    assert torch.allclose(a[0, : split[0]], b[0, : split[0]])  # tokens before it are unchanged
    assert torch.allclose(a[1], b[1])


@pytest.mark.parametrize("position", ["after-question", "before-last-token"])
def test_image_after_question_trains(tiny_cfg, position):
    res = run_reference(tiny_cfg.replace(image_position=position, grad_clip=1.0, adam_beta2=0.95), num_partitions=2)
    assert all(np.isfinite(res.step_losses)) and 0.0 <= res.accuracy[0] <= 1.0


def test_llava_json_dataset_trains_end_to_end(tmp_path, tiny_cfg):
    path = write_llava_json(generate_synthetic_vqa(60, seed=3, image_size=16), tmp_path / "llava")
    cfg = tiny_cfg.replace(dataset="llava-json", data_path=str(path))
    res = run_reference(cfg, num_partitions=2)
    assert len(res.step_losses) == cfg.local_steps and all(np.isfinite(res.step_losses))
    assert 0.0 <= res.accuracy[0] <= 1.0
    # the tokenizer was built from the JSON's text
    assert "triangle" in get_tokenizer(cfg).get_vocab()
