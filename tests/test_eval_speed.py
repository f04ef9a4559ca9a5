"""eval.py's speeds: measured under the cuDNN settings the run trained with (the process's own flags
restored after), timed between device synchronisations after the warm-up, and saying how their
batches reached the model (the batch-1 loader's queues at their least). On the CPU in seconds; the
CUDA-marked case runs on the first GPU lent (benchmarks/device_check.sh)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from emca.analysis import checkpoint_eval, speed
from emca.analysis.checkpoint_eval import format_summary, measure_speeds
from emca.analysis.speed import batches_ahead, cudnn_as_trained, describe_loading, time_model, time_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# speed.* small enough for a test: FPS 2 images after 1 warm-up, FPS-dagger 1 batch of 4, FPS-double-dagger
# the whole (fake) validation set in batches of 4.
SPEED = SimpleNamespace(warmup=1, single_images=2, single_workers=1, batch=4, workers=0, model_iterations=1,
                        model_warmup=1)
CPU = torch.device("cpu")


class Recorder(torch.nn.Module):
    """A classifier that costs nothing and records, at each forward, cuDNN's flags and the batch size."""

    def __init__(self, events: list | None = None):
        super().__init__()
        self.head = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.flags, self.events = [], [] if events is None else events

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.flags.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic))
        self.events.append(("forward", images.shape[0]))
        return self.head(images)


