"""Model folders: ComfyUI and A1111 trees are listed with kinds, names and families told from
headers alone; `loomwork models`; LoadModel's `ckpt:NAME` through the executor."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import txt2img_graph

from app.cli import main
from kernels.model_folders import (
    ModelNotFound,
    family_from_keys,
    find_model,
    kind_folders,
    read_safetensors_header,
    roots_from_env,
    scan,
)

REPO = Path(__file__).resolve().parents[1]

SDXL_KEYS = ["conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight"]
SD1_KEYS = ["cond_stage_model.transformer.text_model.embeddings.position_ids",
            "model.diffusion_model.input_blocks.0.0.weight"]
SD2_KEYS = ["cond_stage_model.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight"]
SD3_KEYS = ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]
FLUX_KEYS = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]
LORA_KEYS = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
VAE_KEYS = ["encoder.conv_in.weight", "decoder.conv_out.weight"]


def write_safetensors(path: Path, keys: list[str], metadata: dict | None = None) -> Path:
    """A safetensors file by hand: 8-byte little-endian header length, the JSON header, then
    zero bytes for one float32 element per tensor."""
    header = {key: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
              for i, key in enumerate(keys)}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * len(keys)))
    return path


def write_diffusers(folder: Path, class_name: str, cross_attention_dim: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "unet": ["diffusers", "X"]}))
    if cross_attention_dim is not None:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": cross_attention_dim}))
    # Weights inside a diffusers folder are its parts, not entries of their own.
    write_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors", SD1_KEYS)
    return folder


@pytest.fixture
def comfy(tmp_path) -> Path:
    """A ComfyUI install: ROOT/models/<kind folder>/..."""
    models = tmp_path / "ComfyUI" / "models"
    write_safetensors(models / "checkpoints" / "sdxl" / "juggernaut.safetensors", SDXL_KEYS)
    write_safetensors(models / "checkpoints" / "dreamshaper.safetensors", SD1_KEYS)
    write_safetensors(models / "checkpoints" / "sd21.safetensors", SD2_KEYS)
    write_safetensors(models / "checkpoints" / "sd3_medium.safetensors", SD3_KEYS)
    write_safetensors(models / "unet" / "flux1-dev.safetensors", FLUX_KEYS)
    write_safetensors(models / "loras" / "detail.safetensors", LORA_KEYS)
    write_safetensors(models / "vae" / "ae.safetensors", VAE_KEYS)
    write_safetensors(models / "clip" / "t5xxl.safetensors", ["encoder.block.0.layer.0.SelfAttention.q.weight"])
    (models / "checkpoints" / "old.ckpt").write_bytes(b"\x80\x02not opened")
    (models / "checkpoints" / "broken.safetensors").write_bytes(b"\x10\x00\x00")
    (models / "checkpoints" / "notjson.safetensors").write_bytes(struct.pack("<Q", 5) + b"hello")
    (models / "checkpoints" / "juggernaut.preview.png").write_bytes(b"png")
    write_diffusers(models / "diffusers" / "my-sd15", "StableDiffusionPipeline", 768)
    write_diffusers(models / "diffusers" / "sd2-base", "StableDiffusionPipeline", 1024)
    write_diffusers(models / "diffusers" / "xl", "StableDiffusionXLPipeline")
    write_diffusers(models / "diffusers" / "flux-schnell", "FluxPipeline")
    return tmp_path / "ComfyUI"


@pytest.fixture
def a1111(tmp_path) -> Path:
    """An A1111 install's models folder (the user points at models/, not the app root)."""
    models = tmp_path / "webui" / "models"
    write_safetensors(models / "Stable-diffusion" / "realistic.safetensors", SD1_KEYS)
    write_safetensors(models / "Lora" / "style.safetensors", ["unet.down.lora_A.weight"])
    write_safetensors(models / "VAE" / "vae-ft-mse.safetensors", VAE_KEYS)
    (models / "ESRGAN").mkdir()
    (models / "ESRGAN" / "4x-UltraSharp.pth").write_bytes(b"pickle")
    return models


