"""Shared fixtures: one real local Ray instance for the session, warm actors
reused by the in-process simulations, and cleanup of TFF's C++ worker_binary
children (they outlive Python and hold stdout open)."""

from __future__ import annotations

import os

# Before Ray is imported anywhere: the local instance's workers run this venv's
# interpreter directly (no `uv run` re-packaging), and TF stays quiet.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs, shared by the tests that need one."""
    import ray

    from fedsim.config import RayConfig
    from fedsim.simulation import connect_ray

    started = connect_ray(RayConfig(num_cpus=2))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def warm_actors(ray_local):
    """One :class:`fedsim.engine.warm.WarmActors` for the session: the in-process
    simulation tests pass it as ``run_simulation(..., actors=warm_actors)``, so
    that their server and worker actors (each a process that imports TensorFlow)
    are started once and reset for every run instead of started anew."""
    from fedsim.engine.warm import WarmActors

    with WarmActors() as actors:
        yield actors


@pytest.fixture(autouse=True)
def _fresh_actors_get_the_cpus(request):
    """A test on the session's Ray that starts actors of its own (it uses
    ``ray_local`` but not ``warm_actors``) finds the CPUs free: the warm actors,
    whose placement group reserves them, are stopped first (the next test that
    uses them starts new ones)."""
    if "ray_local" in request.fixturenames and "warm_actors" not in request.fixturenames:
        request.getfixturevalue("warm_actors").close()
    yield


@pytest.fixture(scope="session", autouse=True)
def stop_tff_worker_binaries():
    """Terminate TFF's worker_binary children at the end of the session."""
    yield
    from fedsim.interop.tff import stop_tff_worker_binaries

    stop_tff_worker_binaries()
