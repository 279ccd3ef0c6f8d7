"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the round number, the resolved config, the server's state
(global weights, server optimizer state, aggregator state such as the adaptive
clip) and the accountant's event ledger. Random streams need no saving: every
one is derived from ``(seed, purpose, round, ...)`` (:mod:`fedsim.cohort.sampling`),
so a resumed round draws exactly what the uninterrupted run drew.

Format 2 runs no code when read (format 1 was a pickle, and unpickling a run
directory someone else wrote runs their code). Two files in the run directory:

- ``checkpoint-<sha256 prefix>.npz``: every numpy array and numpy scalar of the
  state, written and read with ``allow_pickle=False`` (so no object arrays), with
  its dtype, shape and bytes exactly;
- ``checkpoint.json``, the manifest: ``format`` (2), ``round``, ``arrays`` (the
  npz's file name and sha256), ``payload`` (the state as JSON, arrays replaced by
  references into the npz) and ``manifest_sha256`` (of the rest of the manifest).

The payload is JSON as far as JSON goes (dicts with string keys, lists, str,
int, float, bool, None); everything else is a one-key object whose key starts
with ``$``: ``{"$array": key}`` and ``{"$scalar": key}`` (into the npz),
``{"$tuple": [...]}``, ``{"$bytes": base64}``, ``{"$dict": [[k, v], ...]}`` (keys
that are not strings or start with ``$``), ``{"$objects": {"shape", "items"}}``
(an object array, element by element), and two explicit schemas:
``{"$dp_event": "GaussianDpEvent", "noise_multiplier": 0.5}`` for the DpEvents
of :data:`DP_EVENTS` (dp-accounting's and fedsim's own, nested events
recursively) and ``{"$record": "TFFState", ...}`` for :data:`RECORDS`. Reading
accepts only these: an unknown tag, event or record is refused with one line.
A round trip restores the state bit for bit (a resumed run equals the
uninterrupted one).

Writing is atomic: the npz and then the manifest are written to temporary
files, flushed to disk and renamed into place, so a crash at any moment leaves
the previous checkpoint or the new one; npz files of earlier checkpoints are
removed only after the new manifest is in place. Reading verifies both
checksums; a corrupted, truncated or missing file is refused with one line and
left as it is. A ``checkpoint.pkl`` of format 1 is refused without being read.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import attr
import numpy as np
from dp_accounting import dp_event

from fedsim.config import SimConfig
from fedsim.errors import FedsimError
from fedsim.interop.tff import TFFState
from fedsim.privacy.events import DiscreteGaussianDpEvent, SkellamDpEvent

CHECKPOINT = "checkpoint.json"
LEGACY_CHECKPOINT = "checkpoint.pkl"  # format 1: refused, never read
FORMAT = 2
_ARRAYS = re.compile(r"checkpoint-[0-9a-f]{16}\.npz")
_TMP_PREFIX = ".checkpoint-"


class CheckpointError(FedsimError):
    """A checkpoint that cannot be used (missing, corrupted, or for another run)."""


def _registry(classes: list[type]) -> dict[str, type]:
    return {c.__name__: c for c in classes}


# Every DpEvent of dp-accounting 0.4.3 (its abstract base aside) and fedsim's own.
DP_EVENTS: dict[str, type] = _registry([
    dp_event.NoOpDpEvent, dp_event.NonPrivateDpEvent, dp_event.UnsupportedDpEvent,
    dp_event.GaussianDpEvent, dp_event.LaplaceDpEvent, dp_event.SelfComposedDpEvent,
    dp_event.ComposedDpEvent, dp_event.PoissonSampledDpEvent,
    dp_event.SampledWithReplacementDpEvent, dp_event.SampledWithoutReplacementDpEvent,
    dp_event.SingleEpochTreeAggregationDpEvent, dp_event.RepeatAndSelectDpEvent,
    DiscreteGaussianDpEvent, SkellamDpEvent])
# Other classes a state may hold (frozen dataclasses, rebuilt from their fields).
RECORDS: dict[str, type] = _registry([TFFState])


# ----------------------------------------------------------------------------- encoding


class _Unencodable(Exception):
    """A value the format has no schema for (at ``path`` in the state)."""


