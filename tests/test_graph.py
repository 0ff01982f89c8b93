"""The DAG a user gets for a model: right shapes, counted FLOPs, parameters, and clear errors."""
import json

import pytest
import torch
import torch.nn as nn

from conftest import ZOO_MODELS, zoo_graph
from deploy.cli import main as d3
from partitioner.graph import ModelTraceError, build_graph
from partitioner.zoo import UnknownModelError, load_model


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_model_traces_with_shapes_and_flops(name):
    graph = zoo_graph(name)
    assert len(graph.order) == graph.dag.number_of_nodes() - len(graph.input_names)
    convs = [graph.records[n] for n in graph.order if graph.records[n].op_kind == "conv"]
    assert convs, "every zoo model has convolutions"
    for record in convs:
        assert record.output_shape and record.output_bytes == record.output_elements * 4
        assert {"kernel", "stride", "padding", "dilation", "groups", "in_channels", "out_channels"} <= set(record.hyper)
    # FLOPs are counted per node and add up to the whole model's count
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        load_model(name)(torch.zeros(graph.input_shape))
    assert graph.total_flops == counter.get_total_flops()
    assert nx_is_dag(graph)


def nx_is_dag(graph):
    import networkx as nx

    return nx.is_directed_acyclic_graph(graph.dag)


def test_conv_flops_are_twice_the_macs_and_edges_carry_bytes():
    graph = zoo_graph("resnet18")
    conv1 = graph.records["conv1"]
    assert conv1.output_shape == (1, 64, 112, 112)
    assert conv1.flops == 2 * (64 * 112 * 112) * (3 * 7 * 7)
    assert conv1.hyper["kernel"] == (7, 7) and conv1.hyper["stride"] == (2, 2) and conv1.hyper["padding"] == (3, 3)
    assert conv1.param_bytes == 64 * 3 * 7 * 7 * 4
    fc = graph.records["fc"]
    assert fc.op_kind == "linear" and fc.flops == 2 * 512 * 1000
    assert graph.dag.edges["conv1", "bn1"]["bytes"] == 64 * 112 * 112 * 4
    add = next(graph.records[n] for n in graph.order if graph.records[n].op_kind == "add")
    assert len(add.input_names) == 2  # residual: two producers


def test_cut_point_bytes_count_each_tensor_once():
    graph = zoo_graph("resnet18")
    cuts = dict(graph.cut_point_bytes())
    position = graph.order.index("maxpool") + 1
    # right after the stem's maxpool only its output crosses, although two nodes of layer1 read it
    assert cuts[position] == graph.records["maxpool"].output_bytes
    assert cuts[0] == graph.records["x"].output_bytes


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x * 2
        return x


def test_untraceable_model_gives_a_clear_error_naming_the_op():
    with pytest.raises(ModelTraceError) as info:
        build_graph(DataDependent(), (1, 3, 8, 8), "data_dependent")
    message = str(info.value)
    assert "data_dependent" in message and "if x.sum() > 0" in message


def test_unknown_model_and_bad_shape_are_one_line_errors(capsys):
    with pytest.raises(UnknownModelError, match="resnet50"):
        load_model("resnet5")
    assert d3(["graph", "resnet5"]) == 2
    assert d3(["graph", "resnet18", "--input", "1x3x22"]) == 2
    assert d3(["graph", "resnet18", "--input", "1xtwo"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3


def test_weights_file_is_loaded_with_weights_only(tmp_path):
    model = load_model("squeezenet1_1", seed=7)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model("squeezenet1_1", weights_path=path)  # default seed 0, then the file's weights
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(load_model("squeezenet1_1").features[0].weight, model.features[0].weight)


def test_graph_cli_json(capsys):
    assert d3(["graph", "resnet18", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"model", "nodes", "edges", "gflops", "param_mb"} <= set(summary)
    assert summary["model"] == "resnet18" and summary["nodes"] == 69
    assert 3.5 < summary["gflops"] < 3.8 and 45 < summary["param_mb"] < 48
    assert summary["largest_cut"]["bytes"] > summary["smallest_cut"]["bytes"]
