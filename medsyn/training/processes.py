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

import codecs
import collections
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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
    kwargs = {"progress": True, **kwargs}
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
        self.name, self._child, self._error = function.__qualname__, None, None
        if threads is None:  # here and now: the handle is finished when it is made
            self._value = function(*args, **kwargs)
            return
        if threads < 1:
            raise ValueError(f"threads must be at least 1 (or None: here), got {threads}")
        self._scratch = tempfile.TemporaryDirectory(prefix="medsyn_start_")
        call, self._result = _write_call(Path(self._scratch.name), function, args, {"progress": True, **kwargs})
        log = Path(self._scratch.name) / "output.log"
        with open(log, "wb") as output:  # the child keeps its own copy of the descriptor
            self._child = subprocess.Popen(
                [sys.executable, "-m", ENTRY, str(call)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment_with(OMP_NUM_THREADS=str(threads)),
                start_new_session=True,  # see _relay
            )
        self._output = open(log, "rb")  # read on by result(), which closes it
        # this process goes on beside it with the threads that are left
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, self._threads_before - threads))

    def result(self) -> dict:
        """Wait for the loop, writing its output here meanwhile; its result (paths as strings), or
        `RuntimeError` with the end of its output. This process gets its threads back. A later call
        returns the same result or raises the same error."""
        if self._error is not None:
            raise self._error
        if self._child is None:
            return self._value
        decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), collections.deque(maxlen=256)
        try:
            while True:
                finished = self._child.poll() is not None
                _write_on(decoder.decode(self._output.read()), tail)
                if finished:
                    break
                time.sleep(0.5)
        except BaseException:
            _stop(self._child)
            self._scratch.cleanup()
            self._error = RuntimeError(f"{self.name} in a process of its own was stopped: its wait was interrupted")
            raise
        finally:
            self._output.close()
            torch.set_num_threads(self._threads_before)
        tail = None if self._child.returncode == 0 else "".join(tail)[-20000:]
        self._child = None
        try:
            self._value = _returned(self._result, tail, f"{self.name} in a process of its own")
        except RuntimeError as error:
            self._error = error
            raise
        finally:
            self._scratch.cleanup()
        return self._value


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
        "parent": os.getpid(),  # the notebook's kernel: the loop stops when it is gone (`_stop_without`)
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
    decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), collections.deque(maxlen=256)
    # a session of their own: an interrupted notebook stops the launcher and every process it started
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment, start_new_session=True
    )
    try:
        while chunk := child.stdout.read1(4096):
            _write_on(decoder.decode(chunk), tail)
        code = child.wait()
    except BaseException:  # KeyboardInterrupt above all: no training left running unseen
        _stop(child)
        raise
    return None if code == 0 else "".join(tail)[-20000:]


def _write_on(text: str, tail: collections.deque) -> None:
    """A child's output, here (a multi-byte character split between two reads is decoded whole)."""
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()
        tail.append(text)


def _stop(child: subprocess.Popen) -> None:
    """Stop a child started in a session of its own, and every process it started."""
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait()


def _stop_without(parent: int, scratch: Path, every: float = 1.0) -> None:
    """Watch, beside the loop, for the process that started it; when it is gone (a notebook kernel
    restarted or killed, which no `except` in it sees), remove the call's scratch folder, which that
    process would have removed, and stop this process's group, the launcher and every process of the
    loop with it: no loop trains on unseen."""

    def watch():
        while _alive(parent):
            time.sleep(every)
        shutil.rmtree(scratch, ignore_errors=True)
        os.killpg(os.getpgrp(), signal.SIGTERM)

    threading.Thread(target=watch, name="medsyn-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux): the signal's answer stands
        return True


def _main(call_path: str) -> None:
    from accelerate import PartialState

    call = json.loads(Path(call_path).read_text())
    if "parent" in call:
        _stop_without(call["parent"], Path(call_path).parent)
    module, name = call["function"].split(":")
    result = getattr(importlib.import_module(module), name)(*call["args"], **call["kwargs"])
    if PartialState().is_main_process:
        Path(call["result"]).write_text(json.dumps(result, default=_jsonable))


if __name__ == "__main__":
    _main(sys.argv[1])
