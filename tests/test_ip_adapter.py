"""LoadIPAdapter / IPAdapterApply and kernels.adapters.ip_adapter on a tiny SD 1.x folder, with a
tiny CLIPVisionModelWithProjection and IP-Adapter files the tests write in the standard layout
(image_proj.*, ip_adapter.N.to_k_ip.weight), checked against StableDiffusionPipeline with
diffusers' own load_ip_adapter / set_ip_adapter_scale / ip_adapter_masks."""

import shutil

import pytest
import torch
from conftest import CAPTURED, QuietContext, same_state, state_copy, txt2img_graph
from PIL import Image

from app.engine import Executor
from kernels.adapters.ip_adapter import (
    ImageTermProcessor,
    IPAdapterError,
    IPAdapterPatch,
    build_projection,
    cross_attention_layers,
    encode_images,
    ip_adapter,
    ip_adapter_patch,
    load_image_encoder,
    read_ip_adapter_file,
)
from kernels.images import from_pil
from kernels.models import load_model_folder
from kernels.patching import SamplingRun, applied_patches
from nodes.base import NodeError
from nodes.registry import add_node

PROMPT = "a red circle on the left"
ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": 32, "patch_size": 8, "projection_dim": 16}


class PathContext(QuietContext):
    """A node context for calling the nodes' run directly: paths as they are, models loaded plainly."""

    class models:
        @staticmethod
        def load(path, dtype, loader):
            return loader(path, dtype=getattr(torch, dtype), device="cpu")

    def resolve_path(self, path, kinds=None):
        return path


# -- files ----------------------------------------------------------------------------------------
def plain_weights(unet, *, seed, width=None, image_dim=16):
    g = torch.Generator().manual_seed(seed)
    width = width or unet.config.cross_attention_dim
    out = {"image_proj.proj.weight": torch.randn(4 * width, image_dim, generator=g) * 0.5,
           "image_proj.proj.bias": torch.randn(4 * width, generator=g) * 0.1,
           "image_proj.norm.weight": 1 + 0.1 * torch.randn(width, generator=g),
           "image_proj.norm.bias": 0.1 * torch.randn(width, generator=g)}
    return {**out, **layer_weights(unet, g, width)}


def layer_weights(unet, g, width):
    out = {}
    for index, (_name, attn) in enumerate(cross_attention_layers(unet)):
        for part in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{2 * index + 1}.{part}.weight"] = torch.randn(attn.to_k.out_features, width,
                                                                          generator=g) * 0.5
    return out


def plus_weights(unet, *, seed, embed_dims=32, hidden=64, queries=4):
    """IP-Adapter Plus's resampler in the reference layout (4 layers, 64-wide heads, FFN x4)."""
    g = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    out = {"image_proj.latents": r(1, queries, hidden, s=1.0), "image_proj.proj_in.weight": r(hidden, embed_dims),
           "image_proj.proj_in.bias": r(hidden), "image_proj.proj_out.weight": r(width, hidden),
           "image_proj.proj_out.bias": r(width), "image_proj.norm_out.weight": 1 + r(width),
           "image_proj.norm_out.bias": r(width)}
    for i in range(4):
        p = f"image_proj.layers.{i}."
        out.update({p + "0.norm1.weight": 1 + r(hidden), p + "0.norm1.bias": r(hidden),
                    p + "0.norm2.weight": 1 + r(hidden), p + "0.norm2.bias": r(hidden),
                    p + "0.to_q.weight": r(64, hidden), p + "0.to_kv.weight": r(128, hidden),
                    p + "0.to_out.weight": r(hidden, 64), p + "1.0.weight": 1 + r(hidden), p + "1.0.bias": r(hidden),
                    p + "1.1.weight": r(4 * hidden, hidden), p + "1.3.weight": r(hidden, 4 * hidden)})
    return {**out, **layer_weights(unet, g, width)}


