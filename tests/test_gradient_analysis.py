"""optim4rl.analysis.gradients, the identity experiment and the gradient plots on synthetic data."""

import json
import zipfile

import numpy as np
import pytest
import scipy.stats

from optim4rl.analysis import gradients, plots
from optim4rl.errors import Optim4RLError


def heavy_tailed(rng, shape, low_decade=-7.0, high_decade=0.0):
    """Student-t noise times a per-coordinate scale log-uniform over several decades."""
    scale = 10.0 ** rng.uniform(low_decade, high_decade, size=shape[-1])
    return rng.standard_t(3, size=shape) * scale


def test_log_magnitude_and_histograms_count_correctly():
    g = np.array([-1.0, 0.0, 1e-3, 2e-3, 0.5, np.nan])
    np.testing.assert_allclose(gradients.log_magnitude([0.0, -1.0]), [-8.0, np.log10(1 + 1e-8)])
    counts, edges = gradients.histogram(g, bins=[-1.0, 0.0, 0.1, 1.0])
    np.testing.assert_array_equal(counts, [1, 3, 1])  # NaN dropped; right edge closed
    counts, edges = gradients.histogram(g, bins=4)
    assert counts.sum() == 5 and edges[0] == -1.0 and edges[-1] == 0.5
    counts, edges = gradients.log_histogram(g, bins=[-9.0, -7.0, -2.5, -1.0, 1.0])
    np.testing.assert_array_equal(counts, [1, 2, 0, 2])  # 0 -> -8; 1e-3, 2e-3 -> -3, -2.7
    rng = np.random.default_rng(0)
    big = rng.normal(size=(7, 300))
    assert gradients.log_histogram(big, bins=50)[0].sum() == big.size


def test_split_phases_is_ordered_and_complete():
    snapshots = np.arange(10 * 4).reshape(10, 4)
    phases = gradients.split_phases(snapshots, 3)
    assert list(phases) == ["early", "middle", "late"]
    assert [len(v) for v in phases.values()] == [4, 3, 3]
    np.testing.assert_array_equal(np.concatenate(list(phases.values())), snapshots)
    assert list(gradients.split_phases(snapshots, 5)) == [f"phase {k}" for k in range(1, 6)]
    with pytest.raises(ValueError, match="at least 3 snapshots"):
        gradients.split_phases(snapshots[:2], 3)


def test_drift_is_zero_for_identical_phases_and_grows_with_a_log_scale_shift():
    rng = np.random.default_rng(1)
    base = heavy_tailed(rng, (20, 500))
    same = gradients.drift(base, base.copy())
    assert same.wasserstein == pytest.approx(0.0, abs=1e-12) and same.ks_statistic == 0.0
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0]  # decades
    distances = [gradients.drift(base, base * 10.0**s).wasserstein for s in shifts]
    ks = [gradients.drift(base, base * 10.0**s).ks_statistic for s in shifts]
    assert np.all(np.diff(distances) > 0) and np.all(np.diff(ks) > 0)
    # Far from the eps floor a pure scale shift moves log10|g| by exactly `s` decades.
    clean = 10.0 ** rng.uniform(-3, 0, size=5000)
    assert gradients.drift(clean, clean * 10.0).wasserstein == pytest.approx(1.0, rel=1e-6)
    expected_ks = scipy.stats.ks_2samp(np.log10(clean + 1e-8), np.log10(clean * 3 + 1e-8))
    assert gradients.drift(clean, clean * 3).ks_statistic == pytest.approx(expected_ks.statistic)


def test_drift_matrix_is_symmetric_and_tracks_non_stationarity():
    rng = np.random.default_rng(2)
    stationary = heavy_tailed(rng, (30, 400))
    drifting = stationary * (10.0 ** np.linspace(0.0, -3.0, 30))[:, None]  # shrinks over training
    calm = gradients.drift_matrix(gradients.split_phases(stationary))
    moving = gradients.drift_matrix(gradients.split_phases(drifting))
    for matrix in (calm, moving):
        np.testing.assert_allclose(matrix, matrix.T)
        np.testing.assert_array_equal(np.diag(matrix), 0.0)
    assert moving[0, 2] > moving[0, 1] > calm.max()
    ks = gradients.drift_matrix(list(gradients.split_phases(drifting).values()), metric="ks")
    assert 0.0 < ks[0, 2] <= 1.0


def test_summary_stats_measure_orders_of_magnitude():
    g = np.concatenate([np.full(50, 1e-7), np.full(50, 1e-1), [0.0, np.inf]])
    summary = gradients.summary_stats(g)
    assert summary.n == 101 and summary.n_nonfinite == 1
    assert summary.fraction_zero == pytest.approx(1 / 101)
    assert summary.fraction_below_1e6 == pytest.approx(51 / 101)
    assert summary.log10_p99 == pytest.approx(np.log10(0.1 + 1e-8))
    assert summary.orders_of_magnitude > 5.5
    narrow = gradients.summary_stats(np.random.default_rng(0).normal(1.0, 0.01, size=1000))
    assert narrow.orders_of_magnitude < 0.1 and abs(narrow.excess_kurtosis) < 0.5