def _encode(value: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    """``value`` as JSON, its arrays and numpy scalars moved into ``arrays``."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [_encode(v, arrays, f"{path}[{i}]") for i, v in enumerate(value)]
    if kind is tuple:
        return {"$tuple": [_encode(v, arrays, f"{path}[{i}]") for i, v in enumerate(value)]}
    if kind is dict:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: _encode(v, arrays, f"{path}.{k}") for k, v in value.items()}
        return {"$dict": [[_encode(k, arrays, f"{path}.<key {k!r}>"),
                           _encode(v, arrays, f"{path}.{k}")] for k, v in value.items()]}
    if kind is bytes:
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if kind is np.ndarray:
        if value.dtype.hasobject:
            if value.dtype != object:
                raise _Unencodable(f"{path}: a structured array with object fields")
            return {"$objects": {"shape": list(value.shape),
                                 "items": [_encode(v, arrays, f"{path}[{i}]")
                                           for i, v in enumerate(value.reshape(-1).tolist())]}}
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"$array": key}
    if isinstance(value, np.generic) and not value.dtype.hasobject:
        key = f"a{len(arrays)}"
        arrays[key] = np.asarray(value)
        return {"$scalar": key}
    if kind.__name__ in DP_EVENTS and DP_EVENTS[kind.__name__] is kind:
        out: dict[str, Any] = {"$dp_event": kind.__name__}
        for f in attr.fields(kind):
            out[f.name] = _encode(getattr(value, f.name), arrays, f"{path}.{f.name}")
        return out
    if kind.__name__ in RECORDS and RECORDS[kind.__name__] is kind:
        out = {"$record": kind.__name__}
        for f in dataclasses.fields(kind):
            out[f.name] = _encode(getattr(value, f.name), arrays, f"{path}.{f.name}")
        return out
    if isinstance(value, dp_event.DpEvent):
        raise _Unencodable(f"{path}: {kind.__module__}.{kind.__qualname__} is not a DpEvent "
                           f"that checkpoints know ({', '.join(DP_EVENTS)})")
    raise _Unencodable(f"{path}: {kind.__module__}.{kind.__qualname__} has no checkpoint schema")


def _fields(obj: dict[str, Any], tag: str, names: list[str], where: str) -> None:
    got = sorted(k for k in obj if k != tag)
    if got != sorted(names):
        raise _Unencodable(f"{where}: {obj[tag]} has fields {got}, expected {sorted(names)}")


def _decode(obj: Any, arrays: Callable[[str], np.ndarray], path: str) -> Any:
    """Inverse of :func:`_encode`; refuses (``_Unencodable``) what it does not know."""
    if isinstance(obj, list):
        return [_decode(v, arrays, f"{path}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj  # None, bool, int, float, str
    tags = [k for k in obj if k.startswith("$")]
    if not tags:
        return {k: _decode(v, arrays, f"{path}.{k}") for k, v in obj.items()}
    tag = tags[0]
    if len(tags) > 1:
        raise _Unencodable(f"{path}: more than one tag ({', '.join(tags)})")
    val = obj[tag]
    if tag in ("$dp_event", "$record"):  # an allow-listed attrs event or dataclass record
        registry, what = (DP_EVENTS, "DpEvent") if tag == "$dp_event" else (RECORDS, "record")
        cls = registry.get(val) if isinstance(val, str) else None
        if cls is None:
            raise _Unencodable(f"{path}: unknown {what} {val!r} (known: {', '.join(registry)})")
        names = [f.name for f in (attr.fields(cls) if tag == "$dp_event"
                                  else dataclasses.fields(cls))]
        _fields(obj, tag, names, path)
        return cls(**{n: _decode(obj[n], arrays, f"{path}.{n}") for n in names})
    if len(obj) != 1:
        raise _Unencodable(f"{path}: {tag} with other keys")
    if tag == "$tuple" and isinstance(val, list):
        return tuple(_decode(v, arrays, f"{path}[{i}]") for i, v in enumerate(val))
    if tag == "$dict" and isinstance(val, list) and all(
            isinstance(kv, list) and len(kv) == 2 for kv in val):
        return {_decode(k, arrays, f"{path}.<key>"): _decode(v, arrays, f"{path}.{k}")
                for k, v in val}
    if tag == "$bytes" and isinstance(val, str):
        return base64.b64decode(val.encode("ascii"), validate=True)
    if tag == "$array" and isinstance(val, str):
        return arrays(val)
    if tag == "$scalar" and isinstance(val, str):
        arr = arrays(val)
        if arr.ndim != 0:
            raise _Unencodable(f"{path}: scalar {val} has shape {arr.shape}")
        return arr[()]
    if tag == "$objects" and isinstance(val, dict) and set(val) == {"shape", "items"}:
        shape, items = val["shape"], val["items"]
        if not (isinstance(shape, list) and isinstance(items, list)
                and all(type(n) is int and n >= 0 for n in shape)
                and int(np.prod(shape, dtype=np.int64)) == len(items)):
            raise _Unencodable(f"{path}: malformed object array")
        out = np.empty(len(items), dtype=object)
        for i, v in enumerate(items):  # one by one: numpy would unpack sequences
            out[i] = _decode(v, arrays, f"{path}[{i}]")
        return out.reshape(tuple(shape))
    raise _Unencodable(f"{path}: unknown or malformed tag {tag}")


def encode_state(state: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """``state`` as (JSON-ready payload, arrays for the npz); raises
    :class:`CheckpointError` for a value the format has no schema for."""
    arrays: dict[str, np.ndarray] = {}
    try:
        return _encode(state, arrays, "state"), arrays
    except _Unencodable as err:
        raise CheckpointError(f"checkpoint: cannot write {err}") from None


def decode_state(payload: Any, arrays: Any) -> Any:
    """Inverse of :func:`encode_state` (``arrays``: a mapping such as an NpzFile)."""
    def get(key: str) -> np.ndarray:
        try:
            return arrays[key]
        except KeyError:
            raise _Unencodable(f"array {key!r} is not in the npz") from None
    return _decode(payload, get, "state")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True).encode("ascii")


# ----------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, write: Callable[[Any], None]) -> tuple[Path, str]:
    """Write a temporary file in ``directory`` and flush it to disk: its path and
    sha256 (the caller renames it into place). Removed again if writing fails."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX, suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself is durable before what depends on it


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (round, config, server, ledger) to the run directory;
    returns the manifest's path."""
    run_dir = Path(run_dir)
    payload, arrays = encode_state(state)
    # The npz first: its name is its checksum's prefix, so it never replaces the
    # npz that the current manifest names (unless it has the same content).
    tmp, digest = _write_temp(run_dir, lambda f: np.savez(f, **arrays))
    npz = f"checkpoint-{digest[:16]}.npz"
    _replace(tmp, run_dir / npz)
    manifest: dict[str, Any] = {"format": FORMAT, "round": state.get("round"),
                                "arrays": {"file": npz, "sha256": digest}, "payload": payload}
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    text = json.dumps(manifest, indent=1, ensure_ascii=True, allow_nan=True) + "\n"
    tmp, _ = _write_temp(run_dir, lambda f: f.write(text.encode("ascii")))
    path = run_dir / CHECKPOINT
    _replace(tmp, path)
    # Only now is the previous checkpoint's npz unreferenced.
    for old in run_dir.glob("checkpoint-*.npz"):
        if old.name != npz and _ARRAYS.fullmatch(old.name):
            old.unlink(missing_ok=True)
    for stale in run_dir.glob(f"{_TMP_PREFIX}*.tmp"):  # left by a crash mid-write
        stale.unlink(missing_ok=True)
    return path


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read and verify the checkpoint of ``run_dir`` (checksums guard against
    truncation and corruption; nothing in it is executed)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        if (Path(run_dir) / LEGACY_CHECKPOINT).exists():
            raise CheckpointError(
                f"resume={run_dir}: {LEGACY_CHECKPOINT} is the pre-2 pickle format, which "
                "fedsim no longer loads because unpickling can run code; continue that run "
                "with the fedsim version that wrote it, or start a new run")
        raise CheckpointError(f"resume={run_dir}: no {CHECKPOINT} there (checkpoints are "
                              "written every checkpoint_every rounds)")
    bad = f"resume={run_dir}: {path} is corrupted or partial"
    for attempt in range(3):  # a writer may replace the manifest while it is read
        raw = path.read_bytes()
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            raise CheckpointError(f"{bad} ({_one_line(err)}); it was left untouched") from None
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{bad} (not a JSON object); it was left untouched")
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"resume={run_dir}: {path} has format "
                                  f"{manifest.get('format')!r}, this fedsim reads format {FORMAT}")
        claimed = manifest.pop("manifest_sha256", None)
        if claimed != hashlib.sha256(_canonical(manifest)).hexdigest():
            raise CheckpointError(f"{bad} (checksum mismatch); it was left untouched")
        ref = manifest.get("arrays")
        if not (isinstance(ref, dict) and isinstance(ref.get("file"), str)
                and _ARRAYS.fullmatch(ref["file"]) and isinstance(ref.get("sha256"), str)):
            raise CheckpointError(f"{bad} (no valid npz reference); it was left untouched")
        npz = Path(run_dir) / ref["file"]
        try:
            body = npz.read_bytes()
        except FileNotFoundError:
            if attempt < 2 and path.read_bytes() != raw:
                continue  # a newer checkpoint replaced this one meanwhile
            raise CheckpointError(f"resume={run_dir}: {npz}, which {CHECKPOINT} names, is "
                                  "missing") from None
        break
    assert isinstance(ref, dict)  # (checked in the loop)
    if hashlib.sha256(body).hexdigest() != ref["sha256"]:
        raise CheckpointError(f"resume={run_dir}: {npz} is corrupted or partial (checksum "
                              "mismatch); it was left untouched")
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz_file:
            arrays = {k: npz_file[k] for k in npz_file.files}
    except Exception as err:  # noqa: BLE001 - a valid checksum over an unreadable file
        raise CheckpointError(f"resume={run_dir}: {npz} cannot be read "
                              f"({_one_line(err)})") from None
    try:
        state = decode_state(manifest.get("payload"), arrays)
    except Exception as err:  # noqa: BLE001 - unknown tags, events, fields, bad values
        why = str(err) if isinstance(err, _Unencodable) else _one_line(err)
        raise CheckpointError(f"resume={run_dir}: {path} cannot be read ({why})") from None
    if not isinstance(state, dict) or state.get("round") != manifest.get("round"):
        raise CheckpointError(f"{bad} (its round does not match its payload); it was left "
                              "untouched")
    return {"format": FORMAT, **state}


