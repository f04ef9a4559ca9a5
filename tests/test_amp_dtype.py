"""Mixed precision is the same for every attention kind: under autocast each block's output keeps the
autocast dtype, so no module (SRM's float32 cfc, EMCA's float32 scale weights) runs the rest of the
network in float32, and the float32 path is the one without autocast."""

import pytest
import torch

from emca.layers.create_attn import ATTENTIONS, default_integration, is_emca
from emca.models import EMCAResNet

EMCA_OPTIONS = (
    {"coverage": "all_stages_all", "include_stem": True},
    {"coverage": "prev_stage_all", "align": "linear", "gating": "residual"},
)
# (attention, model options): every attention of the table (a branch one in each integration where the
# integration changes the code path: EMCA's first block reads no earlier outputs in some stages),
# EMCA with its other code paths too, and the bottleneck blocks.
CASES = [(a, {"integration": "all"}) for a in ATTENTIONS if default_integration(a)]
CASES += [(a, {"integration": i}) for a in ATTENTIONS if is_emca(a) for i in ("first", "last")]
CASES += [(a, {}) for a in ATTENTIONS if not default_integration(a)]  # none, stage_end, block
CASES += [(a, o) for a in ATTENTIONS if is_emca(a) for o in EMCA_OPTIONS]
CASES += [(a, {"backbone": "resnet50"}) for a in ("srm", "emca_srm", "epsa", "sk")]  # the bottleneck block


def check_block_dtypes(attention, options, device, dtype):
    """Every block's output and the logits in `dtype` under autocast; the parameters' gradients float32."""
    torch.manual_seed(0)
    options = dict(options)
    backbone = options.pop("backbone", "resnet18")
    model = EMCAResNet(backbone, attention=attention, num_classes=5, **options).to(device).train()
    x = torch.randn(2, 3, 32, 32, device=device)
    dtypes = []
    blocks = [block for stage in model._stages for block in stage]
    hooks = [block.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype)) for block in blocks]
    with torch.autocast(device.type, dtype=dtype):
        logits = model(x)
    for hook in hooks:
        hook.remove()
    assert dtypes == [dtype] * len(blocks)
    assert logits.dtype == dtype
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


# On CPU, float16 for the v0.1 methods only (the suite's time): the promotions float16 adds to
# bfloat16's are SRM's and EMCA's float32 parameters, which those cover; CUDA runs every case in both.
V01 = ("none", "se", "eca", "srm", "emca_se", "emca_eca", "emca_srm")
CPU_CASES = [(a, o, torch.bfloat16) for a, o in CASES] + [(a, o, torch.float16) for a, o in CASES if a in V01]


@pytest.mark.parametrize("attention,options,dtype", CPU_CASES)
def test_block_outputs_keep_the_autocast_dtype_on_cpu(attention, options, dtype):
    check_block_dtypes(attention, options, torch.device("cpu"), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("attention,options", CASES)
def test_block_outputs_keep_the_autocast_dtype_on_cuda(attention, options, dtype):
    check_block_dtypes(attention, options, torch.device("cuda"), dtype)


@pytest.mark.parametrize("attention", ["srm", "emca_srm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_modules_gate_in_the_feature_maps_dtype(attention, dtype):
    """The modules on their own (forward and factors), not only inside a block."""
    torch.manual_seed(0)
    model = EMCAResNet("resnet18", attention=attention, num_classes=5, integration="first", coverage="none")
    module = model.layer1[0].attn
    y = torch.randn(2, 64, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        args = (y.to(dtype),) if attention == "srm" else (y.to(dtype), [])
        assert module.factors(*args).dtype == dtype and module(*args).dtype == dtype
