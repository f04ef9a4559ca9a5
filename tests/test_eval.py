"""eval.py and its analysis pieces: rotations, learned scales, speeds, Grad-CAM, and end to end on
a checkpoint made by a real (tiny) train.py sweep that tests/test_tables.py also reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import emca.analysis.eval_config  # noqa: F401  (registers eval_schema, as eval.py does before composing)
from emca.analysis.scales import LearnedScales, first_attention_per_stage
from emca.analysis.speed import time_model, time_pipeline
from emca.engine.distributed import DistributedContext
from emca.engine.tasks.classification import evaluate, rotate_clockwise
from emca.models import build_model

REPO = Path(__file__).resolve().parents[1]
CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
# A sweep small enough for a CPU test: the plain ResNet-18 and EMCA-SE of Table 4, 2 epochs of
# 15 steps each on 16 px digits (about 30 % top-1: enough for rotations to matter).
# The sweep's job folders, named by job number and swept value (configs/train.yaml, hydra.sweep.subdir).
RUN0, RUN1 = "0_attention-none", "1_attention-emca_se"
SWEEP_OVERRIDES = [
    "+experiment=table4", "backbone=resnet18", "attention=none,emca_se", "loader=torchvision",
    "dataset=digits", "dataset.image_size=16", "dataset.val_resize=16", "dataset.batch_size=32",
    "dataset.workers=0", "trainer.epochs=2", "trainer.max_steps_per_epoch=15", "trainer.device=cpu",
    "optimizer.lr=0.05",
]
# One intra-op thread per process: on a shared 2-core machine, OpenMP threads that spin while the
# other core is busy make these small forwards 10-50x slower.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1"}


def tiny_model(attention="emca_se", integration="first", coverage=("all", 1), num_classes=5):
    torch.manual_seed(0)
    return build_model({"name": "resnet18"}, {"name": attention, "integration": integration},
                       {"stages": coverage[0], "blocks": coverage[1]}, num_classes).eval()


def random_batches(count=3, batch=4, size=16, num_classes=5):
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(batch, 3, size, size, generator=generator),
            torch.randint(0, num_classes, (batch,), generator=generator),
        )
        for _ in range(count)
    ]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_python(*args: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **SUBPROCESS_ENV, **(env or {})})


# ----------------------------------------------------------------------------- the shared sweep
def make_sweep(base: Path) -> Path:
    """Run (once per test session; later calls reuse it) the tiny train.py sweep under base."""
    sweep = base / "sweep"
    if not (sweep / RUN1 / "results.json").is_file():
        result = run_python("train.py", "-m", *SWEEP_OVERRIDES, f"hydra.sweep.dir={sweep}", env=sweep_env(base))
        assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def sweep_env(base: Path) -> dict:
    return {"EMCA_CACHE": str(base / "emca-cache")}


@pytest.fixture(scope="session")
def sweep_base(tmp_path_factory) -> Path:
    # basetemp itself, not a mktemp folder: tests/test_tables.py's copy of this fixture then finds
    # the same sweep and does not train again.
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def trained_sweep(sweep_base) -> Path:
    return make_sweep(sweep_base)


@pytest.fixture(scope="session")
def evaluated(trained_sweep, sweep_base):
    """eval.py on the EMCA-SE run's last checkpoint with every measurement switched on (tiny)."""
    checkpoint = trained_sweep / RUN1 / "checkpoints" / "last.pt"
    result = run_python(
        "eval.py", f"checkpoint={checkpoint}", "speed.batch=32", "speed.workers=0", "speed.single_workers=0",
        "speed.single_images=48", "speed.warmup=2", "speed.model_iterations=4", "gradcam.images=3",
        env=sweep_env(sweep_base),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # In the run folder: the checkpoints' generation folder is replaced at each save. last.pt's report
    # is eval_last.json (eval.json is best.pt's).
    report = json.loads((trained_sweep / RUN1 / "eval_last.json").read_text())
    return result, report, json.loads((trained_sweep / RUN1 / "results.json").read_text())


# ----------------------------------------------------------------------------- rotations
def test_rotate_clockwise_turns_the_top_left_corner_to_the_top_right():
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 0, 0] = 1.0  # top-left
    assert rotate_clockwise(image, 90)[0, 0, 0, 3] == 1.0  # top-right
    assert rotate_clockwise(image, 180)[0, 0, 3, 3] == 1.0  # bottom-right
    assert rotate_clockwise(image, 270)[0, 0, 3, 0] == 1.0  # bottom-left
    assert torch.equal(rotate_clockwise(image, 360), image)
    with pytest.raises(ValueError, match="multiples of 90"):
        rotate_clockwise(image, 45)


