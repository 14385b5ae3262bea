"""Single-file checkpoints: each family's tiny folder, written as an original-layout file by our
converter, loads through LoadModel (or the part loaders) and renders exactly what the folder
renders; family detection; the shipped config skeletons; each bad input's error."""

import os
import pickle

import pytest
import torch
from conftest import CAPTURED, txt2img_graph
from safetensors.torch import save_file

from app.engine import Executor
from kernels import convert as layout
from kernels.convert_files import folder_to_original, folder_to_single_file, read_component
from kernels.model_configs import ConfigSource, clip_vocabulary, load_tokenizer
from kernels.models import ModelLoadError, load_model_folder
from kernels.single_file import SingleFile, load_checkpoint_file, load_text_encoder_files
from nodes.registry import add_node

PROMPT = "a red circle on the left"


def build(kind, folder):
    from kernels import tiny, tiny_flux

    return {"sd1": lambda: tiny.build_tiny_model(folder, kind="latent"),
            "sdxl": lambda: tiny.build_tiny_sdxl_model(folder),
            "sd3": lambda: tiny.build_tiny_sd3_model(folder),
            "flux": lambda: tiny_flux.build_tiny_flux_model(folder)}[kind]()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (tiny folder, its single file by our converter)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for family in ("sd1", "sdxl", "sd3"):
        folder = build(family, str(root / family))
        out[family] = (folder, folder_to_single_file(folder, str(root / f"{family}.safetensors")))
    return out


@pytest.fixture(scope="module")
def flux_parts(tmp_path_factory):
    """A tiny FLUX folder kept as artists keep FLUX: a transformer file, CLIP-L and T5 files in
    transformers' layout and a VAE file in the original layout (as ae.safetensors)."""
    root = tmp_path_factory.mktemp("flux")
    folder = build("flux", str(root / "flux"))
    vae, vae_config = read_component(folder, "vae")
    save_file(layout.vae_to_ldm(vae, vae_config), str(root / "ae.safetensors"))
    files = {"transformer": os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"),
             "clip_l": os.path.join(folder, "text_encoder", "model.safetensors"),
             "t5": os.path.join(folder, "text_encoder_2", "model.safetensors"),
             "vae": str(root / "ae.safetensors")}
    return folder, files


def aligned_folder_loader(path, dtype, device):
    """load_model_folder with every tensor copied to fresh memory. A folder's modules keep views
    into their files at the tensors' offsets, and the BLAS kernels round a product by the
    operands' alignment; the single-file loader copies each tensor, so its reference is the
    folder's same weights, copied alike."""
    bundles = load_model_folder(path, dtype, device)
    for module in (bundles[0].unet, bundles[1].text_encoder, bundles[2].vae):
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.data = tensor.data.clone()
    return bundles


def render(graph_and_ids, tmp_path, aligned_folder=None):
    g, ids = graph_and_ids
    capture = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", capture, "latent")
    ex = Executor(device="cpu", disk_cache=False)
    if aligned_folder:  # LoadModel then finds the folder loaded (see aligned_folder_loader)
        ex.models.load(aligned_folder, "float32", aligned_folder_loader)
    report = ex.run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return CAPTURED.pop("latent")


def txt2img(path, config="", **kw):
    g, ids = txt2img_graph(path, prompt=PROMPT, steps=3, save=False, **kw)
    g.nodes[ids["load"]].params["config"] = config
    return g, ids


def parts_graph(family, files, config, *, cfg=3.5, scheduler="flow_match_euler"):
    """txt2img with LoadDiffusionModel + LoadTextEncoders + LoadVAE in place of LoadModel."""
    g, ids = txt2img_graph("unused", prompt=PROMPT, steps=3, save=False, cfg=cfg, scheduler=scheduler)
    g.remove_node(ids["load"])
    model = add_node(g, "LoadDiffusionModel", {"path": files["transformer"], "config": config}).id
    clip = add_node(g, "LoadTextEncoders", {"family": family, "config": config,
                                            **{r: files[r] for r in ("clip_l", "clip_g", "t5") if r in files}}).id
    vae = add_node(g, "LoadVAE", {"path": files["vae"], "family": family, "config": config}).id
    g.connect(clip, "clip", ids["text"], "clip")
    g.connect(vae, "vae", ids["empty"], "vae")
    g.connect(vae, "vae", ids["decode"], "vae")
    g.connect(model, "model", ids["sampler"], "model")
    return g, ids


# -- the file renders what the folder renders ----------------------------------------------

