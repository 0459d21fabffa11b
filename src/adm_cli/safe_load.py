"""Read torch checkpoints without ever running code from the file.

Pickle rebuilds objects by calling whatever global the file names, so a checkpoint can run
``os.system`` on load. ``load_checkpoint`` therefore:

1. tries ``torch.load(weights_only=True)``: torch's own restricted unpickler, which reads every
   OpenAI file (plain state dicts, zip or legacy serialization);
2. if torch refuses, loads again through ``RestrictedUnpickler``, whose ``find_class`` returns
   - the few real torch/collections functions a state dict needs to rebuild its tensors;
   - an inert placeholder class for a short list of known-harmless foreign names (mmengine's
     ``HistoryBuffer``, numpy arrays/dtypes/scalars, ``builtins.getattr``, ...) that mmagic
     files pickle in ``message_hub``. The placeholder never imports or calls the real thing;
     its instances just swallow their arguments, so the tensors load and the rest is inert;
   - and raises ``UnsafePickleError`` for anything else, before it can be called.

The second pass hands our module to ``torch.load(pickle_module=...)``, so torch still does the
storage bookkeeping for both its zip and its legacy formats, while every global the pickle asks
for goes through our ``find_class``.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import ConversionError, FileFormatError, UnsafePickleError
from .formats import describe

# Real objects a tensor state dict needs: rebuild functions that only construct tensors.
# (Not torch._tensor._rebuild_from_type_v2: it calls a function named by the pickle, and plain
# state dicts never need it.)
_TORCH_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
}
_REAL = {("collections", "OrderedDict"): collections.OrderedDict}

# Foreign names seen in mmagic checkpoints' ``meta`` / ``message_hub``: mapped to placeholders.
_INERT = {
    ("mmengine.logging.history_buffer", "HistoryBuffer"), ("mmengine.config.config", "ConfigDict"),
    ("builtins", "getattr"), ("_codecs", "encode"), ("copyreg", "_reconstructor"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
_NUMPY_MODULES = {"numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"}
_NUMPY_FUNCTIONS = {"_reconstruct", "scalar", "_frombuffer"}
_NUMPY_SCALARS = re.compile(r"^(bool_?|u?int(8|16|32|64)?|float(16|32|64|128)?|complex(64|128|256)?|"
                            r"longlong|ulonglong|longdouble|clongdouble|str_|bytes_|object_|void)$")
_NUMPY_DTYPE_CLASS = re.compile(r"^[A-Z][A-Za-z0-9]*DType$")


class Inert:
    """Stands in for a foreign class or function: accepts any construction, state or items
    and keeps nothing that could run. Each allowed name gets its own subclass (for repr)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "Inert":
        return Inert()

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


_placeholders: dict[tuple[str, str], type] = {}


def _placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _placeholders:
        _placeholders[key] = type(f"Inert[{module}.{name}]", (Inert,), {"__module__": __name__})
    return _placeholders[key]


def _is_harmless_foreign(module: str, name: str) -> bool:
    if (module, name) in _INERT:
        return True
    if module in _NUMPY_MODULES:
        return name in _NUMPY_FUNCTIONS
    if module == "numpy":
        return bool(_NUMPY_SCALARS.match(name))
    if module == "numpy.dtypes":
        return bool(_NUMPY_DTYPE_CLASS.match(name))
    return False


def resolve_global(module: str, name: str) -> Any:
    """What a restricted load gets for the pickle's ``GLOBAL module name``; raises if refused."""
    # Protocol-2 pickles (torch's legacy format) spell Python 3 names the Python 2 way.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (module, name) in _REAL:
        return _REAL[(module, name)]
    if (module, name) in _TORCH_FUNCTIONS:
        return getattr(__import__(module, fromlist=[name]), name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if _is_harmless_foreign(module, name):
        return _placeholder(module, name)
    raise UnsafePickleError(
        f"refused to load: the file asks for {module}.{name}, which is not on the list of harmless "
        "names a checkpoint may use (nothing from the file was executed)")


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name)


def _restricted_load(file, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    import io

    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# torch.load calls ``pickle_module.load`` (legacy header records) and ``pickle_module.Unpickler``.
restricted_pickle = types.ModuleType("adm_cli_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.loads = _restricted_loads


def load_checkpoint(path: str | Path) -> Any:
    """The object a torch checkpoint holds, loaded on the CPU without running pickled code."""
    path = Path(path)
    with warnings.catch_warnings():
        # a plain (non-zip) pickle of another protocol: torch warns of instructions its restricted
        # reader might lack, in two lines above our own one (it reads them, or we refuse the file)
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return _load(path)


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a global torch does not allow (mmagic's message_hub, or an attack): look closer
    except FileNotFoundError:
        raise ConversionError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises RuntimeError & co. for truncated or foreign files
        raise _unreadable(path, exc) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path.name}: {exc}") from None
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> ConversionError:
    """What the file is, where its first bytes say it (an HTML page, a cut-short archive), else
    torch's own words."""
    if (what := describe(path)) is not None:
        return FileFormatError(what)
    return ConversionError(f"{path.name} is not a readable torch checkpoint ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