def test_rotation_zero_equals_plain_evaluation_and_others_see_rotated_images():
    model, batches = tiny_model(), random_batches()
    plain = evaluate(model, batches, CPU, rotations=(0,))[0]
    all_rotations = evaluate(model, batches, CPU, rotations=(0, 90, 180, 270))
    assert all_rotations[0] == plain
    rotated_by_hand = evaluate(model, [(rotate_clockwise(x, 90), y) for x, y in batches], CPU, rotations=(0,))[0]
    assert all_rotations[90] == rotated_by_hand
    assert all_rotations[90].loss != plain.loss


# ----------------------------------------------------------------------------- learned scales
@pytest.mark.parametrize(
    "integration, first_blocks", [("first", [0, 0, 0, 0]), ("last", [1, 1, 1, 1]), ("all", [0, 0, 0, 0])]
)
def test_first_attention_module_of_each_stage(integration, first_blocks):
    model = tiny_model("se", integration)
    chosen = first_attention_per_stage(model)
    assert list(chosen) == [
        f"layer{stage}.{block}.attn" for stage, block in zip(range(1, 5), first_blocks, strict=True)
    ]
    assert [stage for stage, _ in chosen.values()] == [1, 2, 3, 4]


def test_learned_scale_statistics_follow_the_gate_outputs():
    model, batches = tiny_model(), random_batches()
    stage1 = model.layer1[0].attn
    # Channels 0-3 of stage 1 get logits of -200: sigmoid underflows to exactly 0 in float32.
    with torch.no_grad():
        stage1.excitation.fc2.weight[:4] = 0.0
        stage1.excitation.fc2.bias[:4] = -200.0
    seen = []
    hook = stage1.gate.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().double()))
    scales = LearnedScales(model, CPU.device)
    evaluate(model, batches, CPU, rotations=(0, 90), while_unrotated=scales.recording)
    hook.remove()
    scales.reduce(CPU)
    rows = scales.statistics()
    assert [row["stage"] for row in rows] == [1, 2, 3, 4] and rows[0]["module"] == "layer1.0.attn"
    # The hook saw unrotated and rotated forwards; the statistics only the unrotated ones.
    average = torch.cat(seen[0::2]).mean(dim=0)
    row = rows[0]
    assert row["images"] == 12 and row["channels"] == 64
    assert row["per_channel_mean"] == pytest.approx(average.tolist(), abs=1e-12)
    assert row["mean"] == pytest.approx(average.mean().item())
    assert row["variance"] == pytest.approx(average.var(unbiased=False).item())
    assert row["below_half"] == pytest.approx((average < 0.5).double().mean().item())
    assert row["zeros"] == pytest.approx(4 / 64)


# ----------------------------------------------------------------------------- speeds
def test_speed_measurements_count_images_after_warmup():
    model = tiny_model()
    batches = random_batches(count=5, batch=4)
    throughput = time_pipeline(model, batches, CPU.device, batch_size=4, workers=0, warmup=2)
    assert throughput.images == 12 and throughput.images_per_second > 0
    assert throughput.images_requested is None  # the whole pass
    capped = time_pipeline(model, batches, CPU.device, batch_size=4, workers=0, warmup=1, max_images=5)
    assert (capped.images, capped.as_dict()["images_requested"]) == (8, 5)
    synthetic = time_model(model, CPU.device, batch_size=4, image_size=16, warmup=1, iterations=2)
    assert synthetic.images == synthetic.images_requested == 8 and synthetic.as_dict()["images_per_second"] > 0
    assert (throughput.warmup_batches, throughput.timed_batches, throughput.few_batches) == (2, 3, True)  # < 10 timed


