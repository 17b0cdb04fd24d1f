"""Small NumPy training utilities: optimizers acting on a dict of parameters, gradient clipping.

Parameters and gradients are dicts of arrays with the same keys (``layer.parameters()`` and the
gradients of its backward pass). Optimizers update the parameter arrays in place, so a layer that
owns them sees the new values at once. The update rules follow the common definitions (those of
``torch.optim``), so a model moved between the two trains the same way.
"""

import numpy as np


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
                raise TypeError(f"params[{name!r}] must be a floating numpy.ndarray, "
                                f"got {type(value).__name__}")
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

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False):
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

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False):
        super().__init__(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.decoupled = weight_decay, decoupled_weight_decay

    def _update(self, param, grad, state):
        beta1, beta2 = self.betas
        if self.weight_decay and self.decoupled:
            param *= 1 - self.lr * self.weight_decay
        elif self.weight_decay:
            grad = grad + self.weight_decay * param
        m = state.setdefault("exp_avg", np.zeros_like(param))
        v = state.setdefault("exp_avg_sq", np.zeros_like(param))
        m *= beta1
        m += (1 - beta1) * grad
        v *= beta2
        v += (1 - beta2) * grad * grad
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2 = 1 - beta2**self.steps
        denom = np.sqrt(v) / np.sqrt(bias_correction2) + self.eps
        param -= (self.lr / bias_correction1) * m / denom


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
    total = float(np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values())))
    scale = min(1.0, max_norm / (total + 1e-6)) if np.isfinite(total) else np.nan
    if scale != 1.0:
        for g in grads.values():
            g *= g.dtype.type(scale)
    return total
