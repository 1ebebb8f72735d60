"""What a dense -> MoE conversion asks for (`MoefySpec`), its checks, and the width split.

Holds the spec dataclass, `MoefyError` (the one error class of this package)
and `split_widths`, the rule that turns an FFN width F, a shared fraction and
an expert count E into (shared width S, expert width W). Nothing here touches
a model or its weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import MoekitError

METHODS = ("upcycle", "cluster", "readme")
ROUTERS = ("per-layer", "decoupled")


class MoefyError(MoekitError, ValueError):
    """A conversion request that cannot be carried out (bad method, sizes, calibration data, source)."""


@dataclass
class MoefySpec:
    method: str = "upcycle"
    experts: int = 8
    top_k: int = 2
    shared_fraction: float = 0.0
    router: str = "per-layer"  # per-layer | decoupled (Read-ME: one router over token ids for all layers)
    seed: int = 0

    def check(self) -> "MoefySpec":
        if self.method not in METHODS:
            raise MoefyError(f"method={self.method!r} is unknown: accepted methods are {', '.join(METHODS)}")
        if self.router not in ROUTERS:
            raise MoefyError(f"router={self.router!r} is unknown: accepted routers are {', '.join(ROUTERS)}")
        if not isinstance(self.experts, int) or self.experts < 1:
            raise MoefyError(f"experts={self.experts!r} is invalid: it must be an integer >= 1")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.experts:
            raise MoefyError(f"top-k={self.top_k!r} is invalid: it must be between 1 and the number of experts ({self.experts})")
        if not 0.0 <= float(self.shared_fraction) < 1.0:
            raise MoefyError(f"shared fraction={self.shared_fraction!r} is invalid: it must be in [0, 1)")
        if self.method == "upcycle" and self.shared_fraction > 0:
            raise MoefyError("shared fraction is for 'cluster' and 'readme' (they split the FFN); 'upcycle' copies the whole FFN into each expert")
        if self.method == "upcycle" and self.router == "decoupled":
            raise MoefyError("the decoupled router needs experts that are slices of the FFN: use --method readme or cluster with --router decoupled")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def split_widths(ffn_width: int, spec: MoefySpec) -> tuple[int, int]:
    """(shared width S, per-expert width W) for slicing methods; upcycle keeps the full width.

    The balancing rule: S = round(F * shared_fraction) neurons are always on and
    the other F - S are split into E experts of exactly equal size, so E must
    divide F - S.
    """
    if spec.method == "upcycle":
        return 0, ffn_width
    shared = round(ffn_width * spec.shared_fraction)
    rest = ffn_width - shared
    if rest % spec.experts:
        ok = [e for e in range(2, min(rest, 64) + 1) if rest % e == 0]
        raise MoefyError(
            f"{spec.experts} experts do not divide the {rest} routed FFN neurons (FFN width {ffn_width}, {shared} shared): "
            f"experts have equal size, so the expert count must divide FFN width - shared width; accepted counts include "
            f"{', '.join(map(str, ok[:12]))}"
        )
    return shared, rest // spec.experts
