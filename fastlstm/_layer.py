"""`LSTM`: a layer object that holds weights, shaped like ``torch.nn.LSTM``, for inference
and training.

Every layer and direction runs through `fastlstm.lstm_forward` with the layer's backend, so
the layer is exactly as fast and as exact as the kernels. Variable lengths run the time loop
for inference as one padded run masked afterwards (`_PaddedPlan`), for training in segments
over the shrinking set of sequences still running (`_BatchPlan`): no wasted steps,
no kernel change. Training (`LSTM.forward_train`, `LSTM.backward`) keeps each segment's
`LSTMCache` and runs `fastlstm.lstm_backward` over the same segments in reverse. Streaming
steps go through a `fastlstm._step.StepKernel`.
"""

import sys
import threading

import numpy as np

from . import _api, _backends, _interop, _persist, _step
from ._validation import check_positive_int, describe_dtype
from .train import Gradients

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_layer_dtype(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _check_backend_name(backend):
    if backend is not None:
        _backends.get_backend(backend, (1, 1, 1, 1))
    return backend


def _check_float_array(name, value, dtype, shape, meaning):
    """Require an ndarray of ``dtype`` and ``shape`` (None entries match any size)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(
            f"{name} must have the layer's dtype {dtype}, got {describe_dtype(value.dtype)}"
        )
    if value.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(value.shape, shape)
    ):
        wanted = "(" + ", ".join("?" if want is None else str(want) for want in shape)
        wanted += ",)" if len(shape) == 1 else ")"
        raise ValueError(f"{name} must have shape {meaning} = {wanted}, got {value.shape}")
    return value


def _check_lengths(lengths, T, B):
    """Validate ``lengths``: integers, shape (B,), each in [0, T]; return an intp array."""
    arr = np.asarray(lengths)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must hold integers, got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths must have shape (B,) = ({B},), got {arr.shape}")
    if B and (arr.min() < 0 or arr.max() > T):
        raise ValueError(
            f"lengths must lie in [0, T] = [0, {T}], got values from {arr.min()} to {arr.max()}"
        )
    return arr.astype(np.intp)


def _cell_reader(name):
    """How to read every c_t out of backend ``name``'s cache, or None if it cannot.

    A backend module offers this by defining ``cells_from_cache(cache_data, c_T) -> (T, B, H)``.
    """
    return getattr(sys.modules.get(_backends.BACKEND_MODULES[name]), "cells_from_cache", None)


def _forward(x, weights, h0, c0, backend, need_cells, need_cache=False, lengths=None,
             prepared=None):
    """One direction of one layer over a time-major batch: ``lstm_forward`` plus, if asked, c_t
    and the `LSTMCache` that ``lstm_backward`` needs.

    With ``lengths``, every row still runs all T steps, but h_T and c_T are each row's states
    at its own last step (see `fastlstm._api.forward_padded`). ``prepared``: the weights'
    `fastlstm._backends.PreparedWeights`, or None.
    Returns y (T, B, H), h_T, c_T (B, H), cells (T, B, H) or None, and the cache or None.
    """
    Wx, Wh, b = weights
    if not (need_cells or need_cache):
        y, h_T, c_T = _api.forward_padded(x, Wx, Wh, b, h0, c0, backend=backend, lengths=lengths,
                                          prepared=prepared)
        return y, h_T, c_T, None, None
    chosen = backend
    if need_cells:
        shape = (x.shape[0], x.shape[1], Wx.shape[0], Wh.shape[0])
        chosen = _api._resolve_backend(backend, shape).name
        if _cell_reader(chosen) is None:
            # This backend cannot expose its cells yet; the reference computes the same numbers.
            chosen = "numpy"
    y, h_T, c_T, cache = _api.forward_padded(x, Wx, Wh, b, h0, c0, backend=chosen,
                                             return_cache=True, prepared=prepared)
    cells = _cell_reader(cache.backend)(cache._data, c_T) if need_cells else None
    if lengths is not None:
        h_T = _backends.state_at_lengths(y, np.zeros_like(h_T) if h0 is None else h0, lengths)
        c_T = _backends.state_at_lengths(cells, np.zeros_like(c_T) if c0 is None else c0, lengths)
    return y, h_T, c_T, cells, cache


def _zero_grads(weights):
    return tuple(np.zeros_like(w) for w in weights)


class _BatchPlan:
    """How a batch with per-sequence ``lengths`` runs: time segments over shrinking subsets.

    At time t the sequences still running are the n_t = #{lengths > t} longest ones; n_t only
    changes at the distinct lengths, so the time loop splits into segments [t0, t1) over a
    fixed subset, each one `lstm_forward` call that carries that subset's state on. No step is
    computed past a sequence's end. While every sequence runs (the first segment, usually the
    longest) the batch is used as it is, without copies. The reverse direction reverses every
    sequence within its own length, runs forward, and reverses back.
    """

    def __init__(self, lengths, T):
        B = lengths.shape[0]
        longest_first = np.argsort(-lengths, kind="stable")
        sorted_lengths = lengths[longest_first]
        self.segments = []  # (t0, t1, running): running is None for the whole batch
        start = 0
        for end in np.unique(sorted_lengths[sorted_lengths > 0]):
            n_running = int(np.count_nonzero(sorted_lengths >= end))
            # Indices in increasing order, so that gathers and scatters walk memory forwards.
            running = None if n_running == B else np.sort(longest_first[:n_running])
            self.segments.append((start, int(end), running))
            start = int(end)
        # reverse_time[t, j] is where step t of sequence j's reversed copy comes from; steps past
        # the length map to themselves, where the outputs are zero.
        steps = np.arange(T)[:, np.newaxis]
        self.reverse_time = np.where(steps < lengths, lengths - 1 - steps, steps)
        self.batch_cols = np.arange(B)[np.newaxis, :]

    def run(self, x, weights, h0, c0, backend, need_cells, reverse, need_caches=False,
            prepared=None):
        """One direction over x (T, B, D); zeros past each length.

        Returns y, h_T, c_T, cells (or None) and, with ``need_caches``, one `LSTMCache` per
        segment (else None), for `backward`.
        """
        if reverse:
            x = x[self.reverse_time, self.batch_cols]
        T, B, _ = x.shape
        H = weights[1].shape[0]
        y = np.zeros((T, B, H), x.dtype)
        cells = np.zeros((T, B, H), x.dtype) if need_cells else None
        caches = [] if need_caches else None
        h = np.zeros((B, H), x.dtype) if h0 is None else h0.copy()
        c = np.zeros((B, H), x.dtype) if c0 is None else c0.copy()
        for t0, t1, running in self.segments:
            if running is None:
                y[t0:t1], h, c, cells_seg, cache = _forward(
                    x[t0:t1], weights, h, c, backend, need_cells, need_caches, prepared=prepared
                )
                if need_cells:
                    cells[t0:t1] = cells_seg
            else:
                y_seg, h[running], c[running], cells_seg, cache = _forward(
                    x[t0:t1, running],
                    weights,
                    h[running],
                    c[running],
                    backend,
                    need_cells,
                    need_caches,
                    prepared=prepared,
                )
                y[t0:t1, running] = y_seg
                if need_cells:
                    cells[t0:t1, running] = cells_seg
            if need_caches:
                caches.append(cache)
        if reverse:
            y = y[self.reverse_time, self.batch_cols]
            if need_cells:
                cells = cells[self.reverse_time, self.batch_cols]
        return y, h, c, cells, caches

    def backward(self, dy, caches, dh_T, dc_T, weights, reverse, need_dx=True):
        """Gradients of one direction run by `run`: the segments in reverse order.

        dy (T, B, H) past each length is ignored (those outputs are constant zeros). A sequence
        outside a segment's running subset keeps its state gradient until the segment where it
        ran its last step. Returns dx (T, B, D), zero past each length (None without
        ``need_dx``), dh0, dc0 (B, H), dWx, dWh, db.
        """
        if reverse:
            dy = dy[self.reverse_time, self.batch_cols]
        T, B, _ = dy.shape
        dx = np.zeros((T, B, weights[0].shape[0]), dy.dtype) if need_dx else None
        dh, dc = dh_T.copy(), dc_T.copy()
        dWx, dWh, db = _zero_grads(weights)
        for (t0, t1, running), cache in zip(reversed(self.segments), reversed(caches)):
            if running is None:
                grads = _api.backward_grads(dy[t0:t1], cache, dh, dc, need_dx=need_dx)
                dh, dc = grads.dh0, grads.dc0
                if need_dx:
                    dx[t0:t1] = grads.dx
            else:
                grads = _api.backward_grads(
                    dy[t0:t1, running], cache, dh[running], dc[running], need_dx=need_dx
                )
                dh[running], dc[running] = grads.dh0, grads.dc0
                if need_dx:
                    dx[t0:t1, running] = grads.dx
            dWx += grads.dWx
            dWh += grads.dWh
            db += grads.db
        if reverse and need_dx:
            # reverse_time is its own inverse: it swaps steps t and length-1-t.
            dx = dx[self.reverse_time, self.batch_cols]
        return dx, dh, dc, dWx, dWh, db


class _PaddedPlan:
    """Inference with lengths: one padded `lstm_forward` call per direction, then masking.

    Rows of a batch never mix, so the steps computed past a sequence's end change nothing
    before it; outputs there are zeroed, and the kernels hand back each sequence's final states
    at its own last step (``lengths`` of `fastlstm._api.forward_padded`: the time loop copies
    each row's cell state at that row's last step, instead of keeping every step's).
    The segments of `_BatchPlan` skip the steps past the ends but cost one kernel call per
    distinct length: with the compiled backends that measured 3-5x the padded run (T=100, B=32,
    D=128, H=256, lengths uniform in [1, T]: 69 ms vs 18 ms), while this plan costs ~1x it.
    Training keeps the segments, whose backward takes each final-state gradient at its step.
    """

    def __init__(self, lengths, T):
        self.lengths = lengths
        self.past_end = np.arange(T)[:, np.newaxis] >= lengths
        self._reverse_rows = None

    def _reversed(self, sequence):
        """Each row of sequence (T, B, F) reversed within its own length; steps past it stay.

        The same permutation undoes it. One gather of rows through a flat index (made once per
        plan) over the (T·B, F) view.
        """
        T, B, F = sequence.shape
        if self._reverse_rows is None:
            steps = np.arange(T)[:, np.newaxis]
            reverse_time = np.where(steps < self.lengths, self.lengths - 1 - steps, steps)
            self._reverse_rows = (reverse_time * B + np.arange(B)).ravel()
        rows = np.ascontiguousarray(sequence).reshape(T * B, F)
        return rows.take(self._reverse_rows, axis=0).reshape(T, B, F)

    def run(self, x, weights, h0, c0, backend, need_cells, reverse, need_caches=False,
            prepared=None):
        if reverse:
            x = self._reversed(x)
        y, h, c, cells, _ = _forward(
            x, weights, h0, c0, backend, need_cells, lengths=self.lengths, prepared=prepared
        )
        y[self.past_end] = 0
        if need_cells:
            cells[self.past_end] = 0
        if reverse:
            y = self._reversed(y)
            cells = self._reversed(cells) if need_cells else None
        return y, h, c, cells, None


class _FullPlan:
    """Every sequence runs all T steps: one `lstm_forward` call per direction."""

    def run(self, x, weights, h0, c0, backend, need_cells, reverse, need_caches=False,
            prepared=None):
        if reverse:
            x = x[::-1]
        y, h_T, c_T, cells, cache = _forward(x, weights, h0, c0, backend, need_cells, need_caches,
                                             prepared=prepared)
        if reverse:
            y = y[::-1]
            cells = None if cells is None else cells[::-1]
        return y, h_T, c_T, cells, [cache] if need_caches else None

    def backward(self, dy, caches, dh_T, dc_T, weights, reverse, need_dx=True):
        if reverse:
            dy = dy[::-1]
        dx, dh0, dc0, dWx, dWh, db = _api.backward_grads(
            dy, caches[0], dh_T, dc_T, need_dx=need_dx
        )
        return dx[::-1] if reverse and need_dx else dx, dh0, dc0, dWx, dWh, db


def _from_weights(cls, weights, config):
    return cls.from_weights(weights, **config)


def _check_dropout(dropout):
    try:
        dropout = float(dropout)
    except (TypeError, ValueError):
        raise TypeError(f"dropout must be a float in [0, 1), got {dropout!r}") from None
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    return dropout


class TrainCache:
    """What `LSTM.backward` needs from `LSTM.forward_train`; opaque to users.

    It keeps references to the forward call's arrays (the input, the layer's weights): changing
    them before the backward call changes the gradients, so update the parameters after
    `LSTM.backward`. One cache may serve several backward calls.
    """

    __slots__ = ("_layer", "_plan", "_caches", "_masks", "_batch_shape")

    def __init__(self, layer, plan, caches, masks, batch_shape):
        self._layer = layer
        self._plan = plan
        self._caches = caches  # per layer and direction k: the plan's segment caches
        self._masks = masks  # per layer l < num_layers-1: scaled dropout mask of its output
        self._batch_shape = batch_shape  # (T, B)

    def __repr__(self):
        T, B = self._batch_shape
        return f"TrainCache(T={T}, B={B}, dropout={self._masks is not None})"


class LSTMState:
    """The running state of a batch of streams, for `LSTM.step`; made by `LSTM.initial_state`.

    It owns every buffer a step writes into, so steps allocate nothing. One state serves one
    thread at a time; give each concurrent stream (or batch of streams) its own state.

    Attributes
    ----------
    batch_size : int
        B, the number of streams stepped together.
    h, c : ndarray, shape (num_layers, B, H)
        Copies of the current hidden and cell states.
    """

    __slots__ = ("_layer", "_kernel", "_prepared", "_buffers", "_output", "batch_size")

    def __init__(self, layer, kernel, prepared, buffers, batch_size):
        self._layer = layer
        self._kernel = kernel
        self._prepared = prepared  # per layer: the step kernel's copy of the weights
        self._buffers = buffers
        # what `LSTM.step` returns: the last layer's h, which the next step reads as h_{t-1}
        self._output = _api.read_only_view(buffers[-1].h)
        self.batch_size = batch_size

    @property
    def h(self):
        """Copy of the hidden states, shape (num_layers, B, H)."""
        return np.stack([buffers.h for buffers in self._buffers])

    @property
    def c(self):
        """Copy of the cell states, shape (num_layers, B, H)."""
        return np.stack([buffers.c for buffers in self._buffers])

    def __repr__(self):
        return f"LSTMState(batch_size={self.batch_size}, layers={len(self._buffers)})"


class LSTM:
    """A stack of LSTM layers holding its weights; inputs and outputs shaped like torch.nn.LSTM.

    Parameters
    ----------
    input_size : int
        D, features per time step of the input.
    hidden_size : int
        H, hidden units per direction.
    num_layers : int
        Stacked layers; layer l > 0 reads layer l-1's output (num_directions·H features).
    bidirectional : bool
        Add a reverse direction to every layer; outputs concatenate [forward, reverse].
    reverse : bool
        Run only the reverse direction (each sequence read from its own end, outputs kept
        aligned with the inputs), as ONNX's ``direction="reverse"``. Not with bidirectional.
    batch_first : bool
        Inputs and outputs are (B, T, ·) instead of (T, B, ·). States are (·, B, H) either way.
    dtype : float32 or float64
        Of the weights; every input must have it.
    forget_bias : float
        Initial bias of the forget gate. The other weights and biases start uniform in
        ±1/√H, as torch initialises them.
    seed : int, numpy.random.Generator or None
        Seeds the initial weights, then the dropout masks of `forward_train`.
    backend : {None, "numpy", "numba", "cython"}
        Passed to `fastlstm.lstm_forward`; None picks the fastest per call.
    dropout : float in [0, 1)
        Probability of zeroing each output of every layer but the last in `forward_train` (the
        others are scaled by 1/(1 - dropout)), as ``torch.nn.LSTM``'s dropout; no effect with
        one layer. Inference (calling the layer, `step`) never drops.

    Notes
    -----
    Weights are kept per layer and direction, index ``k = layer·num_directions + direction``
    (direction 1 is reverse), as ``(Wx (D_l, 4H), Wh (H, 4H), b (4H,))`` with gate blocks
    i, f, o, g; D_0 = input_size, D_l = num_directions·H after. The arrays are read-only, which
    lets one layer object serve many threads at once, until `parameters` hands them out for
    training: from then on they are writeable, and whoever updates them must make sure no other
    thread runs the layer meanwhile.

    While the weights are read-only, the compiled backends pack them for their kernels once, at
    the first call that needs it, and the layer keeps that copy (about the size of the weights,
    per backend and kind of kernel: small batches, large batches) instead of packing at every
    call: float32, 2 threads, paired against `lstm_forward` on the same weights, S2 forward
    0.93x, T = 10 at S2's size 0.73-0.85x, S3 0.98x, S1 level. After `parameters`, every call
    packs.
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        *,
        bidirectional=False,
        reverse=False,
        batch_first=False,
        dtype=np.float32,
        forget_bias=1.0,
        seed=None,
        backend=None,
        dropout=0.0,
    ):
        input_size = check_positive_int("input_size", input_size)
        H = check_positive_int("hidden_size", hidden_size)
        num_layers = check_positive_int("num_layers", num_layers)
        dtype = _check_layer_dtype(dtype)
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(H)
        num_directions = 2 if bidirectional else 1
        weights = []
        for layer in range(num_layers):
            D = input_size if layer == 0 else num_directions * H
            for _ in range(num_directions):
                Wx = rng.uniform(-bound, bound, (D, 4 * H))
                Wh = rng.uniform(-bound, bound, (H, 4 * H))
                b = rng.uniform(-bound, bound, 4 * H)
                b[H : 2 * H] = forget_bias
                weights.append((Wx.astype(dtype), Wh.astype(dtype), b.astype(dtype)))
        self._configure(weights, bidirectional, reverse, batch_first, backend, dropout)
        # The dropout masks continue the weights' random stream: one seed reproduces both.
        self._rng = rng

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_weights(
        cls,
        weights,
        *,
        bidirectional=False,
        reverse=False,
        batch_first=False,
        backend=None,
        dropout=0.0,
    ):
        """Build a layer from weights already in fastlstm's layout.

        Parameters
        ----------
        weights : sequence of (Wx, Wh, b)
            One triple per layer and direction, index ``layer·num_directions + direction``:
            Wx (D_l, 4H), Wh (H, 4H), b (4H,), gates i, f, o, g, one float dtype for all.
            They are copied.
        bidirectional, reverse, batch_first, backend, dropout
            As for `LSTM`. Dropout masks come from an unseeded generator; pass ``rng`` to
            `forward_train` to reproduce them.

        Returns
        -------
        LSTM
        """
        layer = cls.__new__(cls)
        layer._configure(weights, bidirectional, reverse, batch_first, backend, dropout)
        layer._rng = np.random.default_rng()
        return layer

    def _configure(self, weights, bidirectional, reverse, batch_first, backend, dropout=0.0):
        if bidirectional and reverse:
            raise ValueError("reverse=True runs one direction; it cannot be bidirectional")
        num_directions = 2 if bidirectional else 1
        weights = list(weights)
        if not weights or len(weights) % num_directions:
            raise ValueError(
                f"weights must hold num_layers·num_directions triples (Wx, Wh, b) with "
                f"num_directions = {num_directions}, got {len(weights)}"
            )
        first_Wx, first_Wh = weights[0][0], weights[0][1]
        dtype = _check_layer_dtype(getattr(first_Wx, "dtype", None))
        H = first_Wh.shape[0] if getattr(first_Wh, "ndim", 0) == 2 else 0
        if H < 1:
            raise ValueError(f"weights[0] Wh must have shape (H, 4H) with H >= 1, got {first_Wh!r}")
        input_size = first_Wx.shape[0] if getattr(first_Wx, "ndim", 0) == 2 else 0
        checked = []
        for k, triple in enumerate(weights):
            if len(triple) != 3:
                raise ValueError(
                    f"weights[{k}] must be a triple (Wx, Wh, b), got {len(triple)} items"
                )
            D = input_size if k < num_directions else num_directions * H
            shapes = {
                "Wx": ((D, 4 * H), "(D_l, 4H)"),
                "Wh": ((H, 4 * H), "(H, 4H)"),
                "b": ((4 * H,), "(4H,)"),
            }
            arrays = []
            for (name, (shape, meaning)), array in zip(shapes.items(), triple):
                _check_float_array(f"weights[{k}] {name}", array, dtype, shape, meaning)
                array = np.array(array, order="C", copy=True)
                array.setflags(write=False)
                arrays.append(array)
            checked.append(tuple(arrays))
        self._weights = tuple(checked)
        # While the weights are read-only, the backends keep the packed weights their kernels
        # read here (made at the first call that needs them) instead of packing at every call.
        self._prepared_weights = tuple(_backends.PreparedWeights(*triple) for triple in checked)
        self._input_size = input_size
        self._hidden_size = H
        self._num_layers = len(checked) // num_directions
        self._bidirectional = bool(bidirectional)
        self._reverse = bool(reverse)
        self._batch_first = bool(batch_first)
        self._dtype = dtype
        self._backend = _check_backend_name(backend)
        self.dropout = dropout
        self._step_lock = threading.Lock()
        self._step_weights = None
        self._weights_exposed = False  # set once parameters() has made the weights writeable
        names = [member[: -len(".npy")] for member in _persist._weight_members(self._config())]
        self._parameter_names = tuple(zip(names[0::3], names[1::3], names[2::3]))

    # ------------------------------------------------------------------ properties

    input_size = property(lambda self: self._input_size, doc="D, features per input step.")
    hidden_size = property(lambda self: self._hidden_size, doc="H, hidden units per direction.")
    num_layers = property(lambda self: self._num_layers, doc="Number of stacked layers.")
    bidirectional = property(lambda self: self._bidirectional, doc="Whether layers run both ways.")
    reverse = property(lambda self: self._reverse, doc="Whether the only direction is reverse.")
    num_directions = property(lambda self: 2 if self._bidirectional else 1, doc="1 or 2.")
    batch_first = property(lambda self: self._batch_first, doc="Inputs/outputs are (B, T, ·).")
    dtype = property(lambda self: self._dtype, doc="numpy dtype of weights, inputs and outputs.")
    backend = property(lambda self: self._backend, doc="Backend name passed to lstm_forward.")

    @property
    def dropout(self):
        """Dropout probability between layers in `forward_train`; settable, in [0, 1)."""
        return self._dropout

    @dropout.setter
    def dropout(self, value):
        self._dropout = _check_dropout(value)

    @property
    def weights(self):
        """Read-only views of the weights: tuple of (Wx (D_l, 4H), Wh (H, 4H), b (4H,)), gates
        i, f, o, g.

        Index ``layer·num_directions + direction``, as for ``h_n``. They show the current
        values; `parameters` gives the same arrays, writeable, by name.
        """
        return tuple(tuple(_api.read_only_view(w) for w in triple) for triple in self._weights)

    def parameters(self):
        """The layer's own weight arrays by name, writeable, for optimizers to update in place.

        Names are ``l{layer}_{direction}_{Wx|Wh|b}`` with direction ``forward`` or ``reverse``
        (the member names of `save`'s file), in the order of `weights`. An update is seen by
        the next forward call at once. Streaming states (`initial_state`) copy the weights into
        the step kernel's layout when they are made, so a state keeps the weights of its start.

        Returns
        -------
        dict of str -> ndarray
            A new dict of the same arrays at every call.

        Notes
        -----
        After the first call the weights stay writeable, and every forward call packs them
        afresh (see the class notes). Updating them while other threads run this layer gives
        those threads a mix of old and new weights: keep such updates apart from concurrent
        inference (or serve inference from a copy, e.g. ``LSTM.from_weights(layer.weights)``).
        """
        with self._step_lock:
            self._weights_exposed = True
            self._step_weights = None
            self._prepared_weights = None
        params = {}
        for names, triple in zip(self._parameter_names, self._weights):
            for name, array in zip(names, triple):
                array.setflags(write=True)
                params[name] = array
        return params

    def __reduce__(self):
        # Pickling (e.g. to send a layer to a worker process) rebuilds from weights and config;
        # the step lock and prepared step weights are per process.
        config = dict(
            bidirectional=self._bidirectional,
            reverse=self._reverse,
            batch_first=self._batch_first,
            backend=self._backend,
            dropout=self._dropout,
        )
        return (_from_weights, (type(self), self._weights, config))

    def __repr__(self):
        return (
            f"LSTM(input_size={self._input_size}, hidden_size={self._hidden_size}, "
            f"num_layers={self._num_layers}, bidirectional={self._bidirectional}, "
            f"reverse={self._reverse}, "
            f"batch_first={self._batch_first}, dtype={self._dtype.name}, backend={self._backend!r}"
            + (f", dropout={self._dropout}" if self._dropout else "")
            + ")"
        )

    # ------------------------------------------------------------------ forward

    def _check_input(self, x):
        meaning = "(B, T, input_size)" if self._batch_first else "(T, B, input_size)"
        _check_float_array("x", x, self._dtype, (None, None, self._input_size), meaning)
        return x.swapaxes(0, 1) if self._batch_first else x

    def _check_state(self, state, B):
        if state is None:
            return None, None
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"state must be a tuple (h0, c0) or None, got {type(state).__name__}")
        shape = (self._num_layers * self.num_directions, B, self._hidden_size)
        meaning = "(num_layers·num_directions, B, hidden_size)"
        for name, array in zip(("state[0] (h0)", "state[1] (c0)"), state):
            if array is not None:
                _check_float_array(name, array, self._dtype, shape, meaning)
        return state

    def __call__(self, x, state=None, lengths=None, *, return_cells=False):
        """Run every layer and direction over a batch of sequences.

        Parameters
        ----------
        x : ndarray, shape (T, B, input_size), or (B, T, input_size) with batch_first
            The layer's dtype.
        state : tuple (h0, c0) or None
            Initial states, each (num_layers·num_directions, B, H) or None for zeros; index
            ``layer·num_directions + direction``.
        lengths : array of ints, shape (B,), optional
            Valid steps of each sequence, in [0, T]. Outputs past a sequence's length are zero,
            its final states are those at its own last step, and its reverse direction starts
            there. None means every sequence has T steps.
        return_cells : bool
            Also return the last layer's cell state c_t at every step.

        Returns
        -------
        y : ndarray, shape (T, B, num_directions·H), or (B, T, num_directions·H) with batch_first
            The last layer's h_t, directions concatenated [forward, reverse].
        (h_n, c_n) : ndarrays, shape (num_layers·num_directions, B, H)
            Final states of every layer and direction.
        cells : ndarray, shaped like y
            Only with ``return_cells=True``: the last layer's c_t, zero past each length.

        Notes
        -----
        With ``return_cells=True`` on a backend that cannot expose its cell states, that call
        runs on the NumPy reference.
        """
        x = self._check_input(x)
        h0, c0 = self._check_state(state, x.shape[1])
        plan = self._plan(lengths, x.shape, _PaddedPlan)
        y, h_n, c_n, cells, _ = self._run(x, h0, c0, plan, return_cells=return_cells)
        if return_cells:
            return self._finish(y), (h_n, c_n), self._finish(cells)
        return self._finish(y), (h_n, c_n)

    def _plan(self, lengths, shape, plan_for_lengths=_BatchPlan):
        T, B, _ = shape
        if lengths is not None:
            lengths = _check_lengths(lengths, T, B)
            if np.any(lengths != T):
                return plan_for_lengths(lengths, T)
        return _FullPlan()

    def _run(self, x, h0, c0, plan, *, return_cells=False, training=False, rng=None):
        """Every layer and direction over time-major x, by ``plan``.

        Returns y (T, B, dirs·H), h_n, c_n, the last layer's cells (or None) and, when
        ``training``, a `TrainCache` (dropout masks drawn from ``rng``), else None.
        """
        T, B, _ = x.shape
        H, dirs = self._hidden_size, self.num_directions
        h_n = np.empty((self._num_layers * dirs, B, H), self._dtype)
        c_n = np.empty_like(h_n)
        caches, masks = [], []
        prepared = self._prepared_weights
        layer_input = x
        for layer in range(self._num_layers):
            if layer and training and self._dropout:
                masks.append(self._dropout_mask(rng, layer_input.shape))
                layer_input = layer_input * masks[-1]
            need_cells = return_cells and layer == self._num_layers - 1
            outputs, cells = [], []
            for direction in range(dirs):
                k = layer * dirs + direction
                y_k, h_n[k], c_n[k], cells_k, caches_k = plan.run(
                    layer_input,
                    self._weights[k],
                    None if h0 is None else h0[k],
                    None if c0 is None else c0[k],
                    self._backend,
                    need_cells,
                    reverse=direction == 1 or self._reverse,
                    need_caches=training,
                    prepared=None if prepared is None else prepared[k],
                )
                outputs.append(y_k)
                cells.append(cells_k)
                caches.append(caches_k)
            layer_input = outputs[0] if dirs == 1 else np.concatenate(outputs, axis=2)
        if return_cells:
            cells = cells[0] if dirs == 1 else np.concatenate(cells, axis=2)
        else:
            cells = None
        train_cache = None
        if training:
            train_cache = TrainCache(self, plan, caches, masks or None, (T, B))
        return layer_input, h_n, c_n, cells, train_cache

    def _dropout_mask(self, rng, shape):
        """Inverted dropout: 0 with probability p, else 1/(1-p), so the expected value is 1."""
        keep = rng.random(shape) >= self._dropout
        return keep.astype(self._dtype) / self._dtype.type(1.0 - self._dropout)

    # ------------------------------------------------------------------ training

    def forward_train(self, x, state=None, lengths=None, *, rng=None):
        """Forward pass that also returns the cache `backward` needs; applies dropout.

        Parameters
        ----------
        x, state, lengths
            As for calling the layer.
        rng : numpy.random.Generator, int or None
            Draws the dropout masks (if ``dropout > 0``); an int seeds a new generator; None
            uses the layer's own generator (seeded by the constructor's ``seed``).

        Returns
        -------
        y : ndarray, read-only
            As for calling the layer (with dropout between layers, the same otherwise). The
            cache may hold it as the last layer's h_{t-1}, so it cannot be changed in place
            (``y.copy()`` gives an array to change).
        (h_n, c_n) : ndarrays, shape (num_layers·num_directions, B, H)
        cache : TrainCache
            For `backward`.
        """
        x = self._check_input(x)
        h0, c0 = self._check_state(state, x.shape[1])
        plan = self._plan(lengths, x.shape)
        if self._dropout and self._num_layers > 1:
            rng = self._rng if rng is None else np.random.default_rng(rng)
        y, h_n, c_n, _, cache = self._run(x, h0, c0, plan, training=True, rng=rng)
        return _api.read_only_view(self._finish(y)), (h_n, c_n), cache

    def backward(self, dy, cache, dh_n=None, dc_n=None, *, need_dx=True):
        """Backpropagation through time through every layer and direction of `forward_train`.

        Parameters
        ----------
        dy : ndarray, shaped like forward_train's y
            Gradient of the loss with respect to y, the layer's dtype. Entries past a
            sequence's length are ignored (those outputs are constant zeros).
        cache : TrainCache
            From this layer's `forward_train`.
        dh_n, dc_n : ndarray, shape (num_layers·num_directions, B, H), optional
            Gradients with respect to the final states; None means zeros.
        need_dx : bool
            Whether to compute the gradient with respect to x. False (x is data, nothing
            upstream trains) skips the first layer's input-gradient product (T·B·4H·D
            multiply-adds, ~5% of a 2-layer training step at T=50, B=32, D=128, H=256), as
            torch skips it for inputs that do not require grad; ``dx`` is then None.

        Returns
        -------
        Gradients
            A dict ``name -> gradient`` with the keys of `parameters`, and attributes ``dx``
            (None without ``need_dx``), ``dh0``, ``dc0``.
        """
        T, B = self._check_train_cache(cache)
        H, dirs = self._hidden_size, self.num_directions
        meaning = "(B, T, num_directions·H)" if self._batch_first else "(T, B, num_directions·H)"
        shape = (B, T, dirs * H) if self._batch_first else (T, B, dirs * H)
        _check_float_array("dy", dy, self._dtype, shape, meaning)
        state_shape = (self._num_layers * dirs, B, H)
        for name, array in (("dh_n", dh_n), ("dc_n", dc_n)):
            if array is not None:
                _check_float_array(
                    name, array, self._dtype, state_shape, "(num_layers·num_directions, B, H)"
                )
        zeros = np.zeros((B, H), self._dtype)
        dh0 = np.empty(state_shape, self._dtype)
        dc0 = np.empty(state_shape, self._dtype)
        d_weights = [None] * len(self._weights)
        d_output = dy.swapaxes(0, 1) if self._batch_first else dy
        for layer in reversed(range(self._num_layers)):
            d_input = None
            for direction in range(dirs):
                k = layer * dirs + direction
                dx_k, dh0[k], dc0[k], *d_weights_k = cache._plan.backward(
                    d_output[:, :, direction * H : (direction + 1) * H],
                    cache._caches[k],
                    zeros if dh_n is None else dh_n[k],
                    zeros if dc_n is None else dc_n[k],
                    self._weights[k],
                    reverse=direction == 1 or self._reverse,
                    need_dx=bool(layer or need_dx),
                )
                d_weights[k] = d_weights_k
                if dx_k is not None:
                    d_input = dx_k if d_input is None else d_input + dx_k
            if layer and cache._masks is not None:
                d_input = d_input * cache._masks[layer - 1]
            d_output = d_input
        return Gradients(
            (
                (name, d_weight)
                for names, triple in zip(self._parameter_names, d_weights)
                for name, d_weight in zip(names, triple)
            ),
            dx=None if d_output is None else self._finish(d_output),
            dh0=dh0,
            dc0=dc0,
        )

    def _check_train_cache(self, cache):
        if not isinstance(cache, TrainCache):
            raise TypeError(
                "cache must be the TrainCache returned by this layer's forward_train(), got "
                f"{type(cache).__name__} (calling the layer runs inference and keeps no cache)"
            )
        if cache._layer is not self:
            raise ValueError("cache was made by another layer's forward_train(), not this one's")
        return cache._batch_shape

    def _finish(self, sequence):
        """Back to the caller's layout, C-contiguous (copied only where the layout changes)."""
        if self._batch_first:
            sequence = sequence.swapaxes(0, 1)
        return np.ascontiguousarray(sequence)

    # ------------------------------------------------------------------ streaming

    def _prepared_step_weights(self):
        """Per-layer (kernel, prepared weights) for new streaming states.

        While the weights are read-only they cannot change, so they are prepared once (under a
        lock) and shared. Once `parameters` has handed them out for in-place updates, every
        call prepares them afresh (one pass over the weights, per `initial_state`).
        """
        prepared = self._step_weights
        if prepared is None:
            with self._step_lock:
                if self._weights_exposed:
                    return self._prepare_step_weights()
                if self._step_weights is None:
                    self._step_weights = self._prepare_step_weights()
                prepared = self._step_weights
        return prepared

    def _prepare_step_weights(self):
        kernel = _step.get_step_kernel(self._backend)
        return kernel, tuple(kernel.prepare(*weights) for weights in self._weights)

    def initial_state(self, batch_size, h0=None, c0=None):
        """A fresh streaming state for `step`, owning every buffer the steps write into.

        Parameters
        ----------
        batch_size : int
            B, streams stepped together (>= 1).
        h0, c0 : ndarray, shape (num_layers, B, H), optional
            Initial states (copied); None means zeros.

        Returns
        -------
        LSTMState
            It steps with the weights as they are now: updates made later through
            `parameters` reach the states made after them.
        """
        if self._bidirectional or self._reverse:
            raise ValueError(
                "step() streams forward in time; a layer with a reverse direction needs the "
                "whole sequence (call the layer on it instead)"
            )
        B = check_positive_int("batch_size", batch_size)
        shape = (self._num_layers, B, self._hidden_size)
        states = []
        for name, array in (("h0", h0), ("c0", c0)):
            if array is None:
                array = np.zeros(shape, self._dtype)
            states.append(
                _check_float_array(
                    name, array, self._dtype, shape, "(num_layers, batch_size, hidden_size)"
                )
            )
        kernel, prepared = self._prepared_step_weights()
        buffers = tuple(
            kernel.new_buffers(prepared[layer], states[0][layer], states[1][layer])
            for layer in range(self._num_layers)
        )
        return LSTMState(self, kernel, prepared, buffers, B)

    def step(self, x_t, state):
        """Advance a batch of streams by one time step; allocates nothing.

        Parameters
        ----------
        x_t : ndarray, shape (B, input_size)
            This step's input, the layer's dtype.
        state : LSTMState
            From `initial_state` of this layer; updated in place.

        Returns
        -------
        y_t : ndarray, shape (B, H), read-only
            The last layer's h_t: a view into ``state``'s buffers, which the next step reads
            as h_{t-1} and then overwrites. Copy it to keep or change it.
        state : LSTMState
            The same object, now at time t.
        """
        if not isinstance(state, LSTMState) or state._layer is not self:
            raise TypeError("state must be an LSTMState made by this layer's initial_state()")
        if (
            not isinstance(x_t, np.ndarray)
            or x_t.dtype != self._dtype
            or x_t.shape
            != (
                state.batch_size,
                self._input_size,
            )
        ):
            _check_float_array(
                "x_t",
                x_t,
                self._dtype,
                (state.batch_size, self._input_size),
                "(batch_size, input_size)",
            )
        step = state._kernel.step
        layer_input = x_t
        for weights, buffers in zip(state._prepared, state._buffers):
            step(weights, buffers, layer_input)
            layer_input = buffers.h
        return state._output, state

    # ------------------------------------------------------------------ persistence

    def _config(self):
        return {
            "input_size": self._input_size,
            "hidden_size": self._hidden_size,
            "num_layers": self._num_layers,
            "bidirectional": self._bidirectional,
            "reverse": self._reverse,
            "batch_first": self._batch_first,
            "dtype": self._dtype.name,
        }

    def save(self, path):
        """Write the layer to ``path`` as a fastlstm layer file (``.npz``, format version 1).

        The file is a ZIP of uncompressed ``.npy`` members: ``config.npy``, a uint8 array of
        UTF-8 JSON ``{"format": "fastlstm.LSTM", "format_version": 1, "input_size",
        "hidden_size", "num_layers", "bidirectional", "reverse", "batch_first", "dtype",
        "gate_order": "ifog"}``, and per layer l and direction d (``forward``, ``reverse``)
        ``l{l}_{d}_Wx.npy`` (D_l, 4H), ``l{l}_{d}_Wh.npy`` (H, 4H), ``l{l}_{d}_b.npy`` (4H,).
        The backend is not stored. ``numpy.load(path)`` reads it too.

        Parameters
        ----------
        path : str, os.PathLike or writable binary file
            Used exactly as given (no ``.npz`` is appended).
        """
        _persist.save(path, self._config(), self._weights)

    @classmethod
    def load(cls, path, *, backend=None):
        """Read a layer written by `save`; never unpickles, validates every array.

        Parameters
        ----------
        path : str, os.PathLike or readable binary file
        backend : {None, "numpy", "numba", "cython"}
            Not stored in the file: a runtime choice.

        Returns
        -------
        LSTM

        Raises
        ------
        ValueError
            If the file is not a valid fastlstm layer file (truncated, corrupted, other format,
            arrays whose shape or dtype disagree with the stored config).
        """
        config, weights = _persist.load(path)
        return cls.from_weights(
            weights,
            bidirectional=config["bidirectional"],
            reverse=config["reverse"],
            batch_first=config["batch_first"],
            backend=backend,
        )

    # ------------------------------------------------------------------ interop

    @classmethod
    def from_torch(cls, module_or_state_dict, *, batch_first=None, dtype=None, backend=None):
        """Convert a ``torch.nn.LSTM`` (or its ``state_dict()``) into a layer.

        Parameters
        ----------
        module_or_state_dict : torch.nn.LSTM or mapping of name -> tensor/ndarray
            Any num_layers, bidirectional or not, with or without biases; ``proj_size > 0`` is
            rejected. Weights ``weight_ih_l{k}`` (4H, D_k), ``weight_hh_l{k}`` (4H, H),
            ``bias_ih_l{k}``, ``bias_hh_l{k}`` (4H,), suffix ``_reverse``, gates i, f, g, o.
        batch_first : bool or None
            None takes the module's setting (False for a state_dict).
        dtype : float32, float64 or None
            None keeps the source's dtype (which must be float32 or float64).
        backend
            As for `LSTM`.

        Returns
        -------
        LSTM
            ``layer(x, (h0, c0))`` matches ``module(x, (h0, c0))`` with the same shapes.
        """
        weights, config = _interop.from_torch(module_or_state_dict, dtype)
        if batch_first is not None:
            config["batch_first"] = batch_first
        return cls.from_weights(weights, backend=backend, **config)

    @classmethod
    def from_onnx(cls, path_or_model, *, dtype=None, backend=None):
        """Convert the LSTM node(s) of an ONNX model into a layer (needs the ``onnx`` package).

        Parameters
        ----------
        path_or_model : str, os.PathLike or onnx.ModelProto
            One LSTM node becomes one layer; several become stacked layers in graph order
            (each must read the previous one's output, e.g. through Transpose + Reshape).
            W (dirs, 4H, D), R (dirs, 4H, H), B (dirs, 8H) must be stored in the model; gates
            i, o, f, c. Direction forward, reverse (a layer with ``reverse=True``) or
            bidirectional, the same for every node. Peepholes, clip, input_forget and
            non-default activations are rejected.
        dtype : float32, float64 or None
            None keeps the model's dtype.
        backend
            As for `LSTM`.

        Returns
        -------
        LSTM
            ``batch_first`` follows the node's ``layout`` attribute. ONNX's ``sequence_lens``,
            ``initial_h`` and ``initial_c`` are the layer's ``lengths`` and ``state`` (same
            (dirs, B, H) layout for one layer). Y (T, dirs, B, H) of ONNX is y (T, B, dirs·H).
        """
        weights, config = _interop.from_onnx(path_or_model, dtype)
        return cls.from_weights(weights, backend=backend, **config)

    @classmethod
    def from_keras(cls, layer_or_weights, *, batch_first=True, dtype=None, backend=None):
        """Convert a Keras LSTM (or ``Bidirectional(LSTM)``, or its weights) into a layer.

        Parameters
        ----------
        layer_or_weights : keras.layers.LSTM, keras.layers.Bidirectional or sequence
            A layer with tanh activation and sigmoid recurrent activation (``go_backwards``
            only inside Bidirectional with ``merge_mode="concat"``); or its weights
            ``[kernel (D, 4H), recurrent_kernel (H, 4H), bias (4H,)]`` (bias optional),
            gates i, f, c, o.
        batch_first : bool
            Keras sequences are (B, T, D), so True by default.
        dtype : float32, float64 or None
            None keeps the source's dtype.
        backend
            As for `LSTM`.

        Returns
        -------
        LSTM
        """
        weights, config = _interop.from_keras(layer_or_weights, dtype)
        return cls.from_weights(weights, batch_first=batch_first, backend=backend, **config)
