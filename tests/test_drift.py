"""Drift statistics against independent references (numpy, scipy) on the same data."""

import itertools

import numpy as np
import orjson
import pytest
import scipy.spatial.distance
import scipy.stats
from hypothesis import given, settings, strategies as st

from tidegate.config import DriftConfig
from tidegate.drift import (
    EPOCH_SECONDS,
    DriftMonitor,
    FeatureMap,
    Profile,
    binned_ks,
    chi2_sf,
    js_distance,
    psi,
    smoothed,
)
from tidegate.protocol import DATATYPES, TensorSpec

FP32 = DATATYPES["FP32"]


def _spec(name: str, columns: int, datatype: str = "FP32") -> TensorSpec:
    return TensorSpec(name, DATATYPES[datatype], (-1, columns))


def _monitor(reference: np.ndarray, config: DriftConfig | None = None, now: float = 0.0):
    """A monitor of one FP32 input `x` (no outputs), its reference set from `reference`."""
    spec = _spec("x", reference.shape[1])
    inputs = FeatureMap.for_tensors((spec,), {"x": reference})
    monitor = DriftMonitor(config or DriftConfig(), inputs, FeatureMap((), ()), (), now)
    monitor.set_reference({"x": reference}, {}, "reference.npz")
    return monitor


@pytest.mark.parametrize("dof", [1, 2, 3, 7, 15, 16, 31, 40])
def test_chi2_tail_matches_scipy(dof):
    for x in [0.0, 0.01, 0.5, 1.0, dof / 2, dof, 2 * dof, 5 * dof + 10, 300.0]:
        assert chi2_sf(x, dof) == pytest.approx(scipy.stats.chi2.sf(x, dof), rel=1e-9, abs=1e-300)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 40), st.integers(0, 2**32 - 1))
def test_psi_js_ks_match_numpy_and_scipy(bins, seed):
    rng = np.random.default_rng(seed)
    ref_counts = rng.integers(0, 500, size=(3, bins))
    counts = rng.integers(0, 500, size=(3, bins))
    p = smoothed(ref_counts, ref_counts.sum(axis=1))
    q = smoothed(counts, counts.sum(axis=1))
    for f in range(3):
        pf = (ref_counts[f] + 0.5) / (ref_counts[f].sum() + bins / 2)
        qf = (counts[f] + 0.5) / (counts[f].sum() + bins / 2)
        np.testing.assert_allclose(p[f], pf)
        assert psi(p, q)[f] == pytest.approx(np.sum((qf - pf) * np.log(qf / pf)), rel=1e-12)
        assert js_distance(p, q)[f] == pytest.approx(
            scipy.spatial.distance.jensenshannon(pf, qf, base=2), rel=1e-9, abs=1e-12
        )
        assert binned_ks(p, q)[f] == pytest.approx(np.abs(np.cumsum(qf) - np.cumsum(pf)).max())


def test_binned_ks_approaches_ks_2samp_on_large_samples():
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(100_000, 1))
    shifted = rng.normal(0.1, 1.2, size=(100_000, 1))
    monitor = _monitor(reference, DriftConfig(bins=200))
    monitor.observe({"x": shifted}, {}, 0.0)
    (row,) = monitor.report(0.0)["inputs"]
    exact = scipy.stats.ks_2samp(reference[:, 0], shifted[:, 0]).statistic
    assert row["ks"] <= exact + 0.002  # binned: a lower bound, up to the smoothing
    assert row["ks"] == pytest.approx(exact, abs=0.01)


