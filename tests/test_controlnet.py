"""LoadControlNet, ControlNetApply and the control-image nodes on tiny random models and tiny
random ControlNets (diffusers' ControlNetModel.from_unet with random output convolutions), each
checked against StableDiffusionControlNetPipeline / StableDiffusionXLControlNetPipeline."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CAPTURED, QuietContext, txt2img_graph

from app.engine import Executor
from kernels.adapters.controlnet import (
    ControlNetError,
    control_pixels,
    in_control_window,
    load_control_net,
)
from kernels.adapters.preprocess import canny
from kernels.models import load_model_folder
from kernels.text import encode_text
from nodes.base import NodeError
from nodes.controlnet import ControlNetApply
from nodes.core import Sampler
from nodes.registry import add_node

PROMPT = "a red circle on the left"


def square_image(size=16, lo=4, hi=12, value=1.0, batch=1):
    img = torch.zeros(batch, size, size, 3)
    img[:, lo:hi, lo:hi] = value
    return img


def save_png(tensor, path):
    from kernels.images import to_pil

    to_pil(tensor)[0].save(path)
    return str(path)


def build_tiny_controlnet(path, model_folder, *, seed=0, single_file=False, scale=0.05, embedding=None):
    """Write a random ControlNet for the model folder's UNet at `path` (a diffusers folder, or with
    `single_file` a .safetensors file with its config.json beside it) and return the path. Built by
    diffusers' `ControlNetModel.from_unet`, whose zero-initialised output convolutions are then
    drawn at random (`scale`), so that the residuals are not zero; the conditioning embedding
    downsamples by the model's VAE factor."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_folder, "unet"))
    vae_config = os.path.join(model_folder, "vae", "config.json")
    blocks = 1
    if os.path.isfile(vae_config):
        with open(vae_config, encoding="utf-8") as f:
            blocks = len(json.load(f)["block_out_channels"])
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding or (8,) * blocks)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn_like(p) * scale)
    if not single_file:
        cn.save_pretrained(path, safe_serialization=True)
        return path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    cn.save_config(folder)
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, path)
    return path


