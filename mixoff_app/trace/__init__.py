"""Routing traces: the file format, replay through eviction policies with the Belady bound, and synthetic
traces calibrated to Mixtral's routing statistics. Pure Python; no torch."""
from __future__ import annotations

from .format import Routing, Trace, TraceError, read_trace, records_from_routing, write_trace
from .replay import POLICY_NAMES, PolicySpec, ReplayResult, belady, compare, simulate
from .synthetic import (TABLE5_ANCHORS, TABLE5_LAYERS, LayerProcess, calibrate_layer, random_baseline, routing_stats,
                        synthetic_processes, synthetic_targets, synthetic_trace)

__all__ = ["Routing", "Trace", "TraceError", "read_trace", "records_from_routing", "write_trace", "POLICY_NAMES",
           "PolicySpec", "ReplayResult", "belady", "compare", "simulate", "TABLE5_ANCHORS", "TABLE5_LAYERS",
           "LayerProcess", "calibrate_layer", "random_baseline", "routing_stats", "synthetic_processes",
           "synthetic_targets", "synthetic_trace"]
