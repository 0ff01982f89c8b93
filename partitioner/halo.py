"""Halo back-tracing: which pixels of its inputs one node needs to produce a rectangle of its output, and
how to compute that rectangle from cropped inputs so the result equals the same rectangle of the untiled map.

Regions are half-open row and column ranges in each node's own map coordinates: ``((h0, h1), (w0, w1))``.
A sliding-window op (conv, max/avg pool) with kernel k, stride s, padding p and dilation d needs, for
output rows [a, b), input rows [a*s - p, (b-1)*s - p + d*(k-1) + 1). The part of that range outside the
map is the op's padding, and it exists only where the tile touches the true border; inner tile borders
always get real neighbour pixels. So a tile slices the real input it needs, pads explicitly on the sides
that fall outside the map (zeros for conv and avg pool, -inf for max pool), and runs the op with padding=0.
That also covers ceil_mode pools, whose last window may hang past the padded border: its overhang is
padded too and contributes nothing to a max, and avg pool divisors are recomputed per output position
from the untiled map's window geometry (count_include_pad counts only the true padding, never overhang
or tile borders).

Element-wise ops (bn, activations, add, mul) and channel concat keep coordinates: every input needs the
output's region, except 1x1 maps broadcast over the whole map (e.g. squeeze-excite scales), read whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from partitioner.graph import ModelGraph

Interval = tuple[int, int]  # half-open [start, stop)
Region = tuple[Interval, Interval]  # (rows, columns)

POINTWISE_KINDS = frozenset({"bn", "activation", "dropout", "identity", "lrn", "add", "mul", "cat"})
WINDOW_KINDS = frozenset({"conv", "maxpool", "avgpool"})


def full_region(size: tuple[int, int]) -> Region:
    return ((0, size[0]), (0, size[1]))


def region_area(region: Region) -> int:
    (h0, h1), (w0, w1) = region
    return max(0, h1 - h0) * max(0, w1 - w0)


def region_shape(region: Region) -> tuple[int, int]:
    (h0, h1), (w0, w1) = region
    return h1 - h0, w1 - w0


def hull(first: Region | None, second: Region) -> Region:
    """Smallest region holding both (regions traced from one output tile overlap, so nothing is wasted)."""
    if first is None:
        return second
    return ((min(first[0][0], second[0][0]), max(first[0][1], second[0][1])),
            (min(first[1][0], second[1][0]), max(first[1][1], second[1][1])))


def contains(outer: Region, inner: Region) -> bool:
    return all(o0 <= i0 and i1 <= o1 for (o0, o1), (i0, i1) in zip(outer, inner))


def crop(tensor: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    """The ``want`` part of ``tensor``, which holds the ``have`` part of its map (a view, no copy)."""
    if want == have:
        return tensor
    if not contains(have, want):
        raise ValueError(f"need region {want} but only {have} is available")
    (h0, h1), (w0, w1) = want
    return tensor[..., h0 - have[0][0]:h1 - have[0][0], w0 - have[1][0]:w1 - have[1][0]]


@dataclass(frozen=True)
class AxisWindow:
    """One spatial axis of a sliding-window op."""

    kernel: int
    stride: int
    padding: int  # before the first element; the far side is whatever the map size leaves
    dilation: int = 1

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def needed(self, out: Interval) -> Interval:
        """Input range (may reach outside the map: that part is padding) read by outputs [a, b)."""
        start, stop = out
        return start * self.stride - self.padding, (stop - 1) * self.stride - self.padding + self.span


class NotTileable(ValueError):
    """The node's output cannot be computed tile by tile (the message says why)."""


