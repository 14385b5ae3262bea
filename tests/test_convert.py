"""`loomwork convert`: diffusers folder -> original single file -> folder gives the same weights,
and the file we write is what diffusers' own `from_single_file` reads (so ComfyUI and A1111)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from app.cli import main
from kernels import convert as layout
from kernels.convert_files import read_component

COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def build(kind, folder):
    from kernels import tiny, tiny_flux

    return {"sd1": lambda: tiny.build_tiny_model(folder, kind="latent"),
            "pixel": lambda: tiny.build_tiny_model(folder),
            "sdxl": lambda: tiny.build_tiny_sdxl_model(folder),
            "sd3": lambda: tiny.build_tiny_sd3_model(folder),
            "flux": lambda: tiny_flux.build_tiny_flux_model(folder)}[kind]()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    return {kind: build(kind, str(root / kind)) for kind in ("sd1", "pixel", "sdxl", "sd3")}


def convert(*args):
    return main(["convert", *map(str, args)])


def weights(folder):
    """component -> its tensors, read from the folder's files."""
    return {name: read_component(folder, name)[0] for name in COMPONENTS if os.path.isdir(os.path.join(folder, name))}


@pytest.mark.parametrize("kind,family", [("sd1", None), ("sd1", "sd2"), ("pixel", None), ("sdxl", None), ("sd3", None)])
def test_folder_to_file_to_folder_keeps_every_weight(folders, tmp_path, kind, family):
    folder = folders[kind]
    file = tmp_path / "model.safetensors"
    assert convert(folder, "--to", "single-file", file, *(["--family", family] if family else [])) == 0
    assert convert(file, "--to", "diffusers", tmp_path / "back", "--config", folder) == 0
    before, after = weights(folder), weights(str(tmp_path / "back"))
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        assert all(torch.equal(before[name][k], after[name][k]) for k in before[name]), name
    index = json.loads((tmp_path / "back" / "model_index.json").read_text())
    assert index == json.loads(open(os.path.join(folder, "model_index.json")).read())


def test_written_files_use_the_original_names(folders, tmp_path):
    names = {}
    for kind, family in (("sd1", None), ("sd1", "sd2"), ("sdxl", None), ("sd3", None)):
        out = tmp_path / f"{kind}-{family}.safetensors"
        assert convert(folders[kind], "--to", "single-file", out, *(["--family", family] if family else [])) == 0
        names[family or kind] = load_file(str(out))
    sd1, sd2, sdxl, sd3 = names["sd1"], names["sd2"], names["sdxl"], names["sd3"]
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "first_stage_model.encoder.down.0.block.0.norm1.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in sd1, key
    assert sd1["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # the original's 1x1 convs
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd2
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sdxl
    g = read_component(folders["sdxl"], "text_encoder_2")[0]
    assert torch.equal(sdxl["conditioner.embedders.1.model.text_projection"], g["text_projection.weight"].T)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in sd3
    assert "text_encoders.t5xxl.transformer.shared.weight" in sd3


def _same(module, reference) -> bool:
    a, b = module.state_dict(), reference.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_reads_our_sd1_file_to_the_same_weights(folders, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder, file = folders["sd1"], str(tmp_path / "sd1.safetensors")
    assert convert(folder, "--to", "single-file", file) == 0
    unet = UNet2DConditionModel.from_single_file(file, config=folder, subfolder="unet", local_files_only=True)
    assert _same(unet, UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    vae = AutoencoderKL.from_single_file(file, config=folder, subfolder="vae", local_files_only=True)
    assert _same(vae, AutoencoderKL.from_pretrained(folder, subfolder="vae"))
    pipe = StableDiffusionPipeline.from_single_file(file, config=folder, local_files_only=True, safety_checker=None)
    assert _same(pipe.unet, unet) and _same(pipe.vae, vae)
    assert _same(pipe.text_encoder, CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"))


def test_diffusers_reads_our_sdxl_file_to_the_same_weights(folders, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder, file = folders["sdxl"], str(tmp_path / "sdxl.safetensors")
    assert convert(folder, "--to", "single-file", file) == 0
    ours = StableDiffusionXLPipeline.from_single_file(file, config=folder, local_files_only=True)
    reference = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _same(getattr(ours, name), getattr(reference, name)), name


def test_diffusers_reads_our_sd3_transformer_to_the_same_weights(folders, tmp_path):
    from diffusers import SD3Transformer2DModel

    folder, file = folders["sd3"], str(tmp_path / "sd3.safetensors")
    assert convert(folder, "--to", "single-file", file) == 0
    ours = SD3Transformer2DModel.from_single_file(file, config=folder, subfolder="transformer", local_files_only=True)
    assert _same(ours, SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer"))


def test_dtype_option_converts_the_weights(folders, tmp_path):
    file = tmp_path / "half.safetensors"
    assert convert(folders["sd1"], "--to", "single-file", file, "--dtype", "float16") == 0
    assert {t.dtype for t in load_file(str(file)).values()} == {torch.float16}


def test_convert_errors_are_one_line_each(folders, tmp_path, capsys):
    assert convert(tmp_path / "nothing", "--to", "single-file", tmp_path / "x.safetensors") == 2
    assert "converts a diffusers model folder" in capsys.readouterr().err
    assert convert(folders["sd1"], "--to", "single-file", tmp_path / "x.ckpt") == 2
    assert "should end in .safetensors" in capsys.readouterr().err
    file = tmp_path / "m.safetensors"
    assert convert(folders["sd1"], "--to", "single-file", file) == 0
    capsys.readouterr()
    (tmp_path / "taken").mkdir()
    assert convert(file, "--to", "diffusers", tmp_path / "taken") == 2
    assert "already exists" in capsys.readouterr().err
    assert convert(folders["sdxl"], "--to", "single-file", file, "--family", "sd1") == 2
    assert "a sdxl folder, not sd1" in capsys.readouterr().err


def test_flux_folder_is_refused_for_single_file_with_a_reason(tmp_path, capsys):
    folder = build("flux", str(tmp_path / "flux"))
    assert convert(folder, "--to", "single-file", tmp_path / "f.safetensors") == 2
    assert "FLUX single files is not supported yet" in capsys.readouterr().err


def test_converter_refuses_a_tensor_it_has_no_name_for():
    with pytest.raises(layout.ConvertError, match=r"UNet: no original-layout name for 1 tensors.*extra\.weight"):
        layout.unet_to_ldm({"extra.weight": torch.zeros(1)}, {"layers_per_block": 1})
