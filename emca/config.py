"""The training config schema: every Hydra group typed by a dataclass and registered in Hydra's
ConfigStore, so that a misspelt key or a wrong type fails at start-up with Hydra's own error.
A well-typed but impossible value (optimizer.lr=-1, dataset.workers=-1) is refused where the option
is read, in one line naming the option, the value and what is accepted (emca/options.py).

configs/train.yaml names `train_schema` first in its defaults list; the group YAML files
(configs/<group>/*.yaml) are then merged into the typed nodes below and validated field by field.
The `attention` group has no YAML files: its choices are registered here from the attention table.
Importing this module registers the schema and the resolvers configs/train.yaml uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from emca.data.config import DatasetConfig, LoaderConfig
from emca.engine.distributed import env_rank, scratch_run_dir
from emca.layers.create_attn import ATTENTIONS
from emca.models.config import AttentionConfig, BackboneConfig, CoverageConfig, attention_choices


class AmpMode(Enum):
    off = "off"  # float32 throughout (write it quoted in YAML: a bare `off` is the boolean false)
    bf16 = "bf16"  # autocast to bfloat16, no loss scaling needed
    fp16 = "fp16"  # autocast to float16 with a GradScaler


class LrSchedule(Enum):
    step = "step"  # multiply by gamma at each milestone (the paper: x0.1 at epochs 30, 60, 90)
    cosine = "cosine"  # cosine decay from lr to 0 over the epochs after warm-up


class NoWeightDecay(Enum):
    bn = "bn"  # BatchNorm weights and biases
    bias = "bias"  # every bias (any parameter with ndim <= 1 that is named *.bias)
    srm = "srm"  # every parameter of SRM-based attention modules (srm, emca_srm), as SRM's own code


@dataclass
class OptimizerConfig:
    """The optimisation recipe: SGD, its learning-rate schedule and the loss' label smoothing."""

    # Learning rate for a global batch of lr_scale_batch images.
    lr: float = 0.1
    # Linear scaling rule: the rate used is lr * dataset.batch_size / lr_scale_batch; null: lr as given.
    lr_scale_batch: Optional[int] = 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    # Parameter kinds trained without weight decay: any of bn, bias, srm.
    no_weight_decay: List[NoWeightDecay] = field(default_factory=list)
    schedule: LrSchedule = LrSchedule.step
    # Step schedule: where lr is multiplied by gamma, as fractions of trainer.epochs, each rounded
    # to a whole epoch (0.3, 0.6, 0.9 of 100 epochs = epochs 30, 60, 90).
    milestones: List[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])
    gamma: float = 0.1
    # Linear warm-up from ~0 to lr over this many epochs (counted per iteration), then the schedule.
    warmup_epochs: int = 0
    label_smoothing: float = 0.0


@dataclass
class TrainerConfig:
    # Defaults to the dataset's schedule length (ImageNet 100).
    epochs: int = "${dataset.epochs}"  # type: ignore[assignment]
    # auto: cuda:LOCAL_RANK when CUDA is available, else cpu.
    device: str = "auto"
    amp: AmpMode = AmpMode.off
    channels_last: bool = False
    # torch.compile the training model (evaluation runs the eager model).
    compile: bool = False
    seed: int = 0
    # Deterministic algorithms only: with it, a resumed run ends bit-identical to an uninterrupted one.
    deterministic: bool = False
    # Convert BatchNorm to SyncBatchNorm under DDP.
    sync_bn: bool = False
    # null: start fresh (refused when the run folder already holds a run);
    # auto: continue from the run folder's checkpoints/last.pt if there is one; PATH: from that file.
    resume: Optional[str] = None
    # Seconds a collective waits for the other DDP ranks before every rank fails with one line (a
    # stopped, hung or dead rank); PyTorch's own default is the same 30 minutes.
    dist_timeout_s: float = 1800.0
    # Validate every N epochs (and always after the last).
    eval_every: int = 1
    # Log training loss / top-1 / lr / images/s every N steps.
    log_every: int = 20
    # Cap on training steps per epoch, for quick runs and tests; null: the whole epoch.
    max_steps_per_epoch: Optional[int] = None


@dataclass
class TrainConfig:
    backbone: BackboneConfig = MISSING
    attention: AttentionConfig = MISSING
    coverage: CoverageConfig = MISSING
    dataset: DatasetConfig = MISSING
    loader: LoaderConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    trainer: TrainerConfig = MISSING


def _run_dir(default: str) -> str:
    return default if env_rank() == 0 else scratch_run_dir()


def register() -> None:
    """Register the schema and the resolvers configs/train.yaml uses (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    # The `attention` group's choices come from the attention table, not from YAML files.
    for name, node in attention_choices().items():
        store.store(group="attention", name=name, node=node)
    # Non-zero torchrun ranks get a scratch job folder (see emca.engine.distributed).
    OmegaConf.register_new_resolver("emca.run_dir", _run_dir, replace=True)
    # configs/experiment/table5.yaml sweeps every attention of the table: ${emca.attentions:}.
    OmegaConf.register_new_resolver("emca.attentions", lambda: ",".join(ATTENTIONS), replace=True)


register()
