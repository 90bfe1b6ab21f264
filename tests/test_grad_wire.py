"""The downlink gradient records (sim/wire/streams.py): the shape codecs see, entropy coding
of the gradient codes (``grad-entropy-coding``) and error feedback (``grad-error-feedback``,
sim/compress/error_feedback.py), through the real message builder and parser."""

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from sim.compress import get_codec
from sim.compress.error_feedback import ErrorFeedback
from sim.compress.streams import Streams
from sim.training.engine import RoundEngine
from sim.wire.arrays import WireError, record_to_arrays
from sim.wire.messages import train_request
from sim.wire.streams import decode_grad_records, grad_records, grad_shape

from conftest import scratch_cfg

B, N, D = 4, 16, 32


def cfg(**kw):
    return scratch_cfg(batch_size=B, hidden_size=D, image_size=16, patch_size=4, **kw)  # 16 image tokens of 32


def grads(count=3, seed=0, scale=1e-3):
    gen = torch.Generator().manual_seed(seed)
    return [Streams(torch.randn(B, N, D, generator=gen) * scale) for _ in range(count)]


def shapes(count=3):
    return Streams([(B, N, D)] * count)


def records_of(c, gs, feedback=None):
    rd = RecordDict()
    for name, rec in grad_records(c, gs, feedback).items():
        rd[name] = rec
    return rd


def test_grad_shape_is_per_sample_for_equal_micro_batches_and_rows_otherwise():
    assert grad_shape([(4, 16, 32)] * 3) == (12, 16, 32)
    assert grad_shape([(1, 5, 32), (1, 7, 32)]) == (12, 32)  # the text stream: unequal lengths
    with pytest.raises(WireError):
        grad_shape([])


@pytest.mark.parametrize("name", ["none", "fp16", "topk", "nf"])
def test_the_codecs_that_existed_encode_the_per_sample_shape_like_rows(name):
    """Existing configs send byte-identical gradients: per-row codecs do not see the
    difference between (samples, N, D) and (rows, D)."""
    c = cfg(grad_compressor=name, grad_bits=3).grad_codec()
    g = torch.randn(12, N, D) * 1e-3
    a, b = c.encode_gradient(g), c.encode_gradient(g.reshape(-1, D))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,bits", [("stochastic", 2), ("stochastic", 8), ("nf", 4)])
@pytest.mark.parametrize("method", ["ans", "zstd"])
def test_entropy_coding_of_gradient_codes_is_lossless_and_counted(name, bits, method):
    plain, coded = cfg(grad_compressor=name, grad_bits=bits), cfg(grad_compressor=name, grad_bits=bits,
                                                                  grad_entropy_coding=method)
    gs = grads()
    g_plain = decode_grad_records(records_of(plain, gs), plain, shapes())
    rd = records_of(coded, gs)
    arrays = record_to_arrays(rd.array_records["grads"])
    assert "codes.index" not in arrays and ("codes.ans_words" in arrays or "codes.zstd" in arrays)
    g_coded = decode_grad_records(rd, coded, shapes())
    assert all(torch.equal(a.image, b.image) for a, b in zip(g_plain, g_coded))
    if bits == 2:  # gradients are peaked: their 2-bit codes have well under 2 bits of entropy
        size = lambda r: sum(a.nbytes for a in record_to_arrays(r.array_records["grads"]).values())
        assert size(rd) < size(records_of(plain, gs))


def test_entropy_coded_records_are_checked():
    c = cfg(grad_compressor="stochastic", grad_bits=2, grad_entropy_coding="ans")
    rd = records_of(c, grads())
    arrays = record_to_arrays(rd.array_records["grads"])
    from flwr.app import ArrayRecord

    from sim.wire.arrays import arrays_to_record
    for key in ("codes.ans_words", "side.ans_counts"):
        bad = {**arrays, key: arrays[key][:-1]}
        with pytest.raises(WireError):
            decode_grad_records(RecordDict({"grads": arrays_to_record(bad)}), c, shapes())
    plain = cfg(grad_compressor="stochastic", grad_bits=2)
    with pytest.raises(WireError):  # a plain record where an entropy-coded one is expected
        decode_grad_records(records_of(plain, grads()), c, shapes())
    assert isinstance(rd.array_records["grads"], ArrayRecord)