def test_a_pass_shorter_than_the_warmup_is_timed_on_its_last_batch_and_flagged():
    model, batches = tiny_model(), random_batches(count=3, batch=4)
    short = time_pipeline(model, batches, CPU.device, batch_size=4, workers=0, warmup=10)
    assert (short.warmup_batches, short.timed_batches, short.images, short.warmup_requested) == (2, 1, 4, 10)
    assert short.as_dict()["few_batches"] is True and short.images_per_second > 0
    single = time_pipeline(model, batches[:1], CPU.device, batch_size=4, workers=0, warmup=10)
    assert (single.warmup_batches, single.timed_batches) == (0, 1)
    many = time_pipeline(model, random_batches(count=12, batch=1), CPU.device, batch_size=1, workers=0, warmup=2)
    assert (many.warmup_batches, many.timed_batches, many.few_batches) == (2, 10, False)


class CountingLoader:
    """A validation loader of `images` zero images in batches of `batch_size` that counts the images
    handed out, generated lazily: what a timer reads, not what the set holds."""

    def __init__(self, images: int, batch_size: int, size: int = 16):
        self.images, self.batch_size, self.size, self.read = images, batch_size, size, 0

    def __len__(self) -> int:
        return -(-self.images // self.batch_size)

    def __iter__(self):
        for start in range(0, self.images, self.batch_size):
            batch = min(self.batch_size, self.images - start)
            self.read += batch
            yield torch.zeros(batch, 3, self.size, self.size), torch.zeros(batch, dtype=torch.long)


def test_fps_reads_a_fixed_number_of_images_and_no_batch_after_the_last_timed():
    model = tiny_model()
    for images in (40, 400):
        loader = CountingLoader(images, batch_size=1)
        fps = time_pipeline(model, loader, CPU.device, batch_size=1, workers=0, warmup=3, max_images=12)
        assert (loader.read, fps.images, fps.warmup_batches) == (15, 12, 3), images
    with pytest.raises(ValueError, match="max_images=0 must be an integer >= 1 or None"):
        time_pipeline(model, CountingLoader(4, 1), CPU.device, batch_size=1, workers=0, warmup=0, max_images=0)


def test_the_default_speeds_read_a_fixed_number_of_images_whatever_the_validation_sets_size(monkeypatch):
    """eval.py's default time must not grow with the validation set beyond one accuracy pass and the
    paper's FPS-double-dagger pass: batch-1 FPS over a whole set took minutes (issue 22)."""
    from types import SimpleNamespace

    from emca.analysis import checkpoint_eval

    speed_cfg = eval_options().speed  # eval.yaml's defaults, as `python eval.py checkpoint=PATH` uses them
    assert speed_cfg.single_images is not None, "the default FPS must time a fixed number of images"
    # A model that costs nothing: only the number of images each measurement reads matters here.
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5))
    for num_val in (1_000, 10_000):  # both larger than the FPS warm-up and count
        loaders = []

        def build_loaders(settings, *_args, made=loaders, images=num_val, **_kwargs):
            made.append(CountingLoader(images, settings["batch_size"]))
            return SimpleNamespace(val=made[-1])

        monkeypatch.setattr(checkpoint_eval, "build_loaders", build_loaders)
        speed = checkpoint_eval.measure_speeds(
            model, speed_cfg, {"image_size": 16}, {"name": "torchvision"}, CPU.device, channels_last=False,
            amp_dtype=None, seed=0, classes=None, num_val=num_val, deterministic=False,
        )
        fps_loader, pipeline_loader = loaders
        assert fps_loader.read == speed_cfg.warmup + speed_cfg.single_images, num_val
        assert speed["fps"]["images"] == speed["fps"]["images_requested"] == speed_cfg.single_images
        assert speed["fps"]["warmup_batches"] == speed_cfg.warmup
        assert speed["fps_model"]["images"] == speed_cfg.model_iterations * speed_cfg.batch
        assert speed["fps_model"]["warmup_batches"] == speed_cfg.model_warmup
        assert pipeline_loader.read == num_val  # FPS-double-dagger: the paper's whole validation pass


# ----------------------------------------------------------------------------- eval.py end to end
def test_eval_reproduces_the_runs_final_validation_accuracy(evaluated):
    _, report, results = evaluated
    assert report["checkpoint_epoch"] == results["final"]["epoch"] == 2
    assert report["val"]["top1"] == results["final"]["val_top1"]
    assert report["val"]["top5"] == results["final"]["val_top5"]
    assert report["val"]["images"] == report["dataset"]["num_val"] == 360
    assert report["params"] == results["params"] and report["gflops"] == pytest.approx(results["gflops"])


