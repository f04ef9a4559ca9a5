"""A completed run as a model others load: the folder scripts/publish.py writes, in the layout that
timm and the Hugging Face Hub read.

    model.safetensors   the chosen checkpoint's trained or EMA weights (the model's state_dict)
    config.json         timm's hub config: architecture (the registered emca_* name), num_classes,
                        label_names, model_args (the run's model options) and pretrained_cfg (the run's
                        validation transform as timm's data config: input_size, crop_pct, crop_mode,
                        interpolation, mean, std); `emca` adds the run's dataset settings (the transform
                        emca.load_model rebuilds) and which weights these are
    README.md           the model card: eval.json's figures beside the paper's where a table row matches
    training_curve.png  validation top-1 per epoch (results.json)
    config.yaml, results.json, train.log   the run's own, copied

config.json is what timm/models/_hub.py's save_config_for_hf writes and _parse_model_cfg reads back
(timm.create_model("local-dir:FOLDER") or "hf-hub:REPO"): model_args become create_model's keywords,
pretrained_cfg the model's pretrained_cfg (its fields must be PretrainedCfg's, timm/models/_pretrained.py).
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import OmegaConf
from torch import nn

from emca.analysis import paper_reference as paper
from emca.analysis.checkpoint_eval import evaluated_size
from emca.analysis.checkpoint_eval import output_path as eval_path
from emca.analysis.model_card import Card, model_card
from emca.common.checkpoint_file import CHECKPOINT_DIR, architecture_fingerprint, describe_architecture
from emca.common.files import atomic_write
from emca.data.eval_transform import EvalTransform
from emca.engine.results import RESULTS
from emca.layers.create_attn import is_emca, reads
from emca.models import registry
from emca.models.loading import read_checkpoint, restore_model

WEIGHTS = "model.safetensors"  # timm's HF_SAFE_WEIGHTS_NAME, the first file load_state_dict_from_path looks for
CONFIG = "config.json"
CARD = "README.md"
CURVE = "training_curve.png"
RUN_CONFIG = "config.yaml"
TRAIN_LOG = "train.log"
WRITTEN = (WEIGHTS, CONFIG, CARD, CURVE, RUN_CONFIG, RESULTS, TRAIN_LOG)
HYDRA_RECORDS = Path(".hydra")
# The Hub's id of a dataset where ours has one (timm's own cards name ImageNet so).
HUB_DATASETS = {"imagenet": "imagenet-1k"}
# Where a run's model is looked up in the paper: Table 4 has every figure, then the others.
PAPER_TABLES = ("table4", "table5", "table3", "table2")


class PublishError(ValueError):
    """A run that cannot be published as asked, in one line with the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class RunToPublish:
    run_dir: Path
    checkpoint: Path
    state: dict[str, Any]  # the checkpoint's contents
    results: dict[str, Any]  # results.json
    evaluation: Optional[dict[str, Any]]  # the eval.json of these weights; None with require_eval=false
    ema: bool

    @property
    def epoch(self) -> Optional[int]:
        return (self.state.get("progress") or {}).get("epoch")


# --------------------------------------------------------------------------- what is published

def read_run(run_dir: Path, checkpoint: str = "best.pt", ema: bool = False, require_eval: bool = True
             ) -> RunToPublish:
    """The completed classification run in run_dir, its checkpoint (a file of <run>/checkpoints/) and
    the eval.json of the chosen weights; PublishError (one line) for what cannot be published."""
    results_path = run_dir / RESULTS
    if not run_dir.is_dir():
        raise PublishError(f"run={run_dir} is not a folder: give a run folder of train.py (it holds {RESULTS})")
    if not results_path.is_file():
        raise PublishError(f"{run_dir} holds no completed run (no {RESULTS}, which train.py writes when a run "
                           f"completes): finish it (python train.py hydra.run.dir={run_dir} trainer.resume=auto) "
                           "or publish another")
    results = read_json(results_path)
    if results.get("task") == "detection":
        raise PublishError(f"{run_dir} is a task=detection run: its detector is not a timm classifier, and "
                           "scripts/publish.py publishes classification runs only")
    path = run_dir / CHECKPOINT_DIR / checkpoint
    state = read_checkpoint(path, PublishError, "scripts/publish.py")
    if ema and state.get("ema") is None:
        raise PublishError(f"{path} holds no EMA weights (its run had trainer.ema.decay=null): drop ema=true")
    run = RunToPublish(run_dir, path, state, results, None, ema)
    run.evaluation = read_evaluation(run, require_eval)
    return run


