"""SafeGuidance's "sld" mode against diffusers' StableDiffusionPipelineSafe on the same tiny
random SD model, seed and scheduler: the graph's image must be the pipeline's, with its
element-wise scale, threshold, momentum and warm-up."""

import numpy as np
import pytest
import torch
from conftest import CAPTURED, txt2img_graph

from app.engine import Executor
from nodes.registry import add_node

PROMPT = "a red circle on the left"
CONCEPT = "red"


def safe_pipeline(model_path):
    from diffusers import StableDiffusionPipelineSafe

    from kernels.models import load_model_folder
    from kernels.sampling import make_scheduler

    model, clip, vae = load_model_folder(model_path)
    pipe = StableDiffusionPipelineSafe(
        vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer, unet=model.unet,
        scheduler=make_scheduler("ddim", model.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.safety_concept = CONCEPT
    return pipe


def graph_latent(model_path, tmp_path, guidance: "dict | None"):
    """txt2img (ddim, 4 steps, cfg 4, seed 3), with a SafeGuidance node on the concept alone."""
    g, ids = txt2img_graph(model_path, prompt=PROMPT, steps=4, scheduler="ddim", cfg=4.0, seed=3, save=False)
    if guidance is not None:
        node = add_node(g, "SafeGuidance", {"concept": CONCEPT, "templates": "{}", **guidance})
        g.connect(ids["load"], "model", node.id, "model")
        g.connect(ids["load"], "clip", node.id, "clip")
        g.connect(node.id, "model", ids["sampler"], "model")
    cap = add_node(g, "TestCaptureLatent", {})
    g.connect(ids["sampler"], "latent", cap.id, "latent")
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[cap.id], output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return CAPTURED.pop("latent")


# (SLD settings of the pipeline, the node's); ddim's 4 timesteps are 751, 501, 251, 1: warm-up 0.3
# leaves the first (t > 700) unguided, as sld_warmup_steps=1
CASES = [
    (dict(sld_guidance_scale=40.0, sld_warmup_steps=1, sld_threshold=0.0, sld_momentum_scale=0.3, sld_mom_beta=0.4),
     dict(mode="sld", scale=40.0, warmup=0.3, threshold=0.0, momentum=0.3, beta=0.4)),
    (dict(sld_guidance_scale=2000.0, sld_warmup_steps=0, sld_threshold=0.025, sld_momentum_scale=0.0,
          sld_mom_beta=0.0),
     dict(mode="sld", scale=2000.0, warmup=0.0, threshold=0.025, momentum=0.0, beta=0.0)),
]


@pytest.mark.parametrize("sld, ours", CASES)
def test_sld_mode_matches_the_safe_pipeline(sd_model, tmp_path, sld, ours):
    pipe = safe_pipeline(sd_model)
    ref = pipe(PROMPT, height=16, width=16, num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(3), output_type="np", **sld).images
    plain = pipe(PROMPT, height=16, width=16, num_inference_steps=4, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(3), output_type="np", sld_guidance_scale=0.0).images
    latent = graph_latent(sd_model, tmp_path, ours)
    with torch.no_grad():
        got = pipe.decode_latents(latent)
    assert got.shape == ref.shape == (1, 16, 16, 3)
    assert np.abs(ref - plain).max() > 1e-3  # the pipeline's guidance changed the image ...
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)  # ... and ours made the same change
    with torch.no_grad():
        unguided = pipe.decode_latents(graph_latent(sd_model, tmp_path, None))
    np.testing.assert_allclose(unguided, plain, atol=2e-5, rtol=0)
