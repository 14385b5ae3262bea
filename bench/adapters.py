"""Adapters on a small random model (JSON on stdout, and to --out): one section per adapter.

Sections (`--sections`, comma-separated; more adapters add theirs to SECTIONS):
- lora: a kohya LoRA file (rank --rank on every attention, feed-forward, projection and resnet
  convolution of the UNet) applied through kernels.adapters.lora, fused (the patch's way: merged
  into new weight tensors, peft layers removed) and unfused (peft layers beside the weights):
  the seconds to put the LoRA on and take it off, the tensor bytes held while it is on, and the
  seconds of one guided denoiser call (a sampler step) with no LoRA, fused and unfused. Variants
  run side by side, interleaved, --repeats times; medians and ratios are reported, and the
  number of steps from which fusing pays for its own apply cost.

- ip_adapter: IP-Adapter files in the standard layout (plain: 4 image tokens; Plus: a
  resampler to 16 tokens) with a small random CLIP vision encoder, applied through
  kernels.adapters.ip_adapter: the seconds of one guided denoiser call (a sampler step) with no
  IP-Adapter, one plain, one plain with a mask, one Plus and two plain at once, interleaved
  --repeats times (medians, ratios to the plain step); the seconds to put one on and take it off
  (per run) and to encode the image (once per IPAdapterApply).
- controlnet: a ControlNet made from the UNet (diffusers' ControlNetModel.from_unet, SD's
  conditioning embedding) applied through kernels.adapters.controlnet's patch: the seconds of
  one guided denoiser call with no ControlNet, with one inside its step window (the ControlNet
  runs, then the UNet with its residuals) and with one outside it (the hook only), interleaved.

  python bench/adapters.py --repeats 9 --out bench/results/adapters.json
  python bench/adapters.py --sections controlnet --out bench/results/adapters.json  # one section
  python bench/adapters.py --model tiny --repeats 3          # smoke

With --out, the sections of an existing file that this run does not make are kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2"]
MODELS = {  # UNet2DConditionModel configs: the tests' tiny one, and a small SD-shaped one
    "tiny": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                 norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=2),
    "small": dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256),
                  layers_per_block=1, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=256, attention_head_dim=8),
}


def median(xs):
    return statistics.median(xs)


def kohya_lora_file(unet, folder: str, rank: int, alpha: float) -> str:
    """A kohya LoRA file with random factors on LORA_TARGETS, written from peft's state dict."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights=False)
    state = get_peft_model_state_dict(inject_adapter_in_model(config, copy.deepcopy(unet)))
    tensors = {}
    for key, value in state.items():
        module, _, factor = key.partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = value.contiguous() * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    path = os.path.join(folder, "bench-lora.safetensors")
    save_file(tensors, path)
    return path


def held_bytes(unet, originals: dict) -> int:
    """Bytes of parameter tensors that are not the model's own: merged copies or adapter factors."""
    own = {t.data_ptr() for t in originals.values()}
    return sum(p.numel() * p.element_size() for p in unet.parameters() if p.data_ptr() not in own)


def lora_section(args) -> dict:
    from diffusers import UNet2DConditionModel

    from kernels.adapters import FAMILIES, attached_lora, parse_lora
    from kernels.adapters.lora import peft_layer_factors

    model, repeats, rank, batch = args.model, args.repeats, args.rank, args.batch
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**MODELS[model]).eval().requires_grad_(False)
    cfg = unet.config
    with tempfile.TemporaryDirectory() as folder:
        path = kohya_lora_file(unet, folder, rank, alpha=rank / 2)
        parsed = parse_lora(path, FAMILIES["sd"])
        size = os.path.getsize(path)
    x = torch.randn(2 * batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    text = torch.randn(2 * batch, 16, cfg.cross_attention_dim)
    t = torch.tensor(500)
    originals = {n: p.data for n, p in unet.named_parameters()}

    def step():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=text)

    times = {k: [] for k in ("apply_fused", "apply_unfused", "step_none", "step_fused", "step_unfused")}
    held = {}
    step()  # warm-up
    for _ in range(repeats):
        for variant in ("fused", "unfused"):
            started = time.perf_counter()
            with attached_lora(unet, "unet", parsed, 1.0, fuse=variant == "fused"):
                times[f"apply_{variant}"].append(time.perf_counter() - started)
                held[variant] = held_bytes(unet, originals)
                step()  # the first call after a change of weights can pay one-off costs
                started = time.perf_counter()
                step()
                times[f"step_{variant}"].append(time.perf_counter() - started)
                exit_started = time.perf_counter()
            times[f"apply_{variant}"][-1] += time.perf_counter() - exit_started
        started = time.perf_counter()
        step()
        times["step_none"].append(time.perf_counter() - started)
    med = {k: median(v) for k, v in times.items()}
    extra_apply = med["apply_fused"] - med["apply_unfused"]
    saved_per_step = med["step_unfused"] - med["step_fused"]
    lora_layers = len(peft_layer_factors(parsed.part("unet"), "unet", unet))
    return {
        "model": model, "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "lora_rank": rank, "lora_layers": lora_layers, "lora_file_bytes": size, "batch_with_cfg": 2 * batch,
        "repeats": repeats, "median_seconds": {k: round(v, 5) for k, v in med.items()},
        "held_tensor_bytes": held,
        "step_ratio_unfused_over_fused": round(med["step_unfused"] / med["step_fused"], 3),
        "step_ratio_fused_over_none": round(med["step_fused"] / med["step_none"], 3),
        "apply_ratio_fused_over_unfused": round(med["apply_fused"] / med["apply_unfused"], 3),
        "fusing_pays_after_steps": (round(extra_apply / saved_per_step, 2) if saved_per_step > 0 else None),
    }


