"""The optimizer (SGD, AdamW or LAMB, built by timm's factory) with the recipe's learning rate and the
parameters that are exempt from weight decay, the loss, and the start-up log's line for them."""

from __future__ import annotations

from enum import Enum
from numbers import Real
from typing import Any, Iterable

import torch
from timm.loss import BinaryCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from emca.models import attention_modules
from emca.options import option_value, require, require_int


class OptimizerName(Enum):
    sgd = "sgd"  # torch.optim.SGD (momentum, nesterov): the paper's
    adamw = "adamw"  # torch.optim.AdamW (betas, eps): decoupled weight decay
    lamb = "lamb"  # timm.optim.Lamb (betas, eps): layer-wise trust ratio, ResNet strikes back's


class LossName(Enum):
    ce = "ce"  # softmax cross-entropy (soft targets under mixup / cutmix)
    bce = "bce"  # per-class binary cross-entropy, timm's BinaryCrossEntropy (ResNet strikes back)


class NoWeightDecay(Enum):
    bn = "bn"  # BatchNorm weights and biases
    bias = "bias"  # every bias (any parameter with ndim <= 1 that is named *.bias)
    srm = "srm"  # every parameter of SRM-based attention modules (srm, emca_srm), as SRM's own code


# The choices, from the Enums above (the config schema, emca/config.py, types the options with them).
OPTIMIZERS = tuple(name.value for name in OptimizerName)
LOSSES = tuple(loss.value for loss in LossName)
NO_WEIGHT_DECAY = tuple(kind.value for kind in NoWeightDecay)
# How the start-up log names each optimizer.
LABELS = {OptimizerName.sgd: "SGD", OptimizerName.adamw: "AdamW", OptimizerName.lamb: "LAMB"}


def scaled_lr(lr: float, global_batch: int, lr_scale_batch: int | None) -> float:
    """The linear scaling rule (Goyal et al.): lr is given for a batch of lr_scale_batch images."""
    return lr if lr_scale_batch is None else lr * global_batch / lr_scale_batch


def declares(module: nn.Module, kind: str) -> bool:
    """Whether a module, or a module inside it, declares itself exempt with `kind` (a layer's class
    attribute `no_weight_decay`: SRMExcitation's is srm): the layers say it, not this module."""
    return any(getattr(inner, "no_weight_decay", None) == kind for inner in module.modules())


def no_decay_parameter_names(model: nn.Module, kinds: Iterable[str]) -> set[str]:
    """Qualified names of the parameters the given kinds (bn, bias, srm) exempt from weight decay."""
    kinds = set(kinds)
    unknown = kinds - set(NO_WEIGHT_DECAY)
    if unknown:
        raise ValueError(f"optimizer.no_weight_decay: unknown kinds {sorted(unknown)}; "
                         f"expected {', '.join(NO_WEIGHT_DECAY)}")
    names: set[str] = set()
    if "bn" in kinds:
        for module_name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                names.update(f"{module_name}.{name}" for name, _ in module.named_parameters(recurse=False))
    if "bias" in kinds:
        names.update(name for name, p in model.named_parameters() if p.ndim <= 1 and name.endswith("bias"))
    if "srm" in kinds:  # every parameter of an attention module with SRM's excitation (srm, emca_srm)
        for module_name, module in attention_modules(model).items():
            if declares(module, "srm"):
                names.update(f"{module_name}.{name}" for name, _ in module.named_parameters())
    return names


def check_optimizer_options(optimizer_cfg) -> None:
    """The options build_optimizer reads, each only for the optimizer that reads it. Checked here because
    torch's and timm's own messages name no option and show the lr after the linear scaling rule."""
    name = option_value(optimizer_cfg.name)
    require(name in OPTIMIZERS, "optimizer.name", name, "one of " + ", ".join(OPTIMIZERS))
    require(optimizer_cfg.lr > 0, "optimizer.lr", optimizer_cfg.lr, "> 0")
    require_int("optimizer.lr_scale_batch", optimizer_cfg.lr_scale_batch, 1, nullable=True)
    if name == "sgd":
        require(0 <= optimizer_cfg.momentum < 1, "optimizer.momentum", optimizer_cfg.momentum, "in [0, 1)")
        if optimizer_cfg.nesterov:
            require(optimizer_cfg.momentum > 0, "optimizer.momentum", optimizer_cfg.momentum,
                    "> 0 with optimizer.nesterov=true")
    else:
        betas = optimizer_cfg.betas
        require(len(betas) == 2 and all(isinstance(b, Real) and 0 <= b < 1 for b in betas), "optimizer.betas", betas,
                "two values in [0, 1), e.g. [0.9, 0.999]")
        require(optimizer_cfg.eps > 0, "optimizer.eps", optimizer_cfg.eps, "> 0")
    # torch and timm check only the default decay, not the per-group values given here.
    require(optimizer_cfg.weight_decay >= 0, "optimizer.weight_decay", optimizer_cfg.weight_decay, ">= 0")


