"""Patches change a shared model only while they are applied, and key the cache."""

import contextlib

import torch

from app.engine import Executor
from kernels.models import load_model_folder
from kernels.patching import ModelPatch, attention_processors, swapped_weights
from nodes.base import MODEL, Float, Node
from nodes.registry import add_node, register


class ScaleConvIn(ModelPatch):
    """Test patch: scales the UNet's first convolution while applied."""
    kind = "scale-conv-in"

    def __init__(self, factor):
        self.factor = factor

    def cache_key(self):
        return f"scale-conv-in:{self.factor}"

    @contextlib.contextmanager
    def applied(self, unet, run):
        w = unet.conv_in.weight
        with swapped_weights(unet, {"conv_in.weight": w * self.factor}):
            yield


@register
class TestScaleModel(Node):
    category = "test"
    inputs = {"model": MODEL}
    params = {"factor": Float(1.0)}
    outputs = {"model": MODEL}

    def run(self, ctx, model, factor):
        return {"model": model.with_patch(ScaleConvIn(factor))}


def test_swapped_weights_restores_bit_identical(tiny_pixel_model):
    model, _, _ = load_model_folder(tiny_pixel_model)
    before = model.unet.conv_in.weight.detach().clone()
    with swapped_weights(model.unet, {"conv_in.weight": torch.zeros_like(before)}):
        assert model.unet.conv_in.weight.abs().sum() == 0
    assert torch.equal(model.unet.conv_in.weight, before)


def test_attention_processors_are_restored(tiny_pixel_model):
    from diffusers.models.attention_processor import AttnProcessor

    model, _, _ = load_model_folder(tiny_pixel_model)
    names = list(model.unet.attn_processors)
    before = {n: type(p) for n, p in model.unet.attn_processors.items()}
    with attention_processors(model.unet, {names[0]: AttnProcessor()}):
        assert type(model.unet.attn_processors[names[0]]) is AttnProcessor
    assert {n: type(p) for n, p in model.unet.attn_processors.items()} == before


def test_patched_model_in_a_graph_leaves_input_model_untouched(tiny_pixel_model, tmp_path):
    from conftest import txt2img_graph

    g, ids = txt2img_graph(tiny_pixel_model, steps=2)
    ex = Executor(device="cpu", disk_cache=False)
    assert ex.run(g, output_dir=tmp_path).ok
    patch = add_node(g, "TestScaleModel", {"factor": 0.5}, title="Patch")
    g.connect(ids["load"], "model", patch.id, "model")
    g.connect(patch.id, "model", ids["sampler"], "model")
    patched = ex.run(g, output_dir=tmp_path)
    assert patched.status(ids["sampler"]) == "ran"  # a patch changes the model's content key
    g.connect(ids["load"], "model", ids["sampler"], "model")
    again = ex.run(g, output_dir=tmp_path)
    assert again.status(ids["sampler"]) == "cached-memory"  # the unpatched result is still valid
    model = ex.models.load(tiny_pixel_model, "float32", load_model_folder)[0]
    fresh = load_model_folder(tiny_pixel_model)[0]
    assert torch.equal(model.unet.conv_in.weight, fresh.unet.conv_in.weight)
