"""The registry of published ADM files (``weights.toml``) as frozen dataclasses.

``load_registry()`` reads the packaged ``weights.toml`` (or the file named by ``ADM_REGISTRY``,
which replaces it: tests and private mirrors use that). Every entry is validated on load, so a
typo in the file fails at once with the entry's name, not later in a download or a conversion.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .config import AnyConfig, ClassifierConfig, UNetConfig, config_from_dict, get_preset
from .errors import ConfigError, RegistryError, UnknownModelError, UsageError
from .settings import SAMPLER_NAMES

PACKAGE_DIR = Path(__file__).resolve().parent  # bundled entries' `path` is relative to it
DEFAULT_REGISTRY = PACKAGE_DIR / "weights.toml"
PUBLISHERS = ("openai", "mmagic", "bundled")
ROLES = ("unet", "classifier")
_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_KEYS = {
    "publisher", "urls", "path", "sha256", "size", "params", "roles", "resolution", "class_cond",
    "num_classes", "noise_schedule", "classifier", "guidance", "sampler", "steps", "default",
    "upsampler_base", "description",
}


@dataclass(frozen=True, eq=False)
class Entry:
    """One published file. ``roles`` maps each network in it ("unet", "classifier") to its
    preset name, or None when the architecture is inline (``config_for``) or in the file."""

    name: str
    publisher: str
    filename: str
    urls: tuple[str, ...]
    sha256: str | None
    size: int | None
    params: int | None
    roles: Mapping[str, str | None]
    resolution: int
    class_cond: bool
    num_classes: int | None
    noise_schedule: str | None
    classifier: str | None
    guidance: float | None
    sampler: str | None
    steps: int | None
    upsampler_base: int | None
    default: bool
    path: str | None
    description: str
    configs: Mapping[str, AnyConfig | None] = field(repr=False, default_factory=dict)

    @property
    def bundled(self) -> bool:
        return self.publisher == "bundled"

    @property
    def kind(self) -> str:
        """'diffusion', 'upsampler', 'classifier' or 'diffusion+classifier' (for tables)."""
        if set(self.roles) == {"classifier"}:
            return "classifier"
        base = "upsampler" if self.upsampler_base else "diffusion"
        return f"{base}+classifier" if "classifier" in self.roles else base

    def role(self, role: str = "unet") -> str:
        """The role name to use: ``role`` itself, or the only network of a one-network entry
        when asked for the default "unet" (a classifier file holds nothing else)."""
        if role in self.roles:
            return role
        if role == "unet" and len(self.roles) == 1:
            return next(iter(self.roles))
        raise UnknownModelError(f"{self.name} holds {' and '.join(self.roles)}, not a {role}")

    def config_for(self, role: str) -> AnyConfig | None:
        """The architecture of ``role``; None: read it from the (bundled) file's metadata."""
        return self.configs[self.role(role)]

    def bundled_path(self) -> Path | None:
        return PACKAGE_DIR / self.path if self.path else None


@dataclass(frozen=True, eq=False)
class Registry:
    entries: tuple[Entry, ...]
    source: Path

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def get(self, name: str) -> Entry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `adm models` lists them"
        raise UnknownModelError(f"unknown model {name!r}{hint}")

    def default_for(self, resolution: int) -> Entry:
        for entry in self.entries:
            if entry.default and entry.resolution == resolution:
                return entry
        valid = sorted({e.resolution for e in self.entries if e.default})
        raise UnknownModelError(
            f"no default model for resolution {resolution}; choose one of {', '.join(map(str, valid))}")

    def upsample_pair(self, resolution: int | None) -> tuple[Entry, Entry]:
        """(base model, upsampler) of the paper's two-stage pipeline to ``resolution`` (ADM-G at
        the upsampler's input size, then ADM-U): what ``--res N --upsample`` uses."""
        ups = sorted((e for e in self.entries if e.upsampler_base), key=lambda e: e.resolution)
        up = next((e for e in ups if e.resolution == resolution), None)
        if up is None:
            sizes = " or ".join(dict.fromkeys(f"--res {e.resolution} ({e.upsampler_base} -> {e.resolution})"
                                              for e in ups))
            raise UsageError(f"--upsample needs {sizes}" if ups else "no upsampler in the registry")
        return self.default_for(up.upsampler_base), up

    def by_filename(self, filename: str) -> Entry | None:
        return next((e for e in self.entries if e.filename == filename), None)

    def by_sha256(self, digest: str) -> Entry | None:
        """The entry whose published sha256 (or prefix) ``digest`` satisfies."""
        return next((e for e in self.entries if e.sha256 and digest.lower().startswith(e.sha256)), None)


