"""Why ShapesT2I does or does not follow position words: a few cheap probes, one JSON object out.

    python bench/positions.py [--model DIR] [--probes cells,sensitivity,x0,attention,where,text,mean_x0,xt,binding] [--n 48]

- "cells": the held-out one-object prompts (first --n), sampled as bench/shapes.py samples them
  (20 dpmpp_2m steps, cfg 4, each prompt's own seed), scored by the oracle: colour+shape and cell.
- "sensitivity": one object ("a red circle"), --seeds noise seeds x the 9 position phrases: the
  cell hit rate, and how often a seed lands in the same cell whatever the phrase says (1.0 means
  the noise, not the text, picks the place; 1/9-ish is what a text-driven layout gives).
- "x0": the model's clean-image estimate at high noise (x_t = pure noise at t=999, and a
  training image of ANOTHER cell noised to t): the share of its "object" (chroma) mass in the
  named cell, and how often that cell holds the most. This is where the layout is decided.
- "attention": cross-attention of the position words ("left", "top", ...) over the pixels, per
  layer resolution: the share of their attention that falls in the named cell (1/9 = uniform).
- "where": a linear probe of a pixel's grid cell from the UNet's own features where its
  cross-attention reads them (can a pixel tell where it is, so a position word can reach it?).
- "mean_x0": x0_hat at t=999 averaged over seeds, RGB per column third, for captions that differ
  only in position, colour or nothing (empty): what the very first sampling step draws.
- "xt": no model output: from which noise level on the cell can be read off x_t itself (a
  matched filter), and the share of the training loss weight the steps above each t get.
- "text": a linear probe of the cell from frozen text embeddings, per token role (the shape
  word, which a causal CLIP encoder shows only the words before it; the end token), and how far
  apart whole caption embeddings are when only the position, colour or background word differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_MODEL = ROOT / "resources" / "models" / "shapes-t2i"


def cell_masks(size: int) -> torch.Tensor:
    """(9, size*size) 0/1 masks of the 3x3 grid's cells on a size x size pixel grid."""
    from kernels.shapes.world import cell_of_point

    centres = (np.arange(size) + 0.5) / size
    cells = np.array([[cell_of_point(x, y) for x in centres] for y in centres]).reshape(-1)
    return torch.from_numpy(np.stack([cells == c for c in range(9)]).astype(np.float32))


def one_object_prompts(n: int) -> list[dict]:
    from kernels.shapes.train import load_heldout

    return [p for p in load_heldout() if len(p["objects"]) == 1][:n]


def probe_cells(comps, n: int) -> dict:
    """Held-out one-object prompts: oracle colour+shape and cell rates (bench/shapes.py's metric)."""
    from kernels.shapes.oracle import score_prompt
    from kernels.shapes.train import generate_images

    tok, te, unet, cfg = comps
    prompts = one_object_prompts(n)
    images = generate_images(unet, te, tok, cfg, prompts)
    scores = [score_prompt(p["objects"], im) for p, im in zip(prompts, images)]
    return {"n": len(prompts), "colour_shape": round(float(np.mean([s["colour_shape"] for s in scores])), 4),
            "cell": round(float(np.mean([s["cell"] for s in scores])), 4)}


def probe_sensitivity(comps, seeds: int) -> dict:
    """The same noise seeds under each of the 9 position phrases: where does the object land?"""
    from kernels.shapes.oracle import detect
    from kernels.shapes.train import generate_images
    from kernels.shapes.world import CELL_PHRASES

    tok, te, unet, cfg = comps
    prompts = [{"caption": f"a red circle {ph}", "seed": 1000 + s, "cell": c}
               for c, ph in enumerate(CELL_PHRASES) for s in range(seeds)]
    images = generate_images(unet, te, tok, cfg, prompts)
    found = []
    for im in images:
        dets = [d for d in detect(im) if d.colour == "red"]
        found.append(max(dets, key=lambda d: d.area).cell if dets else -1)
    found = np.array(found).reshape(9, seeds)
    hits = float(np.mean(found == np.arange(9)[:, None]))
    same = []
    for s in range(seeds):  # share of phrases that land in this seed's most common cell
        col = found[:, s][found[:, s] >= 0]
        same.append(np.bincount(col).max() / 9 if len(col) else 0.0)
    return {"images": int(found.size), "cell_hit": round(hits, 4), "drawn": round(float(np.mean(found >= 0)), 4),
            "same_cell_whatever_phrase": round(float(np.mean(same)), 4)}


