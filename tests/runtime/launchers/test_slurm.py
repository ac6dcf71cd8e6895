"""`--on slurm`: the sbatch script is valid bash, asks for the plan's shape, and forms the world under a stub srun."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from tests.runtime.launchers.helpers import check_world, probe_command, rank_results
from trainplan.ir.loading import load
from trainplan.ir.plan import Plan
from trainplan.runtime.launchers import DeviceCountError, LaunchError, launch, render_slurm
from trainplan.runtime.launchers.command import free_port

# Runs the command once per node of the allocation, locally, as srun runs one task per node.
STUB_SRUN = """#!/bin/bash
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do echo "$1" >> "$STUB_DIR/srun-options"; shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" > "$STUB_DIR/node-$node.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
# `scontrol show hostnames LIST`: every node of the allocation is this host.
STUB_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || { echo "stub scontrol: unsupported: $*" >&2; exit 1; }
for ((node = 0; node < SLURM_NNODES; node++)); do echo 127.0.0.1; done
"""
STUB_SBATCH = """#!/bin/bash
echo "$@" > "$STUB_DIR/sbatch-args"
echo "4242;cluster"
"""


def stub_bin(folder: Path, **scripts: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        path = folder / name
        path.write_text(text)
        path.chmod(0o755)
    return folder


def directives(script: str) -> dict[str, str]:
    return dict(line[len("#SBATCH --"):].split("=", 1) for line in script.splitlines() if line.startswith("#SBATCH"))


def srun_torchrun_args(script: str) -> list[str]:
    """The torchrun arguments of the script's srun line (after `python -m torch.distributed.run`)."""
    command = script[script.index("\nsrun "):].replace("\\\n", " ")
    words = shlex.split(command, posix=True)
    return words[words.index("torch.distributed.run") + 1:]


def test_gloo_plan_asks_for_cpus_and_gpu_plan_for_gpus(plan_files, tmp_path):
    cpu = render_slurm(load(Plan, plan_files["cpu_2x2"]), plan_files["cpu_2x2"], out_dir=tmp_path, time="00:20:00",
                       partition="debug", account="proj42")
    assert directives(cpu) == {"job-name": "trainplan-tiny-mlp", "nodes": "2", "ntasks-per-node": "1",
                               "cpus-per-task": "2", "time": "00:20:00", "output": f"{tmp_path}/slurm-%j.out",
                               "partition": "debug", "account": "proj42"}
    gpu = render_slurm(load(Plan, plan_files["gpu_2x8"]), plan_files["gpu_2x8"], out_dir=tmp_path, max_restarts=3)
    sbatch = directives(gpu)
    assert sbatch["gpus-per-node"] == "8" and "cpus-per-task" not in sbatch and "partition" not in sbatch
    assert sbatch["job-name"] == "trainplan-Tiny-MLP-on-A100s"
    args = get_args_parser().parse_args(srun_torchrun_args(gpu))
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("$SLURM_NNODES", "8", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id, args.max_restarts) == ("$head_node:29500", "$SLURM_JOB_ID", 3)
    assert args.no_python and args.training_script == "python"
    assert args.training_script_args == ["-m", "trainplan.runtime.worker", "--run-dir", str(tmp_path),
                                         "--plan", str(plan_files["gpu_2x8"]), "--out", str(tmp_path)]
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in gpu


def test_script_is_valid_bash_and_forms_a_two_by_two_world_under_stub_srun(plan_files, tmp_path):
    plan_path, out = plan_files["cpu_2x2"], tmp_path / "run"
    script = render_slurm(load(Plan, plan_path), plan_path, out_dir=out, port=free_port(), python=sys.executable,
                          command=probe_command(plan_path, out))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True).returncode == 0
    stubs = stub_bin(tmp_path / "bin", srun=STUB_SRUN, scontrol=STUB_SCONTROL)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path), "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "node[01-02]"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # the script must set it itself
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=120)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("node-*.log")))
    assert done.returncode == 0, done.stderr + logs
    results = rank_results(out)
    check_world(results, nodes=2, nproc=2)
    assert {r["env"]["TORCHELASTIC_RUN_ID"] for r in results.values()} == {"777"}
    assert sorted({r["env"]["SLURM_NODEID"] for r in results.values()}) == ["0", "1"]
    assert (tmp_path / "srun-options").read_text().split() == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]


def test_script_refuses_an_allocation_of_another_size(plan_files, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_slurm(load(Plan, plan_files["cpu_2x2"]), plan_files["cpu_2x2"], out_dir=tmp_path))
    stubs = stub_bin(tmp_path / "bin", srun=STUB_SRUN, scontrol=STUB_SCONTROL)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path), "SLURM_NNODES": "3",
           "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "node[1-3]"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "the plan needs 2 nodes but the job has 3; submit it with --nodes=2" in done.stderr
    assert not list(tmp_path.glob("node-*.log"))


def test_launch_submits_with_sbatch_and_reports_the_job(plan_files, tmp_path, monkeypatch):
    stubs = stub_bin(tmp_path / "bin", sbatch=STUB_SBATCH)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_DIR", str(tmp_path))
    text, out = io.StringIO(), tmp_path / "run"
    assert launch(plan_files["cpu_2x2"], "slurm", nodes=2, out_dir=out, stdout=text) == 0
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(out / "launch.sbatch")]
    assert "submitted Slurm job 4242" in text.getvalue() and f"{out}/slurm-4242.out" in text.getvalue()
    assert directives((out / "launch.sbatch").read_text())["nodes"] == "2"