def _window_arrays(monitor: DriftMonitor) -> dict:
    return {key: w.to_arrays() for key, w in monitor.windows().items()}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(0, 300), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_merge_equals_one_update_with_both_batches(rows_a, rows_b, features, seed):
    """Through JSON, as between workers: a monitor that saw nothing has no minimum or
    maximum (infinite), which JSON writes as null."""
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=(400, features)).astype(np.float32)
    a_rows = rng.normal(0.2, 1.1, size=(rows_a, features)).astype(np.float32)
    b_rows = rng.normal(size=(rows_b, features)).astype(np.float32)
    b_rows[rng.random(b_rows.shape) < 0.05] = np.nan
    a, b, both = _monitor(reference), _monitor(reference), _monitor(reference)
    a.observe({"x": a_rows}, {}, 1.0)
    both.observe({"x": a_rows}, {}, 1.0)
    if rows_b:
        b.observe({"x": b_rows}, {}, 1.0)
        both.observe({"x": b_rows}, {}, 1.0)
    a.merge_snapshot(orjson.loads(orjson.dumps(b.snapshot())))
    merged, direct = _window_arrays(a), _window_arrays(both)
    # The sums add the same terms in another order: exact to a few ulps of the terms
    # (about 1 each), not of a sum that cancels to near zero (s1 = 0.0104 off by 1e-14).
    atol = 1e-13 * (rows_a + rows_b)
    for name, arrays in direct["inputs"].items():
        np.testing.assert_allclose(
            merged["inputs"][name], arrays, rtol=1e-12, atol=atol, err_msg=name
        )


def test_snapshot_of_another_shape_is_refused():
    a = _monitor(np.zeros((50, 2), dtype=np.float32))
    b = _monitor(np.zeros((50, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="another shape"):
        a.merge_snapshot(b.snapshot())


def test_decay_is_monotone_and_driven_by_rows():
    rng = np.random.default_rng(1)
    monitor = _monitor(rng.normal(size=(1000, 2)), DriftConfig(half_life=1000))
    monitor.observe({"x": rng.normal(size=(1000, 2))}, {}, 0.0)  # the old batch
    old = float(monitor.windows()["inputs"].counts[0, :-1].sum())
    now, weights = 0.0, []
    for _ in range(6):  # each epoch: 500 new rows, all in the top bin
        now += EPOCH_SECONDS
        monitor.roll(now)
        weights.append(float(monitor.windows()["inputs"].counts[0, :-1].sum()))
        monitor.observe({"x": np.full((500, 2), 50.0)}, {}, now)
    # The old batch's weight: whole when its epoch closes, then halved every 1000 rows.
    np.testing.assert_allclose(weights, [old * 2 ** (-0.5 * k) for k in range(6)], rtol=1e-12)
    assert all(a > b for a, b in itertools.pairwise(weights))
    monitor.roll(now + EPOCH_SECONDS)  # closes the last epoch
    closed = float(monitor.windows()["inputs"].counts[0].sum())
    monitor.roll(now + 2 * EPOCH_SECONDS)  # an epoch without traffic decays nothing
    assert float(monitor.windows()["inputs"].counts[0].sum()) == closed


def test_reference_data_shows_no_drift_and_a_shift_is_named():
    rng = np.random.default_rng(2026)
    features = 5
    reference = rng.normal(size=(5000, features)).astype(np.float32)
    verdicts = []
    for _ in range(100):
        monitor = _monitor(reference)
        monitor.observe({"x": rng.normal(size=(100, features)).astype(np.float32)}, {}, 0.0)
        verdicts.append(monitor.report(0.0)["summary"]["verdict"])
    assert verdicts.count("drift") <= 5, verdicts  # >= 95 % of 100-row windows stay quiet

    long = _monitor(reference)
    long.observe({"x": rng.normal(size=(50_000, features)).astype(np.float32)}, {}, 0.0)
    assert long.report(0.0)["summary"]["verdict"] == "no_drift"

    shifted = rng.normal(size=(2000, features)).astype(np.float32)
    shifted[:, 2] += 0.5
    monitor = _monitor(reference)
    monitor.observe({"x": shifted}, {}, 0.0)
    report = monitor.report(0.0)
    assert report["summary"]["drifted"] == ["x[2]"]
    row = report["inputs"][2]
    assert row["mean_shift_sigma"] == pytest.approx(0.5, abs=0.08)
    assert row["psi"] >= 0.1
    assert row["p_value"] < 0.05 / features


def test_too_few_rows_are_insufficient_data():
    monitor = _monitor(np.random.default_rng(0).normal(size=(500, 2)))
    monitor.observe({"x": np.full((10, 2), 5.0)}, {}, 0.0)
    report = monitor.report(0.0)
    assert {row["verdict"] for row in report["inputs"]} == {"insufficient_data"}
    assert report["summary"]["verdict"] == "insufficient_data"
    assert report["inputs"][0]["out_of_range_rate"] == 1.0


def test_reference_from_the_first_rows_served():
    spec = _spec("x", 3)
    sample = {"x": np.zeros((1, 3), dtype=np.float32)}
    config = DriftConfig(reference_rows=200)
    monitor = DriftMonitor(
        config, FeatureMap.for_tensors((spec,), sample), FeatureMap((), ()), (), 0
    )
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(50, 3)).astype(np.float32) for _ in range(4)]
    for batch in batches[:3]:
        monitor.observe({"x": batch}, {}, 0.0)
    assert monitor.report(0.0) == {
        "state": "collecting_reference",
        "reference": {"source": "served", "rows": 150},
        "reference_rows_needed": 200,
    }
    monitor.observe({"x": batches[3]}, {}, 0.0)
    report = monitor.report(0.0)
    assert report["state"] == "ready"
    assert report["reference"] == {"source": "served", "rows": 200}
    # The same profile as from those 200 rows given as a reference at once.
    direct = DriftMonitor(
        config, FeatureMap.for_tensors((spec,), sample), FeatureMap((), ()), (), 0
    )
    direct.set_reference({"x": np.concatenate(batches)}, {}, "reference.npz")
    served, given = monitor.input_profile, direct.input_profile
    for part in ("edges", "lo", "hi", "mean", "std"):
        np.testing.assert_array_equal(getattr(served, part), getattr(given, part))


