"""The checkpoint format (fedsim.results.checkpoint): JSON plus an npz, no pickle.

Pure tests: no Ray, no TensorFlow. Resuming a real run: test_checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pickle
import zipfile
from pathlib import Path

import attr
import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event

from fedsim.config import SimConfig
from fedsim.interop.tff import TFFState
from fedsim.privacy.events import DiscreteGaussianDpEvent, SkellamDpEvent
from fedsim.results import checkpoint as ckpt
from fedsim.results.checkpoint import (
    CHECKPOINT,
    DP_EVENTS,
    FORMAT,
    CheckpointError,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)


def _same(a, b, path="state"):
    """Equal and of the same type all the way down; arrays: same dtype, shape,
    memory order and bytes (so NaN payloads and -0.0 count)."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.dtype.str == b.dtype.str, path
        assert a.shape == b.shape, path
        assert a.flags.f_contiguous == b.flags.f_contiguous or a.ndim < 2, path
        if a.dtype == object:
            for i, (x, y) in enumerate(zip(a.reshape(-1), b.reshape(-1))):
                _same(x, y, f"{path}[{i}]")
        else:
            assert a.tobytes(order="A") == b.tobytes(order="A"), path
            assert b.flags.writeable, path
    elif isinstance(a, np.generic):
        assert a.dtype.str == b.dtype.str and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path  # the order too
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif dataclasses.is_dataclass(a):  # e.g. TFFState (eq=False)
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, float):
        assert np.float64(a).tobytes() == np.float64(b).tobytes(), path
    else:
        assert a == b, path


NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "longdouble", "complex64", "complex128", ">f4",
           "<i8", ">u2"]


def _arrays() -> dict:
    rng = np.random.default_rng(0)
    out: dict = {}
    for name in NUMERIC:
        dt = np.dtype(name)
        raw = rng.integers(0, 256, size=24 * dt.itemsize, dtype=np.uint8)
        full = raw.view(dt) if dt != np.dtype(bool) else raw.astype(bool)
        out[name] = {"2d": full[:12].reshape(3, 4), "0d": np.array(full[0]),
                     "empty": np.zeros((0, 3), dt), "fortran": np.asfortranarray(full[:12].reshape(3, 4)),
                     "scalar": full[1]}
        if dt == np.longdouble:  # a scalar's padding bytes are not its value
            del out[name]["scalar"]
    nan = np.array([0x7FC00001, 0xFFC0BEEF, 0x80000000], np.uint32).view(np.float32)
    out["nan_payloads_and_minus_zero"] = nan
    out["unicode"] = np.array(["", "héllo", "x" * 9])
    out["bytes_trailing_nul"] = np.array([b"a\x00b", b"", b"\x00\x00"])
    out["datetime"] = np.array(["2026-01-01T00:00:00.123"], "datetime64[ms]")
    out["timedelta"] = np.array([1, -2], "timedelta64[ns]")
    out["structured"] = np.array([(1, 2.5, b"x")], dtype=[("a", "<i4"), ("b", ">f8"), ("c", "S3")])
    out["objects"] = np.array([b"a\x00", "s", 1.5, None], dtype=object).reshape(2, 2)
    out["object_0d"] = np.asarray(TFFState(4, (0.5, b"st\x00", np.arange(2, dtype=np.int64), False)))
    out["object_none"] = np.asarray(None)
    out["np_scalars"] = [np.float32(1.5), np.int64(-3), np.bool_(True), np.uint8(255),
                         np.float64("nan"), np.complex64(1 - 2j), np.str_("s"), np.bytes_(b"b")]
    return out


def _payload() -> dict:
    return {
        "round": 7,
        "config": dataclasses.asdict(SimConfig()),
        "server": {"weights": np.linspace(-1, 1, 11, dtype=np.float32),
                   "opt_state": {"step": 7, "accumulator": np.zeros(11, np.float32)},
                   "agg_state": [np.asarray(0.25), np.asarray(3, np.int32), np.asarray(True)]},
        "ledger": [[dp_accounting.GaussianDpEvent(0.5), 3],
                   [dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 4]],
        "arrays": _arrays(),
        "python": {"none": None, "true": True, "big": 2 ** 80, "neg": -(2 ** 65), "zero": -0.0,
                   "inf": float("inf"), "minus_inf": float("-inf"), "nan": float("nan"),
                   "tiny": 5e-324, "str": "ünï\u2028code\"\\\n", "bytes": b"\x00\xff\x00",
                   "empty": ("", b"", [], (), {}), "tuple": (1, (2.0, [3, (None,)])),
                   "int_keys": {1: "a", (2, 3): "b", None: "c"},
                   "tag_like_keys": {"$array": "not a reference", "$tuple": [1]},
                   "list_of_lists": [[1, 2], [3, [4.5, "x"]]]},
    }


