"""LoadLoRA and kernels.adapters.lora on tiny SD 1.x, SDXL and FLUX folders, with LoRA files the
tests write themselves from peft's own LoRA state dicts: in diffusers/PEFT spelling (diffusers'
save_lora_weights, with its adapter metadata) and in kohya spelling (lora_down/lora_up/alpha)."""

import copy
import json
import shutil

import pytest
import torch
from conftest import CAPTURED, QuietContext, same_state, state_copy, txt2img_graph

from app.engine import Executor
from kernels.adapters import LoraFileError, attached_lora, lora_patches, parse_lora
from kernels.models import load_model_folder
from nodes.registry import add_node

PROMPT = "a red circle on the left"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


class PathContext(QuietContext):
    """A node context for calling LoadLoRA's run directly: paths are taken as they are."""

    def resolve_path(self, path, kinds=None):
        return path


# -- writing LoRA files ---------------------------------------------------------------------------
def peft_factors(module, targets, *, rank=4, alpha=2.0, seed=0):
    """peft's LoRA state dict (module-relative `….lora_A.weight` keys) with random factors, and
    its LoraConfig."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    holder = inject_adapter_in_model(config, copy.deepcopy(module))
    return {k: v.detach().clone() * 0.5 for k, v in get_peft_model_state_dict(holder).items()}, config


def config_dict(config):
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def write_peft(folder, mixin_name, parts):
    """diffusers' own save_lora_weights: `parts` is {component: (state, config)}."""
    import diffusers.loaders

    mixin = getattr(diffusers.loaders, mixin_name)
    kwargs = {}
    for component, (state, config) in parts.items():
        kwargs[f"{component}_lora_layers"] = state
        kwargs[f"{component}_lora_adapter_metadata"] = config_dict(config)
    mixin.save_lora_weights(str(folder), weight_name="peft.safetensors", **kwargs)
    return str(folder / "peft.safetensors")


