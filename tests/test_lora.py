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

    def resolve_path(self, path):
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
def sd_model(tiny_latent_model, tmp_path_factory):
    """The tiny latent model with `steps_offset` 1, as the SD pipeline rewrites it."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    shutil.copytree(tiny_latent_model, path)
    config_path = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["steps_offset"] = 1
    config_path.write_text(json.dumps(config))
    return str(path)


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


def lora_graph(model_path, loras, *, prompt=PROMPT, steps=3, cfg=4.0, seed=3, size=16):
    """txt2img with LoadLoRA nodes chained (each (path, strength_model, strength_clip))."""
    g, ids = txt2img_graph(model_path, prompt=prompt, steps=steps, cfg=cfg, seed=seed, size=size, save=False)
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