@dataclass
class TileOp:
    """One fx node, ready to run on a crop of its map."""

    name: str
    kind: str
    node: fx.Node
    module: nn.Module | None
    input_names: list[str]  # tensor inputs (fx node names), in the node's argument order
    broadcast: list[bool]  # per input: a 1x1 map read whole instead of cropped
    output_size: tuple[int, int]
    windows: tuple[AxisWindow, AxisWindow] | None
    hyper: dict[str, Any]
    input_sizes: list[tuple[int, int]]

    def input_regions(self, out: Region) -> list[Region]:
        """Region of each input needed for ``out`` (clipped to the input map)."""
        if self.windows is None:
            return [full_region((1, 1)) if whole else out for whole in self.broadcast]
        needed = self._needed(out)
        size = self.input_sizes[0]
        return [tuple((max(lo, 0), min(hi, size[axis])) for axis, (lo, hi) in enumerate(needed))]

    def _needed(self, out: Region) -> list[Interval]:
        """Input range per axis (may reach outside the map: that part is padding). A tile ending at the
        map's last output also takes the trailing input rows no window reads (fewer than the stride): the
        kernel then sees the same input length as the untiled op, and oneDNN picks the same algorithm."""
        needed = []
        for axis in (0, 1):
            lo, hi = self.windows[axis].needed(out[axis])
            if out[axis][1] == self.output_size[axis]:
                hi = max(hi, self.input_sizes[0][axis])
            needed.append((lo, hi))
        return needed

    def run(self, out: Region, values: dict[str, tuple[torch.Tensor, Region]]) -> torch.Tensor:
        """The ``out`` region of this node's output, from ``values[name] = (tensor, region it holds)``."""
        if self.windows is None:
            crops = {name: crop(*values[name], region)
                     for name, region in zip(self.input_names, self.input_regions(out))}
            return self._call_original(crops)
        return self._run_window(out, values[self.input_names[0]])

    def _call_original(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        args = fx.node.map_arg(self.node.args, lambda n: tensors[n.name])
        kwargs = fx.node.map_arg(self.node.kwargs, lambda n: tensors[n.name])
        if self.node.op == "call_module":
            return self.module(*args, **kwargs)
        if self.node.op == "call_function":
            return self.node.target(*args, **kwargs)
        self_arg, *rest = args
        return getattr(self_arg, self.node.target)(*rest, **kwargs)

    def _padded_input(self, out: Region, value: tuple[torch.Tensor, Region], fill: float,
                      native_padding: bool = False):
        size = self.input_sizes[0]
        needed = self._needed(out)
        clipped = tuple((max(lo, 0), min(hi, size[axis])) for axis, (lo, hi) in enumerate(needed))
        x = crop(*value, clipped)
        # F.pad order: (left, right, top, bottom); non-zero only where the window leaves the true map
        pads = [clipped[1][0] - needed[1][0], needed[1][1] - clipped[1][1],
                clipped[0][0] - needed[0][0], needed[0][1] - clipped[0][1]]
        native = [0, 0]
        if native_padding:  # an axis padded like the untiled op: let the kernel pad (same algorithm)
            for axis, (before, after) in ((0, (2, 3)), (1, (0, 1))):
                if pads[before] == pads[after] == self.windows[axis].padding:
                    native[axis], pads[before], pads[after] = pads[before], 0, 0
        x = F.pad(x, pads, value=fill) if any(pads) else x
        return (x, tuple(native)) if native_padding else x

    def _run_window(self, out: Region, value: tuple[torch.Tensor, Region]) -> torch.Tensor:
        (h0, h1), (w0, w1) = out
        return self._run_window_uncropped(out, value)[..., :h1 - h0, :w1 - w0]

    def _run_window_uncropped(self, out: Region, value: tuple[torch.Tensor, Region]) -> torch.Tensor:
        rows, cols = self.windows
        stride = (rows.stride, cols.stride)
        dilation = (rows.dilation, cols.dilation)
        kernel = (rows.kernel, cols.kernel)
        if self.kind == "conv":
            x, padding = self._padded_input(out, value, 0.0, native_padding=True)
            conv = self.module
            return F.conv2d(x, conv.weight, conv.bias, stride, padding, dilation, conv.groups)
        if self.kind == "maxpool":
            x = self._padded_input(out, value, float("-inf"))
            return F.max_pool2d(x, kernel, stride, 0, dilation, ceil_mode=False)
        x = self._padded_input(out, value, 0.0)
        override = self.hyper.get("divisor_override")
        if override:
            return F.avg_pool2d(x, kernel, stride, 0, ceil_mode=False, count_include_pad=True,
                                divisor_override=override)
        # Sum with divisor 1, then divide by the untiled map's divisor at each output position: the
        # same float sum (padding zeros add nothing) and the same single division aten does.
        sums = F.avg_pool2d(x, kernel, stride, 0, ceil_mode=False, count_include_pad=True, divisor_override=1)
        divisor = torch.outer(self._avg_counts(out[0], 0), self._avg_counts(out[1], 1)).to(sums.dtype)
        return sums / divisor

    def _avg_counts(self, out: Interval, axis: int) -> torch.Tensor:
        window, size = self.windows[axis], self.input_sizes[0][axis]
        counts = []
        for index in range(*out):
            start = index * window.stride - window.padding
            stop = min(start + window.kernel, size + window.padding)  # overhang past the padding never counts
            if not self.hyper.get("count_include_pad", True):
                start, stop = max(start, 0), min(stop, size)
            counts.append(stop - start)
        return torch.tensor(counts, dtype=torch.float64)


def _spatial_size(shape: tuple[int, ...] | None) -> tuple[int, int] | None:
    return (shape[2], shape[3]) if shape is not None and len(shape) == 4 else None


def _conv_windows(module: nn.Module) -> tuple[AxisWindow, AxisWindow]:
    if type(module) is not nn.Conv2d:
        raise NotTileable(f"{type(module).__name__} is not a plain Conv2d")
    if module.padding_mode != "zeros":
        raise NotTileable(f"conv padding_mode {module.padding_mode!r} (only zero padding is tiled)")
    padding = module.padding
    if isinstance(padding, str):  # 'valid' or 'same' (torch puts the odd extra pixel after)
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2
                        for k, d in zip(module.kernel_size, module.dilation))
    return tuple(AxisWindow(module.kernel_size[a], module.stride[a], padding[a], module.dilation[a])
                 for a in (0, 1))


