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

Bit-exactness. Equal inputs are not enough: a kernel's rounding can depend on the shape it is called
with. Measured sources and what a tile does about each (torch 2.x CPU, oneDNN 3.x, AVX-512):
- eval batch norm (and other multi-rounding element-wise ops) takes another loop on a strided view:
  pointwise ops get contiguous crops (not in-place ones: their view is how the write reaches the map).
- aten picks oneDNN or its own im2col+GEMM conv from the map size and thread count, so a small tile can
  switch algorithm: the tile asks aten which backend the untiled map gets and forces that one.
- oneDNN's 1x1 conv blocks its channel reduction by output height (<= 10, 11..27, >= 28 rows) and, for
  some pixel counts, by the count: a 1x1 tile's pixels are laid out as a map as tall as the untiled one,
  in a width checked once per conv and pixel count on random data (it treats pixels independently), and a
  strided one is subsampled first when oneDNN does the same (checked the same way).
- aten's GEMM conv (small maps only) rounds by map width: those tiles run on a whole-size zero map.
What is left: the tile's blocked kernels can still differ where no layout reproduces the untiled call
(e.g. strided 1x1 convs on odd maps that oneDNN does not compact); the result then differs by float
rounding only (~1 ulp per conv). On the zoo's models at the sizes tested none is left (AVX-512).
"""
from __future__ import annotations

import math
import operator
import threading
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
    in_place: bool = False  # writes into its first input (relu(inplace=True), +=): its crop must stay a view

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
            if not self.in_place and self.kind != "cat":
                # a strided crop sends aten's vectorised loops down another path (eval batch norm rounds
                # differently on a non-contiguous map); a contiguous crop gets the untiled map's arithmetic
                crops = {name: t.contiguous() for name, t in crops.items()}
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
            return self._run_conv(out, value, stride, dilation)
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

    def _run_conv(self, out: Region, value: tuple[torch.Tensor, Region], stride: tuple[int, int],
                  dilation: tuple[int, int]) -> torch.Tensor:
        """A conv tile computed with the untiled conv's arithmetic (see :func:`conv_strategy`)."""
        conv = self.module
        strategy = conv_strategy(conv, self.input_sizes[0], value[0].shape[0], value[0].dtype)
        if strategy == "embed":
            return self._conv_embedded(out, value)
        x, padding = self._padded_input(out, value, 0.0, native_padding=True)
        if strategy == "pointwise" and padding == (0, 0):
            return self._pointwise_conv(out, x, stride)
        return self._conv_like_untiled(x, padding, stride, dilation)

    def _conv_embedded(self, out: Region, value: tuple[torch.Tensor, Region]) -> torch.Tensor:
        """Run the conv on a zero map of the untiled input's shape holding the tile's input: the same call
        as the untiled one, so the same kernel; output pixels of the tile read only the real input."""
        conv, size = self.module, self.input_sizes[0]
        needed = self._needed(out)
        clipped = tuple((max(lo, 0), min(hi, size[axis])) for axis, (lo, hi) in enumerate(needed))
        tensor = value[0]
        whole = tensor.new_zeros(tuple(tensor.shape[:-2]) + tuple(size))
        (h0, h1), (w0, w1) = clipped
        whole[..., h0:h1, w0:w1] = crop(*value, clipped)
        result = conv(whole)
        return result[..., out[0][0]:, out[1][0]:]

    def _pointwise_conv(self, out: Region, x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
        """A 1x1 conv (oneDNN or aten GEMM): its blocking (and so its rounding) follows the map's shape (see
        :func:`pointwise_layout`), not the tile's. A 1x1 conv treats pixels independently, so lay the
        tile's pixels out in a map shape that rounds like the untiled one."""
        conv = self.module
        rows, cols = region_shape(out)
        x = x[..., ::stride[0], ::stride[1]][..., :rows, :cols]  # the pixels the windows read
        batch, channels = x.shape[:2]
        pixels = rows * cols
        height, width = pointwise_layout(conv, self.input_sizes[0], self.output_size, pixels, batch, x.dtype)
        # zero pixels fill the map's last columns
        flat = x.new_zeros((batch, channels, height * width))
        flat[..., :pixels] = x.reshape(batch, channels, pixels)
        y = _unit_pointwise(conv, flat.reshape(batch, channels, height, width), self.input_sizes[0])
        return y.reshape(batch, y.shape[1], height * width)[..., :pixels].reshape(batch, -1, rows, cols)

    def _conv_like_untiled(self, x: torch.Tensor, padding: tuple[int, int], stride: tuple[int, int],
                           dilation: tuple[int, int]) -> torch.Tensor:
        """The conv on a tile, through the backend aten picks for the untiled map. aten chooses oneDNN or
        its own im2col+GEMM ("slow") conv from the input's size and the thread count, so a small tile of a
        map that ran on oneDNN would silently change algorithm (and rounding); force the untiled one."""
        conv = self.module
        untiled = untiled_conv_backend(self.module, self.input_sizes[0], x.shape[0], x.dtype)
        tiled = torch._C._select_conv_backend(x, conv.weight, conv.bias, stride, padding, dilation, False, (0, 0),
                                              conv.groups, None)
        if tiled == untiled or untiled not in _FORCEABLE_BACKENDS:
            return F.conv2d(x, conv.weight, conv.bias, stride, padding, dilation, conv.groups)
        return _FORCEABLE_BACKENDS[untiled](x, conv, stride, padding, dilation)

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


def untiled_conv_backend(conv: nn.Conv2d, input_size: tuple[int, int], batch: int, dtype: torch.dtype):
    """The backend aten picks for ``conv`` on its whole (untiled) input map, with this process's thread
    count and oneDNN setting (both enter aten's choice). Asked of aten itself, on an uninitialised map."""
    key = (_conv_key(conv), input_size, batch, dtype, torch.get_num_threads(), torch.backends.mkldnn.is_available()
           and torch.backends.mkldnn.enabled)
    if key not in _BACKENDS:
        probe = torch.empty((batch, conv.in_channels) + tuple(input_size), dtype=dtype)
        padding = _conv_windows(conv)
        _BACKENDS[key] = torch._C._select_conv_backend(
            probe, conv.weight, conv.bias, conv.stride, tuple(w.padding for w in padding), conv.dilation, False,
            (0, 0), conv.groups, None)
    return _BACKENDS[key]


_BACKENDS: dict = {}


def _conv_key(conv: nn.Conv2d) -> tuple:
    """A conv's cache identity: its id *and* its geometry. An id alone is reused by a later conv once the
    first is freed (a long test session), which then got the first conv's layout and lost exactness."""
    return (id(conv), conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, str(conv.padding),
            conv.dilation, conv.groups, conv.bias is not None)

_LAYOUT_LOCK = threading.RLock()

# aten itself sends maps up to this many elements (per image) to its slow conv: computing such a conv
# over the whole map for every tile costs little, and is the one way to get its GEMM's rounding
SMALL_MAP_ELEMENTS = 20480


def conv_strategy(conv: nn.Conv2d, input_size: tuple[int, int], batch: int, dtype: torch.dtype) -> str:
    """How a tile of ``conv`` gets the untiled conv's exact arithmetic:
    "embed": the untiled map is small and runs on aten's slow conv, whose GEMM rounds differently for
    other widths: run on the whole-size map; "pointwise": a 1x1 oneDNN conv, re-laid out (see
    ``TileOp._pointwise_conv``); "native": the untiled backend on the tile (oneDNN's direct and brgemm
    convs do not change their reduction order with the map's height)."""
    backend = untiled_conv_backend(conv, input_size, batch, dtype)
    slow = backend in (torch._C._ConvBackend.Slow2d, torch._C._ConvBackend.SlowDilated2d)
    if slow and conv.in_channels * input_size[0] * input_size[1] <= SMALL_MAP_ELEMENTS:
        return "embed"
    if backend in _POINTWISE_BACKENDS and conv.kernel_size == (1, 1) and conv.groups == 1 and \
            _padding_free(conv) and (conv.stride == (1, 1) or _compacting_is_exact(conv, input_size, batch, dtype)):
        return "pointwise"
    return "native"


def _padding_free(conv: nn.Conv2d) -> bool:
    return all(window.padding == 0 for window in _conv_windows(conv))


def _compacting_is_exact(conv: nn.Conv2d, input_size: tuple[int, int], batch: int, dtype: torch.dtype) -> bool:
    """Whether the strided 1x1 conv on the whole map rounds like a 1x1 conv on its subsampled pixels (it
    does when oneDNN compacts the input first, "reduce to unit stride"). Checked once on random data: a
    different reduction order shows in some of the thousands of outputs."""
    key = ("compact", _conv_key(conv), input_size, batch, dtype, torch.get_num_threads())
    if key not in _BACKENDS:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((batch, conv.in_channels) + tuple(input_size), generator=generator).to(dtype)
        with torch.no_grad():
            compact = x[..., ::conv.stride[0], ::conv.stride[1]].contiguous()
            _BACKENDS[key] = torch.equal(conv(x), _unit_pointwise(conv, compact, input_size))
    return _BACKENDS[key]


def pointwise_layout(conv: nn.Conv2d, input_size: tuple[int, int], output_size: tuple[int, int], pixels: int,
                     batch: int, dtype: torch.dtype) -> tuple[int, int]:
    """The (height, width) map to lay ``pixels`` tile pixels out in so the untiled 1x1 conv's backend
    rounds them as it rounds the untiled map. oneDNN blocks its reduction by output height class and, for
    some pixel counts (e.g. multiples of 512), by the count; aten's GEMM conv switches kernels below some
    pixel count. So candidates as tall as the untiled map and progressively wider are checked once on
    random data (the blocking does not depend on the data, and a different one shows in some of the
    thousands of outputs). The untiled width always qualifies."""
    height, full_width = output_size
    key = ("layout", _conv_key(conv), input_size, pixels, batch, dtype, torch.get_num_threads())
    if key in _BACKENDS:
        return _BACKENDS[key]
    # tiles of one stage run on parallel threads: one thread checks, the others wait for its answer (a
    # provisional entry visible mid-check gave concurrent tiles another layout than later ones, seen in CI)
    with _LAYOUT_LOCK:
        if key not in _BACKENDS:
            _BACKENDS[key] = _checked_layout(conv, input_size, output_size, pixels, batch, dtype)
    return _BACKENDS[key]


def _checked_layout(conv: nn.Conv2d, input_size: tuple[int, int], output_size: tuple[int, int], pixels: int,
                    batch: int, dtype: torch.dtype) -> tuple[int, int]:
    height, full_width = output_size
    first = -(-pixels // height)
    candidates = list(range(first, min(first + 4, full_width)))
    width = first + 4
    while width < full_width:
        candidates.append(width)
        width *= 2
    x, y = _pointwise_reference(conv, input_size, output_size, batch, dtype)
    for width in candidates:
        count = height * width
        with torch.no_grad():
            candidate = _unit_pointwise(conv, x[..., :count].reshape(batch, -1, height, width), input_size)
        if torch.equal(candidate.reshape(batch, y.shape[1], count), y[..., :count]):
            return height, width
    return height, full_width


def _unit_pointwise(conv: nn.Conv2d, x: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """``conv`` as a stride-1 1x1 conv of ``x``, on the backend aten picks for the untiled map."""
    backend = untiled_conv_backend(conv, input_size, x.shape[0], x.dtype)
    return _FORCEABLE_BACKENDS[backend](x, conv, (1, 1), (0, 0), (1, 1))


def _pointwise_reference(conv: nn.Conv2d, input_size: tuple[int, int], output_size: tuple[int, int], batch: int,
                         dtype: torch.dtype):
    """Random pixels (flattened) and the untiled-shape 1x1 conv of them, once per conv and shape."""
    key = ("pointwise-reference", _conv_key(conv), input_size, batch, dtype, torch.get_num_threads())
    if key not in _BACKENDS:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((batch, conv.in_channels) + tuple(output_size), generator=generator).to(dtype)
        with torch.no_grad():
            y = _unit_pointwise(conv, x, input_size)
        pixels = output_size[0] * output_size[1]
        _BACKENDS[key] = (x.reshape(batch, -1, pixels), y.reshape(batch, -1, pixels))
    return _BACKENDS[key]


def _per_group(function):
    """aten runs the slow convs one group at a time and concatenates (they have no groups argument)."""
    def run(x, conv, stride, padding, dilation):
        if conv.groups == 1:
            return function(x, conv.weight, conv.bias, stride, padding, dilation)
        xs, ws = x.chunk(conv.groups, 1), conv.weight.chunk(conv.groups, 0)
        bs = conv.bias.chunk(conv.groups) if conv.bias is not None else [None] * conv.groups
        return torch.cat([function(*args, stride, padding, dilation) for args in zip(xs, ws, bs)], 1)
    return run


_POINTWISE_BACKENDS = (torch._C._ConvBackend.Mkldnn, torch._C._ConvBackend.Slow2d)

_FORCEABLE_BACKENDS = {
    torch._C._ConvBackend.Mkldnn: lambda x, conv, stride, padding, dilation: torch.ops.aten.mkldnn_convolution(
        x.contiguous(), conv.weight, conv.bias, padding, stride, dilation, conv.groups),
    torch._C._ConvBackend.Slow2d: _per_group(lambda x, w, b, stride, padding, _dilation: torch.ops.aten.
                                              _slow_conv2d_forward(x.contiguous(), w, w.shape[2:], b, stride, padding)),
    torch._C._ConvBackend.SlowDilated2d: _per_group(lambda x, w, b, stride, padding, dilation: torch.ops.aten.
                                                     slow_conv_dilated2d(x.contiguous(), w, w.shape[2:], b, stride,
                                                                         padding, dilation)),
}


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
                  dict(record.hyper), input_sizes, _writes_input(node, module))


def _writes_input(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.kwargs.get("inplace", False) or node.target in _IN_PLACE_OPERATORS:
        return True
    if node.op == "call_function" and any(arg is True for arg in node.args[1:]):
        return True  # F.relu(x, True): the only positional bool of the pointwise functionals is inplace
    return node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__")


_IN_PLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})

