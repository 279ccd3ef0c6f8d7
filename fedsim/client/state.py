"""Per-client state on disk (e.g. SCAFFOLD's control variates), for populations
whose state does not fit in memory: 100,000 clients of a 100,000-parameter
model hold 40 GB of float32.

A :class:`ClientStateStore` is a directory::

    meta.json                 fields (name -> float32 length), population, shard size
    shards/<field>-<k>.f32    clients k*S .. k*S+S-1 of one field, row after row
    staged/r<round>-w<worker>-a<attempt>.npz   a worker's new rows, not yet committed
    undo/r<round>.npz         the rows round <round> overwrote (for resuming)

Shard files are sparse: a client that never trained reads as zeros and takes no
disk space. Rows are read and written with ``pread``/``pwrite``, never mapped,
so no process's memory grows with the population or with the clients seen.

A round's new rows become visible only when the round is committed: the worker
that trains a client reads its row and stages the new one; after the server has
applied the round, :meth:`ClientStateStore.commit` first writes the old rows to
an undo log, then the new rows. A round that is retried (a worker died)
simply stages again. A checkpoint of round R prunes the undo logs up to R;
resuming from R rolls the store back over the later ones (newest first), so a
resumed run sees exactly the state it would have seen (bit-identical).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

from fedsim.errors import FedsimError

DTYPE = np.dtype("<f4")


def _atomic_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` so that the file is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ClientStateStore:
    """Fields of float32 rows, one row per client id, in shard files of
    ``shard_clients`` clients (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise FedsimError(f"algorithm.state_dir={self.root}: no client-state store there "
                              f"({type(err).__name__})") from None
        self.num_clients = int(meta["num_clients"])
        self.fields = {str(k): int(v) for k, v in meta["fields"].items()}
        self.shard_clients = int(meta["shard_clients"])
        self._fds: dict[Path, int] = {}

    @classmethod
    def create(cls, root: Path | str, num_clients: int, fields: Mapping[str, int],
               shard_clients: int) -> "ClientStateStore":
        """A new, empty store at ``root`` (a new or empty directory; anything else
        is refused, so another run's state is never overwritten)."""
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise FedsimError(f"algorithm.state_dir={root}: allowed is a new or empty "
                              "directory (it holds files, e.g. another run's client state; "
                              "resume=<its run directory> continues that run)")
        for sub in ("shards", "staged", "undo"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        meta = {"num_clients": int(num_clients), "fields": {k: int(v) for k, v in fields.items()},
                "shard_clients": int(shard_clients), "dtype": DTYPE.str}
        tmp = root / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, root / "meta.json")
        return cls(root)

    # -- rows ---------------------------------------------------------------------
    def _shard(self, name: str, cid: int) -> tuple[Path, int]:
        """The shard file of client ``cid``'s row of field ``name``, and the row's offset."""
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client {cid} outside the population of {self.num_clients}")
        k, row = divmod(int(cid), self.shard_clients)
        return (self.root / "shards" / f"{name}-{k:06d}.f32",
                row * self.fields[name] * DTYPE.itemsize)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._fds[path]

    def read(self, cid: int) -> dict[str, np.ndarray]:
        """Client ``cid``'s state (zeros if it never trained), a new array per field."""
        out = {}
        for name, size in self.fields.items():
            path, offset = self._shard(name, cid)
            nbytes = size * DTYPE.itemsize
            data = os.pread(self._fd(path), nbytes, offset) if path.exists() else b""
            row = np.zeros(size, DTYPE)
            if data:
                row[:len(data) // DTYPE.itemsize] = np.frombuffer(data, DTYPE)
            out[name] = row
        return out

    def _write(self, cid: int, state: Mapping[str, np.ndarray]) -> set[int]:
        touched = set()
        for name, size in self.fields.items():
            row = np.ascontiguousarray(state[name], DTYPE)
            if row.shape != (size,):
                raise ValueError(f"state field {name!r} of client {cid} has shape {row.shape}, "
                                 f"the store holds ({size},)")
            path, offset = self._shard(name, cid)
            fd = self._fd(path)
            os.pwrite(fd, row.tobytes(), offset)
            touched.add(fd)
        return touched

    @staticmethod
    def _pack(ids: Iterable[int], rows: Iterable[Mapping[str, np.ndarray]],
              fields: Mapping[str, int]) -> dict[str, np.ndarray]:
        ids = list(ids)
        rows = list(rows)
        packed = {"ids": np.asarray(ids, np.int64)}
        for name, size in fields.items():
            packed[f"field_{name}"] = (np.stack([np.asarray(r[name], DTYPE) for r in rows])
                                       if rows else np.zeros((0, size), DTYPE))
        return packed

    def _unpack(self, path: Path) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
        with np.load(path) as z:
            ids = z["ids"]
            cols = {name: z[f"field_{name}"] for name in self.fields}
        return ids, [{name: cols[name][i] for name in self.fields} for i in range(len(ids))]

    # -- rounds -------------------------------------------------------------------
    def stage(self, round_num: int, worker: int, attempt: int,
              states: Mapping[int, Mapping[str, np.ndarray]]) -> Optional[str]:
        """Stage a worker's new rows of a round (not visible until :meth:`commit`);
        returns the staged file's path (None if there is nothing to stage)."""
        if not states:
            return None
        path = self.root / "staged" / f"r{round_num}-w{worker}-a{attempt}.npz"
        ids = sorted(states)
        _atomic_npz(path, self._pack(ids, (states[i] for i in ids), self.fields))
        return str(path)

    def commit(self, round_num: int, staged: Iterable[Optional[str]]) -> int:
        """Make round ``round_num``'s staged rows (the files the round's reports
        name) the clients' state; returns how many clients were written. The
        rows they replace go to the round's undo log first."""
        ids: list[int] = []
        rows: list[dict[str, np.ndarray]] = []
        for path in staged:
            if path is not None:
                i, r = self._unpack(Path(path))
                ids += [int(c) for c in i]
                rows += r
        if len(set(ids)) != len(ids):
            raise ValueError(f"round {round_num}: a client's state was staged twice")
        _atomic_npz(self.root / "undo" / f"r{round_num:08d}.npz",
                    self._pack(ids, (self.read(c) for c in ids), self.fields))
        touched: set[int] = set()
        for cid, row in zip(ids, rows):
            touched |= self._write(cid, row)
        for fd in touched:
            os.fsync(fd)
        for leftover in (self.root / "staged").glob(f"r{round_num}-*"):
            leftover.unlink()  # (this round's, and a failed attempt's)
        return len(ids)

    def undo_rounds(self) -> list[int]:
        return sorted(int(p.stem[1:]) for p in (self.root / "undo").glob("r*.npz"))

    def prune(self, up_to_round: int) -> None:
        """Forget the undo logs of rounds <= ``up_to_round`` (checkpointed: the run
        never goes back before it)."""
        for r in self.undo_rounds():
            if r <= up_to_round:
                (self.root / "undo" / f"r{r:08d}.npz").unlink()

    def rollback(self, to_round: int) -> int:
        """Restore the state as it was after round ``to_round`` (a checkpoint's):
        undo the later rounds, newest first, and drop anything staged; returns
        how many rounds were undone."""
        later = [r for r in self.undo_rounds() if r > to_round]
        for r in reversed(later):
            path = self.root / "undo" / f"r{r:08d}.npz"
            ids, rows = self._unpack(path)
            touched: set[int] = set()
            for cid, row in zip(ids, rows):
                touched |= self._write(int(cid), row)
            for fd in touched:
                os.fsync(fd)
            path.unlink()
        for leftover in (self.root / "staged").glob("*"):
            leftover.unlink()
        return len(later)

    def bytes_on_disk(self) -> int:
        """The disk space the shard files take (their allocated blocks)."""
        return sum(p.stat().st_blocks * 512 for p in (self.root / "shards").glob("*.f32"))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:  # (open descriptors do not travel)
        return {**self.__dict__, "_fds": {}}


def remove_store(root: Path | str) -> None:
    """Delete a store directory (a temporary one, at the end of its run)."""
    shutil.rmtree(root, ignore_errors=True)