def test_round_trip_of_nested_payloads_is_bit_exact(tmp_path):
    payload = _payload()
    save_checkpoint(tmp_path, payload)
    loaded = load_checkpoint(tmp_path)
    assert loaded.pop("format") == FORMAT
    _same(payload, loaded)
    # What simulation.py compares on resume: the same config gives no difference.
    assert check_resumable(loaded["config"], SimConfig()) == {}


def test_manifest_is_json_and_the_npz_holds_no_pickle(tmp_path):
    save_checkpoint(tmp_path, _payload())
    manifest = json.loads((tmp_path / CHECKPOINT).read_text())
    assert manifest["format"] == FORMAT == 2 and manifest["round"] == 7
    npz = tmp_path / manifest["arrays"]["file"]
    assert npz.name == f"checkpoint-{manifest['arrays']['sha256'][:16]}.npz"
    with np.load(npz, allow_pickle=False) as arrays:
        loaded = [arrays[k] for k in arrays.files]  # raises if anything needed pickle
    assert loaded and not any(a.dtype.hasobject for a in loaded)
    with zipfile.ZipFile(npz) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, npz.name])


def test_loading_never_unpickles(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _payload())

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    assert load_checkpoint(tmp_path)["round"] == 7


def _every_event() -> list:
    g, lap = dp_accounting.GaussianDpEvent(0.7), dp_accounting.LaplaceDpEvent(1.5)
    return [
        dp_accounting.NoOpDpEvent(), dp_accounting.NonPrivateDpEvent(),
        dp_accounting.UnsupportedDpEvent(), g, lap,
        dp_accounting.SelfComposedDpEvent(g, 12),
        dp_accounting.ComposedDpEvent([g, lap, dp_accounting.ComposedDpEvent([])]),
        dp_accounting.ComposedDpEvent((g, lap)),  # a tuple stays a tuple
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.SelfComposedDpEvent(g, 3)),
        dp_event.SampledWithReplacementDpEvent(1000, 10, lap),
        dp_accounting.SampledWithoutReplacementDpEvent(1000, 10, g),
        dp_event.SingleEpochTreeAggregationDpEvent(1.1, 16),
        dp_event.SingleEpochTreeAggregationDpEvent(1.1, [4, 8, 2]),
        dp_event.RepeatAndSelectDpEvent(g, 3.5, 1.0),
        DiscreteGaussianDpEvent(2.5),
        SkellamDpEvent(l1_sensitivity=3.0, l2_sensitivity=2.0, variance=100.0),
        dp_accounting.ComposedDpEvent([SkellamDpEvent(1.0, 1.0, 4.0),
                                       dp_accounting.PoissonSampledDpEvent(
                                           0.5, DiscreteGaussianDpEvent(np.float64(0.25)))]),
    ]


def test_every_registered_dp_event_round_trips_equal(tmp_path):
    events = _every_event()
    assert {type(e).__name__ for e in events} == set(DP_EVENTS)  # every kind is covered
    ledger = [[e, i + 1] for i, e in enumerate(events)]
    save_checkpoint(tmp_path, {"round": 1, "ledger": ledger})
    back = load_checkpoint(tmp_path)["ledger"]
    assert back == ledger
    for (a, _), (b, _) in zip(ledger, back):
        assert type(a) is type(b)
        for f in attr.fields(type(a)):
            assert type(getattr(a, f.name)) is type(getattr(b, f.name))


def test_the_registry_is_every_dp_event_of_dp_accounting_and_fedsims_own():
    theirs = {name for name, cls in inspect.getmembers(dp_event, inspect.isclass)
              if issubclass(cls, dp_event.DpEvent) and cls is not dp_event.DpEvent}
    assert set(DP_EVENTS) == theirs | {"DiscreteGaussianDpEvent", "SkellamDpEvent"}
    assert "RandomizedResponseDpEvent" not in theirs  # (not in dp-accounting 0.4.3)


def _rewrite(run_dir: Path, change) -> None:
    """Edit the manifest's payload and re-sign it (as a forger would)."""
    path = run_dir / CHECKPOINT
    manifest = json.loads(path.read_text())
    del manifest["manifest_sha256"]
    change(manifest)
    import hashlib
    manifest["manifest_sha256"] = hashlib.sha256(ckpt._canonical(manifest)).hexdigest()
    path.write_text(json.dumps(manifest))


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("forged,fragment", [
    ({"$dp_event": "EvilDpEvent", "noise_multiplier": 0.0}, "unknown DpEvent 'EvilDpEvent'"),
    ({"$dp_event": "DpEvent"}, "unknown DpEvent 'DpEvent'"),
    ({"$dp_event": "GaussianDpEvent", "noise_multiplier": 1.0, "x": 2},
     "GaussianDpEvent has fields ['noise_multiplier', 'x']"),
    ({"$record": "Popen", "args": ["touch", "x"]}, "unknown record 'Popen'"),
    ({"$pickle": "gASV"}, "unknown or malformed tag $pickle"),
    ({"$array": "a999"}, "array 'a999' is not in the npz"),
])
def test_unknown_events_records_and_tags_are_refused(tmp_path, forged, fragment):
    save_checkpoint(tmp_path, {"round": 2, "ledger": [[dp_accounting.GaussianDpEvent(1.0), 2]]})

    def change(m):
        m["payload"]["ledger"][0][0] = forged

    _rewrite(tmp_path, change)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert fragment in _one_line(err) and CHECKPOINT in str(err.value)