def save(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def ip_files(sd_model, tmp_path_factory):
    """A folder laid out as the reference repository: models/image_encoder and the adapters."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("ip")
    models = root / "models"
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).save_pretrained(models / "image_encoder")
    torch.manual_seed(1)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**ENCODER, "projection_dim": 24})).save_pretrained(
        root / "other_encoder")
    model, _, _ = load_model_folder(sd_model)
    unet = model.unet
    files = {"root": str(root), "encoder": str(models / "image_encoder"), "other_encoder": str(root / "other_encoder"),
             "plain": save(models / "ip-adapter_tiny.safetensors", plain_weights(unet, seed=1)),
             "second": save(models / "ip-adapter_second.safetensors", plain_weights(unet, seed=2)),
             "plus": save(models / "ip-adapter-plus_tiny.safetensors", plus_weights(unet, seed=3)),
             "wide": save(root / "wide.safetensors", plain_weights(unet, seed=4, width=48))}
    (root / "ip.bin").write_bytes(b"not opened")
    g = torch.Generator().manual_seed(5)
    for name in ("image", "image2"):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{name}.png")
        files[name] = str(root / f"{name}.png")
    white = torch.zeros(32, 32, dtype=torch.uint8)
    white[:, :12] = 255  # the image prompt acts on the left
    Image.fromarray(white.numpy(), "L").save(root / "mask.png")
    alpha = Image.fromarray((255 - white).numpy(), "L")  # LoadImage's mask is the transparency
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    rgba.putalpha(alpha)
    rgba.save(root / "mask_rgba.png")
    files["mask"], files["mask_rgba"] = str(root / "mask.png"), str(root / "mask_rgba.png")
    return files


def image_tensor(path):
    with Image.open(path) as im:
        return from_pil(im)[0]


# -- graphs ---------------------------------------------------------------------------------------
def ip_graph(model_path, adapters, *, steps=3, cfg=4.0, seed=3, size=16):
    """txt2img with IPAdapterApply nodes chained on the MODEL: each a dict of file, encoder,
    image, scale and optionally mask (an RGBA png), start, end."""
    g, ids = txt2img_graph(model_path, prompt=PROMPT, steps=steps, cfg=cfg, seed=seed, size=size, save=False)
    src = (ids["load"], "model")
    ids["loads"], ids["applies"] = [], []
    for a in adapters:
        load = add_node(g, "LoadIPAdapter", {"path": a["file"], "image_encoder": a.get("encoder", "")})
        image = add_node(g, "LoadImage", {"path": a["image"]})
        apply = add_node(g, "IPAdapterApply", {"scale": a.get("scale", 1.0), "start": a.get("start", 0.0),
                                               "end": a.get("end", 1.0)})
        g.connect(*src, apply.id, "model")
        g.connect(load.id, "ip_adapter", apply.id, "ip_adapter")
        g.connect(image.id, "image", apply.id, "image")
        if a.get("mask"):
            mask = add_node(g, "LoadImage", {"path": a["mask"]})
            g.connect(mask.id, "mask", apply.id, "mask")
        src = (apply.id, "model")
        ids["loads"].append(load.id)
        ids["applies"].append(apply.id)
    g.connect(*src, ids["sampler"], "model")
    ids["capture"] = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", ids["capture"], "latent")
    return g, ids


def run_latent(model_path, adapters, tmp_path, ex=None, **kwargs):
    g, ids = ip_graph(model_path, adapters, **kwargs)
    report = (ex or Executor(device="cpu", disk_cache=False)).run(g, targets=[ids["capture"]], output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return CAPTURED.pop("latent")


def node_errors(model_path, adapters, tmp_path):
    g, ids = ip_graph(model_path, adapters)
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[ids["capture"]], output_dir=tmp_path)
    return [report.nodes[i].error or "" for i in ids["loads"] + ids["applies"]]


def pipeline(sd_model, files, weight_names):
    from diffusers import StableDiffusionPipeline

    from kernels.sampling import make_scheduler

    model, clip, vae = load_model_folder(sd_model)
    pipe = StableDiffusionPipeline(
        vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer, unet=model.unet,
        scheduler=make_scheduler("euler", model.scheduler_config), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(files["root"], subfolder="models", weight_name=weight_names,
                         image_encoder_folder="image_encoder", local_files_only=True)
    return pipe


def pipe_latent(pipe, images, steps=3, cfg=4.0, seed=3, **kwargs):
    return pipe(PROMPT, ip_adapter_image=images, height=16, width=16, num_inference_steps=steps, guidance_scale=cfg,
                generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).images


# -- against diffusers ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_ip_adapter_matches_the_diffusers_pipeline_with_load_ip_adapter(sd_model, ip_files, kind, tmp_path):
    ours = run_latent(sd_model, [{"file": ip_files[kind], "encoder": ip_files["encoder"], "image": ip_files["image"],
                                  "scale": 0.7}], tmp_path)
    plain = run_latent(sd_model, [], tmp_path)
    pipe = pipeline(sd_model, ip_files, ip_files[kind].rsplit("/", 1)[1])
    pipe.set_ip_adapter_scale(0.7)
    ref = pipe_latent(pipe, Image.open(ip_files["image"]).convert("RGB"))
    assert torch.equal(ours, ref), (ours - ref).abs().max()  # the same diffusers ops, bit for bit
    assert (ours - plain).abs().max() > 1e-3


def test_two_adapters_at_once_match_the_pipeline_with_two(sd_model, ip_files, tmp_path):
    adapters = [{"file": ip_files["plain"], "encoder": ip_files["encoder"], "image": ip_files["image"], "scale": 0.6},
                {"file": ip_files["second"], "encoder": ip_files["encoder"], "image": ip_files["image2"],
                 "scale": 0.9}]
    ours = run_latent(sd_model, adapters, tmp_path)
    one = run_latent(sd_model, adapters[:1], tmp_path)
    pipe = pipeline(sd_model, ip_files, ["ip-adapter_tiny.safetensors", "ip-adapter_second.safetensors"])
    pipe.set_ip_adapter_scale([0.6, 0.9])
    ref = pipe_latent(pipe, [Image.open(ip_files[n]).convert("RGB") for n in ("image", "image2")])
    assert torch.equal(ours, ref), (ours - ref).abs().max()  # the same diffusers ops, bit for bit
    assert (ours - one).abs().max() > 1e-3


def test_masked_ip_adapter_matches_the_pipeline_with_ip_adapter_masks(sd_model, ip_files, tmp_path):
    from diffusers.image_processor import IPAdapterMaskProcessor

    ours = run_latent(sd_model, [{"file": ip_files["plain"], "encoder": ip_files["encoder"],
                                  "image": ip_files["image"], "scale": 0.8, "mask": ip_files["mask_rgba"]}], tmp_path)
    unmasked = run_latent(sd_model, [{"file": ip_files["plain"], "encoder": ip_files["encoder"],
                                      "image": ip_files["image"], "scale": 0.8}], tmp_path)
    pipe = pipeline(sd_model, ip_files, "ip-adapter_tiny.safetensors")
    pipe.set_ip_adapter_scale(0.8)
    masks = IPAdapterMaskProcessor().preprocess([Image.open(ip_files["mask"])], height=32, width=32)
    masks = [masks.reshape(1, masks.shape[0], masks.shape[2], masks.shape[3])]
    ref = pipe_latent(pipe, Image.open(ip_files["image"]).convert("RGB"),
                      cross_attention_kwargs={"ip_adapter_masks": masks})
    assert torch.equal(ours, ref), (ours - ref).abs().max()  # the same diffusers ops, bit for bit
    assert (ours - unmasked).abs().max() > 1e-4


# -- exact properties -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(sd_model, ip_files):
    model, clip, _ = load_model_folder(sd_model)
    encoder = load_image_encoder(ip_files["encoder"])
    adapter = ip_adapter(read_ip_adapter_file(ip_files["plain"]), encoder)
    return model, clip, adapter


def sample_with(model, clip, patches, steps=2, cfg=4.0):
    from kernels.erasers.generator import Generator

    gen = Generator(model if not patches else _with(model, patches), clip)
    return gen.sample(gen.encode(PROMPT), seeds=[0], steps=steps, cfg=cfg)


def _with(model, patches):
    for p in patches:
        model = model.with_patch(p)
    return model


def test_scale_zero_is_bit_identical_and_the_node_records_no_patch(sd_model, ip_files, loaded, tmp_path):
    ex = Executor(device="cpu", disk_cache=False)
    plain = run_latent(sd_model, [], tmp_path, ex)
    off = run_latent(sd_model, [{"file": ip_files["plain"], "encoder": ip_files["encoder"], "image": ip_files["image"],
                                 "scale": 0.0}], tmp_path, ex)
    assert torch.equal(plain, off)
    from nodes.ip_adapter import IPAdapterApply

    model, clip, adapter = loaded
    image = image_tensor(ip_files["image"])
    assert IPAdapterApply().run(PathContext(), model, adapter, image, None, 0.0, 0.0, 1.0)["model"] is model
    # the patch itself at scale 0: diffusers' processors run and skip the image term exactly
    zero = ip_adapter_patch(adapter, model.unet, image, 0.0)
    assert torch.equal(sample_with(model, clip, []), sample_with(model, clip, [zero]))


def test_an_all_black_mask_or_a_window_with_no_steps_is_bit_identical(loaded, ip_files):
    model, clip, adapter = loaded
    image = image_tensor(ip_files["image"])
    plain = sample_with(model, clip, [], steps=4)
    masked_out = ip_adapter_patch(adapter, model.unet, image, 0.9, mask=torch.zeros(1, 16, 16))
    late = ip_adapter_patch(adapter, model.unet, image, 0.9, start=0.99)
    on = ip_adapter_patch(adapter, model.unet, image, 0.9)
    assert torch.equal(plain, sample_with(model, clip, [masked_out], steps=4))
    assert torch.equal(plain, sample_with(model, clip, [late], steps=4))
    assert not torch.equal(plain, sample_with(model, clip, [on], steps=4))
    half = ip_adapter_patch(adapter, model.unet, image, 0.9, start=0.5)
    partial = sample_with(model, clip, [half], steps=4)
    assert not torch.equal(plain, partial) and not torch.equal(partial, sample_with(model, clip, [on], steps=4))


def test_outside_the_mask_the_image_term_is_exactly_zero(loaded, ip_files):
    """At every cross-attention layer, on one input: the output at scale 1.5 equals the output at
    scale 0 bit for bit wherever the mask (downsampled to the layer, as diffusers does) is 0 —
    with diffusers' processor and with ours around another processor."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, clip, adapter = loaded
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 4:20] = 1.0
    patch = ip_adapter_patch(adapter, model.unet, image_tensor(ip_files["image"]), 1.5, mask=mask)
    run = SamplingRun(model.unet, None, None, None, 1.0, 1, (1, 4, 8, 8))
    torch.manual_seed(0)
    with applied_patches([patch], model.unet, run), torch.no_grad():
        state = run.state["loomwork.ip_adapter"]
        images = state.unet.encoder_hid_proj([state.adapters[0].batch(2, 1)])
        for name, attn in state.layers:
            ip = state.ip_processors[name]
            hidden, text = torch.randn(2, 64, attn.to_q.in_features), torch.randn(2, 16, 32)
            down = IPAdapterMaskProcessor.downsample(patch.mask[:, 0], 2, 64, 1)[..., 0]
            outside = down == 0
            assert outside.any() and (~outside).any()
            for proc in (ip, ImageTermProcessor(AttnProcessor2_0(), ip)):
                outs = []
                for scale in (1.5, 0.0):
                    ip.scale = [scale]
                    outs.append(proc(attn, hidden, (text, images), ip_adapter_masks=[patch.mask]))
                assert torch.equal(outs[0][outside], outs[1][outside]), name
                assert (outs[0][~outside] - outs[1][~outside]).abs().max() > 1e-4, name


