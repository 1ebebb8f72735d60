"""benchmarks/expert_parallel.py: the wire-byte and step-time targets can fail, and the loopback counters parse.

Hand-made run summaries stand in for measurements; the expected verdicts are
worked out by hand from the goals (formula <= wire <= 1.5 x formula; EP step
<= one process).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "expert_parallel.py"


def _load():
    spec = importlib.util.spec_from_file_location("expert_parallel_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def _run(wire_over_formula, ratio):
    return {"wire_over_formula": wire_over_formula, "ratio_median": ratio}


def _verdicts(targets):
    return [(t["name"].split(",")[0], t["direction"], t["met"]) for t in targets]


def test_wire_targets_fail_when_payload_missing_or_overhead_large():
    targets = bench.make_targets({2: _run(0.5, 0.9), 4: _run(2.0, 1.2)}, isolated=True)
    assert _verdicts(targets) == [
        ("wire bytes / payload formula", ">=", False),  # 0.5: half the payload never crossed
        ("wire bytes / payload formula", "<=", True),
        ("expert-parallel step / one process on the same global batch", "<=", True),  # 0.9 <= 1
        ("wire bytes / payload formula", ">=", True),
        ("wire bytes / payload formula", "<=", False),  # 2.0 > 1.5
        ("expert-parallel step / one process on the same global batch", "<=", False),  # 1.2 > 1
    ]


def test_no_wire_targets_without_an_isolated_namespace():
    targets = bench.make_targets({2: _run(None, 1.0)}, isolated=False)
    assert [t["name"].startswith("expert-parallel step") for t in targets] == [True]
    assert targets[0]["met"] is True  # 1.0 <= 1.0


NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 20266247    1234    0    0    0     0          0         0 20266300    1235    0    0    0     0       0          0
  eth0:     999       9    0    0    0     0          0         0      888       8    0    0    0     0       0          0
"""


def test_parse_net_dev_reads_lo_rx_and_tx_columns():
    assert bench.parse_net_dev(NET_DEV) == {"rx_bytes": 20266247, "tx_bytes": 20266300, "interfaces": ["lo", "eth0"]}
    assert bench.parse_net_dev(NET_DEV.replace("    lo:", "   lo2:")) is None  # no loopback line