# Options that may differ between a run and its resumption.
FREE_ON_RESUME = {"rounds", "resume", "resume_force", "progress", "ray", "checkpoint_every",
                  "faults", "tracking"}
# Options that change the privacy guarantee: allowed only with resume_force.
PRIVACY_KEYS = {"dp", "sampling", "clients", "clients_per_round"}


def _with_defaults(saved: Any, defaults: Any) -> Any:
    """``saved`` with the options it lacks (added to fedsim since it was written)
    at their defaults, recursively."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def upgrade_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config as this fedsim reads it: options added since it was
    written (e.g. ``federated_eval``, ``model.loss``) take their defaults, which
    run as the older fedsim ran; and ``server.initial_preconditioner``, stored as
    yogi's 1e-6 before it became null (1e-6 for yogi, 0.1 for adagrad), reads as
    null for the optimizers that existed then; ``algorithm``, once a name, reads
    as ``{"name": <it>}`` with the other algorithm options at their defaults;
    ``sampling``, once a scheme's name, reads as ``{"scheme": <it>, "min_sep":
    None}``."""
    if isinstance(saved.get("algorithm"), str):
        saved = {**saved, "algorithm": {"name": saved["algorithm"]}}
    if isinstance(saved.get("sampling"), str):
        saved = {**saved, "sampling": {"scheme": saved["sampling"]}}
    out = _with_defaults(saved, dataclasses.asdict(SimConfig()))
    server = out.get("server")
    if (isinstance(server, dict) and server.get("initial_preconditioner") == 1e-6
            and server.get("optimizer") in ("sgd", "adam", "yogi")):
        out["server"] = {**server, "initial_preconditioner": None}
    return out


