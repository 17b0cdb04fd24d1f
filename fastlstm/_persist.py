"""The fastlstm layer file: an ``.npz`` that loads without unpickling and is fully validated.

Format version 1
----------------
A ZIP archive whose members are all *stored* (uncompressed), as ``numpy.savez`` writes:

``config.npy``
    1-D uint8 array: UTF-8 JSON object ``{"format": "fastlstm.LSTM", "format_version": 1,
    "input_size": D, "hidden_size": H, "num_layers": L, "bidirectional": bool,
    "reverse": bool, "batch_first": bool, "dtype": "float32" | "float64",
    "gate_order": "ifog"}``.
``l{layer}_{direction}_{name}.npy``
    For layer = 0 … L-1, direction ``forward`` (or ``reverse`` for the second direction of a
    bidirectional layer, and for the only direction of a ``reverse`` layer) and name ``Wx``
    (D_l, 4H), ``Wh`` (H, 4H), ``b`` (4H,), gate blocks i, f, o, g, dtype from the config.
    D_0 = input_size, D_l = num_directions·H for l > 0.

Loading reads the config, derives the exact member list, shapes and dtypes from it, checks
every ``.npy`` header against them *before* reading any data, requires stored members (so no
member can expand beyond the file's size: no zip bombs), reads each member through ``zipfile``
(which checks its CRC) and parses it with ``numpy.frombuffer``: never ``pickle``. Any
inconsistency raises ``ValueError`` naming the file and what is wrong.
"""

import io
import json
import math
import os
import zipfile

import numpy as np

FORMAT_NAME = "fastlstm.LSTM"
FORMAT_VERSION = 1
_CONFIG_MEMBER = "config.npy"
_MAX_CONFIG_BYTES = 1 << 16
_CONFIG_TYPES = {
    "format": str,
    "format_version": int,
    "input_size": int,
    "hidden_size": int,
    "num_layers": int,
    "bidirectional": bool,
    "reverse": bool,
    "batch_first": bool,
    "dtype": str,
    "gate_order": str,
}


class _FormatError(ValueError):
    """What is wrong with a file; `load` prefixes the file's name."""


def _weight_members(config):
    """Member name -> (shape, dtype) of every weight array the config implies, in order."""
    H, dtype = config["hidden_size"], np.dtype(config["dtype"])
    if config["bidirectional"]:
        directions = ("forward", "reverse")
    else:
        directions = ("reverse",) if config["reverse"] else ("forward",)
    members = {}
    for layer in range(config["num_layers"]):
        D = config["input_size"] if layer == 0 else len(directions) * H
        for direction in directions:
            prefix = f"l{layer}_{direction}_"
            members[prefix + "Wx.npy"] = ((D, 4 * H), dtype)
            members[prefix + "Wh.npy"] = ((H, 4 * H), dtype)
            members[prefix + "b.npy"] = ((4 * H,), dtype)
    return members


def save(file, config, weights):
    """Write ``config`` (dict of the layer's settings) and ``weights`` (triples) as format 1."""
    header = dict(config, format=FORMAT_NAME, format_version=FORMAT_VERSION, gate_order="ifog")
    config_bytes = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    names = list(_weight_members(header))
    arrays = [array for triple in weights for array in triple]
    members = {_CONFIG_MEMBER[:-4]: config_bytes}
    members.update({name[:-4]: array for name, array in zip(names, arrays)})
    if isinstance(file, (str, os.PathLike)):
        with open(file, "wb") as handle:
            np.savez(handle, **members)
    else:
        np.savez(file, **members)


def _read_header(archive, name):
    """Shape, Fortran order, dtype and header length of one ``.npy`` member, without its data."""
    with archive.open(name) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise _FormatError(f"{name}: unsupported .npy version {version}")
        return shape, fortran_order, dtype, member.tell()


