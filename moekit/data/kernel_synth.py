"""KernelSynth (Chronos, Ansari et al. 2024): synthetic series drawn from random Gaussian-process kernels.

Holds `kernel_bank` (periodic kernels at the periods real data has — hourly,
daily, weekly, monthly, yearly at common sampling rates — linear trends,
smooth RBF and rational-quadratic kernels, noise and constants, all
scikit-learn's kernel objects), `random_kernel` (1 to 5 kernels from the bank
joined by random + or x) and `kernel_synth` (n series of a given length, a pure
function of the seed; each a GP sample drawn through a Cholesky factor with
jitter). scikit-learn computes the covariance matrices.

Not here: the real series and the training windows (`moekit.data.ts_corpus`).
"""

from __future__ import annotations

import numpy as np

PERIODS = (4, 6, 7, 12, 14, 24, 30, 48, 52, 60, 96, 168, 336, 365, 672)  # in time steps


def kernel_bank(length: int) -> list:
    """Chronos' bank, with periods in steps and length scales relative to the series length."""
    from sklearn.gaussian_process.kernels import (
        RBF,
        ConstantKernel,
        DotProduct,
        ExpSineSquared,
        RationalQuadratic,
        WhiteKernel,
    )

    bank = [ExpSineSquared(length_scale=1.0, periodicity=p / length) for p in PERIODS]
    bank += [DotProduct(sigma_0=s) for s in (0.0, 1.0, 10.0)]
    bank += [RBF(length_scale=s) for s in (0.1, 1.0, 10.0)]
    bank += [RationalQuadratic(alpha=a) for a in (0.1, 1.0, 10.0)]
    bank += [WhiteKernel(noise_level=n) for n in (0.1, 1.0)]
    bank += [ConstantKernel()]
    return bank


def random_kernel(bank: list, rng: np.random.Generator, max_kernels: int = 5):
    """1..max_kernels kernels from the bank, joined left to right by + or x (each with probability 1/2)."""
    picks = rng.choice(len(bank), size=int(rng.integers(1, max_kernels + 1)), replace=True)
    kernel = bank[picks[0]]
    for i in picks[1:]:
        kernel = kernel + bank[i] if rng.random() < 0.5 else kernel * bank[i]
    return kernel


def kernel_synth(n: int, length: int, seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """n GP samples of `length` points on [0, 1], each from its own random kernel."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    bank = kernel_bank(length)
    x = np.linspace(0.0, 1.0, length)[:, None]
    out = []
    for _ in tqdm(range(n), desc="KernelSynth", disable=not progress, unit="series"):
        sample = gp_sample(random_kernel(bank, rng), x, rng)
        if sample is not None and np.isfinite(sample).all() and np.std(sample) > 1e-8:
            out.append(sample.astype(np.float32))
    return out


def gp_sample(kernel, x_T1: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One draw from GP(0, kernel) at the points x, through a Cholesky factor (jitter grown until it factors)."""
    cov = kernel(x_T1)
    length = cov.shape[0]
    jitter = 1e-6 * max(float(np.mean(np.diag(cov))), 1e-6)
    for _attempt in range(6):
        try:
            return np.linalg.cholesky(cov + jitter * np.eye(length)) @ rng.standard_normal(length)
        except np.linalg.LinAlgError:
            jitter *= 10
    return None
