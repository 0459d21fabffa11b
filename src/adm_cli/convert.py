"""Convert a published checkpoint (OpenAI .pt, mmagic .pth) to the canonical safetensors layout.

The steps, each strict:
1. read the file without running pickled code (safe_load.py);
2. find its networks: a plain state dict (OpenAI) or a ``state_dict`` with ``unet.`` /
   ``classifier.`` prefixes (mmagic; its U-Net names are renamed to OpenAI's by the declared
   table ``MMAGIC_UNET_RENAMES``, nothing is reshaped);
3. take each network's architecture from ``--arch`` / ``--config``, the ``adm_config`` metadata of
   a file adm converted before, or the registry (by name, by sha256, by file name). Tensor shapes
   cannot tell the attention order or head size, so a file nobody describes is refused with the
   presets its shapes fit, never guessed; a flag in ``--config`` that is a near miss of a model
   flag (``noise_scheduel``) is refused, as it would be ignored (flags.py reads them);
4. check every tensor against the model that config builds (on the meta device): each consumed,
   each shape right, no NaN/Inf, ``strict=True`` load; the first offending key is named;
5. only then write (atomically) one safetensors file per network with the config and the
   source's name and sha256 in its metadata. An identical earlier result is left alone.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .config import PRESETS, AnyConfig, ClassifierConfig, UNetConfig
from .download import sha256_file
from .errors import ConfigInputError, ConversionError, UsageError, WeightsError
from .flags import config_configs, conversion_args
from .formats import describe
from .metadata import STORED_DTYPES
from .models import build_model
from .registry import Entry, Registry, load_registry
from .safe_load import load_checkpoint
from .weights import read_config, read_metadata, save_weights

DTYPES = {name: getattr(torch, name) for name in STORED_DTYPES}

# mmagic's U-Net module names -> OpenAI's (open-mmlab/mmagic DenoisingUnet vs guided-diffusion
# UNetModel). Prefix rules apply at the start of a key, infix rules anywhere inside it.
MMAGIC_UNET_PREFIXES = (
    ("time_embedding.blocks.", "time_embed."), ("label_embedding.", "label_emb."),
    ("in_blocks.", "input_blocks."), ("mid_blocks.", "middle_block."), ("out_blocks.", "output_blocks."),
    ("out.gn.", "out.0."), ("out.conv.", "out.2."),
)
MMAGIC_UNET_INFIXES = (
    (".conv_1.0.", ".in_layers.0."), (".conv_1.2.", ".in_layers.2."),
    (".norm_with_embedding.norm.", ".out_layers.0."),
    (".norm_with_embedding.embedding_layer.1.", ".emb_layers.1."),
    (".conv_2.2.", ".out_layers.3."), (".shortcut.", ".skip_connection."),
    (".downsample.", ".op."),  # the conv downsampler, only present without resblock_updown
)
_MMAGIC_MARKERS = ("time_embedding.", "in_blocks.", "mid_blocks.", "out_blocks.")
Log = Callable[[str], None]


def _rename(key: str, prefixes, infixes) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    for old, new in infixes:
        key = key.replace(old, new)
    return key


def mmagic_to_openai(key: str) -> str:
    return _rename(key, MMAGIC_UNET_PREFIXES, MMAGIC_UNET_INFIXES)


def openai_to_mmagic(key: str) -> str:
    """The inverse table (tests use it to write checkpoints in mmagic's layout)."""
    flip = lambda rules: tuple((new, old) for old, new in rules)  # noqa: E731
    return _rename(key, flip(MMAGIC_UNET_PREFIXES), flip(MMAGIC_UNET_INFIXES))


@dataclass
class Network:
    """One network found in a checkpoint, its tensors under OpenAI's names."""

    role: str
    layout: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # OpenAI name -> name in the file

    def add(self, key: str, source: str, tensor: torch.Tensor) -> None:
        if key in self.tensors:
            raise ConversionError(f"tensors {self.sources[key]!r} and {source!r} both map to {key!r}")
        self.tensors[key], self.sources[key] = tensor, source


def _state_dict(obj: Any, filename: str) -> Mapping[str, Any]:
    """The tensors of a checkpoint: mmagic wraps them in ``state_dict``; OpenAI's are bare."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{filename} holds no state dict (got {type(obj).__name__})")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ConversionError(f"{filename}: key {key!r} ({type(key).__name__}) is not a tensor name")
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{filename}: {key!r} is a {type(value).__name__}, not a tensor "
                                  "(expected a state dict or a dict with a 'state_dict')")
        if value.is_meta:  # saved from a model built on the meta device: shapes, no numbers
            raise ConversionError(f"{filename}: tensor {key!r} is on the meta device (it holds no data)")
        if value.layout != torch.strided:
            raise ConversionError(f"{filename}: tensor {key!r} is a {value.layout} tensor, not a dense one")
    return obj


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def read_networks(obj: Any, filename: str) -> dict[str, Network]:
    """Split a loaded checkpoint into its networks ('unet', 'classifier'), renamed to OpenAI's keys."""
    state = _state_dict(obj, filename)
    prefixed = [k for k in state if _strip_module(k).startswith(("unet.", "classifier."))]
    if prefixed and len(prefixed) != len(state):
        stray = next(k for k in state if k not in set(prefixed))
        raise ConversionError(f"{filename}: tensor {stray!r} is outside the unet./classifier. prefixes")
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in state:
        rest = _strip_module(key)
        role = None
        if prefixed:
            role, rest = rest.split(".", 1)
            rest = _strip_module(rest)
        groups.setdefault(role or "", []).append((rest, key))
    networks = {}
    for role, items in groups.items():
        keys = [k for k, _ in items]
        if not role:
            role = "classifier" if any(k.endswith(("c_proj.weight", "positional_embedding")) for k in keys) else "unet"
        mmagic = role == "unet" and any(k.startswith(_MMAGIC_MARKERS) for k in keys)
        net = Network(role, "mmagic" if (mmagic or prefixed) else "openai")
        for rest, source in items:
            net.add(mmagic_to_openai(rest) if mmagic else rest, source, state[source])
        networks[role] = net
    return networks


# -- architecture ----------------------------------------------------------------------------------


def metadata_configs(src: Path, roles: Sequence[str]) -> dict[str, tuple[AnyConfig, str | None]]:
    """{role: (config, preset)} a safetensors file adm wrote records in its metadata (so that
    converting it again, say to another --dtype, needs no --arch or --config); {} for any other
    file. The preset is kept where the config still is that preset's."""
    if src.suffix != ".safetensors":
        return {}
    meta = read_metadata(src)
    if "adm_config" not in meta:  # another converter's file: its architecture is not known
        return {}
    cfg = read_config(src)
    role = "classifier" if isinstance(cfg, ClassifierConfig) else "unet"
    if list(roles) != [role]:
        raise ConversionError(f"{src.name} holds {' and '.join(roles)}, but its adm_config metadata describes "
                              f"a {'classifier' if role == 'classifier' else 'U-Net'}")
    preset = meta.get("adm_preset")
    return {role: (cfg, preset if PRESETS.get(preset) == cfg else None)}


def fitting_presets(net: Network) -> list[str]:
    """Presets whose tensor shapes equal this network's (a hint only: shapes cannot tell the
    attention order or the head size apart)."""
    fits = []
    want_cls = ClassifierConfig if net.role == "classifier" else UNetConfig
    shapes = {k: tuple(v.shape) for k, v in net.tensors.items()}
    for name, cfg in PRESETS.items():
        if isinstance(cfg, want_cls) and _expected_shapes(cfg) == shapes:
            fits.append(name)
    return fits


@functools.lru_cache(maxsize=32)
def _expected_shapes(cfg: AnyConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


# How an unknown file's architecture is given (adm sample, which has no --arch, rewords it).
ARCH_HINT = "pass --arch PRESET (or a registry name) or --config FILE with its guided-diffusion flags"


def _describe_unknown(filename: str, networks: Mapping[str, Network]) -> ConversionError:
    hints = []
    for role, net in networks.items():
        fits = fitting_presets(net)
        hints.append(f"its {role} fits preset {' or '.join(fits)}" if fits else f"no preset fits its {role}")
    return ConversionError(
        f"{filename} is not in the registry and its architecture cannot be read from its tensors "
        f"(attention order and head size are not stored); {'; '.join(hints)}: {ARCH_HINT}")


def match_registry(registry: Registry, filename: str, digest: str) -> Entry | None:
    """The published file this is: by sha256 (or its known prefix), else by file name when
    no published checksum contradicts it."""
    entry = registry.by_sha256(digest)
    if entry is None:
        entry = registry.by_filename(filename)
        if entry is not None and entry.sha256 and not digest.startswith(entry.sha256):
            entry = None
    return None if entry is None or entry.bundled else entry


# -- validation and writing ------------------------------------------------------------------------


def validate(net: Network, cfg: AnyConfig, label: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The network's tensors in ``dtype`` after every strict check; raises on the first failure."""
    if (net.role == "classifier") != isinstance(cfg, ClassifierConfig):
        raise ConversionError(f"the file holds a {net.role} but {label} describes a "
                              f"{'classifier' if isinstance(cfg, ClassifierConfig) else 'U-Net'}")
    with torch.device("meta"):
        model = build_model(cfg)
    expected = model.state_dict()
    for key in net.tensors:
        if key not in expected:
            raise ConversionError(f"tensor {_named(net, key)} is not part of {label} (unexpected key)")
    out = {}
    for key, ref in expected.items():
        if key not in net.tensors:
            raise ConversionError(f"tensor {_named(net, key)} is missing from the file ({label} needs it)")
        t = net.tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise ConversionError(f"tensor {_named(net, key)} has shape {tuple(t.shape)}, "
                                  f"{label} needs {tuple(ref.shape)}")
        if not t.is_floating_point():
            raise ConversionError(f"tensor {_named(net, key)} has dtype {t.dtype}, expected floating point")
        if not _all_finite(t):
            raise ConversionError(f"tensor {_named(net, key)} contains NaN or Inf")
        cast = t.to(dtype)
        if not _all_finite(cast):
            raise ConversionError(f"tensor {_named(net, key)} overflows {str(dtype).removeprefix('torch.')}")
        out[key] = cast.contiguous()
    try:
        model.load_state_dict(out, strict=True, assign=True)
    except RuntimeError as exc:  # a safety net: the checks above should have caught it
        raise ConversionError(f"{label}: strict load failed ({str(exc).strip().splitlines()[-1]})") from None
    return out


def _all_finite(t: torch.Tensor) -> bool:
    """A finite float32 sum proves every element finite (NaN and Inf propagate); only when the
    sum is not finite (a bad element, or overflow of the sum) look element by element."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def _named(net: Network, key: str) -> str:
    """``key`` as the file names it, and OpenAI's name where they differ."""
    source = net.sources.get(key) or _name_in_file(net, key)
    return repr(source) if source == key else f"{source!r} (= {key!r})"


def _name_in_file(net: Network, key: str) -> str:
    """What the file would call a tensor it lacks: its renaming and prefix, read off a tensor it has."""
    renamed = net.layout == "mmagic" and any(openai_to_mmagic(k) != k and s.endswith(openai_to_mmagic(k))
                                             for k, s in net.sources.items())
    rename = openai_to_mmagic if renamed else str
    have, source = next(iter(net.sources.items()), (key, key))
    prefix = source[:len(source) - len(rename(have))] if source.endswith(rename(have)) else ""
    return prefix + rename(key)


def _default_stem(src: Path, dtype: str) -> str:
    """SRC's stem, told apart from SRC where SRC is a safetensors file too: another converter's
    file gets ``.adm``; a file adm wrote (converted again only to change its dtype) gets the new
    dtype in place of the one its name carries, so X.adm.safetensors in bfloat16 is
    X.adm.bfloat16.safetensors, not X.adm.adm.safetensors."""
    if src.suffix != ".safetensors":
        return src.stem
    if "adm_config" not in read_metadata(src):
        return f"{src.stem}.adm"
    base, _, last = src.stem.rpartition(".")
    return f"{base if base and last in DTYPES else src.stem}.{dtype}"


def output_paths(src: Path, dst: str | Path | None, roles: Sequence[str], dtype: str = "float32") -> dict[str, Path]:
    """``<stem>.safetensors`` (one network) or ``<stem>.<role>.safetensors`` (several), beside
    SRC, in DST when it is a folder (existing, or any path ending in a slash), or as DST itself.
    A .safetensors SRC's stem is changed so as not to name SRC itself (``_default_stem``)."""
    multi = len(roles) > 1
    if dst is None or Path(dst).is_dir() or str(dst).endswith(("/", "\\")):
        folder = src.parent if dst is None else Path(dst)
        stem = _default_stem(src, dtype)
        return {r: folder / (f"{stem}.{r}.safetensors" if multi else f"{stem}.safetensors") for r in roles}
    dst = Path(dst)
    if dst.suffix != ".safetensors" and not (dst.exists() and os.path.samefile(dst, src)):
        # adm sample --weights (and other tools) pick the reader by the name: a .pt name on a
        # safetensors file would be unpickled and refused (SRC itself: _write_all says so)
        raise UsageError(f"output file {dst} must end in .safetensors (or give a folder, ending in /)")
    if not multi:
        return {roles[0]: dst}
    stem = dst.name.removesuffix(".safetensors")
    return {r: dst.with_name(f"{stem}.{r}.safetensors") for r in roles}


def _up_to_date(path: Path, digest: str, dtype: str, cfg: AnyConfig) -> bool:
    try:
        meta = read_metadata(path)
    except WeightsError:
        return False
    return (meta.get("adm_source_sha256") == digest and meta.get("adm_dtype", "float32") == dtype
            and meta.get("adm_config") == json.dumps(cfg.to_dict(), sort_keys=True))


def _load_source(src: Path) -> Any:
    """A torch pickle (safely), or a safetensors file from another converter (no code in it)."""
    if src.suffix != ".safetensors":
        return load_checkpoint(src)
    from safetensors.torch import load_file

    try:
        return load_file(str(src))
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ConversionError(describe(src) or f"{src.name} is not a readable safetensors file ({exc})") from None


def convert_checkpoint(src: str | Path, dst: str | Path | None = None, *, arch: str | Sequence[str] | None = None,
                       config: Any = None, name: str | None = None, dtype: str = "float32", force: bool = False,
                       source_sha256: str | None = None,
                       outputs: Mapping[str, Path] | Callable[[str], Path] | None = None,
                       registry: Registry | None = None, log: Log | None = None) -> dict[str, Path]:
    """Convert ``src``; returns {role: canonical file}. ``name`` = its registry entry, if known;
    ``outputs`` ({role: path} or role -> path) overrides the file names (the cache uses it).
    Nothing is written on failure."""
    src = Path(src)
    registry = registry or load_registry()
    chosen, config = conversion_args(src, arch, config, dtype, registry)  # bad names fail before reading gigabytes
    digest = source_sha256 or sha256_file(src)
    networks = read_networks(_load_source(src), src.name)
    roles = list(networks)
    for role, cfg in config_configs(config, roles).items():
        if role in chosen:
            raise ConfigInputError(f"both --arch and --config describe the {role}: give one of them")
        chosen[role] = (cfg, None)
    if not chosen and not name:  # what the file itself records beats a registry guess by name
        chosen = metadata_configs(src, roles)
    entry = registry.get(name) if name else (None if chosen else match_registry(registry, src.name, digest))
    if not chosen and entry is not None:
        if set(entry.roles) != set(roles):
            raise ConversionError(f"{src.name} holds {' and '.join(roles)}, but registry entry "
                                  f"{entry.name} says {' and '.join(entry.roles)}")
        chosen = {r: (entry.config_for(r), entry.roles[r]) for r in roles}
    if not chosen:
        raise _describe_unknown(src.name, networks)
    if set(chosen) != set(roles):
        extra, lacking = sorted(set(chosen) - set(roles)), sorted(set(roles) - set(chosen))
        raise ConversionError(f"{src.name} holds a {lacking[0]} that --arch/--config do not describe" if lacking
                              else f"{src.name} has no {extra[0]}, but --arch/--config describe one")
    if outputs is None:
        paths = output_paths(src, dst, roles, dtype)
    else:
        paths = {r: Path(outputs(r) if callable(outputs) else outputs[r]) for r in roles}
    return _write_all(src, networks, chosen, paths, digest, dtype, force, entry, log)


def _write_all(src: Path, networks: Mapping[str, Network], chosen: Mapping, paths: Mapping[str, Path],
               digest: str, dtype: str, force: bool, entry: Entry | None, log: Log | None) -> dict[str, Path]:
    todo = []
    for role, (cfg, preset) in chosen.items():
        path = Path(paths[role])
        if path.exists() and os.path.samefile(path, src):  # --force would destroy the input
            if src.suffix == ".safetensors" and read_metadata(src).get("adm_dtype") == dtype:
                raise ConversionError(f"{src.name} is adm's layout in {dtype} already: nothing to convert "
                                      "(give another --dtype, or an output)")
            raise ConversionError(f"the output {path} is the source file itself: choose another output")
        if path.exists() and not force:
            if _up_to_date(path, digest, dtype, cfg):
                log and log(f"{path} is up to date ({role})")
                continue
            raise WeightsError(f"{path} already exists and holds other weights (use --force to overwrite)")
        label = f"preset {preset}" if preset else "the given config"
        try:
            todo.append((role, path, cfg, preset, validate(networks[role], cfg, label, DTYPES[dtype])))
        except ConversionError as exc:
            raise ConversionError(f"{src.name}: {exc}") from None
    written: list[Path] = []
    try:
        for role, path, cfg, preset, tensors in todo:
            meta = {"adm_source_file": src.name, "adm_source_sha256": digest, "adm_role": role,
                    "adm_dtype": dtype, "adm_source_layout": networks[role].layout}
            if preset:
                meta["adm_preset"] = preset
            if entry is not None:
                meta["adm_registry_name"] = entry.name
            written.append(save_weights(path, tensors, cfg, meta, overwrite=True))
            log and log(f"wrote {path} ({role}, {preset or 'custom config'}, {dtype})")
    except BaseException:
        for path in written:  # all or nothing: an adm-g file is one unit
            path.unlink(missing_ok=True)
        raise
    return {role: Path(paths[role]) for role in chosen}
