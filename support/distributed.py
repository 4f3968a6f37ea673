"""Columns of per-unit numbers in data-parallel runs: column() checks and converts one to numpy,
gather() all-gathers columns whose length differs from rank to rank, all_reduce_sum() sums counts
over ranks. Without torch.distributed the collectives are the identity on one process's numbers."""
import numpy as np
import torch


class GatherError(ValueError):
    pass


def column(x, dtype, name, error=GatherError):
    """x (a tensor, array or list) as a 1-D numpy array of dtype, refused in one line naming it (an
    integer dtype takes whole numbers only)."""
    if torch.is_tensor(x):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise error(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if dtype == np.int64 and x.dtype.kind not in "iu" and x.size:
        fractional = np.mod(x, 1) != 0
        if fractional.any():
            raise error(f"{name} must be integers, got {x.dtype} values such as {x[fractional][0]}")
    return x.astype(dtype)


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _device():
    """Where collectives run: the current GPU under nccl, the CPU otherwise."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(x, counts, device):
    """x [..., n] from every rank, rank-major along the last axis: padded to the longest rank,
    gathered, cut back to each rank's count."""
    t = torch.from_numpy(x)
    buf = torch.zeros(*t.shape[:-1], max(counts), dtype=t.dtype, device=device)
    buf[..., :t.shape[-1]] = t.to(device)
    outs = [torch.empty_like(buf) for _ in counts]
    torch.distributed.all_gather(outs, buf)
    return np.concatenate([o[..., :c].cpu().numpy() for o, c in zip(outs, counts)], axis=-1)


def gather(values, *columns):
    """All-gather units from every rank, rank-major: (values as float64 -- one row [U] or several
    [m, U], e.g. losses and context gains --, each integer column as int64, offsets); rank r's
    units are offsets[r]:offsets[r + 1]. Three collectives whatever the number of columns."""
    if torch.is_tensor(values):
        v = values.detach().cpu().double().numpy()
    else:
        v = np.asarray(values, np.float64)
    if v.ndim not in (1, 2):
        raise GatherError(f"gather: values must be 1-D or 2-D, got shape {tuple(v.shape)}")
    n = v.shape[-1]
    ints = [column(c, np.int64, f"gather: column {i + 1}") for i, c in enumerate(columns)]
    if any(len(c) != n for c in ints):
        raise GatherError(f"gather: every column needs one value per unit ({n} units)")
    ints = np.stack(ints) if ints else np.zeros((0, n), dtype=np.int64)
    if not _distributed():
        return (v.copy(), *ints.copy(), np.array([0, n]))
    device = _device()
    world = torch.distributed.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    torch.distributed.all_gather(counts, torch.tensor([n], dtype=torch.int64, device=device))
    counts = [int(c) for c in counts]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return (_all_gather(v, counts, device), *_all_gather(ints, counts, device), offsets)


def all_reduce_sum(*counts):
    """Integers (e.g. an optimizer step's units and tokens) summed over ranks."""
    if not _distributed():
        return tuple(int(c) for c in counts)
    t = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(t)
    return tuple(int(c) for c in t.tolist())