def by_name(entries):
    return {e.name: e for e in entries}


def test_a_comfyui_tree_is_listed_with_kinds_names_and_families(comfy):
    entries = by_name(scan([str(comfy)]))
    expected = {
        "sdxl/juggernaut.safetensors": ("checkpoint", "sdxl"),
        "dreamshaper.safetensors": ("checkpoint", "sd1"),
        "sd21.safetensors": ("checkpoint", "sd2"),
        "sd3_medium.safetensors": ("checkpoint", "sd3"),
        "flux1-dev.safetensors": ("diffusion_model", "flux"),
        "detail.safetensors": ("lora", "lora"),
        "ae.safetensors": ("vae", "unknown"),
        "t5xxl.safetensors": ("text_encoder", "unknown"),
        "old.ckpt": ("checkpoint", "pickle"),
        "broken.safetensors": ("checkpoint", "unreadable"),
        "notjson.safetensors": ("checkpoint", "unreadable"),
        "my-sd15": ("diffusers", "sd1"),
        "sd2-base": ("diffusers", "sd2"),
        "xl": ("diffusers", "sdxl"),
        "flux-schnell": ("diffusers", "flux"),
    }
    assert {name: (e.kind, e.family) for name, e in entries.items()} == expected
    assert "convert" in entries["old.ckpt"].note
    assert "truncated" in entries["broken.safetensors"].note
    assert "not JSON" in entries["notjson.safetensors"].note
    assert entries["sdxl/juggernaut.safetensors"].path == str(
        comfy / "models" / "checkpoints" / "sdxl" / "juggernaut.safetensors")


def test_an_a1111_models_folder_and_a_plain_folder_are_recognised(a1111, tmp_path):
    entries = by_name(scan([str(a1111)]))
    assert {name: (e.kind, e.family) for name, e in entries.items()} == {
        "realistic.safetensors": ("checkpoint", "sd1"),
        "style.safetensors": ("lora", "lora"),
        "vae-ft-mse.safetensors": ("vae", "unknown"),
        "4x-UltraSharp.pth": ("upscale_model", "pickle"),
    }
    plain = tmp_path / "plain"
    write_safetensors(plain / "a.safetensors", SDXL_KEYS)
    write_diffusers(plain / "b", "StableDiffusion3Pipeline")
    assert kind_folders(str(plain)) == [(str(plain), "checkpoint")]
    assert {n: (e.kind, e.family) for n, e in by_name(scan([str(plain)])).items()} == {
        "a.safetensors": ("checkpoint", "sdxl"), "b": ("diffusers", "sd3")}


