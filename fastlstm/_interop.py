"""Converters from PyTorch, ONNX and Keras LSTM weights to fastlstm's layout.

fastlstm keeps, per layer and direction, Wx (D, 4H), Wh (H, 4H) and one bias b (4H,) with
gate blocks i, f, o, g. The sources differ in gate order and orientation:

============  ==========  =======================================  ======================
library       gates       weights                                  bias
============  ==========  =======================================  ======================
PyTorch       i, f, g, o  weight_ih (4H, D), weight_hh (4H, H)     bias_ih + bias_hh
ONNX          i, o, f, c  W (dirs, 4H, D), R (dirs, 4H, H)         B (dirs, 8H) = [Wb, Rb]
Keras         i, f, c, o  kernel (D, 4H), recurrent_kernel (H, 4H)  bias (4H,)
============  ==========  =======================================  ======================

Each converter returns ``(weights, config)``: the list of (Wx, Wh, b) triples in
``LSTM.from_weights`` order and the keyword arguments (bidirectional, reverse, batch_first)
the source implies. Only the library being converted from is imported, and only then.
"""

import collections.abc
import importlib
import os

import numpy as np

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_OURS = "ifog"


def _to_ifog(array, source_order, axis):
    """Reorder the four gate blocks of ``array`` along ``axis`` from ``source_order`` to i, f, o, g.

    ``source_order`` names the source's blocks with the letters i, f, o, g (a cell candidate
    "c" is our "g"), e.g. "ifgo" for PyTorch.
    """
    blocks = np.split(array, 4, axis=axis)
    return np.concatenate([blocks[source_order.index(gate)] for gate in _OURS], axis=axis)


def _resolve_dtype(source_dtype, dtype, what):
    """The dtype of the converted layer: ``dtype``, or the source's if that is float32/64."""
    if dtype is None:
        if np.dtype(source_dtype) not in _FLOAT_DTYPES:
            raise TypeError(
                f"{what} has dtype {source_dtype}; fastlstm computes in float32 or float64: "
                "pass dtype=np.float32 (or np.float64) to convert"
            )
        return np.dtype(source_dtype)
    if np.dtype(dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float64 or None, got {np.dtype(dtype)}")
    return np.dtype(dtype)


def _require(module_name, purpose):
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"{purpose} needs the '{module_name}' package: {exc}") from exc


def _check_gate_rows(name, array, H=None):
    """Require a (4H, ·) matrix (a (4H,) vector when 1-D); return H."""
    if (
        array.ndim not in (1, 2)
        or array.shape[0] % 4
        or (H is not None and array.shape[0] != 4 * H)
    ):
        want = "(4H, ·)" if H is None else f"(4H = {4 * H}, ·)"
        raise ValueError(f"{name} must have {want} gate rows, got shape {array.shape}")
    return array.shape[0] // 4


# ---------------------------------------------------------------------------- PyTorch


