"""CUDA and NCCL paths checked on a CPU: each rank saves and restores its own generators (a checkpoint
of a node with 4 devices resumes on a node with 1, old checkpoints still load, another number of
processes is stated), running out of device memory is one line that is never a data problem (DALI's
errors included), and a collective that times out or loses a rank (gloo for real, NCCL's errors as
torch 2.14 raises them) reaches the one-line handler, with NCCL's async error handling set so that it can."""

import datetime
import json
import os
import random
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from emca.data.sampling import derive_seed
from emca.engine import distributed
from emca.engine.distributed import DistributedContext, is_collective_failure, setup_distributed
from emca.engine.reproducibility import checkpoint_rng, rng_state, set_rng_state
from emca.engine.step import OptimizerStep
from emca.engine.trainer import RunAborted, _collective_failures, train

from conftest import SYNTHETIC_RUN

CPU = torch.device("cpu")


def context(rank: int, world_size: int, device: torch.device) -> DistributedContext:
    return DistributedContext(rank=rank, local_rank=rank, world_size=world_size, device=device)


def round_trip(state: dict, path: Path) -> dict:
    """As a checkpoint carries it: torch.save, then torch.load(weights_only=True)."""
    torch.save({"rng": state}, path)
    return torch.load(path, weights_only=True)["rng"]


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


class FakeCuda:
    """The CUDA generators of a node with `count` visible devices, one state per device, as torch.cuda's
    get_rng_state / set_rng_state see them (an index past the devices fails as torch's does: IndexError
    from torch.cuda.default_generators)."""

    def __init__(self, monkeypatch, count: int):
        self.count, self.states = count, {index: self.state(index) for index in range(count)}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)

    @staticmethod
    def state(tag: int) -> torch.Tensor:
        return torch.full((16,), tag, dtype=torch.uint8)  # a Philox state is 16 bytes: seed and offset

    def index(self, device) -> int:
        index = torch.device(device).index
        if index >= self.count:
            raise IndexError("list index out of range")
        return index

    def get(self, device="cuda") -> torch.Tensor:
        return self.states[self.index(device)].clone()

    def set(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self.index(device)] = state.clone()

    def reboot(self, count: int) -> None:
        """Another node: `count` devices whose generators hold something else."""
        self.count, self.states = count, {index: self.state(200 + index) for index in range(count)}


# --- random state: each rank its own ------------------------------------------------------------

def test_a_checkpoint_written_on_a_node_with_4_devices_resumes_on_a_node_with_1(monkeypatch, tmp_path):
    cuda = FakeCuda(monkeypatch, count=4)
    torch.manual_seed(5)
    state = rng_state(torch.device("cuda", 0))  # a single process on cuda:0 of a 4-device node
    assert torch.equal(state["cuda"], FakeCuda.state(0))  # its own device's generator, not all four
    saved = round_trip({"ranks": [state]}, tmp_path / "rng.pt")
    expected = draws()
    cuda.reboot(count=1)
    torch.manual_seed(9)
    assert set_rng_state(saved, context(0, 1, torch.device("cuda", 0))) is None  # the same world size: no note
    assert torch.equal(cuda.states[0], FakeCuda.state(0))
    assert draws() == expected


def test_an_old_checkpoint_with_every_devices_state_still_resumes_on_fewer_devices(monkeypatch, tmp_path):
    # v0.2's format: rank 0's generators for every rank, "cuda" one state per device rank 0 saw.
    cuda = FakeCuda(monkeypatch, count=4)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    old = rng_state()
    old["cuda"] = [FakeCuda.state(index) for index in range(4)]
    saved = round_trip(old, tmp_path / "old.pt")
    expected = draws()
    for count, rank in ((1, 0), (2, 1)):  # a node with 1 device; rank 1 of a node with 2
        cuda.reboot(count)
        random.seed(9), np.random.seed(9), torch.manual_seed(9)
        assert set_rng_state(saved, context(rank, count, torch.device("cuda", rank))) is None
        assert draws() == expected
        assert torch.equal(cuda.states[rank], FakeCuda.state(rank))  # its device's entry, as before
        assert all(torch.equal(cuda.states[other], FakeCuda.state(200 + other)) for other in range(count)
                   if other != rank)
    # Saved on CPU ([]), continued on CUDA: the device keeps trainer.seed's generator.
    cuda.reboot(1)
    set_rng_state({**saved, "cuda": []}, context(0, 1, torch.device("cuda", 0)))
    assert torch.equal(cuda.states[0], FakeCuda.state(200))


