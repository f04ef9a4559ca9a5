"""timm registrations: `timm.create_model('emca_resnet50', attention='emca_eca', ...)`.

Names are prefixed `emca_` so that none shadows timm's own (seresnet50, ecaresnet50d, ...).
"""

from timm.models import register_model

from .resnet import BACKBONES, EMCAResNet


def _create(backbone: str, pretrained: bool = False, **kwargs) -> EMCAResNet:
    if pretrained:
        raise ValueError("no pretrained EMCA-ResNet weights are published: use pretrained=False")
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)
    return EMCAResNet(backbone, **kwargs)


def _register(backbone: str, attention: str | None) -> None:
    name = f"emca_{backbone}" if attention is None else f"emca_{attention}_{backbone}"

    def entrypoint(pretrained: bool = False, **kwargs) -> EMCAResNet:
        if attention is not None:  # integration and coverage default to the paper's in EMCAResNet
            kwargs.setdefault("attention", f"emca_{attention}")
        return _create(backbone, pretrained, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__doc__ = (
        f"{backbone} with {'EMCA-' + attention.upper() if attention else 'configurable channel attention'}."
    )
    entrypoint.__module__ = __name__
    register_model(entrypoint)


for _backbone in BACKBONES:
    _register(_backbone, None)
    for _attention in ("se", "eca", "srm"):
        _register(_backbone, _attention)
