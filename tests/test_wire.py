"""The wire format: round trips for every dtype/shape, and clear errors (never crashes) for bad frames."""
import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiers import wire
from tiers.wire import Message, WireError

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    seed = draw(st.integers(0, 1000))
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * 50
    return values.to(dtype) if dtype != torch.bool else values > 0


@st.composite
def messages(draw):
    count = draw(st.integers(0, 4))
    names = draw(st.lists(st.text("abcdefgh_0123456789", min_size=1, max_size=12), min_size=count,
                          max_size=count, unique=True))
    return Message(kind=draw(st.sampled_from(["infer", "result", "tile"])),
                   request_id=draw(st.text(max_size=20)), model="resnet18",
                   plan_version=draw(st.integers(-1, 10**6)), plan_id="abc",
                   meta={"note": draw(st.text(max_size=30))},
                   tensors={name: draw(tensors()) for name in names})


def assert_same(a: Message, b: Message) -> None:
    assert (a.kind, a.request_id, a.plan_version, a.plan_id, a.meta) == (b.kind, b.request_id, b.plan_version,
                                                                       b.plan_id, b.meta)
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].dtype == b.tensors[name].dtype
        assert torch.equal(a.tensors[name], b.tensors[name])


@settings(max_examples=60, deadline=None)
@given(messages(), st.sampled_from([1, 7, 64, wire.CHUNK_BYTES]))
def test_frames_round_trip(message, chunk_bytes):
    frames = wire.encode_frames(message, chunk_bytes=chunk_bytes)
    decoded = wire.decode_frames(frames)
    assert_same(message, decoded)
    for tensor in decoded.tensors.values():  # the receiver may write into what it got
        tensor.zero_() if tensor.numel() else None


@settings(max_examples=60, deadline=None)
@given(messages(), st.integers(1, 50))
def test_body_round_trip_whole_and_streamed(message, piece):
    body = wire.encode_body_bytes(message)
    assert_same(message, wire.decode_body(body))
    reader = wire.BodyReader()
    for start in range(0, len(body), piece):
        reader.feed(body[start:start + piece])
    assert_same(message, reader.finish())


def test_non_contiguous_and_large_tensor_round_trip():
    big = torch.arange(3 * 1000 * 1000, dtype=torch.float32).reshape(3, 1000, 1000)
    message = Message(kind="infer", tensors={"t": big.transpose(1, 2), "big": big})
    frames = wire.encode_frames(message)
    assert len(frames) > 20  # cut into ~1 MiB frames
    decoded = wire.decode_frames(frames)
    assert torch.equal(decoded.tensors["t"], big.transpose(1, 2))
    assert torch.equal(decoded.tensors["big"], big)


def _frames(tensor=None, **header_changes):
    message = Message(kind="infer", tensors={"x": torch.ones(2, 3) if tensor is None else tensor})
    frames = [bytes(f) for f in wire.encode_frames(message)]
    header = json.loads(frames[0])
    header.update(header_changes)
    frames[0] = json.dumps(header).encode()
    return frames


@pytest.mark.parametrize("frames, words", [
    ([], "empty"),
    ([b"\xff\xfe not json"], "JSON"),
    ([b"[1, 2]"], "object"),
    (_frames(protocol=99), "protocol"),
    (_frames(plan_version="7"), "plan_version"),
    (_frames(tensors=[["x", "complex64", [2, 3], 24]]), "dtype"),
    (_frames(tensors=[["x", "float32", [2, 3], 25]]), "do not match"),
    (_frames(tensors=[["x", "float32", [2, -3], -24]]), "shape"),
    (_frames(tensors=[["x", "float32", [2, 3]]]), "entry"),
    (_frames(tensors=[["x", "float32", [1], 4], ["x", "float32", [5], 20]]), "share a name"),
    (_frames()[:1], "truncated"),
    (_frames() + [b"extra"], "extra"),
])
def test_bad_frames_raise_clear_errors(frames, words):
    with pytest.raises(WireError, match=words):
        wire.decode_frames(frames)


def test_oversized_message_is_refused_before_allocating():
    header = {"protocol": 1, "kind": "infer", "request_id": "", "model": "", "plan_version": 0, "plan_id": "",
              "model_digest": "", "meta": {}, "tensors": [["x", "float32", [1 << 30, 1 << 8], 1 << 40]]}
    with pytest.raises(WireError, match="over the"):
        wire.decode_frames([json.dumps(header).encode()], max_message_bytes=1 << 20)
    with pytest.raises(WireError, match="over the"):
        wire.decode_frames(_frames(torch.ones(1000)), max_message_bytes=100)


def test_bad_bodies_raise_clear_errors():
    good = wire.encode_body_bytes(Message(kind="infer", tensors={"x": torch.ones(10)}))
    cases = [(b"", "shorter|truncated"), (b"HTTP" + good[4:], "not a d3 message"),
             (good[:4] + struct.pack("<I", 1 << 30) + good[8:], "over the"),
             (good[:20], "truncated"), (good[:-3], "truncated"), (good + b"x", "extra")]
    for body, words in cases:
        with pytest.raises(WireError, match=words):
            wire.decode_body(body)
        reader = wire.BodyReader()
        with pytest.raises(WireError, match=words):
            reader.feed(body)
            reader.finish()


def test_unsupported_values_are_refused_on_send():
    with pytest.raises(WireError, match="only tensors"):
        wire.encode_frames(Message(kind="x", tensors={"a": [1, 2]}))
    with pytest.raises(WireError, match="dtype"):
        wire.encode_body(Message(kind="x", tensors={"a": torch.ones(2, dtype=torch.complex64)}))
