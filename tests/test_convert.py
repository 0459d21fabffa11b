"""`adm convert-weights`: every publisher layout, every architecture family, strict checks, safety."""

import gzip
import io
import json
import pickle
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adm_cli import cli_weights  # noqa: F401 - registers the commands on the app
from adm_cli.cache import ensure_converted_file
from adm_cli.cli import app
from adm_cli.config import ClassifierConfig, UNetConfig
from adm_cli.convert import Network, convert_checkpoint, fitting_presets, mmagic_to_openai, openai_to_mmagic
from adm_cli.download import sha256_file
from adm_cli.errors import ConfigError, ConversionError, FileFormatError, UnsafePickleError, WeightsError
from adm_cli.formats import check_format, describe
from adm_cli.models import set_exact_attention
from adm_cli.safe_load import load_checkpoint
from adm_cli.weights import load_model, read_metadata
from publishers import one_thread  # noqa: F401 - autouse fixture
from publishers import (SMALL, inline_roles, payloads, pickle_globals, preset_shapes, reference_model, small, write_malicious,
                        write_mmagic, write_openai)

TSV_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mmagic-keys"
TSV_PRESETS = {
    "adm_ddim250_imagenet-64x64.tsv": "64x64_diffusion",
    "adm_ddim250_imagenet-256x256.tsv": "256x256_diffusion",
    "adm_ddim250_imagenet-512x512.tsv": "512x512_diffusion",
    "disco_adm-u-finetuned_imagenet-256x256.tsv": "256x256_diffusion_uncond",
    "disco_adm-u-finetuned_imagenet-512x512.tsv": "512x512_diffusion_uncond_finetune_008100",
    "disco_portrait-generator-v001.tsv": "portrait_512_w128",
    "adm-g_imagenet-64x64.classifier.tsv": "64x64_classifier",
    "adm-g_imagenet-256x256.classifier.tsv": "256x256_classifier",
    "adm-g_imagenet-512x512.classifier.tsv": "512x512_classifier",
}
UNETS = [f for f in SMALL if "classifier" not in f]
MMAGIC_FAMILIES = ["64x64", "256x256", "512x512", "256x256_uncond", "512x512_uncond_finetune", "portrait"]


def _assert_same_outputs(path: Path, ref, cfg) -> None:
    """The converted file, loaded into our model, computes what OpenAI's model computes."""
    ours = set_exact_attention(load_model(path), True)
    assert ours.config == cfg
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([3, 871])
    kw = {}
    if getattr(cfg, "class_cond", False):
        kw["y"] = torch.tensor([5, 999])
    if getattr(cfg, "small_size", 0):
        kw["low_res"] = torch.randn(2, 3, cfg.small_size, cfg.small_size, generator=g)
    with torch.no_grad():
        a, b = ref(x, t, **kw), ours(x, t, **kw)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- the rename table and the presets against mmagic's real key tables ------------------------


@pytest.mark.parametrize("tsv", sorted(TSV_PRESETS))
def test_mmagic_key_table_matches_presets(tsv):
    """Every tensor mmagic's module has (shared/reference TSVs) maps by our table to the preset's
    tensor of the same shape, and back; nothing left over on either side."""
    path = TSV_DIR / tsv
    if not path.exists():
        pytest.skip("shared/reference/mmagic-keys not available")
    shapes = preset_shapes(TSV_PRESETS[tsv])
    seen = set()
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        mm_key, shape, oa_key = line.split("\t")
        role, rest = mm_key.split(".", 1)
        assert (mmagic_to_openai(rest) if role == "unet" else rest) == oa_key
        if role == "unet":
            assert openai_to_mmagic(oa_key) == rest
        assert shapes[oa_key] == tuple(json.loads(shape.replace("(", "[").replace(",)", "]").replace(")", "]")))
        seen.add(oa_key)
    assert seen == set(shapes)


# -- each publisher layout x each architecture family -----------------------------------------


@pytest.mark.parametrize("family", [f for f in SMALL if f != "portrait"])  # portrait: mmagic only
def test_openai_zip_every_family(tmp_path, family):
    cfg = small(family)
    ref = reference_model(cfg)
    src = write_openai(tmp_path / f"{family}.pt", ref.state_dict())
    paths = convert_checkpoint(src, config=cfg)
    role = "classifier" if "classifier" in family else "unet"
    assert list(paths) == [role] and paths[role] == tmp_path / f"{family}.safetensors"
    _assert_same_outputs(paths[role], ref, cfg)


@pytest.mark.parametrize("family", ["64x64", "64x64_classifier"])
def test_openai_legacy_serialization(tmp_path, family):
    cfg = small(family)
    ref = reference_model(cfg)
    src = write_openai(tmp_path / "legacy.pt", ref.state_dict(), legacy=True)
    (out,) = convert_checkpoint(src, tmp_path / "out.safetensors", config=cfg).values()
    _assert_same_outputs(out, ref, cfg)


@pytest.mark.parametrize("family", MMAGIC_FAMILIES)
def test_mmagic_wrapped_with_message_hub(tmp_path, family):
    cfg = small(family)
    ref = reference_model(cfg)
    src = write_mmagic(tmp_path / "adm-u.pth", unet=ref.state_dict())
    out = convert_checkpoint(src, config=cfg)["unet"]
    _assert_same_outputs(out, ref, cfg)
    assert read_metadata(out)["adm_source_layout"] == "mmagic"


