"""Quantile forecasts for a point forecaster: residual quantiles per lead time, calibrated on held-out windows.

Holds `QuantileTable` (for each quantile level, the empirical quantile of the
forecast error divided by the context's standard deviation, at a grid of lead
times; linear in between, constant past the last), `calibrate` (the table from
a model's forecasts of held-out windows: split-conformal intervals, one per
lead time) and its JSON form (`quantiles.json` beside a forecaster's weights,
`load_table`).

Why this method: the errors of a model that instance-normalises its context
scale with the context's spread, and grow with the lead time; a per-lead table
of scaled residual quantiles captures both, costs nothing at inference, and
keeps the model in Time-MoE's Hugging Face layout (no extra heads).

Not here: the model (`moekit.models.timemoe`), writing quantile columns and
shaded bands (`moekit.infer.forecast`).

Shape suffixes: N windows, L context, H horizon, Q quantile levels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

LEVELS = (0.1, 0.5, 0.9)
KNOTS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 336, 512, 720)
FILE = "quantiles.json"


@dataclass
class QuantileTable:
    """offsets[q][k]: the level-q quantile of (actual - forecast) / context std at lead knots[k]."""

    levels: list[float]
    knots: list[int]
    offsets: list[list[float]]
    windows: int = 0  # calibration windows behind the table
    source: str = ""  # what they came from

    def offsets_QH(self, horizon: int) -> np.ndarray:
        leads = np.arange(1, horizon + 1, dtype=np.float64)
        return np.stack([np.interp(leads, self.knots, row) for row in self.offsets])

    def apply(self, point_BH: np.ndarray, std_B: np.ndarray) -> np.ndarray:
        """Quantile forecasts [B, H, Q] around point forecasts, scaled by each context's std."""
        off_QH = self.offsets_QH(point_BH.shape[1])
        return point_BH[:, :, None] + off_QH.T[None] * np.asarray(std_B, dtype=np.float64)[:, None, None]

    def save(self, directory: str | Path) -> Path:
        p = Path(directory) / FILE
        p.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return p


def context_std(context_BL: np.ndarray) -> np.ndarray:
    """The scale the model normalises by (population std, floored as `TimeMoE.predict_many` floors it)."""
    return np.maximum(np.asarray(context_BL, dtype=np.float64).std(axis=1), 1e-5)


def predict_batched(model, contexts_NL: np.ndarray, horizon: int, batch: int = 256) -> np.ndarray:
    """The model's point forecasts [N, H] of raw contexts, `batch` windows at a time."""
    preds = []
    for i in range(0, len(contexts_NL), batch):
        ctx = torch.from_numpy(np.ascontiguousarray(contexts_NL[i:i + batch], dtype=np.float32))
        preds.append(model.predict(ctx, horizon).numpy())
    return np.concatenate(preds)


def calibrate(model, contexts_NL: np.ndarray, targets_NH: np.ndarray, levels=LEVELS, batch: int = 256,
              source: str = "") -> QuantileTable:
    """The table from the model's forecasts of held-out windows (contexts and the values that followed)."""
    horizon = targets_NH.shape[1]
    preds_NH = predict_batched(model, contexts_NL, horizon, batch)
    resid_NH = (targets_NH - preds_NH) / context_std(contexts_NL)[:, None]
    knots = [k for k in KNOTS if k <= horizon] or [horizon]
    edges = [0] + [int(round((a + b) / 2)) for a, b in zip(knots, knots[1:])] + [horizon]
    # each knot's quantile pools the lead times nearer to it than to its neighbours (column j is lead j + 1)
    offsets = [[float(np.quantile(resid_NH[:, lo:max(hi, lo + 1)], q)) for lo, hi in zip(edges, edges[1:])]
               for q in levels]
    return QuantileTable(list(levels), knots, [[round(v, 5) for v in row] for row in offsets],
                         windows=int(len(contexts_NL)), source=source)


def load_table(model_dir: str | Path) -> QuantileTable | None:
    """The table saved beside a forecaster (its directory or, for a checkpoint, the run above it); None if none."""
    d = Path(model_dir)
    for candidate in (d / FILE, d.parent / FILE, d.parent.parent / FILE):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
                return QuantileTable(**data)
            except (json.JSONDecodeError, TypeError) as e:
                raise CheckpointError(f"{candidate} is not a quantile table: {e}") from None
    return None