def test_an_unregistered_dp_event_or_type_is_refused_when_saving(tmp_path):
    @attr.define(frozen=True)
    class HomemadeDpEvent(dp_accounting.DpEvent):
        scale: float

    save_checkpoint(tmp_path, {"round": 1, "ledger": []})
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, {"round": 2, "ledger": [[HomemadeDpEvent(1.0), 1]]})
    assert "state.ledger[0][0]" in _one_line(err) and "HomemadeDpEvent" in str(err.value)
    with pytest.raises(CheckpointError, match=r"state.server.x: builtins.set has no checkpoint"):
        save_checkpoint(tmp_path, {"round": 2, "server": {"x": {1, 2}}})
    with pytest.raises(CheckpointError, match="no checkpoint schema"):
        save_checkpoint(tmp_path, {"round": 2, "x": np.ma.masked_array([1])})
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    assert load_checkpoint(tmp_path)["round"] == 1


def _npz(run_dir: Path) -> Path:
    return run_dir / json.loads((run_dir / CHECKPOINT).read_text())["arrays"]["file"]


def test_checksum_mismatches_are_refused_naming_the_file(tmp_path):
    save_checkpoint(tmp_path, _payload())
    npz = _npz(tmp_path)
    good = npz.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    npz.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert f"{npz} is corrupted or partial (checksum mismatch)" in _one_line(err)
    assert npz.read_bytes() == bytes(data)  # left untouched
    npz.write_bytes(good[:len(good) // 3])  # truncated
    with pytest.raises(CheckpointError, match="corrupted or partial"):
        load_checkpoint(tmp_path)
    npz.unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert f"{npz}, which {CHECKPOINT} names, is missing" in _one_line(err)
    npz.write_bytes(good)
    # A manifest edited but still valid JSON (round 7 -> 8) fails its own checksum.
    path = tmp_path / CHECKPOINT
    text = path.read_text()
    path.write_text(text.replace('"round": 7', '"round": 8', 1))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert f"{path} is corrupted or partial (checksum mismatch)" in _one_line(err)
    path.write_text(text)
    assert load_checkpoint(tmp_path)["round"] == 7


@pytest.mark.parametrize("cut", [0, 1, 50, -2])
def test_truncated_or_garbled_manifests_are_refused(tmp_path, cut):
    save_checkpoint(tmp_path, _payload())
    path = tmp_path / CHECKPOINT
    text = path.read_bytes()
    path.write_bytes(text[:cut] if cut >= 0 else text[:cut - 1])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert f"{path} is corrupted or partial" in _one_line(err)
    garbled = bytearray(text)
    garbled[len(garbled) // 2] ^= 0xFF
    path.write_bytes(bytes(garbled))
    with pytest.raises(CheckpointError, match="corrupted or partial"):
        load_checkpoint(tmp_path)
    path.write_bytes(b"[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_checkpoint(tmp_path)


def test_another_format_and_a_forged_npz_name_are_refused(tmp_path):
    save_checkpoint(tmp_path, {"round": 1})
    _rewrite(tmp_path, lambda m: m.update(format=3))
    with pytest.raises(CheckpointError, match="has format 3, this fedsim reads format 2"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, {"round": 1})
    _rewrite(tmp_path, lambda m: m["arrays"].update(file="../../etc/passwd"))
    with pytest.raises(CheckpointError, match="no valid npz reference"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=f"no {CHECKPOINT} there"):
        load_checkpoint(tmp_path / "elsewhere")


class _Trap:
    """Unpickling this creates a file: the proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_old_pickle_checkpoint_is_refused_without_unpickling_it(tmp_path):
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Trap(armed)))
    assert armed.exists()  # the trap works

    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    marker = tmp_path / "code-ran"
    body = pickle.dumps({"format": 1, "round": 3, "x": _Trap(marker)})
    import hashlib
    (run_dir / "checkpoint.pkl").write_bytes(b"FEDSIMCKPT1\n" + hashlib.sha256(body).digest()
                                             + body)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(run_dir)
    assert _one_line(err) == (
        f"resume={run_dir}: checkpoint.pkl is the pre-2 pickle format, which fedsim no longer "
        "loads because unpickling can run code; continue that run with the fedsim version "
        "that wrote it, or start a new run")
    assert not marker.exists()


def test_a_failure_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    first = {"round": 3, "w": np.arange(4, dtype=np.float32)}
    save_checkpoint(tmp_path, first)
    before = sorted(p.name for p in tmp_path.iterdir())

    def check_previous():
        loaded = load_checkpoint(tmp_path)
        assert loaded["round"] == 3 and np.array_equal(loaded["w"], first["w"])

    second = {"round": 6, "w": np.arange(4, dtype=np.float32) + 1}

    # 1. while writing the npz
    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ckpt.np, "savez", broken_savez)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path, second)
    check_previous()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # its temp file was removed

    # 2. after the new npz is in place, while writing the manifest
    real_replace = ckpt.os.replace

    def crash_on_manifest(src, dst):
        if Path(dst).name == CHECKPOINT:
            raise KeyboardInterrupt  # e.g. Ctrl-C between the two renames
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(ckpt.os, "replace", crash_on_manifest)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, second)
    check_previous()
    orphans = [p.name for p in tmp_path.glob("checkpoint-*.npz") if p.name not in before]
    assert len(orphans) == 1 and not list(tmp_path.glob(".checkpoint-*"))

    # A crash that leaves a temporary file behind (SIGKILL) does not matter either.
    (tmp_path / ".checkpoint-abc.tmp").write_bytes(b"partial")
    check_previous()

    # The next checkpoint goes through and cleans up what the failures left.
    save_checkpoint(tmp_path, second)
    loaded = load_checkpoint(tmp_path)
    assert loaded["round"] == 6 and np.array_equal(loaded["w"], second["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, _npz(tmp_path).name])


def test_old_npz_files_are_removed_once_the_new_manifest_is_in_place(tmp_path):
    names = []
    for rnd in range(1, 4):
        save_checkpoint(tmp_path, {"round": rnd, "w": np.full(3, rnd, np.float64)})
        names.append(_npz(tmp_path).name)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, names[-1]])
    assert len(set(names)) == 3
    unrelated = tmp_path / "checkpoint-notes.npz"  # not a name fedsim writes
    unrelated.write_bytes(b"x")
    save_checkpoint(tmp_path, {"round": 4, "w": np.zeros(3)})
    assert unrelated.exists()
    # The same content again keeps its name, and stays loadable.
    save_checkpoint(tmp_path, {"round": 4, "w": np.zeros(3)})
    assert load_checkpoint(tmp_path)["round"] == 4


def test_the_server_state_of_a_tff_aggregator_round_trips(tmp_path):
    """Server.get_state stores aggregator leaves as np.asarray(leaf): with
    aggregator=tff that is a 0-d object array holding a TFFState (or None)."""
    state = TFFState(30, (0.5773502588272095, 0.1, b"dp_accounting.dp_event", b"GaussianDpEvent",
                          1.0, False, np.array([-6676966950913355947, 42], np.int64)))
    server = {"weights": np.ones(30, np.float32), "opt_state": {"step": 0},
              "agg_state": [np.asarray(state)]}
    save_checkpoint(tmp_path, {"round": 1, "server": server})
    back = load_checkpoint(tmp_path)["server"]
    _same(server, back)
    restored = back["agg_state"][0].item()
    assert isinstance(restored, TFFState) and restored.size == 30
    assert restored.leaves[:6] == state.leaves[:6]
    save_checkpoint(tmp_path, {"round": 0, "server": {"agg_state": [np.asarray(None)]}})
    assert load_checkpoint(tmp_path)["server"]["agg_state"][0].item() is None


def test_a_checkpoint_written_before_the_newer_options_still_resumes():
    """A config as fedsim wrote it before federated_eval, model.loss/metrics, the
    text datasets' options, FedAdagrad, the algorithm options and the sampling
    config group: the new options read as their defaults."""
    old = dataclasses.asdict(SimConfig())
    del old["federated_eval"]
    for key in ("loss", "metrics"):
        del old["model"][key]
    for key in ("leaf_dataset", "stackoverflow_task", "vocab_size", "cifar100_label"):
        old["data"].pop(key, None)
    old["server"]["initial_preconditioner"] = 1e-6  # yogi's, stored for every optimizer
    old["algorithm"] = "fedavg"  # a name, before the algorithm options
    old["sampling"] = "uniform"  # a name, before the sampling config group
    assert check_resumable(old, SimConfig()) == {}
    with pytest.raises(CheckpointError, match="resume: algorithm differs"):
        check_resumable({**old, "algorithm": "fedavg"}, SimConfig(algorithm="fedprox"))
    with pytest.raises(CheckpointError, match="resume: model differs"):
        check_resumable({**old, "model": {**old["model"], "name": "cnn"}}, SimConfig())