def test_a_closed_monitor_holds_no_served_batches():
    """An unloaded version's monitor lets go of the rows it collected for its reference
    and the batches waiting for the observer (onnxruntime's buffers, among them)."""
    spec = _spec("x", 3)
    batch = {"x": np.ones((50, 3), dtype=np.float32)}
    monitor = DriftMonitor(
        DriftConfig(reference_rows=200),
        FeatureMap.for_tensors((spec,), batch),
        FeatureMap((), ()),
        (),
        0,
    )
    monitor.observe(batch, {}, 0.0)
    assert monitor.pending.append([batch["x"]], capacity=8, max_bytes=1 << 20)
    monitor.close()
    assert len(monitor.pending) == 0
    assert monitor.report(0.0)["reference"] == {"source": "served", "rows": 0}


def test_feature_map_profiles_images_by_channel_and_text_by_length():
    image = TensorSpec("image", FP32, (-1, 3, 4, 4))
    text = TensorSpec("text", DATATYPES["BYTES"], (-1, 1))
    pixels = np.arange(2 * 3 * 16, dtype=np.float32).reshape(2, 3, 4, 4)
    words = np.array([["ab"], ["caf\u00e9"]], dtype=object)
    fmap = FeatureMap.for_tensors((image, text), {"image": pixels, "text": words})
    assert fmap.names == ("image[0]", "image[1]", "image[2]", "len(text)")
    matrix = fmap.extract({"image": pixels, "text": words})
    np.testing.assert_allclose(matrix[:, :3], pixels.mean(axis=(2, 3)))
    np.testing.assert_array_equal(matrix[:, 3], [2, 5])


def test_profile_bins_are_equal_mass_on_the_reference():
    rng = np.random.default_rng(4)
    profile = Profile.from_matrix(("a",), rng.normal(size=(1600, 1)), 16)
    np.testing.assert_array_equal(profile.reference.counts[0], np.full(16, 100))