def check_resumable(saved: dict[str, Any], cfg: SimConfig) -> dict[str, str]:
    """Compare the checkpoint's config (:func:`upgrade_config`) with ``cfg``.

    Returns the privacy-relevant differences, option -> "old -> new" (empty if
    none); raises
    :class:`CheckpointError` for other differences (a different model or data
    cannot continue the same weights), and for privacy differences unless
    ``cfg.resume_force``.
    """
    now = dataclasses.asdict(cfg)
    saved = upgrade_config(saved)
    diffs = {k: (saved.get(k), now[k]) for k in now
             if k not in FREE_ON_RESUME and saved.get(k) != now[k]}
    other = sorted(k for k in diffs if k not in PRIVACY_KEYS)
    if other:
        k = other[0]
        raise CheckpointError(f"resume: {k} differs from the checkpoint ({diffs[k][0]!r} -> "
                              f"{diffs[k][1]!r}); only {', '.join(sorted(FREE_ON_RESUME))} "
                              "may change")
    privacy = sorted(k for k in diffs if k in PRIVACY_KEYS)
    if privacy and not cfg.resume_force:
        k = privacy[0]
        raise CheckpointError(f"resume: privacy parameter {k} differs from the checkpoint "
                              f"({diffs[k][0]!r} -> {diffs[k][1]!r}); pass resume_force=true to "
                              "continue (the ledger keeps every round's event)")
    return {k: f"{diffs[k][0]!r} -> {diffs[k][1]!r}" for k in privacy}
