"""Published zero-shot figures (not reproduced here) that timemoe_zeroshot.py lists beside its own.

Holds `PUBLISHED`: average MSE / MAE over horizons 96-720 from Table 3 of the
Time-MoE paper (Shi et al., ICLR 2025, arXiv 2409.16040 v4), which also reports
Moirai, TimesFM, Moment and Chronos under the same protocol, and
`published_markdown`. Their protocol differs from ours in one way: the input
length grows with the horizon (512, 1024, 2048, 3072 for 96, 192, 336, 720);
ours is 512 throughout. Not here: anything measured.
"""

from __future__ import annotations

SOURCE = "Time-MoE (Shi et al., ICLR 2025), arXiv 2409.16040 v4, Table 3, Avg. rows"
# model -> dataset -> (MSE, MAE)
PUBLISHED = {
    "Time-MoE base (50M)": {"ETTh1": (0.400, 0.424), "ETTh2": (0.366, 0.404), "ETTm1": (0.394, 0.415), "ETTm2": (0.317, 0.365)},
    "Time-MoE large (200M)": {"ETTh1": (0.394, 0.419), "ETTh2": (0.405, 0.415), "ETTm1": (0.376, 0.405), "ETTm2": (0.316, 0.361)},
    "Moirai base": {"ETTh1": (0.417, 0.419), "ETTh2": (0.362, 0.382), "ETTm1": (0.406, 0.385), "ETTm2": (0.311, 0.337)},
    "Moirai large": {"ETTh1": (0.480, 0.439), "ETTh2": (0.367, 0.377), "ETTm1": (0.422, 0.391), "ETTm2": (0.329, 0.343)},
    "TimesFM": {"ETTh1": (0.473, 0.443), "ETTh2": (0.392, 0.406), "ETTm1": (0.433, 0.418), "ETTm2": (0.328, 0.346)},
    "Moment": {"ETTh1": (0.683, 0.566), "ETTh2": (0.361, 0.409), "ETTm1": (0.670, 0.536), "ETTm2": (0.316, 0.365)},
    "Chronos base": {"ETTh1": (0.591, 0.468), "ETTh2": (0.405, 0.410), "ETTm1": (0.645, 0.500), "ETTm2": (0.310, 0.350)},
    "Chronos large": {"ETTh1": (0.588, 0.466), "ETTh2": (0.455, 0.427), "ETTm1": (0.555, 0.465), "ETTm2": (0.295, 0.338)},
}


def published_markdown() -> str:
    rows = ["| model (published, not reproduced) | ETTm1 MSE | ETTm1 MAE | ETTh1 MSE | ETTm2 MSE |", "|---|---|---|---|---|"]
    rows += [f"| {m} | {d['ETTm1'][0]:.3f} | {d['ETTm1'][1]:.3f} | {d['ETTh1'][0]:.3f} | {d['ETTm2'][0]:.3f} |"
             for m, d in PUBLISHED.items()]
    return "\n".join([f"## Published zero-shot figures ({SOURCE})", "",
                      "Trained on up to 300B time points; their input length grows with the horizon "
                      "(512/1024/2048/3072), ours is 512 throughout.", "", *rows])
