"""The benchmark shapes of DESIGN.md §4 and the problems built on them."""

from typing import NamedTuple

import numpy as np


class Shape(NamedTuple):
    """An LSTM problem size: sequence length T, batch B, input size D, hidden size H."""

    name: str
    T: int
    B: int
    D: int
    H: int

    def flops(self, op):
        """Floating-point operations of one call: 2·T·B·(D+H)·4H forward (``fwd``, ``layer``),
        about 3x that for forward+backward, one time step for ``step``, and forward+backward of
        two stacked layers (the second with input size H) for ``train``."""
        forward = 2 * self.T * self.B * (self.D + self.H) * 4 * self.H
        second_layer = 2 * self.T * self.B * (2 * self.H) * 4 * self.H
        return {"fwd": forward, "layer": forward, "fwdbwd": 3 * forward,
                "step": forward // self.T, "train": 3 * (forward + second_layer)}[op]

    def label(self):
        return f"{self.name} (T={self.T}, B={self.B}, D={self.D}, H={self.H})"


SHAPES = {
    shape.name: shape
    for shape in (
        Shape("S1", 100, 1, 64, 128),
        Shape("S2", 100, 1, 256, 256),
        Shape("S3", 50, 32, 128, 256),
        Shape("S4", 100, 64, 512, 512),
        Shape("S5", 20, 256, 256, 1024),
    )
}
#: "layer" is a forward call through a model object that keeps its weights (`fastlstm.LSTM`,
#: ``torch.nn.LSTM``, an ONNX Runtime session); "train" is one training step (forward +
#: backward + Adam) of a 2-layer LSTM.
OPS = ("fwd", "layer", "fwdbwd", "step", "train")
#: What ``python -m fastlstm bench`` runs unless --ops says otherwise.
DEFAULT_OPS = ("fwd", "layer", "fwdbwd", "step")


class Problem(NamedTuple):
    """Inputs of one benchmark call: forward arguments and the upstream gradient."""

    x: np.ndarray
    Wx: np.ndarray
    Wh: np.ndarray
    b: np.ndarray
    h0: np.ndarray
    c0: np.ndarray
    dy: np.ndarray


def second_layer_weights(H, dtype, seed=1):
    """Weights (Wx (H, 4H), Wh (H, 4H), b (4H,)) of the second layer of the "train" op."""
    rng = np.random.default_rng(seed)
    k = 1.0 / np.sqrt(H)
    return tuple(rng.uniform(-k, k, shape).astype(dtype) for shape in ((H, 4 * H), (H, 4 * H), 4 * H))


def make_problem(shape, dtype=np.float32, seed=0):
    """Random inputs with PyTorch's initialisation (uniform ±1/√H) for ``shape``."""
    rng = np.random.default_rng(seed)
    T, B, D, H = shape.T, shape.B, shape.D, shape.H
    k = 1.0 / np.sqrt(H)
    arrays = (
        rng.standard_normal((T, B, D)),
        rng.uniform(-k, k, (D, 4 * H)),
        rng.uniform(-k, k, (H, 4 * H)),
        rng.uniform(-k, k, 4 * H),
        rng.uniform(-0.5, 0.5, (B, H)),
        rng.uniform(-0.5, 0.5, (B, H)),
        rng.standard_normal((T, B, H)),
    )
    return Problem(*(a.astype(dtype) for a in arrays))
