"""The pretraining corpus: its sources and exclusions, KernelSynth, TSMixup windows, quantile tables."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.data.kernel_synth import gp_sample, kernel_synth
from moekit.data.ts_corpus import ETT_NAMES, Corpus, CorpusMixture, build_corpus, normalise
from moekit.errors import DataError
from moekit.models.forecast_quantiles import QuantileTable, calibrate

pytest.importorskip("sktime")
pytest.importorskip("statsmodels")
NO_ETT = list(ETT_NAMES)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(None, NO_ETT, seed=3, synthetic=3, synthetic_length=128)


def test_the_corpus_holds_packaged_series_with_their_licences_and_leaves_out_what_is_excluded(corpus):
    datasets = {n.split("/")[0] for n in corpus.names}
    assert {"Airline", "Lynx", "co2", "sunspots", "ACSF1"} <= datasets
    assert not datasets & set(ETT_NAMES)
    assert all("BSD-3-Clause" in corpus.sources[d] for d in datasets)
    airline = corpus.series[corpus.names.index("Airline/Passengers")]
    assert airline.size == 144 and airline[0] == 112  # Box & Jenkins' airline passengers start at 112
    fewer = build_corpus(None, NO_ETT + ["Airline", "co2"], seed=3, synthetic=0)
    assert not {n.split("/")[0] for n in fewer.names} & {"Airline", "co2"}


def test_an_unknown_dataset_to_exclude_is_named_with_the_known_ones():
    with pytest.raises(DataError, match=r"--exclude ETTx9: unknown dataset.*Airline"):
        build_corpus(None, ["ETTx9"])
    with pytest.raises(DataError, match="--data-dir"):
        build_corpus(None, [])


def test_a_corpus_survives_its_npz_file(corpus, tmp_path):
    back = Corpus.load(corpus.save(tmp_path / "c.npz"))
    assert back.names == corpus.names and back.sources == corpus.sources
    assert all(np.array_equal(a, b) for a, b in zip(back.series + back.synthetic, corpus.series + corpus.synthetic))


def test_kernel_synth_is_a_function_of_its_seed_and_a_periodic_kernel_gives_a_periodic_series():
    from sklearn.gaussian_process.kernels import ExpSineSquared

    a, b = kernel_synth(4, 96, seed=1), kernel_synth(4, 96, seed=1)
    assert len(a) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], kernel_synth(1, 96, seed=2)[0])
    x = np.linspace(0.0, 1.0, 240)[:, None]
    period = 24 / 239  # 24 steps on the [0, 1] grid of 240 points
    s = gp_sample(ExpSineSquared(length_scale=1.0, periodicity=period), x, np.random.default_rng(0))
    assert np.abs(s[24:] - s[:-24]).max() < 1e-2 * np.abs(s).max()  # a sample of a periodic GP repeats


def test_training_windows_are_a_function_of_the_step_and_short_series_are_masked(corpus):
    mix = CorpusMixture(corpus, 129, seed=0)
    x1, m1 = mix.batch(7, 32)
    x2, m2 = mix.batch(7, 32)
    assert np.array_equal(x1, x2) and np.array_equal(m1, m2)
    assert not np.array_equal(x1, mix.batch(8, 32)[0])
    hand = Corpus(series=[np.arange(50, dtype=np.float32) ** 1.5, np.sin(np.arange(1000, dtype=np.float32))],
                  names=["short/a", "long/b"])
    x1, m1 = CorpusMixture(hand, 129, seed=0, weights=(1.0, 0.0, 0.0)).batch(0, 32)
    short = m1.sum(axis=1) < 129
    assert short.any() and np.all(m1[short].sum(axis=1) == 50)  # the 50-point series is padded, not dropped
    for row, mask in zip(x1, m1):
        valid = row[mask > 0]
        assert abs(valid.mean()) < 1e-4 and abs(valid.std() - 1) < 1e-3  # normalised over the valid points
        assert np.all(row[mask == 0] == 0)
        assert np.all(mask[: int(mask.sum())] == 1)  # right-padded: causal attention never sees padding


def test_normalise_matches_a_hand_computation():
    x = np.array([[1.0, 2.0, 3.0, 99.0]])
    mask = np.array([[1.0, 1.0, 1.0, 0.0]])
    expected = np.array([[-1.0, 0.0, 1.0, 0.0]]) * np.sqrt(3 / 2)  # mean 2, population std sqrt(2/3)
    assert np.allclose(normalise(x, mask), expected, atol=1e-6)


class _Zero:
    """A forecaster that always says 0: residuals are the targets themselves."""

    def predict(self, context, horizon):
        import torch

        return torch.zeros(context.shape[0], horizon)


def test_calibrated_quantiles_match_hand_quantiles_and_scale_with_the_context():
    n, h = 101, 40
    r = np.linspace(-1.0, 1.0, n)[:, None].repeat(h, axis=1)  # residuals spread evenly on [-1, 1] at every lead
    contexts = np.tile(np.array([-2.0, 2.0]), (n, 8))  # population std 2
    table = calibrate(_Zero(), contexts, 2.0 * r)
    assert np.allclose(table.offsets, [[-0.8] * len(table.knots), [0.0] * len(table.knots), [0.8] * len(table.knots)])
    q = table.apply(np.full((1, 3), 10.0), np.array([5.0]))
    assert np.allclose(q[0, :, 0], 10 - 0.8 * 5) and np.allclose(q[0, :, 2], 10 + 0.8 * 5)


def test_quantile_offsets_interpolate_linearly_between_lead_knots():
    table = QuantileTable([0.1, 0.9], [1, 5], [[-1.0, -3.0], [1.0, 5.0]])
    assert np.allclose(table.offsets_QH(7), [[-1, -1.5, -2, -2.5, -3, -3, -3], [1, 2, 3, 4, 5, 5, 5]])


def test_intervals_calibrated_on_one_sample_cover_80_percent_of_a_fresh_one():
    rng = np.random.default_rng(0)

    def draw(n):
        scale = rng.uniform(0.5, 3.0, size=n)
        contexts = rng.standard_normal((n, 64)) * scale[:, None]
        return contexts, rng.standard_normal((n, 24)) * contexts.std(axis=1)[:, None] * 0.7

    table = calibrate(_Zero(), *draw(4000))
    contexts, targets = draw(4000)
    q = table.apply(np.zeros_like(targets), contexts.std(axis=1))
    covered = ((targets >= q[..., 0]) & (targets <= q[..., 2])).mean()
    assert 0.78 < covered < 0.82
