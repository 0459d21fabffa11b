"""What `adm convert-weights --arch / --config` say, read without torch.

--arch names presets or registry entries; --config is a JSON or TOML table of guided-diffusion's
flag names (flat, or [unet] / [classifier] tables), as OpenAI's scripts take them. Reading them
needs no checkpoint, so a misspelt name or a broken file is refused before torch is imported and
before gigabytes are read.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import PRESETS, AnyConfig, ClassifierConfig, UNetConfig, config_from_dict
from .errors import ConfigError, ConfigInputError, ConversionError, RegistryError, UsageError
from .formats import check_format
from .metadata import STORED_DTYPES
from .registry import Entry, Registry, load_registry

# The flag names a flags table may use for the architecture: both configs' fields, OpenAI's
# super-resolution name for image_size (config.py reads it as one), the table keys of a config
# with two networks, and the two diffusion flags config.py refuses when they are set.
MODEL_FLAGS = frozenset({f.name for c in (UNetConfig, ClassifierConfig) for f in dataclasses.fields(c)}
                        | {"large_size", "kind", "unet", "classifier", "predict_xstart", "rescale_timesteps"})
# Flags of guided-diffusion's scripts that are not architecture (sampling and training arguments,
# fp16 and checkpointing switches): a flag file saved from those scripts holds them, and they are
# ignored. Named here because some are near a model flag ('classifier_path' is 0.9 alike to
# 'classifier_depth') and must not be taken for its misspelling.
SCRIPT_FLAGS = frozenset({
    "anneal_lr", "base_samples", "batch_size", "classifier_path", "classifier_scale", "classifier_use_fp16",
    "clip_denoised", "data_dir", "ema_rate", "eval_interval", "fp16_scale_growth", "iterations", "log_interval",
    "lr", "lr_anneal_steps", "microbatch", "model_path", "noised", "num_samples", "rescale_learned_sigmas",
    "resume_checkpoint", "save_interval", "schedule_sampler", "timestep_respacing", "use_checkpoint", "use_ddim",
    "use_fp16", "use_kl", "val_data_dir", "weight_decay",
})
# How alike (difflib's ratio) an unknown key must be to a model flag to be refused as its misspelling:
# one or two letters off in a name of ten or more ('noise_scheduel', 'use_new_attention_orders').
TYPO_CUTOFF = 0.85


def check_flag_names(data: Mapping[str, Any], where: str) -> None:
    """Refuse a key that is no known flag but nearly one: config.py ignores unknown keys (flag
    files hold other arguments too), so a misspelt model flag would silently keep its default
    and the file would be converted as another architecture. Looks into [unet] / [classifier]."""
    for key in data:
        name = str(key).replace("-", "_")  # config.py reads "noise-schedule" as noise_schedule
        if name in MODEL_FLAGS or name in SCRIPT_FLAGS:
            continue
        # lowercased: config.py matches names exactly, so "Image_Size" is as lost as a typo
        close = difflib.get_close_matches(name.lower(), sorted(MODEL_FLAGS), n=1, cutoff=TYPO_CUTOFF)
        if close:
            raise ConfigInputError(f"unknown flag {str(key)!r} in {where} (did you mean {close[0]!r}?)")
    for role in ("unet", "classifier"):
        if isinstance(data.get(role), Mapping):
            check_flag_names(data[role], f"{where} [{role}]")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """JSON or TOML with guided-diffusion flag names (flat, or with [unet] / [classifier] tables)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # a checkpoint (or another binary file) given as --config
        raise ConfigInputError(f"{path.name} is not a JSON or TOML config (not UTF-8 text)") from None
    except OSError as exc:
        raise ConfigInputError(f"cannot read config {path}: {exc.strerror or exc}") from None
    is_toml = path.suffix.lower() == ".toml"
    try:
        data = tomllib.loads(text) if is_toml else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigInputError(f"{path.name} is not valid {'TOML' if is_toml else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigInputError(f"{path.name}: expected a table of flags")
    check_flag_names(data, path.name)
    return data


def _configs_from_flags(data: Mapping[str, Any], roles: Sequence[str]) -> dict[str, AnyConfig]:
    """Per-role configs from a flags table. A flat table serves every network in the file (as
    OpenAI's scripts take one flag set for the U-Net and its classifier)."""
    if any(isinstance(data.get(r), Mapping) for r in ("unet", "classifier")):
        return {r: config_from_dict({**data[r], "kind": r}) for r in ("unet", "classifier") if r in data}
    if "kind" in data:
        cfg = config_from_dict(data)
        return {"classifier" if isinstance(cfg, ClassifierConfig) else "unet": cfg}
    out: dict[str, AnyConfig] = {}
    for role in roles:
        if role == "classifier":
            if not any(str(k).startswith("classifier_") for k in data):
                raise ConfigError("the config has no classifier_* flags but the file holds a classifier")
            out[role] = ClassifierConfig.from_flags(data)
        else:
            out[role] = UNetConfig.from_flags(data)
    return out


def arch_configs(arch: str | Sequence[str] | None, registry: Registry) -> dict[str, tuple[AnyConfig, str | None]]:
    """{role: (config, preset)} for ``--arch`` names: presets, or registry names (all their roles)."""
    out: dict[str, tuple[AnyConfig, str | None]] = {}
    for name in [arch] if isinstance(arch, str) else list(arch or ()):
        if name in PRESETS:
            cfg = PRESETS[name]
            found = {"classifier" if isinstance(cfg, ClassifierConfig) else "unet": (cfg, name)}
        else:
            entry = _arch_entry(name, registry)
            found = {r: (entry.config_for(r), entry.roles[r]) for r in entry.roles}
        for role, pair in found.items():
            if role in out:
                raise ConfigInputError(f"--arch names two {role} architectures")
            out[role] = pair
    return out


def config_configs(config: Any, roles: Sequence[str]) -> dict[str, AnyConfig]:
    """{role: config} from ``--config``: a config object, a flags mapping, or a JSON/TOML file."""
    if config is None:
        return {}
    if isinstance(config, (UNetConfig, ClassifierConfig)):
        return {"classifier" if isinstance(config, ClassifierConfig) else "unet": config}
    data = config if isinstance(config, Mapping) else load_config_file(config)
    return _configs_from_flags(data, roles)


def _arch_entry(name: str, registry: Registry) -> Entry:
    try:
        entry = registry.get(name)
    except RegistryError:
        close = difflib.get_close_matches(name, list(dict.fromkeys([*PRESETS, *registry.names()])), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(PRESETS)}"
        raise ConfigInputError(f"--arch {name!r} is neither a preset nor a registry name{hint}") from None
    if any(cfg is None for cfg in entry.configs.values()):
        raise ConfigInputError(f"--arch {name}: a bundled file, whose architecture is in the file, not the registry")
    return entry


def conversion_args(src: Path, arch: str | Sequence[str] | None, config: Any, dtype: str,
                    registry: Registry | None = None) -> tuple[dict[str, tuple[AnyConfig, str | None]], Any]:
    """The checks of a conversion that need no checkpoint read: the dtype, that ``src`` is a
    file, the --arch names and the --config table. Returns ({role: (config, preset)} from
    --arch, the --config as a checked flags mapping or config object, or None)."""
    if dtype not in STORED_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(STORED_DTYPES)}, got {dtype!r}")
    if not Path(src).is_file():
        raise ConversionError(f"checkpoint not found: {src}")
    chosen = arch_configs(arch, registry or load_registry())
    if isinstance(config, Mapping):
        check_flag_names(config, "the given config")
    elif config is not None and not isinstance(config, (UNetConfig, ClassifierConfig)):
        config = load_config_file(config)
    check_format(src)  # an HTML page or a Git LFS pointer is told apart before torch reads it
    return chosen, config