def read_evaluation(run: RunToPublish, require_eval: bool) -> Optional[dict[str, Any]]:
    """eval.py's report of these weights (eval.json for best.pt, eval_ema.json, eval_last.json...), checked
    to be of this checkpoint's epoch and of the run's own dataset and size."""
    path = eval_path(None, run.checkpoint.absolute(), run.ema)
    ema = " ema=true" if run.ema else ""
    if not path.is_file():
        if not require_eval:
            return None
        raise PublishError(f"{run.run_dir} has no {path.name}: run `python eval.py checkpoint={run.checkpoint}{ema}` "
                           "first (accuracy_only=true for top-1/top-5 alone), or publish without eval.py's figures: "
                           "require_eval=false")
    evaluation = read_json(path)
    if evaluation.get("checkpoint_epoch") != run.epoch:
        raise PublishError(f"{path} measured epoch {evaluation.get('checkpoint_epoch')}'s {run.checkpoint.name}, "
                           f"which now holds epoch {run.epoch}: rerun "
                           f"`python eval.py checkpoint={run.checkpoint}{ema}`")
    measured = ((evaluation.get("dataset") or {}).get("name"), evaluation.get("image_size"))
    trained = (run.results.get("dataset"), evaluated_size(run.state["config"]["dataset"]))
    if measured != trained:
        raise PublishError(f"{path} measured {measured[0]} at {measured[1]} px, the run validated on {trained[0]} at "
                           f"{trained[1]} px: rerun `python eval.py checkpoint={run.checkpoint}{ema}` without dataset "
                           "overrides")
    return evaluation


def read_json(path: Path) -> dict[str, Any]:
    """A results.json / eval.json; PublishError where it is not a JSON object."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PublishError(f"{path} cannot be read ({error}): restore it, or rerun what wrote it") from None
    if not isinstance(document, dict):
        raise PublishError(f"{path} holds no JSON object: restore it, or rerun what wrote it")
    return document


def registered_name(backbone: str, attention: str) -> str:
    """The emca_* name timm creates this model by (emca_eca_resnet50, emca_resnet50_se, emca_resnet18)."""
    return next(name for name, (b, a) in registry.MODELS.items() if b == backbone and (a or "none") == attention)


def model_args(train_cfg: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """create_model's keywords that rebuild the run's model beside its registered name: the options its
    attention reads (emca.layers.create_attn.reads) and, for EMCA, its coverage and gating. Options of
    other methods, and zero_init_residual (an initialisation the weights replace), are left out."""
    attention, name = train_cfg["attention"], train_cfg["attention"]["name"]
    args: dict[str, Any] = {"num_classes": num_classes}
    if attention.get("integration") is not None:
        args["integration"] = attention["integration"]
    if is_emca(name):
        coverage = train_cfg["coverage"]
        args.update(coverage={"stages": coverage["stages"], "blocks": coverage["blocks"]},
                    gating=attention["gating"], align=attention["align"], include_stem=bool(attention["include_stem"]))
    # A key the config lacks (a run older than the option) takes the model's default, as build_model does.
    args.update({key: attention[key] for key in reads(name) if attention.get(key) is not None})
    return json.loads(json.dumps(args))  # plain JSON values (lists, not tuples), as config.json holds them


def timm_model(run: RunToPublish) -> tuple[str, dict[str, Any], nn.Module]:
    """(registered name, model_args, the model timm.create_model(name, **model_args) builds with the
    chosen weights), checked to be the checkpoint's architecture: what config.json promises timm."""
    import timm

    train_cfg = run.state["config"]
    architecture = run.state["fingerprint"]["architecture"]
    name = registered_name(train_cfg["backbone"]["name"], train_cfg["attention"]["name"])
    args = model_args(train_cfg, architecture["num_classes"])
    restored = restore_model(run.checkpoint, run.state, run.ema, PublishError, "drop ema=true")
    model = timm.create_model(name, **args)
    if architecture_fingerprint(model) != run.state["fingerprint"]:
        raise PublishError(f"timm.create_model({name!r}, **{args}) does not build {run.checkpoint}'s model "
                           f"({describe_architecture(run.state['fingerprint'])}): scripts/publish.py cannot publish it")
    model.load_state_dict(restored.state_dict())
    return name, args, model.eval()


def transform_cfg(transform: EvalTransform) -> dict[str, Any]:
    """timm's data config of a run's validation transform (shorter side to val_resize with bilinear
    interpolation, centre crop, mean and std on the 0-1 scale)."""
    prep = transform.prep
    return {
        "input_size": (3, prep.val_image_size, prep.val_image_size),
        "crop_pct": crop_pct(prep.val_image_size, prep.val_resize),
        "crop_mode": "center",
        "interpolation": "bilinear",
        "mean": tuple(value / 255 for value in prep.mean),
        "std": tuple(value / 255 for value in prep.std),
    }