def optimizer_arguments(name: str, optimizer_cfg) -> dict[str, Any]:
    """timm's registry name and the constructor arguments besides lr and weight decay."""
    if name == "sgd":
        # Both are torch.optim.SGD: timm's "sgd" sets nesterov=True, its "momentum" nesterov=False.
        return {"opt": "sgd" if optimizer_cfg.nesterov else "momentum", "momentum": optimizer_cfg.momentum}
    # "adamw" is torch.optim.AdamW, "lamb" timm.optim.Lamb. A tuple of floats, not a ListConfig, so that
    # the checkpoint's optimizer state loads with weights_only=True.
    arguments = {"opt": name, "betas": tuple(float(b) for b in optimizer_cfg.betas), "eps": optimizer_cfg.eps}
    if name == "lamb":
        # timm's Lamb clips the global gradient norm to 1.0 by default, inside step(): a second, hidden
        # clipping that trainer.clip_grad could neither see nor loosen. trainer.clip_grad is the only one.
        arguments["max_grad_norm"] = None
    return arguments


def build_optimizer(model: nn.Module, optimizer_cfg, global_batch: int) -> torch.optim.Optimizer:
    check_optimizer_options(optimizer_cfg)
    lr = scaled_lr(optimizer_cfg.lr, global_batch, optimizer_cfg.lr_scale_batch)
    kinds = (option_value(kind) for kind in optimizer_cfg.no_weight_decay)
    exempt = no_decay_parameter_names(model, kinds)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if name in exempt else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": optimizer_cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # Given groups (not the model), timm's factory adds no grouping of its own (filter_bias_and_bn applies
    # to a model only); every group carries its decay, so the default passed here is never used.
    return create_optimizer_v2(
        groups, lr=lr, weight_decay=optimizer_cfg.weight_decay,
        **optimizer_arguments(option_value(optimizer_cfg.name), optimizer_cfg),
    )


def describe_optimizer(optimizer_cfg, optimizer: torch.optim.Optimizer) -> str:
    """The start-up log's line, e.g. "LAMB lr 0.008 betas (0.9, 0.999) eps 1e-06 weight decay 0.02"."""
    name = option_value(optimizer_cfg.name)
    group = optimizer.param_groups[0]
    # An lr scheduler keeps the scaled rate as initial_lr; lr itself is by then the warm-up's first value.
    lr = group.get("initial_lr", group["lr"])
    if name == "sgd":
        details = f"momentum {optimizer_cfg.momentum}" + (" nesterov" if optimizer_cfg.nesterov else "")
    else:
        details = f"betas {tuple(optimizer_cfg.betas)} eps {optimizer_cfg.eps}"
    kinds = [option_value(kind) for kind in optimizer_cfg.no_weight_decay]
    exempt = f" (none on {', '.join(kinds)})" if kinds else ""
    return f"{LABELS[OptimizerName(name)]} lr {lr:.4g} {details} weight decay {optimizer_cfg.weight_decay}{exempt}"


def build_criterion(optimizer_cfg, soft_targets: bool = False) -> nn.Module:
    """The training loss. soft_targets: the targets are mixup / cutmix's class probabilities, which already
    hold the label smoothing, so it is not applied again."""
    loss = option_value(optimizer_cfg.loss)
    require(loss in LOSSES, "optimizer.loss", loss, "one of " + ", ".join(LOSSES))
    smoothing = optimizer_cfg.label_smoothing
    # torch checks it only in the first training step, as a traceback; 1 would leave no target.
    require(0 <= smoothing < 1, "optimizer.label_smoothing", smoothing, "in [0, 1)")
    if loss == "ce":
        # torch's cross-entropy takes probability targets as well as class indices (timm's
        # SoftTargetCrossEntropy takes probabilities only, and computes the same sum).
        return nn.CrossEntropyLoss(label_smoothing=0.0 if soft_targets else smoothing)
    threshold = optimizer_cfg.bce_target_threshold
    # timm binarises with target > threshold: at 1 every target would be 0.
    require(threshold is None or 0 < threshold < 1, "optimizer.bce_target_threshold", threshold, "in (0, 1) or null")
    # Index targets are one-hot encoded with smoothing / num_classes off and 1 - smoothing + that on;
    # probability targets are used as given (then thresholded).
    return BinaryCrossEntropy(smoothing=0.0 if soft_targets else smoothing, target_threshold=threshold)