def test_dry_run_prints_the_script_and_submits_nothing(plan_files, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(stub_bin(tmp_path / "empty")))
    text = io.StringIO()
    assert launch(plan_files["gpu_2x8"], "slurm", dry_run=True, out_dir=tmp_path / "run", stdout=text) == 0
    assert text.getvalue().startswith("#!/bin/bash\n#SBATCH --job-name=")
    assert not (tmp_path / "run").exists()
    with pytest.raises(LaunchError, match="sbatch was not found on PATH"):
        launch(plan_files["gpu_2x8"], "slurm", out_dir=tmp_path / "run", stdout=text)


@pytest.mark.parametrize("option, message", [
    ({"nodes": 4}, "launch it with --nodes 2, or re-plan the spec for 4 nodes: `trainplan plan SPEC --nodes 4`"),
    ({"time": "1 hour"}, "--time '1 hour' is not a time limit"),
    ({"port": 70000}, "--port must be a TCP port"),
    ({"max_restarts": -1}, "--max-restarts must be 0 (no restarts) or more"),
])
def test_bad_requests_are_refused_with_the_fix(plan_files, tmp_path, option, message):
    with pytest.raises(LaunchError) as err:
        render_slurm(load(Plan, plan_files["gpu_2x8"]), plan_files["gpu_2x8"], out_dir=tmp_path, **option)
    assert message in str(err.value)
    assert isinstance(err.value, DeviceCountError) == ("nodes" in option)
    assert re.search(r"8 (devices|processes)", str(err.value)) or "nodes" not in option


@pytest.mark.parametrize("option, message", [
    ({"partition": "gpu\n#SBATCH --exclusive"}, "--partition 'gpu\\n#SBATCH --exclusive' cannot go on an #SBATCH line"),
    ({"account": "my account"}, "--account 'my account' cannot go on an #SBATCH line"),
    ({"out_dir": "/scratch/my runs"}, "the output folder '/scratch/my runs' cannot go on an #SBATCH line"),
])
def test_values_that_would_break_an_sbatch_line_are_refused(plan_files, tmp_path, option, message):
    options = {"out_dir": tmp_path, **option}
    with pytest.raises(LaunchError) as err:
        render_slurm(load(Plan, plan_files["cpu_2x2"]), plan_files["cpu_2x2"], **options)
    assert message in str(err.value)


def worker_checkpoint_options(rank_args: list[str]):
    """What trainplan's worker makes of the per-rank command's flags."""
    from trainplan.runtime.worker import checkpoint_options, parse_args

    assert rank_args[:2] == ["-m", "trainplan.runtime.worker"]
    return checkpoint_options(parse_args(rank_args[2:]))


def test_checkpoint_flags_reach_every_worker_and_the_folder_is_marked_shared(plan_files, tmp_path, capsys):
    from trainplan.runtime.checkpoint import CheckpointOptions
    from trainplan.runtime.launchers import launch_main

    ckpt = tmp_path / "shared" / "ckpt"
    code = launch_main([str(plan_files["gpu_2x8"]), "--on", "slurm", "--dry-run", "--out", str(tmp_path / "run"),
                        "--max-restarts", "2", "--checkpoint-every", "50", "--checkpoint-dir", str(ckpt),
                        "--keep-checkpoints", "2", "--checkpoint-async"])
    script = capsys.readouterr().out
    assert code == 0
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True).returncode == 0
    args = get_args_parser().parse_args(srun_torchrun_args(script))
    assert args.max_restarts == 2
    # A restarted or requeued job resumes: every worker gets --resume-if-present.
    assert worker_checkpoint_options(args.training_script_args) == CheckpointOptions(
        ckpt, every_steps=50, keep=2, resume_if_present=True, asynchronous=True)
    assert f"#   {ckpt}\n#   must be on a shared file system every node sees" in script
    assert not ckpt.exists()


def test_submitting_refuses_a_checkpoint_folder_of_another_run_unless_resumed(plan_files, tmp_path, monkeypatch):
    from tests.runtime.test_checkpoint import fake_checkpoint
    from trainplan.runtime.checkpoint import CheckpointError
    from trainplan.runtime.launchers.command import Checkpointing

    stubs = stub_bin(tmp_path / "bin", sbatch=STUB_SBATCH)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_DIR", str(tmp_path))
    out = tmp_path / "run"
    fake_checkpoint(out / "ckpt", load(Plan, plan_files["cpu_2x2"]), 4)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        launch(plan_files["cpu_2x2"], "slurm", out_dir=out, checkpoint=Checkpointing(every_steps=2))
    assert not (tmp_path / "sbatch-args").exists()
    text = io.StringIO()
    assert launch(plan_files["cpu_2x2"], "slurm", out_dir=out, stdout=text,
                  checkpoint=Checkpointing(every_steps=2, resume=True)) == 0
    rank_args = get_args_parser().parse_args(srun_torchrun_args((out / "launch.sbatch").read_text())).training_script_args
    options = worker_checkpoint_options(rank_args)
    assert (options.directory, options.resume, options.resume_if_present) == (out / "ckpt", True, True)
