"""One registry of the ways to run an LSTM, shared by the benchmarks and the tests.

Every entry can prepare a call for an operation on a `Problem`:

- "fwd": forward; fastlstm's through `fastlstm.lstm_forward`, which packs the weights at every
  call;
- "layer": forward through an object that keeps the weights: fastlstm's `LSTM` (which keeps
  them packed), torch's module, an ONNX Runtime session;
- "fwdbwd": forward and the backward pass with upstream gradient ``dy``;
- "step": one streaming time step on ``x[0]`` from the state (h0, c0), as a service receiving
  one frame at a time;
- "train": forward, backward and an Adam update of a 2-layer LSTM whose second layer is
  `second_layer_weights`, from zero states.

Preparing does the one-off work (weight conversion, graph building, JIT warm-up) outside the
timed call; `Prepared.call` is what is timed, and `Prepared.result` turns its return value into
our layout, so that the tests can check every benchmarked implementation against the reference.
"""

import importlib.util
from typing import Callable, NamedTuple

import numpy as np

import fastlstm
from fastlstm import train

from .problems import OPS, second_layer_weights

# Gate blocks along the 4H axis: ours are i, f, o, g. Block k of the peer's layout is our block
# ORDER[k]; both permutations are their own inverse.
TORCH_GATE_ORDER = (0, 1, 3, 2)  # torch: i, f, g, o
ONNX_GATE_ORDER = (0, 2, 1, 3)  # ONNX: i, o, f, c


def reorder_gates(array, order, axis=-1):
    """Permute the four gate blocks of ``array`` along ``axis`` (of length 4H)."""
    blocks = np.split(array, 4, axis=axis)
    return np.concatenate([blocks[k] for k in order], axis=axis)


class Prepared(NamedTuple):
    """A ready-to-time call and the conversion of its return value.

    result(output) -> (y, h_T, c_T) for "fwd" and "layer"; (y, h_T, c_T, LSTMGrads) for "fwdbwd";
    (y (1, B, H), h_1, c_1) for "step", valid after the first call; (y, h_T, c_T) of the
    last layer for "train", the first call's being those of the initial weights.
    """

    call: Callable
    result: Callable


class Implementation(NamedTuple):
    """A way to compute an LSTM. ``prepare(op, problem, n_threads) -> Prepared``.

    Thread pools that are process-wide (fastlstm's, torch's) are set by the caller
    (`runner.fixed_threads`); ``n_threads`` configures per-object pools (ONNX Runtime sessions).
    """

    name: str
    is_peer: bool
    ops: tuple
    requires: tuple  # importable modules it needs
    prepare: Callable
    dtypes: tuple = ("float32", "float64")

    def missing(self, dtype=None):
        """None when usable here (for ``dtype``, if given), else why not."""
        if dtype is not None and str(dtype) not in self.dtypes:
            return f"no {dtype} support"
        if not self.is_peer and self.name not in fastlstm.available_backends():
            from fastlstm._backends import unavailable_backends

            return f"unavailable ({unavailable_backends().get(self.name, 'unknown')})"
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"not installed ({', '.join(absent)})" if absent else None


