"""Neuron pruning: erase a concept by switching off the UNet neurons it uses.

After Chavhan et al., "Memorized Images in Diffusion Models share a Subspace that can be Located
and Deleted": contrast the activations of the feed-forward neurons between the concept's prompts
and general prompts, and prune the neurons the concept uses and the general prompts do not,
chosen by an activation-weighted magnitude score. Training-free; stored as a weight delta
(`WeightDeltaPatch`). Only the paper's abstract was checked (see `prune_concept_neurons` for
what is ours).

The paper's neurons are the feed-forward blocks' (site "feed_forward"). Site
"cross_attention_values" is ours: the channels of the text cross-attention's output (its values
read from the prompt), for a model whose FFNs do not carry the concept. On the built-in ShapesT2I
model zeroing every FFN output weight still draws the prompt's colour, while zeroing the
cross-attention outputs loses the prompt altogether: the prompt reaches the image through them.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch

from kernels.denoiser import as_denoiser, encode_prompts

from .patches import _is_mmdit


def _is_feed_forward(module) -> bool:
    net = getattr(module, "net", None)
    return (any(c.__name__ == "FeedForward" for c in type(module).__mro__)
            and isinstance(net, torch.nn.ModuleList) and len(net) >= 3 and isinstance(net[2], torch.nn.Linear))


def ffn_output_layers(unet) -> list[str]:
    """Names of the output Linear (`ff.net.2`) of every transformer feed-forward block (an
    MM-DiT's: both streams' `ff` and `ff_context`; FLUX's single blocks fuse their MLP into
    `proj_out` with the attention and are not among them).

    Its input is the FFN's hidden layer (GEGLU/GELU output): one column of its weight per neuron.
    """
    unet = getattr(unet, "module", unet)
    names = [f"{n}.net.2" for n, m in unet.named_modules() if _is_feed_forward(m)]
    if not names:
        raise ValueError("the model has no transformer feed-forward blocks (diffusers FeedForward, ff.net.2)")
    return names


def cross_attention_output_layers(unet) -> list[str]:
    """Names of the output Linear (`to_out.0`) of every attention that reads the text: a UNet's
    cross-attention `attn2`; an MM-DiT's joint attention, image stream (FLUX's single blocks
    fuse it into `proj_out` and are not among them).

    Its input is the attention's output before projection: channel j of head h is the
    attention-weighted mean of the text tokens' value channel j, so one weight column per value
    channel, pruned like a feed-forward neuron."""
    unet = getattr(unet, "module", unet)
    pattern = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn\.to_out\.0$" if _is_mmdit(unet)
                         else r"\.attn2\.to_out\.0$")
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n)]
    if not names:
        raise ValueError("the model has no text cross-attention output projections (attn2.to_out.0)")
    return names


PRUNE_SITES = {"feed_forward": ffn_output_layers, "cross_attention_values": cross_attention_output_layers}


def prune_layers(unet, site: str) -> list[str]:
    """The Linear layers whose input neurons `site` prunes (`PRUNE_SITES`)."""
    if site not in PRUNE_SITES:
        raise ValueError(f"site must be one of {tuple(PRUNE_SITES)}, got {site!r}")
    return PRUNE_SITES[site](unet)


def probe_timesteps(count: int, num_train_timesteps: int = 1000) -> list[int]:
    """`count` training timesteps spaced evenly from the noisiest down ("trailing" spacing):
    4 of 1000 -> [999, 749, 499, 249]."""
    if count < 1:
        raise ValueError(f"timesteps must be at least 1, got {count}")
    n = int(num_train_timesteps)
    return [max(0, int(round(n - 1 - i * n / count))) for i in range(count)]


@torch.no_grad()
def ffn_activations(unet, embeds: torch.Tensor, layers: Sequence[str], *, timesteps: Sequence[int],
                    seed: int = 0, samples: int = 2, batch: int = 16) -> dict[str, torch.Tensor]:
    """Mean |activation| (float64, one value per hidden neuron) of each layer's input, over every
    prompt in `embeds` (n, L, D), `samples` fixed-seed noise images, every timestep and every
    spatial position. The noise depends on `seed` only, so two prompt sets probed with the same
    seed see the same inputs and differ only in their text."""
    denoiser = as_denoiser(unet)
    unet = denoiser.module
    params = next(unet.parameters())
    dev, dt = params.device, params.dtype
    noise = torch.randn((samples,) + tuple(denoiser.sample_shape()),
                        generator=torch.Generator("cpu").manual_seed(seed))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {name: 0 for name in layers}

    def make_hook(name):
        def hook(_m, inp):
            h = inp[0].detach()
            s = h.abs().double().reshape(-1, h.shape[-1]).sum(dim=0)
            sums[name] = s if name not in sums else sums[name] + s.to(sums[name].device)
            counts[name] += h.numel() // h.shape[-1]
        return hook

    handles = [unet.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in layers]
    jobs = [(t, p, s) for t in timesteps for p in range(embeds.shape[0]) for s in range(samples)]
    try:
        for i in range(0, len(jobs), batch):
            chunk = jobs[i:i + batch]
            x = torch.stack([noise[s] for _, _, s in chunk]).to(dev, dt)
            t = torch.tensor([float(t) for t, _, _ in chunk], device=dev)
            e = embeds[[p for _, p, _ in chunk]].to(dev, dt)
            denoiser.predict(x, t, e)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if not counts[n]]
    if missing:
        raise ValueError(f"the layer {missing[0]!r} did not run in the UNet's forward")
    return {name: (sums[name] / counts[name]).cpu() for name in layers}


def neuron_scores(weight: torch.Tensor, act_concept: torch.Tensor, act_general: torch.Tensor) -> torch.Tensor:
    """Per neuron j: (a_concept_j - a_general_j) * ||W[:, j]||_2, W the FFN output Linear's weight.

    a * ||W[:, j]|| is the size of neuron j's contribution to the block's output (a per-neuron
    Wanda score, |W_ij| ||X_j|| pooled over i); the score is the concept's minus the general
    prompts', so it is high for a neuron the concept uses and the general prompts do not."""
    col = weight.detach().double().norm(dim=0).cpu()
    return (act_concept.double().cpu() - act_general.double().cpu()) * col


