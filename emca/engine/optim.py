"""SGD with the recipe's learning rate and the parameters that are exempt from weight decay."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from emca.layers.create_attn import ATTENTIONS, kind_of
from emca.layers.excitation import SRMExcitation
from emca.models import attention_modules
from emca.options import require, require_int

# Attentions with SRM's excitation (srm, emca_srm): no_weight_decay=srm exempts their attention modules.
SRM_ATTENTIONS = tuple(a for a in ATTENTIONS if a != "none" and kind_of(a).excitation is SRMExcitation)


def scaled_lr(lr: float, global_batch: int, lr_scale_batch: int | None) -> float:
    """The linear scaling rule (Goyal et al.): lr is given for a batch of lr_scale_batch images."""
    return lr if lr_scale_batch is None else lr * global_batch / lr_scale_batch


def no_decay_parameter_names(model: nn.Module, kinds: Iterable[str], attention_name: str) -> set[str]:
    """Qualified names of the parameters the given kinds (bn, bias, srm) exempt from weight decay."""
    kinds = set(kinds)
    unknown = kinds - {"bn", "bias", "srm"}
    if unknown:
        raise ValueError(f"optimizer.no_weight_decay: unknown kinds {sorted(unknown)}; expected bn, bias, srm")
    names: set[str] = set()
    if "bn" in kinds:
        for module_name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                names.update(f"{module_name}.{name}" for name, _ in module.named_parameters(recurse=False))
    if "bias" in kinds:
        names.update(name for name, p in model.named_parameters() if p.ndim <= 1 and name.endswith("bias"))
    if "srm" in kinds and attention_name in SRM_ATTENTIONS:
        for module_name, module in attention_modules(model).items():
            names.update(f"{module_name}.{name}" for name, _ in module.named_parameters())
    return names


def check_sgd_options(optimizer_cfg) -> None:
    """The options build_optimizer reads. Checked here because torch's own messages name no option
    and show the lr after the linear scaling rule, not the value given."""
    require(optimizer_cfg.lr > 0, "optimizer.lr", optimizer_cfg.lr, "> 0")
    require_int("optimizer.lr_scale_batch", optimizer_cfg.lr_scale_batch, 1, nullable=True)
    require(0 <= optimizer_cfg.momentum < 1, "optimizer.momentum", optimizer_cfg.momentum, "in [0, 1)")
    if optimizer_cfg.nesterov:
        require(
            optimizer_cfg.momentum > 0, "optimizer.momentum", optimizer_cfg.momentum, "> 0 with optimizer.nesterov=true"
        )
    # torch checks only its default decay, not the per-group values given here.
    require(optimizer_cfg.weight_decay >= 0, "optimizer.weight_decay", optimizer_cfg.weight_decay, ">= 0")


def build_optimizer(model: nn.Module, optimizer_cfg, global_batch: int, attention_name: str) -> torch.optim.SGD:
    check_sgd_options(optimizer_cfg)
    lr = scaled_lr(optimizer_cfg.lr, global_batch, optimizer_cfg.lr_scale_batch)
    exempt = no_decay_parameter_names(model, (kind.value for kind in optimizer_cfg.no_weight_decay), attention_name)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if name in exempt else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": optimizer_cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=optimizer_cfg.momentum, nesterov=optimizer_cfg.nesterov)


def build_criterion(optimizer_cfg) -> nn.CrossEntropyLoss:
    smoothing = optimizer_cfg.label_smoothing
    # torch checks it only in the first training step, as a traceback; 1 would leave no target.
    require(0 <= smoothing < 1, "optimizer.label_smoothing", smoothing, "in [0, 1)")
    return nn.CrossEntropyLoss(label_smoothing=smoothing)