def crop_pct(crop: int, resize: int) -> float:
    """crop / resize, as the largest float from which timm's transforms get `resize` back: they resize
    the shorter side to floor(crop / crop_pct), and crop / (crop / resize) falls short of resize for
    many pairs (9 / (9 / 14) = 13.999...)."""
    pct = crop / resize
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0)
    return pct


def hub_config(run: RunToPublish, name: str, args: dict[str, Any], model: nn.Module, license: str
               ) -> dict[str, Any]:
    """config.json, as timm's save_config_for_hf lays it out, plus `emca`: what emca.load_model needs."""
    from timm.models import filter_pretrained_cfg

    dataset = run.state["config"]["dataset"]
    pretrained_cfg = filter_pretrained_cfg(dict(model.pretrained_cfg), remove_source=True)
    pretrained_cfg.pop("architecture", None)
    pretrained_cfg.update(transform_cfg(EvalTransform(dataset)), num_classes=model.num_classes, license=license,
                          custom_load=False, fixed_input_size=False)
    if pretrained_cfg["input_size"] != tuple(model.pretrained_cfg["input_size"]):
        pretrained_cfg["pool_size"] = None  # as timm does: the registered (7, 7) is of 224 px
    config = {"architecture": name, "num_classes": model.num_classes, "num_features": model.num_features,
              "global_pool": "avg"}
    if run.state.get("classes"):
        config["label_names"] = list(run.state["classes"])
    config.update(model_args=args, pretrained_cfg=pretrained_cfg, emca={
        "run_id": run.state.get("run_id"), "checkpoint": run.checkpoint.name, "epoch": run.epoch,
        "weights": "ema" if run.ema else "trained",
        "dataset": {key: value for key, value in dataset.items() if key != "root"},  # no path of this machine
    })
    return json.loads(json.dumps(config))


def weights_bytes(model: nn.Module) -> bytes:
    """The model's state_dict as safetensors (metadata format=pt, as the Hub's loaders expect)."""
    from safetensors.torch import save

    return save({key: value.contiguous() for key, value in model.state_dict().items()}, metadata={"format": "pt"})


# --------------------------------------------------------------------------- the paper's row and our figures

def paper_row(train_cfg: dict[str, Any]):
    """(TableSpec, Entry) of the first paper table whose row is this run's model (its cell: options
    aside), or None."""
    from emca.analysis.tables import TABLES
    from emca.analysis.variants import variant_from_config

    cell = variant_from_config(train_cfg).cell()
    for table in PAPER_TABLES:
        spec = TABLES[table]
        entry = next((entry for entry in spec.entries if entry.variant == cell and entry.reference), None)
        if entry is not None:
            return spec, entry
    return None


def figures(run: RunToPublish, model: nn.Module) -> dict[str, float]:
    """This run's figures in the paper's units (tables.METRICS' keys): eval.json's, or without it the
    trainer's validation of the checkpoint's epoch and results.json's counts."""
    from emca.analysis.complexity import count_macs

    source = run.evaluation or run.results
    if run.evaluation is not None:
        values = {"top1": run.evaluation["val"]["top1"], "top5": run.evaluation["val"]["top5"]}
        values.update({f"top1_rot{degrees}": rotated["top1"]
                       for degrees, rotated in run.evaluation["rotation"].items() if degrees != "0"})
        values.update({key: speed["images_per_second"] for key, speed in (run.evaluation.get("speed") or {}).items()
                       if isinstance(speed, dict) and "images_per_second" in speed})
    else:
        epoch = next(entry for entry in run.state["progress"]["history"] if entry["epoch"] == run.epoch)
        values = {"top1": epoch["val_top1"], "top5": epoch["val_top5"]}
    size = evaluated_size(run.state["config"]["dataset"])
    # Recorded: conv and linear multiply-accumulates / 1e9; the paper's count adds BatchNorm and pooling.
    extra = count_macs(model, size)[1]
    values.update(params=source["params"] / paper.PARAM_UNIT,
                  gflops=(source["gflops"] * 1e9 + extra) / paper.GFLOP_UNIT)
    return values


# --------------------------------------------------------------------------- writing the folder

def check_out(out: Path, run_dir: Path) -> None:
    """Refuse an output folder that holds files this script did not write, or the run folder itself."""
    if out.resolve() == run_dir.resolve():
        raise PublishError(f"out={out} is the run folder: give a new folder, e.g. out={run_dir.name}-published")
    if out.exists() and not out.is_dir():
        raise PublishError(f"out={out} is a file: give a folder (new, empty or published before)")
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in WRITTEN) if out.is_dir() else []
    if foreign:
        raise PublishError(f"out={out} holds files scripts/publish.py does not write ({', '.join(foreign[:3])}): give "
                           "a new, empty or previously published folder")


