"""Optimizers and gradient clipping: against torch.optim when installed, by hand otherwise."""

import numpy as np
import pytest

from fastlstm import LSTM, train

OPTIMIZERS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.001)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
]


def gradient_sequence(shapes, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {name: rng.standard_normal(shape) for name, shape in shapes.items()} for _ in range(steps)
    ]


@pytest.mark.parametrize(
    "name, options", OPTIMIZERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTIMIZERS)]
)
def test_optimizer_matches_torch(name, options):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    shapes = {"Wx": (3, 8), "b": (8,)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    torch_options = dict(options)
    if name == "Adam" and torch_options.pop("decoupled_weight_decay", False):
        torch_cls = torch.optim.AdamW
    else:
        torch_cls = getattr(torch.optim, name)
    ours = getattr(train, name)(params, **options)
    theirs = torch_cls(list(tensors.values()), **torch_options)
    for grads in gradient_sequence(shapes, steps=6):
        ours.step(grads)
        for key, tensor in tensors.items():
            tensor.grad = torch.tensor(grads[key])
        theirs.step()
        for key in shapes:
            np.testing.assert_allclose(
                params[key], tensors[key].detach().numpy(), rtol=1e-12, atol=1e-13
            )


def test_sgd_momentum_by_hand():
    p = {"w": np.array([1.0, -2.0])}
    opt = train.SGD(p, lr=0.5, momentum=0.9)
    opt.step({"w": np.array([1.0, 1.0])})  # buf = g = 1 -> p = p - 0.5
    np.testing.assert_allclose(p["w"], [0.5, -2.5])
    opt.step({"w": np.array([2.0, 0.0])})  # buf = 0.9*1 + g = [2.9, 0.9]
    np.testing.assert_allclose(p["w"], [0.5 - 1.45, -2.5 - 0.45])


def test_adam_first_step_is_lr_times_sign():
    """With bias correction the first Adam step moves each weight by lr·sign(g)."""
    p = {"w": np.array([0.0, 1.0, 2.0])}
    train.Adam(p, lr=0.1).step({"w": np.array([3.0, -0.5, 1e-3])})
    np.testing.assert_allclose(p["w"], [-0.1, 1.1, 1.9], atol=1e-6)


def test_optimizer_rejects_bad_input():
    with pytest.raises(TypeError, match="params"):
        train.SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(TypeError, match=r"params\['w'\]"):
        train.SGD({"w": np.zeros(3, np.int64)}, lr=0.1)
    opt = train.Adam({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="missing"):
        opt.step({})
    with pytest.raises(ValueError, match=r"grads\['w'\] must have shape \(3,\)"):
        opt.step({"w": np.zeros(4)})
    with pytest.raises(ValueError, match="nesterov"):
        train.SGD({"w": np.zeros(3)}, lr=0.1, nesterov=True)


def test_clip_grad_norm_scales_to_max_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    total = train.clip_grad_norm(grads, max_norm=1.0)
    assert total == pytest.approx(5.0)
    np.testing.assert_allclose(grads["a"], [3.0 / 5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(grads["b"], [[4.0 / 5]], rtol=1e-6)


def test_clip_grad_norm_leaves_small_gradients_alone():
    grads = {"a": np.array([0.3, 0.4], np.float32)}
    assert train.clip_grad_norm(grads, max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(grads["a"], np.array([0.3, 0.4], np.float32))
    assert grads["a"].dtype == np.float32


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    grads = {"a": rng.standard_normal((4, 5)) * 10, "b": rng.standard_normal(7)}
    tensors = [
        torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads.values()
    ]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.tensor(g.copy())
    want = torch.nn.utils.clip_grad_norm_(tensors, max_norm=2.0)
    got = train.clip_grad_norm(grads, max_norm=2.0)
    assert got == pytest.approx(float(want), rel=1e-12)
    for t, g in zip(tensors, grads.values()):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-12)


def test_clip_grad_norm_non_finite_and_bad_max_norm():
    grads = {"a": np.array([np.inf, 1.0])}
    assert not np.isfinite(train.clip_grad_norm(grads, 1.0))
    with pytest.raises(ValueError, match="max_norm"):
        train.clip_grad_norm({"a": np.ones(2)}, 0.0)


# ---------------------------------------------------------------------- truncated BPTT


def tbptt_problem(batch_first=False):
    layer = LSTM(3, 5, 2, dtype=np.float64, seed=3, batch_first=batch_first)
    rng = np.random.default_rng(4)
    T, B = 11, 3
    x = rng.standard_normal((B, T, 3) if batch_first else (T, B, 3))
    dy = rng.standard_normal(x.shape[:2] + (5,))
    return layer, x, dy


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("lengths", [None, [11, 4, 7]])
def test_truncated_bptt_carries_the_state(batch_first, lengths):
    layer, x, _ = tbptt_problem(batch_first)
    y_full, (h_full, c_full) = layer(x, lengths=lengths)
    chunks = list(train.truncated_bptt(layer, x, 4, lengths=lengths))
    assert [(c.start, c.stop) for c in chunks] == [(0, 4), (4, 8), (8, 11)]
    y = np.concatenate([c.y for c in chunks], axis=1 if batch_first else 0)
    np.testing.assert_allclose(y, y_full, atol=1e-13)
    np.testing.assert_allclose(chunks[-1].state[0], h_full, atol=1e-13)
    np.testing.assert_allclose(chunks[-1].state[1], c_full, atol=1e-13)


def test_truncated_bptt_last_chunk_gradient_equals_full_bptt():
    """Gradients reach a step only from later steps: within the last chunk, cutting at its
    start changes nothing, so its dx equals full BPTT's dx over the same steps."""
    layer, x, dy = tbptt_problem()
    _, _, cache = layer.forward_train(x)
    full = layer.backward(dy, cache)
    *_, last = train.truncated_bptt(layer, x, 4)
    chunk = layer.backward(dy[last.start : last.stop], last.cache)
    np.testing.assert_allclose(chunk.dx, full.dx[last.start :], atol=1e-13)


def test_truncated_bptt_equals_full_bptt_when_the_loss_is_in_the_first_chunk():
    """Nothing flows back across a chunk boundary if no later output matters: the first
    chunk's parameter gradients are then full BPTT's, and later chunks' are zero."""
    layer, x, dy = tbptt_problem()
    dy[4:] = 0.0
    _, _, cache = layer.forward_train(x)
    full = layer.backward(dy, cache)
    chunk_grads = [
        layer.backward(dy[c.start : c.stop], c.cache) for c in train.truncated_bptt(layer, x, 4)
    ]
    for name in full:
        np.testing.assert_allclose(chunk_grads[0][name], full[name], atol=1e-13)
        assert not any(g[name].any() for g in chunk_grads[1:])
    np.testing.assert_allclose(chunk_grads[0].dh0, full.dh0, atol=1e-13)


def test_truncated_bptt_one_chunk_is_full_bptt_and_bad_chunk_length():
    layer, x, dy = tbptt_problem()
    (only,) = train.truncated_bptt(layer, x, 100)
    _, _, cache = layer.forward_train(x)
    full, once = layer.backward(dy, cache), layer.backward(dy, only.cache)
    for name in full:
        np.testing.assert_array_equal(once[name], full[name])
    with pytest.raises(ValueError, match="chunk_length must be an int >= 1, got 0"):
        next(train.truncated_bptt(layer, x, 0))
    with pytest.raises(TypeError, match="chunk_length must be an int"):
        next(train.truncated_bptt(layer, x, 2.5))


# ---------------------------------------------------------------------- output layer, losses


def test_linear_matches_torch():
    torch = pytest.importorskip("torch")
    head = train.Linear(6, 4, dtype=np.float64, seed=5, name="head")
    assert list(head.parameters()) == ["head_W", "head_b"]
    x = np.random.default_rng(6).standard_normal((3, 2, 6))
    dy = np.random.default_rng(7).standard_normal((3, 2, 4))
    y, cache = head.forward_train(x)
    grads = head.backward(dy, cache)
    module = torch.nn.Linear(6, 4).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor(head.W.T))
        module.bias.copy_(torch.tensor(head.b))
    x_t = torch.tensor(x, requires_grad=True)
    y_t = module(x_t)
    (y_t * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(y, y_t.detach().numpy(), atol=1e-13)
    np.testing.assert_allclose(grads.dx, x_t.grad.numpy(), atol=1e-13)
    np.testing.assert_allclose(grads["head_W"], module.weight.grad.numpy().T, atol=1e-13)
    np.testing.assert_allclose(grads["head_b"], module.bias.grad.numpy(), atol=1e-13)
    with pytest.raises(ValueError, match=r"dy must be a numpy.ndarray of shape \(3, 2, 4\)"):
        head.backward(dy[:, :, :3], cache)


@pytest.mark.parametrize("with_mask", [False, True])
def test_losses_match_torch(with_mask):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((5, 3, 7)) * 3
    targets = rng.integers(0, 7, (5, 3))
    mask = rng.random((5, 3)) < 0.6 if with_mask else None
    keep = mask if with_mask else np.ones((5, 3), bool)
    loss, d_logits = train.softmax_cross_entropy(logits, targets, mask)
    logits_t = torch.tensor(logits, requires_grad=True)
    want = F.cross_entropy(logits_t[torch.tensor(keep)], torch.tensor(targets[keep]))
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-12)
    np.testing.assert_allclose(d_logits, logits_t.grad.numpy(), atol=1e-14)

    prediction, target = rng.standard_normal((2, 5, 3, 4))
    loss, d_prediction = train.mse_loss(prediction, target, mask)
    prediction_t = torch.tensor(prediction, requires_grad=True)
    want = F.mse_loss(prediction_t[torch.tensor(keep)], torch.tensor(target[keep]))
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-12)
    np.testing.assert_allclose(d_prediction, prediction_t.grad.numpy(), atol=1e-14)


def test_losses_keep_float32_and_are_stable():
    logits = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    loss, d_logits = train.softmax_cross_entropy(logits, np.array([2]))
    assert loss == pytest.approx(2000.0) and d_logits.dtype == np.float32
    np.testing.assert_allclose(d_logits, [[1.0, 0.0, -1.0]], atol=1e-6)
    _, d_prediction = train.mse_loss(np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32))
    assert d_prediction.dtype == np.float32
    with pytest.raises(ValueError, match=r"targets must be integers of shape \(1,\)"):
        train.softmax_cross_entropy(logits, np.array([0.5]))
    with pytest.raises(ValueError, match=r"mask must have shape \(1,\)"):
        train.softmax_cross_entropy(logits, np.array([1]), mask=np.ones(2, bool))
    with pytest.raises(ValueError, match="target must have prediction's shape"):
        train.mse_loss(np.zeros((2, 3)), np.zeros((3, 2)))
