"""Training loops in processes of their own, started from a notebook: this module is what those
processes run (it calls the loop with the arguments it was given and hands the result back).

`in_processes` launches a loop in several data-parallel processes (`accelerate launch`). Every loop
already trains that way (tested against one process, `tests/test_ldm_compact.py`); this is how a
notebook asks for it. On GPUs each process takes one GPU; on a CPU machine two single-thread
processes, each on half of every batch, train vq-ar's LM faster than one process on two threads
(README, "Several processes").

`start` runs a loop in one process of its own beside the notebook instead, so that two loops that
do not depend on each other (02's U-Net and ldm-finetune's pretraining and fine-tune) each train on
a core of their own.
"""

import collections
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medsyn.paths import environment_with

ENTRY = "medsyn.training.processes"


def in_processes(function, processes: int, /, *args, **kwargs) -> dict:
    """`function(*args, **kwargs)` in `processes` data-parallel processes (`accelerate launch
    --multi_gpu`, a gloo group on the CPU); its return value, as the main process returned it.

    Args:
        function: a training loop of `medsyn.training` (importable by its module and name); it must
            split its batches over `accelerator.num_processes`, as every loop does.
        processes: 1 calls `function` here, in this process; more launches them. On the CPU the
            threads this process uses are shared out (`OMP_NUM_THREADS`, at least 1 each).
        args, kwargs: the loop's arguments; JSON values or paths.

    Returns:
        The loop's result (from launched processes, its paths as strings). The loop's progress bar and messages are
        written here as they come; a failed launch raises `RuntimeError` with the end of its output.
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if processes == 1:
        return function(*args, **kwargs)
    if "progress" not in kwargs:
        kwargs["progress"] = True
    with tempfile.TemporaryDirectory(prefix="medsyn_launch_") as scratch:
        call, result = _write_call(Path(scratch), function, args, kwargs)
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--main_process_port",
            str(_free_port()),
            "--mixed_precision",
            "no",  # the loop's own mixed_precision argument decides
            "--dynamo_backend",
            "no",
            "-m",
            ENTRY,
            str(call),
        ]
        threads = max(1, torch.get_num_threads() // processes)
        tail = _relay(command, environment_with(OMP_NUM_THREADS=str(threads)))
        return _returned(result, tail, f"{function.__qualname__} in {processes} processes")


class Started:
    """A training loop running in a process of its own (`start`); `result()` waits for it."""

    def __init__(self, function, threads: int | None, args: tuple, kwargs: dict):
        self.name, self.threads = function.__qualname__, threads
        if threads is None:  # here and now: the handle is finished when it is made
            self._value, self._child = function(*args, **kwargs), None
            return
        if threads < 1:
            raise ValueError(f"threads must be at least 1 (or None: here), got {threads}")
        self._scratch = tempfile.TemporaryDirectory(prefix="medsyn_start_")
        scratch = Path(self._scratch.name)
        self._call, self._result = _write_call(scratch, function, args, {"progress": True, **kwargs})
        self._log = open(scratch / "output.log", "wb")  # closed by result()
        self._child = subprocess.Popen(
            [sys.executable, "-m", ENTRY, str(self._call)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment_with(OMP_NUM_THREADS=str(threads)),
            start_new_session=True,  # see _relay
        )
        # this process goes on beside it with the threads that are left
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, self._threads_before - threads))

    def result(self) -> dict:
        """Wait for the loop, writing its output here meanwhile; its result (paths as strings), or
        `RuntimeError` with the end of its output. This process gets its threads back."""
        if self._child is None:
            return self._value
        written = 0
        try:
            while True:
                finished = self._child.poll() is not None
                text = (Path(self._scratch.name) / "output.log").read_bytes()[written:]
                written += len(text)
                sys.stderr.write(text.decode(errors="replace"))
                sys.stderr.flush()
                if finished:
                    break
                time.sleep(0.5)
            tail = None if self._child.returncode == 0 else self._tail()
            self._value = _returned(self._result, tail, f"{self.name} in a process of its own")
        except BaseException:
            if self._child.poll() is None:
                os.killpg(self._child.pid, signal.SIGTERM)
                self._child.wait()
            raise
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
                torch.set_num_threads(self._threads_before)
        self._child = None
        self._scratch.cleanup()
        return self._value

    def _tail(self) -> str:
        return (Path(self._scratch.name) / "output.log").read_bytes()[-20000:].decode(errors="replace")


def start(function, threads: int | None, /, *args, **kwargs) -> Started:
    """Start `function(*args, **kwargs)` in a process of its own with `threads` threads and go on:
    this process keeps the threads that are left until `Started.result()` is called.

    Args:
        function: a training loop of `medsyn.training` (importable by its module and name).
        threads: the new process's threads (`OMP_NUM_THREADS`); None runs `function` here, now.
        args, kwargs: the loop's arguments; JSON values or paths.

    Returns:
        A `Started`, whose `result()` returns what the loop returned (from a process of its own, its
            paths as strings).
    """
    return Started(function, threads, args, kwargs)


def _write_call(scratch: Path, function, args, kwargs) -> tuple[Path, Path]:
    call, result = scratch / "call.json", scratch / "result.json"
    payload = {
        "function": f"{function.__module__}:{function.__qualname__}",
        "args": args,
        "kwargs": kwargs,
        "result": str(result),
    }
    call.write_text(json.dumps(payload, default=_jsonable))
    return call, result


def _returned(result: Path, tail: str | None, what: str) -> dict:
    if tail is not None:
        # the loop's own exception first: the launcher's traceback that follows it says only that a rank failed
        raised = re.findall(r"^(?:\[rank\d+\]: )?(\w+(?:Error|Exception|Interrupt): .*)$", tail, re.MULTILINE)
        raise RuntimeError(f"{what} failed: {' / '.join(dict.fromkeys(raised)) or 'see its output'}\n{tail[-3000:]}")
    if not result.exists():
        raise RuntimeError(f"{what} returned nothing")
    return json.loads(result.read_text())


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy and torch numbers and arrays
        return value.tolist()
    raise TypeError(f"cannot pass a {type(value).__name__} to another process: {value!r}")


def _free_port() -> int:
    # a port of our own, so that two launches on one machine (two notebooks, a test run) do not meet
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _relay(command: list[str], environment: dict) -> str | None:
    """Run `command`, writing its output here as it comes (the progress bar's carriage returns too);
    None when it succeeded, else the end of its output."""
    tail = collections.deque(maxlen=256)
    # a session of their own: an interrupted notebook stops the launcher and every process it started
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment, start_new_session=True
    )
    try:
        while chunk := child.stdout.read1(4096):
            text = chunk.decode(errors="replace")
            sys.stderr.write(text)
            sys.stderr.flush()
            tail.append(text)
        code = child.wait()
    except BaseException:  # KeyboardInterrupt above all: no training left running unseen
        os.killpg(child.pid, signal.SIGTERM)
        child.wait()
        raise
    return None if code == 0 else "".join(tail)[-20000:]


def _main(call_path: str) -> None:
    from accelerate import PartialState

    call = json.loads(Path(call_path).read_text())
    module, name = call["function"].split(":")
    result = getattr(importlib.import_module(module), name)(*call["args"], **call["kwargs"])
    if PartialState().is_main_process:
        Path(call["result"]).write_text(json.dumps(result, default=_jsonable))


if __name__ == "__main__":
    _main(sys.argv[1])
