"""Training checkpoints: complete, atomic, verified, the last K kept.

A checkpoint is a directory ``step_<N>/`` holding

- ``model.safetensors``       the weights being trained;
- ``best_model.safetensors``  the best-validation weights so far (when there are any);
- ``state.pt``                optimizer, scheduler, RNG states, progress, metrics, config:
                              tensors and plain Python values only, loaded with
                              ``torch.load(weights_only=True)``, so a tampered file cannot run
                              code (it fails to load and is skipped like a corrupt one);
- ``manifest.json``           the step, and sha256 and size of each file above, written last.

It is assembled in a temporary directory, every file fsynced, then renamed into place, so a
kill at any moment leaves either no new checkpoint or a whole one. A checkpoint whose
manifest is missing, malformed or lists other files than the checkpoint holds, or whose files
do not match it, is reported and skipped in favour of the previous one. After a checkpoint is
written, the older ones beyond the newest ``keep`` that verify are deleted; the one just
written is never deleted, and one that fails verification never counts as kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.safetensors", "state.pt")
OPTIONAL_FILES = ("best_model.safetensors",)
STATE_KEYS = {"optimizer", "scheduler", "rng", "progress", "config"}
_STEP_DIR = re.compile(r"step_(\d{9,})")


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
    _prune(directory, final, step, keep)
    return final, sum(meta["bytes"] for meta in manifest.values())


def _prune(directory: Path, written: Path, step: int, keep: int) -> None:
    """Keep ``written`` and the newest ``keep - 1`` older checkpoints that verify; delete the
    rest: older verified ones beyond the window, and any that fail verification or belong to
    steps after ``step`` (left by a run that was resumed from an earlier checkpoint)."""
    kept = 1
    for path in reversed(list_checkpoints(directory)):
        if path == written:
            continue
        other = _step_of(path)
        reason = None
        if other is None or other > step:
            reason = "it is of a later step than this run's (an abandoned continuation)"
        elif kept >= keep:
            reason = None  # plainly beyond the window
        else:
            try:
                verify_checkpoint(path)
            except CheckpointError as exc:
                reason = f"it does not verify ({exc})"
            else:
                kept += 1
                continue
        if reason is not None:
            log.warning("deleting checkpoint %s: %s", path, reason)
        shutil.rmtree(path, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


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


def _manifest_problem(manifest: Any, path: Path) -> str | None:
    if not isinstance(manifest, dict) or set(manifest) != {"step", "files"}:
        return "manifest is not a mapping of exactly 'step' and 'files'"
    step = manifest["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step != _step_of(path):
        return f"manifest step {str(step)[:20]!r} does not match the folder name"
    files = manifest["files"]
    if not isinstance(files, dict):
        return "manifest 'files' is not a mapping"
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    expected = set(REQUIRED_FILES) | (present & set(OPTIONAL_FILES))
    if set(files) != expected or present != expected:
        return (f"manifest lists {sorted(files)[:5]}, the folder holds {sorted(present)[:5]}, "
                f"a checkpoint has {list(REQUIRED_FILES)} (+ {list(OPTIONAL_FILES)})")
    for name, meta in files.items():
        if (not isinstance(meta, dict) or set(meta) != {"sha256", "bytes"}
                or not isinstance(meta["sha256"], str) or not isinstance(meta["bytes"], int)):
            return f"manifest entry of {name} is not {{'sha256': str, 'bytes': int}}"
    return None


def verify_checkpoint(path: Path) -> None:
    """CheckpointError unless the manifest is well-formed and every file matches it."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        if manifest_path.stat().st_size > 1 << 16:
            raise CheckpointError(f"{path}: {MANIFEST} is implausibly large")
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({type(exc).__name__})") from None
    problem = _manifest_problem(manifest, path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt or truncated)")


def load_checkpoint(path: Path) -> Checkpoint:
    verify_checkpoint(path)
    best = path / "best_model.safetensors"
    try:
        model = load_file(str(path / "model.safetensors"))
        best_model = load_file(str(best)) if best.is_file() else None
        # weights_only: tensors and plain containers only; a pickle that would build any other
        # object (and so could run code) is refused
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- whatever the file holds, it is not a checkpoint
        raise CheckpointError(f"{path}: cannot be loaded safely "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
                              ) from None
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        raise CheckpointError(f"{path}: state.pt does not hold a mapping with {sorted(STATE_KEYS)}")
    return Checkpoint(path=path, model=model, best_model=best_model, state=state)


def load_latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except (CheckpointError, OSError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
    return None
