"""The edge input in row bands: the first stage computed on them as they arrive gives the untiled output,
a tile never reads rows that have not arrived, bad bands are refused, and on a slow link ``auto`` runs the
streamed head through real edge daemons without distorting the device's bandwidth estimate."""
import threading
import time

import pytest
import torch

from partitioner.edge_strategies.online import STREAM, WHOLE, OnlineSelector
from partitioner.streaming import StreamTimes, plan_streamed_head, run_streamed_head, streamed_seconds
from partitioner.zoo import example_input
from tests.conftest import zoo_graph
from tiers.bands import RowStream, StreamError, split_message
from tiers.wire import Message

SHAPE = (1, 3, 160, 160)


def reference(graph, x):
    with torch.no_grad():
        return graph.module(x)


def streamed_request(x, bands, tiles, name="x"):
    request = Message(kind="infer", request_id="r1", model="m", meta={}, tensors={name: x})
    return split_message(request, name, bands, tiles)


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2"])
def test_the_head_computed_on_arriving_bands_equals_the_untiled_model(model):
    graph = zoo_graph(model, SHAPE)
    x = example_input(SHAPE, seed=3)
    head = plan_streamed_head(graph, graph.order, graph.input_names, graph.output_names, 4)
    assert head is not None and len(head.head.tiles) == 4 and head.band_ends[-1] == SHAPE[-2]
    # bands end where tiles' inputs end: tile k waits for band k only
    assert [tile.input_regions[head.stream_name][0][1] for tile in head.head.tiles] == head.band_ends
    messages = streamed_request(x, head.bands(), len(head.head.tiles), head.stream_name)
    first = messages[0]
    stream = RowStream(first)
    waited = []

    def feed():
        for message in messages[1:]:
            time.sleep(0.03)
            stream.feed(message)

    def wait_rows(row):
        stream.wait_rows(row, 10)
        waited.append((row, stream.rows))

    feeder = threading.Thread(target=feed)
    feeder.start()
    outputs, times = run_streamed_head(graph, head, first.tensors, wait_rows)
    feeder.join()
    assert all(have >= row for row, have in waited) and len(waited) == len(head.head.tiles)
    assert len(times.tiles_s) == 4 and times.tail_s > 0
    assert torch.equal(outputs[graph.output_names[0]], reference(graph, x))


def test_small_or_non_spatial_inputs_are_not_streamed():
    graph = zoo_graph("resnet18", (1, 3, 64, 64))  # 48 KiB: arrives in a few ms, nothing to overlap
    assert plan_streamed_head(graph, graph.order, graph.input_names, graph.output_names, 4) is None
    graph = zoo_graph("resnet18", SHAPE)
    tail = graph.order[-2:]  # flatten, fc: not tileable
    assert plan_streamed_head(graph, tail, [graph.order[-3]], graph.output_names, 4) is None


def test_bands_out_of_order_of_the_wrong_shape_or_missing_are_refused():
    x = torch.randn(1, 3, 64, 64)
    messages = streamed_request(x, [(0, 16), (16, 40), (40, 64)], 3)
    stream = RowStream(messages[0])
    with pytest.raises(StreamError, match="out of order"):
        stream.feed(messages[2])
    bad = Message(kind="band", request_id="r1", meta={"rows": [16, 40]}, tensors={"x": torch.randn(1, 3, 20, 64)})
    with pytest.raises(StreamError, match="expected"):
        stream.feed(bad)
    with pytest.raises(StreamError, match="did not arrive"):
        stream.wait_rows(40, timeout_s=0.05)
    stream.feed(messages[1])
    stream.feed(messages[2])
    assert stream.complete and torch.equal(stream.buffer, x)
    gaps = streamed_request(x, [(0, 16), (20, 64)], 2)
    with pytest.raises(StreamError, match="do not cover"):
        RowStream(gaps[0])


def test_auto_ranks_streaming_by_the_current_transfer_not_by_a_run_on_a_fast_link():
    selector = OnlineSelector.from_plans({"tiles": _FakePlan(50.0)})
    selector.add_candidate(STREAM)
    assert selector.candidates[-2:] == [STREAM, WHOLE]
    selector.record("tiles", 0.100)
    selector.record(WHOLE, 0.080)
    times = StreamTimes([0.02, 0.02, 0.02, 0.02], 0.03)  # 110 ms of compute, 50 after the last band
    selector.note_transfer(0.0)  # measured on a fast link: nothing hidden, slower than whole
    selector.record_stream(times, streamed_seconds(times, 0.0))
    assert selector.choose_name() == WHOLE
    selector.note_transfer(0.3)  # the input now takes 300 ms to come in: the tiles hide under it
    assert selector.expected_s(STREAM) == pytest.approx(0.05) and selector.choose_name() == STREAM


class _FakePlan:
    def __init__(self, predicted_ms):
        self.predicted_ms = predicted_ms
        self.notes = {}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The given buffer is not writable")
def test_a_streamed_request_through_edge_daemons_is_exact_and_keeps_the_bandwidth_estimate(tmp_path):
    from partitioner.plan import Plan
    from tiers.demo import LocalCluster
    from tiers.device import Client
    from traces.shaping import TokenBucket

    graph = zoo_graph("resnet18", SHAPE)
    x = example_input(SHAPE, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the edge daemons run it: the same kernels, so the same bits
    try:
        expected = reference(graph, x)
    finally:
        torch.set_num_threads(threads)
    plan = Plan("resnet18", SHAPE, {n: "edge" for n in graph.order}, edge_weights=[1.0, 1.0, 1.0],
                strategy="fixed", edge_strategy="auto")
    rate_bps = 8e6  # 307 KB input: ~0.3 s on the link
    local = LocalCluster.create(edge_nodes=3, edge_slowdown=1.0, device_slowdown=1.0, workdir=str(tmp_path))
    try:
        local.start(timeout_s=120)
        with Client("resnet18", edge=local.cluster.edges[0].address, plan=plan, timeout_s=120,
                    shapers={"device_edge": TokenBucket(rate_bps, burst_bytes=16 * 1024)}) as client:
            ran = []
            for _ in range(8):  # auto tries each candidate once, streaming among them
                output = client.infer(x)
                ran.append(client.timings[-1].edge_strategy)
                diff = float((output - expected).abs().max())
                # streamed tiles are bit-exact; channel splits that sum partial results (iop) round differently
                assert diff == 0.0 if ran[-1] == STREAM else diff < 1e-5, (ran, diff)
            estimate = client.links.bps["device_edge"]
        from tiers.demo import edge_status

        auto = edge_status(local.cluster.edges[0].address)["auto"]  # what auto measured, per edge segment
    finally:
        local.stop()
    assert STREAM in ran, ran
    (measured,) = auto.values()
    assert measured["ms"][STREAM] is not None and measured["stream_expected_ms"] > 0 and measured["transfer_ms"] > 0
    # the edge answers how long it worked after the last band, so the upload is timed whole
    assert 0.7 * rate_bps < estimate < 1.4 * rate_bps, (estimate, ran)
