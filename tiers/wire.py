"""The wire format: a JSON header plus raw tensor buffers. Never pickle.

A message is a small JSON header (what the request is: kind, request id, model, plan version and digest,
timings, errors) that also describes each tensor (name, dtype, shape, byte length), followed by the raw
bytes of the tensors in header order. Two framings of the same message:

* ZeroMQ multipart: ``[header, frame, frame, ...]``: each tensor is cut into frames of ``chunk_bytes``
  (``transport.send_zmq``: TENSOR_FRAME_BYTES, so a tensor is one frame up to 256 MiB), memoryviews of the
  tensor itself (``copy=False``: no copy on send); the receiver builds a one-frame tensor on the frame's
  memory (no copy) and copies the frames of a cut tensor once into a fresh tensor.
* one HTTP body: ``MAGIC | u32 header length | header | tensor bytes ...``.

Every field is validated before anything is allocated: a frame that is oversized, truncated or that
disagrees with its header raises :class:`WireError` (a ValueError) with one line naming the problem.
Why JSON and not msgpack/protobuf: the header is tiny next to the tensors and JSON needs no dependency;
why not pickle: a pickled frame runs code on the receiver.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import warnings

import torch

MAGIC = b"D3W1"
PROTOCOL = 1
CHUNK_BYTES = 1 << 20  # encode_frames' default frame size (small frames suit tests and tiny links)
# What transport.send_zmq uses: a tensor up to this size travels as one frame, which the receiver uses in
# place (no copy: libzmq already read it into memory of its own); larger ones are cut and copied together.
# libzmq streams a large frame to the socket as it goes, so one big frame pipelines as well as many.
TENSOR_FRAME_BYTES = 256 << 20
MAX_HEADER_BYTES = 1 << 20  # a plan JSON for a 1000-node model is ~50 KB
MAX_MESSAGE_BYTES = 1 << 30  # default cap on the tensor bytes of one message (1 GiB)
MAX_TENSORS = 4096
MAX_DIMS = 16
SOCKET_BUFFER_BYTES = 4 << 20  # SNDBUF/RCVBUF for ZeroMQ and raw sockets

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_BODY_PREFIX = struct.Struct("<4sI")

# Received frames are read-only; torch.frombuffer only reads them here (the bytes are copied into a
# fresh tensor at once), so its "non-writable buffer" warning does not apply.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class WireError(ValueError):
    """A frame or body that cannot be a valid message (the peer gets this text back)."""


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Message:
    """One request or reply: header fields and named tensors."""

    kind: str  # infer, result, error, tile, tile_result, hello, probe, ...
    request_id: str = ""
    model: str = ""
    plan_version: int = -1
    plan_id: str = ""  # digest of the plan JSON: versions of different clients may collide, digests do not
    model_digest: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # anything else JSON-able (plan JSON, timings, error)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def plan_digest(plan_json: str) -> str:
    return hashlib.sha256(plan_json.encode()).hexdigest()[:16]


def model_digest(module: torch.nn.Module) -> str:
    """Digest of a model's parameters and buffers: tiers refuse requests made with other weights."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(_tensor_bytes(value.detach().cpu()))
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- encoding
def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A read-only byte view of a contiguous CPU tensor (no copy when it is already contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _header_bytes(message: Message, infos: list[TensorInfo]) -> bytes:
    header = {
        "protocol": PROTOCOL, "kind": message.kind, "request_id": message.request_id, "model": message.model,
        "plan_version": message.plan_version, "plan_id": message.plan_id, "model_digest": message.model_digest,
        "meta": message.meta,
        "tensors": [[info.name, info.dtype, list(info.shape), info.nbytes] for info in infos],
    }
    data = json.dumps(header, separators=(",", ":")).encode()
    if len(data) > MAX_HEADER_BYTES:
        raise WireError(f"header is {len(data)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    return data


def _describe(message: Message) -> tuple[list[TensorInfo], list[memoryview]]:
    infos, buffers = [], []
    for name, tensor in message.tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise WireError(f"value {name!r} is a {type(tensor).__name__}, only tensors cross the wire")
        if tensor.dtype not in _DTYPE_NAMES:
            raise WireError(f"tensor {name!r} has dtype {tensor.dtype}, which the wire does not carry")
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        view = _tensor_bytes(tensor)
        infos.append(TensorInfo(name, _DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), view.nbytes))
        buffers.append(view)
    return infos, buffers


def encode_frames(message: Message, chunk_bytes: int = CHUNK_BYTES) -> list[bytes | memoryview]:
    """ZeroMQ multipart frames: header, then each tensor cut into ``chunk_bytes`` slices (views, no copy).

    The views keep the tensors alive; send them with ``copy=False`` and keep the list (or the tracker)
    until the send is done."""
    infos, buffers = _describe(message)
    frames: list[bytes | memoryview] = [_header_bytes(message, infos)]
    for view in buffers:
        for start in range(0, view.nbytes, chunk_bytes):
            frames.append(view[start:start + chunk_bytes])
    return frames


def encode_body(message: Message) -> list[bytes | memoryview]:
    """The HTTP body as a list of buffers to write one after the other (prefix+header, then tensors)."""
    infos, buffers = _describe(message)
    header = _header_bytes(message, infos)
    return [_BODY_PREFIX.pack(MAGIC, len(header)) + header, *buffers]


def encode_body_bytes(message: Message) -> bytes:
    return b"".join(bytes(part) for part in encode_body(message))


# ----------------------------------------------------------------------------------------------- decoding
def _parse_header(data: bytes | memoryview, max_message_bytes: int) -> tuple[dict, list[TensorInfo]]:
    if len(data) > MAX_HEADER_BYTES:
        raise WireError(f"header is {len(data)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object")
    if header.get("protocol") != PROTOCOL:
        raise WireError(f"protocol {header.get('protocol')!r} is not supported (expected {PROTOCOL})")
    for key, kind in (("kind", str), ("request_id", str), ("model", str), ("plan_id", str),
                      ("model_digest", str), ("plan_version", int), ("meta", dict), ("tensors", list)):
        if not isinstance(header.get(key), kind) or (kind is int and isinstance(header.get(key), bool)):
            raise WireError(f"header field {key!r} must be a {kind.__name__}, got {header.get(key)!r:.80}")
    infos = [_parse_tensor_info(entry) for entry in header["tensors"]]
    if len(infos) > MAX_TENSORS:
        raise WireError(f"{len(infos)} tensors in one message, over the limit of {MAX_TENSORS}")
    if len({info.name for info in infos}) != len(infos):
        raise WireError("two tensors share a name")
    total = sum(info.nbytes for info in infos)
    if total > max_message_bytes:
        raise WireError(f"message carries {total} tensor bytes, over the {max_message_bytes}-byte limit")
    return header, infos


def _parse_tensor_info(entry: Any) -> TensorInfo:
    if not (isinstance(entry, list) and len(entry) == 4):
        raise WireError(f"tensor entry must be [name, dtype, shape, nbytes], got {entry!r:.80}")
    name, dtype, shape, nbytes = entry
    if not isinstance(name, str) or not name:
        raise WireError(f"tensor name must be a non-empty string, got {name!r:.80}")
    if not isinstance(dtype, str) or dtype not in _DTYPES:  # a list would not even hash
        raise WireError(f"tensor {name!r}: unknown dtype {dtype!r:.40}; known: {sorted(_DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise WireError(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} non-negative ints")
    if math.prod(max(d, 1) for d in shape) >= 1 << 48:  # an empty tensor's other dims would overflow
        raise WireError(f"tensor {name!r}: shape {shape} is too large")  # torch's stride arithmetic
    itemsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()
    expected = math.prod(shape) * itemsize
    if not isinstance(nbytes, int) or nbytes != expected:
        raise WireError(f"tensor {name!r}: {nbytes!r} bytes do not match shape {shape} of {dtype} ({expected})")
    return TensorInfo(name, dtype, tuple(shape), nbytes)


def _message_from(header: dict, tensors: dict[str, torch.Tensor]) -> Message:
    return Message(kind=header["kind"], request_id=header["request_id"], model=header["model"],
                   plan_version=header["plan_version"], plan_id=header["plan_id"],
                   model_digest=header["model_digest"], meta=header["meta"], tensors=tensors)


def _empty_tensor(info: TensorInfo) -> torch.Tensor:
    return torch.empty(info.shape, dtype=_DTYPES[info.dtype])


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)