IMAGE_ENCODER = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     image_size=112, patch_size=14, projection_dim=128)


def ip_adapter_tensors(unet, kind: str, encoder, seed: int) -> dict:
    """Random IP-Adapter tensors in the standard layout for `unet` and `encoder`."""
    from kernels.adapters.ip_adapter import cross_attention_layers

    g = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    if kind == "plain":
        out = {"image_proj.proj.weight": r(4 * width, encoder.projection_dim), "image_proj.proj.bias": r(4 * width),
               "image_proj.norm.weight": 1 + r(width), "image_proj.norm.bias": r(width)}
    else:  # Plus: the reference resampler, 4 layers of 64-wide heads, FFN x4, 16 queries
        hidden = 256
        out = {"image_proj.latents": r(1, 16, hidden), "image_proj.proj_in.weight": r(hidden, encoder.hidden_size),
               "image_proj.proj_in.bias": r(hidden), "image_proj.proj_out.weight": r(width, hidden),
               "image_proj.proj_out.bias": r(width), "image_proj.norm_out.weight": 1 + r(width),
               "image_proj.norm_out.bias": r(width)}
        for i in range(4):
            p = f"image_proj.layers.{i}."
            out.update({p + "0.norm1.weight": 1 + r(hidden), p + "0.norm1.bias": r(hidden),
                        p + "0.norm2.weight": 1 + r(hidden), p + "0.norm2.bias": r(hidden),
                        p + "0.to_q.weight": r(hidden, hidden), p + "0.to_kv.weight": r(2 * hidden, hidden),
                        p + "0.to_out.weight": r(hidden, hidden), p + "1.0.weight": 1 + r(hidden),
                        p + "1.0.bias": r(hidden), p + "1.1.weight": r(4 * hidden, hidden),
                        p + "1.3.weight": r(hidden, 4 * hidden)})
    for index, (_name, attn) in enumerate(cross_attention_layers(unet)):
        for part in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{2 * index + 1}.{part}.weight"] = r(attn.to_k.out_features, width)
    return out