@pytest.mark.parametrize("family,scheduler", [("sd1", "euler"), ("sdxl", "euler"), ("sd3", "flow_match_euler")])
def test_single_file_txt2img_is_bit_identical_to_its_folder(models, tmp_path, family, scheduler):
    folder, file = models[family]
    from_folder = render(txt2img(folder, scheduler=scheduler), tmp_path, aligned_folder=folder)
    from_file = render(txt2img(file, config=folder, scheduler=scheduler), tmp_path)
    assert torch.equal(from_file, from_folder)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_single_file_loads_the_folders_weights_and_scheduler(models, family):
    folder, file = models[family]
    ours, theirs = load_checkpoint_file(file, config=folder), load_model_folder(folder)
    assert type(ours[0]) is type(theirs[0]) and ours[0].scheduler_config == theirs[0].scheduler_config
    for mine, ref in ((ours[0].unet, theirs[0].unet), (ours[1].text_encoder, theirs[1].text_encoder),
                      (ours[2].vae, theirs[2].vae)):
        a, b = mine.state_dict(), ref.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flux_kept_as_separate_files_renders_what_its_folder_renders(flux_parts, tmp_path):
    folder, files = flux_parts
    from_folder = render(txt2img_graph(folder, prompt=PROMPT, steps=3, save=False, cfg=3.5,
                                       scheduler="flow_match_euler"), tmp_path, aligned_folder=folder)
    from_files = render(parts_graph("flux", files, folder), tmp_path)
    assert torch.equal(from_files, from_folder)


def test_sd3_transformer_file_with_separate_encoders_renders_what_its_folder_renders(models, tmp_path):
    folder, _ = models["sd3"]
    state = folder_to_original(folder)
    parts = tmp_path / "parts"
    parts.mkdir()
    # Stability's sd3 file without encoders: the MM-DiT and the VAE, under their original names
    save_file({k: v for k, v in state.items() if not k.startswith("text_encoders.")}, str(parts / "sd3.safetensors"))
    files = {"transformer": str(parts / "sd3.safetensors"), "vae": str(parts / "sd3.safetensors")}
    for role, name in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
        files[role] = os.path.join(folder, name, "model.safetensors")
    from_folder = render(txt2img_graph(folder, prompt=PROMPT, steps=3, save=False, scheduler="flow_match_euler"),
                         tmp_path, aligned_folder=folder)
    from_files = render(parts_graph("sd3", files, folder, cfg=4.0), tmp_path)
    assert torch.equal(from_files, from_folder)


def test_sdxl_checkpoint_split_into_parts_renders_what_its_folder_renders(models, tmp_path):
    """LoadDiffusionModel reads only a checkpoint's UNet, LoadVAE only its VAE; the CLIP-L and
    CLIP-G files are the folder's own (transformers' layout)."""
    folder, file = models["sdxl"]
    files = {"transformer": file, "vae": file, "clip_l": os.path.join(folder, "text_encoder", "model.safetensors"),
             "clip_g": os.path.join(folder, "text_encoder_2", "model.safetensors")}
    from_folder = render(txt2img_graph(folder, prompt=PROMPT, steps=3, save=False), tmp_path, aligned_folder=folder)
    from_files = render(parts_graph("sdxl", files, folder, cfg=4.0, scheduler="euler"), tmp_path)
    assert torch.equal(from_files, from_folder)


def test_a_text_encoder_file_loads_through_the_model_manager_once(flux_parts, tmp_path):
    _folder, files = flux_parts
    from app.engine.models import ModelManager
    from kernels.text_encoder_files import load_text_encoder_file

    manager = ModelManager()

    def load(path, role):
        import functools

        return manager.load(path, "float32", functools.partial(load_text_encoder_file, role=role,
                                                                config=flux_parts[0],
                                                                component={"clip_l": "text_encoder",
                                                                           "t5": "text_encoder_2"}[role],
                                                                family="flux"))
    first = load_text_encoder_files("flux", {"clip_l": files["clip_l"], "t5": files["t5"]}, config=flux_parts[0],
                                    load=load)
    second = load_text_encoder_files("flux", {"clip_l": files["clip_l"], "t5": files["t5"]}, config=flux_parts[0],
                                     load=load)
    assert manager.loads == 2  # two files, each once
    assert first.text_encoder.text_encoder is second.text_encoder.text_encoder


# -- family detection and the shipped configs -----------------------------------------------

