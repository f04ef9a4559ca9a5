"""timm registrations, derived from the attention table (emca.layers.create_attn):

    emca_resnet50              attention chosen by keyword: create_model('emca_resnet50', attention='cbam')
    emca_<kind>_resnet50       EMCA with that excitation: emca_se_resnet50, emca_cbam_resnet50, ...
    emca_resnet50_<kind>       the plain method: emca_resnet50_se, emca_resnet50_bam, ...

Names are prefixed `emca_` so that none shadows timm's own (seresnet50, ecaresnet50d, ...).
"""

from timm.models import register_model

from ..layers.create_attn import ATTENTIONS, is_emca, kind_of
from .resnet import BACKBONES, EMCAResNet


def _create(backbone: str, pretrained: bool = False, **kwargs) -> EMCAResNet:
    if pretrained:
        raise ValueError("no pretrained EMCA-ResNet weights are published: use pretrained=False")
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)
    return EMCAResNet(backbone, **kwargs)


def _register(backbone: str, attention: str | None) -> None:
    if attention is None:
        name = f"emca_{backbone}"
    elif is_emca(attention):
        name = f"{attention}_{backbone}"
    else:
        name = f"emca_{backbone}_{attention}"

    def entrypoint(pretrained: bool = False, **kwargs) -> EMCAResNet:
        if attention is not None:  # integration and coverage default to the method's in EMCAResNet
            kwargs.setdefault("attention", attention)
        return _create(backbone, pretrained, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    described = kind_of(attention).label if attention else "configurable channel attention"
    entrypoint.__doc__ = f"{backbone} with {'EMCA-' if attention and is_emca(attention) else ''}{described}."
    entrypoint.__module__ = __name__
    register_model(entrypoint)


for _backbone in BACKBONES:
    _register(_backbone, None)
    for _attention in ATTENTIONS[1:]:
        _register(_backbone, _attention)