def _prepare_fastlstm(backend):
    def prepare(op, problem, n_threads):
        x, Wx, Wh, b, h0, c0, dy = problem
        if op == "train":
            layer = fastlstm.LSTM.from_weights(
                [(Wx, Wh, b), second_layer_weights(Wh.shape[0], Wx.dtype)], backend=backend)
            optimizer = train.Adam(layer.parameters(), lr=1e-3)

            def call():
                y, (h_n, c_n), cache = layer.forward_train(x)
                # x is data: no input gradient, as torch (whose x does not require grad).
                optimizer.step(layer.backward(dy, cache, need_dx=False))
                return y, h_n[-1], c_n[-1]

            # No warm-up call here: it would update the weights (the runner warms up).
            return Prepared(call, lambda output: output)
        if op == "layer":
            layer = fastlstm.LSTM.from_weights([(Wx, Wh, b)], backend=backend)
            state = (h0[None], c0[None])
            call = lambda: layer(x, state)
            result = lambda output: (output[0], output[1][0][0], output[1][1][0])
            call()  # as for "fwd"; also packs the weights, which the layer keeps
            return Prepared(call, result)
        if op == "step":
            layer = fastlstm.LSTM.from_weights([(Wx, Wh, b)], backend=backend)
            state = layer.initial_state(x.shape[1], h0[None], c0[None])
            x_t = x[0]
            call = lambda: layer.step(x_t, state)
            result = lambda output: (output[0][None], state.h[0], state.c[0])
            return Prepared(call, result)
        if op == "fwd":
            call = lambda: fastlstm.lstm_forward(x, Wx, Wh, b, h0, c0, backend=backend)
            result = lambda output: output
        else:

            def call():
                y, h_T, c_T, cache = fastlstm.lstm_forward(
                    x, Wx, Wh, b, h0, c0, backend=backend, return_cache=True
                )
                return y, h_T, c_T, fastlstm.lstm_backward(dy, cache)

            result = lambda output: output
        call()  # JIT compilation and first-touch allocation stay outside the timer
        return Prepared(call, result)

    return prepare


def _prepare_torch(op, problem, n_threads):
    import torch

    x, Wx, Wh, b, h0, c0, dy = problem
    T, B, D = x.shape
    H = Wh.shape[0]
    lstm = torch.nn.LSTM(D, H).to(torch.from_numpy(x).dtype)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(reorder_gates(Wx, TORCH_GATE_ORDER).T.copy()))
        lstm.weight_hh_l0.copy_(torch.from_numpy(reorder_gates(Wh, TORCH_GATE_ORDER).T.copy()))
        lstm.bias_ih_l0.copy_(torch.from_numpy(reorder_gates(b, TORCH_GATE_ORDER)))
        lstm.bias_hh_l0.zero_()
    states = tuple(torch.from_numpy(s)[None] for s in (h0, c0))
    x_t = torch.from_numpy(x)

    def outputs(y, h_n, c_n):
        return y.detach().numpy(), h_n[0].detach().numpy(), c_n[0].detach().numpy()

    if op == "train":
        return _prepare_torch_training(problem)
    if op == "step":
        cell = torch.nn.LSTMCell(D, H).to(x_t.dtype)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(lstm, name + "_l0"))
        frame, cell_state = x_t[0], tuple(s[0] for s in states)

        def call():
            with torch.no_grad():
                return cell(frame, cell_state)

        result = lambda output: (output[0][None].numpy(), output[0].numpy(), output[1].numpy())
    elif op in ("fwd", "layer"):  # the module is torch's layer object either way

        def call():
            with torch.no_grad():
                y, (h_n, c_n) = lstm(x_t, states)
            return y, h_n, c_n

        result = lambda output: outputs(*output)
    else:
        x_t.requires_grad_(True)
        for s in states:
            s.requires_grad_(True)
        dy_t = torch.from_numpy(dy)
        leaves = [x_t, *states, *lstm.parameters()]

        def call():
            for leaf in leaves:
                leaf.grad = None
            y, (h_n, c_n) = lstm(x_t, states)
            y.backward(dy_t)
            return y, h_n, c_n

        def result(output):
            def grad(tensor, to_ours=lambda a: a):
                return to_ours(tensor.grad.numpy())

            to_ours = lambda w: reorder_gates(w.T, TORCH_GATE_ORDER)
            grads = fastlstm.LSTMGrads(
                grad(x_t), grad(states[0])[0], grad(states[1])[0],
                grad(lstm.weight_ih_l0, to_ours), grad(lstm.weight_hh_l0, to_ours),
                grad(lstm.bias_ih_l0, lambda g: reorder_gates(g, TORCH_GATE_ORDER)),
            )
            return (*outputs(*output), grads)

    call()
    return Prepared(call, result)


