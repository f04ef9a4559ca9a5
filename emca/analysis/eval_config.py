"""eval.py's schema (configs/eval.yaml): every option's default, type and meaning, registered in
Hydra's ConfigStore as `eval_schema`, so that Hydra refuses a misspelt key or a wrong type before
anything runs (emca/cli.py says so in one line: the option, the value and the field's `accepted`
text or `minimum`). What a type cannot say (speed.batch >= 1, rotations in multiples of 90) is
checked by emca.analysis.checkpoint_eval.check_options, from the same metadata.

Only dataclasses and Hydra's ConfigStore here: eval.py imports this module before composing, and
`eval.py --help` loads neither torch nor the models.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional

from hydra.core.config_store import ConfigStore

# What emca/cli.py and check_options print after "must be" for an option whose type alone does not
# say it; `minimum` (an integer >= it, or null where the field is Optional) is the other kind of check.
ROTATIONS = "a list of multiples of 90 degrees, e.g. [0,90,180,270]"
INDICES = "null or a list of validation image positions >= 0, e.g. [0,120,300]"
CLASSES = "null or a list of class folder names, e.g. [n01440764,n02102040]"
LAYER = "auto or a module name, e.g. layer3.1"


def _at_least(minimum: int, default: Optional[int]) -> Any:
    return field(default=default, metadata={"minimum": minimum})


@dataclass
class EvalDatasetConfig:
    """Data settings replacing the run's (emca.data.DatasetConfig's fields); null keeps the run's value."""

    name: Optional[str] = None
    root: Optional[str] = None
    # A detection run's (format=coco) split to evaluate: <root>/<val_split>/ and annotations/instances_<val_split>.json.
    val_split: Optional[str] = None
    num_classes: Optional[int] = None
    # Also the resolution of GFLOPs and of the model-only speed.
    image_size: Optional[int] = None
    val_resize: Optional[int] = None
    # Validation centre crop (the run's own null: image_size).
    val_image_size: Optional[int] = None
    # Global batch of the accuracy pass.
    batch_size: Optional[int] = None
    workers: Optional[int] = None
    on_bad_image: Optional[str] = None


@dataclass
class SpeedConfig:
    """The paper's three speeds (FPS, FPS-dagger, FPS-double-dagger). FPS: batch 1 with one loader
    worker, whole pipeline; FPS-dagger: the model alone on a synthetic batch; FPS-double-dagger: the
    whole validation pass with `workers` loader workers. FPS and FPS-dagger time a fixed number of
    images whatever the validation set's size (the paper fixes no count): batch 1 over a whole set
    took minutes on a CPU. A validation pass shorter than the warm-up is still measured (warm-up cut
    to leave one timed batch); eval.json records each speed's warm-up and timed batches and images
    (images_requested: the count asked for, null for the whole pass) and flags (few_batches) one from
    fewer than 10 timed batches or a cut warm-up, and the printed summary says so.

    All three run under the cuDNN settings the run trained with (cudnn.benchmark unless
    trainer.deterministic, as training sets them), the process's own restored after; eval.json's
    speed.cudnn says which. A loader prepares batches while the model runs: FPS's loader has its queues
    at their least (loader.prefetch_queue_depth, dali_reader_prefetch, prefetch_factor: 1), which
    leaves one image read and decoded ahead of the model (DALI starts the next run as it hands a batch
    over; a DataLoader worker keeps one in flight); single_workers=0 with loader=torchvision reads
    each image when the model asks for it. eval.json records each speed's `ahead` (batches read and
    decoded ahead of the model) and `timing` (how its batches reached the model), and the summary's
    speed line says how many."""

    enabled: bool = True
    # FPS loader workers (DALI: CPU threads, at least 1); 0 with loader=torchvision: one image at a
    # time, none decoded ahead.
    single_workers: int = _at_least(0, 1)
    # FPS images timed after the warm-up (fewer where val/ is smaller); null: the rest of the
    # validation set (what eval.py once timed).
    single_images: Optional[int] = _at_least(1, 100)
    # FPS-dagger and FPS-double-dagger batch size.
    batch: int = _at_least(1, 256)
    # FPS-double-dagger loader workers; null: min(8, CPUs this process may use) (eval.json records the number used).
    workers: Optional[int] = _at_least(0, None)
    # FPS-dagger timed batches (10 x 256 images; 50 took a minute on 2 CPU cores).
    model_iterations: int = _at_least(1, 10)
    # FPS-dagger untimed batches: one input, no loader, so the allocator and cuDNN's choice of
    # kernels are settled after the first.
    model_warmup: int = _at_least(0, 2)
    # Untimed batches before FPS and FPS-double-dagger (loader start-up too).
    warmup: int = _at_least(0, 10)


