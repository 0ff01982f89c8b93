"""Bandwidth traces (formats.py), user-space shaping (shaping.py) and trace replay onto links (replay.py)."""
from traces.formats import (BandwidthTrace, TraceFormatError, builtin_trace, builtin_trace_names, constant_trace,
                            load_trace, resolve_trace)
from traces.shaping import TokenBucket, TraceShaper

__all__ = ["BandwidthTrace", "TraceFormatError", "TokenBucket", "TraceShaper", "builtin_trace",
           "builtin_trace_names", "constant_trace", "load_trace", "resolve_trace"]
