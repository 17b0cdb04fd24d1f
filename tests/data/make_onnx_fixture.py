"""Build the small ONNX LSTM models the tests use, with onnx.helper only (no torch).

Run ``python tests/data/make_onnx_fixture.py`` to rewrite the committed fixtures:

``lstm_bidirectional.onnx``
    One bidirectional LSTM node, D = 3, H = 4, with bias; X, sequence_lens, initial_h and
    initial_c are graph inputs (dynamic T and B).
``lstm_stacked.onnx``
    Two forward LSTM nodes (D = 3, H = 4, then D = H = 4) joined by Transpose + Reshape, as
    torch's exporter writes stacked layers; outputs Y (T, B, H) and the concatenated states.
``lstm_fixture_expected.npz``
    Inputs and the outputs onnxruntime computed for both models when the fixtures were made,
    so the tests check ``LSTM.from_onnx`` against onnxruntime even where it is not installed.

The tests also import `lstm_model` and `stacked_model` to build other graphs.
"""

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: onnxruntime 1.31 refuses IR version 14, which onnx 1.23 writes by default.
IR_VERSION = 8
OPSET = 14
HERE = os.path.dirname(os.path.abspath(__file__))


def random_weights(rng, num_directions, D, H, dtype=np.float32):
    """ONNX-layout W (dirs, 4H, D), R (dirs, 4H, H), B (dirs, 8H), uniform in ±1/√H."""
    bound = 1 / np.sqrt(H)
    W = rng.uniform(-bound, bound, (num_directions, 4 * H, D)).astype(dtype)
    R = rng.uniform(-bound, bound, (num_directions, 4 * H, H)).astype(dtype)
    B = rng.uniform(-bound, bound, (num_directions, 8 * H)).astype(dtype)
    return W, R, B


def _finish(graph):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def lstm_model(
    W, R, B=None, *, direction="forward", layout=0, attributes=None, P=None, weights_as_inputs=False
):
    """A model with one LSTM node. Graph inputs X, sequence_lens, initial_h, initial_c (all
    dynamic in T and B); outputs Y, Y_h, Y_c. ``attributes`` adds node attributes."""
    num_directions, four_H, D = W.shape
    H = four_H // 4
    elem = helper.np_dtype_to_tensor_dtype(W.dtype)
    x_shape = ["B", "T", D] if layout else ["T", "B", D]
    state_shape = ["B", num_directions, H] if layout else [num_directions, "B", H]
    y_shape = ["B", "T", num_directions, H] if layout else ["T", num_directions, "B", H]
    inputs = [
        helper.make_tensor_value_info("X", elem, x_shape),
        helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("initial_h", elem, state_shape),
        helper.make_tensor_value_info("initial_c", elem, state_shape),
    ]
    stored = {"W": W, "R": R}
    if B is not None:
        stored["B"] = B
    if P is not None:
        stored["P"] = P
    initializers = []
    for name, array in stored.items():
        if weights_as_inputs and name == "W":
            inputs.append(helper.make_tensor_value_info("W", elem, list(W.shape)))
        else:
            initializers.append(numpy_helper.from_array(array, name))
    node = helper.make_node(
        "LSTM",
        [
            "X",
            "W",
            "R",
            "B" if B is not None else "",
            "sequence_lens",
            "initial_h",
            "initial_c",
            "P" if P is not None else "",
        ],
        ["Y", "Y_h", "Y_c"],
        name="lstm",
        hidden_size=H,
        direction=direction,
        layout=layout,
        **(attributes or {}),
    )
    outputs = [
        helper.make_tensor_value_info("Y", elem, y_shape),
        helper.make_tensor_value_info("Y_h", elem, state_shape),
        helper.make_tensor_value_info("Y_c", elem, state_shape),
    ]
    return _finish(helper.make_graph([node], "lstm", inputs, outputs, initializers))


def stacked_model(layers, *, direction="forward", between="Transpose"):
    """Stacked LSTM nodes, each reading the previous Y (T, dirs, B, H) turned into
    (T, B, dirs·H) by Transpose(0, 2, 1, 3) + Reshape(0, 0, -1) (``between="Add"`` puts a
    non-layout op there instead). Inputs X, sequence_lens; outputs Y (T, B, dirs·H) and
    Y_h, Y_c (layers·dirs, B, H)."""
    elem = helper.np_dtype_to_tensor_dtype(layers[0][0].dtype)
    num_directions, _, D = layers[0][0].shape
    nodes, initializers = [], [numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat")]
    layer_input = "X"
    for k, (W, R, B) in enumerate(layers):
        for name, array in (("W", W), ("R", R), ("B", B)):
            initializers.append(numpy_helper.from_array(array, f"{name}{k}"))
        nodes.append(
            helper.make_node(
                "LSTM",
                [layer_input, f"W{k}", f"R{k}", f"B{k}", "sequence_lens"],
                [f"Y{k}", f"Y_h{k}", f"Y_c{k}"],
                name=f"lstm{k}",
                hidden_size=R.shape[2],
                direction=direction,
            )
        )
        if between == "Add":
            nodes.append(helper.make_node("Add", [f"Y{k}", f"Y{k}"], [f"T{k}"]))
        else:
            nodes.append(helper.make_node("Transpose", [f"Y{k}"], [f"T{k}"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"T{k}", "flat"], [f"out{k}"]))
        layer_input = f"out{k}"
    nodes.append(helper.make_node("Identity", [layer_input], ["Y"]))
    for state in ("Y_h", "Y_c"):
        nodes.append(
            helper.make_node("Concat", [f"{state}{k}" for k in range(len(layers))], [state], axis=0)
        )
    inputs = [
        helper.make_tensor_value_info("X", elem, ["T", "B", D]),
        helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]),
    ]
    H = layers[0][1].shape[2]
    outputs = [helper.make_tensor_value_info("Y", elem, ["T", "B", num_directions * H])] + [
        helper.make_tensor_value_info(name, elem, [len(layers) * num_directions, "B", H])
        for name in ("Y_h", "Y_c")
    ]
    return _finish(helper.make_graph(nodes, "stacked", inputs, outputs, initializers))


def main():
    import onnxruntime

    rng = np.random.default_rng(20240611)
    T, B, D, H = 5, 3, 3, 4
    bidirectional = lstm_model(*random_weights(rng, 2, D, H), direction="bidirectional")
    stacked = stacked_model([random_weights(rng, 1, D, H), random_weights(rng, 1, H, H)])
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    lengths = np.array([5, 2, 4], np.int32)
    h0 = rng.standard_normal((2, B, H)).astype(np.float32) * 0.5
    c0 = rng.standard_normal((2, B, H)).astype(np.float32) * 0.5
    expected = {"x": x, "lengths": lengths, "h0": h0, "c0": c0}
    for prefix, model, feeds in (
        (
            "bidirectional",
            bidirectional,
            {"X": x, "sequence_lens": lengths, "initial_h": h0, "initial_c": c0},
        ),
        ("stacked", stacked, {"X": x, "sequence_lens": lengths}),
    ):
        path = os.path.join(HERE, f"lstm_{prefix}.onnx")
        onnx.save(model, path)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        for name, value in zip(("Y", "Y_h", "Y_c"), session.run(["Y", "Y_h", "Y_c"], feeds)):
            expected[f"{prefix}_{name}"] = value
    np.savez(os.path.join(HERE, "lstm_fixture_expected.npz"), **expected)


if __name__ == "__main__":
    main()