def _chroma_mass(x0: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, 9) share of an image batch's chroma (max-min over channels) in each cell."""
    chroma = (x0.amax(1) - x0.amin(1)).clamp(min=0).flatten(1)
    mass = chroma @ masks.T
    return mass / mass.sum(1, keepdim=True).clamp(min=1e-8)


@torch.no_grad()
def probe_x0(comps, per_cell: int, ts=(999, 950, 900, 800, 600)) -> dict:
    """The clean-image estimate x0_hat for one-object captions, from pure noise (t=999) and from a
    rendering of the same object in a different cell noised to t (the text must move it)."""
    from kernels.shapes.world import caption_for, downsample, render_array, sample_scene

    tok, te, unet, cfg = comps
    sched = _scheduler(cfg)
    alphas = sched.alphas_cumprod.float()
    rng = np.random.default_rng(7)
    caps, cells, others = [], [], []
    for c in range(9):
        for _ in range(per_cell):
            scene = sample_scene(rng, 1, cells=[c])
            caps.append(caption_for(scene, True, False))
            cells.append(c)
            wrong = sample_scene(rng, 1, colours=[scene.objects[0].colour], shapes=[scene.objects[0].shape],
                                 cells=[int((c + rng.integers(1, 9)) % 9)], background=scene.background)
            others.append(downsample(render_array(wrong, 64), 32))
    hidden = _encode(tok, te, caps)
    x_other = torch.from_numpy(np.stack(others)).permute(0, 3, 1, 2).float() / 127.5 - 1
    masks, cells = cell_masks(32), torch.tensor(cells)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in ts:
        a = alphas[t]
        noise = torch.randn(x_other.shape, generator=gen)
        xt = a.sqrt() * x_other + (1 - a).sqrt() * noise
        v = unet(xt, torch.full((len(caps),), t), encoder_hidden_states=hidden).sample
        x0 = a.sqrt() * xt - (1 - a).sqrt() * v
        share = _chroma_mass(x0, masks)
        out[str(t)] = {"snr": round(float(a / (1 - a)), 4),
                       "named_cell_share": round(float(share[torch.arange(len(caps)), cells].mean()), 4),
                       "named_cell_argmax": round(float((share.argmax(1) == cells).float().mean()), 4)}
    return out


def probe_xt(comps, images: int = 180, ts=(999, 950, 900, 850, 800, 700, 500)) -> dict:
    """From which noise level on is an object's cell readable from x_t itself? A matched filter
    (per-cell mean of |x_t - its mean|, summed over channels; argmax) on one-object renderings.
    Below that t the caption's position words tell the denoiser nothing x_t does not, so only the
    steps above it can teach them; with them the loss-weight share those steps get."""
    from kernels.shapes.train import loss_weights
    from kernels.shapes.world import downsample, render_array, sample_scene

    sched = _scheduler(comps[3])
    alphas = sched.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    rng = np.random.default_rng(11)
    scenes = [sample_scene(rng, 1) for _ in range(images)]
    x0 = torch.from_numpy(np.stack([downsample(render_array(sc, 64), 32) for sc in scenes]))
    x0 = x0.permute(0, 3, 1, 2).float() / 127.5 - 1
    cells = torch.tensor([sc.objects[0].cell for sc in scenes])
    masks = cell_masks(32)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in ts:
        a = alphas[t]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
        dev = (xt - xt.mean((2, 3), keepdim=True)).abs().sum(1).flatten(1) @ masks.T
        out[str(t)] = {"cell_from_xt": round(float((dev.argmax(1) == cells).float().mean()), 4),
                       "min_snr5_weight_share_above": round(float(loss_weights(snr)[t:].sum() / loss_weights(snr).sum()), 4),
                       "floor1_weight_share_above": round(float(loss_weights(snr, 1.0)[t:].sum()
                                                                / loss_weights(snr, 1.0).sum()), 4)}
    return out


def _scheduler(cfg: dict):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(cfg)


def _encode(tok, te, captions):
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return te(ids).last_hidden_state


class RecordCrossAttention:
    """A standard AttnProcessor that also keeps the cross-attention probabilities it computes."""

    def __init__(self, store: list):
        from diffusers.models.attention_processor import AttnProcessor

        self.inner, self.store = AttnProcessor(), store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is not None:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, k, None)  # (B*heads, HW, L)
            b = hidden_states.shape[0]
            self.store.append(probs.view(b, attn.heads, *probs.shape[1:]).mean(1))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@torch.no_grad()