def _prepare_torch_training(problem):
    """The "train" op in torch: 2-layer ``nn.LSTM``, ``backward``, ``optim.Adam``.

    x does not require grad, so torch computes no input gradient; fastlstm's side passes
    ``need_dx=False`` to skip it too: both do the same work.

    torch has two biases per layer where we have one (their sum); Adam would move each, so the
    sum would move twice as far: the second bias stays frozen at zero to train the same model.
    """
    import torch

    x, Wx, Wh, b, _, _, dy = problem
    H = Wh.shape[0]
    module = torch.nn.LSTM(x.shape[2], H, 2).to(torch.from_numpy(x).dtype)
    with torch.no_grad():
        for k, (Wx_k, Wh_k, b_k) in enumerate([(Wx, Wh, b), second_layer_weights(H, Wx.dtype)]):
            to_torch = lambda w: torch.from_numpy(reorder_gates(w, TORCH_GATE_ORDER).T.copy())
            getattr(module, f"weight_ih_l{k}").copy_(to_torch(Wx_k))
            getattr(module, f"weight_hh_l{k}").copy_(to_torch(Wh_k))
            getattr(module, f"bias_ih_l{k}").copy_(to_torch(b_k))
            getattr(module, f"bias_hh_l{k}").zero_().requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    x_t, dy_t = torch.from_numpy(x), torch.from_numpy(dy)

    def call():
        optimizer.zero_grad(set_to_none=True)
        y, (h_n, c_n) = module(x_t)
        y.backward(dy_t)
        optimizer.step()
        return y, h_n, c_n

    result = lambda output: (output[0].detach().numpy(), output[1][-1].detach().numpy(),
                             output[2][-1].detach().numpy())
    return Prepared(call, result)


def onnx_lstm_model(Wx, Wh, b, opset=14):
    """A one-node ONNX graph computing our LSTM: inputs X (T,B,D), initial_h, initial_c
    (1,B,H); outputs Y (T,1,B,H), Y_h, Y_c (1,B,H). Weights are initializers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    H = Wh.shape[0]
    elem = TensorProto.FLOAT if Wx.dtype == np.float32 else TensorProto.DOUBLE
    weights = {
        "W": reorder_gates(Wx, ONNX_GATE_ORDER).T[None],
        "R": reorder_gates(Wh, ONNX_GATE_ORDER).T[None],
        "B": np.concatenate([reorder_gates(b, ONNX_GATE_ORDER), np.zeros_like(b)])[None],
    }
    node = helper.make_node(
        "LSTM", ["X", "W", "R", "B", "", "initial_h", "initial_c"], ["Y", "Y_h", "Y_c"],
        hidden_size=H,
    )
    graph = helper.make_graph(
        [node], "fastlstm_peer",
        [helper.make_tensor_value_info(n, elem, s) for n, s in
         (("X", ["T", "B", Wx.shape[0]]), ("initial_h", [1, "B", H]), ("initial_c", [1, "B", H]))],
        [helper.make_tensor_value_info(n, elem, s) for n, s in
         (("Y", ["T", 1, "B", H]), ("Y_h", [1, "B", H]), ("Y_c", [1, "B", H]))],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w), n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # onnx 1.23 writes IR version 14, which onnxruntime 1.31 refuses (it reads up to 13).
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _prepare_onnxruntime(op, problem, n_threads):
    import onnxruntime

    x, Wx, Wh, b, h0, c0, _ = problem
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = n_threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        onnx_lstm_model(Wx, Wh, b).SerializeToString(), options,
        providers=["CPUExecutionProvider"],
    )
    feeds = {"X": x, "initial_h": h0[None], "initial_c": c0[None]}
    call = lambda: session.run(None, feeds)
    result = lambda output: (output[0][:, 0], output[1][0], output[2][0])
    call()
    return Prepared(call, result)


IMPLEMENTATIONS = {
    impl.name: impl
    for impl in (
        Implementation("numpy", False, OPS, (), _prepare_fastlstm("numpy")),
        Implementation("numba", False, OPS, (), _prepare_fastlstm("numba")),
        Implementation("cython", False, OPS, (), _prepare_fastlstm("cython")),
        Implementation("torch", True, OPS, ("torch",), _prepare_torch),
        # onnxruntime 1.31: "LSTM operator does not support double yet".
        Implementation("onnxruntime", True, ("fwd", "layer"), ("onnxruntime", "onnx"),
                       _prepare_onnxruntime, dtypes=("float32",)),
    )
}
BASELINE = "numpy"
