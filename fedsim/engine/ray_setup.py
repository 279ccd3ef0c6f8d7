"""Starting or joining Ray: a local instance, or a cluster this project's code is
shipped to (``ray.address``), with one-line errors for an address that does not
answer."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

from fedsim.config import RayConfig
from fedsim.errors import FedsimError

PROJECT_DIR = Path(__file__).resolve().parent.parent.parent
# Never shipped to cluster nodes with the working directory: earlier runs' outputs.

RUNTIME_ENV_EXCLUDES = ["outputs/", "multirun/", "checkpoints/", ".venv/", ".git/",
                        "**/__pycache__/", ".pytest_cache/"]


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast, naming ``address``, when nothing listens at its host:port.

    Ray's own connection attempts retry for minutes against a dead address;
    one TCP connect with a timeout bounds the wait. ``auto`` is left to Ray
    (it looks up the local cluster's address, and fails at once without one).
    """
    import socket

    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        reason = "timed out" if isinstance(err, socket.timeout) else (
            getattr(err, "strerror", None) or str(err))
        raise FedsimError(f"ray.address={address!r}: no Ray cluster answers there within "
                          f"ray.connect_timeout_s={timeout_s:g} ({reason})") from err


@contextlib.contextmanager
def _stderr_kept_back() -> Iterator[None]:
    """Hold back what C++ code writes to file descriptor 2 (Ray's GCS client logs
    every failed connection attempt) and replay it only if the block succeeds, so
    that a failed connection ends in our one error line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))


def prepare_ray_import(rc: RayConfig) -> None:
    """Set the environment switches Ray reads when it is first imported (call
    before anything imports Ray; a no-op once it is)."""
    if rc.address is None and "ray" not in sys.modules:
        # A local instance's workers run this very interpreter and environment, so
        # Ray's `uv run` hook (which would rebuild the venv for them) is not needed.
        # Ray reads this switch when it is first imported.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if rc.address is not None and "ray" not in sys.modules:
        # Ray retries a silent cluster address once a second, 20 times by default.
        os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES",
                              str(max(1, math.ceil(rc.connect_timeout_s))))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def connect_ray(rc: RayConfig) -> bool:
    """Start or join Ray as configured; returns True if this call started it.

    address None: a local instance with ``num_cpus``. ``auto`` or
    ``ray://host:port``: an existing cluster, to which this project's directory is
    shipped as the workers' working_dir (outputs excluded).
    """
    prepare_ray_import(rc)
    import ray

    if ray.is_initialized():
        return False
    env: dict[str, Any] = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}}
    with warnings.catch_warnings():
        # TF 2.14 caps typing-extensions below what pydantic 2 needs, so Ray sees v1.
        warnings.filterwarnings("ignore", message="Pydantic v1", category=FutureWarning)
        if rc.address is None:
            # "local": always a new instance, never a cluster someone started here.
            ray.init(address="local", num_cpus=rc.num_cpus, include_dashboard=False,
                     log_to_driver=True, logging_level="WARNING", runtime_env=env)
            return True
        env.update(working_dir=str(PROJECT_DIR), excludes=list(RUNTIME_ENV_EXCLUDES))
        check_reachable(rc.address, rc.connect_timeout_s)
        try:
            with _stderr_kept_back():
                ray.init(address=rc.address, logging_level="WARNING", runtime_env=env)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise FedsimError(f"ray.address={rc.address!r}: cannot connect to a Ray cluster "
                              f"there ({str(err).splitlines()[0]})") from err
    return True
