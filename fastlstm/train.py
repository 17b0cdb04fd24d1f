"""Small NumPy training utilities: optimizers, gradient clipping, truncated BPTT, an output layer
and the two usual losses.

Parameters and gradients are dicts of arrays with the same keys (``layer.parameters()`` and the
`Gradients` of its backward pass). Optimizers update the parameter arrays in place, so a layer that
owns them sees the new values at once. The update rules follow the common definitions (those of
``torch.optim``), so a model moved between the two trains the same way.

A training step, with ``lstm = fastlstm.LSTM(D, H)`` and ``head = Linear(H, C)``::

    params = {**lstm.parameters(), **head.parameters()}
    optimizer = Adam(params, lr=1e-3)
    y, _, lstm_cache = lstm.forward_train(x)
    logits, head_cache = head.forward_train(y)
    loss, d_logits = softmax_cross_entropy(logits, targets)
    head_grads = head.backward(d_logits, head_cache)
    grads = {**lstm.backward(head_grads.dx, lstm_cache), **head_grads}
    clip_grad_norm(grads, 1.0)
    optimizer.step(grads)
"""

from typing import NamedTuple

import numpy as np


class Gradients(dict):
    """What a layer's ``backward`` returns: a dict of parameter gradients, plus input gradients.

    As a dict it maps each name of the layer's ``parameters()`` to the gradient of that array
    (same shape and dtype), so it goes straight to an optimizer's `Optimizer.step` and to
    `clip_grad_norm`; merge several layers' with ``{**a, **b}``.

    Attributes
    ----------
    dx : ndarray
        Gradient with respect to the layer's input (for `fastlstm.LSTM`: shaped like x, zero
        past each sequence's length).
    dh0, dc0 : ndarray or None
        `fastlstm.LSTM`: gradients with respect to the initial states, shape
        (num_layers·num_directions, B, H), also when the forward call started from zeros.
        None for layers without state.
    """

    __slots__ = ("dx", "dh0", "dc0")

    def __init__(self, *args, dx=None, dh0=None, dc0=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dx, self.dh0, self.dc0 = dx, dh0, dc0


class Optimizer:
    """Base class: keeps the parameters and the per-parameter state.

    Parameters
    ----------
    params : dict of str -> ndarray
        Arrays updated in place by `step`.
    """

    def __init__(self, params):
        if not isinstance(params, dict) or not params:
            raise TypeError("params must be a non-empty dict of name -> numpy.ndarray")
        for name, value in params.items():
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                raise TypeError(
                    f"params[{name!r}] must be a floating numpy.ndarray, "
                    f"got {type(value).__name__}"
                )
            if not value.flags.writeable:
                raise ValueError(f"params[{name!r}] must be writeable: it is updated in place")
        self.params = params
        self.state = {name: {} for name in params}
        self.steps = 0

    def step(self, grads):
        """Apply one update from ``grads`` (dict with the keys of ``params``)."""
        missing = set(self.params) - set(grads)
        if missing:
            raise ValueError(f"grads is missing {sorted(missing)}")
        self.steps += 1
        for name, param in self.params.items():
            grad = grads[name]
            if grad.shape != param.shape:
                raise ValueError(f"grads[{name!r}] must have shape {param.shape}, got {grad.shape}")
            self._update(param, np.asarray(grad, dtype=param.dtype), self.state[name])

    def _update(self, param, grad, state):
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (heavy-ball or Nesterov).

    ``g = grad + weight_decay·p``; with momentum ``buf = momentum·buf + (1 - dampening)·g``
    (``buf = g`` on the first step) and ``g = g + momentum·buf`` (Nesterov) or ``g = buf``;
    then ``p -= lr·g``.
    """

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening = 0")
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov

    def _update(self, param, grad, state):
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if self.momentum:
            if "momentum" not in state:
                state["momentum"] = grad.copy()
            else:
                buf = state["momentum"]
                buf *= self.momentum
                buf += (1 - self.dampening) * grad
            buf = state["momentum"]
            grad = grad + self.momentum * buf if self.nesterov else buf
        param -= self.lr * grad


class RMSprop(Optimizer):
    """RMSprop: divide the gradient by a running root mean square of its recent values.

    ``sq = alpha·sq + (1 - alpha)·g²``; ``avg = sqrt(sq - mean_g²) + eps`` (centered) or
    ``sqrt(sq) + eps``; then ``p -= lr·g / avg``, or through a momentum buffer.
    """

    def __init__(
        self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False
    ):
        super().__init__(params)
        self.lr, self.alpha, self.eps = lr, alpha, eps
        self.weight_decay, self.momentum, self.centered = weight_decay, momentum, centered

    def _update(self, param, grad, state):
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        square_avg = state.setdefault("square_avg", np.zeros_like(param))
        square_avg *= self.alpha
        square_avg += (1 - self.alpha) * grad * grad
        if self.centered:
            grad_avg = state.setdefault("grad_avg", np.zeros_like(param))
            grad_avg *= self.alpha
            grad_avg += (1 - self.alpha) * grad
            avg = np.sqrt(square_avg - grad_avg * grad_avg) + self.eps
        else:
            avg = np.sqrt(square_avg) + self.eps
        if self.momentum:
            buf = state.setdefault("momentum", np.zeros_like(param))
            buf *= self.momentum
            buf += grad / avg
            param -= self.lr * buf
        else:
            param -= self.lr * grad / avg


class Adam(Optimizer):
    """Adam with bias correction; ``decoupled_weight_decay=True`` gives AdamW.

    ``m = β1·m + (1 - β1)·g``, ``v = β2·v + (1 - β2)·g²``,
    ``p -= lr · (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + eps)``. Weight decay adds
    ``weight_decay·p`` to g (Adam) or multiplies p by ``1 - lr·weight_decay`` first (AdamW).
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        decoupled_weight_decay=False,
    ):
        super().__init__(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.decoupled = weight_decay, decoupled_weight_decay

    def _update(self, param, grad, state):
        beta1, beta2 = self.betas
        if self.weight_decay and self.decoupled:
            param *= 1 - self.lr * self.weight_decay
        elif self.weight_decay:
            grad = grad + self.weight_decay * param
        if not state:
            state.update(
                exp_avg=np.zeros_like(param),
                exp_avg_sq=np.zeros_like(param),
                scratch=np.empty_like(param),
            )
        m, v, scratch = state["exp_avg"], state["exp_avg_sq"], state["scratch"]
        # Every operation writes into m, v or scratch: the plain form (formulas above) made
        # seven temporaries per parameter and step: 3.6 ms instead of 2.6 ms for the 0.9 M
        # weights of a 2-layer H=256 LSTM (measured).
        m *= beta1
        np.multiply(grad, 1 - beta1, out=scratch)
        m += scratch
        v *= beta2
        np.multiply(grad, grad, out=scratch)
        scratch *= 1 - beta2
        v += scratch
        np.sqrt(v, out=scratch)  # denom = sqrt(v) / sqrt(1 - β2^t) + eps
        scratch /= np.sqrt(1 - beta2**self.steps)
        scratch += self.eps
        np.divide(m, scratch, out=scratch)
        scratch *= self.lr / (1 - beta1**self.steps)
        param -= scratch


def clip_grad_norm(grads, max_norm):
    """Scale all gradients together so that their joint L2 norm is at most ``max_norm``.

    The standard remedy for exploding gradients in recurrent networks. Gradients are scaled in
    place by ``min(1, max_norm / (total_norm + 1e-6))``.

    Parameters
    ----------
    grads : dict of str -> ndarray
    max_norm : float > 0

    Returns
    -------
    float
        The total norm before clipping (inf or nan if a gradient is not finite; the gradients
        are then scaled by nan, as ``torch.nn.utils.clip_grad_norm_`` does).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    total = float(
        np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    )
    scale = min(1.0, max_norm / (total + 1e-6)) if np.isfinite(total) else np.nan
    if scale != 1.0:
        for g in grads.values():
            g *= g.dtype.type(scale)
    return total


class Chunk(NamedTuple):
    """One chunk of `truncated_bptt`: steps ``start:stop`` of the sequence.

    y : the layer's output on the chunk; state : (h_n, c_n) after it, which the next chunk
    starts from; cache : for ``layer.backward(dy, cache)``.
    """

    start: int
    stop: int
    y: np.ndarray
    state: tuple
    cache: object


def truncated_bptt(layer, x, chunk_length, *, state=None, lengths=None, rng=None):
    """Run ``layer.forward_train`` over a long sequence in chunks, carrying the state across.

    Truncated backpropagation through time: each chunk starts from the state where the
    previous one ended, but is differentiated on its own, so memory and work per update stay
    bounded by ``chunk_length`` steps and gradients do not flow back across chunk boundaries
    (call ``layer.backward(dy, chunk.cache)`` without ``dh_n``, ``dc_n`` and ignore the
    returned ``dh0``, ``dc0``). Updating the parameters between chunks is fine: each chunk's
    forward pass runs when the generator resumes.

    Parameters
    ----------
    layer : fastlstm.LSTM
    x : ndarray, (T, B, input_size), or (B, T, input_size) for a batch_first layer
    chunk_length : int >= 1
        Steps per chunk; the last chunk may be shorter.
    state : tuple (h0, c0) or None
        State before the first chunk (None: zeros).
    lengths : array of ints, shape (B,), optional
        Valid steps of each sequence in x; a sequence that has ended keeps its final state
        through the later chunks.
    rng : numpy.random.Generator, int or None
        Dropout masks, as for ``forward_train``; an int seeds one generator for all chunks.

    Yields
    ------
    Chunk
        ``(start, stop, y, state, cache)`` for steps ``start:stop``.
    """
    if isinstance(chunk_length, bool) or not isinstance(chunk_length, (int, np.integer)):
        raise TypeError(f"chunk_length must be an int >= 1, got {type(chunk_length).__name__}")
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be an int >= 1, got {chunk_length}")
    if not isinstance(x, np.ndarray) or x.ndim != 3:
        raise ValueError(f"x must be a 3-dimensional numpy.ndarray, got {type(x).__name__}")
    time_axis = 1 if layer.batch_first else 0
    T = x.shape[time_axis]
    rng = None if rng is None else np.random.default_rng(rng)
    if lengths is not None:
        lengths = np.asarray(lengths)
    for start in range(0, T, chunk_length):
        stop = min(start + chunk_length, T)
        x_chunk = x[:, start:stop] if time_axis else x[start:stop]
        chunk_lengths = None
        if lengths is not None:
            chunk_lengths = np.clip(lengths - start, 0, stop - start)
        y, state, cache = layer.forward_train(x_chunk, state, chunk_lengths, rng=rng)
        yield Chunk(start, stop, y, state, cache)


class Linear:
    """Dense layer ``y = x @ W + b`` over the last axis, e.g. an output head on an LSTM.

    Parameters
    ----------
    in_features, out_features : int
    dtype : float32 or float64
    seed : int, numpy.random.Generator or None
        W and b start uniform in ±1/√in_features, as torch initialises ``nn.Linear``.
    name : str
        Prefix of the parameter names ``{name}_W`` (in_features, out_features) and
        ``{name}_b`` (out_features,).
    """

    def __init__(self, in_features, out_features, *, dtype=np.float32, seed=None, name="out"):
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(in_features)
        self.W = rng.uniform(-bound, bound, (in_features, out_features)).astype(dtype)
        self.b = rng.uniform(-bound, bound, out_features).astype(dtype)
        self.name = name

    def parameters(self):
        """``{name}_W``, ``{name}_b``: the live arrays, for optimizers to update in place."""
        return {f"{self.name}_W": self.W, f"{self.name}_b": self.b}

    def __call__(self, x):
        """y (..., out_features) from x (..., in_features)."""
        return x @ self.W + self.b

    def forward_train(self, x):
        """y and the cache for `backward` (the input x, by reference)."""
        return self(x), x

    def backward(self, dy, cache):
        """Gradients of W and b by name, with ``.dx`` (shaped like x)."""
        x = cache
        if not isinstance(dy, np.ndarray) or dy.shape != x.shape[:-1] + self.b.shape:
            raise ValueError(
                f"dy must be a numpy.ndarray of shape {x.shape[:-1] + self.b.shape} (y's), got "
                f"{getattr(dy, 'shape', type(dy).__name__)}"
            )
        rows_x = x.reshape(-1, x.shape[-1])
        rows_dy = dy.reshape(-1, dy.shape[-1])
        grads = {f"{self.name}_W": rows_x.T @ rows_dy, f"{self.name}_b": rows_dy.sum(axis=0)}
        return Gradients(grads, dx=dy @ self.W.T)


def _position_weights(mask, shape):
    """Weight of each position for a mean over the positions that ``mask`` keeps."""
    if mask is None:
        count = int(np.prod(shape))
        return None, count
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask must have shape {shape}, got {mask.shape}")
    return mask.astype(bool), int(np.count_nonzero(mask))


def softmax_cross_entropy(logits, targets, mask=None):
    """Mean cross-entropy of integer class targets under softmax(logits), and its gradient.

    ``loss = mean over positions of (logsumexp(logits) - logits[target])``, as
    ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    logits : ndarray, shape (..., C)
    targets : int array, shape (...)
    mask : bool array, shape (...), optional
        Positions to include (e.g. steps within each sequence's length); the mean is over them.

    Returns
    -------
    loss : float
    d_logits : ndarray, shaped and typed like logits
        Zero at masked-out positions.
    """
    targets = np.asarray(targets)
    if targets.shape != logits.shape[:-1] or targets.dtype.kind not in "iu":
        raise ValueError(
            f"targets must be integers of shape {logits.shape[:-1]} (logits' without the class "
            f"axis), got {targets.dtype} {targets.shape}"
        )
    keep, count = _position_weights(mask, targets.shape)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    sums = exp.sum(axis=-1, keepdims=True)
    picked = np.take_along_axis(shifted, targets[..., np.newaxis], axis=-1)[..., 0]
    losses = np.log(sums[..., 0]) - picked
    d_logits = exp / sums
    np.put_along_axis(
        d_logits,
        targets[..., np.newaxis],
        np.take_along_axis(d_logits, targets[..., np.newaxis], axis=-1) - 1,
        axis=-1,
    )
    if keep is not None:
        losses = losses[keep]
        d_logits *= keep[..., np.newaxis]
    d_logits /= max(count, 1)
    return float(losses.sum(dtype=np.float64)) / max(count, 1), d_logits


def mse_loss(prediction, target, mask=None):
    """Mean squared error and its gradient, as ``torch.nn.functional.mse_loss``.

    Parameters
    ----------
    prediction, target : ndarray, same shape (..., F)
    mask : bool array, shape (...), optional
        Positions to include; the mean is over their elements.

    Returns
    -------
    loss : float
    d_prediction : ndarray, shaped and typed like prediction
    """
    if np.shape(target) != prediction.shape:
        raise ValueError(
            f"target must have prediction's shape {prediction.shape}, got {np.shape(target)}"
        )
    keep, count = _position_weights(mask, prediction.shape[:-1])
    error = prediction - target
    if keep is not None:
        error = error * keep[..., np.newaxis]
    count = max(count * prediction.shape[-1], 1)
    loss = float(np.sum(np.square(error, dtype=np.float64))) / count
    return loss, error * error.dtype.type(2.0 / count)
