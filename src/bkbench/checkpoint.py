"""Training checkpoints: complete, atomic, verified, the last K kept.

A checkpoint is a directory ``step_<N>/`` holding

- ``model.safetensors``       the weights being trained;
- ``best_model.safetensors``  the best-validation weights so far (when there are any);
- ``state.pt``                optimizer, scheduler, RNG states, progress, metrics, config;
- ``manifest.json``           sha256 and size of each file above, written last.

It is assembled in a temporary directory, every file fsynced, then renamed into place, so a
kill at any moment leaves either no new checkpoint or a whole one. A checkpoint whose
manifest is missing or whose files do not match it is reported and skipped in favour of the
previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor] | None
    state: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights) and non-contiguous tensors
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def save_checkpoint(directory: Path, step: int, model_state: dict[str, torch.Tensor],
                    best_model_state: dict[str, torch.Tensor] | None, state: dict[str, Any],
                    keep: int) -> tuple[Path, int]:
    """Write checkpoint ``step`` and keep the newest ``keep``; return (its path, its bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_step_", dir=directory))
    try:
        save_file(_contiguous_cpu(model_state), str(tmp / "model.safetensors"))
        if best_model_state is not None:
            save_file(_contiguous_cpu(best_model_state), str(tmp / "best_model.safetensors"))
        torch.save(state, tmp / "state.pt")
        manifest = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            manifest[f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
        with open(tmp / MANIFEST, "w") as fh:
            json.dump({"step": step, "files": manifest}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # the same step saved twice (e.g. epoch end and signal): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final, sum(meta["bytes"] for meta in manifest.values())


def remove_checkpoints(directory: Path) -> int:
    """Delete every checkpoint (and temporary leftover) in ``directory``; return how many."""
    removed = 0
    if directory.is_dir():
        for path in directory.iterdir():
            if path.is_dir() and (path.name.startswith("step_") or path.name.startswith(".tmp_step_")):
                shutil.rmtree(path)
                removed += 1
    return removed


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, oldest first (temporary leftovers excluded)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path) -> None:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt or truncated)")


def load_checkpoint(path: Path) -> Checkpoint:
    verify_checkpoint(path)
    best = path / "best_model.safetensors"
    return Checkpoint(
        path=path,
        model=load_file(str(path / "model.safetensors")),
        best_model=load_file(str(best)) if best.is_file() else None,
        state=torch.load(path / "state.pt", map_location="cpu", weights_only=False),
    )


def load_latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except (CheckpointError, OSError, RuntimeError, EOFError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
    return None
