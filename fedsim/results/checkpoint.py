"""Checkpoints: everything needed to continue a run exactly where it stopped.

``checkpoint.pkl`` in the run directory holds the round number, the resolved
config, the server's state (global weights, server optimizer state, aggregator
state such as the adaptive clip) and the accountant's event ledger. Random
streams need no saving: every one is derived from ``(seed, purpose, round,
...)`` (:mod:`fedsim.cohort.sampling`), so a resumed round draws exactly what the
uninterrupted run drew.

The file is written to a temporary name, flushed to disk, then renamed over
the previous checkpoint, so a crash at any moment leaves the old or the new
checkpoint, never a partial one. A corrupted or truncated file is refused with
one line and left as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

from fedsim.config import SimConfig
from fedsim.errors import FedsimError

CHECKPOINT = "checkpoint.pkl"
FORMAT = 1
_MAGIC = b"FEDSIMCKPT1\n"


class CheckpointError(FedsimError):
    """A checkpoint that cannot be used (missing, corrupted, or for another run)."""


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (round, config, server, ledger) to the run directory."""
    path = Path(run_dir) / CHECKPOINT
    body = pickle.dumps({"format": FORMAT, **state}, protocol=pickle.HIGHEST_PROTOCOL)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_MAGIC + hashlib.sha256(body).digest() + body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read and verify the checkpoint of ``run_dir`` (a checksum guards against
    truncation and corruption)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"resume={run_dir}: no {CHECKPOINT} there (checkpoints are "
                              "written every checkpoint_every rounds)")
    raw = path.read_bytes()
    head, digest, body = raw[:len(_MAGIC)], raw[len(_MAGIC):len(_MAGIC) + 32], \
        raw[len(_MAGIC) + 32:]
    if head != _MAGIC or len(digest) != 32 or hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"resume={run_dir}: {path} is corrupted or partial (checksum "
                              "mismatch); it was left untouched")
    try:
        state = pickle.loads(body)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means unusable
        raise CheckpointError(f"resume={run_dir}: {path} cannot be read ({err})") from err
    if state.get("format") != FORMAT:
        raise CheckpointError(f"resume={run_dir}: {path} has format {state.get('format')}, "
                              f"this fedsim reads format {FORMAT}")
    return state


# Options that may differ between a run and its resumption.
FREE_ON_RESUME = {"rounds", "resume", "resume_force", "progress", "ray", "checkpoint_every",
                  "faults"}
# Options that change the privacy guarantee: allowed only with resume_force.
PRIVACY_KEYS = {"dp", "sampling", "clients", "clients_per_round"}


def check_resumable(saved: dict[str, Any], cfg: SimConfig) -> dict[str, str]:
    """Compare the checkpoint's config with ``cfg``.

    Returns the privacy-relevant differences, option -> "old -> new" (empty if
    none); raises
    :class:`CheckpointError` for other differences (a different model or data
    cannot continue the same weights), and for privacy differences unless
    ``cfg.resume_force``.
    """
    now = dataclasses.asdict(cfg)
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