def _read_array(archive, name, shape, dtype):
    """Read member ``name``, requiring exactly ``shape`` and ``dtype`` (either byte order)."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise _FormatError(f"{name} is compressed; fastlstm files store members uncompressed")
    got_shape, fortran_order, got_dtype, header_length = _read_header(archive, name)
    if got_dtype.hasobject or got_dtype.newbyteorder("=") != dtype.newbyteorder("="):
        raise _FormatError(f"{name} must have dtype {dtype}, got {got_dtype}")
    if got_shape != shape:
        raise _FormatError(f"{name} must have shape {shape}, got {got_shape}")
    data_bytes = math.prod(shape) * dtype.itemsize
    if info.file_size != header_length + data_bytes:
        raise _FormatError(
            f"{name} holds {info.file_size - header_length} data bytes, expected {data_bytes} "
            "(truncated or padded)"
        )
    raw = archive.read(name)  # zipfile verifies the CRC of the whole member
    flat = np.frombuffer(
        raw, dtype=got_dtype, offset=header_length, count=data_bytes // dtype.itemsize
    )
    array = flat.reshape(shape, order="F" if fortran_order else "C")
    return np.ascontiguousarray(array, dtype=dtype.newbyteorder("="))


def _parse_config(raw):
    try:
        config = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _FormatError(f"config is not UTF-8 JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _FormatError(f"config must be a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT_NAME:
        raise _FormatError(f"config format is {config.get('format')!r}, expected {FORMAT_NAME!r}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise _FormatError(
            f"format_version {version!r} is not supported; this fastlstm reads version "
            f"{FORMAT_VERSION} (a newer fastlstm may have written the file)"
        )
    for key, kind in _CONFIG_TYPES.items():
        value = config.get(key)
        if type(value) is not kind:
            raise _FormatError(f"config[{key!r}] must be a JSON {kind.__name__}, got {value!r}")
    extra = sorted(set(config) - set(_CONFIG_TYPES))
    if extra:
        raise _FormatError(f"config has unknown keys {extra}")
    for key in ("input_size", "hidden_size", "num_layers"):
        if config[key] < 1:
            raise _FormatError(f"config[{key!r}] must be >= 1, got {config[key]}")
    if config["dtype"] not in ("float32", "float64"):
        raise _FormatError(
            f"config['dtype'] must be 'float32' or 'float64', got {config['dtype']!r}"
        )
    if config["gate_order"] != "ifog":
        raise _FormatError(f"config['gate_order'] must be 'ifog', got {config['gate_order']!r}")
    if config["bidirectional"] and config["reverse"]:
        raise _FormatError("config cannot be both bidirectional and reverse")
    return config


def _load_archive(archive):
    names = set(archive.namelist())
    if _CONFIG_MEMBER not in names:
        raise _FormatError(f"no {_CONFIG_MEMBER} member (not a fastlstm layer file)")
    config_size = archive.getinfo(_CONFIG_MEMBER).file_size
    if config_size > _MAX_CONFIG_BYTES:
        raise _FormatError(f"{_CONFIG_MEMBER} is {config_size} bytes, at most {_MAX_CONFIG_BYTES}")
    header_shape = _read_header(archive, _CONFIG_MEMBER)[0]
    if len(header_shape) != 1:
        raise _FormatError(f"{_CONFIG_MEMBER} must be 1-D, got shape {header_shape}")
    raw = _read_array(archive, _CONFIG_MEMBER, header_shape, np.dtype(np.uint8))
    config = _parse_config(raw)
    members = _weight_members(config)
    expected = set(members) | {_CONFIG_MEMBER}
    if names != expected:
        raise _FormatError(
            f"members {sorted(names)} do not match the config: missing "
            f"{sorted(expected - names)}, unexpected {sorted(names - expected)}"
        )
    arrays = [_read_array(archive, name, *spec) for name, spec in members.items()]
    weights = [tuple(arrays[k : k + 3]) for k in range(0, len(arrays), 3)]
    return config, weights


def load(file):
    """Read and validate a format-1 file; return (config dict, list of (Wx, Wh, b))."""
    label = os.fspath(file) if isinstance(file, (str, os.PathLike)) else "<file object>"
    try:
        with zipfile.ZipFile(file) as archive:
            return _load_archive(archive)
    except _FormatError as exc:
        raise ValueError(f"cannot load a fastlstm LSTM from {label!r}: {exc}") from None
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        EOFError,
        ValueError,
        KeyError,
        NotImplementedError,
        io.UnsupportedOperation,
        MemoryError,
    ) as exc:
        raise ValueError(
            f"cannot load a fastlstm LSTM from {label!r}: not a valid layer file "
            f"({type(exc).__name__}: {exc})"
        ) from None
