"""AlignedVQ codec: wire round trips, exact sizes, STE and DLP gradients, the library
settings, recompute determinism, codebook sync and malformed payloads."""

import inspect

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import VectorQuantize

from sim.compress.base import Payload, PayloadError
from sim.compress.codecs.vq import (
    CLUSTER_SIZE, CODEBOOK_BUFFERS, EMBED, EMBED_AVG, INITTED, VQ, VQClient, VQServer, VQSettings,
    codebook_from_state, codebook_keys, fold_ema,
)
from sim.compress.packing import pack_bits

torch.set_num_threads(1)
DIM = 8
SHAPE = (2, 16, DIM)


def features(seed: int = 0, shape=SHAPE) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def vq(bits: int = 4, seed: int = 0, codebook_size: int | None = None, **settings) -> VQ:
    """The codec definition; ``settings`` are :class:`VQSettings` fields (2 k-means iterations here)."""
    return VQ(DIM, bits, VQSettings(**{"kmeans_iters": 2, **settings}), seed, codebook_size)


def make(bits: int = 4, seed: int = 0, x: torch.Tensor | None = None, **kw) -> tuple[VQClient, VQServer]:
    """Seeded halves with the client's k-means codebook installed on the server."""
    torch.manual_seed(seed)
    spec = vq(bits, seed, **kw)
    client, server = spec.client(), spec.server()
    assert isinstance(client, VQClient) and isinstance(server, VQServer)
    client.init_codebook(features(seed) if x is None else x)
    server.load_codebook(codebook_from_state(client.state_dict()))
    return client, server


def wire(client: VQClient, server: VQServer, enc, shape) -> torch.Tensor:
    return server.unpack(Payload.from_arrays(client.pack(enc).arrays()), tuple(shape))


