"""Data-parallel training on several processes: torch's launcher, its process group, who writes.

Two ways in, one run:

* ``imgcls train ... --nproc N`` (``TrainConfig.nproc``) starts N workers on this machine through
  torch's elastic launcher (``torch.distributed.launcher.elastic_launch``, what ``torchrun
  --standalone`` runs); each worker runs :func:`imgcls.train.run` and rank 0's result comes back.
* ``torchrun [--nnodes ... --rdzv-...] --nproc-per-node N -m imgcls.cli train ...``: torchrun
  starts the workers itself; they find ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment.

Inside a worker, :func:`process_group` joins the group (nccl with one GPU per local rank, gloo on
CPUs).  Every rank prepares the same data and model (same seed); the epoch loop wraps the model in
``DistributedDataParallel`` and shards each epoch with ``DistributedSampler``; the features strategy
shards its extraction and gathers the features on rank 0.  Only rank 0 writes the run directory;
the others wait at barriers and leave once fitting is done (rank 0 alone exports and scores).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from ..errors import UserError
from ..system import available_cpus, resolve_device

log = logging.getLogger("imgcls")

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}  # device type -> process-group backend
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
WORKER = "imgcls.train.worker"  # the module each launched process runs (nothing imports it: no circle)
# a collective waits this long for the slowest rank (rank 0 writes checkpoints between epochs)
TIMEOUT = timedelta(hours=2)
# the launcher's own loggers: their lines about a worker's failure repeat what imgcls reports in one line
LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")


# --------------------------------------------------------------------------- where am I


def launched() -> bool:
    """True in a worker started by torchrun or :func:`launch` (the launcher's variables are set)."""
    return all(name in os.environ for name in LAUNCHER_ENV)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def cpu_share() -> int:
    """The CPUs one worker of this machine may keep busy (its intra-op threads)."""
    return max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


# --------------------------------------------------------------------------- launching


def launch(cfg, resume: bool, progress: bool):
    """Run ``cfg`` on ``cfg.nproc`` worker processes of this machine; rank 0's TrainResult.

    The workers are ``python -m imgcls.train.worker``, started as torchrun starts a module, so a
    script that calls ``imgcls.train(..., nproc=N)`` is not imported again by them.  A UserError in
    any worker is raised here with its message; the launcher stops the others."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .. import rundir
    from .session import TrainResult

    device = resolve_device(cfg.device)
    check(cfg, device, cfg.nproc)  # before any process starts
    if device.type == "cuda" and cfg.nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {cfg.nproc} asks for one process per GPU, but {torch.cuda.device_count()} GPU(s)"
                        f" are visible; use --nproc {torch.cuda.device_count()} or fewer")
    # as torchrun --standalone: a rendezvous on a free local port, no restarts
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    log.info("data-parallel: %d processes (torch.distributed, %s backend)", cfg.nproc,
             BACKENDS.get(device.type, "gloo"))
    args = ["-m", WORKER, json.dumps(cfg.to_dict()), json.dumps(logger_levels())]
    args += ["--resume"] * resume + ["--progress"] * progress
    saved = {name: logging.getLogger(name).level for name in LAUNCHER_LOGGERS}
    for name in LAUNCHER_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as err:
        raise _child_error(err) from None
    except SignalException as err:
        log.warning("training interrupted (%s); the last checkpoint is kept: imgcls train --resume %s",
                    err.sigval.name, cfg.out)
        raise KeyboardInterrupt from None
    finally:
        for name, value in saved.items():
            logging.getLogger(name).setLevel(value)
    run_dir = Path(cfg.out)
    return TrainResult(run_dir, rundir.read_json(run_dir / rundir.SUMMARY))


def logger_levels() -> dict[str, int]:
    """The levels this process's loggers were given (the command line's -v/-q, exporters kept quiet)."""
    named = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
             if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET}
    return {"": logging.root.level, **named}


def _child_error(err) -> Exception:
    """The first failed worker's error: a UserError keeps its message; anything else its traceback."""
    failed_rank, failure = err.get_first_failure()
    message = failure.message
    text = message.get("message", "") if isinstance(message, dict) else str(message or "")
    prefix = "UserError: "
    if text.startswith(prefix):
        return UserError(text[len(prefix):])
    trace = message.get("extraInfo", {}).get("py_callstack", "") if isinstance(message, dict) else ""
    return RuntimeError(f"training process {failed_rank} failed (exit code {failure.exitcode}): {text}\n{trace}")


