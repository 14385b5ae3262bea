"""ControlNet files alone in their folder (ComfyUI keeps them so): the architecture read off the
tensors' shapes, for diffusers-layout and original-layout (ldm) files, and an original file's
yaml when it has one beside it. The original-layout file is written by the inverse of diffusers'
own conversion, so loading it back through diffusers' conversion must give the same weights."""

import shutil

import pytest
import torch

from kernels.adapters.controlnet import load_control_net

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def original_layout(state: dict, layers_per_block: int) -> dict:
    """A diffusers ControlNet state dict in the original (ldm) layout that ComfyUI and A1111
    files have: the inverse of diffusers' convert_controlnet_checkpoint, written for the test."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["layers"]
    step = layers_per_block + 1

    def resnet(rest):
        head, _, tail = rest.partition(".")
        return f"{RESNET_NAMES[head]}.{tail}"

    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key in fixed:
            name = fixed[key]
        elif key.startswith("controlnet_cond_embedding.blocks."):
            name = f"input_hint_block.{2 * (int(parts[2]) + 1)}.{parts[3]}"
        elif key.startswith("controlnet_down_blocks."):
            name = f"zero_convs.{parts[1]}.0.{parts[2]}"
        elif key.startswith("controlnet_mid_block."):
            name = f"middle_block_out.0.{parts[1]}"
        elif key.startswith("down_blocks.") and parts[2] == "downsamplers":
            name = f"input_blocks.{(int(parts[1]) + 1) * step}.0.op.{parts[-1]}"
        elif key.startswith("down_blocks."):
            index, rest = 1 + int(parts[1]) * step + int(parts[3]), ".".join(parts[4:])
            name = f"input_blocks.{index}.0.{resnet(rest)}" if parts[2] == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif key.startswith("mid_block."):
            rest = ".".join(parts[3:])
            name = f"middle_block.{2 * int(parts[2])}.{resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        else:
            raise KeyError(key)
        out[name] = value
    return out


@pytest.fixture(scope="module")
def lone_files(tmp_path_factory):
    """A random SD-1.x-shaped ControlNet (8 heads, 32 norm groups, SD's hint embedding; narrow)
    as a diffusers-layout and an original-layout .safetensors file, each alone in its folder."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    torch.manual_seed(4)
    cn = ControlNetModel(in_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=768,
                         attention_head_dim=8).eval()
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn_like(p) * 0.05)
    root = tmp_path_factory.mktemp("lone")
    state = {k: v.contiguous() for k, v in cn.state_dict().items()}
    (root / "diffusers").mkdir()
    (root / "original").mkdir()
    save_file(state, str(root / "diffusers" / "cn.safetensors"))
    save_file(original_layout(state, 1), str(root / "original" / "control_tiny.safetensors"))
    return cn, str(root / "diffusers" / "cn.safetensors"), str(root / "original" / "control_tiny.safetensors")


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_a_lone_file_loads_with_the_architecture_read_off_its_shapes(lone_files, layout):
    cn, diffusers_file, original_file = lone_files
    loaded = load_control_net(diffusers_file if layout == "diffusers" else original_file).module
    a, b = cn.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                 "attention_head_dim", "use_linear_projection", "conditioning_embedding_out_channels"):
        assert _plain(loaded.config[name]) == _plain(cn.config[name]), name
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 768)
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = cn(x, 10, encoder_hidden_states=text, controlnet_cond=image, return_dict=False)
        got = loaded(x, 10, encoder_hidden_states=text, controlnet_cond=image, return_dict=False)
    assert all(torch.equal(p, q) for p, q in zip(want[0], got[0])) and torch.equal(want[1], got[1])


def test_an_original_layout_file_reads_the_yaml_beside_it(lone_files, tmp_path):
    import yaml

    from kernels.adapters.controlnet import original_config_from_shapes, tensor_shapes

    cn, _diffusers_file, original_file = lone_files
    file = tmp_path / "control_tiny.safetensors"
    shutil.copy(original_file, file)
    config = original_config_from_shapes(tensor_shapes(str(file)))
    for part in ("control_stage_config", "unet_config"):
        config["model"]["params"][part]["params"]["num_heads"] = 4  # not what the shapes would say
    (tmp_path / "control_tiny.yaml").write_text(yaml.safe_dump(config))
    loaded = load_control_net(str(file)).module
    assert loaded.config.attention_head_dim == 4
    want, got = cn.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
