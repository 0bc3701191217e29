"""Checks of user input that must fail up front, in one line, before any work.

Everything here raises :class:`~bkbench.errors.ConfigError` (exit code 2 from the CLI) with a
message that names the value (capped in length, so that a hostile value cannot flood the
terminal) and says what to do:

- :func:`load_config_file`: a YAML config file, read with its size capped, decoded strictly as
  UTF-8, parsed without anchors/aliases (a few bytes of nested aliases expand to gigabytes) and
  with a bounded nesting depth;
- :func:`check_config`: what ``BenchmarkConfig.validate`` does not cover by type alone: finite
  numbers, a safe run name, a seed in range, a device string that parses;
- :func:`check_device`, :func:`check_output_dir`, :func:`check_model_size`: the machine side,
  checked before the data is read and before the model is allocated.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20   # a config file is a few hundred bytes; a megabyte is generous
MAX_CONFIG_DEPTH = 8         # runs -> name -> field -> value is depth 3
MAX_ECHO = 80                # characters of a value echoed in a message
MAX_RUN_NAME = 100   # run names become file names
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,%d}" % (MAX_RUN_NAME - 1))
DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")
MAX_SEED = 2**32 - 1         # numpy's seed range; torch's generators take it as it is


def short(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that messages stay one short line."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"<a {type(value).__name__} too long to print>"
    if len(text) > limit:
        text = text[:limit - 15] + f"...<{len(text)} chars>"
    return text


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- YAML -----------------------------------------------------------------------------------

class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader without aliases and with a nesting limit."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"aliases (*{event.anchor}) are not allowed in a config file "
                                 f"(line {event.start_mark.line + 1}); write the values out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nesting deeper than {MAX_CONFIG_DEPTH} levels "
                                     f"(line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem or exc.context} at line {mark.line + 1}, column {mark.column + 1}"
    return str(exc)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping; ConfigError (one line) for anything else."""
    path = Path(path)
    name = short(str(path))
    if not path.exists():
        raise ConfigError(f"config file {name} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {name} is not a regular file (a folder?); give a .yaml file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {name} is {size} bytes, more than the "
                          f"{MAX_CONFIG_BYTES} a config file may have")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {name} cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {name} is not UTF-8 text (byte {exc.start}); "
                          "give a YAML file") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {name} is not valid YAML: "
                          f"{one_line(_yaml_problem(exc))[:200]}") from None
    except RecursionError:
        raise ConfigError(f"config file {name} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {name} must hold a mapping of config fields, "
                          f"not a {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"config file {name}: field names must be strings, got {short(key)}")
    runs = data.get("runs")
    if runs is not None:
        if not isinstance(runs, dict) or not runs:
            raise ConfigError(f"config file {name}: 'runs' must map run names to settings, "
                              f"got {short(runs)}")
        for run, values in runs.items():
            if not isinstance(run, str):
                raise ConfigError(f"config file {name}: run names must be strings, got {short(run)}")
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"config file {name}: run {short(run)} must map config fields "
                                  f"to values, got {short(values)}")
    return data


# --- config values --------------------------------------------------------------------------

def check_run_name(name: Any) -> None:
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"model_name {short(name)} must be 1-100 characters of letters, digits and _ . + - "
            "starting with a letter or digit (it names files)")


def check_config(config) -> None:
    """Checks beyond the field types: finite numbers, seed and device strings, n_seq >= 2."""
    for field, value in config.to_dict().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{field} must be a finite number, got {value}")
    if not isinstance(config.seed, int) or not 0 <= config.seed <= MAX_SEED:
        raise ConfigError(f"seed must be in [0, {MAX_SEED}], got {short(config.seed)}")
    if not isinstance(config.device, str) or not DEVICE.fullmatch(config.device):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got "
                          f"{short(config.device)}")
    if config.n_seq < 2:
        raise ConfigError(f"n_seq must be at least 2 (a context of one token has no earlier "
                          f"position to audit), got {config.n_seq}")


def check_device(name: str) -> None:
    """The device exists on this machine (before any data is read)."""
    import torch
    if not name.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device {short(name)} requested but CUDA is not available here; use "
                          "--device cpu (or auto)")
    if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"device {short(name)} requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")