def make_record(rng, with_updates=True):
    grads = heavy_tailed(rng, (6, 50)).astype(np.float32)
    return gradients.GradientRecord(
        grads=grads,
        steps=np.arange(6) * 100,
        layer_ids=np.repeat([0, 1], [40, 10]),
        layer_names=("params/Dense_0/kernel", "params/Dense_0/bias"),
        updates=-1e-3 * np.sign(grads) if with_updates else None,
        metadata={"env": "big_dense_long", "agent": "a2c", "optimizer": "adam", "seed": 3},
    )


def test_gradient_record_round_trip(tmp_path):
    record = make_record(np.random.default_rng(3))
    path = gradients.save_gradient_record(tmp_path / "sub" / "grads", record)
    assert path.name == "grads.npz" and path.exists()
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary left behind
    with np.load(path, allow_pickle=False) as data:  # readable without pickles
        assert json.loads(str(data["metadata"]))["optimizer"] == "adam"
        assert data["grads"].shape == (6, 50)
    with zipfile.ZipFile(path) as archive:  # compressed
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in archive.infolist())
    loaded = gradients.load_gradient_record(path)
    np.testing.assert_array_equal(loaded.grads, record.grads)
    np.testing.assert_array_equal(loaded.updates, record.updates)
    np.testing.assert_array_equal(loaded.steps, record.steps)
    np.testing.assert_array_equal(loaded.layer_ids, record.layer_ids)
    assert loaded.layer_names == record.layer_names
    assert loaded.metadata == record.metadata
    assert loaded.grads.dtype == np.float32
    assert loaded.layer("params/Dense_0/bias").shape == (6, 10)
    bare = gradients.save_gradient_record(
        tmp_path / "bare.npz",
        {"grads": record.grads, "steps": record.steps, "layer_ids": np.zeros(50, int)},
    )
    assert gradients.load_gradient_record(bare).updates is None


def test_gradient_record_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        gradients.GradientRecord(grads=np.zeros((3, 4)), steps=np.arange(2), layer_ids=np.zeros(4))
    with pytest.raises(ValueError, match="JSON"):
        gradients.GradientRecord(np.zeros((1, 1)), [0], [0], metadata={"x": object()})
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(Optim4RLError, match="unreadable"):
        gradients.load_gradient_record(corrupt)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(Optim4RLError, match="not a gradient record"):
        gradients.load_gradient_record(foreign)
    with pytest.raises(Optim4RLError, match="no such"):
        gradients.load_gradient_record(tmp_path / "missing.npz")


def test_flatten_tree_gives_record_rows():
    tree = {"params": {"Dense_0": {"bias": np.ones(3), "kernel": np.full((2, 3), 2.0)}}}
    values, layer_ids, names = gradients.flatten_tree(tree)
    assert names == ("params/Dense_0/bias", "params/Dense_0/kernel")
    np.testing.assert_array_equal(values, [1, 1, 1, 2, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(layer_ids, [0, 0, 0, 1, 1, 1, 1, 1, 1])


def test_identity_experiment_processing_beats_raw_inputs():
    from optim4rl.analysis.identity import identity_experiment

    rng = np.random.default_rng(0)
    grads = heavy_tailed(rng, (10, 200), -6.0, 0.0)  # 10 snapshots of 200 coordinates
    result = identity_experiment(grads, steps=400, seed=0, batch_size=64)
    assert 0.0 <= result["raw"] <= 1.0 and 0.0 <= result["processed"] <= 1.0
    assert result["processed"] > result["raw"] + 0.2
    assert result["processed_train_accuracy"].shape == (400,)
    assert result["n_test_windows"] == 40 * 2 and result["seq_len"] == 5
    with pytest.raises(ValueError, match="loss"):
        identity_experiment(grads, steps=1, loss="huber")
    with pytest.raises(ValueError, match="snapshot, coord"):
        identity_experiment(np.zeros((2, 3, 4)))


def test_gradient_plots_write_files(tmp_path):
    rng = np.random.default_rng(4)
    rl = heavy_tailed(rng, (9, 300)) * (10.0 ** np.linspace(0, -2, 9))[:, None]
    supervised = rng.normal(0.0, 1e-2, size=(9, 300))
    sources = {"A2C big_dense_long": rl, "digits classifier": supervised}
    (png,) = plots.plot_gradient_histograms(sources, tmp_path / "hist.png", title="RL vs SL")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    sources["record"] = make_record(rng)  # a GradientRecord works as a source too
    (png,) = plots.plot_drift(sources, tmp_path / "drift.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
