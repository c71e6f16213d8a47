"""Training the editor on several processes: torchrun, DistributedDataParallel, and what the trainer needs around it.

``torchrun --nproc_per_node=N -m run ...`` (and multi-node rendezvous) starts N copies of ``run.py``; each reads
its rank from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). :func:`init` joins the process group
(nccl on GPUs, gloo on CPUs); a plain ``python -m run`` has no such variables and stays a single process with no
process group, no DDP and no collective call anywhere.

How the pieces fit (the trainer does the calls):

* The base model is frozen and replicated (each rank loads it); the editor is wrapped in
  ``DistributedDataParallel`` through :class:`EditStep`, an ``nn.Module`` whose ``forward`` is the editor's
  ``meta_loss`` (the edit and the losses of the edited model, ``meta_loss.StepLosses``). The gradient flows through
  ``editor.edit()``, not ``editor.forward``, so the editor itself cannot be the DDP module; :class:`EditStep`
  holds it as its only submodule, so DDP sees exactly the editor's parameters.
* Batches: rank r takes steps r, r+W, r+2W, ... of the seeded training stream (:func:`rank_stream`), so a
  step of W processes consumes the same W batches a single process would draw in W steps. A step is one batch,
  or a sequence of ``batches_per_step`` consecutive ones, grouped before they are dealt out: each rank trains on
  whole sequences, those a single process would train.
* ``accumulate_bs`` counts edits per optimiser step over all ranks (the paper's batch of 10 stays 10 on any
  number of GPUs): each rank accumulates ``accumulate_bs / W`` steps under ``no_sync`` and DDP averages on the
  last one. Each rank scales its loss by ``W / accumulate_bs`` so the average equals the single-process sum.
* An editor's data statistics (``running_statistics()``, e.g. an input normalisation) are buffers updated during
  the edit (like BatchNorm's): DDP's buffer broadcast would keep only rank 0's, so it is off and
  :func:`merge_running_stats` combines every rank's new samples after each step (Chan's parallel update): all ranks
  then hold the statistics a single process would hold after the same batches. Within one step each rank normalises
  with the statistics before the step plus its own batch, where a single process would also include the batches of
  the lower ranks; that is the one difference from a single-process run (none for an editor without such
  statistics, see tests/test_distributed.py).
* Decisions that end or skip work (a non-finite loss, a stop signal, a failed checkpoint write) are agreed by
  all ranks with one small all-reduce, so no rank waits forever in a collective that another one left.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from errors import ConfigError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. The default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV = DistEnv()
_COMM_DEVICE = torch.device("cpu")  # where the small tensors of agreement all-reduces live (cuda for nccl)


def env() -> DistEnv:
    return _ENV


def launched_rank() -> int:
    """The rank torchrun gave this process (0 when not launched by torchrun); readable before :func:`init`."""
    return int(os.environ.get("RANK", "0"))


def init(cfg, device: torch.device) -> DistEnv:
    """Join the process group when launched by torchrun with more than one process; else stay single."""
    global _ENV, _COMM_DEVICE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _ENV = DistEnv()
        return _ENV
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            f"dist.backend=nccl needs CUDA devices, but this run uses device={cfg.device!r} ({device}). "
            f"Use dist.backend=gloo (or auto) for CPU processes."
        )
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        _COMM_DEVICE = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=cfg.dist.timeout_minutes))
    _ENV = DistEnv(rank=rank, world_size=world, local_rank=local_rank)
    if rank != 0:  # only rank 0 logs; the others report warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    LOG.info("Distributed: %d processes, backend %s.", world, backend)
    return _ENV


def shutdown(wait: bool = False) -> None:
    """Leave the process group (if any). ``wait``: first wait until every rank is here, so that no rank closes its
    connections while another still uses them; only where every rank is known to arrive (not on an error path)."""
    global _ENV
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
    _ENV = DistEnv()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this rank's own GPU (``LOCAL_RANK``) in a distributed run."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def local_main_first():
    """The block runs on each node's local rank 0 first (building caches), then on the other ranks (reading them)."""
    if not _ENV.enabled:
        yield
        return
    if _ENV.local_rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if _ENV.local_rank == 0:
            dist.barrier()


# -- agreement and small collectives ---------------------------------------------------------------------------


def max_int(value: int) -> int:
    """The largest ``value`` over all ranks (identity in a single process)."""
    if not _ENV.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_COMM_DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (identity in a single process)."""
    return bool(max_int(1 if flag else 0))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _ENV.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _ENV.enabled:
        return [obj]
    out: List[Any] = [None] * _ENV.world_size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's."""
    if not _ENV.enabled:
        return
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type != _COMM_DEVICE.type:
            tmp = t.detach().to(_COMM_DEVICE)
            dist.broadcast(tmp, src=0)
            t.copy_(tmp)
        else:
            dist.broadcast(t.data, src=0)