def test_families_from_tensor_names_and_metadata():
    assert family_from_keys(["model.diffusion_model.double_blocks.0.img_mod.lin.weight"]) == "flux"
    assert family_from_keys(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"]) == "lora"
    assert family_from_keys(["x"], {"modelspec.architecture": "stable-diffusion-xl-v1-base"}) == "sdxl"
    assert family_from_keys(["x"]) == "unknown"


def test_the_header_is_read_without_the_tensors(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", SD1_KEYS, {"format": "pt"})
    keys, metadata = read_safetensors_header(str(path))
    assert keys == SD1_KEYS and metadata == {"format": "pt"}
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(ValueError, match="not a safetensors"):
        read_safetensors_header(str(huge))


def test_the_scan_is_bounded_in_depth_and_count(tmp_path):
    deep = tmp_path / "plain" / "a" / "b" / "c" / "d" / "e"
    write_safetensors(deep / "too-deep.safetensors", SD1_KEYS)
    write_safetensors(tmp_path / "plain" / "a" / "ok.safetensors", SD1_KEYS)
    names = set(by_name(scan([str(tmp_path / "plain")])))
    assert names == {"a/ok.safetensors"}
    for i in range(30):
        write_safetensors(tmp_path / "many" / f"m{i:02}.safetensors", SD1_KEYS)
    assert len(scan([str(tmp_path / "many")], max_visits=10)) == 10
    (tmp_path / "loop").mkdir()
    os.symlink(tmp_path / "loop", tmp_path / "loop" / "again")  # a loop ends, it does not hang
    assert scan([str(tmp_path / "loop")]) == []
    assert scan([str(tmp_path / "missing")]) == []


def test_roots_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOOMWORK_MODELS", os.pathsep.join(["/a", "", "~/b"]))
    assert roots_from_env() == ["/a", os.path.expanduser("~/b")]
    assert roots_from_env({}) == []


def test_find_model_by_name_and_close_matches(comfy, a1111):
    roots = [str(comfy), str(a1111)]
    checkpoints = comfy / "models" / "checkpoints"
    assert find_model("sdxl/juggernaut.safetensors", roots) == str(checkpoints / "sdxl" / "juggernaut.safetensors")
    assert find_model("sdxl/juggernaut", roots) == str(checkpoints / "sdxl" / "juggernaut.safetensors")
    assert find_model("my-sd15", roots) == str(comfy / "models" / "diffusers" / "my-sd15")
    assert find_model("realistic", roots).endswith("realistic.safetensors")
    with pytest.raises(ModelNotFound) as info:
        find_model("sdxl/jugernaut", roots)
    message = str(info.value)
    assert "'sdxl/jugernaut'" in message and "sdxl/juggernaut.safetensors" in message
    assert str(checkpoints) in message and str(a1111 / "Stable-diffusion") in message
    with pytest.raises(ModelNotFound, match="flux1-dev"):  # a diffusion model is not a checkpoint
        find_model("flux1-dev", roots)
    with pytest.raises(ModelNotFound):  # a name cannot climb out of its kind folder
        find_model("../loras/detail.safetensors", roots)
    with pytest.raises(ModelNotFound, match="LOOMWORK_MODELS"):
        find_model("x", [])


def test_loomwork_models_json_and_table(comfy, a1111, capsys, monkeypatch):
    monkeypatch.setenv("LOOMWORK_MODELS", str(a1111))
    assert main(["models", "--json", "--models", str(comfy)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert set(listed[0]) == {"name", "kind", "path", "family", "note"}
    names = [item["name"] for item in listed]
    assert "sdxl/juggernaut.safetensors" in names and "realistic.safetensors" in names
    assert names.index("sdxl/juggernaut.safetensors") < names.index("realistic.safetensors")  # --models first
    assert main(["models", "--models", str(comfy)]) == 0
    table = capsys.readouterr().out
    assert "sdxl/juggernaut.safetensors" in table and "pickle" in table and "convert" in table


def test_loomwork_models_without_folders_is_a_usage_error(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("LOOMWORK_MODELS", raising=False)
    assert main(["models"]) == 2
    assert "--models" in capsys.readouterr().err
    assert main(["models", "--models", str(tmp_path / "nope")]) == 2


@pytest.fixture(scope="module")
def comfy_with_tiny(tmp_path_factory):
    from kernels.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("comfy")
    build_tiny_model(str(root / "models" / "diffusers" / "tiny"))
    return root


def test_ckpt_name_resolves_through_the_executor_and_runs(comfy_with_tiny, tmp_path):
    from app.engine import Executor
    from nodes import registry

    graph, ids = txt2img_graph("ckpt:tiny", steps=2)
    executor = Executor(disk_cache=False, model_roots=[str(comfy_with_tiny)])
    report = executor.run(graph, output_dir=tmp_path)
    assert report.ok, {n: r.error for n, r in report.nodes.items()}
    assert report.status(ids["load"]) == "ran" and len(report.outputs()) == 1
    # The fingerprint is of the resolved folder, so a changed model file is a new key.
    spec = registry.get("LoadModel")
    ctx = type("Ctx", (), {"resolve_path": lambda self, p: executor.resolve_path(p)})()
    fingerprint = spec.fingerprint({"path": "ckpt:tiny"}, ctx)
    assert fingerprint[0] == str(comfy_with_tiny / "models" / "diffusers" / "tiny") and fingerprint[1]


def test_an_unknown_ckpt_name_fails_the_node_with_the_folders_searched(comfy_with_tiny, tmp_path):
    from app.engine import Executor

    graph, ids = txt2img_graph("ckpt:tinny", steps=2)
    report = Executor(disk_cache=False, model_roots=[str(comfy_with_tiny)]).run(graph, output_dir=tmp_path)
    error = report.nodes[ids["load"]].error
    assert "'tinny'" in error and "close matches: tiny" in error
    assert str(comfy_with_tiny / "models" / "diffusers") in error
    assert report.nodes[ids["load"]].traceback is None  # a message for the user, not a crash


def test_loomwork_run_passes_models(comfy_with_tiny, tmp_path, monkeypatch):
    from app.graph import save

    monkeypatch.setenv("LOOMWORK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LOOMWORK_MODELS", raising=False)
    graph, _ = txt2img_graph("ckpt:tiny", steps=2)
    save(graph, tmp_path / "g.loom")
    args = ["run", str(tmp_path / "g.loom"), "--out", str(tmp_path / "out"), "--no-disk-cache"]
    assert main(args + ["--models", str(comfy_with_tiny)]) == 0
    assert main(args) == 1  # no folders: the LoadModel node fails with a message


def test_importing_model_folders_does_not_import_torch():
    code = ("import sys, kernels.model_folders\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_image_encoders_are_their_own_kind(tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    write_safetensors(models / "clip_vision" / "vit-h" / "model.safetensors",
                      ["vision_model.embeddings.patch_embedding.weight"])
    entries = by_name(scan([str(tmp_path / "ComfyUI")]))
    assert entries["vit-h/model.safetensors"].kind == "clip_vision"
    assert find_model("vit-h/model.safetensors", [str(tmp_path / "ComfyUI")], kinds=("clip_vision",)).endswith(
        "model.safetensors")


def test_component_folders_are_listed_and_found_in_their_kind(tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    cn = models / "controlnet" / "canny-sd15"
    write_safetensors(cn / "diffusion_pytorch_model.safetensors", ["controlnet_cond_embedding.conv_in.weight"])
    (cn / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", "cross_attention_dim": 768}))
    (models / "controlnet" / "empty").mkdir()
    entries = by_name(scan([str(tmp_path / "ComfyUI")]))
    assert entries["canny-sd15"].kind == "controlnet" and entries["canny-sd15"].family == "sd1"
    assert "empty" not in entries
    root = [str(tmp_path / "ComfyUI")]
    assert find_model("canny-sd15", root, kinds=("controlnet",)) == str(cn)
    with pytest.raises(ModelNotFound):
        find_model("canny-sd15", root)  # not a checkpoint


@pytest.mark.parametrize("node, param, folder, kinds", [
    ("LoadDiffusionModel", "path", "unet", ("diffusion_model", "checkpoint")),
    ("LoadTextEncoders", "t5", "text_encoders", ("text_encoder",)),
    ("LoadVAE", "path", "vae", ("vae",)),
    ("LoadLoRA", "path", "loras", ("lora",)),
])
def test_each_loader_finds_ckpt_names_among_its_own_kinds(tmp_path, node, param, folder, kinds):
    from app.engine import Executor
    from nodes import registry

    root = tmp_path / "ComfyUI"
    write_safetensors(root / "models" / folder / "thing.safetensors", VAE_KEYS)
    spec = registry.get(node)
    assert tuple(spec.params[param].models) == kinds  # what the picker offers
    executor = Executor(disk_cache=False, model_roots=[str(root)])
    ctx = type("Ctx", (), {"resolve_path": lambda self, p, kinds=None: executor.resolve_path(p, kinds=kinds)})()
    params = {name: p.default for name, p in spec.params.items()}
    params[param] = "ckpt:thing.safetensors"
    assert str(root / "models" / folder / "thing.safetensors") in str(spec.fingerprint(params, ctx))