def test_family_is_told_from_each_layout(models, flux_parts, tmp_path):
    assert {f: SingleFile(file).family() for f, (_, file) in models.items()} == {"sd1": "sd1", "sdxl": "sdxl",
                                                                                "sd3": "sd3"}
    sd2 = folder_to_single_file(models["sd1"][0], str(tmp_path / "sd2.safetensors"), family="sd2")
    assert SingleFile(sd2).family() == "sd2"
    assert SingleFile(flux_parts[1]["transformer"]).family() == "flux"
    # a UNet-only file: SDXL's has the added embedding; SD 1's cross attention reads 768 features
    unet_only = {k: v for k, v in folder_to_original(models["sdxl"][0]).items() if k.startswith("model.")}
    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    assert SingleFile(str(tmp_path / "unet.safetensors")).family() == "sdxl"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)},
              str(tmp_path / "sd1unet.safetensors"))
    assert SingleFile(str(tmp_path / "sd1unet.safetensors")).family() == "sd1"


def test_shipped_clip_vocabulary_tokenizes_as_clip():
    vocab, merges = clip_vocabulary()
    assert len(vocab) == 49408 and len(merges) == 48894
    tok = load_tokenizer(ConfigSource("sd1"), "tokenizer", "x.safetensors")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77 and tok.pad_token_id == 49407
    assert load_tokenizer(ConfigSource("sdxl"), "tokenizer_2", "x.safetensors").pad_token_id == 0  # "!"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd3", "flux"])
def test_shipped_skeleton_builds_the_real_architecture_on_meta(family):
    """The shipped configs describe the real models: each builds (on `meta`, no memory) with
    the published sizes."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    source = ConfigSource(family)
    counts = {}
    for name, spec in source.index().items():
        if name.startswith("_") or not isinstance(spec, list) or name.startswith(("tokenizer", "scheduler")):
            continue
        lib = diffusers if spec[0] == "diffusers" else transformers
        cls = getattr(lib, spec[1])
        with init_empty_weights():
            if spec[0] == "diffusers":
                module = cls.from_config(source.config(name))
            else:
                module = cls(cls.config_class.from_pretrained(source.root_for(name), subfolder=name))
        counts[name] = sum(p.numel() for p in module.parameters())
    expected = {"sd1": {"unet": 859_520_964, "text_encoder": 123_060_480},
                "sdxl": {"unet": 2_567_463_684, "text_encoder_2": 694_659_840},
                "sd3": {"transformer": 2_028_328_000}, "flux": {"transformer": 11_901_408_320}}
    for name, n in expected.get(family, {}).items():
        assert counts[name] == n, (name, counts[name])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd3"])
def test_full_size_key_sets_convert_both_ways_and_tell_their_family(family):
    """The shipped path with real shapes, on `meta` (no memory): each full-size component of the
    shipped skeleton, written in the original layout by our converter, is read back by diffusers'
    own converters to the same names and shapes, and the names tell the family."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights
    from diffusers.loaders import single_file_utils as sfu

    source = ConfigSource(family)
    with init_empty_weights():
        name = "unet" if family != "sd3" else "transformer"
        denoiser = getattr(diffusers, source.index()[name][1]).from_config(source.config(name))
        vae = diffusers.AutoencoderKL.from_config(source.config("vae"))
        encoders = {n: getattr(transformers, source.index()[n][1])(
            transformers.CLIPTextConfig.from_pretrained(source.root_for(n), subfolder=n))
            for n in ("text_encoder", "text_encoder_2") if n in source.index() and family != "sd3"}
    shapes = {}
    if family == "sd3":
        original = layout.sd3_to_original(denoiser.state_dict(), dict(denoiser.config))
        back = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    else:
        original = layout.prefixed(layout.unet_to_ldm(denoiser.state_dict(), dict(denoiser.config)), layout.UNET_PREFIX)
        back = sfu.convert_ldm_unet_checkpoint(original, dict(denoiser.config))
    shapes[name] = (back, denoiser.state_dict())
    vae_original = layout.prefixed(layout.vae_to_ldm(vae.state_dict(), dict(vae.config)), layout.VAE_PREFIX)
    vae_back = sfu.convert_ldm_vae_checkpoint(vae_original, dict(vae.config))
    shapes["vae"] = (vae_back, vae.state_dict())
    keys = list(original) + list(vae_original)
    for n, module in encoders.items():
        prefix = {("sd1", "text_encoder"): layout.SD1_CLIP_PREFIX, ("sd2", "text_encoder"): layout.SD2_OPEN_CLIP_PREFIX,
                  ("sdxl", "text_encoder"): layout.SDXL_CLIP_PREFIX,
                  ("sdxl", "text_encoder_2"): layout.SDXL_OPEN_CLIP_PREFIX}[(family, n)]
        if prefix.endswith(".model."):
            written = layout.clip_to_open_clip(module.state_dict(), prefix)
            back = sfu.convert_open_clip_checkpoint(module, written, prefix=prefix)
        else:
            written = layout.clip_to_ldm(module.state_dict(), prefix)
            back = sfu.convert_ldm_clip_checkpoint(written)
        shapes[n] = ({k.removeprefix("text_model.") if not hasattr(module, "text_model") else k: v
                      for k, v in back.items()}, module.state_dict())
        keys += list(written)
    for n, (read_back, own) in shapes.items():
        own = {k: v for k, v in own.items() if not k.endswith("position_ids")}
        assert {k: tuple(v.shape) for k, v in read_back.items()} == {k: tuple(v.shape) for k, v in own.items()}, n
    from kernels.model_folders import family_from_keys

    assert family_from_keys(keys) == family