def rank_states(world_size: int) -> list[dict]:
    """Distinct generators per rank, as the ranks of a run hold them."""
    states = []
    for rank in range(world_size):
        random.seed(rank), np.random.seed(rank), torch.manual_seed(rank)
        states.append(rng_state())
    return states


def test_fewer_processes_restore_their_own_states_and_the_log_says_what_is_kept(tmp_path):
    saved = round_trip({"ranks": rank_states(4)}, tmp_path / "rng.pt")
    for rank in (0, 1):
        random.seed(rank), np.random.seed(rank), torch.manual_seed(rank)
        expected = draws()
        note = set_rng_state(saved, context(rank, 2, CPU), seed=7, step=120)
        assert draws() == expected  # its own generators, not rank 0's
    assert note.startswith("the checkpoint was saved by 4 processes, this run has 2: the global batch "
                           "(dataset.batch_size) and the schedule are the run's")
    assert "not bit-identical" in note and note.endswith("the recorded random states of ranks 2-3 go unused")
    assert "\n" not in note


def test_more_processes_seed_the_new_ranks_from_seed_rank_and_step(tmp_path):
    saved = round_trip({"ranks": rank_states(2)}, tmp_path / "rng.pt")
    outcomes = []
    for _ in range(2):
        torch.manual_seed(99)
        note = set_rng_state(saved, context(3, 4, CPU), seed=7, step=120)
        outcomes.append(draws())
    assert outcomes[0] == outcomes[1]  # deterministic
    own = derive_seed(7, 3, 120)
    random.seed(own), np.random.seed(own), torch.manual_seed(own)
    assert outcomes[0] == draws()
    assert note.endswith("ranks 2-3, which it does not record, seed their random generators from "
                         "(trainer.seed, rank, step 120)")


