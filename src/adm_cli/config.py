"""Architecture and diffusion configs, named with OpenAI's guided-diffusion flag names.

A checkpoint of any guided-diffusion fork is described by the flags its authors trained with
(``--num_channels 256 --attention_resolutions 32,16,8 ...``); :meth:`UNetConfig.from_flags` and
:meth:`ClassifierConfig.from_flags` take exactly those names, so a custom model needs no
translation. The published models are presets (``PRESETS``), named after their files.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

# Default channel multipliers per resolution, as OpenAI's scripts choose them when
# ``--channel_mult`` is empty. The super-resolution models use their own table.
_UNET_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
_SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
_CLASSIFIER_CHANNEL_MULT = _UNET_CHANNEL_MULT


def _parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y"):
        return True
    if text in ("0", "false", "f", "no", "n"):
        return False
    raise ConfigError(f"{name}: expected a boolean, got {value!r}")


def _parse_mult(text: str, image_size: int, table: Mapping[int, tuple]) -> tuple[float, ...]:
    if text:
        try:
            mults = tuple(float(m) if "." in m else int(m) for m in str(text).split(","))
        except ValueError:
            raise ConfigError(f"channel_mult: cannot parse {text!r}") from None
        if not all(0 < m < math.inf for m in mults):
            raise ConfigError(f"channel_mult: every multiplier must be positive, got {text!r}")
        return mults
    if image_size not in table:
        raise ConfigError(
            f"image_size {image_size} has no default channel_mult (known: "
            f"{', '.join(map(str, sorted(table)))}); pass channel_mult explicitly"
        )
    return table[image_size]


def _parse_resolutions(text: str, image_size: int) -> tuple[int, ...]:
    """Attention resolutions (pixels) -> downsampling rates ``ds`` at which blocks attend."""
    try:
        resolutions = [int(r) for r in str(text).split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"attention_resolutions: cannot parse {text!r}") from None
    if any(r <= 0 for r in resolutions):
        raise ConfigError(f"attention_resolutions: every resolution must be positive, got {text!r}")
    return tuple(image_size // r for r in resolutions)


# Integer flags that may be below 1: small_size 0 (not a super-resolution model) and, in the
# U-Net, -1 for "derive from num_heads". Every other integer flag is a size or a count.
_MAY_BE_ZERO = {"small_size"}
_MAY_BE_UNSET = {"num_head_channels", "num_heads_upsample"}


def _parse_int(value: Any, name: str, unset_ok: bool) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # TOML/JSON 64.0
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if name in _MAY_BE_ZERO:
        if number < 0:
            raise ConfigError(f"{name}: must be 0 or positive, got {value!r}")
    elif number <= 0 and not (unset_ok and name in _MAY_BE_UNSET and number == -1):
        raise ConfigError(f"{name}: must be positive{' (or -1)' if unset_ok and name in _MAY_BE_UNSET else ''}, "
                          f"got {value!r}")
    return number


def _parse_float(value: Any, name: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if not 0 <= number <= 1:  # the only float flag is dropout, a probability (NaN fails too)
        raise ConfigError(f"{name}: must be between 0 and 1, got {value!r}")
    return number


def _refuse_other_parameterisations(flags: Mapping[str, Any], diffusion_steps: int) -> None:
    """Flags that are not architecture but change what the network's output or input means:
    ignoring them would sample wrongly without a word. Every published ADM model has their
    defaults (eps prediction; timesteps given as integers 0..T-1)."""
    norm = {str(k).replace("-", "_"): v for k, v in flags.items()}
    if "predict_xstart" in norm and _parse_bool(norm["predict_xstart"], "predict_xstart"):
        raise ConfigError("predict_xstart = true (a model that predicts x0) is not supported: adm-cli samples "
                          "eps-predicting models, as every published ADM checkpoint is")
    if "rescale_timesteps" in norm and _parse_bool(norm["rescale_timesteps"], "rescale_timesteps") \
            and diffusion_steps != 1000:
        raise ConfigError(f"rescale_timesteps = true with diffusion_steps = {diffusion_steps} (timesteps scaled "
                          "to 0..1000) is not supported: the published ADM models take 0..T-1")


def _coerce(cls, flags: Mapping[str, Any], aliases: Mapping[str, str] = {}) -> dict:
    """Typed values from flags as a script or a JSON/TOML file gives them ("64" or 64); a value
    of the wrong type or size raises ConfigError naming the flag (never a TypeError later)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in flags.items():
        key = aliases.get(key, key).replace("-", "_")
        if key not in fields:
            continue  # foreign flags (use_fp16, lr, ...) do not change the architecture
        if value is None:
            raise ConfigError(f"{key}: expected a value, got null")
        kind = fields[key].type
        if kind in ("bool", bool):
            value = _parse_bool(value, key)
        elif kind in ("int", int):
            value = _parse_int(value, key, unset_ok=cls is UNetConfig)
        elif kind in ("float", float):
            value = _parse_float(value, key)
        elif kind in ("str", str):
            if isinstance(value, (dict, bool)):
                raise ConfigError(f"{key}: expected a string, got {value!r}")
            value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        out[key] = value
    return out


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net (and its diffusion) in guided-diffusion's flag names.

    ``small_size > 0`` makes it a super-resolution model: the low-resolution image, bilinearly
    upsampled, is concatenated to x_t (``in_channels`` doubles). ``num_classes`` is 1000 for
    ImageNet; it only matters when ``class_cond`` is set.
    """

    image_size: int
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: str = ""
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    attention_resolutions: str = "16,8"
    dropout: float = 0.0
    class_cond: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    sigma_small: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    small_size: int = 0
    num_classes: int = 1000
    in_channels: int = 3

    def __post_init__(self) -> None:
        self.validate()

    # -- derived quantities -------------------------------------------------------------
    @property
    def is_super_res(self) -> bool:
        return self.small_size > 0

    @property
    def mults(self) -> tuple[float, ...]:
        table = _SR_CHANNEL_MULT if self.is_super_res else _UNET_CHANNEL_MULT
        return _parse_mult(self.channel_mult, self.image_size, table)

    @property
    def attention_ds(self) -> tuple[int, ...]:
        return _parse_resolutions(self.attention_resolutions, self.image_size)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def variance(self) -> str:
        """The reverse-process variance: 'learned' (learn_sigma), else 'small' or 'large'."""
        return "learned" if self.learn_sigma else ("small" if self.sigma_small else "large")

    def heads(self, channels: int, upsample: bool = False) -> int:
        """Number of attention heads at a block of ``channels`` channels."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        if upsample and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads

    def validate(self) -> None:
        if self.image_size <= 0:
            raise ConfigError(f"image_size must be positive, got {self.image_size}")
        if self.noise_schedule not in ("linear", "cosine"):
            raise ConfigError(f"noise_schedule must be 'linear' or 'cosine', got {self.noise_schedule!r}")
        if self.diffusion_steps < 1:
            raise ConfigError(f"diffusion_steps must be >= 1, got {self.diffusion_steps}")
        mults = self.mults
        ds, widths = 1, []
        for level, mult in enumerate(mults):
            ch = int(mult * self.num_channels)
            if ch % 32:
                raise ConfigError(
                    f"num_channels {self.num_channels} x channel_mult {mult} = {ch} channels, "
                    "not divisible by the 32 GroupNorm groups"
                )
            if ds in self.attention_ds:
                widths.append(ch)
            if level != len(mults) - 1:
                ds *= 2
        widths.append(int(mults[-1] * self.num_channels))  # the middle block always attends
        if self.image_size % ds:
            raise ConfigError(f"image_size {self.image_size} is not divisible by {ds} ({len(mults)} levels)")
        for ch in widths:
            if self.num_head_channels != -1:
                if ch % self.num_head_channels:
                    raise ConfigError(f"num_head_channels {self.num_head_channels} does not divide {ch} channels")
            else:
                for h in {self.num_heads, self.num_heads_upsample if self.num_heads_upsample != -1 else self.num_heads}:
                    if h <= 0 or ch % h:
                        raise ConfigError(f"num_heads {h} does not divide {ch} channels")

    # -- (de)serialisation -----------------------------------------------------------------
    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "UNetConfig":
        """Build from guided-diffusion flags (``large_size`` is read as ``image_size``)."""
        values = _coerce(cls, flags, {"large_size": "image_size"})
        if "image_size" not in values:
            raise ConfigError("config needs image_size (or large_size)")
        config = cls(**values)
        _refuse_other_parameterisations(flags, config.diffusion_steps)
        return config

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "unet", **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> "UNetConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ClassifierConfig:
    """The noisy-image classifier (the U-Net's encoder half with attention pooling)."""

    image_size: int
    classifier_width: int = 128
    classifier_depth: int = 2
    classifier_attention_resolutions: str = "32,16,8"
    classifier_use_scale_shift_norm: bool = True
    classifier_resblock_updown: bool = True
    classifier_pool: str = "attention"
    channel_mult: str = ""
    num_head_channels: int = 64
    num_classes: int = 1000
    in_channels: int = 3
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def mults(self) -> tuple[float, ...]:
        return _parse_mult(self.channel_mult, self.image_size, _CLASSIFIER_CHANNEL_MULT)

    @property
    def attention_ds(self) -> tuple[int, ...]:
        return _parse_resolutions(self.classifier_attention_resolutions, self.image_size)

    def validate(self) -> None:
        if self.classifier_pool != "attention":
            raise ConfigError(
                f"classifier_pool {self.classifier_pool!r} is not supported (ADM's classifiers use 'attention')"
            )
        mults = self.mults
        for mult in mults:
            ch = int(mult * self.classifier_width)
            if ch % 32:
                raise ConfigError(f"classifier width {ch} is not divisible by the 32 GroupNorm groups")
            if ch % self.num_head_channels:
                raise ConfigError(f"num_head_channels {self.num_head_channels} does not divide {ch} channels")
        if self.image_size % (2 ** (len(mults) - 1)):
            raise ConfigError(f"image_size {self.image_size} is not divisible by {2 ** (len(mults) - 1)}")

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "ClassifierConfig":
        values = _coerce(cls, flags)
        if "image_size" not in values:
            raise ConfigError("classifier config needs image_size")
        config = cls(**values)
        _refuse_other_parameterisations(flags, config.diffusion_steps)
        return config

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "classifier", **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> "ClassifierConfig":
        return dataclasses.replace(self, **changes)


