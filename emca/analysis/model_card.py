"""The model card (README.md) of a published run (emca/analysis/publish.py): the Hub's front matter
(library, licence, tags, datasets), then what the model is, eval.py's figures beside the paper's row,
the training curve, how to load it, how it was trained and from which code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from emca.analysis import paper_reference as paper
from emca.analysis.tables import METRICS, ROTATIONS, comparable_with_paper

# The card's rows, in the paper's order of Table 4 and then Table 9's rotations.
ROWS = ("top1", "top5", *(f"top1_rot{degrees}" for degrees in ROTATIONS), "params", "gflops", "fps", "fps_model",
        "fps_pipeline")
# After a metric's label (tables.METRICS'): what it counts; the notes say the units of #P and GFLOPs.
UNITS = {"params": "", "gflops": "", "fps": " (batch 1)", "fps_model": " (model alone)",
         "fps_pipeline": " (validation pass)"}


@dataclass
class Card:
    config: dict[str, Any]  # config.json
    results: dict[str, Any]  # results.json
    evaluation: Optional[dict[str, Any]]  # eval.json of the weights; None: published with require_eval=false
    eval_file: str  # its name (eval.json, eval_ema.json, ...)
    figures: dict[str, float]  # ours, in the paper's units (tables.METRICS' keys)
    paper_row: Optional[tuple[Any, Any]]  # (TableSpec, Entry) of the paper's row of this model, or None
    options: tuple[tuple[str, Any], ...]  # the run's attention options off the paper's (Variant.options)
    command: Optional[str]  # `python train.py ...`; None: the run recorded none
    run_config: str  # config.yaml's text
    curve: Optional[str]  # the training curve's file name; None: no curve
    license: str
    datasets: list[str]
    repo_id: Optional[str]  # the Hub repository it is pushed to, if any


def model_card(card: Card) -> str:
    return "\n".join([front_matter(card), *title(card), *results_section(card), *curve_section(card),
                      *usage_section(card), *training_section(card), *provenance_section(card)])


def front_matter(card: Card) -> str:
    """The YAML block the Hub reads (huggingface_hub's ModelCardData writes it)."""
    from huggingface_hub import ModelCardData

    attention = card.results["model"]["attention"]
    tags = ["image-classification", "timm", "emca-train", "channel-attention", *([attention] if attention != "none"
                                                                                  else [])]
    data = ModelCardData(library_name="timm", license=card.license, tags=tags, datasets=card.datasets,
                         metrics=["accuracy"], pipeline_tag="image-classification")
    return f"---\n{data.to_yaml()}\n---\n"


def title(card: Card) -> list[str]:
    model, emca = card.results["model"], card.config["emca"]
    coverage = f", coverage {model['coverage']}" if model.get("coverage") else ""
    weights = "the exponential moving average of the weights" if emca["weights"] == "ema" else "the trained weights"
    return [f"# {card.config['architecture']} trained on {card.results['dataset']}", "",
            f"{model['backbone']} with attention `{model['attention']}`{coverage}, {card.config['num_classes']} "
            f"classes, trained with EMCA-Train (run `{card.results.get('run_id')}`). These are {weights} in the run's "
            f"`{emca['checkpoint']}` (epoch {emca['epoch']} of {card.results['epoch_reached']}).", ""]


def _paper_label(spec: Any, entry: Any) -> str:
    group = f" ({entry.group})" if entry.group else ""
    return f"{spec.paper_name}, {paper.SHORT_NAME.get(entry.backbone, entry.backbone)} {entry.row}{group}"


def _number(value: Optional[float], digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def results_section(card: Card) -> list[str]:
    """What was measured and how, the table (the paper's column where its figures compare) and its notes."""
    protocol = (card.results["dataset"], card.config["pretrained_cfg"]["input_size"][-1])
    spec, entry = card.paper_row or (None, None)
    shown = [key for key in ROWS if key in card.figures]
    compared = {key for key in shown if spec and comparable_with_paper(protocol, spec.protocol, key)
                and getattr(entry.reference, key, None) is not None}
    header = "| metric | this run |" + (f" paper: {_paper_label(spec, entry)} |" if compared else "")
    lines = ["## Results", "", measured_by(card), "", header, "|---|---|" + ("---|" if compared else "")]
    for key in shown:
        metric = METRICS[key]
        row = f"| {metric.label}{UNITS.get(key, ' (%)')} | {_number(card.figures[key], metric.digits)} |"
        if compared:
            reference = getattr(entry.reference, key, None) if key in compared else None
            row += f" {_number(reference, metric.digits)} |"
        lines.append(row)
    return [*lines, "", *results_notes(card, protocol, bool(compared)), ""]


def measured_by(card: Card) -> str:
    cfg, evaluation = card.config["pretrained_cfg"], card.evaluation
    size = cfg["input_size"][-1]
    resize = round(size / cfg["crop_pct"])
    images = f"validation images of {card.results['dataset']} ({size} px centre crop, shorter side {resize})"
    if evaluation is None:
        return (f"Not measured by `eval.py` (published with `require_eval=false`): top-1 and top-5 are the trainer's "
                f"validation of epoch {card.config['emca']['epoch']} on the {card.results['num_val']} {images}; no "
                "rotations or speeds.")
    return (f"Measured by `eval.py` (`{card.eval_file}`, {evaluation.get('created')}) on the "
            f"{evaluation['dataset']['num_val']} {images}, on {evaluation['device']}.")


def results_notes(card: Card, protocol: tuple[str, int], compared: bool) -> list[str]:
    """The units, the speeds' machine, and why the paper's figures are or are not beside ours."""
    params = card.evaluation["params"] if card.evaluation else card.results["params"]
    notes = [f"- #P and GFLOPs in the paper's units (EMCA-Train's docs/paper.md#units): #P in M = 2^20 parameters "
             f"({params:,} here); GFLOPs in 2^30 multiply-accumulates of the conv, linear, BatchNorm and pooling "
             "layers for one image."]
    speed = (card.evaluation or {}).get("speed")
    if speed:
        notes.append(f"- Speeds on {speed['device']}" + ("; the paper's on the authors' Titan XP machines." if compared
                                                         else "."))
    elif card.evaluation is not None:
        notes.append("- Rotations and speeds not measured (`eval.py accuracy_only=true`).")
    if card.paper_row is None:
        notes.append("- The paper has no row for this model.")
    elif not compared:
        spec, entry = card.paper_row
        dataset, size = spec.protocol
        notes.append(f"- The paper's {_paper_label(spec, entry)} (top-1 {_number(entry.reference.top1, 2)} on "
                     f"{dataset} at {size} px) is not set beside a run on {protocol[0]} at {protocol[1]} px.")
    if card.options:
        off = ", ".join(f"{key}={value}" for key, value in card.options)
        notes.append(f"- Attention options off the paper's: {off}; the paper's figures are of its own options.")
    return notes


def curve_section(card: Card) -> list[str]:
    best, final = card.results["best"], card.results["final"]
    lines = ["## Training curve", ""]
    if card.curve:
        lines += [f"![Validation top-1 per epoch]({card.curve})", ""]
    lines += [f"Validation top-1 during training: best {best['val_top1']:.2f} % at epoch {best['epoch']}, "
              f"{final['val_top1']:.2f} % at the last (epoch {final['epoch']} of {card.results['epochs']}).", ""]
    return lines


def usage_section(card: Card) -> list[str]:
    """Loading it with timm (the folder or the Hub) and with EMCA-Train."""
    source = f"hf-hub:{card.repo_id}" if card.repo_id else "local-dir:PATH/TO/THIS/FOLDER"
    name, args = card.config["architecture"], card.config["model_args"]
    classes = card.config["num_classes"]
    return ["## How to use", "",
            "The `emca_*` architectures are EMCA-Train's: `import emca.models` registers them with timm.", "",
            "```python", "import timm", "import emca.models  # registers the emca_* architectures with timm", "",
            f'model = timm.create_model("{source}", pretrained=True).eval()',
            "config = timm.data.resolve_data_config({}, model=model)  # the run's validation crop, mean and std",
            "transform = timm.data.create_transform(**config)", "",
            "# or from the weights file alone, with config.json's model_args as keywords:",
            *keyword_call(f'model = timm.create_model("{name}", pretrained=True,',
                          [*(f"{key}={value!r}" for key, value in args.items()),
                           f'pretrained_cfg_overlay=dict(file="model.safetensors", num_classes={classes})']),
            "```", "",
            "With EMCA-Train, `emca.load_model` gives the model and the run's own validation transform:", "",
            "```python", "import emca", "", 'model, transform = emca.load_model("PATH/TO/THIS/FOLDER")', "```", ""]


def keyword_call(opening: str, arguments: list[str], width: int = 100) -> list[str]:
    """`opening` (a call's start) and its arguments, comma-separated and closed, wrapped at `width` with
    the continuation lines under the opening parenthesis."""
    indent = " " * (opening.index("(") + 1)
    lines, line = [], opening
    for number, argument in enumerate(arguments):
        text = argument + ("," if number < len(arguments) - 1 else ")")
        if len(line) + 1 + len(text) > width:
            lines.append(line)
            line = indent
        line += text if line.endswith(("(", " ")) else " " + text
    return [*lines, line]


def training_section(card: Card) -> list[str]:
    results = card.results
    command = (["```bash", card.command, "```"] if card.command
               else ["The run recorded no command line (it was trained in-process); `config.yaml` holds its "
                     "configuration."])
    return ["## Training", "", *command, "",
            f"Dataset: {results['dataset']}, {results['num_train']} training and {results['num_val']} validation "
            f"images, {card.config['num_classes']} classes, trained at {results['image_size']} px. "
            f"{results['epoch_reached']} epochs of {results['epochs']}, {results['world_size']} process(es) on "
            f"{results['device']}, {results['wall_time_s']:.0f} s.", "",
            "<details><summary>config.yaml</summary>", "", "```yaml", card.run_config.rstrip(), "```", "", "</details>",
            ""]


def provenance_section(card: Card) -> list[str]:
    git, versions = card.results.get("git") or {}, card.results.get("versions") or {}
    dirty = " with uncommitted changes (the commit alone does not reproduce the code)" if git.get("dirty") else ""
    lines = ["## Provenance", "",
             f"- Trained by EMCA-Train at commit `{git.get('commit')}`{dirty}.",
             "- Libraries: " + ", ".join(f"{name} {version}" for name, version in versions.items() if version) + "."]
    evaluated = ((card.evaluation or {}).get("git") or {}).get("commit")
    if evaluated and evaluated != git.get("commit"):
        lines.append(f"- Evaluated at commit `{evaluated}`.")
    lines += ["- Files: `model.safetensors` (weights), `config.json` (timm's configuration), `config.yaml`, "
              "`results.json` and `train.log` (the run's own)" + (f", `{card.curve}`." if card.curve else "."), ""]
    return lines
