"""Bandwidth traces: read Mahimahi, "time throughput" (Pensieve HSDPA/FCC) and CSV files into one
piecewise-constant bandwidth-over-time series, and reshape it (resample, scale, clip, loop).

A trace holds ``mbps[i]`` from ``times_s[i]`` until ``times_s[i + 1]`` (the last value until
``duration_s``). Lookups past the end wrap around, as Mahimahi itself replays a trace in a loop.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

MAHIMAHI_PACKET_BYTES = 1500
FORMATS = ("mahimahi", "time_throughput", "csv")
DATA_DIR = Path(__file__).parent / "data"


class TraceFormatError(ValueError):
    """A malformed trace file; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class BandwidthTrace:
    times_s: np.ndarray
    mbps: np.ndarray
    rtt_ms: np.ndarray | None = None
    name: str = "trace"
    # End of the last interval; None means "one more median step after the last sample".
    end_s: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        times = np.asarray(self.times_s, dtype=float)
        mbps = np.asarray(self.mbps, dtype=float)
        object.__setattr__(self, "times_s", times)
        object.__setattr__(self, "mbps", mbps)
        if self.rtt_ms is not None:
            object.__setattr__(self, "rtt_ms", np.asarray(self.rtt_ms, dtype=float))
        if times.ndim != 1 or len(times) == 0 or times.shape != mbps.shape:
            raise ValueError(f"trace {self.name}: times_s and mbps must be 1-D, non-empty, of equal length")
        if self.rtt_ms is not None and self.rtt_ms.shape != times.shape:
            raise ValueError(f"trace {self.name}: rtt_ms must have one value per sample")
        if np.any(np.diff(times) <= 0):
            raise ValueError(f"trace {self.name}: times_s must be strictly increasing")
        if np.any(mbps < 0) or not np.all(np.isfinite(mbps)):
            raise ValueError(f"trace {self.name}: bandwidth must be finite and >= 0")
        if self.end_s is None:
            step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
            object.__setattr__(self, "end_s", float(times[-1] + step))
        elif self.end_s <= times[-1]:
            raise ValueError(f"trace {self.name}: end_s must lie after the last sample")

    # --- reading values -------------------------------------------------------------------------
    @property
    def start_s(self) -> float:
        return float(self.times_s[0])

    @property
    def duration_s(self) -> float:
        return float(self.end_s - self.times_s[0])

    @property
    def widths_s(self) -> np.ndarray:
        """How long each sample holds."""
        return np.diff(np.append(self.times_s, self.end_s))

    @property
    def mean_mbps(self) -> float:
        """Time-weighted mean: the rate that moves the same bytes over the whole trace."""
        return float(np.sum(self.mbps * self.widths_s) / self.duration_s)

    def __len__(self) -> int:
        return len(self.times_s)

    def _wrap(self, t_s):
        return self.start_s + np.mod(np.asarray(t_s, dtype=float) - self.start_s, self.duration_s)

    def _index(self, t_s):
        return np.clip(np.searchsorted(self.times_s, self._wrap(t_s), side="right") - 1, 0, len(self) - 1)

    def mbps_at(self, t_s):
        """Bandwidth in Mbit/s at time ``t_s`` (a float or an array); the trace loops past its end."""
        values = self.mbps[self._index(t_s)]
        return float(values) if np.ndim(values) == 0 else values

    def bps_at(self, t_s):
        """Bandwidth in bit/s at time ``t_s`` (a float or an array); the trace loops past its end."""
        return self.mbps_at(t_s) * 1e6

    def rtt_ms_at(self, t_s) -> float | None:
        if self.rtt_ms is None:
            return None
        return float(self.rtt_ms[self._index(t_s)])

    def bits_until(self, t_s):
        """Bits the link has carried from the trace's start to ``t_s`` (loops, so it grows forever)."""
        t = np.asarray(t_s, dtype=float) - self.start_s
        bits_per_loop = float(np.sum(self.mbps * self.widths_s)) * 1e6
        loops, rest = np.divmod(t, self.duration_s)
        edges = np.append(self.times_s, self.end_s) - self.start_s
        cumulative = np.concatenate([[0.0], np.cumsum(self.mbps * self.widths_s) * 1e6])
        index = np.clip(np.searchsorted(edges, rest, side="right") - 1, 0, len(self) - 1)
        within = cumulative[index] + self.mbps[index] * 1e6 * (rest - edges[index])
        result = loops * bits_per_loop + within
        return float(result) if np.ndim(result) == 0 else result

    def bits_between(self, t0_s: float, t1_s: float) -> float:
        return float(self.bits_until(t1_s) - self.bits_until(t0_s))

    # --- reshaping --------------------------------------------------------------------------------
    def resample(self, step_s: float) -> "BandwidthTrace":
        """Bins of ``step_s`` holding the mean bandwidth over each bin (bytes are preserved)."""
        if not step_s > 0:
            raise ValueError(f"resample step must be > 0 s, got {step_s}")
        count = max(1, math.ceil(round(self.duration_s / step_s, 9)))
        starts = self.start_s + step_s * np.arange(count)
        ends = np.minimum(starts + step_s, self.end_s)
        ends[-1] = self.end_s
        bits = self.bits_until(ends) - self.bits_until(starts)
        mbps = bits / (ends - starts) / 1e6
        rtt = None if self.rtt_ms is None else self.rtt_ms[self._index(starts)]
        return BandwidthTrace(starts, mbps, rtt, self.name, end_s=float(ends[-1]))

    def scaled(self, factor: float) -> "BandwidthTrace":
        if not factor >= 0:
            raise ValueError(f"scale factor must be >= 0, got {factor}")
        return replace(self, mbps=self.mbps * factor, end_s=self.end_s)

    def clipped(self, lo_mbps: float | None = None, hi_mbps: float | None = None) -> "BandwidthTrace":
        if lo_mbps is not None and hi_mbps is not None and lo_mbps > hi_mbps:
            raise ValueError(f"clip bounds reversed: lo {lo_mbps} > hi {hi_mbps}")
        return replace(self, mbps=np.clip(self.mbps, lo_mbps, hi_mbps), end_s=self.end_s)

    def looped(self, duration_s: float) -> "BandwidthTrace":
        """Repeat the trace until it lasts exactly ``duration_s`` (the last repeat is cut short)."""
        if not duration_s > 0:
            raise ValueError(f"loop duration must be > 0 s, got {duration_s}")
        repeats = math.ceil(duration_s / self.duration_s)
        offsets = np.repeat(np.arange(repeats) * self.duration_s, len(self))
        times = np.tile(self.times_s - self.start_s, repeats) + offsets
        keep = times < duration_s
        rtt = None if self.rtt_ms is None else np.tile(self.rtt_ms, repeats)[keep]
        return BandwidthTrace(times[keep], np.tile(self.mbps, repeats)[keep], rtt, self.name,
                              end_s=float(duration_s))

    def window(self, offset_s: float, duration_s: float) -> "BandwidthTrace":
        """The ``duration_s`` seconds that start ``offset_s`` after the trace's start, as a trace starting
        at 0 (the trace loops past its end). Carries exactly the bits the original carries over that span."""
        if not offset_s >= 0 or not duration_s > 0:
            raise ValueError(f"window needs offset >= 0 s and duration > 0 s, got {offset_s} and {duration_s}")
        t0, t1 = offset_s, offset_s + duration_s
        base = self.shifted_to_zero().looped(t1)
        first = int(base._index(t0))
        keep = (base.times_s > t0) & (base.times_s < t1)
        rtt = None if base.rtt_ms is None else np.concatenate([[base.rtt_ms[first]], base.rtt_ms[keep]])
        return BandwidthTrace(np.concatenate([[t0], base.times_s[keep]]) - t0,
                              np.concatenate([[base.mbps[first]], base.mbps[keep]]), rtt, self.name,
                              end_s=float(duration_s))

    def shifted_to_zero(self) -> "BandwidthTrace":
        return replace(self, times_s=self.times_s - self.start_s, end_s=self.end_s - self.start_s)

    def to_csv(self, path: str | Path) -> None:
        """Write ``t_s,mbps[,rtt_ms]`` with a header; the end time goes in a comment line."""
        with open(path, "w", newline="") as handle:
            handle.write(f"# {self.name}: end_s={self.end_s:g}\n")
            writer = csv.writer(handle)
            writer.writerow(["t_s", "mbps"] + (["rtt_ms"] if self.rtt_ms is not None else []))
            for i in range(len(self)):
                row = [f"{self.times_s[i]:g}", f"{self.mbps[i]:.4f}"]
                if self.rtt_ms is not None:
                    row.append(f"{self.rtt_ms[i]:.1f}")
                writer.writerow(row)


