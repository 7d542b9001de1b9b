"""Run a training loop in several data-parallel processes from a notebook: `accelerate launch` of
this module, which calls the loop with the arguments it was given and hands its result back.

Every loop already trains in several processes (tested against one, `tests/test_ldm_compact.py`);
this is how a notebook asks for them. On a CPU machine two single-thread processes each working on
half of a batch are faster than one process with two threads for the small matrices of the embedded
profiles (the LM of 04: 447 against 513 s, README "Running the chain"); on GPUs each process takes
one GPU.
"""

import collections
import importlib
import json
import socket
import subprocess
import sys
import tempfile
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
        The loop's result; paths in it come back as strings. The loop's progress bar and messages are
        written here as they come; a failed launch raises `RuntimeError` with the end of its output.
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if processes == 1:
        return function(*args, **kwargs)
    if "progress" not in kwargs:
        kwargs["progress"] = True
    with tempfile.TemporaryDirectory(prefix="medsyn_launch_") as scratch:
        call = Path(scratch) / "call.json"
        result = Path(scratch) / "result.json"
        call.write_text(
            json.dumps(
                {
                    "function": f"{function.__module__}:{function.__qualname__}",
                    "args": args,
                    "kwargs": kwargs,
                    "result": str(result),
                },
                default=_jsonable,
            )
        )
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
        if tail is not None:
            raise RuntimeError(f"{function.__qualname__} in {processes} processes failed:\n{tail}")
        if not result.exists():
            raise RuntimeError(f"{function.__qualname__} in {processes} processes returned nothing")
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
    tail = collections.deque(maxlen=64)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment)
    while chunk := child.stdout.read1(4096):
        text = chunk.decode(errors="replace")
        sys.stderr.write(text)
        sys.stderr.flush()
        tail.append(text)
    if child.wait() == 0:
        return None
    return "".join(tail)[-4000:]


def _main(call_path: str) -> None:
    from accelerate import PartialState

    call = json.loads(Path(call_path).read_text())
    module, name = call["function"].split(":")
    result = getattr(importlib.import_module(module), name)(*call["args"], **call["kwargs"])
    if PartialState().is_main_process:
        Path(call["result"]).write_text(json.dumps(result, default=_jsonable))


if __name__ == "__main__":
    _main(sys.argv[1])