# -- bad input -----------------------------------------------------------------------------

def test_truncated_safetensors_is_refused_naming_the_file(models, tmp_path):
    data = open(models["sd1"][1], "rb").read()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors.*truncated or corrupt"):
        load_model_folder(str(bad))


def test_corrupt_safetensors_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    with pytest.raises(ModelLoadError, match=r"noise\.safetensors.*truncated or corrupt"):
        load_model_folder(str(bad))


def test_file_of_an_unknown_family_is_refused_with_its_tensor_names(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"backbone.stem.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError, match=r"other\.safetensors.*'unknown'.*backbone\.stem\.weight"):
        load_model_folder(str(path))


def test_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match=r"model\.ckpt.*pickled.*convert"):
        load_checkpoint_file(str(path))
    with pytest.raises(ModelLoadError, match=r"model\.ckpt.*pickled.*convert"):
        load_model_folder(str(path))
    assert not marker.exists()


def test_transformer_only_file_says_which_encoders_are_missing(models, tmp_path):
    state = folder_to_original(models["sd3"][0])
    path = tmp_path / "sd3_medium.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("text_encoders.")}, str(path))
    with pytest.raises(ModelLoadError, match=r"sd3_medium\.safetensors: a sd3 file without its text encoders "
                                             r"\(text_encoder, text_encoder_2 missing.*LoadTextEncoders"):
        load_checkpoint_file(str(path), config=models["sd3"][0])


def test_missing_separate_text_encoder_is_named(flux_parts):
    folder, files = flux_parts
    with pytest.raises(ModelLoadError, match=r"flux needs the text encoder files t5 too"):
        load_text_encoder_files("flux", {"clip_l": files["clip_l"]}, config=folder)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: a T5 file, given as the clip_l"):
        load_text_encoder_files("flux", {"clip_l": files["t5"], "t5": files["t5"]}, config=folder)


def test_missing_t5_tokenizer_says_to_supply_it(models, tmp_path):
    """The shipped SD3 skeleton has no T5 tokenizer: a config folder without one is told so."""
    import shutil

    folder = tmp_path / "no-t5-tokenizer"
    shutil.copytree(models["sd3"][0], folder)
    shutil.rmtree(folder / "tokenizer_3")
    with pytest.raises(ModelLoadError, match=r"no tokenizer for 'tokenizer_3'.*T5's tokenizer is not shipped"):
        load_checkpoint_file(models["sd3"][1], config=str(folder))


def test_config_folder_of_another_family_is_refused(models):
    with pytest.raises(ModelLoadError, match=r"sdxl\.safetensors is a sdxl checkpoint but the config folder .*sd1"):
        load_checkpoint_file(models["sdxl"][1], config=models["sd1"][0])


def test_scheduler_of_the_wrong_kind_is_refused(models, tmp_path):
    import json
    import shutil

    folder = tmp_path / "sd3-ddpm"
    shutil.copytree(models["sd3"][0], folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    with pytest.raises(ModelLoadError, match=r"sd3\.safetensors is a sd3 checkpoint, which needs a flow-matching "
                                             r"scheduler, but .*'DDPMScheduler'"):
        load_checkpoint_file(models["sd3"][1], config=str(folder))


def test_load_model_node_reports_a_bad_file_as_its_error(tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(b"\x00" * 4)
    g, ids = txt2img_graph(str(bad), steps=1, save=False)
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[ids["load"]], output_dir=tmp_path)
    assert not report.ok
    assert "cut.safetensors" in report.nodes[ids["load"]].error
