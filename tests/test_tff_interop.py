"""TFF interoperability: TFF aggregation factories as fedsim aggregators
(fedsim.interop.tff) and TFF ClientData as the client population (fedsim.data.tff)."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, small_config

from fedsim.config import (
    AggregatorConfig,
    DataConfig,
    DPConfig,
    ModelConfig,
    RayConfig,
    SecAggConfig,
    ServerConfig,
)
from fedsim.errors import ConfigError, DataError

ADAPTIVE = "tensorflow_federated.aggregators:DifferentiallyPrivateFactory.gaussian_adaptive"
MEAN = "tensorflow_federated.aggregators:MeanFactory"
LAPLACE = "examples.laplace_factory:LaplaceFactory"


def _live_worker_binaries() -> set[int]:
    """Pids of live TFF worker_binary processes among this process's descendants
    (Ray's local actors included)."""
    from fedsim.interop.tff import _worker_binaries

    return {p.pid for p in _worker_binaries()}


@pytest.fixture(scope="module", autouse=True)
def _no_worker_binary_left():
    """Every worker_binary this module starts is stopped by the code under test
    (other modules' binaries, e.g. TFF's default context's, are left alone)."""
    from fedsim.interop.tff import stop_tff_worker_binaries

    before = _live_worker_binaries()
    yield
    left = _live_worker_binaries() - before
    stop_tff_worker_binaries(pids=left)
    assert not left, f"worker_binary processes left running: {sorted(left)}"


def _round(agg, state, updates, weights=None, workers=2, rng_seed=0):
    """One round as fedsim runs it: workers accumulate their shards, the server
    merges the partials in order and finalizes."""
    d = updates[0].size
    params = agg.client_params(state)
    weights = weights or [1] * len(updates)
    merged = agg.zero_partial(d)
    for shard in np.array_split(np.arange(len(updates)), workers):
        part = agg.zero_partial(d)
        for i in shard:
            part = agg.accumulate(params, part, updates[i], weights[i])
        merged = agg.merge(merged, part)
    return agg.finalize(state, merged, len(updates), np.random.default_rng(rng_seed))


def _updates(rng, k, d):
    # Norms over two orders of magnitude, so the adaptive clip matters.
    return [(rng.normal(size=d) * rng.lognormal(-1.5, 1.0) / math.sqrt(d)).astype(np.float32)
            for _ in range(k)]


def _server_checkpoint(agg, state):
    """What Server.get_state/set_state do with the aggregator state, through a
    checkpoint written and read back (fedsim.results.checkpoint)."""
    import tempfile

    import tensorflow as tf

    from fedsim.results.checkpoint import load_checkpoint, save_checkpoint

    with tempfile.TemporaryDirectory() as run_dir:
        save_checkpoint(Path(run_dir), {"round": 1, "server": {
            "agg_state": [np.asarray(v) for v in tf.nest.flatten(state)]}})
        saved = load_checkpoint(Path(run_dir))["server"]["agg_state"]
    template = agg.initial_state()
    return tf.nest.pack_sequence_as(
        template, [tf.constant(v) if tf.is_tensor(t) else v.item() if np.ndim(v) == 0 else v
                   for t, v in zip(tf.nest.flatten(template), saved)])


# ----------------------------------------------------------------------------- aggregator


def test_workers_build_and_stack_without_importing_tensorflow():
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from fedsim.engine.parts import build_aggregator\n"
        "from fedsim.config import AggregatorConfig, SimConfig\n"
        f"cfg = SimConfig(aggregator=AggregatorConfig(kind='tff', factory={ADAPTIVE!r}))\n"
        "agg = build_aggregator(cfg)\n"
        "p = agg.accumulate({}, agg.zero_partial(3), np.ones(3), 7)\n"
        "q = agg.merge(p, agg.accumulate({}, agg.zero_partial(3), np.zeros(3), 2))\n"
        "assert q.total.shape == (2, 3) and q.total.dtype == np.float32, q\n"
        "assert q.count == 2 and list(q.extras[0]) == [7.0, 2.0] and q.weight == 9.0\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', "
        "'tensorflow_federated')]\n"
        "assert not bad, bad[:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_gaussian_adaptive_matches_native_aggregator_and_reports_dp_events():
    from fedsim.interop.tff import TFFAggregator
    from fedsim.privacy.queries import DPQueryAggregator

    d, k = 60, 5
    native = DPQueryAggregator(DPConfig(mechanism="gaussian_adaptive", noise_multiplier=0.0), k)
    ours = TFFAggregator(ADAPTIVE, {"noise_multiplier": 0, "clients_per_round": k}, "uniform")
    s_native, s_tff = native.initial_state(), ours.initial_state()
    rng = np.random.default_rng(0)
    clips = []
    for _ in range(4):
        updates = _updates(rng, k, d)
        a, s_native, m_native = _round(native, s_native, updates)
        b, s_tff, m_tff = _round(ours, s_tff, updates)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
        assert b.dtype == np.float32 and b.shape == (d,)
        # TFF reports the clip of the next round; native the clip it used.
        assert m_tff["tff/dp_query_metrics/clip"] == pytest.approx(
            native.current_clip(s_native), rel=1e-6)
        clips.append(m_tff["tff/dp_query_metrics/clip"])
        assert m_tff["dp_event"] == m_native["dp_event"]
        assert all(isinstance(v, float) for key, v in m_tff.items() if key.startswith("tff/"))
    assert max(clips) / min(clips) > 1.05  # the clip really moved
    ours.close()


def test_dp_event_with_noise_is_the_native_event_and_checkpoints_resume_exactly():
    import dp_accounting

    from fedsim.interop.tff import TFFAggregator, TFFState
    from fedsim.privacy.queries import DPQueryAggregator

    d, k = 30, 10
    args = {"noise_multiplier": 0.5, "clients_per_round": k}
    ours = TFFAggregator(ADAPTIVE, args, "uniform")
    native = DPQueryAggregator(DPConfig(mechanism="gaussian_adaptive", noise_multiplier=0.5), k)
    rng = np.random.default_rng(1)
    updates = [_updates(rng, k, d) for _ in range(3)]
    _, _, m_native = _round(native, native.initial_state(), updates[0])
    state = ours.initial_state()
    _, state, m = _round(ours, state, updates[0])
    event = m["dp_event"]
    assert isinstance(event, dp_accounting.ComposedDpEvent) and event == m_native["dp_event"]
    assert isinstance(state["tff"], TFFState)

    # Noise makes TFF rounds irreproducible, so check the resumed state, not results:
    # a fresh aggregator restored from a checkpoint continues the same state.
    restored_agg = TFFAggregator(ADAPTIVE, args, "uniform")
    restored = _server_checkpoint(restored_agg, state)
    assert restored["tff"].leaves == state["tff"].leaves
    _, after, m2 = _round(restored_agg, restored, updates[1])
    assert m2["tff/dp_query_metrics/clip"] != pytest.approx(m["tff/dp_query_metrics/clip"])
    assert len(after["tff"].leaves) == len(state["tff"].leaves)
    restored_agg.close()
    ours.close()


def test_weighted_mean_factory_matches_fedavg_mean_and_resumes_from_checkpoint():
    from fedsim.aggregation.base import MeanAggregator
    from fedsim.interop.tff import TFFAggregator

    d = 20
    rng = np.random.default_rng(2)
    updates = [rng.normal(size=d).astype(np.float32) for _ in range(5)]
    weights = [3, 10, 1, 7, 25]
    ours = TFFAggregator(MEAN)
    state = ours.initial_state()
    a, _, _ = _round(MeanAggregator("num_examples"), {}, updates, weights)
    b, state, m = _round(ours, state, updates, weights)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert "dp_event" not in m and m["tff_nonfinite"] == 0
    uniform = TFFAggregator(MEAN, weighting="uniform")
    c, _, _ = _round(uniform, uniform.initial_state(), updates, weights)
    np.testing.assert_allclose(c, np.mean(updates, axis=0), rtol=1e-6, atol=1e-7)
    b2, _, _ = _round(ours, _server_checkpoint(ours, state), updates, weights)
    np.testing.assert_allclose(b2, b, rtol=0, atol=0)
    ours.close()


def test_flat_values_are_clipped_like_the_per_layer_structure():
    """TFF's DP clipping uses the global L2 norm over the whole structure, so one
    flat float32[d] value is clipped exactly like the model's list of tensors."""
    import tensorflow_federated as tff

    from fedsim.interop.tff import TFFAggregator

    factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(0.0, 4.0)
    shapes = [(3, 2), (4,), (2, 2, 2)]
    structured = factory.create(tff.to_type([tff.TensorType(np.float32, s) for s in shapes]))
    flat = TFFAggregator(ADAPTIVE, {"noise_multiplier": 0, "clients_per_round": 4}, "uniform")
    rng = np.random.default_rng(3)
    s_struct, s_flat = None, flat.initial_state()
    for _ in range(3):
        updates = _updates(rng, 4, 18)
        split = [[u[:6].reshape(3, 2), u[6:10], u[10:].reshape(2, 2, 2)] for u in updates]
        if s_struct is None:
            s_struct = flat._run(structured.initialize)
        out = flat._run(structured.next, s_struct, split)
        s_struct = out.state
        got, s_flat, m = _round(flat, s_flat, updates)
        want = np.concatenate([np.ravel(t) for t in out.result])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
        assert m["tff/dp_query_metrics/clip"] == pytest.approx(
            float(out.measurements["dp_query_metrics"]["clip"]), rel=1e-7)
    flat.close()


def test_laplace_example_factory_is_reproducible_noisy_and_reports_its_event(monkeypatch):
    import dp_accounting

    from fedsim.interop.tff import TFFAggregator

    monkeypatch.syspath_prepend(str(ROOT))
    d, k, clip, eps = 20000, 4, 1.0, 2.0
    args = {"l1_norm_clip": clip, "epsilon": eps, "clients_per_round": k, "seed": 7}
    updates = [np.zeros(d, np.float32) for _ in range(k - 1)] + [np.full(d, 1.0, np.float32)]
    one, two = TFFAggregator(LAPLACE, args), TFFAggregator(LAPLACE, args)
    s1, s2 = one.initial_state(), two.initial_state()
    r1, s1, m1 = _round(one, s1, updates)
    r2, s2, _ = _round(two, s2, updates)
    np.testing.assert_array_equal(r1, r2)  # the seed lives in the process state
    assert m1["dp_event"] == dp_accounting.LaplaceDpEvent(1.0 / eps)
    assert m1["tff/clipped_count"] == 1.0
    # The clipped client adds clip/d per coordinate; the noise has std sqrt(2) b / k.
    noise = r1 * k - clip / d
    assert noise.mean() == pytest.approx(0.0, abs=5 * math.sqrt(2) * clip / eps / math.sqrt(d))
    assert noise.std() == pytest.approx(math.sqrt(2) * clip / eps, rel=0.05)
    r1b, _, _ = _round(one, s1, updates)
    r2b, _, _ = _round(two, _server_checkpoint(two, s2), updates)
    assert not np.allclose(r1b, r1)  # fresh noise every round
    np.testing.assert_array_equal(r1b, r2b)  # and the same after a checkpoint
    one.close()
    two.close()


@pytest.mark.parametrize("factory,args,option,fragment", [
    ("no_such_module_xyz:Factory", {}, "aggregator.factory", "importable module"),
    ("tensorflow_federated.aggregators:NoSuchFactory", {}, "aggregator.factory",
     "'NoSuchFactory' not found"),
    ("fedsim.errors:FedsimError", {}, "aggregator.factory", "returned a fedsim.errors"),
    (ADAPTIVE, {"noise_multiplier": -1.0, "clients_per_round": 5}, "aggregator.args",
     "must be nonnegative"),
    (ADAPTIVE, {"clients_per_round": 5, "no_such_arg": 1}, "aggregator.args", "no_such_arg"),
])
def test_bad_factories_are_config_errors_naming_the_option(factory, args, option, fragment):
    from fedsim.interop.tff import TFFAggregator

    with pytest.raises(ConfigError) as err:
        TFFAggregator(factory, args).initial_state()
    assert err.value.option == option and fragment in str(err.value)


def test_secure_aggregation_and_native_dp_are_refused_with_tff_aggregators():
    with pytest.raises(ConfigError, match="secagg.protocol"):
        small_config(secagg=SecAggConfig(protocol="secagg_plus"),
                     server=ServerConfig(weighting="uniform"),
                     aggregator=AggregatorConfig(kind="tff", factory=MEAN))
    with pytest.raises(ConfigError, match="dp.mechanism=gaussian: allowed is none"):
        small_config(dp=DPConfig(mechanism="gaussian"), server=ServerConfig(weighting="uniform"),
                     aggregator=AggregatorConfig(kind="tff", factory=MEAN))


def test_close_stops_the_worker_binary_and_a_later_round_restarts_it():
    from fedsim.interop.tff import TFFAggregator

    agg = TFFAggregator(MEAN)
    rng = np.random.default_rng(4)
    updates = [rng.normal(size=5).astype(np.float32) for _ in range(3)]
    a, state, _ = _round(agg, agg.initial_state(), updates)
    first = set(agg._pids)
    assert first and first <= _live_worker_binaries()
    agg.close()
    assert not first & _live_worker_binaries()
    b, _, _ = _round(agg, state, updates)
    np.testing.assert_array_equal(a, b)
    second = set(agg._pids)
    assert second and not second & first
    agg.close()
    assert not second & _live_worker_binaries()


def test_close_returns_when_the_worker_binary_ignores_sigint():
    """A binary started while SIGINT is ignored (as in a background job of a
    non-interactive shell; it inherits the disposition) ignores TFF's SIGINT, and
    TFF's service manager waits for it without a timeout: close() must still
    return, with the binary stopped."""
    import signal
    import threading

    from fedsim.interop.tff import TFFAggregator, stop_tff_worker_binaries

    agg = TFFAggregator(MEAN)
    updates = [np.full(4, float(i), np.float32) for i in range(3)]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _round(agg, agg.initial_state(), updates)
    finally:
        signal.signal(signal.SIGINT, previous)
    started = set(agg._pids)
    assert started and started <= _live_worker_binaries()
    closing = threading.Thread(target=agg.close, daemon=True)
    closing.start()
    closing.join(timeout=60)
    hung = closing.is_alive()
    if hung:  # unblock TFF's wait, so that the rest of the module can run
        stop_tff_worker_binaries(pids=started)
        closing.join(timeout=30)
    assert not hung, "close() hung on a worker_binary that ignores SIGINT"
    assert not started & _live_worker_binaries()


# ----------------------------------------------------------------------------- data


def _class_images(rng, labels):
    """28x28 'pixels' whose mean brightness band depends on the label (learnable)."""
    base = rng.random((len(labels), 28, 28)).astype(np.float32) * 0.2
    for i, y in enumerate(labels):
        base[i, 2 * y:2 * y + 3, :] += 0.8
    return base


@pytest.fixture(scope="module")
def sql_file(tmp_path_factory):
    """A SqlClientData file written by TFF: 12 training clients, 3 test clients."""
    import tensorflow as tf
    import tensorflow_federated as tff

    rng = np.random.default_rng(0)
    data = {}
    for i in range(15):
        labels = rng.integers(0, 10, size=int(rng.integers(8, 16)))
        data[f"client_{i:02d}"] = {"pixels": _class_images(rng, labels),
                                   "label": labels.astype(np.int64)}
    splits = {c: ("test" if i >= 12 else "train") for i, c in enumerate(sorted(data))}
    path = tmp_path_factory.mktemp("tffdata") / "clients.sqlite"
    tff.simulation.datasets.save_to_sql_client_data(
        sorted(data), lambda c: tf.data.Dataset.from_tensor_slices(data[c]), str(path),
        split_names_by_client_id=splits)
    return path, data


def test_sql_client_data_is_lazy_small_and_decodes_like_tff(sql_file):
    import tensorflow_federated as tff

    from fedsim.data.loaders import load_federated_data
    from fedsim.data.tff import SqlTFFClientData

    path, data = sql_file
    cfg = DataConfig(name="tff_client_data", path=str(path), x_shape=[28, 28, 1],
                     test_split="test")
    fd = load_federated_data(cfg, clients=10, seed=0)
    assert isinstance(fd.train, SqlTFFClientData) and fd.train.num_clients == 10
    assert fd.input_shape == (28, 28, 1) and fd.num_classes == 10
    assert len(pickle.dumps(fd.train)) < 2000  # path and ids, no examples
    ids = sorted(data)[:10]
    for cid in (0, 9):
        x, y = fd.train.client(cid)
        assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape[1:] == (28, 28, 1)
        np.testing.assert_array_equal(x[..., 0], data[ids[cid]]["pixels"])
        np.testing.assert_array_equal(y, data[ids[cid]]["label"])
    # the test split: the 3 test clients (other ids than the training ones)
    assert len(fd.y_test) == sum(len(data[c]["label"]) for c in sorted(data)[12:])
    # TFF's own parser of the file agrees with ours
    import tensorflow as tf

    parsed = tff.simulation.datasets.load_and_parse_sql_client_data(
        str(path), {"pixels": tf.TensorSpec([28, 28], tf.float32),
                    "label": tf.TensorSpec([], tf.int64)}, split_name="train")
    assert sorted(parsed.client_ids)[:10] == list(fd.train.client_ids)
    elements = list(parsed.create_tf_dataset_for_client(ids[3]).as_numpy_iterator())
    x, y = fd.train.client(3)
    np.testing.assert_array_equal(x[..., 0], np.stack([e["pixels"] for e in elements]))
    np.testing.assert_array_equal(y, [e["label"] for e in elements])
    with pytest.raises(ConfigError, match="clients=13"):
        load_federated_data(cfg, clients=13, seed=0)


def test_emnist_from_tffs_cache_layout_tests_on_the_same_writers(tmp_path):
    """A miniature emnist_all.sqlite (TFF's splits digits_only_train/_test, every
    writer in both), found in the cache directory as TFF's load_data would."""
    import sqlite3

    import tensorflow as tf
    import tensorflow_federated as tff

    from fedsim.data.loaders import load_federated_data
    from fedsim.data.tff import TFF_CACHE_DIR, tff_cache_file

    rng = np.random.default_rng(6)
    parts = {}
    for split in ("digits_only_train", "digits_only_test"):
        data = {}
        for w in ("f0000_14", "f0001_41", "f0002_01"):
            labels = rng.integers(0, 10, size=4 if split.endswith("test") else 6)
            data[w] = {"pixels": _class_images(rng, labels), "label": labels.astype(np.int64)}
        path = tmp_path / f"{split}.sqlite"
        tff.simulation.datasets.save_to_sql_client_data(
            sorted(data), lambda c, d=data: tf.data.Dataset.from_tensor_slices(d[c]), str(path),
            split_names_by_client_id={w: split for w in data})
        parts[split] = path
    cache = tmp_path / "cache"
    cache.mkdir()
    parts["digits_only_train"].rename(cache / "emnist_all.sqlite")
    with sqlite3.connect(cache / "emnist_all.sqlite") as con:
        con.execute("ATTACH ? AS t", (str(parts["digits_only_test"]),))
        con.execute("INSERT INTO examples SELECT * FROM t.examples")
        con.execute("INSERT INTO client_metadata SELECT * FROM t.client_metadata")
    assert tff_cache_file("emnist_only_digits") == TFF_CACHE_DIR.expanduser() / "emnist_all.sqlite"
    fd = load_federated_data(DataConfig(name="tff_client_data", tff_dataset="emnist_only_digits",
                                        path=str(cache)), clients=2, seed=0)
    assert fd.train.client_ids == ("f0000_14", "f0001_41") and fd.num_classes == 10
    assert fd.input_shape == (28, 28, 1) and len(fd.y_test) == 8  # those 2 writers' test rows
    x, y = fd.train.client(1)
    assert x.shape == (6, 28, 28, 1) and y.dtype == np.int32


def test_missing_tff_cache_file_names_the_expected_file(tmp_path):
    from fedsim.data.loaders import load_federated_data

    cfg = DataConfig(name="tff_client_data", tff_dataset="emnist_only_digits",
                     path=str(tmp_path))
    with pytest.raises(DataError) as err:
        load_federated_data(cfg, clients=5, seed=0)
    msg = str(err.value)
    assert str(tmp_path / "emnist_all.sqlite") in msg and "nothing is downloaded" in msg.lower()
    with pytest.raises(DataError, match="file not found"):
        load_federated_data(DataConfig(name="tff_client_data", path=str(tmp_path / "x.sqlite")),
                            clients=5, seed=0)
    with pytest.raises(ConfigError, match="data.tff_dataset"):
        DataConfig(name="tff_client_data", tff_dataset="gldv2")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(DataError, match="malformed file"):
        load_federated_data(DataConfig(name="tff_client_data", path=str(junk)), 5, 0)


def test_wrong_feature_names_are_data_errors(sql_file):
    from fedsim.data.loaders import load_federated_data

    cfg = DataConfig(name="tff_client_data", path=str(sql_file[0]), x_key="image",
                     test_split="test")
    with pytest.raises(DataError, match="data.x_key='image'.*pixels"):
        load_federated_data(cfg, clients=3, seed=0)


def test_test_client_data_object_with_held_out_clients():
    import tensorflow_federated as tff

    from fedsim.data.tff import ObjectTFFClientData, load_tff_client_data

    rng = np.random.default_rng(5)
    arrays = {}
    for i in range(6):
        labels = rng.integers(0, 3, size=5)
        arrays[f"c{i}"] = {"pixels": _class_images(rng, labels), "label": labels.astype(np.int32)}
    cd = tff.simulation.datasets.TestClientData(arrays)
    fd = load_tff_client_data(cd, clients=4, test_fraction=0.3, seed=1)
    assert isinstance(fd.train, ObjectTFFClientData)
    assert fd.input_shape == (28, 28, 1) and fd.num_classes == 3 and fd.train.num_clients == 4
    held = set(arrays) - set(fd.train.client_ids)
    assert len(held) == 2 and len(fd.y_test) == 10  # 2 held-out clients of 5 examples
    x, y = pickle.loads(pickle.dumps(fd.train)).client(1)
    want = arrays[fd.train.client_ids[1]]
    np.testing.assert_array_equal(x[..., 0], want["pixels"])
    np.testing.assert_array_equal(y, want["label"])
    with pytest.raises(ConfigError, match="clients=5"):
        load_tff_client_data(cd, clients=5, test_fraction=0.3)
    # A preprocess-ed ClientData (as TFF's load_data returns) with its test ClientData;
    # Ray ships it with cloudpickle.
    import cloudpickle

    doubled = cd.preprocess(lambda ds: ds.map(lambda e: {**e, "pixels": 2.0 * e["pixels"]}))
    fd2 = load_tff_client_data(doubled, clients=3, test_data=cd)
    assert len(fd2.y_test) == 15  # the test ClientData's clients c0..c2
    x2, _ = cloudpickle.loads(cloudpickle.dumps(fd2.train)).client(2)
    np.testing.assert_allclose(x2[..., 0], 2.0 * arrays["c2"]["pixels"])


# ----------------------------------------------------------------------------- simulation


def _wait_gone(before, timeout=20.0):
    """worker_binary processes not in ``before`` still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while _live_worker_binaries() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    return _live_worker_binaries() - before


def test_simulation_on_tff_client_data_native_and_tff_aggregation_agree(warm_actors, sql_file):
    """End to end on a TFF SqlClientData file: native dp=gaussian_adaptive and the same
    mechanism as TFF's DifferentiallyPrivateFactory (noise off) give the same model."""
    from fedsim.simulation import run_simulation

    path, _ = sql_file
    data = DataConfig(name="tff_client_data", path=str(path), x_shape=[28, 28, 1],
                      test_split="test")
    dp = DPConfig(mechanism="gaussian_adaptive", noise_multiplier=0.0)
    common = dict(clients=12, clients_per_round=4, rounds=3, data=data, dp=dp,
                  server=ServerConfig(weighting="uniform"), model=ModelConfig(name="logreg"),
                  ray=RayConfig(workers=1))  # merging across workers: unit tests above
    before = _live_worker_binaries()
    native = run_simulation(small_config(**common), actors=warm_actors)
    # The TFF factory is the whole aggregator, its DP included (fedsim's dp is none).
    tff_cfg = small_config(**(common | {"dp": DPConfig()}), aggregator=AggregatorConfig(
        kind="tff", factory=ADAPTIVE, args={"noise_multiplier": 0, "clients_per_round": 4}))
    via_tff = run_simulation(tff_cfg, actors=warm_actors)
    np.testing.assert_allclose(via_tff.weights, native.weights, rtol=1e-4, atol=1e-6)
    for a, b in zip(native.metrics, via_tff.metrics):
        assert b["tff/dp_query_metrics/clip"] > 0 and a["clip"] > 0
        assert b["epsilon"] == a["epsilon"]  # the same (noiseless) DpEvents were accounted
    assert native.summary["data"]["input_shape"] == [28, 28, 1]
    assert native.summary["data"]["num_classes"] == 10
    assert native.metrics[-1]["eval_accuracy"] > 0.2  # chance is 0.1
    for name, res in (("native", native), ("tff", via_tff)):
        print(f"\n{name}: setup {res.summary['setup_seconds']:.1f} s, wall "
              f"{res.summary['wall_seconds']:.1f} s, round_seconds",
              [round(r["round_seconds"], 3) for r in res.metrics])
    # The simulation closed the server's TFF aggregator: no worker_binary outlives it.
    assert _wait_gone(before) == set()