# -- models ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cns(sd_model, tmp_path_factory):
    """Two ControlNets for the tiny SD model (folders), the first also as a single file."""
    folder = tmp_path_factory.mktemp("controlnets")
    return {"a": build_tiny_controlnet(str(folder / "a"), sd_model, seed=0),
            "b": build_tiny_controlnet(str(folder / "b"), sd_model, seed=1),
            "file": build_tiny_controlnet(str(folder / "single" / "a.safetensors"), sd_model, seed=0,
                                          single_file=True)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control-images")
    return {"square": save_png(square_image(), folder / "square.png"),
            "other": save_png(square_image(lo=2, hi=7), folder / "other.png"),
            "odd": save_png(square_image(size=24, lo=5, hi=18), folder / "odd.png")}


@pytest.fixture(scope="module")
def sd(sd_model):
    model, clip, vae = load_model_folder(sd_model)
    return model, clip, vae, encode_text(clip.tokenizer, clip.text_encoder, PROMPT)


def sample(model, positive, *, steps=4, cfg=4.0, seed=3, size=8, scheduler="euler"):
    return Sampler().run(QuietContext(), model, positive, None, torch.zeros(1, 4, size, size),
                         scheduler=scheduler, steps=steps, cfg=cfg, seed=seed, denoise=1.0)["latent"]


def applied(model, cn_path, image, strength=1.0, start=0.0, end=1.0, guess_mode=False):
    return ControlNetApply().run(QuietContext(), model, load_control_net(cn_path), image, strength, start, end,
                                 guess_mode)["model"]


def cn_graph(model_path, applies, *, steps=4, cfg=4.0, seed=3, size=16, canny_first=False):
    """txt2img with (controlnet path, image path, strength, start, end) ControlNetApply nodes chained."""
    g, ids = txt2img_graph(model_path, prompt=PROMPT, steps=steps, cfg=cfg, seed=seed, size=size, save=False)
    model_src = (ids["load"], "model")
    ids["applies"] = []
    for cn_path, image_path, strength, start, end in applies:
        loader = add_node(g, "LoadControlNet", {"path": cn_path})
        image = add_node(g, "LoadImage", {"path": image_path})
        apply = add_node(g, "ControlNetApply", {"strength": strength, "start": start, "end": end})
        image_src = (image.id, "image")
        if canny_first:
            edges = add_node(g, "CannyEdges", {})
            g.connect(*image_src, edges.id, "image")
            image_src = (edges.id, "image")
        g.connect(*model_src, apply.id, "model")
        g.connect(loader.id, "control_net", apply.id, "control_net")
        g.connect(*image_src, apply.id, "image")
        model_src = (apply.id, "model")
        ids["applies"].append((loader.id, apply.id))
    g.connect(*model_src, ids["sampler"], "model")
    ids["capture"] = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", ids["capture"], "latent")
    return g, ids


def run_graph(g, ids, tmp_path, ex=None):
    report = (ex or Executor(device="cpu", disk_cache=False)).run(g, targets=[ids["capture"]], output_dir=tmp_path)
    return report, CAPTURED.pop("latent", None)


def sd_pipeline(sd, controlnet):
    from diffusers import StableDiffusionControlNetPipeline

    from kernels.sampling import make_scheduler

    model, clip, vae, _ = sd
    pipe = StableDiffusionControlNetPipeline(
        vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer, unet=model.unet,
        controlnet=controlnet, scheduler=make_scheduler("euler", model.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latent(pipe, image, **kwargs):
    call = dict(height=16, width=16, num_inference_steps=4, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(3))
    return pipe(PROMPT, image=image, **{**call, **kwargs}).images


def nchw(image):
    return image.permute(0, 3, 1, 2)


# -- off is off -----------------------------------------------------------------------------------
def test_strength_zero_is_bit_identical_and_records_no_patch(sd_model, cns, images, tmp_path, sd):
    ex = Executor(device="cpu", disk_cache=False)
    _, plain = run_graph(*cn_graph(sd_model, []), tmp_path, ex)
    report, off = run_graph(*cn_graph(sd_model, [(cns["a"], images["square"], 0.0, 0.0, 1.0)]), tmp_path, ex)
    assert report.ok and torch.equal(plain, off)
    model = sd[0]
    assert applied(model, cns["a"], square_image(), strength=0.0) is model


def test_outside_its_window_a_step_is_the_plain_step(sd, cns):
    model, _clip, _vae, positive = sd
    predictions = {}
    for name, mdl in (("plain", model), ("windowed", applied(model, cns["a"], square_image(), 1.0, 0.5, 1.0))):
        outs = predictions[name] = []
        hook = model.unet.register_forward_hook(lambda _m, _a, out, outs=outs: outs.append(out.sample.clone()))
        try:
            sample(mdl, positive, steps=4)
        finally:
            hook.remove()
    plain, windowed = predictions["plain"], predictions["windowed"]
    assert torch.equal(plain[0], windowed[0]) and torch.equal(plain[1], windowed[1])  # steps 0, 1 of 4
    assert not torch.equal(plain[2], windowed[2])
    assert [in_control_window(i, 4, 0.5, 1.0) for i in range(4)] == [False, False, True, True]
    assert [in_control_window(i, 4, 0.0, 0.6) for i in range(4)] == [True, True, False, False]


def test_the_conditioning_image_reaches_the_residuals(sd, cns):
    model, _clip, _vae, positive = sd
    control = load_control_net(cns["a"])

    def recorded(image):
        seen = []

        def hook(_m, args, kwargs, _out):
            seen.append((args[0].clone(), args[1], kwargs["encoder_hidden_states"],
                         kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]))

        handle = model.unet.register_forward_hook(hook, with_kwargs=True)
        try:
            out = sample(ControlNetApply().run(QuietContext(), model, control, image, 0.7, 0.0, 1.0, False)["model"],
                         positive, steps=2)
        finally:
            handle.remove()
        return out, seen

    first, seen = recorded(square_image())
    other, _ = recorded(square_image(lo=2, hi=7))
    assert not torch.equal(first, other)
    x, t, text, down, mid = seen[0]
    assert x.shape[0] == 2  # [negative, positive], the ControlNet on the same batch
    pixels = control_pixels(square_image(), 16, 16, 2).repeat_interleave(1, dim=0)  # as prepare_image
    cond = torch.cat([pixels] * 2)  # (its memory layout picks the convolution's rounding)
    with torch.no_grad():
        own_down, own_mid = control.module(x, t, encoder_hidden_states=text, controlnet_cond=cond,
                                           conditioning_scale=0.7, return_dict=False)
    assert len(down) == len(own_down) and all(torch.equal(a, b) for a, b in zip(down, own_down))
    assert torch.equal(mid, own_mid) and mid.abs().max() > 0


# -- against the diffusers pipelines --------------------------------------------------------------
@pytest.mark.parametrize("strength,start,end,guess", [(0.8, 0.0, 1.0, False), (1.3, 0.25, 0.75, False),
                                                       (1.0, 0.0, 1.0, True)])
def test_matches_the_diffusers_controlnet_pipeline(sd, cns, strength, start, end, guess):
    model, _clip, _vae, positive = sd
    image = square_image()
    ours = sample(applied(model, cns["a"], image, strength, start, end, guess), positive)
    ref = pipeline_latent(sd_pipeline(sd, load_control_net(cns["a"]).module), nchw(image),
                          controlnet_conditioning_scale=strength, control_guidance_start=start,
                          control_guidance_end=end, guess_mode=guess)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_the_graph_matches_the_pipeline_and_two_controlnets_sum_as_multicontrolnet(sd_model, sd, cns, images,
                                                                                   tmp_path):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from kernels.images import from_pil

    report, ours = run_graph(*cn_graph(sd_model, [(cns["a"], images["square"], 0.9, 0.0, 1.0),
                                                  (cns["b"], images["other"], 0.6, 0.0, 0.5)]), tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    from PIL import Image

    pictures = [nchw(from_pil(Image.open(images[k]))[0]) for k in ("square", "other")]
    multi = MultiControlNetModel([load_control_net(cns[k]).module for k in ("a", "b")])
    ref = pipeline_latent(sd_pipeline(sd, multi), pictures, controlnet_conditioning_scale=[0.9, 0.6],
                          control_guidance_start=[0.0, 0.0], control_guidance_end=[1.0, 0.5])
    assert (ours - ref).abs().max() < 1e-5, (ours - ref).abs().max()


def test_a_control_image_of_another_size_is_resized_as_the_pipeline_resizes_a_picture(sd, cns, images):
    from PIL import Image

    from kernels.images import from_pil

    model, _clip, _vae, positive = sd
    picture = Image.open(images["odd"])
    ours = sample(applied(model, cns["a"], from_pil(picture)[0]), positive)
    ref = pipeline_latent(sd_pipeline(sd, load_control_net(cns["a"]).module), picture)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_canny_edges_in_the_graph_match_the_pipeline_given_the_same_edges(sd_model, sd, cns, images, tmp_path):
    from PIL import Image

    from kernels.images import from_pil

    report, ours = run_graph(*cn_graph(sd_model, [(cns["a"], images["square"], 1.0, 0.0, 1.0)], canny_first=True),
                             tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    edges = canny(from_pil(Image.open(images["square"]))[0])
    ref = pipeline_latent(sd_pipeline(sd, load_control_net(cns["a"]).module), nchw(edges))
    assert (ours - ref).abs().max() < 1e-5


# -- loading, caching, running twice --------------------------------------------------------------
def test_a_single_file_with_its_config_loads_the_folders_weights(cns):
    folder, file = load_control_net(cns["a"]), load_control_net(cns["file"])
    a, b = folder.module.state_dict(), file.module.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert folder.content_key() != file.content_key()


def test_a_patched_model_runs_twice_alike_and_leaves_no_hook(sd, cns):
    model, _clip, _vae, positive = sd
    patched = applied(model, cns["a"], square_image())
    first, second = sample(patched, positive, steps=2), sample(patched, positive, steps=2)
    assert torch.equal(first, second)
    assert not model.unet._forward_pre_hooks
    assert torch.equal(sample(model, positive, steps=2), sample(model, positive, steps=2))


def test_cache_key_follows_image_strength_window_and_file(sd, cns):
    model = sd[0]
    key = applied(model, cns["a"], square_image()).content_key()
    assert key == applied(model, cns["a"], square_image()).content_key()
    others = [applied(model, cns["a"], square_image(lo=3)), applied(model, cns["a"], square_image(), 0.9),
              applied(model, cns["a"], square_image(), 1.0, 0.1), applied(model, cns["a"], square_image(), 1.0, 0.0, 0.9),
              applied(model, cns["a"], square_image(), guess_mode=True), applied(model, cns["b"], square_image())]
    assert len({key} | {m.content_key() for m in others}) == 1 + len(others)


def test_a_controlnet_is_found_by_name_in_the_models_folders(sd_model, cns, images, tmp_path):
    folder = tmp_path / "ComfyUI" / "models" / "controlnet"
    folder.mkdir(parents=True)
    shutil.copy(cns["file"], folder / "tiny_canny.safetensors")
    shutil.copy(cns["file"].replace("a.safetensors", "config.json"), folder / "config.json")
    ex = Executor(device="cpu", disk_cache=False, model_roots=[str(tmp_path / "ComfyUI")])
    report, by_name = run_graph(*cn_graph(sd_model, [("ckpt:tiny_canny", images["square"], 1.0, 0.0, 1.0)]),
                                tmp_path, ex)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    _, by_path = run_graph(*cn_graph(sd_model, [(cns["a"], images["square"], 1.0, 0.0, 1.0)]), tmp_path)
    assert torch.equal(by_name, by_path)


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from kernels.tiny import build_tiny_sdxl_model

    return build_tiny_sdxl_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture(scope="module")
def sdxl_cn(sdxl_model, tmp_path_factory):
    return build_tiny_controlnet(str(tmp_path_factory.mktemp("sdxl-cn") / "xl.safetensors"), sdxl_model,
                                 single_file=True)


def node_error(g, ids, tmp_path, which):
    report, _ = run_graph(g, ids, tmp_path)
    return report.nodes[ids["applies"][0][which]].error or ""


def test_a_controlnet_for_another_family_is_a_node_error_naming_the_file(sd_model, sdxl_cn, images, tmp_path):
    error = node_error(*cn_graph(sd_model, [(sdxl_cn, images["square"], 1.0, 0.0, 1.0)]), tmp_path, 1)
    assert error.startswith("ControlNetApply:") and sdxl_cn in error
    assert "Stable Diffusion XL" in error and "cross-attention width is 48 where the UNet's is 32" in error


def test_bad_files_are_refused_with_the_file_named(sd_model, cns, images, tmp_path):
    pickle = tmp_path / "cn.pth"
    pickle.write_bytes(b"\x80\x04not opened")
    cases = {str(pickle): "pickle", str(tmp_path / "absent.safetensors"): "does not exist",
             str(tmp_path / "cn.txt"): "not a .safetensors file"}
    (tmp_path / "cn.txt").write_text("x")
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    cases[str(lora)] = "not a ControlNet"
    broken = tmp_path / "broken" / "cn.safetensors"  # a ControlNet's keys, but not all of them
    broken.parent.mkdir()
    save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(broken))
    cases[str(broken)] = "cannot be loaded"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(cns["file"], "rb").read()[:100])
    cases[str(cut)] = "truncated"
    for path, expected in cases.items():
        error = node_error(*cn_graph(sd_model, [(path, images["square"], 1.0, 0.0, 1.0)]), tmp_path, 0)
        assert error.startswith("LoadControlNet:") and path in error and expected in error, error
    assert "no ControlNet file chosen" in node_error(*cn_graph(sd_model, [("", images["square"], 1.0, 0.0, 1.0)]),
                                                     tmp_path, 0)
    assert "must come after start" in node_error(*cn_graph(sd_model, [(cns["a"], images["square"], 1.0, 0.6, 0.4)]),
                                                 tmp_path, 1)


def test_a_controlnet_on_a_transformer_model_is_refused(cns, tmp_path):
    from kernels.tiny import build_tiny_sd3_model

    model, _, _ = load_model_folder(build_tiny_sd3_model(str(tmp_path / "sd3")))
    with pytest.raises(NodeError, match="applies to UNet models"):
        applied(model, cns["a"], square_image())
    with pytest.raises(ControlNetError, match="does not exist"):
        load_control_net(str(tmp_path / "nothing"))


# -- SDXL -----------------------------------------------------------------------------------------
def test_sdxl_controlnet_matches_the_diffusers_sdxl_controlnet_pipeline(sdxl_model, sdxl_cn, images, tmp_path):
    from diffusers import StableDiffusionXLControlNetPipeline
    from PIL import Image

    from kernels.images import from_pil
    from kernels.sampling import make_scheduler

    report, ours = run_graph(*cn_graph(sdxl_model, [(sdxl_cn, images["square"], 0.7, 0.0, 0.75)], steps=3,
                                       seed=2), tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    control = load_control_net(sdxl_cn).module
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(sdxl_model, controlnet=control, local_files_only=True)
    pipe.scheduler = make_scheduler("euler", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    picture = nchw(from_pil(Image.open(images["square"]))[0])
    ref = pipe(PROMPT, image=picture, height=16, width=16, num_inference_steps=3, guidance_scale=4.0,
               controlnet_conditioning_scale=0.7, control_guidance_end=0.75, output_type="latent",
               generator=torch.Generator().manual_seed(2)).images
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5), (ours - ref).abs().max()


# -- T2I-Adapter ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_model(sd_model, tmp_path_factory):
    """The tiny SD folder with a UNet whose first block has cross-attention (a T2I-Adapter's first
    feature joins inside it, at the latent's size), and a random T2I-Adapter for it, as a folder
    and as a file with its config.json beside it."""
    from diffusers import T2IAdapter, UNet2DConditionModel

    root = tmp_path_factory.mktemp("adapter")
    folder = root / "model"
    shutil.copytree(sd_model, folder)
    shutil.rmtree(folder / "unet")
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=2).save_pretrained(folder / "unet", safe_serialization=True)
    adapter = T2IAdapter(in_channels=3, channels=[16, 32], num_res_blocks=1, downscale_factor=2)
    adapter.save_pretrained(root / "t2i", safe_serialization=True)
    (root / "single").mkdir()
    shutil.copy(root / "t2i" / "config.json", root / "single" / "config.json")
    shutil.copy(root / "t2i" / "diffusion_pytorch_model.safetensors", root / "single" / "t2i.safetensors")
    return str(folder), str(root / "t2i"), str(root / "single" / "t2i.safetensors")


@pytest.mark.parametrize("strength", [0.8, 1.5])
def test_t2i_adapter_matches_the_diffusers_adapter_pipeline(adapter_model, strength):
    from diffusers import StableDiffusionAdapterPipeline

    from kernels.sampling import make_scheduler

    folder, adapter_path, _file = adapter_model
    model, clip, vae = load_model_folder(folder)
    positive = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    image = square_image()
    ours = sample(applied(model, adapter_path, image, strength), positive)
    assert not torch.equal(ours, sample(model, positive))
    pipe = StableDiffusionAdapterPipeline(
        vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer, unet=model.unet,
        adapter=load_control_net(adapter_path).module, scheduler=make_scheduler("euler", model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, image=nchw(image), height=16, width=16, num_inference_steps=4, guidance_scale=4.0,
               adapter_conditioning_scale=strength, generator=torch.Generator().manual_seed(3),
               output_type="latent").images
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_t2i_adapter_file_window_and_fit(adapter_model, sd, tmp_path):
    folder, adapter_path, file = adapter_model
    a, b = load_control_net(adapter_path).module.state_dict(), load_control_net(file).module.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    model, clip, _ = load_model_folder(folder)
    positive = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    outs = {}
    for name, mdl in (("plain", model), ("late", applied(model, file, square_image(), 1.0, 0.5, 1.0))):
        outs[name] = []
        hook = model.unet.register_forward_hook(lambda _m, _a, out, seen=outs[name]: seen.append(out.sample))
        try:
            sample(mdl, positive)
        finally:
            hook.remove()
    assert all(torch.equal(p, q) for p, q in zip(outs["plain"][:2], outs["late"][:2]))
    assert not torch.equal(outs["plain"][2], outs["late"][2])
    with pytest.raises(NodeError, match=r"T2I-Adapter .*t2i.* does not fit .*\(16, 2\)"):
        applied(sd[0], adapter_path, square_image())  # the other tiny UNet: its first block downsamples first


# -- the example graph ----------------------------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parents[1] / "resources" / "graphs" / "controlnet-canny.loom"


def build_example():
    """resources/graphs/controlnet-canny.loom: a picture's Canny edges steer SD 1.5 through the
    canny ControlNet (both named in the models folders; the picture is the user's to choose)."""
    from app.graph import Graph

    g = Graph(meta={"title": "ControlNet: Canny edges", "description": (
        "Choose a picture in Load picture: its Canny edges (shown) steer Stable Diffusion 1.5 through "
        "the canny ControlNet, so the new image keeps the picture's outlines. The model and the "
        "ControlNet are looked up in the models folders; lower the strength or the end for a "
        "looser hold.")})
    load = add_node(g, "LoadModel", {"path": "ckpt:stable-diffusion-v1-5"}, title="Load SD 1.5", pos=(0, 0))
    text = add_node(g, "TextEncode", {"text": "a watercolor painting of a house by a lake, soft light"},
                    title="Prompt", pos=(320, -200))
    negative = add_node(g, "TextEncode", {"text": "blurry, low quality"}, title="Negative", pos=(320, -20))
    picture = add_node(g, "LoadImage", {"path": ""}, title="Load picture", pos=(0, 320))
    edges = add_node(g, "CannyEdges", {"low": 100, "high": 200}, title="Canny edges", pos=(320, 320))
    show = add_node(g, "PreviewImage", {}, title="Edges", pos=(620, 480))
    control = add_node(g, "LoadControlNet", {"path": "ckpt:control_v11p_sd15_canny"}, title="Load ControlNet",
                       pos=(320, 160))
    apply = add_node(g, "ControlNetApply", {"strength": 1.0, "start": 0.0, "end": 1.0}, title="Apply ControlNet",
                     pos=(640, 160))
    empty = add_node(g, "EmptyLatent", {"width": 512, "height": 512}, title="Canvas 512x512", pos=(640, 360))
    sampler = add_node(g, "Sampler", {"scheduler": "euler", "steps": 20, "cfg": 7.0, "seed": 7}, title="Sampler",
                       pos=(960, 0))
    decode = add_node(g, "VAEDecode", {}, title="Decode", pos=(1260, 0))
    save = add_node(g, "SaveImage", {"prefix": "controlnet-canny"}, title="Save", pos=(1500, 0))
    for src, out, dst, port in [
            (load, "clip", text, "clip"), (load, "clip", negative, "clip"), (picture, "image", edges, "image"),
            (edges, "image", show, "image"), (load, "model", apply, "model"), (control, "control_net", apply, "control_net"),
            (edges, "image", apply, "image"), (load, "vae", empty, "vae"), (apply, "model", sampler, "model"),
            (text, "conditioning", sampler, "positive"), (negative, "conditioning", sampler, "negative"),
            (empty, "latent", sampler, "latent"), (load, "vae", decode, "vae"), (sampler, "latent", decode, "latent"),
            (decode, "image", save, "image")]:
        g.connect(src.id, out, dst.id, port)
    return g


def test_the_example_graph_is_current_and_valid():
    from app.graph import load
    from app.graph.validate import validate
    from nodes import registry

    g = load(EXAMPLE, registry.get)
    assert not [p.message for p in validate(g, registry.get)]
    for node in g.nodes.values():
        assert node.version == registry.get(node.type).version, node.type
    assert sorted(n.type for n in g.nodes.values()) == sorted(n.type for n in build_example().nodes.values())


def test_the_example_graph_renders_headless_on_tiny_models(sd_model, cns, images, tmp_path):
    from app.graph import load
    from nodes import registry

    g = load(EXAMPLE, registry.get)
    paths = {"LoadModel": sd_model, "LoadControlNet": cns["a"], "LoadImage": images["square"]}
    for node in g.nodes.values():
        if node.type in paths:
            node.params["path"] = paths[node.type]
        if node.type == "EmptyLatent":
            node.params.update(width=16, height=16)
        if node.type == "Sampler":
            node.params["steps"] = 2
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    assert len(report.outputs()) == 1


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(EXAMPLE.parents[2]))
    from app.graph import save

    save(build_example(), EXAMPLE)
    print("wrote", EXAMPLE)