class ZeroLoader:
    """`images` zero images of 16 px in batches of `batch_size`, on `device`."""

    def __init__(self, images: int, batch_size: int, device: torch.device = CPU):
        self.images, self.batch_size, self.device = images, batch_size, device

    def __len__(self) -> int:
        return -(-self.images // self.batch_size)

    def __iter__(self):
        for start in range(0, self.images, self.batch_size):
            batch = min(self.batch_size, self.images - start)
            yield torch.zeros(batch, 3, 16, 16, device=self.device), torch.zeros(batch, dtype=torch.long)


def fake_loaders(monkeypatch, images: int = 10) -> list[dict]:
    """measure_speeds' loaders as ZeroLoaders; returns the loader settings each was asked with."""
    asked = []

    def build_loaders(settings, loader_cfg, **kwargs):
        asked.append(dict(loader_cfg))
        return SimpleNamespace(val=ZeroLoader(images, settings["batch_size"], kwargs["device"]))

    monkeypatch.setattr(checkpoint_eval, "build_loaders", build_loaders)
    return asked


def speeds(model, loader_cfg: dict, deterministic: bool = False, device: torch.device = CPU, num_val: int = 10,
           dataset_cfg: dict | None = None) -> dict:
    return measure_speeds(model, SPEED, dataset_cfg or {"image_size": 16}, loader_cfg, device, channels_last=False,
                          amp_dtype=None, seed=0, classes=None, num_val=num_val, deterministic=deterministic)


# ----------------------------------------------------------------------------- cuDNN as trained
@pytest.mark.parametrize("deterministic", [False, True])
def test_every_timed_forward_runs_under_the_runs_cudnn_flags_and_the_process_gets_its_own_back(
        deterministic, monkeypatch):
    cudnn = torch.backends.cudnn
    # The process's flags, each the opposite of what the run's training set (conftest restores them after).
    cudnn.benchmark, cudnn.deterministic = deterministic, not deterministic
    fake_loaders(monkeypatch)
    model = Recorder()
    speed_record = speeds(model, {"name": "torchvision"}, deterministic)
    # FPS: 1 warm-up + 2 images; FPS-dagger: 1 + 1 batches; FPS-double-dagger: 1 warm-up, the last batch of 2
    # seen untimed, 2 timed batches.
    assert len(model.flags) == 3 + 2 + 4
    assert set(model.flags) == {(not deterministic, deterministic)}  # training's configure_determinism
    assert (cudnn.benchmark, cudnn.deterministic) == (deterministic, not deterministic)
    assert speed_record["cudnn"] == {"benchmark": not deterministic, "deterministic": deterministic,
                                     "as_trained": f"trainer.deterministic={str(deterministic).lower()}",
                                     "used": False}


def test_the_process_cudnn_flags_come_back_after_a_failed_measurement():
    cudnn = torch.backends.cudnn
    cudnn.benchmark, cudnn.deterministic = False, True
    with pytest.raises(RuntimeError, match="out of memory"), cudnn_as_trained(deterministic=False) as flags:
        assert (cudnn.benchmark, cudnn.deterministic) == (True, False) and flags["benchmark"] is True
        raise RuntimeError("CUDA out of memory")
    assert (cudnn.benchmark, cudnn.deterministic) == (False, True)


# ----------------------------------------------------------------------------- how each speed was timed
def test_batches_ahead_and_the_timing_words_of_each_loader():
    dali, torchvision = {"name": "dali", "prefetch_queue_depth": 2}, {"name": "torchvision", "prefetch_factor": 2}
    single = checkpoint_eval.SINGLE_IMAGE_QUEUES
    assert batches_ahead({**dali, **single}, 1) == 1 and batches_ahead(dali, 8) == 2
    assert batches_ahead({**torchvision, **single}, 1) == 1 and batches_ahead(torchvision, 8) == 16
    assert batches_ahead({**torchvision, **single}, 0) == 0 and batches_ahead({"name": "synthetic"}, 4) == 0
    # A checkpoint's loader config without the option: LoaderConfig's default (2).
    assert batches_ahead({"name": "dali"}, 1) == batches_ahead({"name": "torchvision"}, 1) == 2
    assert describe_loading({**dali, **single}, 0) == (
        "loader=dali, 1 CPU thread(s), up to 1 batch(es) read and decoded ahead while the model runs "
        "(loader.prefetch_queue_depth=1)")
    assert describe_loading(torchvision, 8) == (
        "loader=torchvision, 8 worker process(es), up to 16 batch(es) read and decoded ahead while the model "
        "runs (8 x loader.prefetch_factor=2)")
    assert describe_loading(torchvision, 0) == (
        "loader=torchvision without worker processes: each batch read and decoded when the model asks for it")
    assert "nothing read or decoded" in describe_loading({"name": "synthetic"}, 0)


@pytest.mark.parametrize("loader, fps_ahead, pipeline_ahead", [("dali", 1, 3), ("torchvision", 1, 0)])
def test_eval_json_and_the_summary_say_what_each_speed_decoded_ahead(loader, fps_ahead, pipeline_ahead, monkeypatch):
    # The run's own queues deeper than the defaults: FPS-double-dagger keeps them, FPS has them at 1.
    loader_cfg = {"name": loader, "prefetch_queue_depth": 3, "dali_reader_prefetch": 2, "prefetch_factor": 3}
    asked = fake_loaders(monkeypatch)
    record = speeds(Recorder(), loader_cfg)
    fps_asked, pipeline_asked = asked
    assert {key: fps_asked[key] for key in checkpoint_eval.SINGLE_IMAGE_QUEUES} == checkpoint_eval.SINGLE_IMAGE_QUEUES
    assert pipeline_asked == loader_cfg
    assert (record["fps"]["ahead"], record["fps_model"]["ahead"], record["fps_pipeline"]["ahead"]) == (
        fps_ahead, None, pipeline_ahead)  # SPEED.workers=0: torchvision reads FPS-double-dagger's batches in-process
    assert record["fps"]["timing"] == describe_loading(fps_asked, SPEED.single_workers)
    assert record["fps_pipeline"]["timing"] == describe_loading(loader_cfg, SPEED.workers)
    assert "no loader" in record["fps_model"]["timing"] and "device synchronisations" in record["clock"]
    lines = format_summary(report(record, loader)).splitlines()
    speed_line = next(line for line in lines if line.startswith("speed "))
    assert "(batch 1, 1 worker, 2 images after 1 warm-up, 1 image decoded ahead)" in speed_line
    batches = f"{pipeline_ahead} batches decoded ahead" if pipeline_ahead else "none decoded ahead"
    assert f"(validation pass, batch 4, 0 workers, {batches})" in speed_line
    assert lines[lines.index(speed_line) + 1].endswith(
        "; cuDNN benchmark on, deterministic off as trained (trainer.deterministic=false), unused on this device")


def report(speed_record: dict, loader: str) -> dict:
    """The least of an eval.json that format_summary prints, around `speed_record`."""
    return {
        "checkpoint": "run/checkpoints/best.pt", "checkpoint_epoch": 1, "loader": loader, "world_size": 1,
        "model": {"backbone": "resnet18", "attention": "none", "num_classes": 5, "coverage": None},
        "dataset": {"name": "imagefolder", "num_val": 10, "image_size": 16}, "amp": "off",
        "val": {"top1": 20.0, "top5": 100.0, "loss": 1.6}, "params": 1e6, "gflops": 0.1, "image_size": 16,
        "rotation": {"0": {"top1": 20.0}}, "speed": speed_record, "output": "run/eval.json",
    }


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_the_batch1_loader_runs_with_its_queues_one_batch_deep(loader, image_tree, monkeypatch):
    """The loaders measure_speeds builds, real ones over a small image folder: FPS's at prefetch depth 1
    (DALI's pipeline and file reader; the DataLoader's worker), FPS-double-dagger's as the run set them."""
    from emca.data import build_loaders, dali_loader

    built, pipelines = [], []

    def recording_build_loaders(*args, **kwargs):
        built.append(build_loaders(*args, **kwargs).val)
        return SimpleNamespace(val=built[-1])

    def recording_iterator(pipes, *args, **kwargs):
        pipelines.append(pipes[0])
        return dali_iterator(pipes, *args, **kwargs)

    dali_iterator = dali_loader.DALIGenericIterator
    monkeypatch.setattr(checkpoint_eval, "build_loaders", recording_build_loaders)
    monkeypatch.setattr(dali_loader, "DALIGenericIterator", recording_iterator)
    root = image_tree({"val": {"a": 3, "b": 3}}, size=(20, 20))
    dataset_cfg = {"name": "imagefolder", "root": str(root), "image_size": 16, "val_resize": 16, "workers": 0}
    loader_cfg = {"name": loader, "prefetch_queue_depth": 2, "dali_reader_prefetch": 2, "prefetch_factor": 2}
    record = speeds(Recorder(), loader_cfg, num_val=6, dataset_cfg=dataset_cfg)
    fps_loader, pipeline_loader = built
    if loader == "dali":
        assert [(pipe.max_batch_size, pipe.prefetch_queue_depth) for pipe in pipelines] == [(1, 1), (4, 2)]
        assert (fps_loader.prefetch_queue_depth, fps_loader.reader["prefetch_queue_depth"]) == (1, 1)
        assert (pipeline_loader.prefetch_queue_depth, pipeline_loader.reader["prefetch_queue_depth"]) == (2, 2)
    else:
        assert (fps_loader.loader.num_workers, fps_loader.loader.prefetch_factor) == (1, 1)
        assert pipeline_loader.loader.num_workers == 0  # SPEED.workers: FPS-double-dagger in this process
    assert record["fps"]["ahead"] == 1 and record["fps"]["images"] == 2


# ----------------------------------------------------------------------------- the clock
def test_the_clock_reads_between_device_synchronisations_after_the_warmup(monkeypatch):
    """On a CUDA device (faked: only synchronize is called on it) the clock starts after a
    torch.cuda.synchronize that follows every warm-up batch, and stops after one that follows the last
    timed batch; a smaller last batch is seen once before the clock starts (cuDNN autotunes each shape)."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("synchronize", str(device))))
    monkeypatch.setattr(speed.time, "perf_counter", lambda: events.append(("clock",)) or float(len(events)))
    model = Recorder(events)
    throughput = time_pipeline(model, ZeroLoader(10, 4), torch.device("cuda", 0), batch_size=4, workers=0, warmup=1,
                               last_batch=2)
    sync, clock = ("synchronize", "cuda:0"), ("clock",)
    assert events == [("forward", 4), ("forward", 2), sync, clock, ("forward", 4), ("forward", 2), sync, clock]
    assert (throughput.images, throughput.timed_batches, throughput.warmup_batches) == (6, 2, 1)

    events.clear()
    monkeypatch.setattr(speed, "synchronize", lambda device: events.append(("synchronize", str(device))))
    time_model(model, CPU, batch_size=4, image_size=16, warmup=2, iterations=3)
    sync = ("synchronize", "cpu")
    assert events == [("forward", 4)] * 2 + [sync, clock] + [("forward", 4)] * 3 + [sync, clock]


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_synthetic_speeds_on_the_device_run_with_cudnn_autotuning(device):
    """measure_speeds with its real (synthetic) loaders: on CUDA every forward ran with cudnn.benchmark
    as a run without trainer.deterministic trained, and eval.json says cuDNN was used."""
    model = Recorder().to(device)
    dataset_cfg = {"name": "imagefolder", "root": "unused", "image_size": 16, "num_classes": 5}
    record = speeds(model, {"name": "synthetic", "val_steps": 3}, device=torch.device(device), num_val=10,
                    dataset_cfg=dataset_cfg)
    assert set(model.flags) == {(True, False)}
    assert record["cudnn"]["used"] is (device == "cuda")
    assert record["fps_pipeline"]["timed_batches"] == 2 and record["fps_pipeline"]["ahead"] == 0
    assert all(record[key]["images_per_second"] > 0 for key in ("fps", "fps_model", "fps_pipeline"))