def registry_path() -> Path:
    return Path(os.environ.get("ADM_REGISTRY") or DEFAULT_REGISTRY)


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry from ``path``, else ``ADM_REGISTRY``, else the packaged weights.toml."""
    path = Path(path) if path else registry_path()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as exc:
        raise RegistryError(f"cannot read the registry {path}: {exc.strerror or exc}") from None
    return _load_cached(str(path), stamp)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, _stamp: int) -> Registry:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"cannot read the registry {path}: {exc}") from None
    entries = tuple(_parse_entry(name, table) for name, table in data.items())
    registry = Registry(entries, Path(path))
    _check_links(registry)
    return registry


def _parse_entry(name: str, t: Any) -> Entry:
    def bad(message: str) -> RegistryError:
        return RegistryError(f"registry entry {name!r}: {message}")

    if not isinstance(t, dict):
        raise bad("expected a table")
    unknown = sorted(set(t) - _KEYS)
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}")
    publisher = t.get("publisher")
    if publisher not in PUBLISHERS:
        raise bad(f"publisher must be one of {', '.join(PUBLISHERS)}, got {publisher!r}")
    urls = _parse_urls(t.get("urls", []), bad)
    path = t.get("path")
    if path is not None and not isinstance(path, str):
        raise bad(f"path must be a string, got {path!r}")
    if publisher == "bundled":
        if urls or not path:
            raise bad("a bundled entry has a `path` and no `urls`")
    elif not urls or path:
        raise bad("a published entry has `urls` and no `path`")
    sha = t.get("sha256")
    if sha is not None and not _HEX.match(sha := str(sha).lower()):
        raise bad(f"sha256 must be 8 to 64 lowercase hex digits, got {sha!r}")
    roles, configs = _parse_roles(t.get("roles"), publisher, bad)
    sampler = t.get("sampler")
    if sampler is not None and sampler not in SAMPLER_NAMES:
        raise bad(f"sampler must be one of {', '.join(SAMPLER_NAMES)}, got {sampler!r}")
    schedule = t.get("noise_schedule")
    _check_schedule(schedule, configs, publisher, bad)
    class_cond = _opt_bool(t, "class_cond", bad)
    classifier = t.get("classifier")
    if classifier is not None and not isinstance(classifier, str):
        raise bad(f"classifier must be a registry name, got {classifier!r}")
    needs_classes = class_cond or "classifier" in roles or classifier
    num_classes = _opt_int(t, "num_classes", bad, positive=True)
    return Entry(
        name=name, publisher=publisher, filename=(path or urls[0]).rstrip("/").rsplit("/", 1)[-1],
        urls=urls, sha256=sha, size=_opt_int(t, "size", bad), params=_opt_int(t, "params", bad),
        roles=MappingProxyType(roles),
        resolution=_opt_int(t, "resolution", bad, positive=True) or _derive_res(configs, bad),
        class_cond=class_cond, num_classes=1000 if num_classes is None and needs_classes else num_classes,
        noise_schedule=schedule, classifier=classifier, guidance=_opt_guidance(t, bad), sampler=sampler,
        steps=_opt_int(t, "steps", bad), upsampler_base=_opt_int(t, "upsampler_base", bad),
        default=_opt_bool(t, "default", bad), path=path, description=str(t.get("description", "")),
        configs=MappingProxyType(configs),
    )


def _parse_urls(raw: Any, bad) -> tuple[str, ...]:
    """A list of http(s):// or file:// URLs (a bare string would be read as its characters)."""
    def is_url(u: Any) -> bool:
        if not isinstance(u, str):
            return False
        parts = urllib.parse.urlsplit(u)
        return parts.scheme == "file" or (parts.scheme in ("http", "https") and bool(parts.netloc))

    if not isinstance(raw, list) or not all(map(is_url, raw)):
        raise bad(f"urls must be a list of http(s):// or file:// URLs, got {raw!r}")
    return tuple(raw)


