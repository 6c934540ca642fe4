"""CPU threads per process, and a launch that started fewer processes than it was asked for.

torch's default on CPUs is a thread per physical core in every process: several processes, or one on a
machine other work shares, then fight over the cores (one thread per process measured 4x faster than the
default on a loaded 2-core machine). A CPU run whose OMP_NUM_THREADS is unset takes the cores it may run
on divided by the processes of the run (what `accelerate launch` sets OMP_NUM_THREADS to on CPUs); a set
OMP_NUM_THREADS (torch reads it at start) is respected. Only the command-line tools choose (`choose_threads`):
a program that calls the library keeps the threads it set. Either way the run's first lines say what it uses.

`accelerate launch --cpu --num_processes N` starts one process (its simple launcher: --cpu runs no
multi-process launcher); the process can tell only from the environment that launcher leaves, MASTER_ADDR
set for N > 1 processes but no WORLD_SIZE (torchrun and accelerate's multi-process launchers set it).
"""

from __future__ import annotations

import os

__all__ = ["choose_threads", "cpu_threads", "launch_warning"]

_choosing = False  # set by the command-line tools only (see the module docstring)


def choose_threads() -> None:
    """Let `cpu_threads` set torch's threads for this process's runs: what a command-line tool does."""
    global _choosing
    _choosing = True


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_threads(num_processes: int, device_type: str) -> str | None:
    """Set torch's threads for a CPU run (see the module docstring); the line that says so, None on a GPU."""
    if device_type != "cpu":
        return None
    import torch

    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given:
        return f"cpu threads: {torch.get_num_threads()} per process (OMP_NUM_THREADS={given})"
    if not _choosing:
        return f"cpu threads: {torch.get_num_threads()} per process (as this program set them)"
    threads = max(1, usable_cores() // max(num_processes, 1))
    torch.set_num_threads(threads)
    return f"cpu threads: {threads} per process (set OMP_NUM_THREADS to change)"


def launch_warning(num_processes: int) -> str | None:
    """A line when the launcher was asked for more processes than this run has (see the module docstring)."""
    env = os.environ
    world = env.get("WORLD_SIZE", "").strip()
    if world.isdigit() and int(world) != num_processes:
        return f"warning: WORLD_SIZE is {world}, but this run has {num_processes} process(es)"
    use_cpu = env.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
    if num_processes == 1 and use_cpu and "MASTER_ADDR" in env and not world:
        return (
            "warning: accelerate launch was asked for several processes but started only this one (with --cpu it "
            "runs one process); for several CPU processes use torchrun --standalone --nproc_per_node N"
        )
    return None
