"""Build OpenAI's reference networks and diffusion (guided-diffusion-sdk) from our configs.

Test-only: the reference is the ground truth our numbers are compared with.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion import gaussian_diffusion as gd  # noqa: F401
    from guided_diffusion import script_util as su
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps  # noqa: F401

from adm_cli.config import ClassifierConfig, UNetConfig


def reference_unet(cfg: UNetConfig):
    common = dict(
        num_channels=cfg.num_channels, num_res_blocks=cfg.num_res_blocks, learn_sigma=cfg.learn_sigma,
        class_cond=cfg.class_cond, use_checkpoint=False, attention_resolutions=cfg.attention_resolutions,
        num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels,
        num_heads_upsample=cfg.num_heads_upsample, use_scale_shift_norm=cfg.use_scale_shift_norm,
        dropout=cfg.dropout, resblock_updown=cfg.resblock_updown, use_fp16=False,
    )
    if cfg.is_super_res:
        if not cfg.channel_mult:
            return su.sr_create_model(cfg.image_size, cfg.small_size, **common).eval()
        if True:  # sr_create_model has no channel_mult flag: the same class with ours
            model = su.SuperResModel(
                image_size=cfg.image_size, in_channels=3, model_channels=cfg.num_channels,
                out_channels=cfg.out_channels, num_res_blocks=cfg.num_res_blocks,
                attention_resolutions=cfg.attention_ds, dropout=cfg.dropout, channel_mult=cfg.mults,
                num_classes=cfg.num_classes if cfg.class_cond else None, num_heads=cfg.num_heads,
                num_head_channels=cfg.num_head_channels, num_heads_upsample=cfg.num_heads_upsample,
                use_scale_shift_norm=cfg.use_scale_shift_norm, resblock_updown=cfg.resblock_updown)
        return model.eval()
    model = su.UNetModel(
        image_size=cfg.image_size, in_channels=cfg.in_channels, model_channels=cfg.num_channels,
        out_channels=cfg.out_channels, num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=cfg.attention_ds, dropout=cfg.dropout, channel_mult=cfg.mults,
        num_classes=cfg.num_classes if cfg.class_cond else None, num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels, num_heads_upsample=cfg.num_heads_upsample,
        use_scale_shift_norm=cfg.use_scale_shift_norm, resblock_updown=cfg.resblock_updown,
        use_new_attention_order=cfg.use_new_attention_order)
    return model.eval()


def reference_classifier(cfg: ClassifierConfig):
    model = su.EncoderUNetModel(
        image_size=cfg.image_size, in_channels=cfg.in_channels, model_channels=cfg.classifier_width,
        out_channels=cfg.num_classes, num_res_blocks=cfg.classifier_depth,
        attention_resolutions=cfg.attention_ds, channel_mult=cfg.mults, num_head_channels=cfg.num_head_channels,
        use_scale_shift_norm=cfg.classifier_use_scale_shift_norm,
        resblock_updown=cfg.classifier_resblock_updown, pool=cfg.classifier_pool)
    return model.eval()


def reference_diffusion(cfg: UNetConfig, respacing: str = "", sigma_small: bool = False):
    return su.create_gaussian_diffusion(
        steps=cfg.diffusion_steps, learn_sigma=cfg.learn_sigma, sigma_small=sigma_small,
        noise_schedule=cfg.noise_schedule, timestep_respacing=respacing)
