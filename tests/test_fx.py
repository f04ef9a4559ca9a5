"""timm's model tests over one ResNet-18 of every attention of the table, torch.fx included.

As huggingface/pytorch-image-models tests/test_models.py does for timm's models: test_model_forward,
test_model_backward, test_model_default_cfgs, test_model_forward_features, test_model_forward_intermediates,
test_model_forward_fx and test_model_backward_fx (here one test, on one trace), over the emca_*resnet18*
name of every attention (derived from the attention table, so a method added there is tested here too),
on small inputs. Where timm checks that something runs, these check as well that it computes what the
eager model does: the FX graph's outputs and gradients, feature_cls='fx''s maps. torch.jit.script is not
tested: it cannot compile these models, and PyTorch deprecates TorchScript (README, Export).
"""

import pytest
import timm
import torch
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from emca.layers import pooling
from emca.layers.create_attn import ATTENTIONS
from emca.layers.emca import EMCA
from emca.layers.fcanet import dct_filters
from emca.models.registry import MODELS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = [name for name, (backbone, _) in MODELS.items() if backbone == "resnet18"]
SIZE = 32  # timm's tests take 128 px; 32 keeps 15 ResNet-18s fast, and stage 4 is 1 x 1 (FcaNet resamples)


def create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """timm's _create_fx_model for a one-output model: torchvision's feature extractor that returns the
    graph's last node, in train and in eval mode, traced with timm's leaf modules and functions."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def gradients(model: torch.nn.Module, run, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """run(x) and the gradients of its mean with respect to model's parameters."""
    model.zero_grad(set_to_none=True)
    output = run(x)
    output = next(iter(output.values())) if isinstance(output, dict) else output
    output.mean().backward()
    return output, [p.grad for p in model.parameters()]


def test_every_attention_of_the_table_has_its_model():
    assert sorted(MODELS[name][1] or "none" for name in NAMES) == sorted(ATTENTIONS)


@pytest.mark.parametrize("name", NAMES)
def test_model_forward(name):
    model = create(name).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    output = model(x)
    assert output.shape == (1, 1000) and not output.isnan().any()
    model.set_grad_checkpointing()
    assert torch.equal(model(x), output)


@pytest.mark.parametrize("name", NAMES)
def test_model_backward(name):
    model = create(name, num_classes=42).train()
    output, grads = gradients(model, model, torch.randn(2, 3, SIZE, SIZE))
    assert output.shape == (2, 42) and not output.isnan().any()
    assert all(grad is not None for grad in grads), "a parameter got no gradient"


@pytest.mark.parametrize("name", NAMES)
def test_model_default_cfgs(name):
    model = create(name).eval()
    cfg, state_dict = model.default_cfg, model.state_dict()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, *cfg["input_size"]))
        assert features.shape == (1, model.num_features, *cfg["pool_size"])
        assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model.forward_head(features).shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        assert model.forward_head(features).shape == features.shape
        unpooled = create(name, num_classes=0, global_pool="").eval()(torch.randn(1, 3, SIZE, SIZE))
        assert unpooled.shape == (1, model.num_features, SIZE // 32, SIZE // 32)
    assert f"{cfg['classifier']}.weight" in state_dict and f"{cfg['first_conv']}.weight" in state_dict


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_features(name):
    """features_only through timm's FeatureGetterNet (the default) and FeatureGraphNet (fx): the same maps."""
    getter = create(name, features_only=True).eval()
    graph = create(name, features_only=True, feature_cls="fx").eval()
    channels, reductions = getter.feature_info.channels(), getter.feature_info.reduction()
    assert graph.feature_info.channels() == channels and len(channels) == 5
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        maps, graph_maps = getter(x), graph(x)
    expected = [(1, c, SIZE // r, SIZE // r) for c, r in zip(channels, reductions, strict=True)]
    assert [tuple(m.shape) for m in maps] == expected
    assert all(torch.equal(a, b) for a, b in zip(maps, graph_maps, strict=True))
    assert not any(m.isnan().any() for m in maps)


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_intermediates(name):
    model = create(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x)
        assert [t.shape[1] for t in intermediates] == info.channels()
        assert [SIZE // t.shape[-1] for t in intermediates] == info.reduction()
        assert torch.equal(output, model.forward_features(x))
        model.set_grad_checkpointing()
        assert torch.equal(model.forward_intermediates(x)[0], output)


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_and_backward_fx(name):
    """The traced graph (torch.fx.symbolic_trace, and timm's way) runs as the model in eval mode and
    trains as it: the same outputs and gradients, every parameter's included."""
    model = create(name, num_classes=42).eval()
    graphs = (torch.fx.symbolic_trace(model), fx_model(model))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        output = model(x)
        assert torch.equal(graphs[0](x), output) and torch.equal(next(iter(graphs[1](x).values())), output)
    model.train()
    output, grads = gradients(model, model, x)
    for graph in graphs:
        graph_output, graph_grads = gradients(model, graph.train(), x)
        assert torch.equal(graph_output, output)
        assert all(torch.equal(a, b) for a, b in zip(graph_grads, grads, strict=True))


def test_poolings_are_leaves_of_the_graph():
    """One node per pooling, which calls the pooling's autograd Function (its hand-written backward)
    rather than recording its forward's ops (SRM's in-place square then failed autograd)."""
    model = create("emca_srm_resnet18")
    graph = torch.fx.symbolic_trace(model)
    pooled = [node.args[1] for node in graph.graph.nodes if node.target is pooling._pool]
    emca_modules = sum(isinstance(module, EMCA) for module in model.modules())
    assert pooled == ["mean_std"] * (emca_modules + len(model.pooled_outputs))


def test_fcanets_graph_chooses_its_filters_at_run_time():
    """A graph traced once serves every input size: at 64 px stages 1-2 take the DCT basis itself
    (16 x 16, 8 x 8 maps) and stages 3-4 its resampling; at 48 px every stage resamples."""
    model = create("emca_resnet18_fca", fca_dct_size=[16, 8, 7, 7]).eval()
    graph = torch.fx.symbolic_trace(model)
    assert sum(node.target is dct_filters for node in graph.graph.nodes) == 8  # one per block
    with torch.no_grad():
        for size in (64, 48):
            x = torch.randn(1, 3, size, size)
            assert torch.equal(graph(x), model(x)), size