@dataclass
class GradcamConfig:
    """Figures 7-8: Grad-CAM heat maps, one PNG per image (scripts/gradcam_grid.py puts several runs
    side by side). Choose the images one way (none by default). Images are numbered by their position
    in val/'s sorted listing (class folder, then file name), the loaders' order."""

    # N images from N different classes, spread evenly over the class list.
    images: int = _at_least(0, 0)
    # Or the first image of each named class (folder names; numbers are read as names, as digits' folders are).
    classes: Optional[List[str]] = field(default=None, metadata={"accepted": CLASSES})
    # Or these positions.
    indices: Optional[List[int]] = field(default=None, metadata={"accepted": INDICES})
    # auto: the deepest residual block whose output at dataset.image_size is at least 2x2 (layer4's
    # last at 224 px, layer3's at 32 px; a 1x1 output gives a flat map); or a module, e.g. layer3.1.
    layer: str = field(default="auto", metadata={"accepted": LAYER})


@dataclass
class EvalConfig:
    """configs/eval.yaml: what eval.py measures of a checkpoint, and how."""

    # Required: path to a train.py checkpoint (checkpoints/best.pt or last.pt).
    checkpoint: Optional[str] = None
    # null: eval.json (best.pt) / eval_last.json (last.pt) in the run folder, or beside the checkpoint.
    output: Optional[str] = None
    # auto | cpu | cuda
    device: str = "auto"
    # null: as the run trained (trainer.amp); "off" | bf16 | fp16 (checked by emca.engine.precision).
    amp: Optional[str] = None
    # null: as the run trained (trainer.channels_last).
    channels_last: Optional[bool] = None
    # true: the EMA weights of a run trained with trainer.ema (eval_ema.json, ...).
    ema: bool = False
    # The `loader` group's choice (configs/loader), replacing the run's loader; null: the run's own.
    # Untyped here: its schema (emca.data.LoaderConfig) would import torch before --help.
    loader: Any = None
    dataset: EvalDatasetConfig = field(default_factory=EvalDatasetConfig)
    # true: top-1 / top-5 / loss (and the cheap #P, GFLOPs) from one pass over the validation set, as
    # torchvision's --test-only; rotations, learned_scales, speed and Grad-CAM are then not measured
    # (eval.json says accuracy_only: true; asking for Grad-CAM maps as well is refused).
    accuracy_only: bool = False
    # Table 9: top-1 with the validation images rotated clockwise by these angles (0 = as given).
    rotations: List[int] = field(default_factory=lambda: [0, 90, 180, 270], metadata={"accepted": ROTATIONS})
    # Figure 6: per-channel scales of the first attention module of each stage, averaged over the
    # validation set (skipped for a model without attention).
    learned_scales: bool = True
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    gradcam: GradcamConfig = field(default_factory=GradcamConfig)


def minimums(schema: type = EvalConfig, prefix: str = "") -> Iterator[tuple[str, int, bool]]:
    """(option, minimum, nullable) of every field of `schema` with a `minimum`, nested ones included."""
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        if dataclasses.is_dataclass(item.default_factory):
            yield from minimums(item.default_factory, f"{prefix}{item.name}.")
        elif "minimum" in item.metadata:
            yield f"{prefix}{item.name}", item.metadata["minimum"], type(None) in typing.get_args(hints[item.name])


def register() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


register()
