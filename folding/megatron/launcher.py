"""``folding megatron``: run an unmodified Megatron-LM training script with the plugin in it.

Two ways to start it, as Megatron users start pretrain_gpt.py:

- per rank, by torchrun or srun (``torchrun --nproc-per-node 8 --no-python folding megatron --
  pretrain_gpt.py ...``): ``run_rank`` installs the plugin (``training_hooks``), switches the
  CPU runtime on with ``--cpu`` and runs the script as ``__main__``; the rendezvous is Megatron's
  own (env://);
- with ``--nproc N``: ``launch_local`` first checks the folding once, in this process, then
  starts N local ranks (each the per-rank form above; with ``--cpu`` forks of the checking
  process, which has Megatron imported by then), forwards their output, and stops every rank as
  soon as one fails, naming it.

With ``--cpu`` the flags Megatron needs to train on CPU are added unless given (``CPU_FLAGS``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence

from folding.errors import FoldingError
from folding.run.device import DEVICE_ENV

# Megatron's flags for a CPU run: gloo, Megatron's own layers (Transformer Engine is a GPU
# library), and no fused CUDA kernels.
CPU_FLAGS = (
    ("--distributed-backend", "gloo"),
    ("--transformer-impl", "local"),
    ("--no-gradient-accumulation-fusion", None),
    ("--no-masked-softmax-fusion", None),
    ("--no-bias-swiglu-fusion", None),
    ("--no-bias-dropout-fusion", None),
    ("--no-rope-fusion", None),
    ("--no-persist-layer-norm", None),
)


def with_cpu_flags(argv: Sequence[str]) -> List[str]:
    """``argv`` plus each of ``CPU_FLAGS`` the user did not give."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    out = list(argv)
    for flag, value in CPU_FLAGS:
        if flag not in given:
            out += [flag] if value is None else [flag, value]
    return out


def _script_path(script: str) -> str:
    if not os.path.isfile(script):
        raise FoldingError(f"training script {script} does not exist")
    return os.path.abspath(script)


def _prepare_imports(script: str) -> None:
    """What ``python SCRIPT`` does: the script's folder first on the import path, so a
    Megatron-LM checkout's ``megatron`` package and helpers (gpt_builders.py) are the ones used."""
    folder = os.path.dirname(script)
    if sys.path[:1] != [folder]:
        sys.path.insert(0, folder)


def check_folding(script: str, argv: Sequence[str], world_size: int, cpu: bool) -> None:
    """Parse and validate the script's arguments with Megatron's own functions as a rank would,
    and refuse a bad folding or an unsupported flag (FoldingError) before any rank starts."""
    import logging
    import warnings

    from folding.megatron import cpu_runtime as runtime
    from folding.megatron import training_hooks

    _prepare_imports(script)
    # Megatron's import-time warnings (no Apex, no Transformer Engine) would bury the one line
    # this check exists to print; the ranks print them anyway.
    megatron_logger = logging.getLogger("megatron")
    level = megatron_logger.level
    megatron_logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = contextlib.ExitStack()
        if cpu:
            stack.enter_context(runtime.cpu_runtime(training=True))
        if sys.version_info < (3, 12) and not cpu:
            _typing_override_marker()
        with stack:
            try:
                args = training_hooks.validated_arguments(argv, world_size=world_size)
            except AssertionError as e:
                raise FoldingError(f"Megatron's validate_args refuses the arguments: "
                                   f"{_assertion_text(e)}") from None
            finally:
                megatron_logger.setLevel(level)  # CPU ranks fork from this process
    training_hooks.check_arguments(args)


def _typing_override_marker() -> None:
    """megatron.training (0.19+) imports Python 3.12's ``typing.override``, a decorator that
    only marks methods; on 3.11 this process gets it here."""
    import typing

    if not hasattr(typing, "override"):
        typing.override = lambda f: f


def _python311_marker_for_children() -> None:
    """Processes Megatron spawns (checkpoint writers) re-import the script, and with it
    megatron.training, which needs ``typing.override`` (Python 3.12): give them the marker
    through a sitecustomize on their PYTHONPATH, and this process directly."""
    _typing_override_marker()
    folder = os.path.join(os.path.dirname(__file__), "py311")
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.environ.get("PYTHONPATH") else []
    if folder not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([folder] + paths)


def _assertion_text(error: AssertionError) -> str:
    """An assertion's message, or where it has none, the failed statement and its place."""
    import traceback

    if str(error):
        return str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{frame.line} ({os.path.basename(frame.filename)}:{frame.lineno})"


def run_rank(script: str, argv: Sequence[str], cpu: bool) -> int:
    """Run ``script`` with ``argv`` as this process's rank, the plugin installed; returns the
    exit status (2 for a folding the plugin refuses, with one line on rank 0)."""
    from folding.megatron import cpu_runtime as runtime
    from folding.megatron import training_hooks

    script = _script_path(script)
    _prepare_imports(script)
    if sys.version_info < (3, 12):
        _python311_marker_for_children()
    if cpu:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        # The CPU runtime reads the rank's device here: on a host with GPUs, --cpu still means CPU.
        os.environ[DEVICE_ENV] = "cpu"
        argv = with_cpu_flags(argv)
    saved_argv = sys.argv
    sys.argv = [script] + list(argv)
    started = runtime.enable(training=True) if cpu else False
    hooks = None
    try:
        hooks = training_hooks.install()
        runpy.run_path(script, run_name="__main__")
    except FoldingError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"folding megatron: error: {e}", file=sys.stderr, flush=True)
        else:
            # torchrun stops every rank as soon as one exits: let rank 0 say why first.
            time.sleep(5)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        if hooks is not None:
            hooks.restore()
        if started:
            runtime.disable()
        sys.argv = saved_argv
    return 0