def probe_attention(comps, per_cell: int, ts=(999, 600)) -> dict:
    """Share of each position word's cross-attention inside its named cell, per resolution."""
    from kernels.shapes.world import CELL_PHRASES

    tok, te, unet, cfg = comps
    words = {"left", "right", "top", "bottom", "center"}
    caps, cells = [], []
    for c, ph in enumerate(CELL_PHRASES):
        caps += [f"a red circle {ph}"] * per_cell
        cells += [c] * per_cell
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = te(ids).last_hidden_state
    is_pos = torch.tensor([[w in words for w in tok.convert_ids_to_tokens(row)] for row in ids.tolist()])
    store: list = []
    old = unet.attn_processors
    unet.set_attn_processor(RecordCrossAttention(store))
    out = {}
    try:
        for t in ts:
            store.clear()
            x = torch.randn((len(caps), 3, 32, 32), generator=torch.Generator().manual_seed(t))
            unet(x, torch.full((len(caps),), t), encoder_hidden_states=hidden)
            by_res: dict = {}
            for probs in store:
                side = int(round(probs.shape[1] ** 0.5))
                masks = cell_masks(side)
                att = (probs * is_pos[:, None, :]).sum(-1)  # (B, HW): attention on position words
                share = (att @ masks.T) / att.sum(1, keepdim=True).clamp(min=1e-8)
                named = share[torch.arange(len(caps)), torch.tensor(cells)]
                by_res.setdefault(f"{side}x{side}_named_cell_share", []).append(float(named.mean()))
                by_res.setdefault(f"{side}x{side}_position_word_weight", []).append(float(att.mean()))
            out[str(t)] = {k: round(float(np.mean(v)), 4) for k, v in sorted(by_res.items())}
    finally:
        unet.set_attn_processor(old)
    return out


class RecordQueries:
    """A standard AttnProcessor that keeps the pixel features its cross-attention queries from."""

    def __init__(self, store: list):
        from diffusers.models.attention_processor import AttnProcessor

        self.inner, self.store = AttnProcessor(), store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is not None:
            self.store.append(hidden_states.detach())  # (B, HW, C)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@torch.no_grad()
def probe_where(comps, images: int = 24, t: int = 999) -> dict:
    """Does a pixel know where it is? A linear probe of each pixel's cell from the features the
    cross-attention queries are made of (noise in, empty prompt), half the images to fit, half
    to score; 1/9 means the UNet has no sense of place there."""
    tok, te, unet, _ = comps
    store: list = []
    old = unet.attn_processors
    unet.set_attn_processor(RecordQueries(store))
    try:
        x = torch.randn((images, 3, 32, 32), generator=torch.Generator().manual_seed(1))
        unet(x, torch.full((images,), t), encoder_hidden_states=_encode(tok, te, [""] * images))
    finally:
        unet.set_attn_processor(old)
    out = {}
    for i, feats in enumerate(store):
        side = int(round(feats.shape[1] ** 0.5))
        y = cell_masks(side).argmax(0).repeat(images)
        xf = torch.cat([feats.reshape(-1, feats.shape[-1]), torch.ones(len(y), 1)], 1)
        half = len(y) // 2
        w = torch.linalg.lstsq(xf[:half], torch.nn.functional.one_hot(y[:half], 9).float()).solution
        out[f"layer{i}_{side}x{side}"] = round(float(((xf[half:] @ w).argmax(1) == y[half:]).float().mean()), 4)
    return out


@torch.no_grad()
def probe_text(comps, per_cell: int = 60) -> dict:
    """Linear probe (least squares, one-hot targets) of the cell from frozen text embeddings,
    trained on half the captions and scored on the other half."""
    from kernels.shapes.world import caption_for, sample_scene

    tok, te, _, _ = comps
    rng = np.random.default_rng(3)
    caps, cells = [], []
    for c in range(9):
        for _ in range(per_cell):
            caps.append(caption_for(sample_scene(rng, 1, cells=[c]), True, bool(rng.random() < 0.5)))
            cells.append(c)
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = te(ids).last_hidden_state
    eos = (ids == tok.eos_token_id).int().argmax(1)
    roles = {"shape_word": hidden[:, 3], "end_token": hidden[torch.arange(len(caps)), eos],
             "mean_pool": hidden.mean(1)}
    y, order = torch.tensor(cells), torch.from_numpy(rng.permutation(len(caps)))
    out = {role: _lstsq_accuracy(feats, y, 9, order) for role, feats in roles.items()}
    pairs = {"left_vs_right": ("a red circle on the left", "a red circle on the right"),
             "red_vs_blue": ("a red circle on the left", "a blue circle on the left"),
             "white_vs_black": ("a red circle, white background", "a red circle, black background")}
    h = {k: _encode(tok, te, list(v)) for k, v in pairs.items()}  # how far apart the whole sequences are
    out["relative_difference"] = {k: round(float((v[0] - v[1]).norm() / v[0].norm()), 4) for k, v in h.items()}
    return out