@contextmanager
def process_group(device_name: str):
    """Join the launcher's process group for the length of a run; nothing when not launched."""
    if not launched() or active():
        yield
        return
    kind = resolve_device(device_name).type
    if kind == "cuda":
        torch.cuda.set_device(local_rank())
    else:
        torch.set_num_threads(cpu_share())  # N workers on one machine share its cores
    dist.init_process_group(BACKENDS.get(kind, "gloo"), timeout=TIMEOUT)
    if not is_main():  # the same lines from every rank are noise: rank 0 speaks for the run
        logging.getLogger("imgcls").setLevel(logging.ERROR)
    try:
        yield
    finally:
        dist.destroy_process_group()


def place(device: torch.device) -> torch.device:
    """A worker's device: its local rank's GPU under a multi-process CUDA run, else ``device``."""
    if active() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def check(cfg, device: torch.device, n: int | None = None) -> None:
    """What a run on ``n`` processes (default: this run's) cannot do, as UserErrors (before any data is read)."""
    n = world() if n is None else n
    if n > 1 and cfg.batch_size % n:
        raise UserError(f"--batch-size {cfg.batch_size} is the batch of all {n} processes together and must split"
                        f" evenly between them; use a multiple of {n}")
    if cfg.sync_bn and n > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs (torch's SyncBatchNorm syncs CUDA tensors only); on CPUs drop it,"
                        " or use --norm group, which does not depend on the batch")


# --------------------------------------------------------------------------- collectives


def barrier() -> None:
    if active():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any of them (a stop request)."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_sum(*values: float) -> list[float]:
    """Sums over the ranks of a few numbers (loss sums, counts)."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(make):
    """``make()`` on rank 0, its result sent to every rank (one export instead of one per rank)."""
    if not active():
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int) -> np.ndarray:
    """This rank's block of ``range(n)``: contiguous, so the blocks in rank order are ``range(n)``."""
    return np.array_split(np.arange(n), world())[rank()]


def gather_rows(*arrays: np.ndarray) -> list[np.ndarray] | None:
    """Rank 0: each array concatenated over the ranks in rank order; the others: None."""
    if not active():
        return list(arrays)
    parts = [None] * world() if is_main() else None
    dist.gather_object(arrays, parts, dst=0)
    if not is_main():
        return None
    return [np.concatenate([p[k] for p in parts if len(p[k])] or [arrays[k]]) for k in range(len(arrays))]


def all_gather_rows(*arrays: np.ndarray) -> list[np.ndarray]:
    """Every rank: each array concatenated over the ranks in rank order."""
    if not active():
        return list(arrays)
    parts = [None] * world()
    dist.all_gather_object(parts, arrays)
    return [np.concatenate([p[k] for p in parts if len(p[k])] or [arrays[k]]) for k in range(len(arrays))]


def _collective_device() -> torch.device:
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


# --------------------------------------------------------------------------- the model and the data


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` under DistributedDataParallel on several processes, else itself.

    DDP syncs the parameters that require grad when it is built, so a run that freezes or unfreezes
    the backbone wraps again at each change (the wrap also broadcasts rank 0's weights)."""
    if world() < 2:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """``--sync-bn``: BatchNorm statistics over the batch of every process (same state-dict keys)."""
    if world() < 2:
        log.info("--sync-bn: one process, nothing to sync")
        return net
    log.info("--sync-bn: BatchNorm layers use the statistics of all %d processes' batches", world())
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)


def epoch_order(dataset, seed: int, epoch: int, draws: list[int] | None = None, *, rank_: int | None = None,
                world_: int | None = None) -> list[int]:
    """This rank's share of an epoch: a permutation seeded by ``(seed, epoch)`` (DistributedSampler
    with ``set_epoch``), or of ``draws``, an epoch's class-balanced draws, drawn alike on every rank.

    Rank r takes every N-th row from r on, so the ranks' k-th batches of ``B / N`` rows together are
    the k-th batch of ``B`` rows of one process: a run on N processes sees the same batches as one
    process with the same ``--batch-size``.  ``rank_``/``world_``: default this process's."""
    source = dataset if draws is None else range(len(draws))
    sampler = DistributedSampler(source, num_replicas=world() if world_ is None else world_,
                                 rank=rank() if rank_ is None else rank_, shuffle=draws is None, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return order if draws is None else [draws[i] for i in order]