def _pool_windows(hyper: dict[str, Any], kind: str) -> tuple[AxisWindow, AxisWindow]:
    dilation = hyper.get("dilation", (1, 1)) if kind == "maxpool" else (1, 1)
    return tuple(AxisWindow(hyper["kernel"][a], hyper["stride"][a], hyper["padding"][a], dilation[a])
                 for a in (0, 1))


def _concat_dim(node: fx.Node) -> int:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return int(dim)


def build_tile_op(graph: ModelGraph, name: str, modules: dict[str, nn.Module], node: fx.Node) -> TileOp:
    """A :class:`TileOp` for node ``name``, or :class:`NotTileable` saying why it must run whole."""
    record = graph.records[name]
    kind = record.op_kind
    output_size = _spatial_size(record.output_shape) if record.is_tensor else None
    if kind not in POINTWISE_KINDS | WINDOW_KINDS:
        raise NotTileable(f"{kind} ops are not spatial")
    if output_size is None:
        raise NotTileable("output is not a 4-D feature map")
    if any(arg.op == "get_attr" for arg in node.all_input_nodes):
        raise NotTileable("reads a constant tensor")
    input_sizes = [_spatial_size(shape) for shape in record.input_shapes]
    if not record.input_names or any(size is None for size in input_sizes):
        raise NotTileable("an input is not a 4-D feature map")
    module = modules.get(node.target) if node.op == "call_module" else None
    windows = None
    broadcast = [False] * len(record.input_names)
    if kind == "conv":
        windows = _conv_windows(module)
    elif kind in ("maxpool", "avgpool"):
        if node.op == "call_module" and type(module) not in (nn.MaxPool2d, nn.AvgPool2d):
            raise NotTileable(f"{type(module).__name__} is not a 2-D pool")
        if getattr(module, "return_indices", False) or node.kwargs.get("return_indices", False):
            raise NotTileable("max pool returning indices")
        windows = _pool_windows(record.hyper, kind)
    else:
        if kind == "cat" and _concat_dim(node) not in (1, -3):
            raise NotTileable("concat along a non-channel axis")
        for index, size in enumerate(input_sizes):
            if size == output_size:
                continue
            if size == (1, 1) and kind in ("add", "mul"):
                broadcast[index] = True
                continue
            raise NotTileable(f"input {record.input_names[index]} is {size}, output is {output_size}")
    if windows is not None and len(record.input_names) != 1:
        raise NotTileable("sliding-window op with several tensor inputs")
    return TileOp(name, kind, node, module, list(record.input_names), broadcast, output_size, windows,
                  dict(record.hyper), input_sizes)