def test_a_run_restores_the_unet_exactly(loaded, ip_files):
    model, clip, adapter = loaded
    unet = model.unet
    state = state_copy(unet)
    processors = dict(unet.attn_processors)
    config = dict(unet.config)
    hooks = dict(unet._forward_pre_hooks)
    patch = ip_adapter_patch(adapter, unet, image_tensor(ip_files["image"]), 1.0, mask=torch.ones(1, 16, 16))
    sample_with(model, clip, [patch, ip_adapter_patch(adapter, unet, image_tensor(ip_files["image2"]), 0.5)])
    assert same_state(unet, state) and set(unet.state_dict()) == set(state)
    assert unet.attn_processors == processors  # the very processor objects
    assert dict(unet.config) == config and unet.config.encoder_hid_dim_type is None
    assert unet.encoder_hid_proj is None and dict(unet._forward_pre_hooks) == hooks


def test_a_cached_patched_model_gives_the_same_result_twice(loaded, ip_files):
    model, clip, adapter = loaded
    patch = ip_adapter_patch(adapter, model.unet, image_tensor(ip_files["image"]), 0.8)
    key = patch.cache_key()
    first = sample_with(model, clip, [patch])
    assert torch.equal(first, sample_with(model, clip, [patch])) and patch.cache_key() == key


