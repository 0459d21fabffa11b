"""The registry (weights.toml): every published file, its facts, the paper's defaults, validation."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adm_cli import cache, cli_weights, registry  # noqa: F401 - cli_weights registers the commands
from adm_cli.cache import cache_root, ensure_weights
from adm_cli.cli import app
from adm_cli.config import PRESETS
from adm_cli.errors import RegistryError, WeightsError
from adm_cli.registry import load_registry
from adm_cli.weights import save_weights
from publishers import one_thread  # noqa: F401 - autouse fixture
from publishers import preset_shapes, reference_model, small

OPENAI = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
OPENAI_FILES = [
    "64x64_classifier.pt", "64x64_diffusion.pt", "128x128_classifier.pt", "128x128_diffusion.pt",
    "256x256_classifier.pt", "256x256_diffusion.pt", "256x256_diffusion_uncond.pt", "512x512_classifier.pt",
    "512x512_diffusion.pt", "64_256_upsampler.pt", "128_512_upsampler.pt", "lsun_bedroom.pt", "lsun_cat.pt",
    "lsun_horse.pt", "lsun_horse_nodropout.pt",
]
MMAGIC = "https://download.openmmlab.com/mmediting/"
MMAGIC_FILES = {  # path -> (roles it holds, preset of each)
    "guided_diffusion/adm-u-cvt-rgb_8xb32_imagenet-64x64-7ff0080b.pth": {"unet": "64x64_diffusion"},
    "guided_diffusion/adm-g_8xb32_imagenet-64x64-2c0fbeda.pth": {"unet": "64x64_diffusion", "classifier": "64x64_classifier"},
    "guided_diffusion/adm_8xb32_imagenet-256x256-f94735fe.pth": {"unet": "256x256_diffusion"},
    "guided_diffusion/adm-g_8xb32_imagenet-256x256-aec3fc9f.pth": {"unet": "256x256_diffusion", "classifier": "256x256_classifier"},
    "guided_diffusion/adm-u_8xb32_imagenet-512x512-60b381cb.pth": {"unet": "512x512_diffusion"},
    "guided_diffusion/adm-g_8xb32_imagenet-512x512-23cf0b58.pth": {"unet": "512x512_diffusion", "classifier": "512x512_classifier"},
    "synthesizers/disco/adm-u_finetuned_imagenet-512x512-ab471d70.pth": {"unet": "512x512_diffusion_uncond_finetune_008100"},
    "synthesizers/disco/adm-u-cvt-rgb_finetuned_imagenet-256x256-f0f6e11b.pth": {"unet": "256x256_diffusion_uncond"},
    "synthesizers/disco/adm-u-cvt-rgb_portrait-v001-f4a3f3bc.pth": {"unet": "portrait_512_w128"},
}


@pytest.fixture
def reg(monkeypatch):
    monkeypatch.delenv("ADM_REGISTRY", raising=False)
    return load_registry()


def test_one_entry_per_published_file(reg):
    published = [e for e in reg.entries if not e.bundled]
    assert len(published) == 15 + 1 + 9 == len({e.filename for e in published})
    urls = {u for e in published for u in e.urls}
    assert {OPENAI + f for f in OPENAI_FILES} <= urls
    assert {MMAGIC + p for p in MMAGIC_FILES} <= urls
    for f in OPENAI_FILES:
        assert reg.get(f.removesuffix(".pt")).publisher == "openai"
    assert reg.get("mmagic-adm-g-imagenet-256").filename == "adm-g_8xb32_imagenet-256x256-aec3fc9f.pth"


def test_published_checksums_and_sizes(reg):
    uncond = reg.get("256x256_diffusion_uncond")
    assert uncond.sha256 == "a37c32fffd316cd494cf3f35b339936debdc1576dad13fe57c42399a5dbc78b1"
    assert uncond.size == 2211383297
    finetune = reg.get("512x512_diffusion_uncond_finetune_008100")
    assert finetune.sha256 == "9c111ab89e214862b76e1fa6a1b3f1d329b1a88281885943d2cdbe357ad57648"
    assert finetune.urls == ("https://huggingface.co/lowlevelware/512x512_diffusion_unconditional_ImageNet"
                             "/resolve/main/512x512_diffusion_uncond_finetune_008100.pt",)
    for e in reg.entries:
        if e.publisher == "mmagic":  # OpenMMLab's convention: the name ends with the hash prefix
            assert e.sha256 == re.search(r"-([0-9a-f]{8})\.pth$", e.filename).group(1)
            assert dict(e.roles) == MMAGIC_FILES[e.urls[0].removeprefix(MMAGIC)]


def test_architectures_and_parameter_counts_match_the_presets(reg):
    """Parameter counts (OpenAI's published numbers) equal what each entry's presets build."""
    for e in reg.entries:
        if e.bundled:
            continue
        assert all(p in PRESETS for p in e.roles.values())
        count = sum(sum(map(_numel, preset_shapes(p).values())) for p in e.roles.values())
        assert count == e.params, e.name
        assert {cfg.noise_schedule for cfg in e.configs.values()} == {e.noise_schedule}
        assert {cfg.image_size for cfg in e.configs.values()} == {e.resolution}
    assert reg.get("64x64_diffusion").noise_schedule == "cosine"
    assert {e.roles["unet"] for e in reg.entries if e.name.startswith("lsun_")} == {"lsun_256"}
    assert reg.get("mmagic-disco-portrait-v001").roles["unet"] == "portrait_512_w128"


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def test_paper_defaults(reg):
    assert [reg.default_for(r).name for r in (64, 128, 256, 512)] == [
        "64x64_diffusion", "128x128_diffusion", "256x256_diffusion", "512x512_diffusion"]
    scales = {"64x64_diffusion": 1.0, "128x128_diffusion": 0.5, "256x256_diffusion": 1.0, "512x512_diffusion": 4.0,
              "256x256_diffusion_uncond": 10.0}
    for name, scale in scales.items():
        e = reg.get(name)
        assert (e.guidance, e.sampler, e.steps) == (scale, "ddpm", 250)
        assert e.classifier == f"{e.resolution}x{e.resolution}_classifier"
        assert reg.get(e.classifier).role() == "classifier"
    assert reg.get("mmagic-adm-g-imagenet-256").classifier == "mmagic-adm-g-imagenet-256"
    assert (reg.get("64_256_upsampler").upsampler_base, reg.get("128_512_upsampler").upsampler_base) == (64, 128)
    assert reg.get("lsun_cat").guidance is None and not reg.get("lsun_cat").class_cond


def test_unknown_names_suggest_close_matches(reg):
    with pytest.raises(RegistryError, match="did you mean 256x256_diffusion"):
        reg.get("256x256_difusion")
    with pytest.raises(RegistryError, match="64, 128, 256, 512"):
        reg.default_for(100)
    with pytest.raises(RegistryError, match="64x64_diffusion holds unet, not a classifier"):
        reg.get("64x64_diffusion").role("classifier")


def test_bundled_entries(reg, tmp_path, monkeypatch):
    demo = reg.get("demo-digits")
    assert (demo.publisher, demo.path, demo.urls, demo.resolution, demo.num_classes) == (
        "bundled", "demo/demo-digits.safetensors", (), 32, 10)
    assert (demo.classifier, demo.sampler, demo.steps, demo.guidance) == ("demo-digits-classifier", "ddim", 50, 0.0)
    assert dict(demo.roles) == {"unet": None} and demo.config_for("unet") is None
    assert reg.get("demo-digits-classifier").role() == "classifier"
    assert not reg.get("demo-digits-uncond").class_cond
    monkeypatch.setattr(registry, "PACKAGE_DIR", tmp_path)
    with pytest.raises(WeightsError, match="bundled file demo/demo-digits.safetensors is missing"):
        ensure_weights("demo-digits")
    cfg = small("64x64")
    path = save_weights(tmp_path / "demo" / "demo-digits.safetensors", reference_model(cfg).state_dict(), cfg)
    assert ensure_weights("demo-digits", offline=True) == path
    assert cache.cache_status(demo) == cache.CacheStatus(True, True)


@pytest.mark.parametrize("text,message", [
    ('["x"]\npublisher = "openai"\nurls = ["http://h/x.pt"]\nroles = { unet = "64x64_diffusion" }\nnoise_schedule = "cosine"\nsha = "1"\n', "unknown key"),
    ('["x"]\npublisher = "openai"\nurls = ["http://h/x.pt"]\nroles = { unet = "64x64_diffusion" }\nnoise_schedule = "cosine"\nsha256 = "xyz"\n', "hex"),
    ('["x"]\npublisher = "openai"\nurls = ["http://h/x.pt"]\nroles = { unet = "64x64_diffusion" }\n', "noise_schedule is required"),
    ('["x"]\npublisher = "openai"\nurls = ["http://h/x.pt"]\nroles = { unet = "64x64_diffusion" }\nnoise_schedule = "linear"\n', "disagrees"),
    ('["x"]\npublisher = "openai"\nurls = ["http://h/x.pt"]\nroles = { unet = "64x64_difusion" }\nnoise_schedule = "cosine"\n', "did you mean"),
    ('["x"]\npublisher = "openai"\nurls = ["http://h/x.pt"]\nroles = ["unet"]\nnoise_schedule = "cosine"\n', "only bundled"),
    ('["x"]\npublisher = "bundled"\nurls = ["http://h/x.pt"]\npath = "p"\nroles = ["unet"]\n', "no `urls`"),
    ('["x"]\npublisher = "openai"\nurls = ["http://h/x.pt"]\nroles = { unet = "64x64_diffusion" }\nnoise_schedule = "cosine"\nclassifier = "x"\n', "holds no classifier"),
    ('["a"]\npublisher = "bundled"\npath = "p"\nroles = ["unet"]\nresolution = 8\ndefault = true\n'
     '["b"]\npublisher = "bundled"\npath = "q"\nroles = ["unet"]\nresolution = 8\ndefault = true\n', "both default"),
])
def test_malformed_registry_is_rejected(tmp_path, text, message):
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(RegistryError, match=message):
        load_registry(tmp_path / "r.toml")


_X = '["x"]\npublisher = "openai"\nurls = ["http://h/x.pt"]\nroles = { unet = "64x64_diffusion" }\nnoise_schedule = "cosine"\n'


@pytest.mark.parametrize("line,message", [
    ('resolution = "abc"', "resolution must be a positive integer, got 'abc'"),
    ("resolution = -3", "resolution must be a positive integer, got -3"),
    ('guidance = "high"', "guidance must be a non-negative number, got 'high'"),
    ("guidance = -1.0", "guidance must be a non-negative number, got -1.0"),
    ('num_classes = "many"', "num_classes must be a positive integer, got 'many'"),
    ('class_cond = "false"', "class_cond must be true or false, got 'false'"),
    ("classifier = 3", "classifier must be a registry name, got 3"),
    ("urls = [1]", "urls must be a list of http(s):// or file:// URLs, got [1]"),
    ('urls = "http://h/x.pt"', "urls must be a list of http(s):// or file:// URLs, got 'http://h/x.pt'"),
    ('urls = ["h/x.pt"]', "urls must be a list of"),
    ('urls = ["s3://bucket/x.pt"]', "urls must be a list of"),
])
def test_wrongly_typed_values_are_rejected_on_load(tmp_path, line, message):
    """Each names the entry and the field, in one line, for every command (`adm models` too)."""
    key = line.split(" ")[0]
    text = "\n".join(l for l in _X.splitlines() if not l.startswith(key + " ")) + "\n" + line + "\n"
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(RegistryError, match=re.escape(f"registry entry 'x': {message}")):
        load_registry(tmp_path / "r.toml")
    result = CliRunner().invoke(app, ["models"], env={"ADM_REGISTRY": str(tmp_path / "r.toml")})
    assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output


def test_well_typed_values_load(tmp_path):
    text = _X.replace('urls = ["http://h/x.pt"]', 'urls = ["file:///srv/x.pt", "https://h/x.pt"]')
    (tmp_path / "r.toml").write_text(text + "resolution = 64\nguidance = 2\nnum_classes = 10\nclass_cond = true\n")
    e = load_registry(tmp_path / "r.toml").get("x")
    assert (e.urls, e.resolution, e.guidance, e.num_classes, e.class_cond) == (
        ("file:///srv/x.pt", "https://h/x.pt"), 64, 2.0, 10, True)


def test_toplevel_weights_toml_is_the_packaged_file():
    top = Path(__file__).resolve().parents[1] / "weights.toml"
    assert top.is_symlink() and top.resolve() == (Path(registry.__file__).parent / "weights.toml").resolve()


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "h"))
    assert cache_root() == tmp_path / "h"
    monkeypatch.delenv("ADM_HOME")
    monkeypatch.setattr(cache.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "adm-cli"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "adm-cli"
    monkeypatch.setattr(cache.sys, "platform", "darwin")
    assert cache_root() == Path.home() / "Library" / "Caches" / "adm-cli"
    monkeypatch.setattr(cache.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache_root() == tmp_path / "local" / "adm-cli" / "Cache"


def test_adm_models_lists_every_entry(reg, tmp_path):
    result = CliRunner().invoke(app, ["models"], env={"ADM_HOME": str(tmp_path), "COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for e in reg.entries:
        assert re.search(rf"│ {re.escape(e.name)}( \*)? +│ {e.resolution} ", result.output), e.name
    assert "2.21 GB" in result.output and "bundled" in result.output
    assert "256x256_diffusion *" in result.output


def test_adm_models_piped_is_not_cut_to_80_columns(tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(app, ["models"], env={"ADM_HOME": str(tmp_path)})
    assert result.exit_code == 0 and "…" not in result.output, result.output
    assert re.search(r"│ 64x64_classifier +│ 64 +│ - +│ classifier +│", result.output), result.output