@pytest.mark.parametrize("family,legacy", [("64x64", True), ("256x256", False)])
def test_mmagic_adm_g_yields_unet_and_classifier(tmp_path, family, legacy):
    unet_cfg, clf_cfg = small(family), small(f"{family}_classifier")
    unet_ref, clf_ref = reference_model(unet_cfg, seed=1), reference_model(clf_cfg, seed=2)
    src = write_mmagic(tmp_path / "adm-g.pth", unet=unet_ref.state_dict(), classifier=clf_ref.state_dict(),
                       legacy=legacy)
    flags = {"unet": unet_cfg.to_dict(), "classifier": clf_cfg.to_dict()}
    (tmp_path / "adm-g.json").write_text(json.dumps(flags))
    paths = convert_checkpoint(src, config=tmp_path / "adm-g.json")
    assert paths == {"unet": tmp_path / "adm-g.unet.safetensors", "classifier": tmp_path / "adm-g.classifier.safetensors"}
    _assert_same_outputs(paths["unet"], unet_ref, unet_cfg)
    _assert_same_outputs(paths["classifier"], clf_ref, clf_cfg)


@pytest.mark.parametrize("module", [False, True], ids=["prefixed", "module.prefixed"])
def test_mmagic_bare_state_dict(tmp_path, module):
    cfg = small("256x256")
    ref = reference_model(cfg)
    src = write_mmagic(tmp_path / "bare.pth", unet=ref.state_dict(), wrapped=False, module=module)
    _assert_same_outputs(convert_checkpoint(src, config=cfg)["unet"], ref, cfg)


def test_message_hub_needs_the_restricted_loader(tmp_path):
    """torch's weights_only loader refuses the hub; ours reads the tensors and never imports mmengine."""
    cfg = small("64x64")
    src = write_mmagic(tmp_path / "hub.pth", unet=reference_model(cfg).state_dict())
    names = pickle_globals(src)
    assert {"mmengine.logging.history_buffer.HistoryBuffer", "builtins.getattr"} <= names
    assert any(n.startswith("numpy") for n in names)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(src, weights_only=True)
    obj = load_checkpoint(src)
    assert all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values())
    assert "Inert" in type(obj["message_hub"]["log_scalars"]["train/loss"]).__name__
    assert "mmengine" not in sys.modules


# -- where the architecture comes from -------------------------------------------------------------


def test_registry_by_name_checksum_and_file_name(tmp_path, monkeypatch):
    cfg = small("256x256")
    ref = reference_model(cfg)
    src = write_openai(tmp_path / "tiny_256.pt", ref.state_dict())
    common = f'publisher = "openai"\n{inline_roles(unet="256x256")}\nnoise_schedule = "linear"\n'
    toml = tmp_path / "registry.toml"
    toml.write_text(f'["by-sha"]\nurls = ["http://127.0.0.1:9/other.pt"]\nsha256 = "{sha256_file(src)[:8]}"\n{common}'
                    f'["by-name"]\nurls = ["http://127.0.0.1:9/tiny_256.pt"]\n{common}')
    monkeypatch.setenv("ADM_REGISTRY", str(toml))
    out = convert_checkpoint(src)["unet"]  # the checksum prefix wins over the file name
    assert read_metadata(out)["adm_registry_name"] == "by-sha"
    _assert_same_outputs(out, ref, cfg)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "tiny_256.pt").write_bytes(src.read_bytes() + b"")  # same bytes -> same checksum
    assert read_metadata(convert_checkpoint(copy / "tiny_256.pt", name="by-name")["unet"])["adm_registry_name"] == "by-name"
    src.unlink()
    other = write_openai(tmp_path / "tiny_256.pt", reference_model(cfg, seed=5).state_dict())
    assert read_metadata(convert_checkpoint(other, force=True)["unet"])["adm_registry_name"] == "by-name"


def test_config_file_toml_flat_flags(tmp_path):
    cfg = small("128x128")
    ref = reference_model(cfg)
    src = write_openai(tmp_path / "custom.pt", ref.state_dict())
    flags = {k: v for k, v in cfg.to_dict().items() if k != "kind"}
    (tmp_path / "flags.toml").write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in flags.items()))
    runner = CliRunner()
    result = runner.invoke(app, ["convert-weights", str(src), str(tmp_path / "o.safetensors"),
                                 "--config", str(tmp_path / "flags.toml"), "-q"])
    assert result.exit_code == 0, result.output
    _assert_same_outputs(tmp_path / "o.safetensors", ref, cfg)


def _flags(family: str) -> dict:
    return {k: v for k, v in small(family).to_dict().items() if k != "kind"}


def test_a_config_that_is_not_text_is_one_line(tmp_path, monkeypatch):
    """A checkpoint given as --config (the two paths swapped) was a UnicodeDecodeError traceback,
    in convert-weights and in adm sample --weights (which converts through the cache)."""
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "home"))
    src = write_openai(tmp_path / "m.pt", reference_model(small("64x64")).state_dict())
    result = CliRunner().invoke(app, ["convert-weights", str(src), "--config", str(src)])
    assert result.exit_code == 2 and result.output == "error: m.pt is not a JSON or TOML config (not UTF-8 text)\n"
    assert _only(tmp_path) == ["m.pt"]
    (tmp_path / "latin1.toml").write_bytes("image_size = 32 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^latin1.toml is not a JSON or TOML config \(not UTF-8 text\)$"):
        ensure_converted_file(src, config=str(tmp_path / "latin1.toml"), quiet=True)


