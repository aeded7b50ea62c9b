"""Data parallelism over ``torch.distributed``: the process group, DDP around the trainable
deltas, each rank's slice of the global batch, sharded evaluation, rank-0-only side effects.

Started by ``torchrun --nproc_per_node N -m continual run ...`` (or ``accelerate launch``), which
set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; one process
(no such variables) runs exactly as before, every function here being then a no-op.

Why an N-process run gives the numbers of a 1-process run with the same global batch:

- every rank draws the *same* global batch (same seed, same sampler) and trains on its contiguous
  slice of it, so the N slices are exactly the 1-process batch;
- the local loss is the *sum* over the slice's labelled positions divided by (global count / N),
  and DDP averages gradients over the N ranks, so the all-reduced gradient is the gradient of the
  global batch's mean loss (also for token losses, where slices hold unequal label counts);
- DDP wraps the model only for the parameters that train (the active delta and head; the frozen
  backbone is in DDP's ignore list: never broadcast, never all-reduced), all ranks get the same
  all-reduced gradients, so their weights stay bit-identical and every decision taken from them
  (early stopping, carried-over scores) is the same on every rank;
- evaluation scores each rank's contiguous shard of a split and gathers the per-example
  predictions in rank order before computing any metric, i.e. the metric of the whole split.

What differs is float summation order (the slices are smaller GEMMs; the all-reduce adds N partial
gradients), so trained weights agree to float rounding, not bit for bit, with the 1-process run.
Dropout draws each rank's masks from its own RNG: the equality needs ``TrainConfig(dropout=False)``.

A backbone too large for one device: :func:`shard_backbone` shards its blocks with FSDP2; the
deltas stay replicated under DDP; every process then scores whole splits in step (docs/distributed.md).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

# A collective that waits longer than this is a stuck peer, not slow work: fail instead of hanging.
# Long by default because one rank may wait on another's legitimate work (rank 0 writing a fine-tuned
# backbone, a slow tracking server); CONTINUAL_COLLECTIVE_TIMEOUT (seconds) sets it. Ranks started
# differently no longer wait on it (check_same refuses them first), and a crashed rank makes
# torchrun stop the others.
TIMEOUT_ENV = "CONTINUAL_COLLECTIVE_TIMEOUT"


def collective_timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


def is_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a collective that gave up waiting for the other processes."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and env_world_size() > 1 and ("timed out" in text or "timeout" in text)


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun / accelerate (1 when started as one plain process)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files, logs to MLflow and prints."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group the launcher described in the environment (NCCL for CUDA devices,
    gloo on CPU). Returns True when this call created it; a no-op for one process."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=collective_timeout())
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same(identity: dict[str, Any], what: str) -> None:
    """Refuse, on every rank at once, ranks started with different ``identity`` (e.g. ``--lr`` or
    ``--steps`` given to one node only): they would train different models under one all-reduce,
    or deadlock on unequal step counts. Names the ranks and the keys that differ."""
    if not active():
        return
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, identity)
    bad = [r for r, p in enumerate(parts) if p != parts[0]]
    if not bad:
        return
    keys = set()
    for r in bad:
        for k in sorted(set(parts[0]) | set(parts[r])):
            a, b = parts[0].get(k), parts[r].get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                keys |= {f"{k}.{s}" for s in set(a) | set(b) if a.get(s) != b.get(s)}
            elif a != b:
                keys.add(k)
    raise ValueError(f"the {world_size()} processes were not started with the same {what}: rank(s) "
                     f"{', '.join(map(str, bad))} differ from rank 0 in {', '.join(sorted(keys))}; start every "
                     "process with the same command and data")


def gather_lists(items: Sequence[Any], loader: Any = None) -> list[Any]:
    """Every rank's ``items`` concatenated in rank order (each rank's shard is contiguous, so
    this restores the split's order). Given the ``loader`` the items came from: ``items`` as they
    are unless it is a shard (:func:`shard_loader`)."""
    if not active() or (loader is not None and getattr(loader, "shard_of", None) is None):
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a scalar tensor (identical on every rank)."""
    if not active():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def wrap(model: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel for what trains now; unchanged in one process.

    Only parameters with ``requires_grad`` are DDP's: everything else (the frozen backbone, frozen
    tasks, buffers) goes on DDP's ignore list, so a 7B backbone is never broadcast nor bucketed.
    Rank 0's trainable values are broadcast once (they are equal anyway: every rank seeds the
    same way). ``find_unused``: some trainable parameters get no gradient in a step (joint
    training activates one task per step); DDP then leaves those gradients None on every rank, as
    one process would, at the cost of one walk over the autograd graph per step."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ignore = [n for n, _ in model.named_parameters() if n not in trainable] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused)