@pytest.mark.parametrize("bits", [1, 4, 8, 12, 16])
def test_roundtrip_is_bitwise_and_payload_is_exact(bits):
    shape = (3, 5, DIM)  # 15 codes: every bit width but 8 and 16 needs padding
    x = features(1, shape)
    client, server = make(bits, x=x)
    with torch.no_grad():
        enc = client(x)
    p = client.pack(enc)
    assert p.nbytes == p.code_bytes == -(-15 * bits // 8) and p.side_bytes == 0
    assert p.ideal_bits == 15 * bits
    assert enc.codes.shape == shape[:2] and int(enc.codes.max()) < 2**bits
    y_hat = wire(client, server, enc, shape)
    assert y_hat.dtype == enc.y.dtype and torch.equal(y_hat, enc.y)
    assert torch.equal(enc.y, client.codebook[enc.codes])


def test_codes_are_the_nearest_codewords():
    client, _ = make(6)
    x = features(2)
    with torch.no_grad():
        enc = client(x)
    d = torch.cdist(x.reshape(-1, DIM), client.codebook)
    picked = d.gather(1, enc.codes.reshape(-1, 1)).squeeze(1)
    assert torch.allclose(picked, d.min(1).values, atol=1e-5)


def test_vectorquantize_settings():
    client, _ = make(4, beta=0.5, ema_decay=0.95)
    vq, cb = client.vq, client.vq._codebook
    assert isinstance(vq, VectorQuantize)
    assert vq.rotation_trick is False and vq.directional_reparam is False  # plain STE
    assert cb.gumbel_sample.keywords == {"stochastic": False, "straight_through": False}
    assert cb.decay == 0.95 and vq.commitment_weight == 0.5 and vq.codebook_size == 16
    assert vq.ema_update and cb.manual_ema_update and not vq.learnable_codebook
    assert cb.kmeans_iters == 2 and not cb.has_dead_code_replacement and not cb.use_ddp
    default = VQ(DIM, 4).client()
    assert default.vq._codebook.decay == 0.99 and default.vq.commitment_weight == 0.25
    assert default.vq._codebook.kmeans_iters == 10
    # the library's own defaults, which the codec overrides
    params = inspect.signature(VectorQuantize).parameters
    assert params["decay"].default == 0.8 and params["rotation_trick"].default is None


def test_dlp_is_identity_at_init():
    client, server = make(4)
    x = features(3)
    assert torch.equal(client.project(x), x)
    assert torch.equal(server(x), x)
    with torch.no_grad():
        enc = client(x)
        _, direct, _ = client.vq(x, freeze_codebook=True)  # VQ without the DLP
    assert torch.equal(enc.codes, direct)


def test_ste_gradient_reaches_input_and_dlp():
    client, server = make(4)
    x = features(4).requires_grad_(True)
    enc = client(x)
    g = torch.randn(SHAPE)
    (enc.y * g).sum().backward()
    assert torch.equal(x.grad, g)  # identity STE, and d(DLP)/dx = I at gamma = 0
    assert float(client.gamma_in.grad.abs()) > 0
    assert float(client.proj_in.weight.grad.abs().sum()) == 0  # tanh(0) gates it off
    with torch.no_grad():
        client.gamma_in.fill_(0.5)
    client.zero_grad()
    x.grad = None
    enc = client(x)
    (enc.y * g).sum().backward()
    assert float(client.proj_in.weight.grad.abs().sum()) > 0 and float(x.grad.abs().sum()) > 0
    y_hat = wire(client, server, enc, SHAPE).requires_grad_(True)
    server(y_hat).sum().backward()
    assert float(server.gamma_out.grad.abs()) > 0 and y_hat.grad is not None


def test_aux_loss_is_beta_times_commitment():
    client, _ = make(4, beta=0.25)
    x = features(5)
    enc = client(x.clone().requires_grad_(True))
    expected = 0.25 * torch.mean((x - client.codebook[enc.codes]) ** 2)
    assert torch.allclose(enc.aux_loss, expected) and enc.aux_loss.requires_grad
    client.eval()
    assert float(client(x).aux_loss) == 0.0


def test_recompute_gives_bitwise_the_same_codes():
    client, server = make(4)
    x = features(6)
    snapshot = {k: v.clone() for k, v in client.state_dict().items()}
    with torch.no_grad():
        first = client(x)  # the encode (training mode, no grad): no state change
    assert all(torch.equal(v, snapshot[k]) for k, v in client.state_dict().items())
    again = client(x.clone().requires_grad_(True))  # the recompute: EMA statistics only
    assert torch.equal(again.codes, first.codes) and torch.equal(again.y, first.y)
    state = client.state_dict()
    assert torch.equal(state[EMBED], snapshot[EMBED])
    assert not torch.equal(state[EMBED_AVG], snapshot[EMBED_AVG])
    third = client(x.clone().requires_grad_(True))
    assert torch.equal(third.codes, first.codes)
    assert torch.equal(wire(client, server, third, SHAPE), first.y)  # server copy still valid


def test_eval_mode_does_not_accumulate():
    client, _ = make(4)
    client.eval()
    before = {k: v.clone() for k, v in client.state_dict().items()}
    client(features(7).requires_grad_(True))
    assert all(torch.equal(v, before[k]) for k, v in client.state_dict().items())


def test_same_seed_same_input_same_codes():
    x = features(8)
    a, _ = make(5, seed=3, x=x)
    b, _ = make(5, seed=3, x=x)
    c, _ = make(5, seed=4, x=x)  # same data, other k-means sample
    with torch.no_grad():
        ca, cb = a(x).codes, b(x).codes
    assert torch.equal(a.codebook, b.codebook) and torch.equal(ca, cb)
    assert not torch.equal(a.codebook, c.codebook)


def test_kmeans_init_runs_once_and_leaves_global_rng():
    torch.manual_seed(0)
    client = vq(4).client()
    assert client.needs_init
    with pytest.raises(RuntimeError, match="not initialised"):
        client(features(0))
    rng = torch.get_rng_state()
    assert client.init_codebook(features(0)) is True
    assert torch.equal(torch.get_rng_state(), rng)
    book = client.codebook.clone()
    assert client.init_codebook(features(9)) is False
    client(features(9).requires_grad_(True))
    assert torch.equal(client.codebook, book) and client.initialised and not client.needs_init


def test_fold_ema_matches_the_library_update():
    client, _ = make(4)
    for s in range(3):
        client(features(10 + s).requires_grad_(True))
    folded = fold_ema(client.state_dict())
    assert torch.equal(vq(4).fold_synced(client.state_dict())[EMBED], folded[EMBED])  # the definition's round step
    ref = VQ(DIM, 4).client()
    ref.load_state_dict(client.state_dict())
    ref.vq._codebook.update_ema()  # the library's own EMA -> codebook step
    assert torch.equal(folded[EMBED], ref.state_dict()[EMBED])
    client.fold_ema()
    assert torch.equal(client.state_dict()[EMBED], folded[EMBED])


def test_fedavg_then_fold_syncs_clients_and_server():
    """Two clients accumulate on different data; averaging their buffers then folding
    gives one codebook that both clients and the server decode with."""
    base, server = make(4)
    clients = [VQ(DIM, 4).client(), VQ(DIM, 4).client()]
    for i, c in enumerate(clients):
        c.load_state_dict(base.state_dict())
        c(features(20 + i).requires_grad_(True))
    assert clients[0].synced_buffers == CODEBOOK_BUFFERS
    keys = [k for k in CODEBOOK_BUFFERS if k != INITTED]
    avg = {k: (clients[0].state_dict()[k] + 2 * clients[1].state_dict()[k]) / 3 for k in keys}
    avg[INITTED] = torch.tensor(True)
    new = fold_ema(avg)
    assert not torch.equal(new[EMBED], base.state_dict()[EMBED])
    server.load_codebook(codebook_from_state(new))
    x = features(30)
    for c in clients:
        c.load_state_dict({**c.state_dict(), **new})
        with torch.no_grad():
            enc = c(x)
        assert torch.equal(wire(c, server, enc, SHAPE), enc.y)
    assert codebook_keys("codec.")[0] == "codec." + EMBED and CLUSTER_SIZE in CODEBOOK_BUFFERS


def test_codebook_from_state_checks():
    client = VQ(DIM, 4).client()
    with pytest.raises(ValueError, match="never initialised"):
        codebook_from_state(client.state_dict())
    with pytest.raises(KeyError):
        codebook_from_state({}, prefix="codec.")


def test_load_codebook_validates():
    server = VQ(DIM, 4).server()
    with pytest.raises(RuntimeError, match="no codebook"):
        server.unpack(Payload(codes={"index": np.zeros(16, np.uint8)}), SHAPE)
    for bad in (torch.zeros(15, DIM), torch.zeros(1, 16, DIM), torch.zeros(16, DIM + 1),
                torch.zeros(16, DIM, dtype=torch.int64), torch.full((16, DIM), float("nan"))):
        with pytest.raises(ValueError):
            server.load_codebook(bad)
    server.load_codebook(torch.ones(16, DIM))
    assert bool(server.loaded)


def test_malformed_payloads_raise():
    client, server = make(4)
    with torch.no_grad():
        p = client.pack(client(features(11)))
    buf = p.codes["index"]
    cases = [
        Payload(codes={"index": buf.astype(np.int8)}),
        Payload(codes={"index": buf.astype(np.uint16)}),
        Payload(codes={"index": buf[:-1]}),
        Payload(codes={"index": np.concatenate([buf, buf[:1]])}),
        Payload(codes={"index": buf.reshape(2, -1)}),
        Payload(codes={}),
        Payload(codes={"index": buf, "extra": buf}),
        Payload(codes={"index": buf}, side={"scale": np.zeros(1, np.float32)}),
    ]
    for bad in cases:
        with pytest.raises(PayloadError):
            server.unpack(bad, SHAPE)
    with pytest.raises(PayloadError):
        server.unpack(p, (2, 16, DIM + 1))
    with pytest.raises(PayloadError):
        server.unpack(p, (2, 16))


def test_index_beyond_a_smaller_codebook_raises():
    """With 5 codes at 3 bits the packed field can carry 5..7, which must be refused."""
    client, server = make(3, codebook_size=5)
    with torch.no_grad():
        enc = client(features(12))
    assert int(enc.codes.max()) < 5 and client.pack(enc).ideal_bits == pytest.approx(32 * np.log2(5))
    assert torch.equal(wire(client, server, enc, SHAPE), enc.y)
    bad = np.zeros(32, np.int64)
    bad[7] = 5
    with pytest.raises(PayloadError, match="codebook size"):
        server.unpack(Payload(codes={"index": pack_bits(bad, 3)}), SHAPE)
    with pytest.raises(ValueError):
        VQ(DIM, 3, codebook_size=9)
    with pytest.raises(ValueError):
        VQ(DIM, 3, codebook_size=1)
    with pytest.raises(ValueError):
        VQ(DIM, 17)
