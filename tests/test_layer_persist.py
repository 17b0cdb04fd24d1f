"""`LSTM.save` / `LSTM.load`: round trips, and truncated, corrupted or hostile files."""

import io
import json
import zipfile

import numpy as np
import pytest

from fastlstm import LSTM


def weights_equal(a, b):
    return len(a.weights) == len(b.weights) and all(
        np.array_equal(x, y) and x.dtype == y.dtype
        for triple_a, triple_b in zip(a.weights, b.weights)
        for x, y in zip(triple_a, triple_b)
    )


@pytest.mark.parametrize(
    "config",
    [
        dict(num_layers=1),
        dict(num_layers=3, bidirectional=True, batch_first=True),
        dict(num_layers=2, reverse=True, dtype=np.float64),
    ],
    ids=str,
)
def test_round_trip(tmp_path, config):
    layer = LSTM(5, 6, seed=0, **config)
    path = tmp_path / "model.lstm"  # used as given: no .npz appended
    layer.save(path)
    assert path.exists()
    loaded = LSTM.load(path)
    assert repr(loaded) == repr(layer)
    assert weights_equal(loaded, layer)
    x = np.random.default_rng(0).standard_normal((4, 2, 5)).astype(layer.dtype)
    if layer.batch_first:
        x = np.ascontiguousarray(x.swapaxes(0, 1))
    np.testing.assert_array_equal(loaded(x)[0], layer(x)[0])


def test_round_trip_through_file_objects():
    layer = LSTM(3, 4, 2, seed=0)
    buffer = io.BytesIO()
    layer.save(buffer)
    buffer.seek(0)
    assert weights_equal(LSTM.load(buffer), layer)


def test_documented_layout(tmp_path):
    path = tmp_path / "model.npz"
    LSTM(3, 4, 2, bidirectional=True, seed=0).save(path)
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted(
            ["config"]
            + [
                f"l{l}_{d}_{n}"
                for l in range(2)
                for d in ("forward", "reverse")
                for n in ("Wx", "Wh", "b")
            ]
        )
        config = json.loads(archive["config"].tobytes())
        assert archive["l1_reverse_Wx"].shape == (8, 16)
    assert config == {
        "format": "fastlstm.LSTM",
        "format_version": 1,
        "input_size": 3,
        "hidden_size": 4,
        "num_layers": 2,
        "bidirectional": True,
        "reverse": False,
        "batch_first": False,
        "dtype": "float32",
        "gate_order": "ifog",
    }


# ------------------------------------------------------------------------- hostile files


def saved_bytes(layer=None):
    buffer = io.BytesIO()
    (layer or LSTM(3, 4, 2, seed=0)).save(buffer)
    return buffer.getvalue()


def members_of(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def npy_bytes(array, allow_pickle=False):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def rezip(members, compression=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def with_config(**changes):
    members = members_of(saved_bytes())
    config = json.loads(np.lib.format.read_array(io.BytesIO(members["config.npy"])).tobytes())
    config.update(changes)
    members["config.npy"] = npy_bytes(np.frombuffer(json.dumps(config).encode(), np.uint8))
    return rezip(members)


def load_bytes(data):
    return LSTM.load(io.BytesIO(data))


def test_every_truncation_is_a_clear_error():
    data = saved_bytes()
    for cut in range(0, len(data), max(1, len(data) // 300)):
        with pytest.raises(ValueError, match="cannot load a fastlstm LSTM"):
            load_bytes(data[:cut])


def test_byte_flips_give_an_error_or_the_same_weights():
    original = LSTM(3, 4, 2, seed=0)
    data = saved_bytes(original)
    for position in range(0, len(data), 3):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x5A
        try:
            loaded = load_bytes(bytes(corrupted))
        except ValueError as exc:
            assert "cannot load a fastlstm LSTM" in str(exc)
        else:  # a byte the reader ignores (a timestamp, a header's padding)
            assert weights_equal(loaded, original)


class Boom:
    """Unpickling this would run code: records it instead."""

    ran = False

    def __reduce__(self):
        return (Boom._trigger, ())

    @staticmethod
    def _trigger():
        Boom.ran = True
        return 0


def test_pickled_member_is_refused_without_unpickling():
    members = members_of(saved_bytes())
    members["l0_forward_b.npy"] = npy_bytes(
        np.array([Boom()] * 16, dtype=object), allow_pickle=True
    )
    with pytest.raises(ValueError, match=r"l0_forward_b.npy must have dtype float32, got object"):
        load_bytes(rezip(members))
    members["config.npy"] = npy_bytes(np.array([Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"config.npy must have dtype uint8, got object"):
        load_bytes(rezip(members))
    assert not Boom.ran


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda m: m.update({"l0_forward_Wx.npy": npy_bytes(np.zeros((4, 16), np.float32))}),
            r"l0_forward_Wx.npy must have shape \(3, 16\), got \(4, 16\)",
        ),
        (
            lambda m: m.update({"l0_forward_Wh.npy": npy_bytes(np.zeros((4, 16)))}),
            r"l0_forward_Wh.npy must have dtype float32, got float64",
        ),
        (lambda m: m.update({"extra.npy": npy_bytes(np.zeros(1))}), r"unexpected \['extra.npy'\]"),
        (lambda m: m.pop("l1_forward_b.npy"), r"missing \['l1_forward_b.npy'\]"),
        (lambda m: m.pop("config.npy"), "no config.npy member"),
        (
            lambda m: m.update({"config.npy": npy_bytes(np.frombuffer(b"[1, 2", np.uint8))}),
            "config is not UTF-8 JSON",
        ),
        (
            lambda m: m.update({"config.npy": npy_bytes(np.frombuffer(b"[" * 60000, np.uint8))}),
            "config is not UTF-8 JSON",
        ),
        (lambda m: m.update({"config.npy": npy_bytes(np.zeros((2, 2), np.uint8))}), "must be 1-D"),
    ],
    ids=["shape", "dtype", "extra", "missing", "no-config", "bad-json", "deep-json", "config-2d"],
)
def test_inconsistent_members(mutate, message):
    members = members_of(saved_bytes())
    mutate(members)
    with pytest.raises(ValueError, match=message):
        load_bytes(rezip(members))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(format_version=2), "format_version 2 is not supported"),
        (dict(format="something"), "format is 'something'"),
        (dict(hidden_size=0), r"config\['hidden_size'\] must be >= 1"),
        (dict(hidden_size=True), r"config\['hidden_size'\] must be a JSON int"),
        (dict(hidden_size=10**12), r"must have shape \(3, 4000000000000\)"),
        (dict(num_layers="2"), r"config\['num_layers'\] must be a JSON int"),
        (dict(dtype="object"), r"config\['dtype'\] must be 'float32' or 'float64'"),
        (dict(gate_order="ifgo"), r"gate_order'\] must be 'ifog'"),
        (dict(bidirectional=True, reverse=True), "both bidirectional and reverse"),
        (dict(code="__import__('os')"), r"unknown keys \['code'\]"),
    ],
    ids=str,
)
def test_hostile_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        load_bytes(with_config(**changes))


def test_compressed_members_are_refused():
    with pytest.raises(ValueError, match="compressed"):
        load_bytes(rezip(members_of(saved_bytes()), zipfile.ZIP_DEFLATED))


def test_not_a_zip_and_missing_file(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"\x93NUMPY not a zip at all")
    with pytest.raises(ValueError, match="not a valid layer file"):
        LSTM.load(path)
    with pytest.raises(FileNotFoundError):
        LSTM.load(tmp_path / "absent.npz")