def ip_adapter_section(args) -> dict:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from kernels.adapters.ip_adapter import ip_adapter, ip_adapter_patch, load_image_encoder, read_ip_adapter_file
    from kernels.patching import SamplingRun, applied_patches

    model, repeats, batch = args.model, args.repeats, args.batch
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**MODELS[model]).eval().requires_grad_(False)
    cfg = unet.config
    image = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as folder:
        CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER)).save_pretrained(os.path.join(folder, "enc"))
        encoder = load_image_encoder(os.path.join(folder, "enc"))
        adapters = {}
        for kind, seed in (("plain", 1), ("second", 2), ("plus", 3)):
            path = os.path.join(folder, f"{kind}.safetensors")
            save_file(ip_adapter_tensors(unet, "plus" if kind == "plus" else "plain", encoder.model.config, seed), path)
            adapters[kind] = ip_adapter(read_ip_adapter_file(path), encoder)
    side = cfg.sample_size * 8
    mask = torch.zeros(1, side, side)
    mask[:, :, : side // 2] = 1.0
    encode_times = []
    for _ in range(repeats):
        started = time.perf_counter()
        plain = ip_adapter_patch(adapters["plain"], unet, image, 1.0)
        encode_times.append(time.perf_counter() - started)
    variants = {"none": [], "plain": [plain],
                "plain_masked": [ip_adapter_patch(adapters["plain"], unet, image, 1.0, mask=mask)],
                "plus": [ip_adapter_patch(adapters["plus"], unet, image, 1.0)],
                "two_plain": [plain, ip_adapter_patch(adapters["second"], unet, image, 0.5)]}
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = torch.randn(2 * batch, *shape[1:])
    text = torch.randn(2 * batch, 16, cfg.cross_attention_dim)
    t = torch.tensor(500)
    steps = {k: [] for k in variants}
    apply_times = []
    for _ in range(repeats):
        for name, patches in variants.items():
            run = SamplingRun(unet, None, None, None, 4.0, 1, shape)
            started = time.perf_counter()
            with applied_patches(patches, unet, run), torch.no_grad():
                entered = time.perf_counter() - started
                unet(x, t, encoder_hidden_states=text)  # the first call installs the processors
                started = time.perf_counter()
                unet(x, t, encoder_hidden_states=text)
                steps[name].append(time.perf_counter() - started)
                exit_started = time.perf_counter()
            if name == "plain":
                apply_times.append(entered + time.perf_counter() - exit_started)
    med = {k: median(v) for k, v in steps.items()}
    return {
        "model": model, "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "image_encoder_parameters": sum(p.numel() for p in encoder.model.parameters()),
        "cross_attention_layers": len([n for n in unet.attn_processors if n.endswith("attn2.processor")]),
        "batch_with_cfg": 2 * batch, "repeats": repeats,
        "median_step_seconds": {k: round(v, 5) for k, v in med.items()},
        "step_ratio_to_none": {k: round(v / med["none"], 3) for k, v in med.items() if k != "none"},
        "median_apply_and_restore_seconds": round(median(apply_times), 5),
        "median_encode_seconds": round(median(encode_times), 5),
    }


def controlnet_section(args) -> dict:
    from diffusers import ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel

    from kernels.adapters.controlnet import ControlNet, controlnet_patch
    from kernels.patching import SamplingRun

    model, repeats, batch = args.model, args.repeats, args.batch
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**MODELS[model]).eval().requires_grad_(False)
    cn = ControlNetModel.from_unet(unet).eval().requires_grad_(False)
    with torch.no_grad():  # random output convolutions: the residuals are not zero
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.copy_(torch.randn_like(p) * 0.05)
    control = ControlNet(cn, "bench-controlnet", "bench-controlnet")
    cfg = unet.config
    size = cfg.sample_size
    image = torch.rand(1, size * 8, size * 8, 3)
    x = torch.randn(2 * batch, cfg.in_channels, size, size)
    text = torch.randn(2 * batch, 16, cfg.cross_attention_dim)
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    inside, outside = scheduler.timesteps[2], scheduler.timesteps[8]  # the window is [0, 0.5]
    patch = controlnet_patch(control, unet, image, 1.0, 0.0, 0.5)

    def step(t):
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=text)

    times = {k: [] for k in ("step_none", "step_controlnet", "step_outside_window")}
    run = SamplingRun(unet=unet, scheduler=scheduler, positive=None, negative=None, cfg=5.0, steps=10,
                      latent_shape=(batch, cfg.in_channels, size, size))
    with patch.applied(unet, run):
        step(inside)  # warm-up (the control image is prepared once per run)
    step(inside)
    for _ in range(repeats):
        started = time.perf_counter()
        step(inside)
        times["step_none"].append(time.perf_counter() - started)
        with patch.applied(unet, run):
            step(inside)  # the run's first call prepares the control image
            for key, t in (("step_controlnet", inside), ("step_outside_window", outside)):
                started = time.perf_counter()
                step(t)
                times[key].append(time.perf_counter() - started)
    med = {k: median(v) for k, v in times.items()}
    return {
        "model": model, "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "controlnet_parameters": sum(p.numel() for p in cn.parameters()), "control_image": [size * 8, size * 8],
        "batch_with_cfg": 2 * batch, "repeats": repeats, "median_seconds": {k: round(v, 5) for k, v in med.items()},
        "step_ratio_controlnet_over_none": round(med["step_controlnet"] / med["step_none"], 3),
        "step_ratio_outside_window_over_none": round(med["step_outside_window"] / med["step_none"], 3),
    }


SECTIONS = {"lora": lora_section, "ip_adapter": ip_adapter_section, "controlnet": controlnet_section}  # name -> function(args) -> dict


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="which sections to run")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="images per call (the call runs 2x for CFG)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="", help="write the JSON here; sections of an earlier file that "
                                                   "this run leaves out are kept")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"bench": "adapters", "torch_threads": args.threads, "sections": {}}
    if args.out and os.path.isfile(args.out):  # keep the sections this run does not make
        with open(args.out, encoding="utf-8") as f:
            results["sections"].update(json.load(f).get("sections", {}))
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        results["sections"][name] = SECTIONS[name](args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        from kernels.files import atomic_write

        atomic_write(args.out, (text + "\n").encode("utf-8"), durable=False)
    return results


if __name__ == "__main__":
    main()
