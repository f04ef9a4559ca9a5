"""The benchmark scripts run and print their tables (never timed here), and the model's fast paths
compute what the plain formulas compute, also under torch.compile."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from emca.layers.pooling import L2_EPS, STD_EPS, pool_descriptor
from emca.models.resnet import EMCAResNet

from conftest import REPO_ROOT, SHARED_DATA

BENCHMARKS = REPO_ROOT / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("[!_]*.py"))
# What torch printed around the tables before benchmarks/_timing.py quieted it: Kineto's trace markers
# and GPU query, c10's CPU allocator note (torch.profiler), torch.utils.cpp_extension's CUDA_HOME warning.
LIBRARY_NOISE = ("USDT:", "profiler_start", "profiler_stop", "gpuGetDeviceCount", "CPUAllocator",
                 "No CUDA runtime is found")


def noise_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(marker in line for marker in LIBRARY_NOISE)]


def run_benchmark(script: str, *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not noise_in(done.stderr), done.stderr[-3000:]
    return done.stdout


def table_header(output: str, first_column: str) -> list[str]:
    return next(line.split() for line in output.splitlines() if line.startswith(first_column))


# --------------------------------------------------------------------------- benchmark scripts
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage_alone(script):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr[-3000:]
    assert done.stderr == ""


def test_profiler_chatter_is_dropped_and_other_stderr_lines_kept(capfd):
    sys.path.insert(0, str(BENCHMARKS))
    from _timing import profiler_chatter_dropped

    with profiler_chatter_dropped():
        os.write(2, b"USDT:2026-12-02 07:44:03 1:1 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
                    b"ERROR:2026-12-02 07:44:03 1:1 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n"
                    b"RuntimeError: a real error\n"
                    b"[W1202 07:44:03.166798327 CPUAllocator.cpp:245] Memory block of unknown size was allocated "
                    b"before the profiling started, profiler results will not include the deallocation event\n"
                    b"UserWarning: a warning of the step\n")
    assert capfd.readouterr().err == "RuntimeError: a real error\nUserWarning: a warning of the step\n"


def test_model_cost_prints_times_memory_and_targets():
    output = run_benchmark("model_cost.py", "--backbones", "resnet18", "--variants", "ResNet", "ECA", "EMCA-ECA",
                           "--batch-size", "2", "--image-size", "32", "--rounds", "1", "--warmup", "0")
    assert table_header(output, "backbone") == [
        "backbone",
        "variant",
        "attention",
        "in",
        "params",
        "M",
        "ms/img",
        "spread",
        "x",
        "plain",
        "x",
        "dense",
        "peak",
        "MiB",
        "x",
        "plain",
        "x",
        "dense",
    ]
    rows = [line.split()[:2] for line in output.splitlines() if line.startswith("resnet18")]
    assert rows == [["resnet18", "ResNet"], ["resnet18", "ECA"], ["resnet18", "EMCA-ECA"]]
    assert "target   resnet18 EMCA-ECA vs ECA, below 1x: time" in output
    assert "target   resnet18 EMCA-ECA vs ECA, below 1x: memory" in output
    assert "cpu clock" in output
    assert "malloc keeps freed memory (--allocator keep); at most" in output


def test_model_cost_offers_every_attention_of_the_table():
    sys.path.insert(0, str(BENCHMARKS))
    import model_cost

    from emca.layers.create_attn import ATTENTION_KINDS, default_integration

    labels = [v.label for v in model_cost.VARIANTS]
    assert labels == ["ResNet", *(k.label for k in ATTENTION_KINDS),
                      *(f"EMCA-{k.label}" for k in ATTENTION_KINDS if k.excitation is not None)]
    assert all(v.integration == default_integration(v.attention) for v in model_cost.VARIANTS)
    assert {v.label: v.dense for v in model_cost.VARIANTS if v.dense} == {
        f"EMCA-{k.label}": k.label for k in ATTENTION_KINDS if k.excitation is not None}
    assert model_cost.parse_args([]).variants == ["ResNet", "SE", "ECA", "SRM", "EMCA-SE", "EMCA-ECA", "EMCA-SRM"]
    assert model_cost.parse_args(["--variants", *labels]).variants == labels
    with pytest.raises(SystemExit):
        model_cost.parse_args(["--variants", "NoSuchNet"])

    output = run_benchmark("model_cost.py", "--backbones", "resnet18", "--variants", "CBAM", "BAM", "EPSANet",
                           "EMCA-CBAM", "--batch-size", "2", "--image-size", "32", "--rounds", "1", "--warmup", "0")
    rows = [line.split()[:4] for line in output.splitlines() if line.startswith("resnet18")]
    assert rows == [["resnet18", "CBAM", "all", "11.779"], ["resnet18", "BAM", "stage_end,", "stages"],
                    ["resnet18", "EPSANet", "block", "10.031"],
                    ["resnet18", "EMCA-CBAM", "first,", "prev_stage_all"]]
    assert "target   resnet18 EMCA-CBAM vs CBAM, below 1x: time" in output


def test_cpu_peak_memory_counts_only_blocks_the_step_allocated():
    sys.path.insert(0, str(BENCHMARKS))
    from _timing import MIB, peak_memory

    cpu, held = torch.device("cpu"), []
    assert peak_memory(lambda: held.append(torch.ones(MIB)), cpu, resident_bytes=0) == 4 * MIB
    # Freeing a block allocated under an earlier profile must not lower this step's peak.
    assert peak_memory(lambda: (held.clear(), torch.ones(MIB // 4)), cpu, resident_bytes=100) == 100 + MIB


FAULTS_OF_REUSED_BLOCKS = """
import sys, torch
sys.path.insert(0, {benchmarks!r})
from _timing import keep_freed_memory, page_faults
torch.set_num_threads(1)  # as the benchmarks' cpu clock runs
kept = {keep} and keep_freed_memory()
for i in range(16):
    # The kept heap grows for the first few blocks: a 64-byte aligned request is a little larger than
    # the block just freed, so glibc reuses freed space only once two blocks' worth has coalesced.
    if i == 12:
        before = page_faults()
    block = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, above any mmap threshold glibc allows
    del block