def test_the_image_term_processor_matches_diffusers_ip_processor(loaded, ip_files):
    """Around diffusers' plain processor, our image term gives diffusers' IP-Adapter output."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, clip, adapter = loaded
    image = image_tensor(ip_files["image"])
    for mask in (None, torch.ones(1, 32, 32).tril()):
        patch = ip_adapter_patch(adapter, model.unet, image, 0.8, mask=mask)
        run = SamplingRun(model.unet, None, None, None, 1.0, 1, (1, 4, 8, 8))
        with applied_patches([patch], model.unet, run):
            state = run.state["loomwork.ip_adapter"]
            name, attn = state.layers[0]
            ip = state.ip_processors[name]
            hidden = torch.randn(1, 16, attn.to_q.in_features)
            text = torch.randn(1, 16, 32)
            images = state.unet.encoder_hid_proj([patch.embeds])
            masks = None if patch.mask is None else [patch.mask]
            with torch.no_grad():
                ref = ip(attn, hidden, (text, images), ip_adapter_masks=masks)
                ours = ImageTermProcessor(AttnProcessor2_0(), ip)(attn, hidden, (text, images), ip_adapter_masks=masks)
                plain = AttnProcessor2_0()(attn, hidden, text)
        assert (ours - ref).abs().max() < 1e-5 and (ours - plain).abs().max() > 1e-3


def test_ip_adapter_composes_with_a_layout_patch_in_either_order(loaded, ip_files):
    from conftest import TWO_BOX_LAYOUT

    from kernels.layout import RegionAttentionPatch

    model, clip, adapter = loaded
    layout = RegionAttentionPatch(TWO_BOX_LAYOUT, 2.0, suppress_outside=True)
    ip = ip_adapter_patch(adapter, model.unet, image_tensor(ip_files["image"]), 0.8)
    zero = IPAdapterPatch(ip.adapter, ip.projection, ip.embeds, ip.negative_embeds, 0.0)
    processors = dict(model.unet.attn_processors)
    layout_only = sample_with(model, clip, [layout])
    ip_only = sample_with(model, clip, [ip])
    ip_first = sample_with(model, clip, [ip, layout])
    layout_first = sample_with(model, clip, [layout, ip])
    assert torch.equal(ip_first, layout_first)
    assert not torch.equal(ip_first, layout_only) and not torch.equal(ip_first, ip_only)
    assert torch.equal(sample_with(model, clip, [layout, zero]), layout_only)
    assert model.unet.attn_processors == processors


# -- bad input ------------------------------------------------------------------------------------
def test_an_ip_adapter_without_its_image_encoder_is_a_node_error_naming_the_file(sd_model, ip_files, tmp_path):
    errors = node_errors(sd_model, [{"file": ip_files["plain"], "image": ip_files["image"]}], tmp_path)
    assert "LoadIPAdapter" in errors[0] and "ip-adapter_tiny.safetensors" in errors[0] and "image encoder" in errors[0]
    from nodes.ip_adapter import LoadIPAdapter

    with pytest.raises(NodeError, match="needs its image encoder"):
        LoadIPAdapter().run(PathContext(), ip_files["plain"], "", "float32")


def test_a_projection_width_unlike_the_unets_is_a_node_error_naming_the_file(sd_model, ip_files, tmp_path, loaded):
    model, _, adapter = loaded
    wide = ip_adapter(read_ip_adapter_file(ip_files["wide"]), adapter.encoder)
    from nodes.ip_adapter import IPAdapterApply

    with pytest.raises(NodeError, match=r"IPAdapterApply: .*wide.safetensors.* width 48 .* takes 32"):
        IPAdapterApply().run(PathContext(), model, wide, image_tensor(ip_files["image"]), None, 1.0, 0.0, 1.0)
    errors = node_errors(sd_model, [{"file": ip_files["wide"], "encoder": ip_files["encoder"],
                                     "image": ip_files["image"]}], tmp_path)
    assert "wide.safetensors" in errors[1] and "cross-attention" in errors[1]


def test_files_that_are_not_a_usable_pair_are_refused_by_name(ip_files, tmp_path):
    with pytest.raises(IPAdapterError, match=r"ip\.bin.*pickle"):
        read_ip_adapter_file(str(tmp_path.parent / "x" / "ip.bin"))
    with pytest.raises(IPAdapterError, match=r"ip\.bin.*pickle"):
        read_ip_adapter_file(ip_files["root"] + "/ip.bin")
    other = load_image_encoder(ip_files["other_encoder"])
    with pytest.raises(IPAdapterError, match=r"ip-adapter_tiny.*width 16.*other_encoder.*24"):
        ip_adapter(read_ip_adapter_file(ip_files["plain"]), other)
    lora_like = save(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    with pytest.raises(IPAdapterError, match="standard layout"):
        read_ip_adapter_file(lora_like)
    with pytest.raises(IPAdapterError, match="does not exist"):
        load_image_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(IPAdapterError, match="config.json"):
        load_image_encoder(str(tmp_path))


def test_encoding_follows_the_pipelines_encode_image(loaded, ip_files, sd_model):
    """The plain adapter reads image embeds with zeros as the unconditional; Plus the penultimate
    hidden states, the unconditional from a black image."""
    model, _, adapter = loaded
    image = image_tensor(ip_files["image"])
    cond, uncond = encode_images(adapter, image)
    assert cond.shape == (1, 1, 16) and torch.equal(uncond, torch.zeros_like(cond))
    plus = ip_adapter(read_ip_adapter_file(ip_files["plus"]), adapter.encoder)
    cond, uncond = encode_images(plus, image)
    assert cond.shape == (1, 1, 17, 32) and uncond.abs().max() > 0
    assert type(build_projection(plus.weights, model.unet)).__name__ == "IPAdapterPlusImageProjection"


# -- SDXL -----------------------------------------------------------------------------------------
def test_sdxl_ip_adapter_matches_the_sdxl_pipeline(ip_files, tmp_path):
    """SDXL's image embeds go into added_cond_kwargs beside its pooled text and time ids."""
    from diffusers import StableDiffusionXLPipeline

    from kernels.sampling import make_scheduler
    from kernels.tiny import build_tiny_sdxl_model

    folder = build_tiny_sdxl_model(str(tmp_path / "tiny-sdxl"))
    model, _, _ = load_model_folder(folder)
    root = tmp_path / "ip-sdxl"
    shutil.copytree(ip_files["encoder"], root / "models" / "image_encoder")
    file = save(root / "models" / "ip-adapter_sdxl.safetensors", plain_weights(model.unet, seed=6))
    adapters = [{"file": file, "encoder": ip_files["encoder"], "image": ip_files["image"], "scale": 0.7}]
    ours = run_latent(folder, adapters, tmp_path, steps=3, cfg=5.0)
    plain = run_latent(folder, [], tmp_path, steps=3, cfg=5.0)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = make_scheduler("euler", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(root), subfolder="models", weight_name="ip-adapter_sdxl.safetensors",
                         image_encoder_folder="image_encoder", local_files_only=True)
    pipe.set_ip_adapter_scale(0.7)
    ref = pipe_latent(pipe, Image.open(ip_files["image"]).convert("RGB"), cfg=5.0)
    assert torch.equal(ours, ref), (ours - ref).abs().max()  # the same diffusers ops, bit for bit
    assert (ours - plain).abs().max() > 1e-3