def test_eval_reports_rotations_scales_speeds_and_gradcam(evaluated):
    result, report, _ = evaluated
    assert set(report["rotation"]) == {"0", "90", "180", "270"}
    assert report["rotation"]["0"]["top1"] == report["val"]["top1"]
    assert [row["module"] for row in report["learned_scales"]] == [f"layer{i}.0.attn" for i in range(1, 5)]
    assert Path(report["learned_scales_plot"]).stat().st_size > 0
    speed = report["speed"]
    assert speed["device"].startswith("cpu")
    assert all(speed[key]["images_per_second"] > 0 for key in ("fps", "fps_model", "fps_pipeline"))
    assert speed["fps"]["batch_size"] == 1 and speed["fps_pipeline"]["batch_size"] == 32
    assert speed["fps_pipeline"]["images_per_second"] > speed["fps"]["images_per_second"]
    # speed.single_workers=0 and speed.workers=0 with loader=torchvision: each batch read when the model asks.
    assert (speed["fps"]["ahead"], speed["fps_model"]["ahead"], speed["fps_pipeline"]["ahead"]) == (0, None, 0)
    assert speed["cudnn"] == {"benchmark": True, "deterministic": False, "as_trained": "trainer.deterministic=false",
                              "used": False}
    assert "none decoded ahead" in result.stdout
    assert "cuDNN benchmark on, deterministic off as trained (trainer.deterministic=false)" in result.stdout
    # At 16 px layer3 and layer4 output 1x1: the deepest block with a 2x2 map is layer2's last.
    gradcam = report["gradcam"]
    assert (gradcam["target_layer"], gradcam["layer_extent"]) == ("layer2.1", [2, 2])
    assert len(gradcam["images"]) == 3 and len(set(gradcam["labels"])) == 3
    assert "accuracy    top-1" in result.stdout and "FPS‡" in result.stdout


def test_the_default_command_evaluates_the_quickstart_run_and_records_each_speeds_batches(compose_train, tmp_path):
    from emca.engine.trainer import train

    from conftest import QUICK_RUN

    # The Quickstart's digits: 360 validation images, 2 batches of the default speed.batch=256,
    # fewer than the default 10 warm-up batches; FPS times its 100 images of the 350 after the warm-up.
    train(compose_train(*QUICK_RUN), str(tmp_path / "run"))
    result = run_python("eval.py", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}")
    assert result.returncode == 0, result.stderr[-3000:]
    speed = json.loads((tmp_path / "run" / "eval.json").read_text())["speed"]
    counts = {
        key: (
            speed[key]["warmup_requested"],
            speed[key]["warmup_batches"],
            speed[key]["timed_batches"],
            speed[key]["few_batches"],
        )
        for key in ("fps", "fps_model", "fps_pipeline")
    }
    assert counts == {"fps": (10, 10, 100, False), "fps_model": (2, 2, 10, False), "fps_pipeline": (10, 1, 1, True)}
    assert [speed[key]["images_requested"] for key in ("fps", "fps_model", "fps_pipeline")] == [100, 2560, None]
    # speed.workers: null, the loader workers this machine's CPUs allow, recorded as the number used.
    assert speed["fps_pipeline"]["workers"] == min(8, len(os.sched_getaffinity(0)))
    assert "FPS‡ from few batches, a rough figure: 1 warm-up + 1 timed batches (warm-up cut from 10)" in result.stdout
    assert "FPS from few" not in result.stdout and "FPS† from few" not in result.stdout
    # The Quickstart's loader=torchvision: one worker, one image in flight (loader.prefetch_factor=1 for FPS).
    assert "(batch 1, 1 worker, 100 images after 10 warm-up, 1 image decoded ahead)" in result.stdout
    assert speed["fps"]["ahead"] == 1 and speed["fps_pipeline"]["ahead"] == 2 * speed["fps_pipeline"]["workers"]
    assert f"wrote       {tmp_path / 'run' / 'eval.json'}" in result.stdout