def _lstsq_accuracy(feats: torch.Tensor, y: torch.Tensor, classes: int, order: torch.Tensor) -> float:
    """Least-squares one-hot probe trained on the first half of the rows in `order` (a
    permutation), scored on the other half."""
    train, test = order[: len(y) // 2], order[len(y) // 2:]
    xf = torch.cat([feats, torch.ones(len(y), 1)], 1)
    w = torch.linalg.lstsq(xf[train], torch.nn.functional.one_hot(y[train], classes).float()).solution
    return round(float(((xf[test] @ w).argmax(1) == y[test]).float().mean()), 4)


@torch.no_grad()
def probe_binding(comps, captions: int = 1200) -> dict:
    """Is each object's binding in the text embeddings? In two-object captions ("a red circle on
    the left and a blue square at the top"), linear probes read from each object's shape token
    and from the last word of its phrase: its own colour, its own cell, and the other object's
    colour (chance 1/7, 1/9, 1/7). High own-colour and own-cell figures at the phrase end mean a
    UNet can place and colour both objects with one cross-attention hop."""
    from kernels.shapes.world import COLOURS, caption_for, sample_scene

    tok, te, _, _ = comps
    rng = np.random.default_rng(4)
    colours = sorted(COLOURS)
    scenes = [sample_scene(rng, 2) for _ in range(captions)]
    caps = [caption_for(s, True, False) for s in scenes]
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = te(ids).last_hidden_state
    rows = {"shape_word": [], "phrase_end": []}
    own_colour, own_cell, other_colour = [], [], []
    for i, scene in enumerate(scenes):
        words = tok.convert_ids_to_tokens(ids[i])
        shapes = [j for j, w in enumerate(words) if w in {o.shape for o in scene.objects}][:2]
        ends = [words.index("and") - 1, words.index(tok.eos_token) - 1]
        if len(shapes) != 2:
            continue
        for k, obj in enumerate(scene.objects):
            rows["shape_word"].append(hidden[i, shapes[k]]), rows["phrase_end"].append(hidden[i, ends[k]])
            own_colour.append(colours.index(obj.colour)), own_cell.append(obj.cell)
            other_colour.append(colours.index(scene.objects[1 - k].colour))
    targets = {"own_colour": (own_colour, len(colours)), "own_cell": (own_cell, 9),
               "other_colour": (other_colour, len(colours))}
    return {role: {name: _lstsq_accuracy(torch.stack(feats), torch.tensor(y), n, torch.from_numpy(rng.permutation(len(y))))
                   for name, (y, n) in targets.items()}
            for role, feats in rows.items()}


@torch.no_grad()
def probe_mean_x0(comps, seeds: int = 8) -> dict:
    """x0_hat at t=999 (pure noise in), averaged over seeds, per third of the image: left, middle,
    right columns. Does the output move with the position word, or only with colour/background?"""
    tok, te, unet, cfg = comps
    a = _scheduler(cfg).alphas_cumprod.float()[999]
    noise = torch.randn((seeds, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for text in ("a red circle on the left, white background", "a red circle on the right, white background",
                 "a red circle at the top, white background", "a blue circle on the left, white background", ""):
        v = unet(noise, torch.full((seeds,), 999), encoder_hidden_states=_encode(tok, te, [text] * seeds)).sample
        x0 = (a.sqrt() * noise - (1 - a).sqrt() * v).mean(0)
        out[text or "<empty>"] = [[round(float(c), 3) for c in x0[:, :, i * 11:(i + 1) * 11].mean((1, 2))]
                                  for i in range(3)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--probes", default="cells,sensitivity,x0,attention,where,text,mean_x0")
    ap.add_argument("--n", type=int, default=48, help="held-out one-object prompts for 'cells'")
    ap.add_argument("--seeds", type=int, default=8, help="noise seeds per phrase for 'sensitivity'")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from bench.shapes import load_components

    comps = load_components(args.model)
    comps[1].eval(), comps[2].eval()
    probes = {"cells": lambda: probe_cells(comps, args.n), "sensitivity": lambda: probe_sensitivity(comps, args.seeds),
              "x0": lambda: probe_x0(comps, 8), "attention": lambda: probe_attention(comps, 4), "where": lambda: probe_where(comps),
              "text": lambda: probe_text(comps), "mean_x0": lambda: probe_mean_x0(comps), "xt": lambda: probe_xt(comps),
              "binding": lambda: probe_binding(comps)}
    result = {"model": args.model}
    for name in args.probes.split(","):
        result[name] = probes[name]()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
