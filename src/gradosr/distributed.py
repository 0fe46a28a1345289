"""Several processes, GPUs or machines, with PyTorch's own distributed engine.

Runs are launched by ``torchrun`` (``python -m torch.distributed.run``), which starts one
process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; the processes talk through ``torch.distributed`` process-group
collectives (https://pytorch.org/docs/stable/distributed.html): NCCL between GPUs, gloo
on CPUs. Training uses ``torch.nn.parallel.DistributedDataParallel``
(https://pytorch.org/docs/stable/generated/torch.nn.parallel.DistributedDataParallel.html),
see :func:`gradosr.train.train_classifier`.

What this module provides:

- :func:`init_distributed`: the process group and the device of this process
  (``cuda:LOCAL_RANK`` with CUDA); without torchrun it only resolves ``--device``.
- :func:`rank`, :func:`world_size`, :func:`is_main`, :func:`barrier`: 0, 1, True and a
  no-op when the run is not distributed.
- :func:`map_rows`: computes a row-wise function (feature extraction, logits, scores) on
  this process's contiguous shard of the rows and all-gathers the results, so that every
  process ends with the full result in the original row order. With ``align`` set to the
  batch size, every batch holds the same rows as in a single-process run, so the result
  is the same to the bit on the same hardware.
- :func:`all_reduce_sum`, :func:`agree`: small helpers for statistics and decisions.

Contracts of a distributed run: every process calls the same gradosr functions in the
same order (collectives pair up across processes); only rank 0 writes files
(:mod:`gradosr.checkpoint` is a no-op elsewhere) and prints. Only tensor collectives are
used (no ``all_gather_object``: it pickles).
"""

from __future__ import annotations

import contextvars
import gc
import os
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from gradosr.device import resolve_device
from gradosr.errors import ConfigError, GradOSRError

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - builds without torch.distributed
    dist = None

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

#: set while a map_rows shard is being computed: a nested map_rows runs locally
_IN_SHARD: contextvars.ContextVar[bool] = contextvars.ContextVar("gradosr_in_shard", default=False)
#: whether init_distributed created the process group (then shutdown_distributed destroys it)
_OWNED = {"group": False}


def available() -> bool:
    return dist is not None and dist.is_available()


def launched_by_torchrun() -> bool:
    """True when the torchrun variables RANK, WORLD_SIZE and LOCAL_RANK are all set."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def env_rank() -> int:
    """This process's rank from the environment (0 without torchrun), before or after init."""
    if is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
    except ValueError:
        return 0