def test_wrong_input_exits_2_and_a_failed_job_1(tmp_path):
    """The README's rule, for convert-weights: a flag's value that is wrong (an --arch name, a
    --dtype, an output name, a --config that is no flag table) exits 2; a file that cannot be
    converted exits 1. Each is one line; nothing is written."""
    src = write_openai(tmp_path / "m.pt", reference_model(small("64x64")).state_dict())
    (tmp_path / "list.json").write_text("[1]")
    for args, code, message in (
            (["--arch", "64x64_difusion"], 2, "--arch '64x64_difusion' is neither a preset nor a registry name; "
                                              "did you mean 64x64_diffusion"),
            (["--arch", "64x64_diffusion", "--dtype", "fp8"], 2, "--dtype must be one of"),
            (["--arch", "64x64_diffusion", str(tmp_path / "out.bin")], 2, "must end in .safetensors"),
            (["--config", str(tmp_path / "none.json")], 2, "cannot read config"),
            (["--config", str(tmp_path / "list.json")], 2, "list.json: expected a table of flags"),
            (["--arch", "256x256_diffusion"], 1, "m.pt: ")):  # the file does not fit: the job fails
        result = CliRunner().invoke(app, ["convert-weights", str(src), *args])
        assert result.exit_code == code and result.output.count("\n") == 1, (args, result.output)
        assert result.output.startswith("error: ") and message in result.output, (args, result.output)
    assert _only(tmp_path) == ["list.json", "m.pt"]


@pytest.mark.parametrize("table,key,value,meant", [
    (None, "noise_scheduel", "cosine", "noise_schedule"),
    (None, "use_new_attention_orders", True, "use_new_attention_order"),
    (None, "Image_Size", 32, "image_size"),  # names are case-sensitive: as lost as a typo
    (None, "classifier_widht", 32, "classifier_width"),
    ("unet", "num_head_channel", 32, "num_head_channels"),
])
def test_a_misspelt_flag_is_refused_not_dropped(tmp_path, table, key, value, meant):
    """A near miss of a model flag kept that flag's default: the 64x64 model's cosine schedule
    and new attention order became linear and the old order, with the same tensor shapes, and
    the conversion succeeded."""
    src = write_openai(tmp_path / "m.pt", reference_model(small("64x64")).state_dict())
    flags = _flags("64x64")
    flags = {"unet": {**flags, key: value}} if table else {**flags, key: value}
    (tmp_path / "typo.json").write_text(json.dumps(flags))
    result = CliRunner().invoke(app, ["convert-weights", str(src), "--config", str(tmp_path / "typo.json")])
    where = f"typo.json [{table}]" if table else "typo.json"
    assert result.exit_code == 2, result.output  # wrong input
    assert result.output == f"error: unknown flag {key!r} in {where} (did you mean {meant!r}?)\n"
    assert _only(tmp_path) == ["m.pt", "typo.json"]
    with pytest.raises(ConfigError, match=rf"^unknown flag '{key}' in the given config \(did you mean '{meant}'\?\)$"):
        convert_checkpoint(src, config={**_flags("64x64"), key: value})


def test_other_flags_of_openais_scripts_are_still_accepted(tmp_path):
    """A flag file saved from OpenAI's sampling or training scripts holds their other arguments
    (one, classifier_path, is 0.9 alike to classifier_depth): ignored, never taken for typos;
    the model flags in it are all read ("-" for "_" too)."""
    cfg = small("64x64")
    ref = reference_model(cfg)
    src = write_openai(tmp_path / "m.pt", ref.state_dict())
    script = {"batch_size": 4, "num_samples": 100, "timestep_respacing": "250", "use_ddim": False,
              "clip_denoised": True, "classifier_scale": 1.0, "classifier_path": "c.pt", "model_path": "m.pt",
              "use_fp16": True, "lr": 1e-4, "classifier_use_fp16": False, "use_checkpoint": False,
              "rescale_learned_sigmas": False, "use_kl": False, "my_own_note": "kept"}
    flags = {**_flags("64x64"), **script}
    flags["noise-schedule"] = flags.pop("noise_schedule")
    (tmp_path / "flags.json").write_text(json.dumps(flags))
    out = convert_checkpoint(src, config=tmp_path / "flags.json")["unet"]
    assert json.loads(read_metadata(out)["adm_config"]) == cfg.to_dict()
    assert cfg.noise_schedule == "cosine" and cfg.use_new_attention_order  # not the defaults
    _assert_same_outputs(out, ref, cfg)


def test_classifier_flags_make_a_classifier(tmp_path):
    cfg = small("256x256_classifier")
    src = write_openai(tmp_path / "clf.pt", reference_model(cfg).state_dict())
    with pytest.raises(ConfigError, match="classifier_"):
        convert_checkpoint(src, config={"image_size": 32})
    flags = {k: v for k, v in cfg.to_dict().items() if k != "kind"}
    assert "classifier" in convert_checkpoint(src, config=flags)


def test_unknown_architecture_is_never_guessed(tmp_path):
    cfg = small("256x256")
    src = write_openai(tmp_path / "mystery.pt", reference_model(cfg).state_dict())
    with pytest.raises(ConversionError, match="--arch") as info:
        convert_checkpoint(src)
    assert "attention order" in str(info.value)
    assert _only(tmp_path) == ["mystery.pt"]


def test_shapes_cannot_decide_between_presets():
    """256 uncond and LSUN share every shape; the 64x64 model's attention order is not in its shapes."""
    def fits(name):
        shapes = preset_shapes(name)
        return fitting_presets(Network("unet", "openai", {k: torch.empty(s, device="meta") for k, s in shapes.items()}))

    assert fits("256x256_diffusion_uncond") == ["256x256_diffusion_uncond", "lsun_256"]
    assert fits("64x64_diffusion") == ["64x64_diffusion"]
    with pytest.raises(ConfigError, match="did you mean"):
        convert_checkpoint(__file__, arch="256x256_difusion")