def _torch_to_numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def from_torch(source, dtype=None):
    """Weights of a ``torch.nn.LSTM`` or its state_dict; see `LSTM.from_torch`."""
    if isinstance(source, collections.abc.Mapping):
        state, batch_first = source, False
    elif hasattr(source, "state_dict") and hasattr(source, "weight_ih_l0"):
        if getattr(source, "proj_size", 0):
            raise ValueError(
                f"torch.nn.LSTM with proj_size={source.proj_size} (LSTM with projections) is not "
                "supported: fastlstm layers have no projection weight_hr"
            )
        if getattr(source, "mode", "LSTM") != "LSTM":
            raise ValueError(f"expected a torch.nn.LSTM, got a {source.mode} module")
        state, batch_first = source.state_dict(), bool(source.batch_first)
    else:
        raise TypeError(
            f"expected a torch.nn.LSTM or its state_dict(), got {type(source).__name__}"
        )
    arrays = {name: _torch_to_numpy(value) for name, value in state.items()}
    if any(name.startswith("weight_hr_l") for name in arrays):
        raise ValueError(
            "state_dict has weight_hr_l* (torch.nn.LSTM with proj_size > 0): projections are "
            "not supported"
        )
    if "weight_ih_l0" not in arrays:
        raise ValueError(
            f"state_dict has no weight_ih_l0; expected torch.nn.LSTM keys, got {sorted(arrays)}"
        )
    bidirectional = "weight_ih_l0_reverse" in arrays
    has_bias = "bias_ih_l0" in arrays
    suffixes = ["", "_reverse"] if bidirectional else [""]
    kinds = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if has_bias else [])
    num_layers = 0
    while f"weight_ih_l{num_layers}" in arrays:
        num_layers += 1
    expected = {
        f"{kind}_l{layer}{suffix}"
        for layer in range(num_layers)
        for suffix in suffixes
        for kind in kinds
    }
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ValueError(
            f"state_dict keys do not describe a torch.nn.LSTM with {num_layers} layer(s), "
            f"bidirectional={bidirectional}, bias={has_bias}: missing {missing}, unexpected {extra}"
        )
    dtype = _resolve_dtype(arrays["weight_ih_l0"].dtype, dtype, "weight_ih_l0")
    weights = []
    for layer in range(num_layers):
        for suffix in suffixes:
            name = f"l{layer}{suffix}"
            weight_ih, weight_hh = arrays[f"weight_ih_{name}"], arrays[f"weight_hh_{name}"]
            H = _check_gate_rows(f"weight_hh_{name}", weight_hh)
            _check_gate_rows(f"weight_ih_{name}", weight_ih, H)
            if has_bias:
                bias_ih, bias_hh = arrays[f"bias_ih_{name}"], arrays[f"bias_hh_{name}"]
                _check_gate_rows(f"bias_ih_{name}", bias_ih, H)
                _check_gate_rows(f"bias_hh_{name}", bias_hh, H)
                bias = bias_ih.astype(np.float64) + bias_hh.astype(np.float64)
            else:
                bias = np.zeros(4 * H)
            weights.append(
                (
                    _to_ifog(weight_ih, "ifgo", axis=0).T.astype(dtype),
                    _to_ifog(weight_hh, "ifgo", axis=0).T.astype(dtype),
                    _to_ifog(bias, "ifgo", axis=0).astype(dtype),
                )
            )
    return weights, {"bidirectional": bidirectional, "batch_first": batch_first}


# ---------------------------------------------------------------------------- ONNX

#: Ops that only move data around, allowed between two stacked LSTM nodes (torch exports
#: Transpose + Reshape or Squeeze there to turn Y (T, dirs, B, H) into (T, B, dirs·H)).
_ONNX_LAYOUT_OPS = {
    "Transpose",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Flatten",
    "Concat",
    "Constant",
    "Shape",
    "Gather",
    "Slice",
    "Cast",
    "Dropout",
}
_ONNX_DEFAULT_ACTIVATIONS = ["Sigmoid", "Tanh", "Tanh"]


def _onnx_constants(onnx, graph):
    """Every tensor stored in the graph: initializers and Constant nodes' values."""
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = onnx.numpy_helper.to_array(attr.t)
    return constants


