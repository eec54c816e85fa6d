"""Spawn local ranks and make sure a failure anywhere stops everyone.

``run_ranks(fn, world_size, *args, device=choice)`` starts one process per rank, initialises the
default process group in each with the backend of ``choice`` (``folding.run.device``: gloo on the
CPU, the default; NCCL with one GPU per rank, rank r on GPU r), calls ``fn(rank, world_size,
*args)`` and returns the results in rank order. The parent watches every child: when one
raises, is killed or exits without a result, the others are terminated at once (they may be
blocked in a collective that will never complete) and ``RankFailed`` names the rank that failed
first and why.

CPU ranks start as forks of a fork server that has imported torch and Megatron-Core once
(``folding.run.preload``): spawning each rank afresh would import them once per rank, several
CPU seconds each. Each rank takes the launcher's environment and working directory as they are
at the launch, as a spawned rank would. GPU ranks are spawned: CUDA does not survive a fork.
"""

from __future__ import annotations

import os
import queue as queue_module
import signal
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch.multiprocessing as mp

from folding.errors import FoldingError
from folding.run.device import CPU, DEVICE_ENV, DeviceChoice


class RankFailed(FoldingError):
    """A spawned rank raised, died or stopped answering; ``rank`` names it."""

    def __init__(self, rank: int, reason: str, details: str = ""):
        self.rank, self.reason, self.details = rank, reason, details
        super().__init__(f"rank {rank} failed: {reason}; the other ranks were stopped")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """A rank whose launcher died has nobody to report to and may wait forever in a collective:
    exit as soon as the parent is gone."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _context(device: DeviceChoice):
    """Forks of the preloaded fork server for CPU ranks where the platform has one, else spawn."""
    if device.on_gpu or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    # One fork server per launching process, started by its first launch; the placement
    # solver's workers (``folding.placement.training``) share it.
    context.set_forkserver_preload(["folding.run.preload", "folding.placement.training"])
    return context


def quiet_imports() -> None:
    """Megatron and torch.distributed warn about missing GPU libraries and deprecated names on
    every rank (and in the fork server, once per launch); on a CPU run that is noise, not news."""
    import logging
    import warnings

    for module in ("megatron", "torch.distributed", "torch.nn", "transformer_engine"):
        warnings.filterwarnings("ignore", module=module)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple,
            results, collective_timeout_s: float, device: DeviceChoice, environment: dict,
            directory: str) -> None:
    import torch
    import torch.distributed as dist

    # As a spawned rank would: a fork server's environment and directory are its first launch's.
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(directory)
    quiet_imports()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # Read by the CPU runtime: a CPU rank must stay on the CPU where GPUs are visible too.
    os.environ[DEVICE_ENV] = device.kind
    _exit_with_parent()
    pid_dir = os.environ.get("FOLDING_PID_DIR")
    if pid_dir:  # lets a supervisor (or a test) find the process of each rank
        with open(os.path.join(pid_dir, f"rank-{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
    torch.set_num_threads(threads)
    try:
        if device.on_gpu:
            # Before the process group: NCCL binds each rank to the current device.
            torch.cuda.set_device(rank)
        dist.init_process_group(device.backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        result = fn(rank, world_size, *args)
        results.put(("ok", rank, result))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        summary = str(e).splitlines()[0] if str(e) else ""
        results.put(("error", rank, f"{type(e).__name__}: {summary}", traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - peers may already be gone
            pass


def _stop(processes, grace_s: float = 0.0) -> None:
    """Let ranks exit on their own for ``grace_s`` seconds, then terminate, then kill."""
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join()


# Errors a rank sees when a peer is gone: symptoms, not causes.
PEER_SYMPTOMS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                  "Timed out", "timed out", "Connection refused")


def _first_failure(item, processes, results, done) -> RankFailed:
    """Decide which rank caused the failure: a rank that died beats a rank that merely lost a
    peer; among errors, a real exception beats a broken connection."""
    errors = [item] if item is not None else []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # collect what else happened around the same moment
        try:
            extra = results.get(timeout=0.1)
        except queue_module.Empty:
            continue
        if extra[0] == "ok":
            done[extra[1]] = extra[2]
        else:
            errors.append(extra)
    reported = {e[1] for e in errors}
    for rank, p in enumerate(processes):
        code = p.exitcode
        if rank not in done and rank not in reported and code not in (None, 0):
            why = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            return RankFailed(rank, f"{why} without a result")
    causes = [e for e in errors if not any(s in e[2] for s in PEER_SYMPTOMS)] or errors
    first = min(causes, key=lambda e: e[1])
    return RankFailed(first[1], first[2], first[3])


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: Optional[float] = None,
              threads_per_rank: Optional[int] = None, collective_timeout_s: float = 600,
              device: DeviceChoice = CPU) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local ranks, on the CPU with gloo
    or, with a ``cuda`` choice (``folding.run.device.pick_device``), one GPU per rank with NCCL.

    ``fn`` must be importable (a module-level function) and return something picklable.
    ``timeout_s`` bounds the whole run; on expiry every rank is stopped and RankFailed names the
    lowest rank still running.
    """
    ctx = _context(device)
    results = ctx.Queue()
    port = free_port()
    # One thread per rank: the matrices of CPU runs are small, and intra-op threading on them
    # costs far more in synchronisation than it gains (ten times slower seen on 2 cores).
    threads = threads_per_rank or 1
    processes = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world_size, port, threads, fn, args, results,
                                   collective_timeout_s, device, dict(os.environ), os.getcwd()))
                 for r in range(world_size)]
    for p in processes:
        p.start()
    done: dict = {}
    start = time.monotonic()
    succeeded = False
    try:
        while len(done) < world_size:
            try:
                item = results.get(timeout=0.2)
            except queue_module.Empty:
                item = None
            if item is not None and item[0] == "ok":
                done[item[1]] = item[2]
                continue
            # A clean exit (status 0) always posts its result first, so only others are failures.
            died = [r for r, p in enumerate(processes) if r not in done and p.exitcode not in (None, 0)]
            if item is not None or died:
                raise _first_failure(item, processes, results, done)
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                waiting = min(r for r in range(world_size) if r not in done)
                raise RankFailed(waiting, f"no result after {timeout_s:.0f} s")
        succeeded = True
    finally:
        # Finished ranks are tearing down their process groups: give them time to exit cleanly.
        _stop(processes, grace_s=30.0 if succeeded else 0.0)
        results.close()
        results.join_thread()
    return [done[r] for r in range(world_size)]