def test_arch_and_config_for_one_network_is_a_usage_error(tmp_path):
    """--arch and --config both describing the U-Net: a flag that must go (exit 2, as for
    --arch naming two U-Nets), not a conversion that failed on the way (exit 1)."""
    cfg = small("64x64")
    src = write_openai(tmp_path / "small.pt", reference_model(cfg).state_dict())
    (tmp_path / "flags.json").write_text(json.dumps(_flags("64x64")))
    result = CliRunner().invoke(app, ["convert-weights", str(src), "--arch", "64x64_diffusion",
                                      "--config", str(tmp_path / "flags.json")])
    assert result.exit_code == 2 and result.output == (
        "error: both --arch and --config describe the unet: give one of them\n"), result.output
    assert _only(tmp_path) == ["flags.json", "small.pt"]


def test_arch_preset_for_published_shapes(tmp_path):
    """--arch with a real preset: a mismatching file names the first wrong tensor, writes nothing."""
    cfg = small("64x64")
    src = write_openai(tmp_path / "small.pt", reference_model(cfg).state_dict())
    with pytest.raises(ConversionError, match=r"^small.pt: tensor '[\w.]+' (is not part of|has shape .*,) preset 64x64_diffusion"):
        convert_checkpoint(src, arch="64x64_diffusion")
    assert _only(tmp_path) == ["small.pt"]


# -- strict validation ------------------------------------------------------------------------


def _broken(state, how):
    state = dict(state)
    if how == "missing":
        del state["input_blocks.1.0.in_layers.2.weight"]
    elif how == "unexpected":
        state["input_blocks.1.0.extra.weight"] = torch.zeros(3)
    elif how == "shape":
        state["input_blocks.1.0.in_layers.2.weight"] = torch.zeros(32, 32, 3, 1)
    elif how == "nan":
        state["input_blocks.1.0.in_layers.2.weight"] = state["input_blocks.1.0.in_layers.2.weight"].clone()
        state["input_blocks.1.0.in_layers.2.weight"][0, 0, 0, 0] = float("nan")
    elif how == "inf":
        state["input_blocks.1.0.in_layers.2.weight"] = torch.full_like(state["input_blocks.1.0.in_layers.2.weight"], float("inf"))
    elif how == "integer":
        state["input_blocks.1.0.in_layers.2.weight"] = state["input_blocks.1.0.in_layers.2.weight"].long()
    return state


@pytest.mark.parametrize("how,message", [
    ("missing", "'input_blocks.1.0.in_layers.2.weight' is missing"),
    ("unexpected", "'input_blocks.1.0.extra.weight' is not part"),
    ("shape", "'input_blocks.1.0.in_layers.2.weight' has shape"),
    ("nan", "'input_blocks.1.0.in_layers.2.weight' contains NaN"),
    ("inf", "'input_blocks.1.0.in_layers.2.weight' contains NaN or Inf"),
    ("integer", "'input_blocks.1.0.in_layers.2.weight' has dtype"),
])
def test_strict_validation_names_first_bad_key_and_writes_nothing(tmp_path, how, message):
    cfg = small("64x64")
    src = write_openai(tmp_path / "bad.pt", _broken(reference_model(cfg).state_dict(), how))
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(".", r"\.")):
        convert_checkpoint(src, tmp_path / "out.safetensors", config=cfg)
    assert _only(tmp_path) == ["bad.pt"]


def test_mmagic_errors_name_the_key_in_the_file(tmp_path):
    cfg = small("64x64")
    state = reference_model(cfg).state_dict()
    state["input_blocks.1.0.in_layers.2.weight"] = torch.zeros(1)
    src = write_mmagic(tmp_path / "bad.pth", unet=state)
    with pytest.raises(ConversionError, match=r"'unet\.in_blocks\.1\.0\.conv_1\.2\.weight'"):
        convert_checkpoint(src, config=cfg)
    del state["input_blocks.1.0.in_layers.2.weight"]  # a missing one: named as the file would name it
    src = write_mmagic(tmp_path / "bad.pth", unet=state)
    with pytest.raises(ConversionError, match=r"'unet\.in_blocks\.1\.0\.conv_1\.2\.weight' \(= "
                                              r"'input_blocks\.1\.0\.in_layers\.2\.weight'\) is missing"):
        convert_checkpoint(src, config=cfg)


