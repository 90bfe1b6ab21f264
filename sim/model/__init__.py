"""The model halves: towers and LLM (:mod:`.towers`), the client and server halves
(:mod:`.halves`), the split inside the vision tower (:mod:`.vit_split`), the client
state that FedAvg averages (:mod:`.client_state`) and the feature-noise defence."""

from .client_state import (
    STREAM_PREFIX, client_state, client_state_names, fold_client_state, load_client_state, load_server_synced,
    state_needs_init, synced_names,
)
from .halves import (
    ClientBatch, ClientModel, ServerModel, apply_lora, build_client_model, build_server_model, sequence_logits,
    set_stage,
)
from .towers import (
    build_llm, build_vision_tower, image_token_count, llm_hidden_size, make_connector, sincos_2d, stream_width,
    vision_hidden_size,
)

__all__ = [
    "STREAM_PREFIX", "ClientBatch", "ClientModel", "ServerModel", "apply_lora", "build_client_model", "build_llm",
    "build_server_model", "build_vision_tower", "client_state", "client_state_names", "fold_client_state",
    "image_token_count", "llm_hidden_size", "load_client_state", "load_server_synced", "make_connector", "sequence_logits", "set_stage",
    "sincos_2d", "state_needs_init", "stream_width", "synced_names", "vision_hidden_size",
]