@torch.no_grad()
def mean_gradients(named_params: Iterable) -> Dict[str, torch.Tensor]:
    """The gradients accumulated so far, all-reduced over ranks and divided by the world size.

    What a resume point stores mid-accumulation: in a single process it is the gradient itself. Rank 0 of a
    resumed run takes it back times its own world size (the others start from zero), which gives the same average
    at the next synchronisation, also with another number of processes.
    """
    named = list(named_params)
    if not _ENV.enabled:
        return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}
    if not any_rank(any(p.grad is not None for _, p in named)):
        return {}
    out = {}
    for n, p in named:
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        out[n] = g / _ENV.world_size
    return out


# -- data -----------------------------------------------------------------------------------------------------


def rank_stream(steps: Iterator[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Steps rank, rank+W, rank+2W, ... of a stream of steps (batches, or lists of them; the other ranks' steps are
    skipped)."""
    return itertools.islice(steps, rank, None, world_size)


# -- the DDP module -------------------------------------------------------------------------------------------


class EditStep(nn.Module):
    """The editor's training step as a module, so that DistributedDataParallel can wrap it.

    ``forward(*args)`` returns ``editor.meta_loss(*args)`` (``meta_loss.StepLosses``, holding the loss); the editor
    is the only submodule, so DDP's parameters are exactly the editor's (the base model sits outside the editor's
    module tree).
    """

    def __init__(self, editor: nn.Module):
        super().__init__()
        self.editor = editor

    def forward(self, *args, **kwargs):
        return self.editor.meta_loss(*args, **kwargs)


def wrap(editor: nn.Module, device: torch.device):
    """DDP over the editor's parameters. Buffers are not broadcast at each forward: :func:`merge_running_stats`."""
    return DistributedDataParallel(
        EditStep(editor),
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # the start is synced (rank 0's editor everywhere); the statistics are merged
    )


# -- running statistics ---------------------------------------------------------------------------------------


def stats_snapshot(editor) -> Dict[str, tuple]:
    """The editor's running statistics (``running_statistics()``) before a step: what every rank holds in common."""
    if not _ENV.enabled:
        return {}
    return {n: (m.count.clone(), m.mean.clone(), m.m2.clone()) for n, m in editor.running_statistics().items()}


@torch.no_grad()
def merge_running_stats(editor, before: Dict[str, tuple]) -> None:
    """Combine the samples every rank added to its statistics since ``before`` (Chan et al.'s parallel update).

    Each rank's own new samples are recovered from its statistics and the common ones before the step, in float64;
    the result is the same on all ranks and equal (up to rounding) to a single process's after the same batches.
    """
    if not _ENV.enabled or not before:
        return
    for name, m in editor.running_statistics().items():
        c0, mean0, m20 = (t.double() for t in before[name])
        c, mean, m2 = m.count.double(), m.mean.double(), m.m2.double()
        n = c - c0  # this rank's new samples
        if n.item() > 0:
            new_mean = (c * mean - c0 * mean0) / n
            new_m2 = m2 - m20 - (new_mean - mean0) ** 2 * (c0 * n / c)
        else:
            new_mean, new_m2 = torch.zeros_like(mean), torch.zeros_like(m2)
        packed = torch.cat([n.reshape(1), new_mean * n, new_m2]).to(_COMM_DEVICE)
        parts = [torch.empty_like(packed) for _ in range(_ENV.world_size)]
        dist.all_gather(parts, packed)
        total_c, total_mean, total_m2 = c0.clone(), mean0.clone(), m20.clone()
        for part in parts:  # fold each rank's new samples into the common statistics, in rank order
            part = part.to(mean.device)
            k = part[0]
            if k.item() == 0:
                continue
            k_mean, k_m2 = part[1 : 1 + mean.numel()] / k, part[1 + mean.numel() :]
            merged = total_c + k
            delta = k_mean - total_mean
            total_mean = total_mean + delta * (k / merged)
            total_m2 = total_m2 + k_m2 + delta**2 * (total_c * k / merged)
            total_c = merged
        m.count.copy_(total_c.to(m.count.dtype))
        m.mean.copy_(total_mean.to(m.mean.dtype))
        m.m2.copy_(total_m2.to(m.m2.dtype))


def check_world_size(cfg, world_size: int) -> None:
    """``accumulate_bs`` is split evenly over the processes."""
    if world_size > 1 and cfg.accumulate_bs % world_size:
        lower = max(world_size, cfg.accumulate_bs // world_size * world_size)
        raise ConfigError(
            f"accumulate_bs={cfg.accumulate_bs} edits per optimiser step cannot be split over {world_size} "
            f"processes: it must be a multiple of the number of processes (e.g. accumulate_bs={lower} or "
            f"accumulate_bs={lower + world_size})."
        )


def per_rank_loss_scale(cfg, world_size: int) -> float:
    """Loss scale on each rank so that DDP's average over ranks equals the single-process accumulated gradient."""
    return world_size / cfg.accumulate_bs


def optional_no_sync(ddp, sync: bool):
    return contextlib.nullcontext() if sync or ddp is None else ddp.no_sync()


def per_rank(values: Optional[List[Any]], rank: int, fallback: Any) -> Any:
    """``values[rank]`` when ``values`` holds one entry per rank of this job, else ``fallback``."""
    if values and len(values) == _ENV.world_size:
        return values[rank]
    return fallback