def test_float16_overflow_is_refused(tmp_path):
    cfg = small("64x64")
    state = reference_model(cfg).state_dict()
    state["out.2.bias"] = torch.full_like(state["out.2.bias"], 1e6)
    src = write_openai(tmp_path / "big.pt", state)
    with pytest.raises(ConversionError, match="'out.2.bias' overflows float16"):
        convert_checkpoint(src, config=cfg, dtype="float16")
    assert _only(tmp_path) == ["big.pt"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype(tmp_path, dtype):
    from safetensors import safe_open

    cfg = small("256x256")
    ref = reference_model(cfg)
    out = convert_checkpoint(write_openai(tmp_path / "m.pt", ref.state_dict()), config=cfg, dtype=dtype)["unet"]
    with safe_open(str(out), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    assert read_metadata(out)["adm_dtype"] == dtype


def test_metadata_overwrite_and_rerun(tmp_path):
    cfg = small("64x64")
    src = write_openai(tmp_path / "m.pt", reference_model(cfg).state_dict())
    out = convert_checkpoint(src, config=cfg)["unet"]
    meta = read_metadata(out)
    assert meta["adm_source_file"] == "m.pt" and meta["adm_source_sha256"] == sha256_file(src)
    assert json.loads(meta["adm_config"]) == cfg.to_dict() and meta["adm_role"] == "unet"
    stamp = out.stat().st_mtime_ns
    assert convert_checkpoint(src, config=cfg)["unet"] == out  # same input, same output: a no-op
    assert out.stat().st_mtime_ns == stamp
    with pytest.raises(WeightsError, match="--force"):
        convert_checkpoint(src, config=cfg, dtype="float16")
    convert_checkpoint(src, config=cfg, dtype="float16", force=True)
    assert read_metadata(out)["adm_dtype"] == "float16"


def test_tied_tensors_are_stored_twice(tmp_path):
    """One tensor under two names (torch.save keeps the sharing) is a legitimate checkpoint."""
    cfg = small("64x64")
    state = reference_model(cfg).state_dict()
    w, b = "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.0.bias"
    state[b] = state[w]
    src = write_openai(tmp_path / "tied.pt", state)
    loaded = load_checkpoint(src)
    assert loaded[w].untyped_storage().data_ptr() == loaded[b].untyped_storage().data_ptr()
    model = load_model(convert_checkpoint(src, config=cfg)["unet"])
    params = dict(model.named_parameters())
    assert torch.equal(params[w], state[w]) and torch.equal(params[b], state[w])


@pytest.mark.parametrize("how,message", [
    ("int-key", r"^odd.pt: key 7 \(int\) is not a tensor name$"),
    ("meta", r"^odd.pt: tensor 'out.2.bias' is on the meta device"),
    ("sparse", r"^odd.pt: tensor 'out.2.bias' is a torch.sparse_coo tensor"),
])
def test_malformed_tensors_are_refused(tmp_path, how, message):
    cfg = small("64x64")
    state = reference_model(cfg).state_dict()
    if how == "int-key":
        state[7] = torch.zeros(1)
    elif how == "meta":
        state["out.2.bias"] = torch.empty(state["out.2.bias"].shape, device="meta")
    else:
        state["out.2.bias"] = state["out.2.bias"].to_sparse()
    src = write_openai(tmp_path / "odd.pt", state)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(src, config=cfg)
    assert _only(tmp_path) == ["odd.pt"]


def test_a_safetensors_source_is_never_its_own_output(tmp_path):
    from safetensors.torch import save_file

    cfg = small("64x64")
    ref = reference_model(cfg)
    src = tmp_path / "third.safetensors"
    save_file(ref.state_dict(), str(src))
    before = src.read_bytes()
    assert convert_checkpoint(src, config=cfg) == {"unet": tmp_path / "third.adm.safetensors"}
    _assert_same_outputs(tmp_path / "third.adm.safetensors", ref, cfg)
    assert convert_checkpoint(src, config=cfg)["unet"] == tmp_path / "third.adm.safetensors"  # a no-op rerun
    for dst in (src, tmp_path / "." / "third.safetensors"):
        with pytest.raises(ConversionError, match="is the source file itself"):
            convert_checkpoint(src, dst, config=cfg, force=True)
    pt = write_openai(tmp_path / "m.pt", ref.state_dict())
    pt_bytes = pt.read_bytes()
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    result = CliRunner().invoke(app, ["convert-weights", str(pt), str(pt), "--config", str(tmp_path / "c.json"),
                                      "--force"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "source file itself" in result.output
    assert src.read_bytes() == before and pt.read_bytes() == pt_bytes


@pytest.mark.parametrize("family", ["64x64", "64x64_classifier"])
def test_a_file_adm_converted_converts_again_from_its_metadata(tmp_path, family):
    """Its architecture is in its adm_config metadata: converting it to another dtype needs no
    --config (it was refused as a file whose architecture cannot be read from its tensors)."""
    from safetensors.torch import load_file

    cfg = small(family)
    ref = reference_model(cfg)
    first = convert_checkpoint(write_openai(tmp_path / "m.pt", ref.state_dict()), config=cfg)
    (role, path), = first.items()
    result = CliRunner().invoke(app, ["convert-weights", str(path), "--dtype", "float16", "-q"])
    assert result.exit_code == 0, result.output
    again = tmp_path / "m.float16.safetensors"  # its name says the new dtype (not m.adm.safetensors)
    meta = read_metadata(again)
    assert json.loads(meta["adm_config"]) == cfg.to_dict() and meta["adm_role"] == role
    assert meta["adm_dtype"] == "float16" and meta["adm_source_file"] == "m.safetensors"
    want, got = load_file(str(path)), load_file(str(again))
    assert got.keys() == want.keys()
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], want[k].half()) for k in want)
    assert convert_checkpoint(path, dtype="float16") == {role: again}  # up to date: a no-op
    assert load_model(again).config == cfg
    # and back: the dtype in the name is replaced, not stacked (m.float16.bfloat16...)
    assert convert_checkpoint(again, dtype="bfloat16") == {role: tmp_path / "m.bfloat16.safetensors"}
    assert read_metadata(tmp_path / "m.bfloat16.safetensors")["adm_dtype"] == "bfloat16"
    result = CliRunner().invoke(app, ["convert-weights", str(again), "--dtype", "float16"])
    assert result.exit_code == 1 and result.output == ("error: m.float16.safetensors is adm's layout in float16 "
                                                       "already: nothing to convert (give another --dtype, or an "
                                                       "output)\n")


def test_metadata_of_another_network_is_refused(tmp_path):
    from adm_cli.weights import save_weights

    unet = reference_model(small("64x64")).state_dict()
    src = save_weights(tmp_path / "odd.safetensors", unet, small("64x64_classifier"))  # config of another network
    with pytest.raises(ConversionError, match="^odd.safetensors holds unet, but its adm_config metadata describes "
                                              "a classifier$"):
        convert_checkpoint(src, dtype="float16")
    assert _only(tmp_path) == ["odd.safetensors"]


def test_a_safetensors_file_of_another_converter_still_needs_its_architecture(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "other.safetensors"
    save_file(reference_model(small("64x64")).state_dict(), str(src))  # no adm_config metadata
    with pytest.raises(ConversionError, match="cannot be read from its tensors"):
        convert_checkpoint(src)
    assert _only(tmp_path) == ["other.safetensors"]


def test_cli_trailing_slash_makes_a_folder(tmp_path):
    cfg = small("64x64")
    src = write_openai(tmp_path / "m.pt", reference_model(cfg).state_dict())
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    result = CliRunner().invoke(app, ["convert-weights", str(src), str(tmp_path / "new") + "/",
                                      "--config", str(tmp_path / "c.json"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new").is_dir() and _only(tmp_path / "new") == ["m.safetensors"]
    assert read_metadata(tmp_path / "new" / "m.safetensors")["adm_source_file"] == "m.pt"


@pytest.mark.parametrize("flag,value,message", [
    ("num_channels", "x", "num_channels: expected an integer, got 'x'"),
    ("image_size", "abc", "image_size: expected an integer, got 'abc'"),
    ("num_classes", "many", "num_classes: expected an integer, got 'many'"),
    ("small_size", "a", "small_size: expected an integer, got 'a'"),
    ("num_res_blocks", 2.5, "num_res_blocks: expected an integer, got 2.5"),
    ("num_channels", None, "num_channels: expected a value, got null"),
    ("dropout", None, "dropout: expected a value, got null"),
    ("dropout", "high", "dropout: expected a number, got 'high'"),
    ("dropout", 1.5, "dropout: must be between 0 and 1, got 1.5"),
    ("attention_resolutions", "16,0", "attention_resolutions: every resolution must be positive, got '16,0'"),
    ("channel_mult", "0,1,2", "channel_mult: every multiplier must be positive, got '0,1,2'"),
    ("num_head_channels", 0, "num_head_channels: must be positive (or -1), got 0"),
    ("num_channels", 0, "num_channels: must be positive, got 0"),
    ("small_size", -8, "small_size: must be 0 or positive, got -8"),
    ("noise_schedule", {"a": 1}, "noise_schedule: expected a string"),
])
def test_config_values_of_the_wrong_type_or_size(tmp_path, flag, value, message):
    """One ConfigError naming the flag and the value, before any model is built (a zero-channel
    model made torch warn before the error)."""
    cfg = small("64x64")
    src = write_openai(tmp_path / "m.pt", reference_model(cfg).state_dict())
    flags = {k: v for k, v in cfg.to_dict().items() if k != "kind"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            convert_checkpoint(src, config={**flags, flag: value})
    assert _only(tmp_path) == ["m.pt"]


def test_config_errors_in_the_cli_and_for_classifiers(tmp_path):
    cfg = small("64x64")
    src = write_openai(tmp_path / "m.pt", reference_model(cfg).state_dict())
    (tmp_path / "c.json").write_text(json.dumps({**cfg.to_dict(), "num_channels": "x"}))
    result = CliRunner().invoke(app, ["convert-weights", str(src), "--config", str(tmp_path / "c.json")])
    assert result.exit_code == 1 and result.output == "error: num_channels: expected an integer, got 'x'\n"
    flags = {k: v for k, v in small("64x64_classifier").to_dict().items() if k != "kind"}
    with pytest.raises(ConfigError, match=r"^num_head_channels: must be positive, got -1"):  # no num_heads here
        ClassifierConfig.from_flags({**flags, "num_head_channels": -1})
    with pytest.raises(ConfigError, match=r"^classifier_width: must be positive, got '0'"):
        ClassifierConfig.from_flags({**flags, "classifier_width": "0"})


def test_flags_that_change_the_output_meaning_are_refused(tmp_path):
    """predict_xstart and rescale_timesteps are not architecture: dropped silently, they gave
    wrong samples (x0 read as eps; timesteps not rescaled for T != 1000)."""
    cfg = small("64x64")
    src = write_openai(tmp_path / "m.pt", reference_model(cfg).state_dict())
    flags = {k: v for k, v in cfg.to_dict().items() if k != "kind"}
    with pytest.raises(ConfigError, match="^predict_xstart = true"):
        convert_checkpoint(src, config={**flags, "predict_xstart": "True"})
    with pytest.raises(ConfigError, match="^rescale_timesteps = true with diffusion_steps = 4000"):
        convert_checkpoint(src, config={**flags, "rescale_timesteps": True, "diffusion_steps": 4000})
    assert _only(tmp_path) == ["m.pt"]
    # their defaults, and rescaling at T = 1000 (the identity), are fine
    assert UNetConfig.from_flags({**flags, "predict_xstart": False, "rescale_timesteps": True}) == cfg
    clf = {k: v for k, v in small("64x64_classifier").to_dict().items() if k != "kind"}
    with pytest.raises(ConfigError, match="^rescale_timesteps"):
        ClassifierConfig.from_flags({**clf, "rescale_timesteps": "true", "diffusion_steps": 4000})


# -- never run pickled code ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "legacy", "mmagic-hub", "pickle"])
@pytest.mark.parametrize("kind", ["os.system", "subprocess.Popen", "builtins.exec", "builtins.eval"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, fmt, kind):
    marker = tmp_path / "pwned"
    src = write_malicious(tmp_path / "evil.pt", payloads(marker)[kind], fmt)
    assert pickle_globals(src) & {"posix.system", "nt.system", "subprocess.Popen", "builtins.exec", "builtins.eval"}
    with pytest.raises(UnsafePickleError, match="refused"):
        convert_checkpoint(src, config=small("64x64"))
    assert not marker.exists()
    assert _only(tmp_path) == ["evil.pt"]


def test_cli_refuses_malicious_file_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    src = write_malicious(tmp_path / "evil.pt", payloads(marker)["os.system"], "zip")
    result = CliRunner().invoke(app, ["convert-weights", str(src), "--arch", "64x64_diffusion"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "refused" in result.output and "system" in result.output
    assert not marker.exists()


def test_a_plain_pickle_loads_without_torchs_protocol_warning(tmp_path):
    """A non-zip pickle of protocol 4 made torch warn, in two lines above our own, of
    instructions its restricted reader might not support."""
    state = {"w": torch.arange(3.0)}
    with open(tmp_path / "plain.pt", "wb") as f:
        torch.save(state, f, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = load_checkpoint(tmp_path / "plain.pt")
    assert torch.equal(got["w"], state["w"]) and not [w for w in seen if "pickle protocol" in str(w.message)]


# -- files that are no checkpoint ----------------------------------------------------------------


def _zip_checkpoint() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    return buf.getvalue()


def _safetensors() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.arange(4.0)})


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, samples=np.zeros((2, 8, 8, 3), np.uint8))
    return buf.getvalue()


NOT_CHECKPOINTS = {  # name: (file name, its bytes, what adm must say it is)
    "empty": ("m.pt", lambda: b"", "is not a checkpoint: the file is empty"),
    "html": ("m.pt", lambda: b"\n  <!DOCTYPE html><html><body>Access denied</body></html>",
             "is not a checkpoint: it is an HTML page (an error or login page saved in place of the download?)"),
    "lfs": ("m.pt", lambda: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
            "is not a checkpoint: it is a Git LFS pointer"),
    "json": ("m.pt", lambda: b'{"image_size": 64, "num_channels": 192, "num_res_blocks": 3}',
             """is not a checkpoint: it is a text file (it begins '{"image_size": 64, "num_channels": 192, '...)"""),
    "gzip": ("m.pt", lambda: gzip.compress(_zip_checkpoint()), "is not a checkpoint: it is a gzip file"),
    "npz": ("m.pt", _npz, "is not a checkpoint: it is a NumPy archive (.npz)"),
    "zip-cut": ("m.pt", lambda: _zip_checkpoint()[:300], "is not a checkpoint: it is a zip archive that is cut short"),
    "binary": ("m.pt", lambda: bytes(range(7, 200)), "is not a checkpoint: its first bytes (07 08 09 0a 0b 0c 0d 0e) "
               "are neither torch's formats nor safetensors"),
    "safetensors-cut": ("m.safetensors", lambda: _safetensors()[:-3], "is not a checkpoint: it is cut short ("),
    "header-cut": ("m.safetensors", lambda: _safetensors()[:20],
                   "is not a checkpoint: it is cut short (a safetensors header of"),
    "safetensors-as-pt": ("m.pt", _safetensors, "is a safetensors file: name it m.safetensors"),
    "torch-as-safetensors": ("m.safetensors", _zip_checkpoint,
                             "is a torch checkpoint (a zip archive), not a safetensors file: name it m.pt"),
}


@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path, case):
    """torch's and safetensors' own words for these ("invalid load key, '<'", "header too
    small", "failed finding central directory") do not say what went wrong: the converter (before
    torch reads the file), torch's loader (the cache's downloads go through it) and the metadata
    reader say what the file is instead, and nothing is written."""
    name, content, words = NOT_CHECKPOINTS[case]
    src = tmp_path / name
    src.write_bytes(content())
    expected = "^" + re.escape(f"{name} {words}")
    assert describe(src) is not None and re.match(expected, describe(src))
    with pytest.raises(FileFormatError, match=expected):
        convert_checkpoint(src, arch="64x64_diffusion")
    if src.suffix == ".safetensors":
        with pytest.raises(WeightsError, match=expected):
            read_metadata(src)
    else:
        with pytest.raises(FileFormatError, match=expected):
            load_checkpoint(src)
    assert _only(tmp_path) == [name]


def test_a_file_that_cannot_be_read_is_said_in_one_line(tmp_path, monkeypatch):
    """An unreadable file (no permission; root reads through those, so open is made to fail as
    it fails for other users) is a ConversionError, which the CLI turns into one line, not an
    OSError's traceback; the loaders' own messages are kept for it."""
    from adm_cli import formats

    src = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2)}, src)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(formats, "open", refuse, raising=False)
    with pytest.raises(ConversionError, match=f"^cannot read {re.escape(str(src))}: Permission denied$"):
        convert_checkpoint(src, arch="64x64_diffusion")
    assert describe(src) is None


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_what_torch_and_safetensors_write_passes_the_format_check(tmp_path, fmt):
    """The other side: the formats adm reads pass, and a file whose first bytes look right but
    which is damaged further in keeps its parser's own message."""
    src = tmp_path / ("m.safetensors" if fmt == "safetensors" else "m.pt")
    if fmt == "safetensors":
        src.write_bytes(_safetensors())
    else:
        torch.save({"w": torch.arange(4.0)}, src, _use_new_zipfile_serialization=fmt == "zip")
    assert check_format(src) == ("safetensors" if fmt == "safetensors" else "torch") and describe(src) is None
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x80\x02" + bytes(range(40)))  # a pickle's first bytes, then no pickle
    assert describe(broken) is None
    with pytest.raises(ConversionError, match=r"^broken.pt is not a readable torch checkpoint \("):
        load_checkpoint(broken)


# -- CLI and files given by path -------------------------------------------------------------------


def test_convert_weights_help_documents_every_option():
    result = CliRunner().invoke(app, ["convert-weights", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--arch", "--config", "--dtype", "--force", "--quiet"):
        assert option in result.output
    assert result.output.count("default") >= 6


def test_cli_adm_g_with_two_arch_flags_is_refused_without_both(tmp_path):
    unet_cfg, clf_cfg = small("64x64"), small("64x64_classifier")
    src = write_mmagic(tmp_path / "g.pth", unet=reference_model(unet_cfg).state_dict(),
                       classifier=reference_model(clf_cfg).state_dict())
    (tmp_path / "u.json").write_text(json.dumps(unet_cfg.to_dict()))
    result = CliRunner().invoke(app, ["convert-weights", str(src), "--config", str(tmp_path / "u.json")])
    assert result.exit_code == 1 and "holds a classifier" in result.output
    assert _only(tmp_path) == ["g.pth", "u.json"]


def test_ensure_converted_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "home"))
    cfg = small("256x256")
    ref = reference_model(cfg)
    src = write_openai(tmp_path / "custom.pt", ref.state_dict())
    (tmp_path / "c.json").write_text(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "kind"}))
    out = ensure_converted_file(src, config=str(tmp_path / "c.json"), quiet=True)
    assert out.is_relative_to(tmp_path / "home") and out.name == "unet.safetensors"
    _assert_same_outputs(out, ref, cfg)
    stamp = out.stat().st_mtime_ns
    assert ensure_converted_file(src, config=str(tmp_path / "c.json"), quiet=True) == out
    assert out.stat().st_mtime_ns == stamp
    assert ensure_converted_file(out) == out  # already canonical
    with pytest.raises(WeightsError, match="not a classifier"):
        ensure_converted_file(src, config=str(tmp_path / "c.json"), role="classifier")


def test_a_damaged_conversion_of_a_file_given_by_path_is_made_again(tmp_path, monkeypatch, capsys):
    """`adm sample --weights x.pt` converts x.pt once into the cache. Bytes changed there since
    (same size, new mtime) are noticed by the sha256 recorded at writing, and the file is
    converted again instead of being sampled from (it was used as it was, silently)."""
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "home"))
    cfg = small("64x64")
    ref = reference_model(cfg)
    src = write_openai(tmp_path / "custom.pt", ref.state_dict())
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    out = ensure_converted_file(src, config=str(tmp_path / "c.json"), quiet=True)
    good = out.read_bytes()
    with open(out, "r+b") as f:  # a flip inside the tensor data
        f.seek(len(good) - 1000)
        f.write(bytes(b ^ 0xFF for b in good[-1000:-900]))
    damaged = out.read_bytes()
    assert damaged != good
    assert ensure_converted_file(src, config=str(tmp_path / "c.json")) == out
    assert out.read_bytes() != damaged  # (not byte-equal to the first: safetensors orders metadata freely)
    assert f"{out} does not match what was written: converting custom.pt again" in capsys.readouterr().err
    _assert_same_outputs(out, ref, cfg)


