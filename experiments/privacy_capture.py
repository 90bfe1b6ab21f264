"""What the attacker holds: a victim's uplink message as Flower transports it, and its decoding.

Data flow::

    victim (partition p, FedAvg'd weights W)
      --eval_request + sim.training.client_handlers.client_evaluate (the ClientApp's evaluate.split_infer handler)-->
    reply Message --every object of its tree, deflated (what a SuperLink stores and forwards)-->
    CapturedUplink{object id -> bytes}   +   its ledger row (sim.training.engine.uplink_row)
      --inflate, sim.wire.messages.parse_eval_reply with the server's codec halves-->
    Observation: the decoded features y_hat (n, N, D) of the victim's held-out images

:func:`observe` takes only the captured bytes and the server half, never the client
model or its data, so the attack consumes exactly the bytes the ledger charges for
that message (``tests/test_privacy.py`` checks this). The evaluation reply is used
because it carries the victim's *held-out* images; training replies carry the same
kind of payload for training images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from sim.config import SplitConfig
from sim.training.client_handlers import client_evaluate
from sim.training.engine import uplink_row
from sim.training.node import NodeIdentity
from sim.training.server import ServerRuntime
from sim.training.transport import ensure_task_identity
from sim.wire.arrays import payload_bytes
from sim.wire.ledger import LedgerRow
from sim.wire.messages import EVALUATE, eval_request, parse_eval_reply
from sim.wire.schema import Expect
from sim.wire.streams import FEATURE_RECORDS

VICTIM_NODE_ID = 1001  # any node id: the capture replays one client outside a Flower run


@dataclass(frozen=True)
class CapturedUplink:
    """One reply message as bytes: ``objects`` maps Flower object ids to their deflated content."""

    root_id: str
    objects: dict[str, bytes]
    row: LedgerRow  # the ledger row the strategy writes for this message

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.objects.values())

    def message(self) -> Message:
        """The message inflated from the bytes alone (as a SuperLink hands it to the ServerApp)."""
        msg = inflate_object_from_contents(self.root_id, dict(self.objects))
        if not isinstance(msg, Message):
            raise TypeError(f"captured object {self.root_id[:12]} is a {type(msg).__name__}, not a Message")
        return msg


ATTACK_STREAMS = ("image", "residual")  # the image-derived streams the decoder inverts


@dataclass(frozen=True)
class Observation:
    """What the attacker decodes from one captured reply."""

    features: torch.Tensor  # (n, N, D) float32: y_hat, the server codecs' unpack of the codes
    consumed_bytes: int  # raw bytes of the arrays of the image-stream records that were read
    prompts: list  # per sample: token ids in the clear, or (text-mode=quantized) decoded embeddings (L, D)
    answers: list[np.ndarray]  # the answer token ids, in the clear in every text mode


def capture_eval_uplink(
    cfg: SplitConfig, weights: dict[str, torch.Tensor], partition: int, num_partitions: int, rnd: int = 1
) -> CapturedUplink:
    """Run the victim's ``evaluate.split_infer`` handler with global weights ``weights``; keep its reply's bytes."""
    ensure_task_identity()
    request = Message(eval_request(cfg, rnd, weights), dst_node_id=VICTIM_NODE_ID, message_type=EVALUATE)
    content = client_evaluate(request.content, RecordDict(), NodeIdentity(partition, num_partitions))
    reply = Message(content, reply_to=request)
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
    return CapturedUplink(reply.object_id, objects, uplink_row(rnd, 0, partition, EVALUATE, reply))


def observe(capture: CapturedUplink, cfg: SplitConfig, server: ServerRuntime) -> Observation:
    """Decode a captured reply exactly as the ServerApp does (``parse_eval_reply``).

    The image stream (with ``vit-ln1:k``, ``residual-mode=transmit`` also the residual
    stream, concatenated on the feature axis) of the first ``eval-count`` samples; the
    wrap-around padding of the last micro-batch is dropped, as the server does."""
    msg = capture.message()
    s = server
    expect = Expect(round=capture.row.round, partition=capture.row.partition)
    up = parse_eval_reply(msg.content, cfg, s.model.codecs(), s.tokens, s.dim, s.vocab_size, expect=expect)
    parts = [torch.cat([y[k] for k in ATTACK_STREAMS if k in y], dim=-1) for y in up.y_hats]
    feats = torch.cat(parts)[: len(up.answers)].detach().float()
    records = tuple(FEATURE_RECORDS[k] for k in ATTACK_STREAMS if FEATURE_RECORDS[k] in msg.content.array_records)
    return Observation(feats, payload_bytes(msg.content, records), up.prompts, up.answers)


@dataclass(frozen=True)
class TextRecovery:
    """How much of the victim's text the attacker reads (fractions in [0, 1])."""

    prompt_tokens: float  # prompt (question) tokens read correctly, position by position
    prompts_exact: float  # prompts read back whole, every token right
    answers: float  # answers read back whole


def text_recovery(obs: Observation, prompts: list[np.ndarray], answers: list[np.ndarray],
                  read_prompt: Callable[[torch.Tensor], np.ndarray] | None = None) -> TextRecovery:
    """The share of the victim's prompt tokens, of its whole prompts and of its answers that the attacker reads.

    Token ids in the clear (``text-mode=ids``) are compared as they are; decoded quantised
    prompt embeddings (``text-mode=quantized``) go through ``read_prompt`` (the attacker's
    text reader: :class:`experiments.attack.TextInverter`, or the learned
    :meth:`experiments.text_attack.TextDecoder.read`). ``prompts`` and ``answers`` are the
    ground truth (the victim's token ids)."""
    hits = total = exact = 0
    for got, want in zip(obs.prompts, prompts, strict=True):
        if isinstance(got, torch.Tensor):
            if read_prompt is None:
                raise ValueError("the prompts are quantised embeddings: give read_prompt to invert them")
            got = read_prompt(got)
        got, want = np.asarray(got), np.asarray(want)
        right = int((got == want).sum()) if got.shape == want.shape else 0
        hits, total, exact = hits + right, total + want.size, exact + int(right == want.size)
    same = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(obs.answers, answers, strict=True)]
    return TextRecovery(hits / max(1, total), exact / max(1, len(prompts)),
                        float(np.mean(same)) if same else float("nan"))