print(kept, (page_faults() - before) / 4)
"""


@pytest.mark.parametrize("keep", [True, False])
def test_kept_memory_is_reused_without_page_faults(keep):
    code = FAULTS_OF_REUSED_BLOCKS.format(benchmarks=str(BENCHMARKS), keep=keep)
    kept, faults = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    if keep and kept != "True":
        pytest.skip("the C library is not glibc: mallopt is not available")
    # 64 MiB is 16,384 pages of 4 KiB: glibc maps it afresh on every allocation unless told to keep it.
    assert float(faults) < 100 if keep else float(faults) > 10_000


def test_ratio_verdict_names_results_that_noise_could_flip():
    sys.path.insert(0, str(BENCHMARKS))
    from _timing import median_interval, ratio_verdict

    # n = 21: ranks 6 and 16 (P(Binomial(21, 1/2) <= 5) = 0.013, <= 6: 0.039); n = 11: ranks 2 and 10.
    assert median_interval(range(1, 22)) == (6, 16)
    assert median_interval(range(1, 12)) == (2, 10)
    assert median_interval([3, 1, 2, 5, 4]) == (1, 5)  # too few rounds for 95 %: the whole range
    clear = [1.00, 1.01, 1.02, 1.02, 1.03, 1.03, 1.04, 1.04, 1.04, 1.09, 1.20]
    assert ratio_verdict(clear, 1.05) == "1.030x (95% CI 1.010-1.090): PASS, within noise"
    assert ratio_verdict([1.01, 1.02, 1.02, 1.03, 1.03, 1.03, 1.04, 1.04, 1.04, 1.04, 1.20], 1.05) == \
        "1.030x (95% CI 1.020-1.040): PASS"
    assert ratio_verdict([1.06] * 7, 1.05) == "1.060x (95% CI 1.060-1.060): MISS"
    assert (
        ratio_verdict([0.97, 0.99, 1.00, 1.01], 1.0, strict=True) == "0.995x (95% CI 0.970-1.010): PASS, within noise"
    )
    assert ratio_verdict([1.07], 1.05) == "1.070x (95% CI 1.070-1.070): MISS"


def test_trainer_overhead_prints_both_loops_and_the_target():
    output = run_benchmark("trainer_overhead.py", "--steps", "2", "--rounds", "1", "--warmup", "0",
                           "--batch-size", "2", "--image-size", "32")
    assert table_header(output, "loop") == ["loop", "s/epoch", "images/s", "spread", "x", "bare"]
    assert "bare PyTorch loop" in output and "EMCA-Train trainer" in output
    assert "target   trainer time vs bare loop, at most 1.05x (5% overhead): " in output
    assert "recipe   plain steps (no EMA, no accumulation)" in output


def test_trainer_overhead_with_ema_and_accumulation_reports_the_options_and_a_ratio():
    # Batch 4 in 2 micro-batches: BatchNorm needs more than one value per channel at 32 px's 1x1 end.
    output = run_benchmark("trainer_overhead.py", "--steps", "2", "--rounds", "1", "--warmup", "0",
                           "--batch-size", "4", "--image-size", "32", "--ema-decay", "0.99", "--accumulate", "2")
    recipe = "EMA decay 0.99 every 1 step(s), 2 micro-batches per step"
    assert f"recipe   {recipe}; the bare loop does the same work" in output
    trainer_row = next(line for line in output.splitlines() if line.startswith("EMCA-Train trainer"))
    assert float(trainer_row.split()[-1]) > 0
    assert re.search(rf"target   trainer time vs bare loop \({re.escape(recipe)}\), at most 1.05x \(5% overhead\): "
                     r"\d+\.\d{3}x \(95% CI \d+\.\d{3}-\d+\.\d{3}\): (PASS|MISS)", output), output


def test_loader_throughput_prints_both_loaders_and_their_ratio():
    pytest.importorskip("nvidia.dali")
    samples = SHARED_DATA / "imagenet-samples"
    if not samples.is_dir():
        pytest.skip(f"shared JPEG samples not found at {samples}")
    output = run_benchmark("loader_throughput.py", "--data", str(samples), "--threads", "1", "--batch-size", "8",
                           "--image-size", "32", "--epochs", "1", "--warmup", "0")
    assert [line.split()[0] for line in output.splitlines() if line.startswith(("dali-", "torchvision"))][:2] == [
        "dali-cpu", "torchvision"]
    assert "DALI-CPU / torchvision: " in output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without CUDA")
def test_gpu_training_refuses_in_one_line_without_cuda():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_training.py")], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no CUDA device" in done.stderr and "--dry-run" in done.stderr


def test_gpu_training_dry_run_times_every_row_and_writes_json(image_tree, tmp_path):
    """The whole script on the CPU at toy sizes: the rows, the ratio, DLE's figure beside ours, the JSON."""
    pytest.importorskip("nvidia.dali")
    data = image_tree({"train": {"a": 3, "b": 3}})
    out = tmp_path / "gpu_training.json"
    output = run_benchmark("gpu_training.py", "--dry-run", "--data", str(data), "--out", str(out))
    assert table_header(output, "row") == ["row", "images/s", "ms/step", "spread", "x", "plain", "peak", "GiB",
                                           "finite"]
    table = output.split("\n\n")[1].splitlines()[2:]  # the settings, a blank line, the table
    assert [line.rsplit(maxsplit=6)[0] for line in table] == ["plain", "emca_eca", "plain dali"]
    assert re.search(r"ratio    emca_eca / plain, time per step: \d+\.\d{3}x \(95% CI", output), output
    assert "DLE 2,470 img/s on 1x A100 80GB" in output and "another card (CPU)" in output
    assert f"dali     6 JPEGs of {data / 'train'} repeated, the CPU pipeline" in output
    summary = json.loads(out.read_text())
    assert [row["row"] for row in summary["rows"]] == ["plain", "emca_eca", "plain dali"]
    assert all(len(row["round_seconds"]) == 2 and row["finite_loss"] for row in summary["rows"])
    assert summary["rows"][0]["x_plain"] == 1.0 and summary["reference"]["images_per_s"] == 2470
    assert len(summary["ratio"]["per_round"]) == 2 and summary["git"]["commit"]