def test_a_guidance_steps_positive_only_call_gets_the_cond_image_embeds(loaded, ip_files):
    """ZestGuide's gradient step calls the UNet on the positive alone: the image embeds follow."""
    from conftest import TWO_BOX_LAYOUT

    from kernels.layout import ZestGuidePatch
    from kernels.text import encode_text
    from nodes.core import Sampler

    model, clip, adapter = loaded
    guide = ZestGuidePatch(TWO_BOX_LAYOUT, eta=0.5)
    ip = ip_adapter_patch(adapter, model.unet, image_tensor(ip_files["image"]), 0.8)
    positive = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    latent = torch.zeros(1, 4, 8, 8)
    batches = []
    hook = model.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: batches.append(args[0].shape[0] if args else kwargs["sample"].shape[0]),
        with_kwargs=True)

    def run(*patches):
        return Sampler().run(QuietContext(), _with(model, patches), positive, None, latent, "euler", 2, 4.0, 0,
                             1.0)["latent"]

    try:
        guided = run(ip, guide)
    finally:
        hook.remove()
    assert {1, 2} <= set(batches)  # guidance calls of one row and denoising calls of two
    assert not torch.equal(guided, run(guide)) and not torch.equal(guided, run(ip))


# -- the example graph ----------------------------------------------------------------------------
EXAMPLE = "ip-adapter-mask"
EXAMPLE_PATHS = {"LoadModel": "ckpt:stable-diffusion-v1-5", "LoadIPAdapter": "ckpt:ip-adapter_sd15",
                 "image_encoder": "ckpt:ip-adapter-image-encoder/model.safetensors",
                 "reference": "reference.png", "mask": "mask.png"}