def test_accuracy_only_measures_the_plain_pass_alone(trained_sweep, sweep_base, tmp_path, monkeypatch):
    from emca.analysis import checkpoint_eval

    def never(*_args, **_kwargs):
        raise AssertionError("accuracy_only=true must skip the speeds, learned scales and their plot")

    passes = []

    def evaluate_and_record(model, loader, ctx, rotations, *args, **kwargs):
        passes.append(list(rotations))
        return evaluate(model, loader, ctx, rotations, *args, **kwargs)

    for skipped in ("measure_speeds", "LearnedScales", "plot_scales", "gradcam_maps"):
        monkeypatch.setattr(checkpoint_eval, skipped, never)
    monkeypatch.setattr(checkpoint_eval, "evaluate", evaluate_and_record)
    monkeypatch.setenv("EMCA_CACHE", sweep_env(sweep_base)["EMCA_CACHE"])
    output = tmp_path / "accuracy.json"
    # The defaults ask for four rotations, the scales and the speeds: the switch alone turns them off.
    cfg = eval_options(f"checkpoint={trained_sweep / RUN1 / 'checkpoints' / 'last.pt'}", "accuracy_only=true",
                       f"output={output}")
    report = checkpoint_eval.evaluate_checkpoint(cfg, CPU)
    assert passes == [[0]]
    written = json.loads(output.read_text())
    assert written["accuracy_only"] is True and list(written["rotation"]) == ["0"]
    assert (written["speed"], written["learned_scales"], written["learned_scales_plot"]) == (None, None, None)
    final = json.loads((trained_sweep / RUN1 / "results.json").read_text())["final"]
    assert (written["val"]["top1"], written["val"]["top5"]) == (final["val_top1"], final["val_top5"])
    summary = checkpoint_eval.format_summary(report)
    assert "skipped     rotations, learned scales, speeds (accuracy_only=true)" in summary
    assert "rotation " not in summary and "speed " not in summary


