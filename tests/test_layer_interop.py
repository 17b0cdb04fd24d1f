"""`LSTM.from_torch`, `LSTM.from_onnx`, `LSTM.from_keras` against the libraries themselves.

Each library's tests skip only when it is not installed. The committed ONNX fixtures (made by
tests/data/make_onnx_fixture.py with their onnxruntime outputs) test the ONNX path without
onnxruntime or torch.
"""

import importlib.util
import os

import numpy as np
import pytest

from fastlstm import LSTM

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
F32 = 1e-5  # DESIGN.md §3, float32 against another float32 implementation: both within it
F64 = 1e-10


def load_fixture_module():
    spec = importlib.util.spec_from_file_location(
        "make_onnx_fixture", os.path.join(DATA, "make_onnx_fixture.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rand(shape, dtype=np.float32, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def onnx_y_to_ours(Y):
    """ONNX Y (T, dirs, B, H) -> fastlstm y (T, B, dirs·H)."""
    T, dirs, B, H = Y.shape
    return Y.transpose(0, 2, 1, 3).reshape(T, B, dirs * H)


# ------------------------------------------------------------------------- gate orders without libraries


def keras_reference(x, kernel, recurrent_kernel, bias):
    """Keras's LSTM math, written from its documented weight layout: gates i, f, c, o."""
    B, T, _ = x.shape
    H = recurrent_kernel.shape[0]
    h, c = np.zeros((B, H)), np.zeros((B, H))
    sigmoid = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    ys = []
    for t in range(T):
        z = x[:, t] @ kernel + h @ recurrent_kernel + bias
        i, f, cand, o = (z[:, k * H : (k + 1) * H] for k in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(cand)
        h = sigmoid(o) * np.tanh(c)
        ys.append(h)
    return np.stack(ys, axis=1), h, c


def test_keras_weights_against_a_numpy_keras_reference():
    D, H = 3, 5
    kernel, recurrent_kernel, bias = (
        rand((D, 4 * H), np.float64, 1),
        rand((H, 4 * H), np.float64, 2),
        rand(4 * H, np.float64, 3),
    )
    x = rand((2, 6, D), np.float64, 4)
    y_ref, h_ref, c_ref = keras_reference(x, kernel, recurrent_kernel, bias)
    layer = LSTM.from_keras([kernel, recurrent_kernel, bias])
    assert layer.batch_first and layer.dtype == np.float64
    y, (h, c) = layer(x)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=F64)
    np.testing.assert_allclose(h[0], h_ref, rtol=0, atol=F64)
    np.testing.assert_allclose(c[0], c_ref, rtol=0, atol=F64)
    no_bias = LSTM.from_keras([kernel, recurrent_kernel])
    np.testing.assert_allclose(
        no_bias(x)[0], keras_reference(x, kernel, recurrent_kernel, 0 * bias)[0], atol=F64
    )


def test_bad_keras_weights():
    with pytest.raises(
        ValueError, match=r"recurrent_kernel must have shape \(H, 4H\), got \(5, 19\)"
    ):
        LSTM.from_keras([np.zeros((3, 20)), np.zeros((5, 19)), np.zeros(20)])
    with pytest.raises(ValueError, match=r"bias must have shape \(4H,\) = \(20,\), got \(19,\)"):
        LSTM.from_keras([np.zeros((3, 20)), np.zeros((5, 20)), np.zeros(19)])
    with pytest.raises(TypeError, match="has dtype float16; .*pass dtype=np.float32"):
        LSTM.from_keras([np.zeros((3, 20), np.float16), np.zeros((5, 20), np.float16)])
    assert (
        LSTM.from_keras([np.zeros((3, 20), np.float16), np.zeros((5, 20))], dtype=np.float32).dtype
        == np.float32
    )
    with pytest.raises(TypeError, match="expected a keras.layers.LSTM"):
        LSTM.from_keras(object())


def test_bad_torch_state_dicts():
    H, D = 3, 2
    state = {
        "weight_ih_l0": np.zeros((4 * H, D), np.float32),
        "weight_hh_l0": np.zeros((4 * H, H), np.float32),
    }
    assert LSTM.from_torch(state).hidden_size == H
    with pytest.raises(ValueError, match=r"proj_size"):
        LSTM.from_torch(dict(state, weight_hr_l0=np.zeros((2, H), np.float32)))
    with pytest.raises(ValueError, match=r"missing \['bias_hh_l0'\]"):
        LSTM.from_torch(dict(state, bias_ih_l0=np.zeros(4 * H, np.float32)))
    with pytest.raises(
        ValueError, match=r"weight_hh_l0 must have \(4H, ·\) gate rows, got shape \(9, 3\)"
    ):
        LSTM.from_torch(dict(state, weight_hh_l0=np.zeros((3 * H, H), np.float32)))
    with pytest.raises(ValueError, match="no weight_ih_l0"):
        LSTM.from_torch({"weight": np.zeros(3)})
    with pytest.raises(TypeError, match="expected a torch.nn.LSTM"):
        LSTM.from_torch([1, 2])


# ------------------------------------------------------------------------- ONNX


def test_onnx_fixture_matches_onnxruntime_outputs():
    pytest.importorskip("onnx")
    expected = np.load(os.path.join(DATA, "lstm_fixture_expected.npz"))
    x, lengths, h0, c0 = expected["x"], expected["lengths"], expected["h0"], expected["c0"]
    layer = LSTM.from_onnx(os.path.join(DATA, "lstm_bidirectional.onnx"))
    assert (layer.num_layers, layer.bidirectional, layer.hidden_size) == (1, True, 4)
    y, (h, c) = layer(x, (h0, c0), lengths=lengths)
    np.testing.assert_allclose(y, onnx_y_to_ours(expected["bidirectional_Y"]), rtol=0, atol=F32)
    np.testing.assert_allclose(h, expected["bidirectional_Y_h"], rtol=0, atol=F32)
    np.testing.assert_allclose(c, expected["bidirectional_Y_c"], rtol=0, atol=F32)
    stacked = LSTM.from_onnx(os.path.join(DATA, "lstm_stacked.onnx"))
    assert (stacked.num_layers, stacked.bidirectional) == (2, False)
    y, (h, c) = stacked(x, lengths=lengths)
    np.testing.assert_allclose(y, expected["stacked_Y"], rtol=0, atol=F32)
    np.testing.assert_allclose(h, expected["stacked_Y_h"], rtol=0, atol=F32)
    np.testing.assert_allclose(c, expected["stacked_Y_c"], rtol=0, atol=F32)


def ort_run(model, feeds):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onnx_single_node_against_onnxruntime(direction, layout, with_bias):
    pytest.importorskip("onnx")
    fixture = load_fixture_module()
    T, B, D, H = 7, 4, 5, 6
    dirs = 2 if direction == "bidirectional" else 1
    W, R, bias = fixture.random_weights(np.random.default_rng(1), dirs, D, H)
    model = fixture.lstm_model(W, R, bias if with_bias else None, direction=direction)
    x = rand((T, B, D), seed=2)
    h0, c0 = rand((dirs, B, H), seed=3, scale=0.5), rand((dirs, B, H), seed=4, scale=0.5)
    lengths = np.array([7, 3, 1, 5], np.int32)
    feeds = {"X": x, "sequence_lens": lengths, "initial_h": h0, "initial_c": c0}
    Y, Y_h, Y_c = ort_run(model, feeds)
    Y_full = ort_run(model, dict(feeds, sequence_lens=np.full(B, T, np.int32)))[0]
    y_expected, y_full_expected = onnx_y_to_ours(Y), onnx_y_to_ours(Y_full)
    if layout:
        # onnxruntime refuses layout=1 ("Batchwise recurrent operations are not supported"):
        # convert the batch-first twin of the model and feed it the batch-first input.
        model = fixture.lstm_model(W, R, bias if with_bias else None, direction=direction, layout=1)
        x = np.ascontiguousarray(x.swapaxes(0, 1))
        y_expected, y_full_expected = y_expected.swapaxes(0, 1), y_full_expected.swapaxes(0, 1)
    layer = LSTM.from_onnx(model)
    assert layer.batch_first == bool(layout) and layer.reverse == (direction == "reverse")
    y, (h, c) = layer(x, (h0, c0), lengths=lengths)
    np.testing.assert_allclose(y, y_expected, rtol=0, atol=F32)
    np.testing.assert_allclose(h, Y_h, rtol=0, atol=F32)
    np.testing.assert_allclose(c, Y_c, rtol=0, atol=F32)
    np.testing.assert_allclose(layer(x, (h0, c0))[0], y_full_expected, rtol=0, atol=F32)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_onnx_stacked_nodes_against_onnxruntime(direction):
    pytest.importorskip("onnx")
    fixture = load_fixture_module()
    rng = np.random.default_rng(5)
    dirs = 2 if direction == "bidirectional" else 1
    D, H = 3, 5
    layers = [fixture.random_weights(rng, dirs, D if k == 0 else dirs * H, H) for k in range(3)]
    model = fixture.stacked_model(layers, direction=direction)
    x = rand((6, 3, D), seed=6)
    lengths = np.array([2, 6, 4], np.int32)
    Y, Y_h, Y_c = ort_run(model, {"X": x, "sequence_lens": lengths})
    layer = LSTM.from_onnx(model)
    assert layer.num_layers == 3 and layer.num_directions == dirs
    y, (h, c) = layer(x, lengths=lengths)
    np.testing.assert_allclose(y, Y, rtol=0, atol=F32)
    np.testing.assert_allclose(h, Y_h, rtol=0, atol=F32)
    np.testing.assert_allclose(c, Y_c, rtol=0, atol=F32)


def test_onnx_rejections():
    onnx = pytest.importorskip("onnx")
    fixture = load_fixture_module()
    W, R, bias = fixture.random_weights(np.random.default_rng(0), 1, 3, 4)
    cases = [
        (dict(attributes={"clip": 3.0}), "cell clipping"),
        (dict(attributes={"input_forget": 1}), "input_forget=1"),
        (
            dict(attributes={"activations": ["Sigmoid", "Relu", "Tanh"]}),
            "activations .* not supported",
        ),
        (dict(P=np.ones((1, 12), np.float32)), "peephole"),
        (dict(weights_as_inputs=True), "W 'W' is not stored in the model"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            LSTM.from_onnx(fixture.lstm_model(W, R, bias, **kwargs))
    with_constant_state = fixture.lstm_model(W, R, bias)
    with_constant_state.graph.initializer.append(
        onnx.numpy_helper.from_array(np.ones((1, 2, 4), np.float32), "initial_h")
    )
    with pytest.raises(ValueError, match="non-zero constant initial_h; .*pass state=\\(h0, c0\\)"):
        LSTM.from_onnx(with_constant_state)
    zero_peepholes = fixture.lstm_model(
        W,
        R,
        bias,
        P=np.zeros((1, 12), np.float32),
        attributes={"activations": ["Sigmoid", "Tanh", "Tanh"]},
    )
    assert LSTM.from_onnx(zero_peepholes).hidden_size == 4
    with pytest.raises(ValueError, match="joined by a Add node"):
        LSTM.from_onnx(
            fixture.stacked_model(
                [(W, R, bias), fixture.random_weights(np.random.default_rng(1), 1, 4, 4)],
                between="Add",
            )
        )
    empty = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    with pytest.raises(ValueError, match="no LSTM node"):
        LSTM.from_onnx(empty)
    with pytest.raises(TypeError, match="expected a path or an onnx.ModelProto"):
        LSTM.from_onnx(42)


# ------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize(
    "config",
    [
        dict(num_layers=1),
        dict(num_layers=3),
        dict(num_layers=2, bidirectional=True),
        dict(num_layers=2, bidirectional=True, batch_first=True),
        dict(num_layers=1, bias=False),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_torch_matches_torch(config, dtype):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    T, B, D, H = 7, 3, 5, 6
    module = torch.nn.LSTM(D, H, **config).to(
        torch.float64 if dtype == np.float64 else torch.float32
    )
    dirs = 2 if config.get("bidirectional") else 1
    rows = config["num_layers"] * dirs
    batch_first = config.get("batch_first", False)
    x = rand((B, T, D) if batch_first else (T, B, D), dtype, seed=1)
    h0, c0 = rand((rows, B, H), dtype, 2, 0.5), rand((rows, B, H), dtype, 3, 0.5)
    with torch.no_grad():
        y_t, (h_t, c_t) = module(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    tol = F64 if dtype == np.float64 else F32
    for source in (module, module.state_dict()):
        layer = LSTM.from_torch(source, batch_first=batch_first)
        assert layer.dtype == dtype and layer.batch_first == batch_first
        y, (h, c) = layer(x, (h0, c0))
        np.testing.assert_allclose(y, y_t.numpy(), rtol=0, atol=tol)
        np.testing.assert_allclose(h, h_t.numpy(), rtol=0, atol=tol)
        np.testing.assert_allclose(c, c_t.numpy(), rtol=0, atol=tol)
    assert LSTM.from_torch(module).batch_first == batch_first


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_match_torch_packed_sequences(bidirectional):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(1)
    T, D, H = 8, 4, 5
    lengths = np.array([3, 8, 1, 5, 8])
    module = torch.nn.LSTM(D, H, 2, bidirectional=bidirectional)
    x = rand((T, len(lengths), D), seed=7)
    with torch.no_grad():
        packed = pack_padded_sequence(
            torch.from_numpy(x), torch.from_numpy(lengths), enforce_sorted=False
        )
        out, (h_t, c_t) = module(packed)
        y_t, _ = pad_packed_sequence(out, total_length=T)
    y, (h, c) = LSTM.from_torch(module)(x, lengths=lengths)
    np.testing.assert_allclose(y, y_t.numpy(), rtol=0, atol=F32)
    np.testing.assert_allclose(h, h_t.numpy(), rtol=0, atol=F32)
    np.testing.assert_allclose(c, c_t.numpy(), rtol=0, atol=F32)


def test_torch_rejections():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="proj_size=2"):
        LSTM.from_torch(torch.nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(ValueError, match="weight_hr"):
        LSTM.from_torch(torch.nn.LSTM(3, 4, proj_size=2).state_dict())
    with pytest.raises(ValueError, match="got a GRU module|weight_ih_l0 must have"):
        LSTM.from_torch(torch.nn.GRU(3, 4))
    with pytest.raises(TypeError, match="has dtype float16"):
        LSTM.from_torch(torch.nn.LSTM(3, 4).half())
    assert LSTM.from_torch(torch.nn.LSTM(3, 4).half(), dtype=np.float32).dtype == np.float32


# ------------------------------------------------------------------------- Keras


@pytest.fixture(scope="module")
def keras():
    if "KERAS_BACKEND" not in os.environ:
        # Keras 3 needs one installed backend; prefer the one users most likely have.
        for name, module in (("tensorflow", "tensorflow"), ("jax", "jax"), ("torch", "torch")):
            if importlib.util.find_spec(module) is not None:
                os.environ["KERAS_BACKEND"] = name
                break
    return pytest.importorskip("keras")


def test_from_keras_lstm_matches_keras(keras):
    B, T, D, H = 3, 7, 5, 6
    keras.utils.set_random_seed(0)
    source = keras.layers.LSTM(H, return_sequences=True, return_state=True)
    x = rand((B, T, D), seed=1)
    y_k, h_k, c_k = (np.asarray(keras.ops.convert_to_numpy(v)) for v in source(x))
    bias = source.get_weights()[2]
    source.set_weights(source.get_weights()[:2] + [bias + rand(bias.shape, seed=2, scale=0.3)])
    y_k, h_k, c_k = (np.asarray(keras.ops.convert_to_numpy(v)) for v in source(x))
    for origin in (source, source.get_weights()):
        layer = LSTM.from_keras(origin)
        y, (h, c) = layer(x)
        np.testing.assert_allclose(y, y_k, rtol=0, atol=F32)
        np.testing.assert_allclose(h[0], h_k, rtol=0, atol=F32)
        np.testing.assert_allclose(c[0], c_k, rtol=0, atol=F32)


def test_from_keras_bidirectional_matches_keras(keras):
    B, T, D, H = 2, 6, 4, 5
    keras.utils.set_random_seed(1)
    source = keras.layers.Bidirectional(
        keras.layers.LSTM(H, return_sequences=True, return_state=True)
    )
    x = rand((B, T, D), seed=3)
    y_k, h_f, c_f, h_b, c_b = (np.asarray(keras.ops.convert_to_numpy(v)) for v in source(x))
    layer = LSTM.from_keras(source)
    assert layer.bidirectional
    y, (h, c) = layer(x)
    np.testing.assert_allclose(y, y_k, rtol=0, atol=F32)
    np.testing.assert_allclose(h, np.stack([h_f, h_b]), rtol=0, atol=F32)
    np.testing.assert_allclose(c, np.stack([c_f, c_b]), rtol=0, atol=F32)


def test_keras_rejections(keras):
    x = rand((1, 2, 3))
    for kwargs, message in (
        (dict(activation="relu"), "activation='relu'"),
        (dict(recurrent_activation="hard_sigmoid"), "recurrent_activation='hard_sigmoid'"),
        (dict(go_backwards=True), "go_backwards=True"),
    ):
        source = keras.layers.LSTM(4, **kwargs)
        source(x)
        with pytest.raises(ValueError, match=message):
            LSTM.from_keras(source)
    summed = keras.layers.Bidirectional(keras.layers.LSTM(4), merge_mode="sum")
    summed(x)
    with pytest.raises(ValueError, match="merge_mode='sum'"):
        LSTM.from_keras(summed)
