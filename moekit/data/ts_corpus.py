"""The forecaster's pretraining corpus: real series found on this machine, KernelSynth and TSMixup.

Holds `build_corpus` (every source below, reproducible from a seed, with the
datasets to leave out named), `Corpus` (the series, their names, sources and
licences; saved to and read from one .npz), `kernel_synth` (Chronos' KernelSynth:
Gaussian-process samples from random sums and products of kernels drawn from a
bank of periodic, trend, smooth, rational-quadratic and noise kernels, computed
with scikit-learn's kernels) and `CorpusMixture` (training windows, a pure
function of the step: real windows, TSMixup convex mixtures of real windows
(Chronos), and synthetic windows; short series are right-padded and masked).

Sources (nothing is downloaded at run time):
- the ETT files (`ETTh1`, `ETTh2`, `ETTm1` in `../shared/data/timeseries`; CC BY-ND 4.0),
  train splits only (the first 12 months), so the standard test splits stay unseen;
- the series sktime ships (BSD-3-Clause; `sktime/datasets/data`): Airline, Lynx,
  ShampooSales, Uschange, PBS, seatbelts, solar, yahoo, mitdb, and the long
  univariate series of its ACSF1 and PLAID panels;
- the series statsmodels ships (BSD-3-Clause; `statsmodels.datasets`): co2, sunspots,
  elnino, macrodata, nile.

Not here: the model and its training (`moekit.train.pretrain_forecaster`), reading
a user's CSV (`moekit.data.timeseries`).

Shape suffixes: B batch, W window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError

ETT_NAMES = ("ETTh1", "ETTh2", "ETTm1")
ETT_LICENCE = "CC BY-ND 4.0 (ETDataset, Zhou et al. 2021)"
MIN_POINTS = 32  # shorter series teach nothing at context 512 and are dropped
PACKAGED_CSVS = {  # sktime/datasets/data/<dir>/<file>: numeric columns are series
    "Airline": "Airline/Airline.csv", "Lynx": "Lynx/Lynx.csv", "ShampooSales": "ShampooSales/ShampooSales.csv",
    "Uschange": "Uschange/Uschange.csv", "PBS": "PBS_dataset/PBS_dataset.csv", "seatbelts": "seatbelts/seatbelts.csv",
    "solar": "solar/solar.csv", "yahoo": "yahoo/yahoo.csv", "mitdb": "mitdb/mitdb.csv",
}
PACKAGED_PANELS = {"ACSF1": "ACSF1/ACSF1_TRAIN.ts", "PLAID": "PLAID/PLAID_TRAIN.ts"}
STATSMODELS_SETS = ("co2", "sunspots", "elnino", "macrodata", "nile")


@dataclass
class Corpus:
    """Series (1-D float32 arrays of varying length) with their names and where they came from."""

    series: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # dataset -> source and licence
    synthetic: list[np.ndarray] = field(default_factory=list)

    def add(self, name: str, values: np.ndarray, source: str) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size >= MIN_POINTS and np.std(v) > 0:
            self.series.append(v.astype(np.float32))
            self.names.append(name)
            self.sources.setdefault(name.split("/")[0], source)

    @property
    def num_points(self) -> int:
        return int(sum(s.size for s in self.series) + sum(s.size for s in self.synthetic))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        arrays = {f"real_{i}": s for i, s in enumerate(self.series)}
        arrays.update({f"synth_{i}": s for i, s in enumerate(self.synthetic)})
        tmp = p.with_name(p.name + ".tmp.npz")
        np.savez_compressed(tmp, names=np.array(self.names), sources=np.array(list(self.sources.items())), **arrays)
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> Corpus:
        with np.load(path) as z:
            names = [str(n) for n in z["names"]]
            corpus = cls(series=[z[f"real_{i}"] for i in range(len(names))], names=names,
                         sources={str(k): str(v) for k, v in z["sources"]})
            n_synth = sum(1 for k in z.files if k.startswith("synth_"))
            corpus.synthetic = [z[f"synth_{i}"] for i in range(n_synth)]
        return corpus

    def summary(self) -> dict[str, int]:
        """Points per dataset (the part of a name before '/'), plus 'synthetic'."""
        out: dict[str, int] = {}
        for name, s in zip(self.names, self.series):
            out[name.split("/")[0]] = out.get(name.split("/")[0], 0) + int(s.size)
        out["synthetic"] = int(sum(s.size for s in self.synthetic))
        return out


# ---------------------------------------------------------------- real series


def add_ett(corpus: Corpus, shared_dir: Path, exclude: set[str]) -> None:
    """The train split (first 12 months) of every channel of each ETT file not excluded."""
    from .timeseries import prepare, read_csv

    for name in ETT_NAMES:
        if name in exclude:
            continue
        path = shared_dir / f"{name}.csv"
        if not path.is_file():
            raise DataError(f"{path} is missing: the corpus needs the ETT files in ../shared/data/timeseries "
                            f"(or leave {name} out with --exclude {name})")
        prepared = prepare(read_csv(path))
        train = prepared.series.values_TC[slice(*prepared.splits.get("train"))]
        for c, channel in enumerate(prepared.series.channels):
            corpus.add(f"{name}/{channel}", train[:, c], ETT_LICENCE)


def add_sktime(corpus: Corpus, exclude: set[str]) -> None:
    """Every numeric column of sktime's bundled CSVs, and the long series of two of its panels."""
    import pandas as pd

    try:
        import sktime
    except ImportError:
        raise DataError("the corpus reads the series sktime ships: pip install 'moekit[pretrain]'") from None
    root = Path(sktime.__file__).parent / "datasets" / "data"
    licence = "BSD-3-Clause (bundled with sktime)"
    for name, rel in PACKAGED_CSVS.items():
        if name in exclude or not (root / rel).is_file():
            continue
        frame = pd.read_csv(root / rel)
        for col in frame.columns:
            values = pd.to_numeric(frame[col], errors="coerce")
            if values.notna().mean() > 0.9 and not _looks_like_index(values):
                corpus.add(f"{name}/{col}", values.to_numpy(), licence)
    for name, rel in PACKAGED_PANELS.items():
        if name not in exclude and (root / rel).is_file():
            for i, values in enumerate(_read_ts_panel(root / rel, max_series=40)):
                corpus.add(f"{name}/{i}", values, licence)