def _writable_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte memoryview of a fresh contiguous tensor's storage (shares its memory)."""
    return memoryview(_byte_view(tensor).numpy()).cast("B")


def decode_frames(frames: Sequence[Any], max_message_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Frames (bytes, memoryviews or zmq.Frame) -> Message with fresh writable tensors (one copy)."""
    if not frames:
        raise WireError("empty message: no header frame")
    buffers = [frame.buffer if hasattr(frame, "buffer") else frame for frame in frames]
    header, infos = _parse_header(buffers[0], max_message_bytes)
    payload = [memoryview(b).cast("B") for b in buffers[1:]]
    total = sum(info.nbytes for info in infos)
    received = sum(view.nbytes for view in payload)
    if received != total:
        raise WireError(f"frames carry {received} tensor bytes but the header describes {total}"
                        f" ({'truncated' if received < total else 'extra data'})")
    tensors: dict[str, torch.Tensor] = {}
    frame_index, offset = 0, 0  # position inside the payload frames
    for info in infos:
        if offset == 0 and info.nbytes and frame_index < len(payload) and payload[frame_index].nbytes == info.nbytes:
            # the tensor is exactly one frame: use the frame's memory (no copy; the tensor keeps the
            # frame alive). The frame is ours alone once received, so writing to it harms no one.
            view = payload[frame_index]
            tensors[info.name] = torch.frombuffer(view, dtype=torch.uint8).view(_DTYPES[info.dtype]).reshape(
                info.shape)
            frame_index += 1
            continue
        tensor = _empty_tensor(info)
        target = _byte_view(tensor)
        filled = 0
        while filled < info.nbytes:
            view = payload[frame_index]
            take = min(view.nbytes - offset, info.nbytes - filled)
            target[filled:filled + take] = torch.frombuffer(view[offset:offset + take], dtype=torch.uint8)
            filled += take
            offset += take
            if offset == view.nbytes:
                frame_index, offset = frame_index + 1, 0
        tensors[info.name] = tensor
    return _message_from(header, tensors)


def parse_body_prefix(prefix: bytes) -> int:
    """The header length announced by the first 8 bytes of an HTTP body."""
    if len(prefix) < _BODY_PREFIX.size:
        raise WireError(f"body is {len(prefix)} bytes, shorter than the {_BODY_PREFIX.size}-byte prefix")
    magic, header_length = _BODY_PREFIX.unpack(prefix[:_BODY_PREFIX.size])
    if magic != MAGIC:
        raise WireError(f"body does not start with {MAGIC!r} (got {magic!r}): not a d3 message")
    if header_length > MAX_HEADER_BYTES:
        raise WireError(f"header is {header_length} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    return header_length


BODY_PREFIX_BYTES = _BODY_PREFIX.size


def decode_body(body: bytes | bytearray | memoryview, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    view = memoryview(body).cast("B")
    header_length = parse_body_prefix(bytes(view[:BODY_PREFIX_BYTES]))
    end = BODY_PREFIX_BYTES + header_length
    if view.nbytes < end:
        raise WireError(f"body is truncated inside the header ({view.nbytes} of {end} bytes)")
    return decode_frames([view[BODY_PREFIX_BYTES:end], view[end:]], max_message_bytes)


class BodyReader:
    """Incremental HTTP body decoder: feed chunks as they arrive; tensors are filled in place, so a
    40 MB body is copied once (socket buffer -> tensor) and never held twice."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.max_message_bytes = max_message_bytes
        self._head = bytearray()
        self._header: dict | None = None
        self._infos: list[TensorInfo] = []
        # writable byte views of the tensors being filled: a chunk lands with one plain memcpy (memoryview
        # slice assignment), ~2x cheaper per chunk than a torch slice copy_ and its dispatch
        self._targets: list[memoryview] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._index = 0
        self._filled = 0

    @property
    def header_done(self) -> bool:
        return self._header is not None

    def feed(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        if self._header is None:
            view = self._feed_head(view)
            if self._header is None:
                return
        while view.nbytes:
            if self._index >= len(self._targets):
                raise WireError("body carries more bytes than its header describes (extra data)")
            target = self._targets[self._index]
            take = min(view.nbytes, target.nbytes - self._filled)
            target[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            self._skip_full()

    def _skip_full(self) -> None:
        while self._index < len(self._targets) and self._filled == self._targets[self._index].nbytes:
            self._index, self._filled = self._index + 1, 0

    def _feed_head(self, view: memoryview) -> memoryview:
        need = BODY_PREFIX_BYTES - len(self._head)
        if need > 0:
            self._head += view[:need]
            view = view[need:]
            if len(self._head) < BODY_PREFIX_BYTES:
                return view
        header_length = parse_body_prefix(bytes(self._head[:BODY_PREFIX_BYTES]))
        need = BODY_PREFIX_BYTES + header_length - len(self._head)
        self._head += view[:need]
        view = view[need:]
        if len(self._head) < BODY_PREFIX_BYTES + header_length:
            return view
        self._header, self._infos = _parse_header(memoryview(self._head)[BODY_PREFIX_BYTES:],
                                                  self.max_message_bytes)
        for info in self._infos:
            tensor = _empty_tensor(info)
            self._tensors[info.name] = tensor
            self._targets.append(_writable_bytes(tensor))
        self._skip_full()
        return view

    def finish(self) -> Message:
        if self._header is None:
            raise WireError(f"body is truncated inside the header ({len(self._head)} bytes received)")
        if self._index < len(self._targets):
            missing = self._targets[self._index].nbytes - self._filled + sum(
                t.nbytes for t in self._targets[self._index + 1:])
            raise WireError(f"body is truncated: {missing} tensor bytes missing")
        return _message_from(self._header, self._tensors)


def error_message(request_id: str, text: str, code: str = "bad_request") -> Message:
    return Message(kind="error", request_id=request_id, meta={"error": text, "code": code})


def tensors_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
