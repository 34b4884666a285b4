"""Atomic checkpoints, loaded safely, with the exact RNG state (seed 002, DESIGN.md sections 3-4).

Writing: the state goes to a temporary file in the checkpoint's own directory (same file
system, so the rename is atomic), is flushed and fsynced, then ``os.replace``d onto the
final name, and the directory is fsynced so the rename itself survives a power loss. A
process killed at any moment leaves either the previous checkpoint or the new one at the
final path, never a truncated file.

Reading: ``torch.load(..., weights_only=True)``: a checkpoint may come from anywhere and
must not run code (DESIGN.md section 4). Everything saved must therefore be tensors, numbers,
strings, None and lists/tuples/dicts of them; ``rng_state`` converts numpy's state accordingly.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, corrupt, or refused by safe loading; names the file."""


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def _fsync_dir(directory: Path) -> None:
    # POSIX only: Windows cannot open a directory for fsync (and its rename is already durable enough).
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (see the module docstring); returns the path.

    Stale temporary files of this same checkpoint name (left by a process killed mid-write)
    are removed first. One writer per path is assumed (rank 0 under DDP).
    """
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint({path}): state must be a dict, got {type(state).__name__}")
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(_tmp_prefix(path) + "*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=_tmp_prefix(path), suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Any interruption (an error, KeyboardInterrupt, TerminationRequested): drop the partial
        # temp file and re-raise; the previous checkpoint at `path` is untouched.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return path


def _weights_only_reason(exc: pickle.UnpicklingError) -> str | None:
    """The culprit torch names after "WeightsUnpickler error:" (same line or the next ones), or
    None when the error does not come from the weights_only unpickler."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker not in text:
        return None
    reason = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    return " ".join(reason.split()) or "no reason given"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` with ``weights_only=True``.

    ``mmap``: map the tensors instead of reading them (to look at a few plain entries cheaply).

    Raises ``CheckpointError`` naming the file when it is missing, truncated/corrupt, holds
    objects that safe loading refuses (arbitrary classes), or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(exc)
        if reason is None:
            raise CheckpointError(f"{path}: not a torch checkpoint (corrupt, or not written by torch.save)") from exc
        if reason.startswith("Unsupported operand"):
            # An opcode the safe unpickler does not know: a plain pickle (protocol 4+), or garbage.
            raise CheckpointError(
                f"{path}: refused by weights_only loading ({reason}): not a file torch.save wrote, or a corrupt one"
            ) from exc
        raise CheckpointError(
            f"{path}: holds objects that are not tensors or plain data; refused by weights_only loading "
            f"(torch.load weights_only=True): {reason.split('. Please use')[0]}. A checkpoint may only hold "
            "tensors, numbers, strings and lists/tuples/dicts of them; loading arbitrary objects could run "
            "code from the file."
        ) from exc
    except EOFError as exc:
        raise CheckpointError(f"{path}: empty or truncated checkpoint file") from exc
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot be loaded (truncated or corrupt file, or an unusable map_location): {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of states, found {type(state).__name__}")
    return state


def rng_state() -> dict[str, Any]:
    """Python ``random``, numpy's global RNG, torch CPU and (when present) CUDA generator states.

    All values are weights_only-loadable: numpy's uint32 key array becomes an int64 tensor.
    Generators a data pipeline creates itself (``np.random.default_rng(seed)``, DataLoader
    workers) are not global and must be re-created from their seeds.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next float or None)
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by ``rng_state`` (CUDA ones only where CUDA is present)."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda_states = state.get("cuda")
    if cuda_states:
        if not torch.cuda.is_available():
            warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available: not restored", stacklevel=2)
        else:
            n = min(len(cuda_states), torch.cuda.device_count())
            for i in range(n):
                torch.cuda.set_rng_state(cuda_states[i].cpu(), device=i)