def build_example(paths=EXAMPLE_PATHS, size=512):
    """resources/graphs/ip-adapter-mask.loom: an image prompt kept to a region by a mask."""
    from app.graph import Graph

    g = Graph(meta={"title": "IP-Adapter with a mask", "description": (
        "The reference image prompts the model through an IP-Adapter only where the mask is white "
        "(the mask is the transparency of mask.png); the text prompt rules elsewhere. Point LoadModel at "
        "an SD 1.5 model and LoadIPAdapter at ip-adapter_sd15.safetensors and the CLIP vision model it "
        "was trained with.")})
    load = add_node(g, "LoadModel", {"path": paths["LoadModel"]}, title="Load SD 1.5", pos=(0, 0))
    text = add_node(g, "TextEncode", {"text": "a cat sitting in a garden, photo"}, title="Prompt", pos=(320, -200))
    ip = add_node(g, "LoadIPAdapter", {"path": paths["LoadIPAdapter"], "image_encoder": paths["image_encoder"]},
                  title="Load IP-Adapter", pos=(0, 240))
    ref = add_node(g, "LoadImage", {"path": paths["reference"]}, title="Reference image", pos=(0, 420))
    mask = add_node(g, "LoadImage", {"path": paths["mask"]}, title="Mask (its transparency)", pos=(0, 600))
    apply = add_node(g, "IPAdapterApply", {"scale": 0.8}, title="Image prompt", pos=(320, 240))
    empty = add_node(g, "EmptyLatent", {"width": size, "height": size}, title="Canvas", pos=(320, 40))
    sampler = add_node(g, "Sampler", {"scheduler": "euler", "steps": 25, "cfg": 7.0, "seed": 7}, title="Sampler",
                       pos=(640, 0))
    decode = add_node(g, "VAEDecode", {}, title="Decode", pos=(940, 0))
    save_node = add_node(g, "SaveImage", {"prefix": EXAMPLE}, title="Save", pos=(1180, 0))
    for src, out, dst, port in ((load, "clip", text, "clip"), (load, "vae", empty, "vae"), (load, "model", apply, "model"),
                                (ip, "ip_adapter", apply, "ip_adapter"), (ref, "image", apply, "image"),
                                (mask, "mask", apply, "mask"), (apply, "model", sampler, "model"),
                                (text, "conditioning", sampler, "positive"), (empty, "latent", sampler, "latent"),
                                (load, "vae", decode, "vae"), (sampler, "latent", decode, "latent"),
                                (decode, "image", save_node, "image")):
        g.connect(src.id, out, dst.id, port)
    return g