def test_a_conversion_cut_between_two_networks_is_redone(tmp_path, monkeypatch):
    """A run killed after writing the U-Net of a two-network file, before its classifier, left a
    folder that was then taken as complete ("holds unet, not a classifier", forever)."""
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "home"))
    unet_cfg, clf_cfg = small("64x64"), small("64x64_classifier")
    src = write_mmagic(tmp_path / "g.pth", unet=reference_model(unet_cfg).state_dict(),
                       classifier=reference_model(clf_cfg).state_dict())
    arch = [json.dumps(unet_cfg.to_dict()), json.dumps(clf_cfg.to_dict())]
    (tmp_path / "u.json").write_text(arch[0])
    (tmp_path / "c.json").write_text(arch[1])
    conf = {"unet": tmp_path / "u.json", "classifier": tmp_path / "c.json"}
    (tmp_path / "both.toml").write_text("".join(
        f"[{role}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in json.loads(p.read_text()).items()
                                if k != "kind") for role, p in conf.items()))
    unet = ensure_converted_file(src, config=str(tmp_path / "both.toml"), quiet=True)
    folder = unet.parent
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "classifier.safetensors", "classifier.safetensors.json",
                                                        "roles.json", "unet.safetensors", "unet.safetensors.json"]
    (folder / "classifier.safetensors").unlink()
    (folder / "roles.json").unlink()  # as the kill left it
    clf = ensure_converted_file(src, config=str(tmp_path / "both.toml"), role="classifier", quiet=True)
    assert load_model(clf).config == clf_cfg and load_model(unet).config == unet_cfg


def test_metadata_that_is_json_but_no_object_is_one_line(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"adm_config": "[1, 2]"})
    for args in (["convert-weights", str(path), str(tmp_path / "out.safetensors")],):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert "bad adm_config metadata (a JSON list, not an object)" in result.output


def test_a_full_disk_while_writing_a_conversion_is_one_line(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    src = write_openai(tmp_path / "m.pt", reference_model(small("64x64")).state_dict())
    (tmp_path / "c.json").write_text(json.dumps(small("64x64").to_dict()))
    result = CliRunner().invoke(app, ["convert-weights", str(src), str(tmp_path) + "/out/", "--config",
                                      str(tmp_path / "c.json")])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "cannot write" in result.output and "No space left on device" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