def is_initialized() -> bool:
    return available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and when not distributed): the process that writes and prints."""
    return rank() == 0


def init_distributed(device: str | torch.device | None = "auto") -> torch.device:
    """The device of this process, and the process group when launched by torchrun.

    Without torchrun (or when torch.distributed is missing) this is
    :func:`gradosr.device.resolve_device` and nothing else. Under torchrun the process
    group is created when none exists: backend ``nccl`` when the device is CUDA, else
    ``gloo``; with CUDA every process takes ``cuda:LOCAL_RANK`` (an explicit ``cuda:N``
    is replaced by it), which needs as many GPUs per node as processes per node.
    """
    dev = resolve_device(device)
    if not launched_by_torchrun() or not available():
        return dev
    local = int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            raise ConfigError(f"torchrun started local rank {local}, but this node has {count} CUDA device(s): "
                              "use --nproc_per_node <= the number of GPUs")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        _OWNED["group"] = True
    return dev


def shutdown_distributed(wait: bool = True) -> None:
    """Destroy the process group if :func:`init_distributed` created it.

    gloo's worker threads outlive the group and release each finished collective's work
    (and its tensors, which needs the GIL) themselves; one still doing so when the
    interpreter shuts down aborts the process (SIGABRT, "terminate called without an
    active exception"). So the garbage (DDP reducers, work objects) is collected first,
    the last collective is a tensor-free barrier (with ``wait``: a command that succeeded
    on this process), and the GIL is released for a moment before returning.
    """
    if _OWNED["group"] and is_initialized():
        gc.collect()
        if wait:
            barrier()
        dist.destroy_process_group()
        time.sleep(0.05)  # let gloo's threads drop their last work objects while Python is alive
    _OWNED["group"] = False


def comm_device() -> torch.device:
    """Where collectives' tensors live: this process's GPU with NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here (a no-op when not distributed). Also waits for
    the collectives issued before it."""
    if world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        t = torch.zeros(1, device=comm_device())
        dist.all_reduce(t)
        t.item()  # the host waits for the collective (NCCL runs asynchronously)
    else:
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over processes of ``values`` (float64; unchanged when not distributed)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every process (decisions that depend on files, e.g. reuse a cache)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=comm_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def shard_bounds(n: int, align: int = 1, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Rows [lo, hi) of process ``rank_`` (default: this one) when ``n`` rows are split into
    contiguous shards. The rows are cut into blocks of ``align`` rows (the last may be
    shorter) and the blocks are spread as evenly as possible, in rank order; a shard may
    be empty when there are fewer blocks than processes."""
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    align = max(1, int(align))
    blocks = -(-int(n) // align)
    b0, b1 = blocks * r // w, blocks * (r + 1) // w
    return min(n, b0 * align), min(n, b1 * align)


def map_rows(fn: Callable[[Any], Any], rows, *, align: int = 1):
    """``fn`` over all rows, sharded across the processes of a distributed run.

    Args:
        fn: a row-wise computation. It receives ``rows[lo:hi]`` (a tensor, array or any
            sliceable object) or, when ``rows`` is an int n, a ``slice(lo, hi)`` of
            range(n). It returns a tensor or numpy array with one row per input row, or a
            tuple/list of them; other items of a tuple (None, a list of names) must be
            the same on every process and are passed through.
        rows: the rows, or their number.
        align: shard boundaries fall on multiples of ``align`` rows (use the batch size
            of ``fn`` so that each batch holds the same rows as in one process).

    Returns:
        what ``fn`` returns for all rows at once, on every process: row blocks gathered
        in rank order (``all_gather`` of shards padded to the longest). Not distributed,
        or inside another map_rows: ``fn`` of all rows, computed here.

    Every process must call map_rows (a collective). An exception in ``fn`` on any
    process is raised on every process.
    """
    n = rows if isinstance(rows, int) else len(rows)

    def take(lo: int, hi: int):
        return slice(lo, hi) if isinstance(rows, int) else rows[lo:hi]

    if world_size() == 1 or _IN_SHARD.get():
        return fn(take(0, n))
    lo, hi = shard_bounds(n, align)
    token = _IN_SHARD.set(True)
    error: BaseException | None = None
    local = None
    try:
        local = fn(take(lo, hi))
    except Exception as exc:  # every process must learn of it, or the others wait forever
        error = exc
    finally:
        _IN_SHARD.reset(token)
    failed = all_reduce_sum([1.0 if error is not None else 0.0])[0]
    if error is not None:
        raise error
    if failed:
        raise GradOSRError(f"{int(failed)} other process(es) of this distributed run failed; see their messages")
    return gather_rows(local)


# ---------------------------------------------------------------- gathering rows

_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
_MAX_DIMS = 8


def gather_rows(local):
    """All-gather the row blocks in ``local`` (a tensor, a numpy array, or a tuple/list
    mixing them with pass-through items) and concatenate them in rank order."""
    items = list(local) if isinstance(local, (tuple, list)) else [local]
    slots = [i for i, it in enumerate(items) if isinstance(it, (torch.Tensor, np.ndarray))]
    tensors = [_as_tensor(items[i]) for i in slots]
    meta = torch.zeros(max(1, len(tensors)), 3 + _MAX_DIMS, dtype=torch.int64)
    for j, t in enumerate(tensors):
        if t.ndim < 1 or t.ndim > _MAX_DIMS:
            raise ConfigError(f"map_rows results must have 1..{_MAX_DIMS} dimensions, got shape {tuple(t.shape)}")
        meta[j, 0], meta[j, 1], meta[j, 2] = t.shape[0], t.ndim, _DTYPES.index(t.dtype)
        meta[j, 3:3 + t.ndim - 1] = torch.tensor(t.shape[1:], dtype=torch.int64)
    dev, w = comm_device(), world_size()
    metas = [torch.empty_like(meta, device=dev) for _ in range(w)]
    dist.all_gather(metas, meta.to(dev))
    metas = [m.cpu() for m in metas]
    out = list(items)
    for j, i in enumerate(slots):
        counts = [int(m[j, 0]) for m in metas]
        ref = next((m for m in metas if int(m[j, 0]) > 0), metas[0])  # shape and dtype of a non-empty shard
        ndim, dtype = int(ref[j, 1]), _DTYPES[int(ref[j, 2])]
        trailing = tuple(int(d) for d in ref[j, 3:3 + ndim - 1])
        t = tensors[j]
        if t.shape[0] == 0:
            t = torch.zeros((0, *trailing), dtype=dtype)
        elif tuple(t.shape[1:]) != trailing or t.dtype != dtype:
            raise ConfigError(f"map_rows shards disagree: {tuple(t.shape)} {t.dtype} here, "
                              f"(*, {trailing}) {dtype} on another process")
        send_dtype = torch.uint8 if dtype == torch.bool else dtype
        longest = max(counts)
        buf = torch.zeros((longest, *trailing), dtype=send_dtype, device=dev)
        buf[:t.shape[0]] = t.to(device=dev, dtype=send_dtype)
        parts = [torch.empty_like(buf) for _ in range(w)]
        dist.all_gather(parts, buf)
        full = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(device=_home(items[i]), dtype=dtype)
        out[i] = full.numpy() if isinstance(items[i], np.ndarray) else full
    if isinstance(local, (tuple, list)):
        return type(local)(out) if isinstance(local, tuple) else out
    return out[0]


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        if x.dtype == object or x.dtype.kind in "USV":
            raise ConfigError(f"map_rows cannot gather numpy arrays of dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype not in _DTYPES:
        raise ConfigError(f"map_rows cannot gather tensors of dtype {t.dtype}")
    return t


def _home(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


# ---------------------------------------------------------------- training


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    """``(DistributedDataParallel(model), restore)`` for training in a distributed run.

    On CUDA, BatchNorm layers become ``SyncBatchNorm`` (statistics of the global batch),
    in place and sharing their parameters and buffers; ``restore()`` puts the original
    BatchNorm modules back (holding the trained values), so the model that is saved and
    returned is the plain one. On CPU (gloo) SyncBatchNorm is not supported by torch: each
    process normalises with its own shard's batch statistics, and the running statistics
    are rank 0's (DDP broadcasts buffers from rank 0 at every forward).
    """
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.parallel import DistributedDataParallel

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    if device.type == "cuda":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _BatchNorm) and not isinstance(child, torch.nn.SyncBatchNorm):
                    setattr(parent, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
                    swapped.append((parent, name, child))
    # Parameters with a dimension of size 1 (a 1-channel conv) may get gradients whose strides
    # differ from DDP's bucket views: harmless (DDP copies), but torch warns on every process.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def restore() -> None:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
        swapped.clear()

    return ddp, restore
