"""Launchers: start a plan's torchrun agents on this host, on Slurm or on Kubernetes.

``trainplan launch PLAN --on local|slurm|kubernetes [--dry-run] [--nodes N]`` is
:func:`launch_main`. Every launcher runs the same job — one torchrun agent per node, a c10d
rendezvous, ``devices_per_node`` workers per agent running :func:`worker_command` — and refuses a
request whose nodes x devices differ from the plan's (:mod:`.request`).
"""

from trainplan.runtime.launchers.command import Checkpointing, worker_command
from trainplan.runtime.launchers.dispatch import KubernetesOptions, SlurmOptions, launch, launch_main
from trainplan.runtime.launchers.kubernetes import render_configmap, render_kubernetes, render_pytorchjob
from trainplan.runtime.launchers.local import launch_local
from trainplan.runtime.launchers.request import DeviceCountError, LaunchError
from trainplan.runtime.launchers.slurm import render_slurm

__all__ = [
    "Checkpointing", "DeviceCountError", "KubernetesOptions", "LaunchError", "SlurmOptions", "launch", "launch_local", "launch_main",
    "render_configmap", "render_kubernetes", "render_pytorchjob", "render_slurm", "worker_command",
]
