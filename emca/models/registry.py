"""timm registrations, derived from the attention table (emca.layers.create_attn):

    emca_resnet50              attention chosen by keyword: create_model('emca_resnet50', attention='cbam')
    emca_<kind>_resnet50       EMCA with that excitation: emca_se_resnet50, emca_cbam_resnet50, ...
    emca_resnet50_<kind>       the plain method: emca_resnet50_se, emca_resnet50_bam, ...

Names are prefixed `emca_` so that none shadows timm's own (seresnet50, ecaresnet50d, ...).

Each is built by timm's build_model_with_cfg, so timm's keywords work as for its ResNets:
features_only / out_indices (timm's FeatureGetterNet over EMCAResNet.forward_intermediates, which
carries EMCA's shared descriptors between blocks; feature_cls='hook' and 'fx' as well: every model
traces with torch.fx), pretrained_cfg, and a checkpoint of ours loaded
by timm's loader, with pretrained=True and pretrained_cfg_overlay=dict(file=PATH) or by create_model's
checkpoint_path=PATH; a checkpoint of another architecture is refused in one line. No weights are
published: pretrained=True without a file is a one-line error.
"""

from functools import partial
from pathlib import Path
from typing import Any

from timm.models import (
    FeatureDictNet,
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models import load_checkpoint as load_checkpoint_into

from emca.common.checkpoint_file import CheckpointError, describe_architecture, load_checkpoint
from emca.layers.create_attn import ATTENTIONS, is_emca, kind_of
from emca.models.resnet import BACKBONES, EMCAResNet, accepted_keywords, default_cfg, unknown_keyword, weights_mismatch

NO_WEIGHTS = ("no pretrained EMCA-ResNet weights are published: use pretrained=False, or load a checkpoint of yours "
              "with pretrained=True, pretrained_cfg_overlay=dict(file=PATH) (or checkpoint_path=PATH, or "
              "emca.load_model(PATH))")


def _name(backbone: str, attention: str | None) -> str:
    if attention is None:
        return f"emca_{backbone}"
    if is_emca(attention):
        return f"{attention}_{backbone}"
    return f"emca_{backbone}_{attention}"


MODELS: dict[str, tuple[str, str | None]] = {
    _name(backbone, attention): (backbone, attention)
    for backbone in BACKBONES for attention in (None, *ATTENTIONS[1:])
}
# timm's pretrained cfgs (register_model reads this module's default_cfgs): the evaluation recipe, no url.
default_cfgs = generate_default_cfgs({name: default_cfg() for name in MODELS})


def registered_cfg(backbone: str) -> dict[str, Any]:
    """timm's pretrained_cfg of emca_<backbone> (the name that takes attention= as a keyword), as
    timm.create_model sets it on a model: the evaluation recipe, 1000 classes, the architecture's name."""
    return resolve_pretrained_cfg(_name(backbone, None)).to_dict()


def _create(variant: str, backbone: str, pretrained: bool = False, **kwargs: Any) -> EMCAResNet:
    # timm.create_model("local-dir:FOLDER") (or "hf-hub:REPO") passes the folder's config.json model_args
    # as keywords and again as pretrained_model_args, timm's record of what the weights were built with.
    source_args = kwargs.pop("pretrained_model_args", None)
    accepted = accepted_keywords(backbone_fixed=True)
    for keyword in kwargs:
        if not any(keyword in names for names in accepted.values()):
            raise TypeError(unknown_keyword(variant, keyword, accepted))
    _check_feature_cls(variant, kwargs)
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if not pretrained and (overlay.get("file") or overlay.get("state_dict") is not None):
        raise ValueError("pretrained_cfg_overlay=dict(file=...) is read only with pretrained=True (timm's rule): add "
                         "pretrained=True, or give the file as checkpoint_path=PATH")
    loading = _pretrained_source(variant, kwargs) if pretrained else {}
    if source_args:  # a timm that passes it takes it
        loading["pretrained_model_args"] = source_args
    checkpoint_path = kwargs.pop("checkpoint_path", None)  # create_model takes it; here for a direct call
    model = build_model_with_cfg(EMCAResNet, variant, pretrained, backbone=backbone,
                                 feature_cfg=dict(feature_cls="getter"), **loading, **kwargs)
    if checkpoint_path:
        load_checkpoint_into(model, checkpoint_path)
    return model


def _check_feature_cls(variant: str, kwargs: dict[str, Any]) -> None:
    """Refuse the feature wrappers that would return wrong maps: timm's FeatureListNet / FeatureDictNet
    call the model's children one after another, which misses EMCA's shared descriptors and a
    stage_end module's place. FeatureGraphNet (fx) traces the whole forward and takes each stage's
    output by node name (Descriptors pools a stage's output inside the next stage), so it serves
    every attention."""
    feature_cls, attention = kwargs.get("feature_cls"), kwargs.get("attention", "none")
    if not kwargs.get("features_only") or feature_cls is None or attention not in ATTENTIONS or attention == "none":
        return
    if isinstance(feature_cls, str):
        wrapper = feature_cls.lower()
    elif isinstance(feature_cls, type) and issubclass(feature_cls, FeatureDictNet):
        wrapper = "list"
    else:
        return
    kind = kind_of(attention)
    emca, stage_end = is_emca(attention), kind.place == "stage_end"
    if wrapper not in ("list", "dict") or not (emca or stage_end):
        return
    missed = "EMCA's descriptors shared between blocks" if emca else f"{kind.label}'s stage_end modules"
    raise ValueError(f"feature_cls={feature_cls!r} runs the children of {variant} one after another, which misses "
                     f"{missed}: leave feature_cls unset (timm's FeatureGetterNet over forward_intermediates) or "
                     "use 'hook' or 'fx'")


def _pretrained_source(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """build_model_with_cfg's loading arguments for pretrained=True: the one-line error where no
    source is given; for a checkpoint of ours (a file), its classes as the default and a filter that
    refuses it when its architecture differs. timm's loader reads the file (it takes our 'model' entry)."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    if cfg.state_dict is None and not (cfg.file or cfg.url or cfg.hf_hub_id):
        raise ValueError(NO_WEIGHTS)
    if cfg.state_dict is not None or not cfg.file or cfg.source == "local-dir":
        return {}  # local-dir: a folder of scripts/publish.py, whose model.safetensors timm finds and reads
    path = Path(cfg.file).expanduser()
    state = load_checkpoint(path, option="pretrained_cfg_overlay file")  # missing or damaged: one line
    if not (isinstance(state, dict) and isinstance(state.get("fingerprint"), dict) and "model" in state):
        return {}  # a plain state_dict: timm loads it as it is (EMCAResNet.load_state_dict refuses a misfit)
    architecture = state["fingerprint"]["architecture"]
    trained = {"num_classes": architecture["num_classes"]}
    if state.get("classes"):
        trained["label_names"] = tuple(state["classes"])
    kwargs["pretrained_cfg_overlay"] = {**trained, **dict(kwargs.get("pretrained_cfg_overlay") or {})}
    return {"pretrained_filter_fn": partial(_check_checkpoint, path=path, architecture=architecture, variant=variant)}


def _check_checkpoint(state_dict: dict, model: EMCAResNet, *, path: Path, architecture: dict, variant: str) -> dict:
    """timm's pretrained_filter_fn: refuse (CheckpointError, one line) a checkpoint of ours that is not
    of the model created. The classifier is timm's to keep or drop (another num_classes, features_only),
    and the first convolution's to adapt to another in_chans."""
    created = model.architecture()
    if {k: v for k, v in architecture.items() if k != "num_classes"} != {
            k: v for k, v in created.items() if k != "num_classes"}:
        detail = f"it holds {describe_architecture({'architecture': architecture})}"
    else:
        skip = ["fc."] + (["conv1.weight"] if model.in_chans != 3 else [])
        problem = weights_mismatch(model, state_dict, strict=True, skip=skip)
        if not problem:
            return state_dict
        detail = f"its weights differ ({problem})"
    raise CheckpointError(f"refusing checkpoint {path} for {variant} ({model.describe()}): {detail}; "
                          f"emca.load_model('{path}') builds the model its configuration describes")


def _register(name: str, backbone: str, attention: str | None) -> None:
    def entrypoint(pretrained: bool = False, **kwargs) -> EMCAResNet:
        if attention is not None:  # integration and coverage default to the method's in EMCAResNet
            kwargs.setdefault("attention", attention)
        return _create(name, backbone, pretrained, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    described = kind_of(attention).label if attention else "configurable channel attention"
    entrypoint.__doc__ = f"{backbone} with {'EMCA-' if attention and is_emca(attention) else ''}{described}."
    entrypoint.__module__ = __name__
    register_model(entrypoint)


for _model, (_backbone, _attention) in MODELS.items():
    _register(_model, _backbone, _attention)
