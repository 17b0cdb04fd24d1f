"""Optimizers and gradient clipping: against torch.optim when installed, by hand otherwise."""

import numpy as np
import pytest

from fastlstm import train

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