def constant_trace(mbps: float, duration_s: float = 1.0, name: str | None = None) -> BandwidthTrace:
    return BandwidthTrace(np.array([0.0]), np.array([float(mbps)]), None, name or f"const-{mbps:g}mbps",
                          end_s=float(duration_s))


# --- readers ------------------------------------------------------------------------------------------
def _data_lines(path: Path):
    """(line number, stripped text) of every line that is not blank or a # comment."""
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                text = line.strip()
                if text and not text.startswith("#"):
                    yield number, text
    except UnicodeDecodeError as exc:
        raise TraceFormatError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None


def _number(path: Path, number: int, token: str, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise TraceFormatError(f"{path}:{number}: {what} is not a number: {token!r}") from None
    if not math.isfinite(value):
        raise TraceFormatError(f"{path}:{number}: {what} is not finite: {token!r}")
    return value


def read_mahimahi(path: str | Path, bin_s: float = 1.0) -> BandwidthTrace:
    """One integer ms timestamp per 1500-byte delivery opportunity -> mean Mbit/s per ``bin_s`` bin.

    The trace lasts until its last timestamp (Mahimahi's loop period), at least one millisecond."""
    path = Path(path)
    if not bin_s > 0:
        raise ValueError(f"bin size must be > 0 s, got {bin_s}")
    stamps, previous = [], 0
    for number, text in _data_lines(path):
        if not text.isdigit():
            raise TraceFormatError(f"{path}:{number}: Mahimahi wants one integer millisecond timestamp "
                                   f"per line, got {text!r}")
        value = int(text)
        if value < previous:
            raise TraceFormatError(f"{path}:{number}: timestamp {value} ms goes back in time "
                                   f"(previous {previous} ms)")
        stamps.append(value)
        previous = value
    if not stamps:
        raise TraceFormatError(f"{path}: no timestamps (empty Mahimahi trace)")
    duration_s = max(stamps[-1], 1) / 1000.0
    count = max(1, math.ceil(round(duration_s / bin_s, 9)))
    bins = np.minimum((np.asarray(stamps) / 1000.0 / bin_s).astype(int), count - 1)
    packets = np.bincount(bins, minlength=count)
    starts = bin_s * np.arange(count)
    widths = np.minimum(starts + bin_s, duration_s) - starts
    mbps = packets * MAHIMAHI_PACKET_BYTES * 8 / widths / 1e6
    return BandwidthTrace(starts, mbps, None, path.name, end_s=duration_s)


def _rows_to_trace(path: Path, rows: list[tuple[int, list[float]]], name: str) -> BandwidthTrace:
    if not rows:
        raise TraceFormatError(f"{path}: no samples")
    for (_, (prev_t, *_)), (number, (t, *_)) in zip(rows, rows[1:]):
        if t <= prev_t:
            raise TraceFormatError(f"{path}:{number}: time {t:g} s is not after the previous one ({prev_t:g} s)")
    for number, values in rows:
        if values[1] < 0:
            raise TraceFormatError(f"{path}:{number}: bandwidth {values[1]:g} Mbit/s is negative")
    times = np.array([values[0] for _, values in rows])
    mbps = np.array([values[1] for _, values in rows])
    has_rtt = [len(values) > 2 for _, values in rows]
    if any(has_rtt) and not all(has_rtt):
        first = next(number for (number, _), rtt in zip(rows, has_rtt) if rtt != has_rtt[0])
        raise TraceFormatError(f"{path}:{first}: rtt_ms column present on some lines only")
    rtt = np.array([values[2] for _, values in rows]) if all(has_rtt) else None
    trace = BandwidthTrace(times, mbps, rtt, name)
    return trace.shifted_to_zero()


def read_time_throughput(path: str | Path) -> BandwidthTrace:
    """Pensieve-style "t_s mbps" pairs, whitespace separated (HSDPA 3G and FCC broadband traces)."""
    path = Path(path)
    rows = []
    for number, text in _data_lines(path):
        tokens = text.split()
        if len(tokens) != 2:
            raise TraceFormatError(f"{path}:{number}: want 2 columns 't_s mbps', got {len(tokens)}: {text!r}")
        rows.append((number, [_number(path, number, tokens[0], "time"),
                              _number(path, number, tokens[1], "bandwidth")]))
    return _rows_to_trace(path, rows, path.name)


def _end_from_comment(path: Path) -> float | None:
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
    if first.startswith("#") and "end_s=" in first:
        try:
            return float(first.split("end_s=")[1].split()[0])
        except ValueError:
            return None
    return None


def read_csv(path: str | Path) -> BandwidthTrace:
    """``t_s, mbps[, rtt_ms]`` rows with an optional header row; # lines are comments."""
    path = Path(path)
    rows = []
    data = list(_data_lines(path))
    for position, (number, text) in enumerate(data):
        tokens = [token.strip() for token in next(csv.reader([text]))]
        if position == 0 and tokens and not _looks_numeric(tokens[0]):
            continue  # header
        if len(tokens) not in (2, 3):
            raise TraceFormatError(f"{path}:{number}: want 2 or 3 columns 't_s,mbps[,rtt_ms]', "
                                   f"got {len(tokens)}: {text!r}")
        whats = ("time", "bandwidth", "rtt")
        rows.append((number, [_number(path, number, token, what) for token, what in zip(tokens, whats)]))
    trace = _rows_to_trace(path, rows, path.name)
    end_s = _end_from_comment(path)
    if end_s is not None and end_s - float(rows[0][1][0]) > trace.times_s[-1]:
        trace = replace(trace, end_s=end_s - float(rows[0][1][0]))
    return trace


def _looks_numeric(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def detect_format(path: str | Path) -> str:
    """By extension (.csv, Mahimahi's .up/.down) and otherwise by the first data line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".up", ".down"):
        return "mahimahi"
    for number, text in _data_lines(path):
        if "," in text:
            return "csv"
        tokens = text.split()
        if len(tokens) == 1 and text.isdigit():
            return "mahimahi"
        if len(tokens) == 2:
            return "time_throughput"
        raise TraceFormatError(f"{path}:{number}: cannot tell the trace format from {text!r}; "
                               f"pass fmt= one of {', '.join(FORMATS)}")
    raise TraceFormatError(f"{path}: empty trace file")


def load_trace(path: str | Path, fmt: str = "auto", bin_s: float = 1.0) -> BandwidthTrace:
    """Read a trace file; ``fmt`` is auto, mahimahi, time_throughput or csv. ``bin_s``: Mahimahi bin size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "mahimahi":
        return read_mahimahi(path, bin_s)
    if fmt == "time_throughput":
        return read_time_throughput(path)
    if fmt == "csv":
        return read_csv(path)
    raise ValueError(f"unknown trace format {fmt!r}; choose auto, {', '.join(FORMATS)}")


# --- shipped traces -------------------------------------------------------------------------------
def builtin_trace_names() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.csv"))


def builtin_trace(name: str) -> BandwidthTrace:
    """A small trace shipped in traces/data/ (generated by traces/generate.py, see there)."""
    path = DATA_DIR / f"{name}.csv"
    if not path.is_file():
        raise ValueError(f"no built-in trace {name!r}; built-in traces: {', '.join(builtin_trace_names())}")
    trace = read_csv(path)
    return replace(trace, name=name, end_s=trace.end_s)


def resolve_trace(spec: str, fmt: str = "auto", bin_s: float = 1.0) -> BandwidthTrace:
    """What a command line names: a file path, a built-in trace name, or ``const:MBPS``."""
    if spec.startswith("const:"):
        mbps = _number(Path("<argument>"), 0, spec[len("const:"):], "constant bandwidth")
        return constant_trace(mbps)
    if Path(spec).is_file():
        return load_trace(spec, fmt, bin_s)
    if spec in builtin_trace_names():
        return builtin_trace(spec)
    raise ValueError(f"trace {spec!r} is neither a file nor a built-in trace "
                     f"({', '.join(builtin_trace_names())}) nor const:MBPS")