def kohya_keys(state, prefix, alpha, module_prefix=""):
    out = {}
    for key, value in state.items():
        module, _, factor = key.partition(".lora_")
        name = prefix + (module_prefix + module).replace(".", "_")
        out[f"{name}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def write_file(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


# -- models ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_loras(sd_model, tmp_path_factory):
    """The same ΔW for the UNet and the text encoder (alpha 2, rank 4) as a PEFT and a kohya file,
    and a second, different LoRA (kohya)."""
    folder = tmp_path_factory.mktemp("loras")
    model, clip, _ = load_model_folder(sd_model)
    unet, unet_config = peft_factors(model.unet, UNET_TARGETS)
    te, te_config = peft_factors(clip.text_encoder, TE_TARGETS, seed=1)
    peft = write_peft(folder, "StableDiffusionLoraLoaderMixin",
                      {"unet": (unet, unet_config), "text_encoder": (te, te_config)})
    kohya = write_file(folder / "kohya.safetensors", {**kohya_keys(unet, "lora_unet_", 2.0),
                                                     **kohya_keys(te, "lora_te_", 2.0, "text_model.")})
    other, _ = peft_factors(model.unet, ["to_k", "to_v"], rank=2, alpha=1.0, seed=7)
    second = write_file(folder / "second.safetensors", kohya_keys(other, "lora_unet_", 1.0))
    return {"peft": peft, "kohya": kohya, "second": second}


def lora_graph(model_path, loras, *, prompt=PROMPT, steps=3, cfg=4.0, seed=3, size=16, scheduler="euler"):
    """txt2img with LoadLoRA nodes chained (each (path, strength_model, strength_clip))."""
    g, ids = txt2img_graph(model_path, prompt=prompt, steps=steps, cfg=cfg, seed=seed, size=size,
                           scheduler=scheduler, save=False)
    model_src, clip_src = (ids["load"], "model"), (ids["load"], "clip")
    ids["loras"] = []
    for path, sm, sc in loras:
        n = add_node(g, "LoadLoRA", {"path": path, "strength_model": sm, "strength_clip": sc})
        g.connect(*model_src, n.id, "model")
        g.connect(*clip_src, n.id, "clip")
        model_src, clip_src = (n.id, "model"), (n.id, "clip")
        ids["loras"].append(n.id)
    g.connect(*model_src, ids["sampler"], "model")
    g.connect(*clip_src, ids["text"], "clip")
    ids["capture"] = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", ids["capture"], "latent")
    return g, ids


def run_latent(model_path, loras, tmp_path, ex=None, **kwargs):
    g, ids = lora_graph(model_path, loras, **kwargs)
    report = (ex or Executor(device="cpu", disk_cache=False)).run(g, targets=[ids["capture"]], output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return CAPTURED.pop("latent")


def lora_error(model_path, path, tmp_path, **strengths):
    g, ids = lora_graph(model_path, [(path, strengths.get("sm", 1.0), strengths.get("sc", 1.0))])
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[ids["capture"]], output_dir=tmp_path)
    return report.nodes[ids["loras"][0]].error or ""


# -- SD 1.x ---------------------------------------------------------------------------------------
def test_strength_zero_is_bit_identical_and_records_no_patch(sd_model, sd_loras, tmp_path):
    ex = Executor(device="cpu", disk_cache=False)
    plain = run_latent(sd_model, [], tmp_path, ex)
    off = run_latent(sd_model, [(sd_loras["kohya"], 0.0, 0.0)], tmp_path, ex)
    assert torch.equal(plain, off)
    from nodes.adapters import LoadLoRA

    model, clip, _ = load_model_folder(sd_model)
    before = state_copy(model.unet)
    out = LoadLoRA().run(PathContext(), model, clip, sd_loras["kohya"], 0.0, 1.0)
    assert out["model"] is model and out["clip"] is not clip  # the denoiser is not even touched
    assert same_state(model.unet, before)


def test_kohya_and_peft_spellings_of_one_delta_give_identical_outputs(sd_model, sd_loras, tmp_path):
    ex = Executor(device="cpu", disk_cache=False)
    plain = run_latent(sd_model, [], tmp_path, ex)
    peft = run_latent(sd_model, [(sd_loras["peft"], 0.8, 0.6)], tmp_path, ex)
    kohya = run_latent(sd_model, [(sd_loras["kohya"], 0.8, 0.6)], tmp_path, ex)
    assert torch.equal(peft, kohya)
    assert not torch.equal(peft, plain)


def test_lora_matches_the_diffusers_pipeline_with_load_lora_weights(sd_model, sd_loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    from kernels.sampling import make_scheduler

    ours = run_latent(sd_model, [(sd_loras["kohya"], 0.8, 0.6)], tmp_path, steps=4, seed=3)
    model, clip, vae = load_model_folder(sd_model)
    pipe = StableDiffusionPipeline(
        vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer, unet=model.unet,
        scheduler=make_scheduler("euler", model.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(sd_loras["kohya"], adapter_name="file")
    pipe.set_adapters("file", adapter_weights={"unet": 0.8, "text_encoder": 0.6})
    ref = pipe(PROMPT, height=16, width=16, num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert (ours - ref).abs().max() < 1e-5, (ours - ref).abs().max()
    pipe.fuse_lora(components=["unet", "text_encoder"])
    fused = pipe(PROMPT, height=16, width=16, num_inference_steps=4, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.equal(ours, fused)  # the same diffusers/peft merge


def test_two_loras_stack_in_either_order(sd_model, sd_loras, tmp_path):
    ex = Executor(device="cpu", disk_cache=False)
    first = run_latent(sd_model, [(sd_loras["kohya"], 1.0, 1.0)], tmp_path, ex)
    second = run_latent(sd_model, [(sd_loras["second"], 1.0, 1.0)], tmp_path, ex)
    both = run_latent(sd_model, [(sd_loras["kohya"], 1.0, 1.0), (sd_loras["second"], 1.0, 1.0)], tmp_path, ex)
    swapped = run_latent(sd_model, [(sd_loras["second"], 1.0, 1.0), (sd_loras["kohya"], 1.0, 1.0)], tmp_path, ex)
    assert not torch.equal(both, first) and not torch.equal(both, second)
    assert (both - swapped).abs().max() < 1e-5


def module_layout(module):
    """Every submodule's name, identity and plain attributes; every parameter's name and tensor."""
    mods = [(n, id(m), type(m), sorted(k for k in vars(m) if not k.startswith("_") or k == "_hf_peft_config_loaded"))
            for n, m in module.named_modules()]
    return mods, {n: p.data_ptr() for n, p in module.named_parameters()}


@pytest.mark.parametrize("fuse", [True, False])
def test_unload_restores_weights_and_structure_exactly(sd_model, sd_loras, fuse):
    model, clip, _ = load_model_folder(sd_model)
    from kernels.adapters import FAMILIES

    parsed = parse_lora(sd_loras["kohya"], FAMILIES["sd"])
    for module, prefix in ((model.unet, "unet"), (clip.text_encoder, "text_encoder")):
        state = state_copy(module)
        layout, tensors = module_layout(module)
        with attached_lora(module, prefix, parsed, 0.7, fuse=fuse):
            moved = [n for n, p in module.named_parameters() if n in tensors and p.data_ptr() != tensors[n]]
            assert bool(moved) == fuse  # fused: merged copies; unfused: the weights as they were
        assert same_state(module, state)
        after, after_tensors = module_layout(module)
        assert after == layout and after_tensors == tensors
        assert not hasattr(module, "peft_config")


def test_fused_and_unfused_give_the_same_prediction(sd_model, sd_loras):
    from kernels.adapters import FAMILIES

    model, _, _ = load_model_folder(sd_model)
    parsed = parse_lora(sd_loras["kohya"], FAMILIES["sd"])
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 16, 32)
    with torch.no_grad():
        preds = []
        for fuse in (True, False):
            with attached_lora(model.unet, "unet", parsed, 0.9, fuse=fuse):
                preds.append(model.unet(x, t, encoder_hidden_states=text).sample)
    assert (preds[0] - preds[1]).abs().max() < 1e-5


def test_lora_composes_with_an_eraser_and_a_layout_patch(sd_model, sd_loras):
    from kernels.erasers import WeightDeltaPatch, cross_attention_kv
    from kernels.erasers.generator import Generator

    model, clip, _ = load_model_folder(sd_model)
    model_patch, clip_patch = lora_patches(sd_loras["kohya"], model.unet, clip.text_encoder, 1.0, 1.0)
    name = cross_attention_kv(model.unet)[0] + ".weight"
    eraser = WeightDeltaPatch("unet", {name: torch.randn_like(model.unet.get_parameter(name)) * 0.5})
    state = state_copy(model.unet)
    layout = _layout_patch()
    processors = {k: type(v) for k, v in model.unet.attn_processors.items()}
    clip_l = clip.with_patch(clip_patch)
    cond_lora_first = Generator(model.with_patch(model_patch).with_patch(eraser).with_patch(layout), clip_l)
    cond_eraser_first = Generator(model.with_patch(eraser).with_patch(model_patch).with_patch(layout), clip_l)
    a = cond_lora_first.sample(cond_lora_first.encode(PROMPT), seeds=[0], steps=2)
    b = cond_eraser_first.sample(cond_eraser_first.encode(PROMPT), seeds=[0], steps=2)
    no_eraser = Generator(model.with_patch(model_patch).with_patch(layout), clip_l)
    c = no_eraser.sample(no_eraser.encode(PROMPT), seeds=[0], steps=2)
    assert (a - b).abs().max() < 1e-5 and not torch.equal(a, c)
    assert same_state(model.unet, state)
    assert {k: type(v) for k, v in model.unet.attn_processors.items()} == processors


def _layout_patch():
    from conftest import TWO_BOX_LAYOUT

    from kernels.layout import RegionAttentionPatch

    return RegionAttentionPatch(TWO_BOX_LAYOUT, 2.0, suppress_outside=True)


# -- the cache key --------------------------------------------------------------------------------
def test_cache_key_follows_the_file_content_and_both_strengths(sd_model, sd_loras, tmp_path):
    model, clip, _ = load_model_folder(sd_model)
    path = tmp_path / "changing.safetensors"
    shutil.copy(sd_loras["kohya"], path)
    m1, c1 = lora_patches(str(path), model.unet, clip.text_encoder, 1.0, 1.0)
    m2, c2 = lora_patches(str(path), model.unet, clip.text_encoder, 0.5, 0.25)
    assert m1.cache_key() != m2.cache_key() and c1.cache_key() != c2.cache_key()
    assert m1.cache_key() != c1.cache_key()
    assert lora_patches(str(path), model.unet, clip.text_encoder, 1.0, 1.0)[0].cache_key() == m1.cache_key()
    ex = Executor(device="cpu", disk_cache=False)
    before = run_latent(sd_model, [(str(path), 1.0, 1.0)], tmp_path, ex)
    shutil.copy(sd_loras["second"], path)  # new content at the same path: new fingerprint
    assert lora_patches(str(path), model.unet, clip.text_encoder, 1.0, 1.0)[0].cache_key() != m1.cache_key()
    after = run_latent(sd_model, [(str(path), 1.0, 1.0)], tmp_path, ex)
    assert not torch.equal(before, after)
    with pytest.raises(LoraFileError, match="changed since"):
        with m1.applied(model.unet, None):
            pass


# -- bad input ------------------------------------------------------------------------------------
def test_a_lora_is_found_by_name_in_the_models_folders_the_executor_was_given(sd_model, sd_loras, tmp_path):
    import shutil

    loras = tmp_path / "ComfyUI" / "models" / "loras" / "styles"
    loras.mkdir(parents=True)
    shutil.copy(sd_loras["kohya"], loras / "kohya.safetensors")
    ex = Executor(device="cpu", disk_cache=False, model_roots=[str(tmp_path / "ComfyUI")])
    by_name = run_latent(sd_model, [("ckpt:styles/kohya.safetensors", 1.0, 1.0)], tmp_path, ex=ex)
    assert torch.equal(by_name, run_latent(sd_model, [(sd_loras["kohya"], 1.0, 1.0)], tmp_path))
    g, ids = lora_graph(sd_model, [("ckpt:styles/kohyaa.safetensors", 1.0, 1.0)])
    report = ex.run(g, targets=[ids["capture"]], output_dir=tmp_path)
    assert "LoadLoRA" in report.nodes[ids["loras"][0]].error and "kohya.safetensors" in report.nodes[ids["loras"][0]].error


def test_a_lora_for_another_family_is_a_node_error_naming_the_file(sd_model, tmp_path):
    flux_keys = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2)}
    path = write_file(tmp_path / "flux.safetensors", flux_keys)
    error = lora_error(sd_model, path, tmp_path)
    assert error.startswith("LoadLoRA:") and path in error and "another model family" in error


def test_a_lora_whose_keys_match_no_layer_is_an_error(sd_model, tmp_path):
    keys = {"lora_unet_nowhere_block_to_q.lora_down.weight": torch.zeros(2, 32),
            "lora_unet_nowhere_block_to_q.lora_up.weight": torch.zeros(32, 2)}
    path = write_file(tmp_path / "nowhere.safetensors", keys)
    error = lora_error(sd_model, path, tmp_path)
    assert path in error and "none of its 1 unet layers" in error


def test_a_rank_or_shape_mismatch_is_an_error(sd_model, sd_loras, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(sd_loras["kohya"])
    key = next(k for k in tensors if "attn2_to_k.lora_down" in k)
    tensors[key] = torch.zeros(4, 7)  # the layer takes 32 features
    path = write_file(tmp_path / "wrong-width.safetensors", tensors)
    error = lora_error(sd_model, path, tmp_path)
    assert path in error and "maps 32 to" in error and "(4, 7)" in error
    tensors = load_file(sd_loras["kohya"])
    tensors[key] = torch.zeros(3, 32)  # rank 3 down, rank 4 up
    path = write_file(tmp_path / "wrong-rank.safetensors", tensors)
    assert "ranks differ" in lora_error(sd_model, path, tmp_path)


def test_pickles_other_suffixes_truncated_and_loha_files_are_refused(sd_model, sd_loras, tmp_path):
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x04not opened")
    assert "pickle" in lora_error(sd_model, str(pickle), tmp_path)
    assert "not a .safetensors file" in lora_error(sd_model, str(tmp_path / "lora.txt"), tmp_path)
    data = open(sd_loras["kohya"], "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    error = lora_error(sd_model, str(cut), tmp_path)
    assert str(cut) in error and "truncated" in error
    loha = write_file(tmp_path / "loha.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(32, 2),
        "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_b": torch.zeros(2, 32)})
    assert "LoHa" in lora_error(sd_model, loha, tmp_path)
    assert "no LoRA file chosen" in lora_error(sd_model, "", tmp_path)
    assert "does not exist" in lora_error(sd_model, str(tmp_path / "absent.safetensors"), tmp_path)


def test_locon_convolution_layers_load(sd_model, tmp_path):
    model, clip, _ = load_model_folder(sd_model)
    conv, _ = peft_factors(model.unet, ["conv1", "conv2", "conv_shortcut"], rank=2, alpha=2.0, seed=3)
    assert any(v.ndim == 4 for v in conv.values())
    path = write_file(tmp_path / "locon.safetensors", kohya_keys(conv, "lora_unet_", 2.0))
    ex = Executor(device="cpu", disk_cache=False)
    assert not torch.equal(run_latent(sd_model, [(path, 1.0, 0.0)], tmp_path, ex), run_latent(sd_model, [], tmp_path, ex))


# -- SDXL: both text encoders ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from kernels.tiny import build_tiny_sdxl_model

    return build_tiny_sdxl_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture(scope="module")
def sdxl_loras(sdxl_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-loras")
    model, clip, _ = load_model_folder(sdxl_model)
    enc = clip.text_encoder
    parts = {"unet": peft_factors(model.unet, UNET_TARGETS),
             "text_encoder": peft_factors(enc.text_encoder, TE_TARGETS, seed=1),
             "text_encoder_2": peft_factors(enc.text_encoder_2, TE_TARGETS, seed=2)}
    peft = write_peft(folder, "StableDiffusionXLLoraLoaderMixin", parts)
    kohya = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        module = model.unet if component == "unet" else getattr(enc, component)
        text_model = "" if component == "unet" or hasattr(module, "text_model") else "text_model."
        kohya.update(kohya_keys(parts[component][0], prefix, 2.0, text_model))
    return {"peft": peft, "kohya": write_file(folder / "kohya.safetensors", kohya)}


def test_sdxl_kohya_and_peft_spellings_match_and_change_both_text_encoders(sdxl_model, sdxl_loras, tmp_path):
    from kernels.erasers.generator import Generator

    ex = Executor(device="cpu", disk_cache=False)
    peft = run_latent(sdxl_model, [(sdxl_loras["peft"], 0.8, 0.6)], tmp_path, ex)
    kohya = run_latent(sdxl_model, [(sdxl_loras["kohya"], 0.8, 0.6)], tmp_path, ex)
    assert torch.equal(peft, kohya)
    model, clip, _ = load_model_folder(sdxl_model)
    _, clip_patch = lora_patches(sdxl_loras["kohya"], model.unet, clip.text_encoder, 1.0, 1.0)
    plain = Generator(model, clip).encode(PROMPT)
    lora = Generator(model, clip.with_patch(clip_patch)).encode(PROMPT)
    assert not torch.equal(plain.embeds[..., :16], lora.embeds[..., :16])  # CLIP-L
    assert not torch.equal(plain.embeds[..., 16:], lora.embeds[..., 16:])  # CLIP-G
    assert not torch.equal(plain.pooled, lora.pooled)
    assert torch.equal(plain.embeds, Generator(model, clip).encode(PROMPT).embeds)


def test_sdxl_lora_matches_the_diffusers_pipeline(sdxl_model, sdxl_loras, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from kernels.sampling import make_scheduler

    ours = run_latent(sdxl_model, [(sdxl_loras["kohya"], 0.8, 0.6)], tmp_path, steps=3, seed=2)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_model, local_files_only=True)
    pipe.scheduler = make_scheduler("euler", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(sdxl_loras["kohya"], adapter_name="file")
    pipe.set_adapters("file", adapter_weights={"unet": 0.8, "text_encoder": 0.6, "text_encoder_2": 0.6})
    call = dict(height=16, width=16, num_inference_steps=3, guidance_scale=4.0, output_type="latent")
    ref = pipe(PROMPT, generator=torch.Generator().manual_seed(2), **call).images
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5), (ours - ref).abs().max()  # unfused: rounding only
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    assert torch.equal(ours, pipe(PROMPT, generator=torch.Generator().manual_seed(2), **call).images)


# -- FLUX: the transformer, diffusers and kohya/BFL spellings ----------------------------------------
@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    from kernels.tiny_flux import build_tiny_flux_model

    return build_tiny_flux_model(str(tmp_path_factory.mktemp("models") / "tiny-flux"))


def test_flux_lora_in_diffusers_and_kohya_bfl_spellings_match(flux_model, tmp_path):
    from peft import LoraConfig

    model, _, _ = load_model_folder(flux_model)
    attn = model.unet.transformer_blocks[0].attn
    width, rank = attn.to_q.in_features, 4
    torch.manual_seed(5)
    down, qkv_up = torch.randn(rank, width) * 0.3, torch.randn(3 * attn.to_q.out_features, rank) * 0.3
    proj_down, proj_up = torch.randn(rank, attn.to_out[0].in_features) * 0.3, torch.randn(width, rank) * 0.3
    block = "transformer_blocks.0.attn."
    peft = {f"{block}{name}.lora_A.weight": down.clone() for name in ("to_q", "to_k", "to_v")}
    peft.update({f"{block}{name}.lora_B.weight": up.contiguous() for name, up in zip(("to_q", "to_k", "to_v"), qkv_up.clone().chunk(3))})
    peft.update({f"{block}to_out.0.lora_A.weight": proj_down, f"{block}to_out.0.lora_B.weight": proj_up})
    config = LoraConfig(r=rank, lora_alpha=2.0, target_modules=[f"{block}{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")])
    diffusers_file = write_peft(tmp_path, "FluxLoraLoaderMixin", {"transformer": (peft, config)})
    bfl = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
           "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qkv_up,
           "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
           "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": proj_down,
           "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": proj_up,
           "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0)}
    kohya_file = write_file(tmp_path / "bfl.safetensors", bfl)
    ex = Executor(device="cpu", disk_cache=False)
    run = lambda loras: run_latent(flux_model, loras, tmp_path, ex, scheduler="flow_match_euler", cfg=3.5)  # noqa: E731
    plain, a, b = run([]), run([(diffusers_file, 1.0, 1.0)]), run([(kohya_file, 1.0, 1.0)])
    assert (a - b).abs().max() < 1e-5 and not torch.equal(a, plain)
    assert torch.equal(run([(kohya_file, 0.0, 1.0)]), plain)


def test_a_first_forward_under_a_lora_leaves_the_plain_encoding_as_a_fresh_model_gives_it(sdxl_model, sdxl_loras):
    from kernels.text import encode_text

    model, clip, _ = load_model_folder(sdxl_model)
    _, clip_patch = lora_patches(sdxl_loras["kohya"], model.unet, clip.text_encoder, 1.0, 1.0)
    with clip_patch.applied(clip.text_encoder, None):  # transformers sets its output hooks up here
        encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    after = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    _, fresh, _ = load_model_folder(sdxl_model)
    assert torch.equal(after.embeds, encode_text(fresh.tokenizer, fresh.text_encoder, PROMPT).embeds)


# -- eraser files are ordinary LoRA files ---------------------------------------------------------
@pytest.fixture(scope="module")
def esd_eraser(tiny_pixel_model):
    """A LoRA eraser (ESD, one training step) on every transformer layer of the tiny model."""
    from kernels.erasers import LoraPatch, encode_embeds, model_scheduler, train_erasure_lora

    model, clip, _ = load_model_folder(tiny_pixel_model)
    target = encode_embeds(clip.tokenizer, clip.text_encoder, ["a red circle"])
    empty = encode_embeds(clip.tokenizer, clip.text_encoder, [""])
    loras, scale, _ = train_erasure_lora(model.unet, model_scheduler(model), target, empty, scope="transformer",
                                         rank=2, alpha=1.0, steps=1, lr=0.5, pool_runs=1, pool_steps=2)
    return LoraPatch(loras, scale, 0.75, {"concept": "circle", "method": "esd"})


def test_a_saved_lora_eraser_is_a_kohya_lora_that_loadlora_and_diffusers_read(tiny_pixel_model, esd_eraser,
                                                                            tmp_path, monkeypatch):
    from conftest import eraser_graph, run_captured
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from safetensors.torch import load_file

    from kernels.erasers import load_erasers, save_erasers

    monkeypatch.setenv("LOOMWORK_ERASER_DIR", str(tmp_path / "erasers"))
    path = save_erasers(str(tmp_path / "erasers" / "esd.safetensors"), [esd_eraser])
    tensors = load_file(path)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in tensors)
    assert any(v.ndim == 4 for v in tensors.values())  # the 1x1 convolutions (proj_in/out) too
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors))
    assert len(state) == 2 * len(esd_eraser.loras) and len(alphas) == len(esd_eraser.loras)
    (back,) = load_erasers(path)
    assert back.cache_key() == esd_eraser.cache_key()
    ex = Executor(device="cpu", disk_cache=False)
    as_eraser, _, _ = run_captured(*eraser_graph(tiny_pixel_model, ("LoadEraser", {"path": "esd"})), tmp_path, ex)
    as_lora, _, _ = run_captured(*eraser_graph(tiny_pixel_model, ("LoadLoRA", {"path": path})), tmp_path, ex)
    plain, _, _ = run_captured(*eraser_graph(tiny_pixel_model), tmp_path, ex)
    assert not torch.equal(as_eraser, plain)
    assert torch.allclose(as_lora, as_eraser, rtol=1e-5, atol=1e-5), (as_lora - as_eraser).abs().max()


def test_version_1_eraser_files_still_load(esd_eraser, tmp_path):
    from kernels.erasers import load_erasers

    tensors, info = esd_eraser.to_state()
    entries = [{"kind": esd_eraser.kind, **info}]
    path = write_file(tmp_path / "old.safetensors", {f"0:{k}": v for k, v in tensors.items()},
                      {"format": "loomwork.eraser", "version": "1", "patches": json.dumps(entries), "extra": "{}"})
    (back,) = load_erasers(path)
    assert back.cache_key() == esd_eraser.cache_key()
