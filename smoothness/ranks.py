"""Splitting work across processes: ``--shard i/n`` (no process group: job arrays, preemptible nodes)
and ``torchrun`` (ranks from the environment; ``torch.distributed`` for rendezvous and a final barrier
only, never in the hot path). Core layer; the commands use it.

Which work a shard does is decided by the caller from (i, n) alone (e.g. ``surface.dataset.owned_chunks``);
random draws never depend on the rank, so the merged result equals a one-process run bit for bit on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> (1, 4); i in 0..n-1."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} is not i/n, e.g. 0/4 (shard i of n, counted from 0)") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r} is not allowed; use i/n with n >= 1 and i in 0..n-1")
    return i, n


def from_env() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


@contextlib.contextmanager
def process_group(device: str, timeout_s: float):
    """A process group for rendezvous and barriers: gloo on CPU, nccl on CUDA."""
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(timeout_s: float):
    """Wait for every rank; a rank that died or hangs fails the wait after ``timeout_s`` (gloo names it)."""
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
    else:
        dist.barrier()


def block(count: int, shard: tuple[int, int]) -> range:
    """The items shard i of n takes when work is dealt in contiguous blocks (sizes differ by at most
    one): neighbouring items share set-up work, e.g. one reference chain per (model, seed)."""
    i, n = shard
    return range(i * count // n, (i + 1) * count // n)


def check_shard_set(shards: list[tuple[int, int]]) -> int:
    """n, when ``shards`` are shards 0..n-1 of one n-way split, each once; else one line saying what is wrong."""
    n = shards[0][1]
    if any(s[1] != n for s in shards):
        raise ValueError(f"the files come from different shard counts ({sorted({s[1] for s in shards})}); "
                         "merge the shards of one split")
    have = sorted(s[0] for s in shards)
    if have != list(range(n)):
        dup = sorted({i for i in have if have.count(i) > 1})
        miss = sorted(set(range(n)) - set(have))
        raise ValueError(f"shards of a {n}-way split: " + (f"missing {miss}" if miss else "") +
                         ("; " if miss and dup else "") + (f"given twice {dup}" if dup else ""))
    return n


def shard_attr(text: str | None, where: str = "dataset") -> tuple[int, int]:
    """(i, n) from a result's ``shard`` attribute ("i/n"); (0, 1) for a whole result."""
    text = "0/1" if text is None else str(text)
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"{where}: shard attribute {text!r} is not i/n") from None
    return i, n


def add_args(parser, unit: str):
    """--shard and --barrier-timeout; ``unit`` names what is dealt (e.g. "the grid's chunks")."""
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help=f"do only shard I of N of {unit} and write <name>.shard-I-of-N.nc; merge the N files "
                             "with python -m smoothness.merge (default: all of it; under torchrun each rank takes "
                             "its shard and rank 0 merges)")
    parser.add_argument("--barrier-timeout", type=float, default=3600.0,
                        help="torchrun: seconds rank 0 waits for the other ranks before failing the job "
                             "(default: 3600)")


def from_args(args) -> tuple[tuple[int, int], bool]:
    """(shard (i, n), launched by torchrun) from --shard or torchrun's environment, checked."""
    world = from_env()
    if world is not None and args.shard:
        raise ValueError("--shard and torchrun are alternatives: torchrun gives each rank its shard")
    if not args.barrier_timeout > 0:
        raise ValueError(f"--barrier-timeout={args.barrier_timeout:g} is not allowed; use a positive number of seconds")
    return (world or (parse_shard(args.shard) if args.shard else (0, 1))), world is not None


def stem(name: str, shard: tuple[int, int]) -> str:
    """The file stem of one shard's result (the run's name when it is not split)."""
    return name if shard[1] == 1 else f"{name}.shard-{shard[0]}-of-{shard[1]}"


def shard_files(out: Path, name: str, n: int) -> list[Path]:
    """The n shard files of the run ``name`` in folder ``out``."""
    return [out / f"{stem(name, (i, n))}.nc" for i in range(n)]


def run(shard: tuple[int, int], launched: bool, *, out: Path, name: str, device: str, timeout_s: float,
        before, part, merge):
    """Run this process's ``part()`` (which writes ``<out>/<stem>.nc``) and return the whole result,
    or None where this process does not hold it.

    Under torchrun: a process group; rank 0 runs ``before()`` (e.g. refuse to replace another result)
    ahead of every rank's work, waits for all ranks, then returns ``merge(shard files)`` and removes the
    shard files; the other ranks return None. Without torchrun: ``before()`` and ``part()``; a whole
    run returns its result, one shard prints how to merge and returns None."""
    if not launched:
        before()
        t0 = time.time()
        ds = part()
        if shard[1] == 1:
            return ds
        print(f"shard {shard[0]}/{shard[1]} done in {time.time() - t0:.0f}s: {out / stem(name, shard)}.nc; when all "
              f"{shard[1]} are done: python -m smoothness.merge {out / name}.shard-*-of-{shard[1]}.nc "
              f"--out {out / name}.nc")
        return None
    with process_group(device, timeout_s):
        if shard[0] == 0:
            before()
        barrier(timeout_s)                       # rank 0's checks first: a refused run does no work
        part()
        barrier(timeout_s)
        if shard[0] != 0:
            return None
        files = shard_files(out, name, shard[1])
        ds = merge(files)
        for f in files:
            f.unlink()
        return ds


def local_device(device: str) -> str:
    """Under torchrun, plain ``cuda`` means this process's GPU (cuda:LOCAL_RANK); else ``device``."""
    if device == "cuda" and from_env() is not None:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