def example_path():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "resources" / "graphs" / f"{EXAMPLE}.loom"


def test_example_graph_is_current_and_valid():
    from app.graph import load
    from app.graph.validate import validate
    from nodes import registry

    g = load(example_path(), registry.get)
    assert not [p.message for p in validate(g, registry.get)]
    for node in g.nodes.values():
        assert node.version == registry.get(node.type).version, node.type
    assert sorted(n.type for n in g.nodes.values()) == sorted(n.type for n in build_example().nodes.values())


def test_example_graph_runs_headless(sd_model, ip_files, tmp_path):
    from app.graph import load
    from nodes import registry

    g = load(example_path(), registry.get)
    paths = {"LoadModel": sd_model, "LoadIPAdapter": ip_files["plain"], "image_encoder": ip_files["encoder"],
             "reference": ip_files["image"], "mask": ip_files["mask_rgba"]}
    for node in g.nodes.values():
        if node.type == "LoadModel":
            node.params["path"] = paths["LoadModel"]
        elif node.type == "LoadIPAdapter":
            node.params.update(path=paths["LoadIPAdapter"], image_encoder=paths["image_encoder"])
        elif node.type == "LoadImage":
            node.params["path"] = paths["mask" if "Mask" in node.title else "reference"]
        elif node.type == "EmptyLatent":
            node.params.update(width=16, height=16)
        elif node.type == "Sampler":
            node.params["steps"] = 2
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    assert len(report.outputs()) == 1


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from app.graph import save as save_graph

    save_graph(build_example(), example_path())
    print("wrote", example_path())