def rng_worker(rank: int, port: int, out: str) -> None:
    """One of 2 ranks (gloo) with CUDA devices faked: checkpoint_rng gathers every rank's own state."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    states = {rank: FakeCuda.state(10 + rank)}
    torch.cuda.get_rng_state = lambda device="cuda": states[torch.device(device).index].clone()
    torch.cuda.set_rng_state = lambda state, device="cuda": states.__setitem__(torch.device(device).index, state)
    ctx = setup_distributed("cpu", timeout_s=60)
    ctx = DistributedContext(rank=rank, local_rank=rank, world_size=2, device=torch.device("cuda", rank))
    random.seed(rank), np.random.seed(rank), torch.manual_seed(rank)
    saved = checkpoint_rng(ctx, rng_state(ctx.device))
    expected = draws()
    if rank == 0:
        torch.save({"rng": saved}, Path(out) / "rng.pt")
    dist.barrier()
    loaded = torch.load(Path(out) / "rng.pt", weights_only=True)["rng"]
    random.seed(50), np.random.seed(50), torch.manual_seed(50)
    states[rank] = FakeCuda.state(99)
    note = set_rng_state(loaded, ctx)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "ranks": len(loaded["ranks"]), "same_draws": draws() == expected, "note": note,
        "cuda": states[rank].tolist()}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_each_rank_saves_and_restores_its_own_generators(tmp_path):
    mp.spawn(rng_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome == {"ranks": 2, "same_draws": True, "note": None, "cuda": [10 + rank] * 16}, rank


# --- out of memory ------------------------------------------------------------------------------

OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
       "1.12 GiB is free. Including non-PyTorch memory, this process has 78.06 GiB memory in use.")


def fail_at(monkeypatch, call: int, error: BaseException) -> None:
    """The `call`-th optimizer step (counted from 1) raises `error`."""
    step, calls = OptimizerStep.__call__, iter(range(1, 10**6))

    def failing(self, *args, **kwargs):
        if next(calls) == call:
            raise error
        return step(self, *args, **kwargs)

    monkeypatch.setattr(OptimizerStep, "__call__", failing)


def test_out_of_memory_mid_run_is_one_line_and_its_advice_continues_the_run(compose_train, tmp_path, monkeypatch):
    run_dir, options = tmp_path / "run", (*SYNTHETIC_RUN, "trainer.epochs=2")
    fail_at(monkeypatch, 5, torch.OutOfMemoryError(OOM))  # epoch 2's second step: epoch 1 is saved
    with pytest.raises(RunAborted) as aborted:
        train(compose_train(*options), str(run_dir))
    message = str(aborted.value)
    assert "\n" not in message
    assert message.startswith("out of memory on cpu at epoch 2 step 2 (tried to allocate 2.00 gib) with 32 images "
                              "per process (dataset.batch_size=32 over 1 process(es)); to fit: a lower "
                              "dataset.batch_size, or trainer.accumulate=2 (the same global batch in micro-batches "
                              "of 16), or trainer.amp=bf16; ")
    last = run_dir / "checkpoints" / "last.pt"
    assert message.endswith(f"{last} is kept: continue it as it was with hydra.run.dir={run_dir} trainer.resume=auto "
                            f"where the device has more memory free, or start a new run from its weights with "
                            f"model.init_from={last} and one of them")
    assert len(torch.load(last, weights_only=True)["rng"]["ranks"]) == 1  # every rank's own generators
    monkeypatch.undo()
    assert train(compose_train(*options, "trainer.resume=auto"), str(run_dir))["epoch_reached"] == 2


def test_out_of_memory_before_any_checkpoint_says_so_and_a_rerun_with_a_fix_trains(compose_train, tmp_path,
                                                                                    monkeypatch):
    run_dir = tmp_path / "run"
    fail_at(monkeypatch, 2, torch.OutOfMemoryError(OOM))
    with pytest.raises(RunAborted, match=rf"; nothing was saved yet: rerun with hydra.run.dir={run_dir} "
                                         r"trainer.resume=auto and one of them$"):
        train(compose_train(*SYNTHETIC_RUN, "trainer.epochs=1"), str(run_dir))
    monkeypatch.undo()
    results = train(compose_train(*SYNTHETIC_RUN, "trainer.epochs=1", "trainer.resume=auto", "trainer.accumulate=2"),
                    str(run_dir))
    assert results["epoch_reached"] == 1 and results["config"]["trainer"]["accumulate"] == 2


def test_out_of_memory_names_the_device_its_memory_and_the_rank(monkeypatch, tmp_path):
    from emca.engine.device_errors import out_of_memory

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=79.1 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 75.1 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 77.94 * 2**30)
    trainer = SimpleNamespace(
        ctx=context(3, 4, torch.device("cuda", 3)),
        cfg=SimpleNamespace(dataset=SimpleNamespace(batch_size=1024),
                            trainer=SimpleNamespace(accumulate=1, amp=SimpleNamespace(value="bf16"))),
        progress=SimpleNamespace(epoch=4, step_in_epoch=10), steps_per_epoch=10,
        store=SimpleNamespace(last=tmp_path / "checkpoints" / "last.pt"), run_dir=tmp_path)
    message = out_of_memory(torch.OutOfMemoryError("DALI: Can't allocate 123456 bytes on device 3."), trainer)
    assert message.startswith(
        "rank 3: out of memory on cuda:3 (NVIDIA H100 80GB HBM3: PyTorch holds 75.1 GiB allocated, 77.9 GiB reserved "
        "of 79.1 GiB) in epoch 5's validation (DALI: Can't allocate 123456 bytes on device 3.) with 256 images per "
        "process (dataset.batch_size=1024 over 4 process(es)); to fit: a lower dataset.batch_size, or "
        "trainer.accumulate=2 (the same global batch in micro-batches of 128); nothing was saved yet")


# DALI's operator failures as its executor hands them over (PropagateError: a std::runtime_error of the
# operator's context, then the original what()).
DALI_CONTEXT = ("Error in MIXED operator `nvidia.dali.fn.decoders.image`,\nwhich was used in the pipeline definition "
                "with the following traceback:\n\n  File \"emca/data/dali_loader.py\", line 170, in train_pipeline\n"
                "    images = fn.decoders.image(encoded, device=\"mixed\")\n\nencountered:\n\n")


@pytest.fixture
def dali_loader(image_tree, emca_cache):
    from omegaconf import OmegaConf

    from emca.data import DatasetConfig, LoaderConfig, build_loaders

    root = image_tree({"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}})
    dataset = DatasetConfig(name="imagefolder", root=str(root), image_size=32, val_resize=32, batch_size=2, workers=1)
    bundle = build_loaders(OmegaConf.structured(dataset), OmegaConf.structured(LoaderConfig(name="dali")))
    bundle.val.set_epoch(0)
    return bundle.val


def failing_pipeline(monkeypatch, error: BaseException) -> None:
    from emca.data import dali_loader

    def iterator(*args, **kwargs):
        raise error

    monkeypatch.setattr(dali_loader, "DALIGenericIterator", iterator)
    monkeypatch.setattr(dali_loader.DaliLoader, "_pipeline", lambda self: None)


@pytest.mark.parametrize("what", ["Can't allocate 1073741824 bytes on device 0.", "CUDA allocation failed"])
def test_dalis_out_of_device_memory_is_an_out_of_memory_error(dali_loader, monkeypatch, what):
    failing_pipeline(monkeypatch, RuntimeError(DALI_CONTEXT + what + "\nCurrent pipeline object is no longer valid."))
    with pytest.raises(torch.OutOfMemoryError, match=f"^DALI: {what}$"):
        list(dali_loader)


@pytest.mark.parametrize("error", [
    RuntimeError(DALI_CONTEXT + "CUDA runtime API error cudaErrorIllegalAddress (700):\nan illegal memory access was "
                                "encountered"),
    RuntimeError(DALI_CONTEXT + "CUDA driver API error CUDA_ERROR_LAUNCH_FAILED (719):\nunspecified launch failure"),
    torch.OutOfMemoryError(OOM),  # copying a batch to the device
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
])
def test_cuda_errors_pass_the_dali_loader_as_they_are(dali_loader, monkeypatch, error):
    failing_pipeline(monkeypatch, error)
    with pytest.raises(type(error)) as raised:
        list(dali_loader)
    assert raised.value is error  # not re-read as an image problem


def test_an_image_dali_cannot_decode_is_still_named(dali_loader, monkeypatch):
    from emca.data import DatasetError

    failing_pipeline(monkeypatch, RuntimeError(DALI_CONTEXT + "Failed to decode sample #1 : nvimgcodec status 2"))
    with pytest.raises(DatasetError, match="^DALI pipeline failed and no undecodable file was found near batch 0"):
        list(dali_loader)


def test_a_real_dali_decode_failure_is_not_taken_for_a_device_error(dali_loader):
    from emca.data import DatasetError

    images = [Path(path) for path in dali_loader.source.images.paths]
    bad = images[0]
    data = images[1].read_bytes()
    bad.write_bytes(data[:200] + bytes(np.random.default_rng(0).integers(0, 255, 2000, dtype=np.uint8)) + b"\xff\xd9")
    with pytest.raises(DatasetError, match=bad.name):
        list(dali_loader)


# --- collectives ---------------------------------------------------------------------------------

NCCL_TIMEOUT = ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=212, OpType=ALLREDUCE, "
                "NumelIn=25557032, NumelOut=25557032, Timeout(ms)=5000) ran for 5004 milliseconds before timing out.")


@pytest.mark.parametrize("error", [
    dist.DistBackendError(NCCL_TIMEOUT),
    dist.DistBackendError("NCCL communicator was aborted on rank 1. "),
    dist.DistBackendError("NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3690, remote "
                          "process exited or there was a network error, NCCL version 2.27.7\nncclRemoteError: A call "
                          "failed possibly due to a network error or a remote process exiting prematurely."),
    RuntimeError(NCCL_TIMEOUT),  # the same texts where a wrapper loses the type
    RuntimeError("NCCL communicator was aborted after a previous error"),  # the torchcomms backend (nccl2)
    RuntimeError("NCCL operation timed out"),
])
def test_nccls_timeouts_and_lost_ranks_are_collective_failures(error):
    assert is_collective_failure(error)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError(OOM), RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
    RuntimeError("Distributed package doesn't have NCCL built in"),
])
def test_other_errors_are_not_collective_failures(error):
    assert not is_collective_failure(error)


def test_an_nccl_timeout_in_the_training_thread_is_the_one_line(tmp_path):
    cfg = SimpleNamespace(trainer=SimpleNamespace(dist_timeout_s=5.0))
    with pytest.raises(RunAborted) as aborted:
        with _collective_failures(context(1, 2, CPU), cfg, tmp_path):
            raise dist.DistBackendError(NCCL_TIMEOUT)
    message = str(aborted.value)
    assert message == (f"rank 1: a collective failed ({NCCL_TIMEOUT[:200]}); another rank stopped, hung or died "
                       f"(waited up to trainer.dist_timeout_s=5.0); continue with hydra.run.dir={tmp_path} "
                       "trainer.resume=auto")


def test_nccl_gets_the_timeout_and_the_error_handling_that_reaches_the_handler(monkeypatch):
    """The process group NCCL would build: trainer.dist_timeout_s as its timeout, and async error
    handling 2 (CleanUpOnly) set before it is built, over torchrun's 1 (TearDown)."""
    built = {}

    def init_process_group(**options):
        built.update(options, handling=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))

    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # what torchrun gives its workers
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed.atexit, "register", lambda function: None)
    monkeypatch.setattr(distributed, "_host_group", lambda timeout_s: "gloo group")
    ctx = setup_distributed("cuda", timeout_s=90)
    assert built == {"backend": "nccl", "device_id": torch.device("cuda", 1),
                     "timeout": datetime.timedelta(seconds=90), "handling": "2"}
    assert (ctx.rank, ctx.world_size, ctx.device, ctx.host_group) == (1, 2, torch.device("cuda", 1), "gloo group")


def silent_rank_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 waits in a collective that rank 1, alive, never joins: the timeout becomes the one line."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    ctx = setup_distributed("cpu", timeout_s=2)
    done = Path(out) / "rank0.txt"
    if rank == 1:
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    cfg = SimpleNamespace(trainer=SimpleNamespace(dist_timeout_s=2))
    began = time.monotonic()
    try:
        with _collective_failures(ctx, cfg, Path(out)):
            ctx.all_reduce_sum(torch.ones(1))
        outcome = "no failure"
    except RunAborted as error:
        outcome = str(error)
    done.write_text(f"{time.monotonic() - began:.1f}\n{outcome}")


def test_a_silent_rank_fails_the_other_in_one_line_after_the_timeout_over_gloo(tmp_path):
    mp.spawn(silent_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    waited, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert outcome.startswith("rank 0: a collective failed (") and "\n" not in outcome
    assert outcome.endswith(f"(waited up to trainer.dist_timeout_s=2); continue with hydra.run.dir={tmp_path} "
                            "trainer.resume=auto")
    assert 1.5 < float(waited) < 60  # the timeout, not a hang
