"""Several processes with torch.distributed: DDP launched by torchrun (DESIGN.md section 4).

One process per GPU (or several CPU processes), started by ``torchrun``, which sets the
environment read here: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``. Without those variables (or with ``WORLD_SIZE=1``) nothing here
initializes anything and every helper answers as for a single process (rank 0 of 1), so
the trainer's single-process path runs no collective at all.

Rules the trainer follows so that N processes behave as one process with N times the batch:
- every rank runs the same collectives in the same order (the helpers below are collectives
  unless said otherwise); decisions that could differ per rank (a non-finite loss, a
  SIGTERM, the time budget) are agreed on with ``agree`` before anyone acts on them;
- rank 0 alone writes files and prints (``is_main``, ``main_only``);
- a collective that fails (a peer died, the network broke) or waits longer than
  ``dist.timeout_s`` raises; ``collective_failures_as`` turns that into one clear error that
  names this rank and the timeout, instead of a hang or a bare backend message.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, Callable, ParamSpec, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from onestage.config import DistConfig

P = ParamSpec("P")
R = TypeVar("R")

_timeout: dict[str, float] = {}  # dist.timeout_s of the group init_distributed set up, for messages


class DistributedError(RuntimeError):
    """The process group could not be set up, or a collective failed; names the rank and the timeout."""


# --------------------------------------------------------------------------- who am I
def launched_distributed() -> bool:
    """True when a launcher (torchrun) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """A process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK): its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the process that writes checkpoints, logs and plots and shows progress."""
    return rank() == 0


def main_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """``fn`` run on rank 0 only (returns None on the other ranks); not a collective."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


# --------------------------------------------------------------------------- setup
def resolve_backend(cfg: DistConfig) -> str:
    """``auto``: NCCL when CUDA is available (one GPU per process), gloo on CPU."""
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: DistConfig) -> bool:
    """Join the process group torchrun's environment describes; False (nothing done) in one process.

    ``cfg.timeout_s`` bounds the rendezvous and every later collective: a rank that died or
    hangs makes the others fail with a ``DistributedError`` after at most that long.
    """
    if not launched_distributed() or dist.is_initialized():
        return dist.is_initialized()
    backend = resolve_backend(cfg)
    rank_, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError("dist.backend: nccl needs CUDA GPUs; use gloo (or auto) on CPU")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
    except (dist.DistError, RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"rank {rank_} of {world}: joining the process group ({backend}) at {where} failed within "
            f"dist.timeout_s = {cfg.timeout_s:g} s: {exc}. Check that every process was started "
            "(torchrun --nnodes/--nproc_per_node), that MASTER_ADDR/--rdzv_endpoint names a reachable "
            "host and port, and that no firewall blocks it."
        ) from exc
    _timeout["s"] = cfg.timeout_s
    return True


def cleanup() -> None:
    """Leave the process group (no-op when none is up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _timeout.clear()


_COLLECTIVE_WORDS = ("gloo", "nccl", "processgroup", "pair closure", "connection closed", "connection reset", "timed out")


def _is_collective_failure(exc: BaseException) -> bool:
    # torch raises DistError subclasses for NCCL and the store; gloo raises plain RuntimeErrors,
    # most carrying gloo's source path ("Connection closed by peer", "Timed out ..."), but not
    # all: DDP's buffer broadcast in forward reports a stalled peer as just "Application
    # timeout caused pair closure".
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in _COLLECTIVE_WORDS)


@contextlib.contextmanager
def collective_failures_as(error_type: type[Exception]) -> Iterator[None]:
    """Re-raise a failed collective as ``error_type`` with a message naming rank and timeout.

    Only failures of collectives are converted (see ``_is_collective_failure``); any other
    error passes through unchanged. No-op in a single process.
    """
    if not is_distributed():
        yield
        return
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        if not _is_collective_failure(exc):
            raise
        raise error_type(
            f"rank {rank()} of {world_size()}: a collective operation failed ({type(exc).__name__}) - another "
            f"process probably died or stalled ({_timeout_text()}). Look for the first "
            f"error in the other ranks' logs. Backend message: {exc}"
        ) from exc


