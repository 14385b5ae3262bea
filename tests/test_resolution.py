"""Attention-entropy scaling and tiled (MultiDiffusion) sampling on tiny random models."""

from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import TWO_BOX_LAYOUT, QuietContext

SAMPLER = dict(scheduler="euler", steps=3, cfg=4.0, seed=7, denoise=1.0)


def _sample(model, cond, size, **kw):
    from nodes.core import Sampler

    latent = torch.zeros(1, model.in_channels, size, size)
    return Sampler().run(QuietContext(), model=model, positive=cond, negative=None, latent=latent,
                         **{**SAMPLER, **kw})["latent"]


class ProcessorProbe:
    """A patch entered last that records the attention processor types during the run."""

    kind = "probe"

    def __init__(self):
        self.seen: dict = {}

    def cache_key(self):
        return "probe"

    @contextlib.contextmanager
    def applied(self, unet, run):
        self.seen = {n: p for n, p in unet.attn_processors.items()}
        yield

    def before_step(self, run, i, t, x):
        return x

    def unet_kwargs(self, run):
        return {}


# -- attention-entropy scaling ------------------------------------------------------------------
def test_entropy_scaling_at_the_training_size_is_bit_identical(tiny_layout_model):
    from kernels.resolution.entropy import EntropyScalePatch

    model, _clip, cond = tiny_layout_model
    scaled = model.with_patch(EntropyScalePatch((16, 16)))
    assert torch.equal(_sample(scaled, cond, 16), _sample(model, cond, 16))
    assert not torch.equal(_sample(scaled, cond, 32), _sample(model, cond, 32))
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in model.unet.attn_processors.values())


