"""fast.prepare's state: weights made under inference mode, a second prepare, copies and
pickles of prepared or graph-wrapped models, caches that must follow the parameters."""

import copy
import io

import pytest
import torch

from adm_cli import api, fast
from adm_cli.graphs import graphed_classifier_grad, graphed_unet
from adm_cli.guidance import classifier_grad
from adm_cli.layers import ResBlock
from test_fast import TINY, TINY_CLF, exact, inputs, rel_max


def _out(model, cfg):
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        return model(x, t, **kw)


def _prepacked(model):
    return [m for m in model.modules() if isinstance(m, fast.PrepackedConv2d)]


def test_prepared_model_with_weights_made_in_inference_mode():
    """Weights created under torch.inference_mode have no version counter; the prepacked
    convolutions (and the fused blocks' bias cache) must not need one."""
    cfg = TINY["conv-resampling"]  # has an Upsample conv: the folded 2x2 path too
    ref = exact(cfg)
    with torch.inference_mode():
        model = exact(cfg)  # the same weights, built inside inference mode as a serving handler might
    assert next(model.parameters()).is_inference()
    fast.prepare(model, device="cpu")
    assert _prepacked(model) and not any(p.is_inference() for p in model.parameters())
    assert rel_max(_out(ref, cfg), _out(model, cfg)) <= 1e-5
    images = api.generate(model, num_samples=1, classes=[3], settings=api.SamplerSettings("ddim", steps=2))
    assert images.images.shape == (1, 16, 16, 3)


def test_closing_bias_of_inference_mode_weights():
    with torch.inference_mode():
        block = ResBlock(32, 64, 64, scale_shift=True)
    like = torch.zeros(1)
    assert torch.equal(block._closing_bias(like), block.out_layers[3].bias + block.skip_connection.bias)


def test_prepack_check_is_not_decided_by_inference_mode(monkeypatch):
    monkeypatch.setattr(fast, "_PREPACK_OK", None)
    with torch.inference_mode():
        assert fast._prepack_works()


def test_second_prepare_takes_its_own_settings():
    cfg = TINY["new-order"]
    model = fast.prepare(exact(cfg), device="cpu", dtype="bfloat16")
    assert model.out[2].weight.dtype == torch.bfloat16
    fast.prepare(model, device="cpu", dtype="float32")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _prepacked(model)
    # The bf16 round trip rounded the weights; the float32 run must match a model with those.
    rounded = exact(cfg)
    rounded.load_state_dict(model.state_dict())
    assert rel_max(_out(rounded, cfg), _out(model, cfg)) <= 1e-5

    _out(model, cfg)  # fills the packed weight caches
    fast.prepare(model, device="cpu", channels_last=False, prepack=False)
    assert not _prepacked(model) and not any(hasattr(m, "_packed") for m in model.modules())
    conv = model.input_blocks[0][0].weight
    assert conv.is_contiguous() and "NCHW" in fast.describe(model)
    assert rel_max(_out(rounded, cfg), _out(model, cfg)) <= 1e-5


def test_exact_prepare_is_bit_identical_on_cpu():
    cfg = TINY["conv-resampling"]
    ref = exact(cfg)
    model = fast.prepare(copy.deepcopy(ref), device="cpu", dtype="float32", exact=True)
    assert not _prepacked(model)
    assert torch.equal(_out(ref, cfg), _out(model, cfg))


def test_folded_upsample_conv_follows_its_bias():
    cfg = TINY["conv-resampling"]
    ref = exact(cfg)
    model = fast.prepare(copy.deepcopy(ref), device="cpu")
    _out(model, cfg)  # packs the folded kernels (and their bias)
    for m in (ref, model):
        up = next(b for b in m.modules() if type(b).__name__ == "Upsample")
        with torch.no_grad():
            up.conv.bias.add_(1.0)
    assert rel_max(_out(ref, cfg), _out(model, cfg)) <= 1e-5


def test_copies_and_pickles_of_graph_wrapped_models_start_afresh():
    """A deep copy must not replay (or, off CUDA, call) its original's captures, and a module
    that has them still pickles."""
    cfg = TINY["new-order"]
    unet = fast.prepare(exact(cfg), device="cpu")
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        original = graphed_unet(unet)(x, t, kw["y"])
    twin = copy.deepcopy(unet)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        assert torch.equal(graphed_unet(twin)(x, t, kw["y"]), twin(x, t, **kw))
        assert not torch.equal(graphed_unet(twin)(x, t, kw["y"]), original)
    restored = torch.load(io.BytesIO(_saved(unet)), weights_only=False)
    assert torch.equal(_out(restored, cfg), _out(unet, cfg))

    clf = fast.prepare(exact(TINY_CLF, seed=4), device="cpu")
    y = torch.tensor([1, 2, 3])
    first = graphed_classifier_grad(clf, 2.0)(x, t, y)
    clf_twin = copy.deepcopy(clf)
    with torch.no_grad():
        for p in clf_twin.parameters():
            p.mul_(0.5)
    got = graphed_classifier_grad(clf_twin, 2.0)(x, t, y)
    assert torch.equal(got, classifier_grad(clf_twin, x, t, y, 2.0)) and not torch.equal(got, first)
    _saved(clf)


def _saved(module) -> bytes:
    buf = io.BytesIO()
    torch.save(module, buf)
    return buf.getvalue()


def test_prepare_forgets_captures():
    unet = fast.prepare(exact(TINY["new-order"]), device="cpu")
    graphed_unet(unet)
    assert "_adm_captures" in unet.__dict__
    fast.prepare(unet, device="cpu")
    assert "_adm_captures" not in unet.__dict__


@pytest.mark.gpu
def test_gpu_graphs_refuse_a_compiled_model():
    unet = fast.prepare(exact(TINY["new-order"]), device="cuda")
    unet.compile()  # compiles lazily: nothing runs before the check
    with pytest.raises(fast.UsageError, match="cuda_graph"):
        api.generate(unet, num_samples=1, classes=[1], settings=api.SamplerSettings("ddim", steps=2),
                     cuda_graph=True)