def copy_run_files(run: RunToPublish, out: Path) -> list[str]:
    """config.yaml (the run's .hydra record, else results.json's resolved config), results.json and
    train.log into out; the names written."""
    recorded = run.run_dir / HYDRA_RECORDS / RUN_CONFIG
    text = recorded.read_text() if recorded.is_file() else OmegaConf.to_yaml(run.results["config"])
    atomic_write(out / RUN_CONFIG, lambda file: file.write(text.encode()))
    copied = [RUN_CONFIG]
    for name in (RESULTS, TRAIN_LOG):
        if (run.run_dir / name).is_file():
            # copy2 keeps the times: make_tables counts a run found twice (its run_id) from the folder
            # written last, which must stay the run's own, beside its eval.json.
            shutil.copy2(run.run_dir / name, out / name)
            copied.append(name)
    return copied


def command_line(run_dir: Path) -> Optional[str]:
    """`python train.py OVERRIDES` from the run's .hydra/overrides.yaml; None where the run recorded none
    (a run trained in-process)."""
    path = run_dir / HYDRA_RECORDS / "overrides.yaml"
    if not path.is_file():
        return None
    return " ".join(["python train.py", *(shlex.quote(str(line)) for line in OmegaConf.load(path))])


def plot_curve(run: RunToPublish, out: Path) -> Optional[Path]:
    """training_curve.png: the run's validation top-1 per epoch (None: it recorded no curve)."""
    from emca.analysis.curves import plot_top1_curves
    from emca.analysis.runs import Run
    from emca.analysis.variants import variant_from_config

    curve_run = Run(run.run_dir, run.results, None, variant_from_config(run.results["config"]))
    return plot_top1_curves([curve_run], out / CURVE, f"{run.results['dataset']}, run {run.results.get('run_id')}")


def write_model(run: RunToPublish, out: Path, license: str) -> tuple[dict[str, Any], nn.Module, int]:
    """model.safetensors and config.json; (config.json's content, the model, the weights' bytes)."""
    name, args, model = timm_model(run)
    config = hub_config(run, name, args, model, license)
    data = weights_bytes(model)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, lambda file: file.write(data))
    atomic_write(out / CONFIG, lambda file: file.write((json.dumps(config, indent=2) + "\n").encode()))
    return config, model, len(data)


def publish_run(run_dir: Path, out: Path, checkpoint: str = "best.pt", ema: bool = False, require_eval: bool = True,
                license: str = "apache-2.0", datasets: Optional[Iterable[str]] = None,
                repo_id: Optional[str] = None) -> list[str]:
    """Write the folder (module docstring); returns the lines to print."""
    from emca.analysis.variants import variant_from_config

    run = read_run(run_dir, checkpoint, ema, require_eval)
    check_out(out, run_dir)
    config, model, size = write_model(run, out, license)
    written = [WEIGHTS, CONFIG, *copy_run_files(run, out)]
    curve = plot_curve(run, out)
    written += [CURVE] if curve else []
    card = Card(config, run.results, run.evaluation, eval_path(None, run.checkpoint.absolute(), ema).name,
                figures(run, model), paper_row(run.state["config"]), variant_from_config(run.state["config"]).options,
                command_line(run_dir), (out / RUN_CONFIG).read_text(), curve and curve.name, license,
                list(datasets or [HUB_DATASETS.get(run.results["dataset"], run.results["dataset"])]), repo_id)
    text = model_card(card)
    atomic_write(out / CARD, lambda file: file.write(text.encode()))
    weights = "EMA" if ema else "trained"
    return [f"wrote     {out}: {', '.join([*written, CARD])}",
            f"model     {config['architecture']} ({weights} weights of {run.checkpoint.name}, epoch {run.epoch}; "
            f"{size / 2**20:.1f} MiB)",
            f"load      timm.create_model('local-dir:{out}', pretrained=True) after `import emca.models`, or "
            f"emca.load_model('{out}')"]


# --------------------------------------------------------------------------- the Hub

def push_folder(out: Path, repo_id: str, private: bool = False) -> str:
    """Upload the folder to the Hub model repository repo_id (created if missing); the line to print.
    PublishError (one line) without a token or without the Hub."""
    from huggingface_hub import HfApi, get_token

    later = f"the folder is written: upload it later with `hf upload {repo_id} {out}`"
    token = get_token()
    if token is None:
        raise PublishError(f"push={repo_id}: no Hugging Face token (set HF_TOKEN or run `hf auth login`); {later}")
    api = HfApi(token=token, library_name="emca-train")
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(out),
                                   commit_message="Publish an EMCA-Train run")
    except Exception as error:  # the client's network errors differ by version (requests, httpx): all are one line
        raise PublishError(f"push={repo_id}: the upload failed ({type(error).__name__}: {error}); {later}") from None
    return f"pushed    {out} to {repo.url} ({getattr(commit, 'commit_url', commit)})"