AnyConfig = UNetConfig | ClassifierConfig


def guidance_mismatch(unet: UNetConfig, clf: ClassifierConfig) -> tuple[str, int, int] | None:
    """The first property on which ``clf`` cannot guide ``unet`` (what, the classifier's value,
    the U-Net's), or None: the gradient is taken of the U-Net's own x_t (same size and channels)
    and of the labels it is conditioned on (same class count, for a class-conditional U-Net)."""
    checks = [("image size", clf.image_size, unet.image_size), ("input channels", clf.in_channels, unet.in_channels)]
    if unet.class_cond:
        checks.append(("class count", clf.num_classes, unet.num_classes))
    return next(((what, c, u) for what, c, u in checks if c != u), None)


def config_from_dict(data: Mapping[str, Any]) -> AnyConfig:
    """Inverse of ``to_dict`` (the ``kind`` key chooses the class)."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind is None:
        kind = "classifier" if any(k.startswith("classifier_") for k in data) else "unet"
    if kind == "unet":
        return UNetConfig.from_flags(data)
    if kind == "classifier":
        return ClassifierConfig.from_flags(data)
    raise ConfigError(f"unknown config kind {kind!r} (expected 'unet' or 'classifier')")


def config_to_json(cfg: AnyConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


# The released models' flags, from the "Sampling from pre-trained models" section of
# openai/guided-diffusion's README. Names are the checkpoint file stems.
_ADM = dict(
    attention_resolutions="32,16,8", diffusion_steps=1000, learn_sigma=True, noise_schedule="linear",
    num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
    use_scale_shift_norm=True,
)
PRESETS: dict[str, AnyConfig] = {
    "64x64_diffusion": UNetConfig(
        **{**_ADM, "num_channels": 192, "num_res_blocks": 3, "noise_schedule": "cosine"},
        image_size=64, class_cond=True, dropout=0.1, use_new_attention_order=True,
    ),
    "128x128_diffusion": UNetConfig(
        **{**_ADM, "num_head_channels": -1}, image_size=128, class_cond=True, num_heads=4,
    ),
    "256x256_diffusion": UNetConfig(**_ADM, image_size=256, class_cond=True),
    "256x256_diffusion_uncond": UNetConfig(**_ADM, image_size=256, class_cond=False),
    "512x512_diffusion": UNetConfig(**_ADM, image_size=512, class_cond=True),
    "512x512_diffusion_uncond_finetune_008100": UNetConfig(**_ADM, image_size=512, class_cond=False),
    "64_256_upsampler": UNetConfig(
        **{**_ADM, "num_channels": 192, "num_head_channels": -1},
        image_size=256, small_size=64, class_cond=True, num_heads=4,
    ),
    "128_512_upsampler": UNetConfig(
        **{**_ADM, "num_channels": 192, "attention_resolutions": "32,16"},
        image_size=512, small_size=128, class_cond=True,
    ),
    "lsun_256": UNetConfig(**_ADM, image_size=256, class_cond=False, dropout=0.1),
    # mmagic's Disco Diffusion portrait generator: the 512 layout at width 128, unconditional.
    "portrait_512_w128": UNetConfig(**{**_ADM, "num_channels": 128}, image_size=512, class_cond=False),
    "64x64_classifier": ClassifierConfig(image_size=64, classifier_depth=4, noise_schedule="cosine"),
    "128x128_classifier": ClassifierConfig(image_size=128),
    "256x256_classifier": ClassifierConfig(image_size=256),
    "512x512_classifier": ClassifierConfig(image_size=512),
}


def get_preset(name: str) -> AnyConfig:
    """Look a preset up by name; an unknown name raises with the closest matches."""
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(PRESETS)}"
        raise ConfigError(f"unknown architecture preset {name!r}{hint}") from None
