"""A one-machine stand-in for the SLURM commands submitit calls: sbatch, srun, scontrol, sacct.

tests/test_slurm.py puts wrappers named after those commands on PATH, so that Hydra's submitit
launcher submits, runs and requeues a real job on localhost:

sbatch FILE          keeps a copy of FILE, answers "Submitted batch job <id>" and runs FILE with bash
                     in the background, with the job's SLURM_* variables; after a run that asked for
                     a requeue it runs FILE again, as SLURM requeues a job.
srun ... CMD         starts nodes x ntasks-per-node copies of CMD with their SLURM_PROCID /
                     SLURM_LOCALID / SLURM_NODEID, records their pids (the test signals them) and
                     waits for them.
scontrol requeue ID  marks the job for a rerun.
sacct ...            the job's state: RUNNING until the last run ends, then COMPLETED or FAILED.

Everything is recorded under $FAKE_SLURM_DIR. Only what submitit uses for one job is emulated (no
arrays: submitit submits a single job as a plain one).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

JOB_ID = "4242"


def state_dir() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M))


def sbatch(script_path: str) -> None:
    script = Path(script_path).read_text()
    (state_dir() / "sbatch.sh").write_text(script)
    options = sbatch_options(script)
    nodes = int(options.get("nodes") or 1)
    tasks_per_node = int(options.get("ntasks-per-node") or 1)
    if "array" in options:
        raise SystemExit("fake_slurm: job arrays are not emulated (submitit sends a single job as a plain job)")
    env = dict(
        os.environ,
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NTASKS=str(nodes * tasks_per_node),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        SLURM_JOB_NODELIST=",".join(["localhost"] * nodes),
    )
    (state_dir() / "state").write_text("RUNNING")
    log = open(state_dir() / "job.log", "ab")
    subprocess.Popen(
        [sys.executable, __file__, "_run", script_path], env=env, stdout=log, stderr=log, start_new_session=True
    )
    print(f"Submitted batch job {JOB_ID}")


def run_job(script_path: str) -> None:
    """The job's life: run the batch script, and again after each requeue."""
    runs = 0
    while True:
        runs += 1
        (state_dir() / "runs").write_text(str(runs))
        returncode = subprocess.call(["bash", script_path])
        requeue = state_dir() / "requeue"
        if not requeue.exists():
            break
        requeue.unlink()
    (state_dir() / "state").write_text("COMPLETED" if returncode == 0 else "FAILED")


def srun(args: list[str]) -> int:
    outputs = {}
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            outputs[flag] = args.pop(0)
    job_id = os.environ["SLURM_JOB_ID"]
    tasks_per_node = int(os.environ["SLURM_NTASKS_PER_NODE"])
    processes = []
    for rank in range(int(os.environ["SLURM_NTASKS"])):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % tasks_per_node),
                   SLURM_NODEID=str(rank // tasks_per_node))

        def path(pattern: str, rank: int = rank) -> str:
            return pattern.replace("%j", job_id).replace("%t", str(rank))

        stdout = open(path(outputs["--output"]), "ab")
        stderr = open(path(outputs["--error"]), "ab") if "--error" in outputs else stdout
        processes.append(subprocess.Popen(args, env=env, stdout=stdout, stderr=stderr))
    runs = (state_dir() / "runs").read_text()
    (state_dir() / f"pids.{runs}").write_text(" ".join(str(p.pid) for p in processes))
    return max(p.wait() for p in processes)


def scontrol(args: list[str]) -> None:
    assert args[0] == "requeue", args
    (state_dir() / "requeue").write_text(args[1])
    with open(state_dir() / "requeued", "a") as record:
        record.write(args[1] + "\n")


def sacct() -> None:
    state = (state_dir() / "state").read_text() if (state_dir() / "state").exists() else "PENDING"
    print("JobID|State|NodeList")
    print(f"{JOB_ID}|{state}|localhost")


if __name__ == "__main__":
    command, arguments = sys.argv[1], sys.argv[2:]
    if command == "sbatch":
        sbatch(arguments[-1])
    elif command == "_run":
        run_job(arguments[0])
    elif command == "srun":
        sys.exit(srun(arguments))
    elif command == "scontrol":
        scontrol(arguments)
    elif command == "sacct":
        sacct()
    else:
        sys.exit(f"fake_slurm: unknown command {command}")