def check_output_dir(path: str | Path) -> Path:
    """Prove that the output folder can be created and written in, creating nothing: a probe
    file if it exists, else the permissions of its nearest existing parent."""
    if str(path) == "":
        raise ConfigError("--output-dir is empty; give a folder")
    path = Path(path)
    name = short(str(path))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output folder {name}: {short(str(existing))} is a file, not a folder")
    try:
        if existing == path:
            fd, probe = tempfile.mkstemp(prefix=".bkbench_write_test_", dir=path)
            os.close(fd)
            os.unlink(probe)
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ConfigError(f"output folder {name} is not writable ({exc.strerror}); choose "
                          "another --output-dir") from None
    return path


def nonempty_path(text: str) -> Path:
    """argparse type of a folder option: an empty string is not the current folder."""
    import argparse
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder")
    return Path(text)


def _available_bytes(device) -> int | None:
    import torch
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_size(config, vocab_size: int, device) -> int:
    """Refuse, before anything is allocated, a run whose weights, gradients and AdamW moments
    (16 bytes per float32 parameter) and largest activation cannot fit in the device's
    memory, or whose FLOP budget is below one training forward (so below one step). The model
    with its flags is sized on the meta device (:mod:`bkbench.size_estimate`): every size-like
    setting of every model and flag reaches these numbers. Returns the parameter count."""
    from .size_estimate import estimate
    size = estimate(config, vocab_size)
    params, activation = size.parameters, size.largest_tensor_bytes
    need = 16 * params + activation
    available = _available_bytes(device)
    if available is not None and need > available:
        raise ConfigError(
            f"{config.model_name}: {params:,} parameters need at least {16 * params / 2**30:.1f} "
            f"GiB for weights, gradients and optimizer state and its largest activation "
            f"{activation / 2**30:.1f} GiB, together more than the {available / 2**30:.1f} GiB "
            f"of {device}; lower the model's or its flags' sizes (d_model, n_layers, batch sizes, "
            "chunk, factor or dim settings)")
    budget = config.budget_flops
    if budget is not None and size.forward_flops is not None and budget < size.forward_flops:
        raise ConfigError(
            f"{config.model_name}: budget_flops ({budget:.3g}) is less than one training "
            f"forward ({size.forward_flops:.3g} counted FLOPs), so less than one step; raise it")
    return params


def _given_setting_names(values: dict[str, Any]) -> list[str]:
    """The flat names (``koopman_dim``) of the flag settings a config mapping sets, flat or
    under ``flag_settings``."""
    names = list(values)
    for short, settings in (values.get("flag_settings") or {}).items():
        if isinstance(settings, dict):
            names += [f"{short}_{k}" for k in settings]
    return names


def check_settings_have_their_flags(given: dict[str, Any], configs) -> None:
    """Refuse a flag setting given for runs none of which has its flag on: it would change
    nothing (``--koopman-dim 0`` without ``--use-koopman`` trained the plain model)."""
    from .flags.registry import settings_fields
    fields = settings_fields()
    for name in _given_setting_names(given):
        if name not in fields:
            continue   # not a flag setting (unknown names are refused by the config)
        flag = fields[name][0].name
        if not any(getattr(c, flag) for c in configs):
            runs = ", ".join(c.model_name for c in configs)
            raise ConfigError(
                f"{name} is a setting of {flag}, which is off in every run here ({short(runs)}); "
                f"add --{flag.replace('_', '-')} or leave {name} out")


def check_selection_pool(config, windows: int) -> None:
    """Refuse active learning whose candidate pool per round (batch_size x every / fraction
    windows) is larger than the training split's ``windows``: it failed at the first step.
    Called with the checks made before any work, not by the Trainer (a scale point trains on
    a one-batch split and selects nothing)."""
    if not config.use_active_learning:
        return
    from .flags.registry import settings_of
    pool = settings_of(config, "use_active_learning").pool_batches() * config.batch_size
    if pool > windows:
        raise ConfigError(
            f"{config.model_name}: active learning scores a pool of {pool} windows per round "
            f"but the training split has {windows}; raise active_learning_fraction or lower "
            "active_learning_every")
