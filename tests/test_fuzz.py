"""Bad input: the decoders under hypothesis (any bytes -> a Message or a WireError, nothing else), and the
live edge daemon and cloud endpoint answering malformed, inconsistent, wrong-dtype/shape, unknown-plan,
wrong-digest, replayed and oversized requests with a clear error while serving everyone else."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.zoo import example_input
from tests.test_security import LoopThread, post, reference, split_plan, start_cloud, zmq_ask
from tiers import wire
from tiers.edge import EdgeConfig, EdgeDaemon
from tiers.wire import Message, WireError

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")
SHAPE = (1, 3, 64, 64)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_message() -> Message:
    return Message(kind="infer", request_id="r1", model="resnet18", plan_id="p" * 16,
                   meta={"plan": "{}", "deadline_ms": 1000},
                   tensors={"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.int64)})


def decodes_or_refuses(function, *args) -> Message | None:
    try:
        message = function(*args)
    except WireError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    assert isinstance(message, Message)
    return message


# ------------------------------------------------------------------------------------- decoders
@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_random_frames_decode_or_raise_wire_error(frames):
    decodes_or_refuses(wire.decode_frames, frames)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bodies_decode_or_raise_wire_error(body):
    decodes_or_refuses(wire.decode_body, body)
    decodes_or_refuses(wire.decode_body, wire.MAGIC + struct.pack("<I", len(body)) + body)


@FUZZ
@given(st.data())
def test_mutated_valid_bodies_never_crash_the_decoders(data):
    body = bytearray(wire.encode_body_bytes(valid_message()))
    for _ in range(data.draw(st.integers(1, 8))):
        if not body:
            break
        position = data.draw(st.integers(0, len(body) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if action == "flip":
            body[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del body[position:]
        elif action == "insert":
            body[position:position] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del body[position:position + data.draw(st.integers(1, 16))]
    decodes_or_refuses(wire.decode_body, bytes(body))
    reader = wire.BodyReader()
    chunk = data.draw(st.integers(1, 64))
    try:
        for start in range(0, len(body), chunk):
            reader.feed(bytes(body[start:start + chunk]))
        reader.finish()
    except WireError:
        pass


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                            max_leaves=12)


@FUZZ
@given(st.dictionaries(st.sampled_from(["protocol", "kind", "request_id", "model", "plan_version", "plan_id",
                                        "model_digest", "meta", "tensors"]), _json_values),
       st.lists(st.lists(_json_values, min_size=4, max_size=4) | _json_values, max_size=3),
       st.binary(max_size=64))
def test_inconsistent_headers_are_refused(fields, tensors, payload):
    header = {"protocol": 1, "kind": "infer", "request_id": "", "model": "", "plan_version": 0, "plan_id": "",
              "model_digest": "", "meta": {}, "tensors": tensors, **fields}
    decodes_or_refuses(wire.decode_frames, [json.dumps(header).encode(), payload])


@FUZZ
@given(st.lists(st.integers(0, 2**41), max_size=6), st.sampled_from(["float32", "float64", "uint8", "bool"]))
def test_huge_or_empty_shapes_are_refused_before_allocation(shape, dtype):
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    nbytes = itemsize
    for dim in shape:
        nbytes *= dim
    header = {"protocol": 1, "kind": "infer", "request_id": "", "model": "", "plan_version": 0, "plan_id": "",
              "model_digest": "", "meta": {}, "tensors": [["t", dtype, shape, nbytes]]}
    decodes_or_refuses(wire.decode_frames, [json.dumps(header).encode(), b"\0" * min(nbytes, 64)])


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=8),
                       st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.bool, torch.float16]), max_size=3),
       st.lists(st.integers(0, 5), max_size=3))
def test_round_trip_is_exact(dtypes, shape):
    tensors = {name: (torch.rand(shape) * 100).to(dtype) for name, dtype in dtypes.items()}
    message = Message(kind="k", request_id="i", tensors=tensors)
    for decoded in (wire.decode_frames(wire.encode_frames(message, chunk_bytes=7)),
                    wire.decode_body(wire.encode_body_bytes(message))):
        assert decoded.tensors.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert decoded.tensors[name].dtype == tensor.dtype and torch.equal(decoded.tensors[name], tensor)


# ------------------------------------------------------------------------------------- live servers
@pytest.fixture(scope="module")
def servers():
    cloud, app, url = start_cloud()
    address = f"tcp://127.0.0.1:{__import__('tiers.demo', fromlist=['free_port']).free_port()}"
    edge = EdgeDaemon(EdgeConfig(name="edge0", bind=address, cloud_url=url))
    edge_thread = LoopThread(edge.run, "edge0")
    yield {"url": url, "address": address}
    edge_thread.stop()
    cloud.stop()


def infer_message(plan, default_id: str, **overrides) -> Message:
    from tests.conftest import zoo_graph

    fields = dict(kind="infer", request_id=default_id, model=plan.model, plan_version=plan.version,
                  plan_id=wire.plan_digest(plan.to_json()),
                  model_digest=wire.model_digest(zoo_graph("resnet18", SHAPE).module),
                  meta={"plan": plan.to_json()}, tensors={"x": example_input(SHAPE)})
    return Message(**{**fields, **overrides})


BAD_REQUESTS = {  # name -> (change to a valid request, error code expected)
    "wrong dtype": (dict(tensors={"x": example_input(SHAPE).double()}), "bad_request"),
    "wrong shape": (dict(tensors={"x": torch.zeros(1, 3, 32, 32)}), "bad_request"),
    "missing tensor": (dict(tensors={"y": example_input(SHAPE)}), "bad_request"),
    "unknown plan": (dict(plan_id="0" * 16, meta={}), "unknown_plan"),
    "plan digest mismatch": (dict(plan_id="0" * 16), "bad_request"),
    "model digest": (dict(model_digest="f" * 16), "model_mismatch"),
    "wrong model": (dict(model="alexnet"), "bad_request"),
    "expired deadline": (dict(meta={"deadline_ms": -1}), "deadline"),
    "bad deadline": (dict(meta={"deadline_ms": "soon"}), "bad_request"),
    "wrong kind": (dict(kind="teleport"), "bad_request"),
}


def test_live_edge_answers_every_bad_request_with_a_clear_error(servers):
    plan = split_plan("resnet18", 2, 69, edge_nodes=1)  # device + edge
    good = infer_message(plan, "good-1")
    reply = zmq_ask(servers["address"], [bytes(f) for f in wire.encode_frames(good)], wait_ms=60000)
    assert reply.kind == "error" and reply.meta["code"] == "bad_request"  # x is not the edge's input...
    plan_inputs = infer_message(plan, "probe").tensors  # ...so build the edge segment's real inputs
    from tiers.runtime import ModelStore

    entry = ModelStore().add_plan(plan.to_json())
    values = entry.segmented.device.run({"x": plan_inputs["x"]})
    good = infer_message(plan, "good-2", tensors=values)
    reply = zmq_ask(servers["address"], [bytes(f) for f in wire.encode_frames(good)], wait_ms=60000)
    assert reply.kind == "result", reply.meta
    name = next(iter(values))
    cases = {
        "replayed id": (dict(request_id="good-2", tensors=values), "replayed"),
        "wrong dtype": (dict(tensors={name: values[name].double()}), "bad_request"),
        "wrong shape": (dict(tensors={name: values[name][..., :3]}), "bad_request"),
        **{k: v for k, v in BAD_REQUESTS.items() if k not in ("wrong dtype", "wrong shape")},
    }
    for index, (case, (change, code)) in enumerate(cases.items()):
        message = infer_message(plan, f"bad-{index}", **{"tensors": values, **change})
        reply = zmq_ask(servers["address"], [bytes(f) for f in wire.encode_frames(message)], wait_ms=30000)
        assert reply is not None and reply.kind == "error", case
        assert reply.meta["code"] == code, (case, reply.meta)
        assert reply.meta["error"] and "\n" not in reply.meta["error"], case
    for frames in ([b"garbage"], [b"{}"], [bytes(wire.encode_frames(good)[0])], [b"", b"x" * 100]):
        reply = zmq_ask(servers["address"], frames, wait_ms=10000)
        assert reply is not None and reply.meta["code"] == "bad_frame"
    # still serving
    reply = zmq_ask(servers["address"], [bytes(f) for f in wire.encode_frames(infer_message(plan, "good-3", tensors=values))],
                    wait_ms=30000)
    assert reply.kind == "result"


def test_live_cloud_answers_every_bad_request_with_a_clear_error(servers):
    plan = split_plan("resnet18", 0, 0)
    x, expected = reference(7)
    status, body, _ = post(servers["url"] + "/v1/infer", wire.encode_body_bytes(infer_message(plan, "c-good", tensors={"x": x})))
    assert status == 200
    assert (wire.decode_body(body).tensors[list(wire.decode_body(body).tensors)[0]] - expected).abs().max() <= 1e-4
    cases = {"replayed id": (dict(request_id="c-good"), "replayed"), **BAD_REQUESTS}
    for index, (case, (change, code)) in enumerate(cases.items()):
        status, body, _ = post(servers["url"] + "/v1/infer", wire.encode_body_bytes(infer_message(plan, f"c-{index}", **change)))
        reply = wire.decode_body(body)
        assert status in (400, 409, 504) and reply.meta["code"] == code, (case, status, reply.meta)
    oversized = wire.MAGIC + struct.pack("<I", 10) + b"x" * 10
    for body in (b"", b"D3W1", oversized, wire.encode_body_bytes(infer_message(plan, "cut"))[:-100]):
        status, answer, _ = post(servers["url"] + "/v1/infer", body)
        assert status == 400 and wire.decode_body(answer).meta["code"] == "bad_frame"
    status, body, _ = post(servers["url"] + "/v1/infer", wire.encode_body_bytes(infer_message(plan, "c-good-2", tensors={"x": x})))
    assert status == 200