def _onnx_node_weights(onnx, node, constants, dtype):
    """(weights, direction, layout) of one ONNX LSTM node, gates converted to i, f, o, g."""
    label = f"ONNX LSTM node {node.name or node.output[0]!r}"
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    direction = attrs.get("direction", b"forward").decode()
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ValueError(f"{label}: unknown direction {direction!r}")
    num_directions = 2 if direction == "bidirectional" else 1
    activations = [name.decode() for name in attrs.get("activations", [])]
    if activations and activations != _ONNX_DEFAULT_ACTIVATIONS * num_directions:
        raise ValueError(
            f"{label}: activations {activations} are not supported; fastlstm computes "
            f"{_ONNX_DEFAULT_ACTIVATIONS * num_directions}"
        )
    if "clip" in attrs:
        raise ValueError(f"{label}: cell clipping (clip={attrs['clip']}) is not supported")
    if attrs.get("input_forget", 0):
        raise ValueError(
            f"{label}: input_forget=1 (coupled input and forget gates) is not supported"
        )
    inputs = list(node.input) + [""] * (8 - len(node.input))
    x_name, W_name, R_name, B_name, _, h0_name, c0_name, P_name = inputs

    def stored(name, what):
        if name not in constants:
            raise ValueError(
                f"{label}: {what} {name!r} is not stored in the model (a graph input?); "
                "fastlstm needs the weights as initializers or Constant nodes"
            )
        return constants[name]

    W, R = stored(W_name, "W"), stored(R_name, "R")
    dtype = _resolve_dtype(W.dtype, dtype, f"{label} W")
    if R.ndim != 3 or R.shape[0] != num_directions or R.shape[1] != 4 * R.shape[2]:
        raise ValueError(
            f"{label}: R must have shape (num_directions={num_directions}, 4H, H), got {R.shape}"
        )
    H = R.shape[2]
    if W.ndim != 3 or W.shape[:2] != (num_directions, 4 * H):
        raise ValueError(
            f"{label}: W must have shape ({num_directions}, {4 * H}, D), got {W.shape}"
        )
    if "hidden_size" in attrs and attrs["hidden_size"] != H:
        raise ValueError(f"{label}: hidden_size={attrs['hidden_size']} but R has H = {H}")
    bias = stored(B_name, "B") if B_name else np.zeros((num_directions, 8 * H))
    if bias.shape != (num_directions, 8 * H):
        raise ValueError(
            f"{label}: B must have shape ({num_directions}, {8 * H}), got {bias.shape}"
        )
    for name, what in (
        (P_name, "peephole weights P"),
        (h0_name, "initial_h"),
        (c0_name, "initial_c"),
    ):
        if name and name in constants and np.any(constants[name] != 0):
            hint = (
                "peepholes are not supported"
                if name == P_name
                else "fastlstm takes initial states at call time: pass state=(h0, c0) instead"
            )
            raise ValueError(f"{label}: non-zero constant {what}; {hint}")
    if P_name and P_name not in constants:
        raise ValueError(f"{label}: peephole input P is given; peepholes are not supported")
    weights = []
    for d in range(num_directions):
        b = bias[d, : 4 * H].astype(np.float64) + bias[d, 4 * H :].astype(np.float64)
        weights.append(
            (
                _to_ifog(W[d], "iofg", axis=0).T.astype(dtype),
                _to_ifog(R[d], "iofg", axis=0).T.astype(dtype),
                _to_ifog(b, "iofg", axis=0).astype(dtype),
            )
        )
    return weights, direction, int(attrs.get("layout", 0)), dtype


def _onnx_check_chained(graph, previous, current):
    """Require ``current``'s X to be computed from ``previous``'s outputs by layout ops only."""
    producers = {output: node for node in graph.node for output in node.output}
    reaches = {}

    def depends_on_previous(tensor):
        node = producers.get(tensor)
        if node is None:
            return False
        if node is previous:
            return True
        key = id(node)
        if key not in reaches:
            reaches[key] = False
            reaches[key] = any(depends_on_previous(name) for name in node.input if name)
            if reaches[key] and node.op_type not in _ONNX_LAYOUT_OPS:
                raise ValueError(
                    f"ONNX LSTM nodes {previous.name!r} and {current.name!r} are joined by a "
                    f"{node.op_type} node; only layout ops {sorted(_ONNX_LAYOUT_OPS)} can sit "
                    "between stacked LSTM layers"
                )
        return reaches[key]

    if not depends_on_previous(current.input[0]):
        raise ValueError(
            f"ONNX LSTM node {current.name!r} does not read the output of {previous.name!r}; "
            "fastlstm converts one LSTM node or a chain of stacked ones"
        )


def from_onnx(source, dtype=None):
    """Weights of an ONNX model's LSTM node(s); see `LSTM.from_onnx`."""
    onnx = _require("onnx", "LSTM.from_onnx")
    if isinstance(source, onnx.ModelProto):
        model = source
    elif isinstance(source, (str, os.PathLike)):
        model = onnx.load(os.fspath(source))
    else:
        raise TypeError(f"expected a path or an onnx.ModelProto, got {type(source).__name__}")
    graph = model.graph
    nodes = [
        node for node in graph.node if node.op_type == "LSTM" and node.domain in ("", "ai.onnx")
    ]
    if not nodes:
        raise ValueError("the ONNX model has no LSTM node")
    constants = _onnx_constants(onnx, graph)
    weights, directions, layouts = [], set(), set()
    for k, node in enumerate(nodes):
        if k:
            _onnx_check_chained(graph, nodes[k - 1], node)
        node_weights, direction, layout, node_dtype = _onnx_node_weights(
            onnx, node, constants, dtype
        )
        dtype = node_dtype
        weights.extend(node_weights)
        directions.add(direction)
        layouts.add(layout)
    if len(directions) > 1 or len(layouts) > 1:
        raise ValueError(
            f"stacked ONNX LSTM nodes must share direction and layout, got directions "
            f"{sorted(directions)} and layouts {sorted(layouts)}"
        )
    direction = directions.pop()
    return weights, {
        "bidirectional": direction == "bidirectional",
        "reverse": direction == "reverse",
        "batch_first": layouts.pop() == 1,
    }


