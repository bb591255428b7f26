"""Where a run computes: the device string, its precision settings, out-of-memory messages and the
memory budget that sizes chunks of work. Core layer; the commands use it.

    setup("cuda:0")            # TF32 on for fp32 matmuls, deterministic algorithms where torch has them
    with autocast("cuda", "bfloat16"): ...
    with out_of_memory("cuda:0", "evaluating 64 grid points per chunk", "lower --batch-size"): ...

What stays nondeterministic on a GPU (README): cuBLAS split-K reductions under TF32 / bf16 give
bit-different sums between GPU models and library versions; atomics in some CUDA kernels (torch
warns, and ``setup`` keeps warn-only so a run never stops for it).
"""
from __future__ import annotations

import contextlib
import os
import platform

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}   # never float16 on CPU: ~300x slower


def check(device: str) -> str:
    """cpu, cuda or cuda:N (the latter two only where a GPU is present)."""
    text = str(device).strip()
    cuda = text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())
    if text != "cpu" and not cuda:
        raise ValueError(f"--device {device!r} is not allowed; use cpu, cuda or cuda:N")
    if cuda:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text[5:]) if ":" in text else 0
        if index >= count:
            raise ValueError(f"--device {device!r} is not available here ({count} GPU(s)); allowed: cpu"
                             + (f", cuda:0..{count - 1}" if count else ""))
    return text


def add_args(parser, dtype_help: str = "bfloat16 runs the model under autocast", compile_flag: bool = True):
    """--device, --dtype, --no-tf32 and (with ``compile_flag``) --compile."""
    a = parser.add_argument
    a("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    a("--dtype", choices=list(DTYPES), default="float32", help=f"{dtype_help} (default: float32)")
    a("--no-tf32", dest="tf32", action="store_false", help="CUDA: keep fp32 matmuls in full fp32 (default: TF32 on, "
      "recorded in the result's attributes)")
    if compile_flag:
        a("--compile", action="store_true", help="torch.compile each transformer block of the model; the first "
          "calls pay the compile time (default: off)")


def setup(device: str, tf32: bool = True) -> dict:
    """Set the run's precision switches; returns them as result attributes."""
    device = check(device)
    attrs = {"device": device, "device_name": _cpu_name(), "tf32": 0,
             "deterministic_algorithms": 0}
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")     # deterministic cuBLAS workspaces
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.use_deterministic_algorithms(True, warn_only=True)
        attrs.update(device_name=torch.cuda.get_device_name(torch.device(device)), tf32=int(tf32),
                     deterministic_algorithms=1, cuda=str(torch.version.cuda))
    return attrs


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def autocast(device: str, dtype: str):
    """bf16 autocast on request; float32 runs as is."""
    if DTYPES[dtype] == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=DTYPES[dtype])


def sync(device) -> None:
    """Wait for queued kernels (wall times on a GPU are meaningless without it)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


@contextlib.contextmanager
def out_of_memory(device: str, what: str, advice: str):
    """Turn an out-of-memory error into one line: where, what was tried, and the flag that lowers it."""
    try:
        yield
    except torch.OutOfMemoryError:
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
        raise ValueError(f"out of memory on {device} {what}; {advice}") from None


def compile_blocks(model) -> int:
    """torch.compile every block of ``model`` in place (``nn.Module.compile``: the module object, its
    parameters and hook sites stay the same, so caches that call units from outside keep working).
    Returns how many blocks."""
    blocks = list(model.blocks)
    for block in blocks:
        block.compile()
    return len(blocks)


def free_bytes(device: str) -> int:
    """Free memory on a CUDA device (the budget a chunk may use)."""
    if not str(device).startswith("cuda"):
        raise ValueError("chunks are sized from free memory on CUDA devices only; on cpu give --batch-size")
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def peak_bytes(device: str, fn) -> int:
    """Peak memory ``fn()`` allocates above what is held before it (CUDA)."""
    dev = torch.device(device)
    sync(device)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    sync(device)
    return int(torch.cuda.max_memory_allocated(dev) - base)


def fit_chunk(peak_1: int, peak_2: int, budget: int, limit: int) -> int:
    """The largest chunk (1..limit) whose peak, extrapolated linearly from chunks of 1 and 2, fits ``budget``."""
    per = max(peak_2 - peak_1, 1)
    fixed = peak_1 - per
    if peak_1 > budget:
        raise ValueError(f"one item needs {peak_1 / 2 ** 30:.2f} GiB, more than the {budget / 2 ** 30:.2f} GiB budget; "
                         "raise --max-memory or use a smaller model")
    return int(max(1, min(limit, (budget - fixed) // per)))