def _looks_like_index(values) -> bool:
    v = values.dropna().to_numpy()
    return v.size > 2 and bool(np.all(np.diff(v) == 1))


def _read_ts_panel(path: Path, max_series: int) -> list[np.ndarray]:
    """Univariate series of a .ts file (one per line after @data, comma-separated values)."""
    out, in_data = [], False
    for line in path.read_text(errors="replace").splitlines():
        if in_data and line.strip():
            first_dim = line.split(":")[0]
            out.append(np.array([float(x) if x not in ("?", "NaN") else np.nan for x in first_dim.split(",")]))
            if len(out) >= max_series:
                break
        in_data = in_data or line.strip().lower() == "@data"
    return out


def add_statsmodels(corpus: Corpus, exclude: set[str]) -> None:
    """The time series statsmodels ships (co2, sunspots, elnino, macrodata, nile)."""
    try:
        import statsmodels.api as sm
    except ImportError:
        raise DataError("the corpus reads the series statsmodels ships: pip install 'moekit[pretrain]'") from None
    licence = "BSD-3-Clause (bundled with statsmodels)"
    for name in STATSMODELS_SETS:
        if name in exclude:
            continue
        frame = getattr(sm.datasets, name).load_pandas().data
        if name == "elnino":  # one row per year, one column per month: one monthly series
            values = frame.drop(columns=["YEAR"]).to_numpy().ravel()
            corpus.add(f"{name}/temperature", values, licence)
            continue
        for col in frame.columns:
            if col.lower() in ("year", "quarter", "month", "date") or not np.issubdtype(frame[col].dtype, np.number):
                continue
            corpus.add(f"{name}/{col}", frame[col].interpolate(limit_direction="both").to_numpy(), licence)


# ---------------------------------------------------------------- the corpus