def test_gpu_training_names_a_missing_dali_folder(tmp_path):
    pytest.importorskip("nvidia.dali")
    sys.path.insert(0, str(BENCHMARKS))
    import gpu_training

    args = gpu_training.parse_args(["--dry-run", "--data", str(tmp_path / "absent")])
    assert gpu_training.dali_row(args, trainer=None, device=torch.device("cpu")) == (
        None, f"no JPEG folder at {tmp_path / 'absent'}: pass --data with class folders of JPEGs")


@pytest.mark.parametrize("card,amp,expected", [
    ("NVIDIA A100-SXM4-80GB", "fp16", "same card and recipe; DLE's own training script"),
    ("NVIDIA H100 80GB HBM3", "bf16", "not like for like: another card (NVIDIA H100 80GB HBM3), AMP bf16, and DLE's"),
    ("NVIDIA A100-SXM4-40GB", "fp16", "not like for like: another card (NVIDIA A100-SXM4-40GB), and DLE's"),
])
def test_gpu_training_says_how_its_figure_differs_from_dles(card, amp, expected, monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    import gpu_training

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: card)
    args = gpu_training.parse_args(["--amp", amp])
    line = gpu_training.reference_line(args, torch.device("cuda", 0), 2600.4)
    assert line.startswith(f"ref      plain resnet50: 2,600 img/s on {card}; DLE 2,470 img/s on 1x A100 80GB (")
    assert expected in line


