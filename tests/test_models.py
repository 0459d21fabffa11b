"""Our networks against OpenAI's reference networks (guided-diffusion-sdk), same weights."""

import pytest
import torch

from adm_cli.config import PRESETS, ClassifierConfig, UNetConfig, get_preset
from adm_cli.errors import ConfigError
from adm_cli.models import build_model, set_exact_attention
from conftest import randomize
from reference import reference_classifier, reference_unet

# Every U-Net family at reduced width: (preset it shrinks, changes).
SMALL_UNETS = {
    "64x64 (new attention order, cosine)": ("64x64_diffusion", dict(num_channels=32, num_res_blocks=1, image_size=32, channel_mult="1,2,2", num_head_channels=32)),
    "128x128 (num_heads)": ("128x128_diffusion", dict(num_channels=32, num_res_blocks=1, image_size=32, channel_mult="1,1,2")),
    "256x256 class-cond": ("256x256_diffusion", dict(num_channels=64, num_res_blocks=1, image_size=32, channel_mult="1,1,2")),
    "256x256 uncond": ("256x256_diffusion_uncond", dict(num_channels=64, num_res_blocks=1, image_size=32, channel_mult="1,1,2")),
    "512x512 (half-width first level)": ("512x512_diffusion", dict(num_channels=128, num_res_blocks=1, image_size=64, channel_mult="0.5,1,2,2")),
    "lsun": ("lsun_256", dict(num_channels=64, num_res_blocks=1, image_size=32, channel_mult="1,1,2")),
    "64->256 upsampler": ("64_256_upsampler", dict(num_channels=64, num_res_blocks=1, image_size=32, small_size=8, channel_mult="1,1,2")),
    "128->512 upsampler": ("128_512_upsampler", dict(num_channels=64, num_res_blocks=1, image_size=32, small_size=16, channel_mult="1,1,2")),
    "no scale-shift, conv resampling": ("256x256_diffusion", dict(num_channels=32, num_res_blocks=1, image_size=32, channel_mult="1,2", num_head_channels=32, use_scale_shift_norm=False, resblock_updown=False, learn_sigma=False)),
}


def _inputs(cfg: UNetConfig, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([3, 871][:n])
    kw = {}
    if cfg.class_cond:
        kw["y"] = torch.tensor([5, 999][:n])
    if cfg.is_super_res:
        kw["low_res"] = torch.randn(n, 3, cfg.small_size, cfg.small_size, generator=g)
    return x, t, kw


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def _compare_unet(cfg: UNetConfig, exact: bool):
    ref = randomize(reference_unet(cfg))
    ours = build_model(cfg).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    set_exact_attention(ours, exact)
    x, t, kw = _inputs(cfg)
    with torch.no_grad():
        a, b = ref(x, t, **kw), ours(x, t, **kw)
    assert a.shape == b.shape == (2, cfg.out_channels, cfg.image_size, cfg.image_size)
    return _rel(a, b)


@pytest.mark.parametrize("family", list(SMALL_UNETS))
@pytest.mark.parametrize("exact", [True, False], ids=["exact-attention", "sdpa"])
def test_unet_matches_reference(family, exact):
    preset, changes = SMALL_UNETS[family]
    cfg = get_preset(preset).replace(**changes)
    assert _compare_unet(cfg, exact) <= 1e-5


@pytest.mark.slow
def test_full_64x64_preset_matches_reference():
    assert _compare_unet(PRESETS["64x64_diffusion"], exact=False) <= 1e-5


def test_new_and_legacy_attention_orders_differ():
    """A wrong attention order loads fine but changes the output: it must come from the config."""
    cfg = get_preset("64x64_diffusion").replace(num_channels=64, num_res_blocks=1, image_size=16, channel_mult="1,2", num_head_channels=32)
    ours = randomize(build_model(cfg).eval())
    other = build_model(cfg.replace(use_new_attention_order=False)).eval()
    other.load_state_dict(ours.state_dict(), strict=True)
    x, t, kw = _inputs(cfg)
    with torch.no_grad():
        assert _rel(ours(x, t, **kw), other(x, t, **kw)) > 1e-3


SMALL_CLASSIFIERS = {
    "64 (depth 4)": ClassifierConfig(image_size=32, classifier_width=64, num_head_channels=32, classifier_depth=4, channel_mult="1,2,2", classifier_attention_resolutions="16,8"),
    "256-style": ClassifierConfig(image_size=32, classifier_width=64, num_head_channels=32, classifier_depth=2, channel_mult="1,1,2,2"),
    "512-style half width": ClassifierConfig(image_size=64, classifier_width=128, classifier_depth=1, channel_mult="0.5,1,1,2"),
}


@pytest.mark.parametrize("name", list(SMALL_CLASSIFIERS))
def test_classifier_logits_and_gradient_match_reference(name):
    cfg = SMALL_CLASSIFIERS[name]
    ref = randomize(reference_classifier(cfg))
    ours = build_model(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([0, 400, 999])
    y = torch.tensor([1, 7, 3])
    grads, logits = [], []
    for model in (ref, ours):
        xi = x.clone().requires_grad_(True)
        out = model(xi, t)
        torch.log_softmax(out, -1)[torch.arange(3), y].sum().backward()
        grads.append(xi.grad)
        logits.append(out.detach())
    assert logits[0].shape == (3, 1000)
    assert _rel(logits[0], logits[1]) <= 1e-5
    assert _rel(grads[0], grads[1]) <= 1e-5


@pytest.mark.parametrize("name", ["64x64_classifier", "128x128_classifier", "256x256_classifier", "512x512_classifier"])
def test_classifier_presets_have_reference_keys_and_shapes(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = build_model(cfg).state_dict()
        ref = reference_classifier(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if isinstance(c, UNetConfig)])
def test_unet_presets_have_reference_keys_and_shapes(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = build_model(cfg).state_dict()
        ref = reference_unet(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_preset_parameter_counts_match_published_files():
    counts = {"64x64_diffusion": 295_904_454, "128x128_diffusion": 421_529_606, "256x256_diffusion": 553_838_086,
              "256x256_diffusion_uncond": 552_814_086, "512x512_diffusion": 558_997_638,
              "64_256_upsampler": 311_795_910, "128_512_upsampler": 308_835_270,
              "64x64_classifier": 65_438_568, "128x128_classifier": 42_568_040,
              "256x256_classifier": 54_096_360, "512x512_classifier": 54_448_360}
    with torch.device("meta"):
        for name, n in counts.items():
            assert sum(p.numel() for p in build_model(PRESETS[name]).parameters()) == n, name


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ConfigError, match="num_heads 5 does not divide"):
        UNetConfig(image_size=32, num_channels=64, num_heads=5, channel_mult="1,2")
    with pytest.raises(ConfigError, match="num_head_channels 48 does not divide"):
        UNetConfig(image_size=32, num_channels=64, num_head_channels=48, channel_mult="1,2")
    with pytest.raises(ConfigError, match="unknown architecture preset '256x256_difusion'.*256x256_diffusion"):
        get_preset("256x256_difusion")
    with pytest.raises(ConfigError, match="image_size 100 has no default channel_mult"):
        UNetConfig(image_size=100)
    with pytest.raises(ConfigError, match="image_size 36 is not divisible by 8"):
        UNetConfig(image_size=36, num_channels=32, channel_mult="1,1,1,1")
    with pytest.raises(ConfigError, match="GroupNorm"):
        UNetConfig(image_size=32, num_channels=40, channel_mult="1,2")