def shard_backbone(model: Any) -> list[torch.nn.Module]:
    """Shard every transformer block of ``model``'s frozen backbone across the processes (FSDP2
    ``fully_shard``, one unit per block; each process keeps 1/N of the block weights, gathered for
    the block's forward and backward and freed again). The embeddings, the LM head and every
    task's delta and head stay replicated: the deltas train under :func:`wrap`'s DDP, which
    ignores every frozen parameter, sharded ones included. Returns the blocks sharded.

    Call it once, before any task is added, with the model on its device."""
    if not active():
        return []
    from adapters.targets import block_paths
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(p.requires_grad for p in model.backbone.parameters()):
        raise ValueError("sharding the backbone is for a frozen backbone; this one has trainable weights")
    from adapters import backbone_fingerprint

    # the weights never change (frozen): the fingerprint taken now stays true, and checkpoints
    # read it without gathering the shards (which only rank 0 would do: a hang)
    model.backbone._fingerprint_before_sharding = backbone_fingerprint(model.backbone)
    mesh = init_device_mesh(model.device.type, (world_size(),))
    blocks = [model.backbone.get_submodule(path) for path in block_paths(model.backbone)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return blocks


def local_slice(batch: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of a global batch, its labels, and the loss denominator
    (labelled positions of the *global* batch / N; see the module's docstring).

    A rank left with no rows (a last partial batch smaller than N) gets one row whose labels are
    all ignored: it still joins DDP's all-reduce, contributing a zero gradient."""
    count = (labels != -100).sum().clamp(min=1).to(torch.float32)
    if not active():
        return batch, labels, count
    n, r = world_size(), rank()
    rows = torch.arange(len(labels)).tensor_split(n)[r]
    if len(rows) == 0:
        rows = torch.zeros(1, dtype=torch.long)
        local_labels = torch.full_like(labels[:1], -100)
    else:
        local_labels = labels[rows.to(labels.device)]
    rows = rows.to(labels.device)
    return {k: v[rows] for k, v in batch.items()}, local_labels, count / n


def check_batch(batch_size: int) -> None:
    """Refuse a global batch that leaves some rank with nothing to train on every step."""
    if active() and batch_size < world_size():
        raise ValueError(f"batch size {batch_size} is smaller than the {world_size()} processes: each step gives every "
                         "process a slice of the global batch; use a batch size of at least the number of processes")


def local_parameters(modules: Sequence[torch.nn.Module]) -> tuple[int, int]:
    """(parameters this process holds, parameters of the modules): shards count their local part."""
    params = [p for m in modules for p in m.parameters()]
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params), sum(p.numel() for p in params)


def backbone_sharded(model: Any) -> bool:
    return getattr(model.backbone, "_fingerprint_before_sharding", None) is not None


def shard_loader(loader: Any, model: Any) -> Any:
    """The loader over this rank's contiguous shard of its data set (same batch size, collation
    and, for a generative loader, the whole set's metric and answer length); ``loader`` itself in
    one process, and when ``model``'s backbone is sharded: every forward pass then gathers block
    weights from all processes, so all must run the same batches (and the same number of
    generation steps), each scoring the whole split."""
    if not active() or backbone_sharded(model) or getattr(loader, "shard_of", None) is not None:
        return loader
    dataset = loader.dataset
    n, r = world_size(), rank()
    bounds = torch.arange(len(dataset)).tensor_split(n)[r]
    shard = dataset.select(bounds.tolist())
    if getattr(loader, "generative", False):
        part = loader.subset(shard)
    else:
        part = DataLoader(shard, batch_size=loader.batch_size, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
    part.shard_of = (r, n)  # sharding it again is a no-op
    return part