def pruned_count(fraction: float, neurons: int) -> int:
    """How many of a layer's `neurons` a pruning `fraction` removes: round(fraction * n), at
    least 1 when fraction > 0."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    if fraction == 0.0:
        return 0
    return min(neurons, max(1, int(round(fraction * neurons))))


@torch.no_grad()
def concept_neuron_scores(unet, tokenizer, text_encoder, concept_prompts: Sequence[str],
                          general_prompts: Sequence[str], *, scheduler=None, timesteps: Any = 4, seed: int = 0,
                          samples: int = 2, layers: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """{`<ff>.net.2.weight`: contrast score per hidden neuron} (see `neuron_scores`), from the mean
    |activation| on the concept's prompts and on the general prompts (`ffn_activations`, same noise).
    `timesteps`: a count (spaced by `probe_timesteps` over the scheduler's training range) or
    the training timesteps themselves."""
    concept_prompts, general_prompts = list(concept_prompts), list(general_prompts)
    if not concept_prompts:
        raise ValueError("no concept prompts to find the concept's neurons with")
    if not general_prompts:
        raise ValueError("no general prompts to contrast the concept's prompts with")
    n_train = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000)
    ts = probe_timesteps(int(timesteps), n_train) if isinstance(timesteps, int) else [int(t) for t in timesteps]
    if not ts:
        raise ValueError("no timesteps to probe")
    layers = list(layers or ffn_output_layers(unet))
    acts = []
    for prompts in (concept_prompts, general_prompts):
        embeds = encode_prompts(tokenizer, text_encoder, prompts)
        acts.append(ffn_activations(unet, embeds, layers, timesteps=ts, seed=seed, samples=samples))
    module = as_denoiser(unet).module
    return {f"{name}.weight": neuron_scores(module.get_submodule(name).weight, acts[0][name], acts[1][name])
            for name in layers}


@torch.no_grad()
def prune_concept_neurons(unet, tokenizer, text_encoder, concept_prompts: Sequence[str],
                          general_prompts: Sequence[str], *, fraction: float = 0.02, scheduler=None,
                          timesteps: Any = 4, seed: int = 0, samples: int = 2,
                          site: str = "feed_forward") -> dict[str, torch.Tensor]:
    """Erase a concept by pruning the UNet neurons its prompts use and general prompts do not.

    After Chavhan et al., "Memorized Images in Diffusion Models share a Subspace that can be
    Located and Deleted" (code github.com/ruchikachavhan/editing-memorization, not read here).
    What the paper is known to say (its abstract): contrast the
    activations of the UNet's feed-forward neurons between memorised and non-memorised prompts;
    many memorised prompts activate one common small subspace; prune the weights in it, chosen by
    an activation-weighted magnitude score that is high for the memorised prompts and low for
    general ones; no training, no change to inference. Its scoring details here are approximate.

    Ours (a reading, not the paper's exact recipe):
    - "memorised prompts" are the concept's prompts; "non-memorised" are `general_prompts`;
    - neurons are the FFN hidden units (the input of `ff.net.2`, i.e. GEGLU's output), and
      activations are mean |h| over prompts, `samples` fixed-seed unit-noise inputs (shape from
      unet.config), the probed `timesteps` and all spatial positions, conditional branch only.
      Both prompt sets see the same noise, so the contrast comes from the text alone;
    - score_j = (a_concept_j - a_general_j) * ||W_out[:, j]||_2: the difference of two per-neuron
      Wanda scores (activation x weight magnitude);
    - per layer, the top round(fraction * n_neurons) neurons with a positive score are pruned
      (a neuron the general prompts use more is never the concept's). Per layer, not global:
      activation and weight scales differ between blocks, so a global ranking would spend the whole
      budget on a few layers and break them; per layer the damage is spread and predictable;
    - pruning a neuron zeroes its column of ff.net.2.weight (structured: the whole neuron, where
      the paper prunes individual weights); the bias is kept;
    - `site` "cross_attention_values" (not the paper's) prunes the input channels of the text
      cross-attention's output projection instead (`cross_attention_output_layers`), scored the
      same way: the value channels the concept's prompts fill more than the general prompts'.
    Returns {parameter name: delta} (delta = -W on pruned columns, 0 elsewhere) for
    WeightDeltaPatch("unet", ...); at strength 1 the columns are exactly zero. Run it with the
    model's and CLIP's patches applied, so the delta is relative to the chain's weights. `unet`
    is not modified. `unet`: a denoiser module or a kernels.denoiser.Denoiser (any family; an SDXL
    UNet's time ids need its MODEL's VAE factor, so pass `Denoiser.of(model)`).
    """
    k_frac = float(fraction)
    pruned_count(k_frac, 1)  # validates the fraction
    layers = prune_layers(unet, site)
    scores = concept_neuron_scores(unet, tokenizer, text_encoder, concept_prompts, general_prompts,
                                   scheduler=scheduler, timesteps=timesteps, seed=seed, samples=samples,
                                   layers=layers)
    out = {}
    for name, score in scores.items():
        k = pruned_count(k_frac, score.numel())
        if k == 0:
            continue
        top = torch.topk(score, k).indices
        top = top[score[top] > 0]
        if not top.numel():
            continue
        w = as_denoiser(unet).module.get_parameter(name).detach().float().cpu()
        delta = torch.zeros_like(w)
        delta[:, top] = -w[:, top]
        out[name] = delta
    return out
