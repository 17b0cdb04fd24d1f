"""fastlstm: compiled CPU kernels for LSTM networks, with a NumPy-facing API.

Public functions: `lstm_forward`, `lstm_backward`, `available_backends`,
`set_num_threads`, `get_num_threads`; the layer object `LSTM`; training helpers (optimizers,
truncated BPTT) in `fastlstm.train`.
See README.md and DESIGN.md for the contract.
"""

from ._api import LSTMCache, LSTMGrads, lstm_backward, lstm_forward
from ._backends import available_backends
from ._layer import LSTM
from ._threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "LSTMCache",
    "LSTMGrads",
    "available_backends",
    "get_num_threads",
    "lstm_backward",
    "lstm_forward",
    "set_num_threads",
    "__version__",
]