def _parse_roles(raw: Any, publisher: str, bad) -> tuple[dict, dict]:
    """roles = { role = "preset" | {flags} } or, for bundled files only, ["role", ...]."""
    if isinstance(raw, list):
        if publisher != "bundled":
            raise bad("only bundled entries may leave a role's architecture to the file")
        raw = {role: None for role in raw}
    if not isinstance(raw, dict) or not raw:
        raise bad("roles must name at least one network (unet, classifier)")
    roles: dict[str, str | None] = {}
    configs: dict[str, AnyConfig | None] = {}
    for role, spec in raw.items():
        if role not in ROLES:
            raise bad(f"unknown role {role!r} (expected {' or '.join(ROLES)})")
        try:
            roles[role], configs[role] = _role_config(spec)
        except ConfigError as exc:
            raise bad(f"{role}: {exc}") from None
        want = ClassifierConfig if role == "classifier" else UNetConfig
        if configs[role] is not None and not isinstance(configs[role], want):
            raise bad(f"role {role} is given a {type(configs[role]).__name__}")
    if publisher == "bundled" and len(roles) != 1:
        raise bad("a bundled entry holds exactly one network")
    return roles, configs


def _role_config(spec: Any) -> tuple[str | None, AnyConfig | None]:
    if spec is None:
        return None, None
    if isinstance(spec, str):
        return spec, get_preset(spec)
    if isinstance(spec, dict):
        flags = dict(spec)
        preset = flags.pop("preset", None)
        if preset is None:
            return None, config_from_dict(flags)
        base = get_preset(preset)
        changes = type(base).from_flags({**base.to_dict(), **flags}) if flags else base
        return preset, changes
    raise ConfigError(f"expected a preset name or a table of flags, got {spec!r}")


def _check_schedule(schedule: Any, configs: dict, publisher: str, bad) -> None:
    if schedule is None:
        if publisher != "bundled":
            raise bad("noise_schedule is required")
        return
    if schedule not in ("linear", "cosine"):
        raise bad(f"noise_schedule must be linear or cosine, got {schedule!r}")
    for role, cfg in configs.items():
        if cfg is not None and cfg.noise_schedule != schedule:
            raise bad(f"noise_schedule {schedule} disagrees with the {role} config ({cfg.noise_schedule})")


def _derive_res(configs: dict, bad) -> int:
    sizes = {cfg.image_size for cfg in configs.values() if cfg is not None}
    if len(sizes) != 1:
        raise bad("resolution is required")
    return sizes.pop()


def _opt_int(t: Mapping, key: str, bad, positive: bool = False) -> int | None:
    value = t.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
        raise bad(f"{key} must be a {'positive' if positive else 'non-negative'} integer, got {value!r}")
    return value


def _opt_bool(t: Mapping, key: str, bad) -> bool:
    value = t.get(key, False)
    if not isinstance(value, bool):  # bool("false") is True
        raise bad(f"{key} must be true or false, got {value!r}")
    return value


def _opt_guidance(t: Mapping, bad) -> float | None:
    value = t.get("guidance")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise bad(f"guidance must be a non-negative number, got {value!r}")
    return float(value)


def _check_links(registry: Registry) -> None:
    """Cross-entry rules: unique defaults per resolution, classifier links that resolve."""
    seen: dict[int, str] = {}
    for entry in registry.entries:
        if entry.default:
            if entry.resolution in seen:
                raise RegistryError(
                    f"registry: {seen[entry.resolution]} and {entry.name} are both default at {entry.resolution}")
            seen[entry.resolution] = entry.name
        if entry.classifier is not None:
            target = registry.get(entry.classifier)
            if "classifier" not in target.roles:
                raise RegistryError(f"registry entry {entry.name!r}: {entry.classifier} holds no classifier")