def _timeout_text() -> str:
    return f"dist.timeout_s = {_timeout['s']:g} s" if "s" in _timeout else "the process group's timeout"


# --------------------------------------------------------------------------- collectives
def _uses_nccl() -> bool:
    return is_distributed() and dist.get_backend() == "nccl"


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo works on CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if _uses_nccl() else torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; autograd-free). Single process: ``t`` itself."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def mean_over_ranks(values: dict[str, Tensor]) -> dict[str, float]:
    """The mean over ranks of each scalar, in one collective (for logging losses).

    A NaN/inf on any rank makes the mean non-finite on every rank, so all ranks skip the same
    step. Single process: the values themselves, as floats.
    """
    if not values:
        return {}
    stacked = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values.values()])
    if is_distributed():
        stacked = all_reduce_sum(stacked.to(_comm_device())) / world_size()
    return dict(zip(values, stacked.tolist()))


def positives_across_ranks(num_pos: Tensor) -> Tensor:
    """For the SSD loss: the N that this rank divides its loss sums by under DDP.

    DDP averages gradients over W ranks, so with rank r's loss ``S_r / N_eff`` the gradient is
    ``(1/W) sum_r grad S_r / N_eff``; the single-process loss of the whole global batch is
    ``(sum_r S_r) / N`` with ``N = max(1, sum_r n_r)``. Equal for ``N_eff = N / W``, which is
    what this returns (an all-reduce of the positive counts). The returned value carries no
    gradient: N is a count.
    """
    total = all_reduce_sum(num_pos.detach().to(torch.float64).to(_comm_device()))
    return (total.clamp(min=1) / world_size()).to(device=num_pos.device, dtype=num_pos.dtype)