def test_eval_reads_a_validation_folder_alone_with_the_runs_class_names(evaluated, trained_sweep, sweep_base, tmp_path):
    _, report, _ = evaluated
    digits_val = sweep_base / "emca-cache" / "digits" / "val"
    checkpoint = trained_sweep / RUN1 / "checkpoints" / "last.pt"
    assert torch.load(checkpoint, weights_only=True)["classes"] == [str(digit) for digit in range(10)]
    common = [f"checkpoint={checkpoint}", "dataset.name=imagefolder", "speed.enabled=false", "rotations=[0]",
              "learned_scales=false"]
    # No train/ folder at all: the accuracy of the full validation pass is unchanged.
    (tmp_path / "whole" / "val").mkdir(parents=True)
    for folder in digits_val.iterdir():
        (tmp_path / "whole" / "val" / folder.name).symlink_to(folder)
    result = run_python("eval.py", *common, f"dataset.root={tmp_path / 'whole'}", f"output={tmp_path / 'whole.json'}",
                        env=sweep_env(sweep_base))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "whole.json").read_text())["val"]["top1"] == report["val"]["top1"]
    # Digit 0 left out: the other folders keep their labels (the run's names, not val/'s positions).
    shutil.copytree(tmp_path / "whole", tmp_path / "no_zero", symlinks=True)
    (tmp_path / "no_zero" / "val" / "0").unlink()
    result = run_python(
        "eval.py",
        *common,
        f"dataset.root={tmp_path / 'no_zero'}",
        f"output={tmp_path / 'no_zero.json'}",
        env=sweep_env(sweep_base),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    no_zero = json.loads((tmp_path / "no_zero.json").read_text())
    assert no_zero["val"]["images"] == 360 - len(list((digits_val / "0").iterdir()))
    assert no_zero["val"]["top1"] > 30  # labels shifted by one folder would score near 0


def test_make_tables_fills_table9_and_figure6_from_eval_json(evaluated, trained_sweep, tmp_path):
    _, report, results = evaluated
    sweep = tmp_path / "sweep"
    shutil.copytree(trained_sweep, sweep, ignore=shutil.ignore_patterns("*.pt"))
    # make_tables reads eval.json, best.pt's report: the fixture's report of last.pt stands in for it.
    (sweep / RUN1 / "eval_last.json").rename(sweep / RUN1 / "eval.json")
    done = run_python("scripts/make_tables.py", str(sweep), "--out", str(tmp_path / "tables"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    table9 = lines[next(i for i, line in enumerate(lines) if line.startswith("### Table 9")):]
    emca_row = next(line for line in table9 if line.startswith("| R-18 | EMCA-SE |")).strip("| ").split(" | ")[2:]
    top1 = results["final"]["val_top1"]
    # A digits run stands alone: no difference to the paper's ImageNet number.
    assert emca_row == [
        f"{top1:.2f}",
        *(f"{report['rotation'][degrees]['top1']:.2f}" for degrees in ("90", "180", "270")),
    ]
    # The plain run has no eval.json: its rotated cells are gaps.
    assert next(line for line in table9 if line.startswith("| R-18 | ResNet |")).endswith("| – | – | – |")
    figure6 = lines[next(i for i, line in enumerate(lines) if line.startswith("### Figure 6")):]
    emca_row = next(line for line in figure6 if line.startswith("| R-18 | EMCA-SE |")).strip("| ").split(" | ")[2:]
    expected = [
        f"{stage['mean']:.3f}|{stage['variance']:.4f}|{100 * stage['below_half']:.1f}|{100 * stage['zeros']:.1f}"
        for stage in report["learned_scales"]
    ]
    assert "|".join(emca_row) == "|".join(expected)
    assert not any(line.startswith("| R-18 | ResNet |") for line in figure6)


def test_eval_errors_are_one_line_with_a_nonzero_exit(tmp_path, trained_sweep, sweep_base, image_tree):
    no_config = tmp_path / "no_config.pt"
    torch.save({"model": tiny_model().state_dict()}, no_config)
    three_classes = image_tree({"train": {"a": 2, "b": 2, "c": 2}, "val": {"a": 1, "b": 1, "c": 1}})
    checkpoint = trained_sweep / RUN0 / "checkpoints" / "last.pt"
    # A checkpoint without class names (as written before they were kept) labels by val/'s folders.
    unnamed = tmp_path / "unnamed.pt"
    state = torch.load(checkpoint, weights_only=True)
    del state["classes"]
    torch.save(state, unnamed)
    # Weights saved by a model of other parameter shapes than the one its config builds today.
    reshaped = tmp_path / "reshaped.pt"
    state["fingerprint"] = {**state["fingerprint"], "state_dict_sha256": "0" * 64}
    torch.save(state, reshaped)
    foreign_data = ["dataset.name=imagefolder", f"dataset.root={three_classes}", "dataset.num_classes=3",
                    "dataset.batch_size=2", f"output={tmp_path / 'eval.json'}"]
    cases = {
        "does not exist": [f"checkpoint={tmp_path / 'missing.pt'}"],
        "holds no training configuration": [f"checkpoint={no_config}"],
        "val has class folders that the training classes lack (a, b, c)": [f"checkpoint={checkpoint}", *foreign_data],
        "has 3 classes but the checkpoint's model predicts 10": [f"checkpoint={unnamed}", *foreign_data],
        "its parameter names or shapes differ from this run's resnet18": [f"checkpoint={reshaped}"],
    }
    for expected, overrides in cases.items():
        result = run_python("eval.py", *overrides, env=sweep_env(sweep_base))
        assert result.returncode == 1, (expected, result.stderr[-2000:])
        assert result.stderr.strip().count("\n") == 0 and expected in result.stderr, result.stderr
    assert not (tmp_path / "eval.json").exists()


def eval_options(*overrides: str):
    """configs/eval.yaml composed with its schema and command-line style overrides, as eval.py gets it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


# A value of the wrong type: the schema refuses it, and emca/cli.py (eval.py's first step) says so in
# one line before anything runs; a number given for a boolean is refused, not read as true.
WRONG_TYPES = [
    ("rotations=90", "rotations=90 must be a list of multiples of 90 degrees, e.g. [0,90,180,270]"),
    ("rotations=[0,a]", "rotations=[0, 'a'] must be a list of multiples of 90 degrees, e.g. [0,90,180,270]"),
    ("learned_scales=3", "learned_scales=3 must be true or false"),
    ("accuracy_only=maybe", "accuracy_only='maybe' must be true or false"),
    ("ema=1", "ema=1 must be true or false"),
    ("speed.enabled=maybe", "speed.enabled='maybe' must be true or false"),
    ("channels_last=1", "channels_last=1 must be true, false or null"),
    ("speed.batch=2.5", "speed.batch=2.5 must be an integer >= 1"),
    ("speed.single_images=all", "speed.single_images='all' must be an integer >= 1 or null"),
    (
        "gradcam.indices=[a]",
        "gradcam.indices=['a'] must be null or a list of validation image positions >= 0, e.g. [0,120,300]",
    ),
    (
        "gradcam.classes=cat",
        "gradcam.classes='cat' must be null or a list of class folder names, e.g. [n01440764,n02102040]",
    ),
]
# A value of the right type that is still impossible: check_options refuses it before any work.
IMPOSSIBLE_VALUES = [
    ("rotations=[0,45]", "rotations=[0, 45] must be a list of multiples of 90 degrees, e.g. [0,90,180,270]"),
    (
        "gradcam.images=3",  # with accuracy_only=true, below
        "accuracy_only=true measures accuracy alone, without Grad-CAM maps: drop gradcam.images=3 or "
        "accuracy_only=true",
    ),
    ("speed.single_workers=-1", "speed.single_workers=-1 must be an integer >= 0"),
    ("speed.single_images=0", "speed.single_images=0 must be an integer >= 1 or null"),
    ("speed.batch=0", "speed.batch=0 must be an integer >= 1"),
    ("speed.workers=-1", "speed.workers=-1 must be an integer >= 0 or null"),
    ("speed.model_iterations=0", "speed.model_iterations=0 must be an integer >= 1"),
    ("speed.warmup=-1", "speed.warmup=-1 must be an integer >= 0"),
    ("speed.model_warmup=-1", "speed.model_warmup=-1 must be an integer >= 0"),
    ("gradcam.images=-1", "gradcam.images=-1 must be an integer >= 0"),
    (
        "gradcam.indices=[1,-2]",
        "gradcam.indices=[1, -2] must be null or a list of validation image positions >= 0, e.g. [0,120,300]",
    ),
    (
        "gradcam.indices=[]",
        "gradcam.indices=[] must be null or a list of validation image positions >= 0, e.g. [0,120,300]",
    ),
    (
        "gradcam.classes=[]",
        "gradcam.classes=[] must be null or a list of class folder names, e.g. [n01440764,n02102040]",
    ),
    ("gradcam.layer=''", "gradcam.layer='' must be auto or a module name, e.g. layer3.1"),
]


@pytest.mark.parametrize("override, message", WRONG_TYPES)
def test_each_eval_option_of_a_wrong_type_is_one_line_naming_it(override, message):
    from emca.cli import OverrideError, check_overrides

    check_overrides(REPO / "configs", "eval", ["checkpoint=x.pt"], "eval.py")  # the defaults pass
    check_overrides(REPO / "configs", "eval", ["checkpoint=x.pt", "ema=true", "channels_last=null",
                                               "gradcam.classes=[3,cat]", "rotations=[0]"], "eval.py")
    with pytest.raises(OverrideError) as error:
        check_overrides(REPO / "configs", "eval", ["checkpoint=x.pt", override], "eval.py")
    assert str(error.value) == message


@pytest.mark.parametrize("override, message", IMPOSSIBLE_VALUES)
def test_each_impossible_eval_option_is_one_line_naming_it(override, message):
    from emca.analysis.checkpoint_eval import EvalError, check_options

    check_options(eval_options("checkpoint=x.pt"))  # the defaults pass
    check_options(eval_options("checkpoint=x.pt", "accuracy_only=true"))
    with_accuracy_only = ("accuracy_only=true",) if override == "gradcam.images=3" else ()
    with pytest.raises(EvalError) as error:
        check_options(eval_options("checkpoint=x.pt", *with_accuracy_only, override))
    assert str(error.value) == message


def test_eval_py_refuses_either_kind_in_one_line_before_any_work():
    for override, message in (WRONG_TYPES[2], IMPOSSIBLE_VALUES[4]):  # learned_scales=3, speed.batch=0
        result = run_python("eval.py", "checkpoint=x.pt", override)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", f"error: {message}\n")


def test_grad_cam_images_are_chosen_one_way():
    from emca.analysis.checkpoint_eval import EvalError, check_options

    check_options(eval_options("checkpoint=x.pt", "gradcam.classes=[3,cat]"))
    with pytest.raises(EvalError) as error:
        check_options(eval_options("checkpoint=x.pt", "gradcam.images=2", "gradcam.indices=[4]"))
    assert str(error.value) == "gradcam.images and gradcam.indices both choose the Grad-CAM images; give one of them"


def test_eval_py_names_a_folder_a_damaged_checkpoint_and_a_folder_output(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    torch.save({"fingerprint": {}}, checkpoints / "best.pt")
    cases = {
        f"checkpoint={tmp_path / 'run'} is a folder, not a checkpoint file; give the file, e.g. "
        f"{checkpoints / 'last.pt'}": [
            f"checkpoint={tmp_path / 'run'}"
        ],
        f"checkpoint={checkpoints / 'last.pt'} cannot be read: it is damaged (truncated or not a PyTorch checkpoint); "
        f"{checkpoints / 'best.pt'} may be intact": [f"checkpoint={checkpoints / 'last.pt'}"],
        # Refused before the checkpoint is read, so before any of the work it would have thrown away.
        f"output={tmp_path} must be a file path, not a folder (e.g. {tmp_path.resolve() / 'eval.json'})": [
            f"checkpoint={checkpoints / 'last.pt'}",
            f"output={tmp_path}",
        ],
    }
    for expected, overrides in cases.items():
        result = run_python("eval.py", *overrides)
        assert result.returncode == 1 and result.stderr == f"error: {expected}\n", result.stderr[-2000:]


def test_the_evaluated_size_is_the_validation_crop():
    from emca.analysis.checkpoint_eval import evaluated_size

    # Trained at 160 and tested at 224 (recipe=rsb_a3): GFLOPs and speeds are measured at 224.
    assert evaluated_size({"image_size": 160, "val_image_size": 224}) == 224
    assert evaluated_size({"image_size": 160, "val_image_size": None}) == 160
    assert evaluated_size({"image_size": 32}) == 32  # a checkpoint from before val_image_size


def test_each_checkpoint_of_a_run_and_its_ema_weights_get_their_own_report(tmp_path):
    from emca.analysis.checkpoint_eval import output_path

    run = tmp_path / "run"
    names = {(checkpoint, ema): output_path(None, run / "checkpoints" / checkpoint, ema)
             for checkpoint in ("best.pt", "last.pt") for ema in (False, True)}
    assert names == {("best.pt", False): run / "eval.json", ("best.pt", True): run / "eval_ema.json",
                     ("last.pt", False): run / "eval_last.json", ("last.pt", True): run / "eval_last_ema.json"}
    assert output_path(None, tmp_path / "best.pt") == tmp_path / "eval.json"  # beside a checkpoint elsewhere
    # A history entry's report goes to the run folder too, out of the generations the trainer replaces.
    assert output_path(None, run / "checkpoints" / "history" / "epoch-0003.pt") == run / "eval_epoch-0003.json"
    assert output_path(None, tmp_path / "r50.pt", ema=True) == tmp_path / "eval_r50_ema.json"
    assert output_path(str(tmp_path / "mine.json"), run / "checkpoints" / "last.pt") == tmp_path / "mine.json"


def test_speed_workers_default_to_the_cpus_this_process_may_use():
    from emca.analysis.checkpoint_eval import check_options, speed_workers

    assert speed_workers(None) == min(8, len(os.sched_getaffinity(0)))
    assert speed_workers(0) == 0 and speed_workers(12) == 12
    check_options(eval_options("checkpoint=x.pt", "speed.workers=null"))
    check_options(eval_options("checkpoint=x.pt", "speed.workers=3"))


def test_eval_help_lists_its_own_options_and_no_training_group():
    result = run_python("eval.py", "loader=torchvision", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    loaders = sorted(path.stem for path in (REPO / "configs" / "loader").glob("*.yaml"))
    assert f"loader={'|'.join(loaders)}" in result.stdout
    assert "checkpoint: null" in result.stdout and "rotations:" in result.stdout
    assert "name: torchvision" in result.stdout  # the loader override still composes
    for group in ("backbone", "attention", "coverage", "optimizer", "recipe", "experiment", "trainer"):
        assert group not in result.stdout, group
