"""adm-cli: OpenAI's ADM (guided diffusion) models: fetch, convert, sample.

The Python API lives in :mod:`adm_cli.api`; the building blocks are importable on their own:
``config`` (architectures), ``models`` (networks), ``schedule`` / ``samplers`` / ``guidance``
(diffusion), ``weights`` (the canonical safetensors files).
"""

from .api import SamplerSettings, Samples, generate, load_model, sample_batch, to_uint8
from .config import PRESETS, ClassifierConfig, UNetConfig, get_preset
from .errors import AdmError
from .models import Classifier, UNet, build_model

__version__ = "0.1.0"

__all__ = [
    "AdmError", "Classifier", "ClassifierConfig", "PRESETS", "SamplerSettings", "Samples", "UNet",
    "UNetConfig", "build_model", "generate", "get_preset", "load_model", "sample_batch", "to_uint8",
]