# --------------------------------------------------------------------------- the model's fast paths
def reference_pooling(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """The statistics written plainly, one per channel, in the order the name gives them."""
    flat = x.flatten(2)
    if pooling == "mean":
        return flat.mean(-1, keepdim=True)
    if pooling == "mean_max":
        return torch.stack((flat.sum(-1) / flat.shape[-1], flat.max(-1).values), dim=-1)
    if pooling == "l2":
        return torch.sqrt((flat * flat).sum(-1, keepdim=True) + L2_EPS)
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
    return torch.stack((mean, torch.sqrt(var + STD_EPS)), dim=-1)


POOLINGS = ["mean", "mean_std", "mean_max", "l2"]


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 4, 1, 1)])
def test_pooling_backward_is_the_exact_gradient(pooling, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pool_descriptor(t, pooling), (x,))


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_pooling_matches_the_plain_formulas(pooling, memory_format):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 7, 7).contiguous(memory_format=memory_format).requires_grad_()
    weights = torch.randn(4, 16, 1 if pooling in ("mean", "l2") else 2)
    ours = pool_descriptor(x, pooling)
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), x)
    reference = reference_pooling(x, pooling)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), x)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-6, atol=1e-6)
    if pooling == "mean":  # the mean is the very same computation
        assert torch.equal(ours, reference) and torch.equal(ours_grad, reference_grad)


def test_mean_pooling_passes_back_a_broadcast_gradient():
    # Autograd's own MeanBackward writes a full-size map; ours hands back a stride-0 view that is
    # added in place to the map's other gradient (one full pass less per pooled map).
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    feature = x * 1.0
    seen = []
    feature.register_hook(lambda grad: seen.append(grad))
    pool_descriptor(feature, "mean").sum().backward()
    assert seen[0].stride()[2:] == (0, 0)
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 20))


@pytest.mark.parametrize("attention", ["emca_eca", "emca_srm"])  # both poolings, both EMCA code paths
def test_emca_models_compile_as_one_graph_and_train_like_eager(attention):
    # aot_eager traces forward and backward exactly as inductor would (no graph break allowed), without
    # inductor's C++ compile, which takes over a minute per model on this CPU.
    torch.manual_seed(0)
    model = EMCAResNet("resnet18", attention=attention, num_classes=10).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(images), labels).backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    F.cross_entropy(compiled(images), labels).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()