# ---------------------------------------------------------------------------- Keras


def _keras_activation_name(function):
    return getattr(function, "__name__", repr(function))


def _keras_cell_weights(layer, dtype, *, allow_backwards):
    """(Wx, Wh, b) of one Keras LSTM layer, after checking it computes what we compute."""
    name = getattr(layer, "name", type(layer).__name__)
    activation = _keras_activation_name(layer.activation)
    recurrent = _keras_activation_name(layer.recurrent_activation)
    if activation != "tanh" or recurrent != "sigmoid":
        raise ValueError(
            f"Keras LSTM {name!r}: activation={activation!r}, recurrent_activation={recurrent!r} "
            "are not supported; fastlstm computes activation='tanh', recurrent_activation='sigmoid'"
        )
    if getattr(layer, "go_backwards", False) and not allow_backwards:
        raise ValueError(
            f"Keras LSTM {name!r}: go_backwards=True (outputs in reversed time order) is "
            "supported only inside keras.layers.Bidirectional"
        )
    return _keras_weights(layer.get_weights(), dtype, f"Keras LSTM {name!r}")


def _keras_weights(arrays, dtype, label):
    arrays = [np.asarray(array) for array in arrays]
    if len(arrays) not in (2, 3):
        raise ValueError(
            f"{label}: expected [kernel, recurrent_kernel, bias] (bias optional), "
            f"got {len(arrays)} arrays"
        )
    kernel, recurrent_kernel = arrays[0], arrays[1]
    if recurrent_kernel.ndim != 2 or recurrent_kernel.shape[1] != 4 * recurrent_kernel.shape[0]:
        raise ValueError(
            f"{label}: recurrent_kernel must have shape (H, 4H), got {recurrent_kernel.shape}"
        )
    H = recurrent_kernel.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != 4 * H:
        raise ValueError(f"{label}: kernel must have shape (D, 4H = {4 * H}), got {kernel.shape}")
    bias = arrays[2] if len(arrays) == 3 else np.zeros(4 * H, kernel.dtype)
    if bias.shape != (4 * H,):
        raise ValueError(f"{label}: bias must have shape (4H,) = ({4 * H},), got {bias.shape}")
    dtype = _resolve_dtype(kernel.dtype, dtype, f"{label} kernel")
    return tuple(
        _to_ifog(array, "ifgo", axis=-1).astype(dtype) for array in (kernel, recurrent_kernel, bias)
    )


def from_keras(source, dtype=None):
    """Weights of a Keras LSTM or Bidirectional(LSTM) layer, or of its weight list."""
    kind = type(source).__name__
    if isinstance(source, (list, tuple)):
        return [_keras_weights(source, dtype, "Keras weights")], {"bidirectional": False}
    if kind == "Bidirectional":
        if getattr(source, "merge_mode", None) != "concat":
            raise ValueError(
                f"Keras Bidirectional with merge_mode={source.merge_mode!r} is not supported; "
                "fastlstm concatenates [forward, reverse] (merge_mode='concat')"
            )
        forward, backward = source.forward_layer, source.backward_layer
        if getattr(forward, "go_backwards", False) or not getattr(backward, "go_backwards", True):
            raise ValueError("Keras Bidirectional: expected a forward and a go_backwards layer")
        weights = [
            _keras_cell_weights(forward, dtype, allow_backwards=False),
            _keras_cell_weights(backward, dtype, allow_backwards=True),
        ]
        return weights, {"bidirectional": True}
    if hasattr(source, "get_weights") and hasattr(source, "recurrent_activation"):
        return [_keras_cell_weights(source, dtype, allow_backwards=False)], {"bidirectional": False}
    raise TypeError(
        "expected a keras.layers.LSTM, a keras.layers.Bidirectional(LSTM) or "
        f"[kernel, recurrent_kernel, bias], got {kind}"
    )
