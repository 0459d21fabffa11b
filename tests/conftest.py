import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():  # the fused Triton kernels then run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_once_per_launch() -> None:
    """Triton's interpreter re-patches triton.language (inspect.getmembers over the module, ~2 ms)
    on every call of a @triton.jit helper inside a kernel, ~35% of the fused tests' time here.
    The launch has patched the same modules already: patch each set of modules once per launch
    and undo all of it when the launch ends. Same interpretation, fewer repeats; nothing changes
    where Triton's internals differ from what this expects."""
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton, or one that does not import here
        return
    patch = getattr(interpreter, "_patch_lang", None)
    if patch is None or getattr(patch, "_adm_once", False):
        return
    try:  # only where a launch restores what it patched and a helper's call patches again
        launch_src = inspect.getsource(interpreter.GridExecutor.__call__)
        helper_src = inspect.getsource(interpreter.InterpretedFunction.__call__)
    except Exception:  # noqa: BLE001 - another layout of Triton's interpreter: leave it alone
        return
    if "patch_scope.restore()" not in launch_src or "_patch_lang(self.fn)" not in helper_src:
        return
    launch = {"scopes": None, "patched": set()}

    def modules(fn):
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    class Launch:
        def restore(self):
            scopes, launch["scopes"] = launch["scopes"], None
            for scope in reversed(scopes):
                scope.restore()

    class Nested:  # a helper's call: Triton never restores what it patches there
        def restore(self):
            pass

    def once(fn):
        key = modules(fn)
        if launch["scopes"] is None:  # a kernel's launch; it restores when it ends
            launch["scopes"], launch["patched"] = [patch(fn)], {key}
            return Launch()
        if key not in launch["patched"]:
            launch["scopes"].append(patch(fn))
            launch["patched"].add(key)
        return Nested()

    once._adm_once = True
    interpreter._patch_lang = once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_once_per_launch()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter non-trivial values (ADM zero-initialises its output convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture
def rand_module():
    return randomize


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
