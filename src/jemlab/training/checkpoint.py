"""Checkpoints: one safetensors file per snapshot, no pickle anywhere.

A checkpoint holds every tensor of the run (model weights, optimizer moments, the replay buffer, RNG states)
in safetensors, and everything else (resolved config, progress counters, optimizer hyper-parameters) as JSON in
the safetensors header. Loading a checkpoint therefore never executes code from the file, whoever made it.

Layout of a run directory::

    run_dir/checkpoints/step-0001234.safetensors
    run_dir/checkpoints/latest            # text: the file name of the newest complete checkpoint

Files are written to a temporary name, flushed to disk and renamed, then `latest` is replaced the same way, so a
run killed at any moment leaves the previous checkpoint intact and `latest` pointing to a complete file.

The header also holds a SHA-256 digest of every tensor (name, dtype, shape and bytes, in name order). safetensors
itself only checks that the byte ranges fit the file, so a flipped bit in the weights (a bad disk, a damaged copy)
would otherwise load silently; with the digest it is a clear error. Checkpoints written before the digest existed
load without the check.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from jemlab import __version__
from jemlab.errors import CheckpointError

FORMAT_NAME = "jemlab-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest"
#: The state with the best tracked sample quality (training/quality.py), kept beside the step-*.safetensors files.
BEST_SAMPLES = "best-samples.safetensors"


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and raw bytes, in name order (hex)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


# --- flattening nested state into tensors + JSON -----------------------------------------------------------------


def flatten_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested dict/list into `tensors` (keyed by its path) and return a JSON-able tree
    in which each tensor is replaced by ``{"__tensor__": path}``. Dict keys keep their type (int or str)."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(state, Mapping):
        return {"__dict__": [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot store {type(state).__name__} at {prefix} in a checkpoint")


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            key = tree["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint is incomplete: tensor '{key}' is missing")
            return tensors[key]
        if "__dict__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree["__dict__"]}
        raise CheckpointError("checkpoint metadata is malformed (unexpected object)")
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


# --- writing ---------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write one checkpoint file atomically.

    Args:
        path: destination file (``.safetensors``).
        state: nested dict of tensors and plain values (model, optimizer, buffer, rng, …).
        meta: JSON-able metadata (config, progress, …).

    Returns:
        The path written.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tree = flatten_state(state, "s", tensors)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "jemlab_version": __version__,
        "state": json.dumps(tree),
        "meta": json.dumps(meta),
        "tensor_sha256": tensor_digest(tensors),
    }
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=header))
    return path


def save_run_checkpoint(
    run_dir: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 3
) -> Path:
    """Save ``run_dir/checkpoints/step-XXXXXXX.safetensors``, point `latest` at it, keep the newest `keep`."""
    folder = Path(run_dir) / "checkpoints"
    path = save_checkpoint(folder / f"step-{step:07d}.safetensors", state, meta)
    atomic_write_bytes(folder / LATEST, (path.name + "\n").encode())
    old = sorted(folder.glob("step-*.safetensors"))
    for stale in old[:-keep]:
        if stale.name != path.name:
            stale.unlink(missing_ok=True)
    return path


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files of writes that a killed run never finished (call it only when no other process
    writes into `folder`, e.g. on resume). Returns how many were removed."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


# --- reading ---------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint file, a run directory or its ``checkpoints`` folder; return the checkpoint file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    for folder in (path / "checkpoints", path):
        latest = folder / LATEST
        if latest.is_file():
            name = latest.read_text().strip()
            target = folder / name
            if "/" in name or not target.is_file():
                raise CheckpointError(
                    f"{latest} points to '{name}', which does not exist; pass a step-*.safetensors file instead"
                )
            return target
        found = sorted(folder.glob("step-*.safetensors"))
        if found:
            return found[-1]
    raise CheckpointError(f"{path}: no checkpoint found (expected checkpoints/latest or step-*.safetensors)")


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint` (on the CPU).

    Only safetensors is parsed; a pickle (``torch.save``) file or anything else is refused with a clear error and
    never unpickled.

    Returns:
        (state, meta) as given to `save_checkpoint`.
    """
    from safetensors import SafetensorError, safe_open

    path = resolve_checkpoint(path)
    with open(path, "rb") as f:
        head = f.read(16)
    # A safetensors file opens with its header length (8 bytes, little-endian) and the header's "{". Only files that
    # are not shaped like that are checked for pickle's signature, PROTO (0x80) and the protocol number 2-5, or
    # torch.save's zip archive: a header of 640, 896, 1,152 or 1,408 bytes also starts with 0x80 and 2-5.
    header_size = int.from_bytes(head[:8], "little")
    safetensors_like = head[8:9] == b"{" and 8 + header_size <= path.stat().st_size
    pickle_like = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if not safetensors_like and (pickle_like or head[:4] == b"PK\x03\x04"):
        raise CheckpointError(
            f"{path}: this is a pickle/torch.save file, which jemlab never loads because unpickling can run "
            f"arbitrary code; convert trusted weights to safetensors or retrain"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint ({err}); the file is truncated or corrupt, "
            f"use an earlier checkpoint from the same run"
        ) from None
    if header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: safetensors file without jemlab metadata; not a jemlab checkpoint")
    try:
        version = int(header.get("format_version", "0"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {header.get('format_version')} is not supported by jemlab "
            f"{__version__} (reads version {FORMAT_VERSION}); upgrade jemlab"
        )
    expected = header.get("tensor_sha256")
    if expected is not None and tensor_digest(tensors) != expected:
        raise CheckpointError(
            f"{path}: the checkpoint's tensors do not match their SHA-256 digest (the file was damaged after it was "
            f"written); use an earlier checkpoint from the same run"
        )
    try:
        state = unflatten_state(json.loads(header["state"]), tensors)
        meta = json.loads(header["meta"])
    except (KeyError, TypeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"{path}: checkpoint metadata is corrupt ({type(err).__name__}: {err}); use an earlier checkpoint"
        ) from None
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is corrupt (state and meta must be objects)")
    return state, meta