def agree(any_flag: bool, from_main: Sequence[float] = ()) -> tuple[bool, list[float]]:
    """One collective: (whether ANY rank raised its flag, rank 0's values).

    For decisions every rank must take together: a SIGTERM seen by some ranks only, and the
    time budget (rank 0's clock decides). Single process: the inputs unchanged.
    """
    if not is_distributed():
        return any_flag, [float(v) for v in from_main]
    mine = [float(v) if is_main() else 0.0 for v in from_main]
    t = torch.tensor([float(any_flag), *mine], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    values = t.tolist()
    return values[0] > 0, values[1:]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable) as a list indexed by rank, on rank 0; None elsewhere."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable). Single process: ``obj``."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=_comm_device() if _uses_nccl() else None)
    return box[0]


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    With plain BatchNorm each rank updates its running statistics from its own images; DDP
    syncs them only at the start of the next forward. Syncing after each optimizer step keeps
    what the EMA averages, what each rank evaluates with and what rank 0 saves the same.
    """
    if not is_distributed():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for buf in model.buffers():
        groups.setdefault((buf.dtype, buf.device), []).append(buf)
    with torch.no_grad():
        for bufs in groups.values():  # one broadcast per dtype, not one per tiny tensor
            flat = torch.cat([b.reshape(-1) for b in bufs])
            dist.broadcast(flat, src=0)
            chunks = flat.split([b.numel() for b in bufs])
            torch._foreach_copy_(bufs, [chunk.view_as(b) for chunk, b in zip(chunks, bufs)])


# --------------------------------------------------------------------------- model wrapping
def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (rank 0's weights and buffers are broadcast to all).

    Single process: ``model`` itself. Keep the bare model for the EMA, evaluation and
    checkpoints; use the wrapper only for the training forward.
    """
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(wrapped: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` for a micro-batch that does not end an accumulation cycle."""
    if skip_sync and isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch normalization with statistics over every rank; backward as PyTorch's SyncBatchNorm.

    Forward: mean and biased variance of the global batch from all-reduced per-channel sums
    (two passes: the variance sums squared deviations, no cancellation). Backward: the fused
    formula ``dx = invstd * w * (dy - mean(dy) - xhat * mean(dy * xhat))`` with both means
    over the global batch (one all-reduce), so that rank r receives d(sum of all ranks'
    losses)/dx_r, as on GPUs. ``grad_weight``/``grad_bias`` are this rank's (DDP averages).
    Per-channel sums accumulate in float64, as PyTorch's CPU BatchNorm does; elementwise work
    stays in the input's precision (fp32 at least).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        xf = x if x.dtype == torch.float64 else x.float()
        acc = torch.float64
        sums = torch.cat([xf.sum(dims, dtype=acc), torch.tensor([x.numel() / channels], dtype=acc, device=x.device)])
        dist.all_reduce(sums)  # per-channel sums and the element count over all ranks
        count = sums[-1]
        mean = sums[:channels] / count
        centered = xf - mean.to(xf.dtype).view(shape)
        var = centered.square().sum(dims, dtype=acc)
        dist.all_reduce(var)
        var = var / count
        invstd = torch.rsqrt(var + eps)
        xhat = centered * invstd.to(xf.dtype).view(shape)
        out = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count, ctx.in_dtype = count, x.dtype
        unbiased = var * (count / (count - 1).clamp(min=1))  # for the running variance, as BatchNorm
        ctx.mark_non_differentiable(mean, unbiased)
        return out.to(x.dtype), mean, unbiased

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _mean: Tensor, _unbiased: Tensor) -> tuple[Tensor | None, ...]:
        xhat, invstd, weight = ctx.saved_tensors
        channels = xhat.shape[1]
        dims = [0, *range(2, xhat.dim())]
        shape = [1, channels] + [1] * (xhat.dim() - 2)
        dy = grad_out.to(xhat.dtype)
        acc = torch.float64
        local = torch.cat([dy.sum(dims, dtype=acc), (dy * xhat).sum(dims, dtype=acc)])  # sum(dy), sum(dy * xhat)
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight, grad_bias = local[channels:].to(weight.dtype), local[:channels].to(weight.dtype)
        total = local.clone()
        dist.all_reduce(total)
        mean_dy, mean_dy_xhat = (total / ctx.count).to(xhat.dtype).split(channels)
        scale = invstd if weight is None else invstd * weight.to(acc)
        grad_x = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * scale.to(xhat.dtype).view(shape)
        return grad_x.to(ctx.in_dtype), grad_weight, grad_bias, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover every rank's images, on CPU (gloo).

    PyTorch's ``nn.SyncBatchNorm`` has GPU kernels only (and DDP refuses it in a CPU module);
    this does the same computation with CPU tensors and gloo (``_SyncBatchNormFn``). Running
    statistics are updated as BatchNorm does (unbiased variance; ``momentum`` or, when None, a
    cumulative average). Eval mode and a single process use plain BatchNorm. Same parameters
    and buffers as ``nn.BatchNorm2d``, so checkpoints load into the unconverted model.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        out, mean, unbiased_var = _SyncBatchNormFn.apply(input, self.weight, self.bias, self.eps)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)
        return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``model`` synchronized over the ranks (in place where possible).

    GPUs: PyTorch's ``nn.SyncBatchNorm``; CPU: ``CPUSyncBatchNorm``. Parameters and buffers
    are the same objects, so an optimizer built afterwards sees the same tensors, and the
    state_dict keys do not change.
    """
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, CPUSyncBatchNorm):
        sync = CPUSyncBatchNorm(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats)
        if model.affine:
            sync.weight, sync.bias = model.weight, model.bias
        sync.running_mean, sync.running_var = model.running_mean, model.running_var
        sync.num_batches_tracked = model.num_batches_tracked
        sync.train(model.training)
        return sync
    for name, child in model.named_children():
        model.add_module(name, convert_sync_batchnorm(child, device))
    return model