def test_the_processor_is_diffusers_attention_with_the_log_ratio_scale(tiny_layout_model):
    """Against diffusers' explicit-softmax AttnProcessor with the layer's scale set to lambda."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from kernels.resolution.entropy import EntropyScaledSelfAttn, SampleSize, entropy_scale

    model, _clip, _cond = tiny_layout_model
    attn = next(m for n, m in model.unet.named_modules() if n.endswith("attn1"))
    size = SampleSize()
    proc = EntropyScaledSelfAttn(AttnProcessor2_0(), (16, 16), size)
    x = torch.randn(2, 256, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    size.hw = (32, 32)  # 2x: this layer has 256 tokens now, 64 at the training size
    lam = entropy_scale(256, 64, attn.to_q.out_features // attn.heads)
    assert lam > (attn.to_q.out_features // attn.heads) ** -0.5
    default = attn.scale
    try:
        attn.scale = lam
        reference = AttnProcessor()(attn, x)
    finally:
        attn.scale = default
    with torch.no_grad():
        assert torch.allclose(proc(attn, x), reference, atol=1e-5)
        size.hw = (16, 16)
        assert torch.equal(proc(attn, x[:, :64]), AttnProcessor2_0()(attn, x[:, :64]))


def test_normalised_entropy_stays_at_its_training_value_across_sizes(tiny_layout_model):
    """The paper's premise, per self-attention layer of a random UNet: with tokens drawn alike
    (unit Gaussian, as a layer's normed input roughly is) at the training count T = 16x16 and at
    2x (N = 32x32), the normalised entropy H / ln N of the layer's softmax stays at its 1x value
    with the scale the processor uses, and drifts without it."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from kernels.attention import heads_qkv
    from kernels.resolution.entropy import EntropyScaledSelfAttn, SampleSize, entropy_scale, normalised_entropy

    model, _clip, _cond = tiny_layout_model
    size = SampleSize()
    layers = [m for n, m in model.unet.named_modules() if n.endswith("attn1")]
    assert len(layers) == 4
    for attn in layers:
        proc = EntropyScaledSelfAttn(AttnProcessor2_0(), (16, 16), size)
        entropy = {}
        for side in (16, 32):
            size.hw = (side, side)
            n = side * side
            x = torch.randn(4, n, attn.to_q.in_features, generator=torch.Generator().manual_seed(side))
            with torch.no_grad():
                q, k = heads_qkv(attn, x, x, with_value=False)
            d = q.shape[-1]
            t = proc.training_tokens(n)
            scales = {"plain": d ** -0.5, "scaled": d ** -0.5 if t is None else entropy_scale(n, t, d)}
            for name, scale in scales.items():
                entropy[side, name] = float(normalised_entropy(((q @ k.transpose(-1, -2)) * scale).softmax(-1)))
        assert entropy[16, "plain"] == entropy[16, "scaled"]
        assert abs(entropy[32, "scaled"] - entropy[16, "plain"]) < 4e-4, entropy
        assert abs(entropy[32, "plain"] - entropy[16, "plain"]) > 1e-3, entropy


def test_entropy_scaling_composes_with_region_attention_in_either_order(tiny_layout_model):
    from kernels.layout import RegionAttentionPatch
    from kernels.resolution.entropy import EntropyScaledSelfAttn, EntropyScalePatch

    model, _clip, cond = tiny_layout_model
    region = RegionAttentionPatch(TWO_BOX_LAYOUT, strength=1.0)
    entropy = EntropyScalePatch((16, 16))
    probe = ProcessorProbe()
    both = _sample(model.with_patch(region).with_patch(entropy).with_patch(probe), cond, 32)
    kinds = {n.split(".")[-2]: type(p).__name__ for n, p in probe.seen.items()}
    assert kinds == {"attn1": "EntropyScaledSelfAttn", "attn2": "LayoutCrossAttnProcessor"}
    assert all(isinstance(p, EntropyScaledSelfAttn) for n, p in probe.seen.items() if "attn1" in n)
    reversed_order = _sample(model.with_patch(entropy).with_patch(region), cond, 32)
    assert torch.equal(both, reversed_order)
    assert not torch.equal(both, _sample(model.with_patch(region), cond, 32))
    assert not torch.equal(both, _sample(model.with_patch(entropy), cond, 32))
    # at the training size entropy scaling leaves the layout's result as it is
    assert torch.equal(_sample(model.with_patch(region).with_patch(entropy), cond, 16),
                       _sample(model.with_patch(region), cond, 16))


def test_a_layout_recorder_on_self_attention_stays_outermost_and_foreign_processors_are_refused(tiny_layout_model):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from kernels.attention import AttentionController, SelfAttnRecorder, self_attention_names, self_attention_recording
    from kernels.patching import SamplingRun, attention_processors
    from kernels.resolution.entropy import EntropyScaledSelfAttn, EntropyScaleError, EntropyScalePatch

    model, _clip, _cond = tiny_layout_model
    unet = model.unet
    names = self_attention_names(unet)
    run = SamplingRun(unet=unet, scheduler=None, positive=None, negative=None, cfg=1.0, steps=1,
                      latent_shape=(1, 3, 16, 16))
    ctl = AttentionController(run)
    patch = EntropyScalePatch((16, 16))
    with self_attention_recording(unet, ctl, names), patch.applied(unet, run):
        procs = unet.attn_processors
        assert all(isinstance(procs[n], SelfAttnRecorder) and isinstance(procs[n].inner, EntropyScaledSelfAttn)
                   for n in names)
    with patch.applied(unet, run), pytest.raises(EntropyScaleError, match="twice"):
        with patch.applied(unet, run):
            pass

    class Foreign(AttnProcessor2_0):
        pass

    with attention_processors(unet, {names[0]: Foreign()}), pytest.raises(EntropyScaleError, match="Foreign"):
        with patch.applied(unet, run):
            pass
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_the_entropy_node_reads_the_native_size_or_pixels_through_the_vae(tiny_pixel_model, tiny_latent_model):
    from kernels.models import load_model_folder
    from nodes.base import NodeError
    from nodes.resolution import AttentionEntropyScale

    model, _clip, vae = load_model_folder(tiny_pixel_model)
    node = AttentionEntropyScale()
    out = node.run(QuietContext(), model=model, vae=None, training_size=0)["model"]
    assert out.patches[-1].training_hw == (16, 16) and model.patches == ()
    latent_model, _c, latent_vae = load_model_folder(tiny_latent_model)
    by_pixels = node.run(QuietContext(), model=latent_model, vae=latent_vae, training_size=64)["model"]
    assert by_pixels.patches[-1].training_hw == (64 // latent_vae.scale_factor,) * 2
    assert by_pixels.content_key() != node.run(QuietContext(), model=latent_model, vae=latent_vae,
                                               training_size=32)["model"].content_key()
    with pytest.raises(NodeError, match="connect the model's VAE"):
        node.run(QuietContext(), model=model, vae=None, training_size=32)
    with pytest.raises(NodeError, match="multiple of the VAE's scale factor"):
        node.run(QuietContext(), model=latent_model, vae=latent_vae, training_size=33)


# -- tiled diffusion ----------------------------------------------------------------------------
def _tiled(model, vae, cond, size, **kw):
    from nodes.resolution import TiledSampler

    latent = torch.zeros(1, model.in_channels, size, size)
    params = {**SAMPLER, "tile_width": 0, "tile_height": 0, "overlap": 8, **kw}
    return TiledSampler().run(QuietContext(), model=model, positive=cond, negative=None, vae=vae,
                              latent=latent, **params)["latent"]


def test_one_tile_covering_the_canvas_is_bit_identical_to_the_plain_sampler(tiny_layout_model, caplog):
    from kernels.models import VaeBundle

    model, _clip, cond = tiny_layout_model
    vae = VaeBundle(None, "pixel", "pixel")
    plain = _sample(model, cond, 16)
    assert torch.equal(_tiled(model, vae, cond, 16), plain)  # native tile = the canvas
    with caplog.at_level(logging.INFO, logger="nodes.resolution"):
        clamped = _tiled(model, vae, cond, 16, tile_width=64, tile_height=48)
    assert torch.equal(clamped, plain)
    assert "the 64x48 tile is larger than the 16x16 canvas; used 16x16" in caplog.text
    ancestral = dict(scheduler="euler_ancestral")
    assert torch.equal(_tiled(model, vae, cond, 16, **ancestral), _sample(model, cond, 16, **ancestral))


class Pixelwise(torch.nn.Module):
    """A denoiser whose output at a pixel depends only on that pixel, t and the text: tiling it
    must give the untiled result."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        t = torch.as_tensor(timestep, dtype=sample.dtype).flatten()[0] / 1000
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=torch.tanh(self.conv(sample)) * (1 - t) + 0.1 * text)


@pytest.mark.parametrize("scheduler", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_tiles_of_a_pixelwise_denoiser_reduce_to_the_plain_result(tiny_layout_model, scheduler):
    from kernels.resolution.tiled_diffusion import TiledDenoiser, plan_latent_tiles
    from kernels.sampling import batch_noise, make_scheduler, sample

    model, _clip, cond = tiny_layout_model
    grid = plan_latent_tiles(24, 20, (12, 8), 4, 2)
    assert grid.count > 2
    fn = Pixelwise()

    def run(denoiser):
        generator, noise = batch_noise(3, (1, 3, 24, 20))
        return sample(denoiser, make_scheduler(scheduler, model.scheduler_config), cond.embeds,
                      cond.empty, noise, 4, 4.0, generator)

    with torch.no_grad():
        tiled, plain = TiledDenoiser(fn, grid), run(fn)
        assert torch.allclose(run(tiled), plain, atol=1e-6)
    assert tiled.calls == 4 * grid.count


@pytest.mark.parametrize("height,width,tile,overlap,multiple", [
    (64, 64, (16, 16), 4, 4), (40, 24, (16, 16), 8, 2), (30, 18, (8, 12), 0, 2), (12, 12, (32, 32), 8, 4),
    (96, 32, (32, 32), 16, 8)])
def test_the_tile_grid_covers_the_canvas_on_the_unets_grid(height, width, tile, overlap, multiple):
    from kernels.resolution.tiled_diffusion import coverage, plan_latent_tiles

    grid = plan_latent_tiles(height, width, tile, overlap, multiple)
    assert bool((coverage(grid) >= 1).all())
    assert grid.rows[0][0] == 0 and grid.rows[-1][1] == height
    assert grid.cols[0][0] == 0 and grid.cols[-1][1] == width
    for spans in (grid.rows, grid.cols):
        for (s, e), (s2, _e2) in zip(spans, spans[1:]):
            assert s % multiple == 0 and (e - s) % multiple == 0
            assert e - s2 >= overlap - overlap % multiple
    assert grid.tile_h <= max(tile[0], multiple) or grid.single


def test_a_tiled_canvas_calls_the_unet_only_on_tiles(tiny_layout_model):
    from kernels.models import VaeBundle

    model, _clip, cond = tiny_layout_model
    seen = []
    handle = model.unet.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    try:
        out = _tiled(model, VaeBundle(None, "pixel", "pixel"), cond, 32, overlap=8)
    finally:
        handle.remove()
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert set(seen) == {(16, 16)} and len(seen) == 3 * 9  # 3 tiles a side at overlap 8
    assert not torch.equal(out, _sample(model, cond, 32))


def test_sizes_the_model_cannot_take_are_node_errors(tiny_layout_model, tiny_latent_model):
    from kernels.layout import RegionAttentionPatch
    from kernels.models import VaeBundle, load_model_folder
    from nodes.base import NodeError

    model, _clip, cond = tiny_layout_model
    pixel = VaeBundle(None, "pixel", "pixel")
    with pytest.raises(NodeError, match="canvas width of 15 latent pixels is not a multiple of 2"):
        from nodes.resolution import TiledSampler

        TiledSampler().run(QuietContext(), model=model, positive=cond, negative=None, vae=pixel,
                           latent=torch.zeros(1, 3, 16, 15), **SAMPLER, tile_width=0, tile_height=0,
                           overlap=8)
    with pytest.raises(NodeError, match="tile width of 7"):
        _tiled(model, pixel, cond, 16, tile_width=7)
    with pytest.raises(NodeError, match="boxes or masks"):
        _tiled(model.with_patch(RegionAttentionPatch(TWO_BOX_LAYOUT)), pixel, cond, 32)
    # one tile: a layout is fine, as in the plain sampler
    region = model.with_patch(RegionAttentionPatch(TWO_BOX_LAYOUT))
    assert torch.equal(_tiled(region, pixel, cond, 16), _sample(region, cond, 16))
    latent_model, _c, latent_vae = load_model_folder(tiny_latent_model)
    with pytest.raises(NodeError, match="tile_width 9 is not a multiple of the VAE's scale factor"):
        _tiled(latent_model, latent_vae, cond, 8, tile_width=9)


def test_the_resolution_nodes_run_in_a_graph(tiny_pixel_model, tmp_path):
    """txt2img at 16, then DiffuseHighUpscale from the latent, and a TiledSampler at 32 behind
    AttentionEntropyScale, through the executor."""
    import conftest

    from app.engine import Executor
    from nodes.registry import add_node

    g, ids = conftest.txt2img_graph(tiny_pixel_model, steps=2, save=False)
    up = add_node(g, "DiffuseHighUpscale", {"steps": 4, "denoise": 0.5})
    for src, sp, dp in ((ids["load"], "model", "model"), (ids["text"], "conditioning", "positive"),
                        (ids["load"], "vae", "vae"), (ids["sampler"], "latent", "latent")):
        g.connect(src, sp, up.id, dp)
    entropy = add_node(g, "AttentionEntropyScale", {})
    g.connect(ids["load"], "model", entropy.id, "model")
    big = add_node(g, "EmptyLatent", {"width": 32, "height": 32})
    g.connect(ids["load"], "vae", big.id, "vae")
    tiled = add_node(g, "TiledSampler", {"steps": 2, "overlap": 8})
    for src, sp, dp in ((entropy.id, "model", "model"), (ids["text"], "conditioning", "positive"),
                        (ids["load"], "vae", "vae"), (big.id, "latent", "latent")):
        g.connect(src, sp, tiled.id, dp)
    ex = Executor(device="cpu", disk_cache=False)
    shapes = {}
    for node, port in ((up.id, "latent"), (tiled.id, "latent")):
        cap = add_node(g, "TestCaptureLatent", {})
        g.connect(node, port, cap.id, "latent")
        report = ex.run(g, targets=[cap.id], output_dir=tmp_path)
        assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
        shapes[node] = tuple(conftest.CAPTURED.pop("latent").shape)
    assert shapes == {up.id: (1, 3, 32, 32), tiled.id: (1, 3, 32, 32)}