def build_corpus(shared_dir: str | Path | None, exclude: list[str] | tuple[str, ...] = (), seed: int = 0,
                 synthetic: int = 1000, synthetic_length: int = 1024, progress: bool = False) -> Corpus:
    """Every real source (minus `exclude`, dataset names) and `synthetic` KernelSynth series; a function of the seed."""
    from .kernel_synth import kernel_synth

    known = set(ETT_NAMES) | set(PACKAGED_CSVS) | set(PACKAGED_PANELS) | set(STATSMODELS_SETS)
    unknown = sorted(set(exclude) - known)
    if unknown:
        raise DataError(f"--exclude {','.join(unknown)}: unknown dataset(s); the corpus's datasets are "
                        f"{', '.join(sorted(known))}")
    ex = set(exclude)
    corpus = Corpus()
    if shared_dir is not None:
        add_ett(corpus, Path(shared_dir), ex)
    elif not set(ETT_NAMES) <= ex:
        raise DataError("the corpus reads the ETT files from ../shared/data/timeseries: pass --data-dir DIR "
                        "or leave them out with --exclude ETTh1,ETTh2,ETTm1")
    add_sktime(corpus, ex)
    add_statsmodels(corpus, ex)
    corpus.synthetic = kernel_synth(synthetic, synthetic_length, seed=seed, progress=progress)
    corpus.sources["synthetic"] = f"KernelSynth ({len(corpus.synthetic)} Gaussian-process samples, seed {seed})"
    return corpus


def normalise(x_BW: np.ndarray, mask_BW: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per window over its valid points (padding stays 0)."""
    n = np.maximum(mask_BW.sum(axis=1, keepdims=True), 1.0)
    mean = (x_BW * mask_BW).sum(axis=1, keepdims=True) / n
    var = (((x_BW - mean) * mask_BW) ** 2).sum(axis=1, keepdims=True) / n
    return (((x_BW - mean) / np.maximum(np.sqrt(var), 1e-5)) * mask_BW).astype(np.float32)


class CorpusMixture:
    """Normalised training windows [B, W] and their masks, a pure function of (seed, step).

    Each window is real (a series drawn with probability proportional to the
    square root of its length; shorter series are right-padded and masked),
    TSMixup (a Dirichlet(1.5) convex mixture of 1-3 mean-scaled real windows)
    or KernelSynth, with probabilities `weights`.
    """

    def __init__(self, corpus: Corpus, window: int, seed: int = 0, weights: tuple[float, float, float] = (0.4, 0.3, 0.3)):
        if not corpus.series:
            raise DataError("the corpus holds no real series")
        self.corpus, self.window, self.seed = corpus, window, seed
        lengths = np.array([s.size for s in corpus.series], dtype=np.float64)
        self.p_real = np.sqrt(lengths) / np.sqrt(lengths).sum()
        self.long = np.flatnonzero(lengths >= window)
        self.synthetic = [s for s in corpus.synthetic if s.size >= window]
        w = np.array(weights, dtype=np.float64)
        if not self.long.size:
            w[1] = 0.0
        if not self.synthetic:
            w[2] = 0.0
        self.weights = w / w.sum()

    def batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        x = np.zeros((batch_size, self.window), dtype=np.float64)
        mask = np.zeros_like(x)
        kinds = rng.choice(3, size=batch_size, p=self.weights)
        for i, kind in enumerate(kinds):
            if kind == 0:
                values = self._window(self.corpus.series[rng.choice(len(self.corpus.series), p=self.p_real)], rng)
            elif kind == 1:
                values = self._mixup(rng)
            else:
                values = self._window(self.synthetic[rng.integers(len(self.synthetic))], rng)
            x[i, :values.size], mask[i, :values.size] = values, 1.0
        return normalise(x, mask), mask.astype(np.float32)

    def _window(self, series: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if series.size <= self.window:
            return series.astype(np.float64)
        start = rng.integers(series.size - self.window + 1)
        return series[start:start + self.window].astype(np.float64)

    def _mixup(self, rng: np.random.Generator) -> np.ndarray:
        k = int(rng.integers(1, 4))
        weights = rng.dirichlet([1.5] * k)
        out = np.zeros(self.window)
        for w in weights:
            part = self._window(self.corpus.series[self.long[rng.integers(self.long.size)]], rng)
            out += w * part / max(float(np.mean(np.abs(part))), 1e-8)
        return out