def test_error_feedback_keeps_what_the_codec_did_not_deliver():
    c = cfg(grad_compressor="topk", grad_bits=2, grad_error_feedback=True)
    fb = ErrorFeedback()
    sent_total, true_total = torch.zeros(3 * B, N, D), torch.zeros(3 * B, N, D)
    for e in range(5):
        gs = grads(seed=e)
        sent = decode_grad_records(records_of(c, gs, fb), c, shapes())
        sent_total += torch.cat([s.image for s in sent])
        true_total += torch.cat([g.image for g in gs])
        # telescoping: everything sent so far plus the residual is everything computed so far
        torch.testing.assert_close(sent_total + fb.residual["image"], true_total, rtol=0, atol=1e-6)
    assert fb.residual["image"].abs().max() > 0
    # without error feedback the dropped part is lost instead
    lost = sum(torch.cat([s.image for s in decode_grad_records(records_of(c, grads(seed=e)), c, shapes())]) for e in range(5))
    assert (lost - true_total).norm() > 1.3 * (sent_total - true_total).norm()  # sqrt(5) errors vs one residual


def test_error_feedback_changes_nothing_for_a_lossless_codec_and_drops_a_mismatched_residual():
    c = cfg(grad_compressor="none", grad_error_feedback=True)
    fb = ErrorFeedback()
    gs = grads()
    sent = decode_grad_records(records_of(c, gs, fb), c, shapes())
    assert all(torch.equal(a.image, b.image) for a, b in zip(sent, gs)) and fb.residual["image"].abs().max() == 0
    fb.residual["image"] = torch.ones(3 * B, N, D)
    short = grads(count=2)
    out = decode_grad_records(records_of(c, short, fb), c, shapes(2))  # a shorter exchange: the residual is dropped
    assert all(torch.equal(a.image, b.image) for a, b in zip(out, short))


def test_the_wire_format_does_not_depend_on_error_feedback():
    """The client decodes without knowing about the residual: the same record layout."""
    on, off = cfg(grad_compressor="stochastic", grad_bits=3, grad_error_feedback=True), cfg(
        grad_compressor="stochastic", grad_bits=3)
    rd = records_of(on, grads(), ErrorFeedback())
    layout = get_codec("stochastic")(0, 3).gradient_layout((3 * B, N, D))
    assert {k: a.size for k, a in record_to_arrays(rd.array_records["grads"]).items()} == {k: w.count for k, w in layout.items()}
    decode_grad_records(rd, off, shapes())


def test_the_engine_keeps_one_residual_per_client_and_starts_each_round_without(tmp_path):
    from sim.training.reference import run_reference

    c = cfg(grad_compressor="topk", grad_bits=2, grad_error_feedback=True, num_server_rounds=2, local_steps=4,
            steps_per_exchange=2, num_samples=120, out_dir=str(tmp_path))
    res = run_reference(c, 2)
    off = run_reference(c.replace(grad_error_feedback=False), 2)
    assert res.step_losses[:4] == off.step_losses[:4]  # round 1 until its last message: no residual yet
    assert res.step_losses != off.step_losses  # later steps see the clients' corrected gradients
    engine = RoundEngine.__new__(RoundEngine)
    engine.cfg, engine.feedback = c, {}
    assert engine._feedback(0) is engine._feedback(0) and engine._feedback(0) is not engine._feedback(1)
    engine.cfg = c.replace(grad_error_feedback=False)
    assert engine._feedback(0) is None


def test_train_request_passes_the_residuals_on():
    c = cfg(grad_compressor="fp16", grad_error_feedback=True)
    fb = ErrorFeedback()
    train_request(c, 1, 1, [0, 1, 2], [3], False, grads=grads(), feedback=fb)
    assert "image" in fb.residual