# --------------------------------------------------------------------------- local ranks
def _die_with_parent() -> None:
    """In a child, before exec: Linux sends SIGKILL to the rank if the launcher dies, so no rank
    waits forever in a collective."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _ForkedRank:
    """A CPU rank forked from the launcher once its check has imported Megatron, so no rank
    imports it again (several CPU seconds per rank); what ``launch_local`` uses of ``Popen``."""

    def __init__(self, script: str, argv: Sequence[str], env: Dict[str, str]):
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the rank; it never returns into the launcher's code
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            os.close(write_end)
            _die_with_parent()
            os._exit(self._run_rank(script, argv, env))
        os.close(write_end)
        self.stdout = os.fdopen(read_end, "rb")
        self.returncode: Optional[int] = None

    @staticmethod
    def _run_rank(script: str, argv: Sequence[str], env: Dict[str, str]) -> int:
        import atexit
        import traceback

        import torch

        status = 1
        try:
            os.environ.clear()
            os.environ.update(env)
            # OpenMP read OMP_NUM_THREADS when the launcher imported torch, before this rank's
            # environment existed.
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
            status = run_rank(script, argv, cpu=True)
        except BaseException:  # noqa: BLE001 - the launcher reads the reason from the output
            traceback.print_exc()
        finally:
            try:
                atexit._run_exitfuncs()  # what the interpreter's exit would have run
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
        return status

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"rank process {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, number: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, number)
            except ProcessLookupError:
                pass


@dataclass
class LocalRun:
    """What ``launch_local`` saw: each rank's exit status and the lines it printed."""

    world_size: int
    exit_status: int = 0
    failed_rank: Optional[int] = None
    reason: str = ""
    statuses: Dict[int, Optional[int]] = field(default_factory=dict)
    output: List[str] = field(default_factory=list)

    def message(self) -> str:
        return (f"rank {self.failed_rank} failed: {self.reason}; the other ranks were stopped"
                if self.failed_rank is not None else "")


def _forward(stream, rank: int, sink: List[str], tail: Deque[str], echo: bool) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sink.append(line)
        tail.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")
_EXCEPTION_LINE = re.compile(r"^(folding megatron: error:|[\w.]*(Error|Exception|Mismatch|Failed)\b:?)")


def _failure_reason(status: int, tail: Deque[str]) -> str:
    why = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
    for line in reversed(tail):  # the exception that ended the rank, when it printed one
        text = _RANK_PREFIX.sub("", line.strip())
        if _EXCEPTION_LINE.match(text):
            return f"{why}: {text}"
    return why


def launch_local(script: str, argv: Sequence[str], nproc: int, cpu: bool, echo: bool = True,
                 timeout_s: Optional[float] = None) -> LocalRun:
    """Start ``nproc`` local ranks running ``script`` under the plugin; stop all when one fails.

    Each rank is the per-rank form (``run_rank``) with torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): with ``--cpu`` a fork of this process, which the check
    left with Megatron imported; on GPUs a fresh ``python -m folding.cli megatron -- SCRIPT
    ARGS``, since CUDA does not survive a fork.
    """
    from folding.run.launch import free_port

    script = _script_path(script)
    if cpu:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if nproc < 1:
        raise FoldingError(f"--nproc must be at least 1, got {nproc}")
    check_folding(script, with_cpu_flags(argv) if cpu else argv, nproc, cpu)
    port = free_port()
    run = LocalRun(world_size=nproc)
    procs, readers, tails = [], [], []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: ranks share the cores
        if cpu:
            procs.append(_ForkedRank(script, argv, env))
        else:
            command = [sys.executable, "-m", "folding.cli", "megatron", "--", script] + list(argv)
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, preexec_fn=_die_with_parent))
    # Readers start once every rank is forked: a fork copies only the thread that forks.
    for rank, proc in enumerate(procs):
        tail: Deque[str] = collections.deque(maxlen=60)
        reader = threading.Thread(target=_forward, args=(proc.stdout, rank, run.output, tail, echo),
                                  daemon=True)
        reader.start()
        readers.append(reader)
        tails.append(tail)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            statuses = [p.poll() for p in procs]
            failed = [(r, s) for r, s in enumerate(statuses) if s not in (None, 0)]
            if failed:
                time.sleep(0.5)  # a rank that lost its peer fails just after the one that failed
                statuses = [p.poll() for p in procs]
                failed = [(r, s) for r, s in enumerate(statuses) if s not in (None, 0)]
                # A rank that says why (a Python error) beats one that only lost a connection.
                rank, status = min(failed, key=lambda rs: (_is_peer_symptom(tails[rs[0]]), rs[0]))
                run.failed_rank, run.exit_status = rank, status if status > 0 else 1
                for reader in readers:
                    reader.join(timeout=1)
                run.reason = _failure_reason(status, tails[rank])
                break
            if all(s == 0 for s in statuses):
                break
            if deadline is not None and time.monotonic() > deadline:
                running = [r for r, s in enumerate(statuses) if s is None]
                run.failed_rank, run.exit_status = running[0], 124
                run.reason = f"still running after {timeout_s:.0f} s"
                break
            time.sleep(0.1)
    finally:
        _stop(procs)
        for reader in readers:
            reader.join(timeout=5)
        run.statuses = {r: p.returncode for r, p in enumerate(procs)}
    return run


def _is_peer_symptom(tail: Deque[str]) -> bool:
    from folding.run.launch import PEER_SYMPTOMS

    text = "".join(list(tail)[-5:])
    return any(s in text for s in PEER_SYMPTOMS)


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
