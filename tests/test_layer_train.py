"""Training through `fastlstm.LSTM`: `forward_train` / `backward` against central finite
differences and torch autograd, variable lengths, dropout, `parameters()`, bad inputs."""

import pickle

import numpy as np
import pytest

import fastlstm
from fastlstm import LSTM
from fastlstm._bench.implementations import TORCH_GATE_ORDER, reorder_gates
from fastlstm.train import Adam, Gradients

BACKENDS = fastlstm.available_backends()


def rand(shape, seed, scale=1.0, dtype=np.float64):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def problem(layer, T, B, lengths=None, seed=10):
    """x, state, lengths and random upstream gradients dy, dh_n, dc_n for ``layer``."""
    rows, H, dtype = layer.num_layers * layer.num_directions, layer.hidden_size, layer.dtype
    x_shape = (B, T, layer.input_size) if layer.batch_first else (T, B, layer.input_size)
    y_shape = x_shape[:2] + (layer.num_directions * H,)
    x = rand(x_shape, seed, dtype=dtype)
    state = (rand((rows, B, H), seed + 1, 0.5, dtype), rand((rows, B, H), seed + 2, 0.5, dtype))
    upstream = tuple(
        rand(s, seed + 3 + i, dtype=dtype)
        for i, s in enumerate([y_shape, (rows, B, H), (rows, B, H)])
    )
    return x, state, lengths, upstream


def weighted_loss(layer, x, state, lengths, upstream, rng=None):
    """sum(y·dy) + sum(h_n·dh_n) + sum(c_n·dc_n): its gradients are backward(dy, dh_n, dc_n)."""
    y, (h_n, c_n), _ = layer.forward_train(x, state, lengths, rng=rng)
    dy, dh_n, dc_n = upstream
    return float(np.sum(y * dy) + np.sum(h_n * dh_n) + np.sum(c_n * dc_n))


def finite_difference(loss, array, entries, eps=1e-6):
    """Central differences of ``loss()`` at ``entries`` (flat indices) of ``array`` (in place)."""
    flat = array.reshape(-1)
    out = []
    for index in entries:
        saved = flat[index]
        flat[index] = saved + eps
        plus = loss()
        flat[index] = saved - eps
        minus = loss()
        flat[index] = saved
        out.append((plus - minus) / (2 * eps))
    return np.array(out)


def check_against_finite_differences(layer, x, state, lengths, upstream, rng=None, n_entries=12):
    y, _, cache = layer.forward_train(x, state, lengths, rng=rng)
    grads = layer.backward(upstream[0], cache, upstream[1], upstream[2])
    loss = lambda: weighted_loss(layer, x, state, lengths, upstream, rng)
    arrays = dict(layer.parameters())
    arrays.update(x=x, h0=state[0], c0=state[1])
    analytic = dict(grads)
    analytic.update(x=grads.dx, h0=grads.dh0, c0=grads.dc0)
    pick = np.random.default_rng(0)
    for name, array in arrays.items():
        entries = pick.choice(array.size, min(n_entries, array.size), replace=False)
        want = finite_difference(loss, array, entries)
        got = analytic[name].reshape(-1)[entries]
        scale = max(np.abs(analytic[name]).max(), 1e-3)
        assert np.abs(got - want).max() <= 1e-6 * scale, name
    return grads


FD_CONFIGS = [
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2),
    dict(num_layers=1, reverse=True, batch_first=True),
    dict(num_layers=3, bidirectional=True, batch_first=True),
]


@pytest.mark.parametrize("config", FD_CONFIGS, ids=str)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_gradients_match_finite_differences(config, with_lengths):
    T, B, D, H = 5, 4, 3, 4
    layer = LSTM(D, H, dtype=np.float64, seed=1, backend="numpy", **config)
    lengths = np.array([5, 0, 3, 2]) if with_lengths else None
    check_against_finite_differences(layer, *problem(layer, T, B, lengths))


def test_gradients_past_lengths():
    """dx is zero past each length and dy there is ignored (those outputs are constant zero)."""
    T, B, D, H = 6, 4, 3, 5
    layer = LSTM(D, H, 2, bidirectional=True, dtype=np.float64, seed=2)
    x, state, _, (dy, dh_n, dc_n) = problem(layer, T, B)
    lengths = np.array([2, 6, 0, 4])
    past = np.arange(T)[:, None] >= lengths
    y, _, cache = layer.forward_train(x, state, lengths)
    assert not y[past].any()
    grads = layer.backward(dy, cache, dh_n, dc_n)
    assert not grads.dx[past].any()
    noisy_dy = dy + 100.0 * past[:, :, None]
    again = layer.backward(noisy_dy, cache, dh_n, dc_n)
    for name in grads:
        np.testing.assert_array_equal(again[name], grads[name])
    np.testing.assert_array_equal(again.dx, grads.dx)
    # A sequence of length 0 passes its final-state gradient straight to its initial state.
    np.testing.assert_array_equal(grads.dh0[:, 2], dh_n[:, 2])
    np.testing.assert_array_equal(grads.dc0[:, 2], dc_n[:, 2])


def test_lengths_equal_per_sequence_runs():
    """Each sequence's gradients with lengths equal those of running it alone, cut to its length."""
    T, B, D, H = 7, 3, 4, 5
    layer = LSTM(D, H, 2, bidirectional=True, dtype=np.float64, seed=3)
    x, state, _, (dy, dh_n, dc_n) = problem(layer, T, B)
    lengths = np.array([7, 3, 5])
    _, _, cache = layer.forward_train(x, state, lengths)
    grads = layer.backward(dy, cache, dh_n, dc_n)
    total = {name: np.zeros_like(g) for name, g in grads.items()}
    for j, n in enumerate(lengths):
        one_state = (state[0][:, j : j + 1], state[1][:, j : j + 1])
        _, _, one_cache = layer.forward_train(x[:n, j : j + 1], one_state)
        one = layer.backward(dy[:n, j : j + 1], one_cache, dh_n[:, j : j + 1], dc_n[:, j : j + 1])
        np.testing.assert_allclose(grads.dx[:n, j : j + 1], one.dx, atol=1e-12)
        np.testing.assert_allclose(grads.dh0[:, j : j + 1], one.dh0, atol=1e-12)
        for name in total:
            total[name] += one[name]
    for name in total:
        np.testing.assert_allclose(grads[name], total[name], atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backends_and_dtypes_match_float64_reference(backend, dtype):
    T, B, D, H = 8, 5, 6, 16
    reference = LSTM(D, H, 2, bidirectional=True, dtype=np.float64, seed=4, backend="numpy")
    layer = LSTM.from_weights(
        [tuple(w.astype(dtype) for w in triple) for triple in reference.weights],
        bidirectional=True,
        backend=backend,
    )
    lengths = np.array([8, 3, 8, 1, 5])
    x, state, _, upstream = problem(reference, T, B)
    _, _, cache_ref = reference.forward_train(x, state, lengths)
    want = reference.backward(*upstream[:1], cache_ref, *upstream[1:])
    cast = lambda a: a.astype(dtype)
    y, _, cache = layer.forward_train(cast(x), tuple(map(cast, state)), lengths)
    got = layer.backward(cast(upstream[0]), cache, *map(cast, upstream[1:]))
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == dtype
        assert np.abs(got[name] - want[name]).max() <= tol * np.abs(want[name]).max(), name
    for name in ("dx", "dh0", "dc0"):
        w, g = getattr(want, name), getattr(got, name)
        assert g.dtype == dtype and np.abs(g - w).max() <= tol * np.abs(w).max(), name


# ---------------------------------------------------------------------- torch autograd


def torch_grads_in_our_layout(torch, module):
    """The module's parameter gradients as a layer's weights (bias_ih and bias_hh get the
    same gradient, our b's; from_torch sums the two biases, so one is passed as zero)."""
    grads = {}
    for name, param in module.named_parameters():
        grad = param.grad.detach().numpy()
        grads[name] = np.zeros_like(grad) if name.startswith("bias_hh") else grad
    return LSTM.from_torch(grads, dtype=np.float64).weights


@pytest.mark.parametrize("batch_first", [False, True])
def test_gradients_match_torch_autograd(batch_first):
    torch = pytest.importorskip("torch")
    T, B, D, H = 6, 4, 5, 7
    torch.manual_seed(0)
    module = torch.nn.LSTM(D, H, 2, bidirectional=True, batch_first=batch_first).double()
    layer = LSTM.from_torch(module)
    lengths = np.array([6, 2, 4, 1])
    x, state, _, (dy, dh_n, dc_n) = problem(layer, T, B)
    y, (h_n, c_n), cache = layer.forward_train(x, state, lengths)
    grads = layer.backward(dy, cache, dh_n, dc_n)

    x_t = torch.tensor(x, requires_grad=True)
    states_t = [torch.tensor(s, requires_grad=True) for s in state]
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        x_t, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
    )
    out, (h_t, c_t) = module(packed, tuple(states_t))
    y_t, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    loss = (y_t * torch.tensor(dy)).sum() + (h_t * torch.tensor(dh_n)).sum()
    loss = loss + (c_t * torch.tensor(dc_n)).sum()
    loss.backward()

    np.testing.assert_allclose(y, y_t.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(h_n, h_t.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(c_n, c_t.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(grads.dx, x_t.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(grads.dh0, states_t[0].grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(grads.dc0, states_t[1].grad.numpy(), atol=1e-12)
    theirs = [g for triple in torch_grads_in_our_layout(torch, module) for g in triple]
    assert len(theirs) == len(grads)
    for (name, got), want in zip(grads.items(), theirs):
        np.testing.assert_allclose(got, want, atol=1e-12, err_msg=name)


def test_dropout_matches_torch_with_the_same_mask():
    """torch's inter-layer dropout is ``F.dropout`` of each layer's output; with our mask
    replayed on a stack of one-layer torch LSTMs the outputs and gradients agree."""
    torch = pytest.importorskip("torch")
    T, B, D, H = 5, 3, 4, 6
    layer = LSTM(D, H, 2, dtype=np.float64, dropout=0.5, seed=5)
    x, state, _, (dy, _, _) = problem(layer, T, B)
    y, _, cache = layer.forward_train(x, rng=7)
    grads = layer.backward(dy, cache)
    (mask,) = cache._masks
    x_t = torch.tensor(x, requires_grad=True)
    layer_input = x_t
    for k, (Wx, Wh, b) in enumerate(layer.weights):
        module = torch.nn.LSTM(Wx.shape[0], H).double()
        torch_layout = lambda w: torch.tensor(reorder_gates(w, TORCH_GATE_ORDER).T.copy())
        with torch.no_grad():
            module.weight_ih_l0.copy_(torch_layout(Wx))
            module.weight_hh_l0.copy_(torch_layout(Wh))
            module.bias_ih_l0.copy_(torch_layout(b))
            module.bias_hh_l0.zero_()
        if k:
            layer_input = layer_input * torch.tensor(mask)
        layer_input, _ = module(layer_input)
    (layer_input * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(y, layer_input.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(grads.dx, x_t.grad.numpy(), atol=1e-12)


# ---------------------------------------------------------------------- dropout


def test_dropout_is_seeded_and_off_at_inference():
    T, B, D, H = 6, 4, 3, 8
    layer = LSTM(D, H, 3, dropout=0.4, seed=6)
    x = rand((T, B, D), 0, dtype=np.float32)
    y_a, _, cache_a = layer.forward_train(x, rng=1)
    y_b, _, _ = layer.forward_train(x, rng=1)
    y_c, _, _ = layer.forward_train(x, rng=2)
    np.testing.assert_array_equal(y_a, y_b)
    assert not np.array_equal(y_a, y_c)
    # The layer's own generator continues the seed's stream: equal seeds, equal masks.
    twin = LSTM(D, H, 3, dropout=0.4, seed=6)
    np.testing.assert_array_equal(layer.forward_train(x)[0], twin.forward_train(x)[0])
    # Inference never drops: calling the layer equals training without dropout.
    y_inference, _ = layer(x)
    layer.dropout = 0.0
    np.testing.assert_array_equal(y_inference, layer.forward_train(x)[0])
    np.testing.assert_array_equal(y_inference, layer(x)[0])
    # Masks: one per layer but the last, each entry 0 or 1/(1-p), about p of them zero.
    assert len(cache_a._masks) == 2
    values = np.concatenate([m.ravel() for m in cache_a._masks])
    assert set(np.unique(values)) <= {0.0, np.float32(1 / 0.6)}
    assert 0.2 < np.mean(values == 0) < 0.6


def test_dropout_gradient_uses_the_forward_mask():
    """With the mask fixed by a seed, finite differences of the dropped-out loss agree."""
    layer = LSTM(3, 4, 2, bidirectional=True, dtype=np.float64, dropout=0.5, seed=8)
    args = problem(layer, 5, 3, np.array([5, 2, 4]))
    grads = check_against_finite_differences(layer, *args, rng=11)
    layer.dropout = 0.0
    y, _, cache = layer.forward_train(*args[:3])
    undropped = layer.backward(args[3][0], cache, *args[3][1:])
    assert not np.allclose(grads["l0_forward_Wx"], undropped["l0_forward_Wx"])


def test_dropout_validation():
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        LSTM(3, 4, dropout=1.0)
    with pytest.raises(TypeError, match="dropout must be a float"):
        LSTM(3, 4, 2).dropout = "half"
    layer = pickle.loads(pickle.dumps(LSTM(3, 4, 2, dropout=0.25)))
    assert layer.dropout == 0.25 and "dropout=0.25" in repr(layer)


# ---------------------------------------------------------------------- parameters


def test_parameters_are_the_live_weights():
    T, B, D, H = 4, 2, 3, 5
    layer = LSTM(D, H, 2, bidirectional=True, seed=9)
    params = layer.parameters()
    assert list(params) == [
        f"l{l}_{d}_{w}" for l in range(2) for d in ("forward", "reverse") for w in ("Wx", "Wh", "b")
    ]
    for (name, array), weight in zip(params.items(), [w for t in layer.weights for w in t]):
        assert array.flags.writeable and array.shape == weight.shape
        assert np.shares_memory(array, weight)
    assert not any(w.flags.writeable for t in layer.weights for w in t)
    x = rand((T, B, D), 0, dtype=np.float32)
    before, _ = layer(x)
    params["l1_reverse_b"] += 1.0
    after, _ = layer(x)
    np.testing.assert_array_equal(after[:, :, :H], before[:, :, :H])
    assert not np.allclose(after[:, :, H:], before[:, :, H:])
    assert params["l0_forward_Wx"] is layer.parameters()["l0_forward_Wx"]


def test_streaming_states_use_the_weights_of_their_start():
    D, H = 3, 6
    layer = LSTM(D, H, 2, seed=10)
    x = rand((5, 1, D), 1, dtype=np.float32)
    old_state = layer.initial_state(1)
    params = layer.parameters()
    for name in params:
        params[name] *= 1.5
    new_state = layer.initial_state(1)
    y_new, _ = layer(x)
    scaled_back = LSTM.from_weights([tuple(w / 1.5 for w in t) for t in layer.weights])
    y_old, _ = scaled_back(x)
    for t in range(5):
        old_t = layer.step(x[t], old_state)[0].copy()
        new_t = layer.step(x[t], new_state)[0]
        np.testing.assert_allclose(new_t, y_new[t], atol=1e-6)
        np.testing.assert_allclose(old_t, y_old[t], atol=1e-6)


def test_optimizer_updates_reach_the_layer():
    """A few Adam steps on the layer's own parameters lower a loss; nothing is re-registered."""
    T, B, D, H = 10, 8, 2, 12
    layer = LSTM(D, H, 2, seed=11, dtype=np.float64)
    x = rand((T, B, D), 2)
    target = np.tanh(np.cumsum(x, axis=0))[:, :, :1] * np.ones(H)
    optimizer = Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        y, _, cache = layer.forward_train(x)
        losses.append(float(np.mean((y - target) ** 2)))
        optimizer.step(layer.backward(2 * (y - target) / y.size, cache))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config, lengths",
    [
        (dict(num_layers=2), None),
        (dict(num_layers=2, bidirectional=True), np.array([8, 3, 8, 1, 5, 8, 2, 8, 6])),
        (dict(reverse=True), None),
        (dict(num_layers=1, bidirectional=True, batch_first=True), np.array([4, 8, 0, 7, 8] * 2)),
    ],
    ids=["2-layers", "2-layers-bidir-lengths", "reverse", "bidir-batch-first-lengths"],
)
def test_backward_without_dx_gives_the_same_parameter_gradients(backend, config, lengths):
    # need_dx=False skips the first layer's input gradient only; B = 9, 10 reach the batch
    # loops of the compiled backends on two threads.
    B = 9 if lengths is None else len(lengths)
    layer = LSTM(6, 16, seed=4, dtype=np.float64, backend=backend, **config)
    x, state, _, upstream = problem(layer, 8, B)
    _, _, cache = layer.forward_train(x, state, lengths)
    full = layer.backward(upstream[0], cache, *upstream[1:])
    without = layer.backward(upstream[0], cache, *upstream[1:], need_dx=False)
    assert without.dx is None and list(without) == list(full)
    for name in full:
        np.testing.assert_array_equal(without[name], full[name], err_msg=name)
    np.testing.assert_array_equal(without.dh0, full.dh0)
    np.testing.assert_array_equal(without.dc0, full.dc0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config",
    [dict(), dict(num_layers=2), dict(bidirectional=True), dict(batch_first=True)],
    ids=str,
)
def test_forward_train_outputs_cannot_change_the_gradients(backend, config):
    # The last layer's cache may hold y as its h_{t-1}: y is read-only, h_n and c_n are copies.
    layer = LSTM(4, 6, seed=2, backend=backend, **config)
    x, state, _, upstream = problem(layer, 5, 3)
    y, (h_n, c_n), cache = layer.forward_train(x, state)
    expected = layer.backward(upstream[0], cache, *upstream[1:])
    assert not y.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        y[...] = 0
    h_n[...] = 7.0
    c_n[...] = 7.0
    got = layer.backward(upstream[0], cache, *upstream[1:])
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(got.dx, expected.dx)
    assert layer(x, state)[0].flags.writeable


def test_gradients_dict_and_attributes():
    layer = LSTM(3, 4, seed=12)
    x = rand((2, 5, 3), 3, dtype=np.float32)
    y, _, cache = layer.forward_train(x)
    grads = layer.backward(np.ones_like(y), cache)
    assert isinstance(grads, Gradients) and list(grads) == list(layer.parameters())
    assert grads.dx.shape == x.shape and grads.dh0.shape == (1, 5, 4)
    assert all(g.dtype == np.float32 for g in grads.values())
    merged = {**grads}
    assert set(merged) == set(grads)


def test_empty_batch_and_sequence():
    layer = LSTM(3, 4, 2, bidirectional=True, seed=13, dtype=np.float64)
    for T, B in ((0, 3), (4, 0)):
        x = np.zeros((T, B, 3))
        y, (h_n, _), cache = layer.forward_train(x)
        grads = layer.backward(np.zeros_like(y), cache, np.ones_like(h_n))
        assert grads.dx.shape == x.shape and grads.dh0.shape == (4, B, 4)
        assert all(not g.any() for g in grads.values())
        if T == 0:
            np.testing.assert_array_equal(grads.dh0, np.ones_like(h_n))


# ---------------------------------------------------------------------- bad input


def test_backward_rejects_bad_input():
    layer = LSTM(3, 4, 2, bidirectional=True, seed=14)
    x = rand((5, 2, 3), 4, dtype=np.float32)
    y, (h_n, _), cache = layer.forward_train(x)
    with pytest.raises(
        ValueError,
        match=r"dy must have shape \(T, B, num_directions·H\) = \(5, 2, 8\), got \(5, 2, 4\)",
    ):
        layer.backward(y[:, :, :4], cache)
    with pytest.raises(TypeError, match="dy must have the layer's dtype float32, got float64"):
        layer.backward(y.astype(np.float64), cache)
    with pytest.raises(TypeError, match="dy must be a numpy.ndarray, got list"):
        layer.backward(y.tolist(), cache)
    with pytest.raises(ValueError, match=r"dh_n must have shape .* = \(4, 2, 4\), got \(2, 2, 4\)"):
        layer.backward(y, cache, dh_n=h_n[:2])
    with pytest.raises(TypeError, match="dc_n must have the layer's dtype"):
        layer.backward(y, cache, dc_n=h_n.astype(np.float64))
    with pytest.raises(TypeError, match=r"cache must be the TrainCache .* got tuple"):
        layer.backward(y, layer(x))
    _, _, _, lstm_cache = fastlstm.lstm_forward(x, *layer.weights[0], return_cache=True)
    with pytest.raises(TypeError, match="cache must be the TrainCache .* got LSTMCache"):
        layer.backward(y, lstm_cache)
    other = LSTM(3, 4, 2, bidirectional=True, seed=14)
    with pytest.raises(ValueError, match="cache was made by another layer"):
        other.backward(y, cache)
    with pytest.raises(ValueError, match=r"x must have shape"):
        layer.forward_train(x[:, :, :2])
    with pytest.raises(ValueError, match="lengths must lie in"):
        layer.forward_train(x, lengths=[6, 1])
