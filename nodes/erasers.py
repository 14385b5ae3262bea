"""Concept-eraser nodes: each returns a new MODEL/CLIP that records an eraser patch.

The input model is never changed: the patch is applied only while a Sampler (MODEL patches) or
TextEncode (CLIP patches) runs. Erasers chain: a second eraser is computed on the first one's
output, and both are applied in order. The math lives in kernels/erasers/; every family
(SD 1.x/2.x, SDXL, SD3, FLUX.1) is called through kernels.denoiser.
"""

from __future__ import annotations

import logging

from kernels.files import path_fingerprint

from .base import (
    CLIP,
    CONDITIONING,
    LATENT,
    MODEL,
    Choice,
    Float,
    Int,
    Node,
    NodeError,
    Path,
    Seed,
    String,
    file_name_problem,
)
from .registry import register

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = "{}\nA photo of {}\nAn image of {}\nA picture of {}"


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _templates(text: str) -> list[str]:
    out = _lines(text) or ["{}"]
    return [t if "{}" in t else t + " {}" for t in out]


def _need(concept: str) -> str:
    concept = (concept or "").strip()
    if not concept:
        raise NodeError("name the concept to erase")
    return concept


def _strength():
    return Float(1.0, -2.0, 4.0, step=0.1, help="how much of the eraser to apply; 0 = none (bit-identical)")


# UCE's own lam and an even preserve weight; with the automatic templates and preserve set they
# keep every other concept of the built-in model on the bench's held-out captions
# (bench/results/erasers.json).
CLOSED_FORM_LAM = 0.5
CLOSED_FORM_PRESERVE_WEIGHT = 1.0


def _closed_form_v1_to_v2(params: dict) -> dict:
    """Version 1 had no automatic preserve set, a fixed preserve weight of 1 and lam 0.01: a
    file saved then keeps exactly what it did."""
    return {"lam": 0.01, **params, "auto_preserve": "off", "preserve_weight": 1.0}


def _closed_form_v2_to_v3(params: dict) -> dict:
    """Version 2 always used the photo templates (its default) and, with auto_preserve on, the
    plain world prompts: a file saved then keeps them."""
    out = {"templates": DEFAULT_TEMPLATES, **params}
    if out.get("auto_preserve", "vocabulary") == "vocabulary":
        out["auto_preserve"] = "plain vocabulary"
    return out


def _shown(prompts: list, first: int = 4) -> str:
    return ", ".join(repr(p) for p in prompts[:first]) + (", ..." if len(prompts) > first else "") or "none"


def _preserve_summary(temps: list, keep: list) -> str:
    return f"{len(temps)} edit templates; preserved {len(keep)} prompts ({_shown(keep)})"


@register
class ClosedFormErase(Node):
    """Erase a concept in seconds with a closed-form weight edit: the concept's keys are mapped to
    the anchor's, everything orthogonal to them is left exactly as it was. "text_encoder" edits
    the first self-attention output projection of each CLIP text encoder (Diff-QuickFix; T5 is
    left as it is); "cross_attention" edits the layers the text embeddings enter (UCE/TIME): a
    UNet's cross-attention key/value projections, SD3's and FLUX's context embedder.
    Empty templates: the model's own phrasing (the built-in ShapesT2I: its caption grammar with
    a few position and background phrases; other models: "A photo of {}" and the like). By
    default the edit also holds a preserve set from the model's vocabulary (ShapesT2I: every
    other colour and shape, phrased as the world writes them; other models: resources/erasers/
    common_concepts.txt), minus prompts naming the concept; without one a small lam takes
    related concepts down too. What it used is logged and kept in the eraser's record
    ("summary"). Held out on the built-in model (bench/erasers.py, 24 captions x 2 seeds) these
    defaults erase "red", "circle" (both targets) and "red circle" (cross_attention) 1.00 -> 0.00
    with every other concept at 1.00. text_encoder cannot erase a pair alone: at its first layer
    a pair's keys are about the sum of its halves' ("red square" + "blue circle" - "blue square"),
    so holding those keeps the pair, and not holding them took other circles to 0.00; erase a
    pair with cross_attention."""

    category = "erasers"
    version = 3
    inputs = {"model": MODEL, "clip": CLIP}
    params = {
        "concept": String("", help="the concept to erase, e.g. circle"),
        "anchor": String("", help="what it should become instead (empty: nothing in particular)"),
        "target": Choice(("text_encoder", "cross_attention", "both"), "text_encoder",
                         help="which weights to edit"),
        "templates": String("", multiline=True,
                            help="prompts the concept appears in, one per line, {} = the concept; empty: "
                                 "the model's own phrasing (ShapesT2I: its captions; others: 'A photo of {}'...)"),
        "auto_preserve": Choice(("vocabulary", "plain vocabulary", "off"), "vocabulary",
                                help="vocabulary: also keep the model's other concepts (ShapesT2I: its colours "
                                     "and shapes, phrased as its captions; others: the shipped common-concepts "
                                     "list); plain vocabulary: ShapesT2I's without phrases (version 2)"),
        "preserve": String("", multiline=True,
                           help="more prompts whose outputs must not change, one per line"),
        "positions": Choice(("last", "to_end"), "to_end",
                            help="cross-attention: edit the concept's last token only, or it and every later token"),
        "lam": Float(CLOSED_FORM_LAM, 0.0, 100.0, step=0.01, help="regularisation towards the old weights"),
        "preserve_weight": Float(CLOSED_FORM_PRESERVE_WEIGHT, 0.0, 100.0, step=0.1,
                                 help="weight of the preserved prompts against the erased ones"),
        "strength": _strength(),
    }
    outputs = {"model": MODEL, "clip": CLIP}
    migrations = {1: _closed_form_v1_to_v2, 2: _closed_form_v2_to_v3}

    def run(self, ctx, model, clip, concept, anchor, target, templates, auto_preserve, preserve, positions, lam,
            preserve_weight, strength):
        from kernels.erasers import WeightDeltaPatch, default_preserve, default_templates, quickfix_edit, uce_edit
        from kernels.patching import applied_patches

        concept = _need(concept)
        temps = _templates(templates) if _lines(templates) else default_templates(clip.tokenizer, concept, anchor)
        keep = _lines(preserve)
        if auto_preserve != "off":
            try:
                keep = default_preserve(clip.tokenizer, concept, anchor, extra=keep,
                                        phrased=auto_preserve == "vocabulary")
            except ValueError as exc:
                raise NodeError(f"ClosedFormErase: {exc}") from None
        summary = _preserve_summary(temps, keep)
        log.info("ClosedFormErase %r -> %r: %s", concept, anchor, summary)
        ctx.summary(f"{summary}{' (auto)' if auto_preserve != 'off' else ''}; lam {lam:g}, "
                    f"preserve weight {preserve_weight:g}")
        meta = {"method": "closed-form", "concept": concept, "anchor": anchor, "lam": lam,
                "preserve_weight": preserve_weight, "templates": len(temps), "preserved": len(keep),
                "summary": summary}
        out_model, out_clip = model, clip
        with applied_patches(clip.patches, clip.text_encoder):
            if target in ("cross_attention", "both"):
                with applied_patches(model.patches, model.unet):
                    deltas = uce_edit(model.unet, clip.tokenizer, clip.text_encoder, concept, anchor,
                                      templates=temps, preserve=keep, lam=lam, positions=positions,
                                      preserve_scale=preserve_weight)
                out_model = model.with_patch(WeightDeltaPatch("unet", deltas, strength,
                                                              {**meta, "edit": "uce", "positions": positions}))
            if target in ("text_encoder", "both"):
                deltas = quickfix_edit(clip.tokenizer, clip.text_encoder, concept, anchor,
                                       templates=temps, preserve=keep, lam=lam, preserve_scale=preserve_weight)
                out_clip = clip.with_patch(WeightDeltaPatch("text_encoder", deltas, strength,
                                                            {**meta, "edit": "quickfix"}))
        return {"model": out_model, "clip": out_clip}


DEFAULT_GENERAL = ("a photo\nan image\na red square\na blue triangle\na green star\na yellow circle\n"
                   "a purple square on the left\nan orange star at the top right\na cat\na dog\n"
                   "a landscape\na portrait of a person\na city street\na bowl of fruit")


def _names_concept(prompt: str, concept: str) -> bool:
    """Whether `prompt` contains every word of `concept` (then it is not a general prompt)."""
    from kernels.text import words_of

    need = set(words_of(concept))
    return bool(need) and need <= set(words_of(prompt))


@register
class PruneConcept(Node):
    """Erase a concept without training by pruning the UNet feed-forward neurons its prompts use and
    general prompts do not (after "Memorized Images in Diffusion Models share a Subspace that can
    be Located and Deleted"). Each neuron is scored by how much more the concept's prompts activate
    it than the general prompts, times the size of its output weights; the top `fraction` of each
    layer's neurons are switched off. General prompts that name the concept are left out."""

    category = "erasers"
    inputs = {"model": MODEL, "clip": CLIP}
    params = {
        "concept": String("", help="the concept to erase, e.g. circle"),
        "templates": String(DEFAULT_TEMPLATES, multiline=True,
                            help="prompts the concept appears in, one per line, {} = the concept"),
        "general": String(DEFAULT_GENERAL, multiline=True,
                          help="prompts about other things, one per line: neurons they use are spared"),
        "fraction": Float(0.02, 0.0, 0.5, step=0.005,
                          help="share of each feed-forward layer's neurons to prune (0 = none)"),
        "timesteps": Int(4, 1, 50, help="noise levels at which activations are measured"),
        "samples": Int(2, 1, 16, help="fixed-seed noise images per prompt and noise level"),
        "seed": Seed(),
        "strength": _strength(),
    }
    outputs = {"model": MODEL}

    def run(self, ctx, model, clip, concept, templates, general, fraction, timesteps, samples, seed, strength):
        from kernels.denoiser import Denoiser
        from kernels.erasers import WeightDeltaPatch, model_scheduler, prune_concept_neurons
        from kernels.patching import applied_patches

        concept = _need(concept)
        prompts = [t.replace("{}", concept) for t in _templates(templates)]
        given = _lines(general)
        keep = [p for p in given if not _names_concept(p, concept)]
        if not keep:
            raise NodeError(f"PruneConcept needs general prompts that do not name {concept!r} "
                            f"(the 'general' list is {'empty' if not given else 'all about the concept'})")
        with applied_patches(clip.patches, clip.text_encoder), applied_patches(model.patches, model.unet):
            try:
                deltas = prune_concept_neurons(Denoiser.of(model), clip.tokenizer, clip.text_encoder, prompts, keep,
                                               fraction=fraction, scheduler=model_scheduler(model),
                                               timesteps=timesteps, seed=seed, samples=samples)
            except ValueError as exc:
                raise NodeError(f"PruneConcept: {exc}") from None
        meta = {"method": "prune", "concept": concept, "fraction": fraction, "timesteps": timesteps,
                "samples": samples, "seed": seed, "general": len(keep),
                "pruned": sum(int((d.abs().sum(dim=0) > 0).sum()) for d in deltas.values())}
        ctx.summary(f"pruned {meta['pruned']} neurons (fraction {fraction:g}); preserved {len(keep)} general "
                    f"prompts ({_shown(keep)})")
        return {"model": model.with_patch(WeightDeltaPatch("unet", deltas, strength, meta))}


def _encode(clip, prompts):
    """The denoiser's text for each prompt (kernels.denoiser.DenoiserText), with the CLIP's patches;
    [""]: the unconditional text the family guides with."""
    from kernels.denoiser import encode_prompts, encode_unconditional
    from kernels.patching import applied_patches

    with applied_patches(clip.patches, clip.text_encoder):
        if list(prompts) == [""]:
            return encode_unconditional(clip.tokenizer, clip.text_encoder)
        return encode_prompts(clip.tokenizer, clip.text_encoder, prompts)


@register
class ConceptMembrane(Node):
    """SPM: a rank-1 "membrane" adapter trained on the CPU to erase one concept. At sampling time
    its strength follows the prompt (facilitated transport): 1 when the prompt names the concept,
    about the prompt-concept embedding similarity otherwise. Anchor prompts are held unchanged
    while training (latent anchoring)."""

    category = "erasers"
    inputs = {"model": MODEL, "clip": CLIP}
    params = {
        "concept": String("", help="the concept to erase"),
        "templates": String("{}", multiline=True, help="training prompts, one per line, {} = the concept"),
        "anchors": String("", multiline=True, help="prompts to keep as they are, one per line"),
        "steps": Int(200, 1, 20000, help="training steps"),
        "rank": Int(1, 1, 64, help="adapter rank (SPM: 1)"),
        "lr": Float(1e-3, 1e-6, 1.0, step=1e-4, help="learning rate"),
        "eta": Float(1.0, 0.0, 10.0, help="negative-guidance scale of the erasing target"),
        "anchor_weight": Float(1.0, 0.0, 100.0, help="weight of the latent-anchoring loss"),
        "seed": Seed(),
        "strength": _strength(),
    }
    outputs = {"model": MODEL}

    def run(self, ctx, model, clip, concept, templates, anchors, steps, rank, lr, eta, anchor_weight, seed,
            strength):
        from kernels.denoiser import Denoiser
        from kernels.erasers import MembranePatch, model_scheduler, train_erasure_lora
        from kernels.patching import applied_patches
        from kernels.text import words_of

        concept = _need(concept)
        prompts = [t.replace("{}", concept) for t in _templates(templates)]
        target = _encode(clip, prompts)
        empty = _encode(clip, [""])
        anchor_prompts = _lines(anchors)
        anchor = _encode(clip, anchor_prompts) if anchor_prompts else None
        concept_embeds = _encode(clip, [concept]).embeds
        with applied_patches(model.patches, model.unet):
            loras, scale, _ = train_erasure_lora(
                Denoiser.of(model), model_scheduler(model), target, empty, objective="spm", anchor_embeds=anchor,
                scope="transformer", rank=rank, steps=steps, lr=lr, eta=eta, anchor_weight=anchor_weight,
                seed=seed, progress=lambda i, n: ctx.progress(i, n, sampler_step=False))
        meta = {"method": "spm", "concept": concept, "steps": steps, "seed": seed}
        ctx.summary(f"{steps} steps; preserved {len(anchor_prompts)} anchor prompts ({_shown(anchor_prompts)}), "
                    f"anchor weight {anchor_weight:g}")
        return {"model": model.with_patch(MembranePatch(loras, scale, concept_embeds, words_of(concept),
                                                        strength, meta))}


@register
class EraseFinetune(Node):
    """Erase a concept by fine-tuning a LoRA for a few minutes. "esd": the concept's prediction is
    pushed along the negative guidance direction. "all_but_one": it is pulled towards a chosen
    alternative concept instead, while the unconditional prediction is held where it was.
    Without preserve prompts both are destructive on the built-in ShapesT2I model: ESD on the
    shape "circle" (300 steps, 24 prompts x 8 seeds, bench/erasers.py) left circles at 0.90 (from
    0.98) and took every colour to 0.00-0.04; All-but-One erased it but took every other colour
    and shape to 0.00-0.08. Holding the other prompts (preserve; there they were also the scored
    ones) kept All-but-One on "red" and "red circle" (others >= 0.90 of their baseline) but not
    on "circle" (purple 0.79), nor ESD on "circle" (colours 0.00-0.88)."""

    category = "erasers"
    inputs = {"model": MODEL, "clip": CLIP}
    params = {
        "objective": Choice(("esd", "all_but_one"), "esd", help="the erasing target"),
        "concept": String("", help="the concept to erase"),
        "alternative": String("", help="All-but-One: what the concept becomes"),
        "templates": String("{}", multiline=True, help="training prompts, one per line, {} = the concept"),
        "scope": Choice(("cross_attention", "attention", "transformer"), "cross_attention",
                        help="which layers the LoRA trains"),
        "rank": Int(4, 1, 128, help="LoRA rank"),
        "steps": Int(200, 1, 20000, help="training steps"),
        "lr": Float(1e-3, 1e-6, 1.0, step=1e-4, help="learning rate"),
        "eta": Float(1.0, 0.0, 10.0, help="guidance scale of the target"),
        "uncond_weight": Float(1.0, 0.0, 100.0, help="All-but-One: weight of the unconditional-preservation loss"),
        "preserve": String("", multiline=True,
                           help="prompts whose predictions are held (one per line); without them the LoRA "
                                "also unlearns words the training prompts share"),
        "seed": Seed(),
        "strength": _strength(),
    }
    outputs = {"model": MODEL}

    def run(self, ctx, model, clip, objective, concept, alternative, templates, scope, rank, steps, lr, eta,
            uncond_weight, preserve, seed, strength):
        from kernels.denoiser import Denoiser
        from kernels.erasers import LoraPatch, model_scheduler, train_erasure_lora
        from kernels.patching import applied_patches

        concept = _need(concept)
        temps = _templates(templates)
        target = _encode(clip, [t.replace("{}", concept) for t in temps])
        empty = _encode(clip, [""])
        alt = None
        if objective == "all_but_one":
            if not alternative.strip():
                raise NodeError("All-but-One needs an alternative concept")
            alt = _encode(clip, [t.replace("{}", alternative.strip()) for t in temps])
        keep = _lines(preserve)
        with applied_patches(model.patches, model.unet):
            loras, scale, _ = train_erasure_lora(
                Denoiser.of(model), model_scheduler(model), target, empty, objective=objective, alt_embeds=alt,
                anchor_embeds=_encode(clip, keep) if keep else None,
                scope=scope, rank=rank, steps=steps, lr=lr, eta=eta, uncond_weight=uncond_weight, seed=seed,
                progress=lambda i, n: ctx.progress(i, n, sampler_step=False))
        meta = {"method": objective, "concept": concept, "alternative": alternative, "steps": steps,
                "seed": seed, "scope": scope}
        ctx.summary(f"{objective}, {steps} steps; preserved {len(keep)} prompts ({_shown(keep)})")
        return {"model": model.with_patch(LoraPatch(loras, scale, strength, meta))}


@register
class SafeGuidance(Node):
    """Steer sampling away from a concept without changing any weights (negative guidance on the
    concept, as in safe latent diffusion): a baseline to compare the erasers with."""

    category = "erasers"
    inputs = {"model": MODEL, "clip": CLIP}
    params = {
        "concept": String("", help="the concept to steer away from"),
        "scale": Float(2.0, 0.0, 30.0, step=0.5, help="guidance away from the concept"),
        "warmup": Float(0.0, 0.0, 1.0, step=0.05, help="fraction of the noisiest steps left unguided"),
        "strength": _strength(),
    }
    outputs = {"model": MODEL}

    def run(self, ctx, model, clip, concept, scale, warmup, strength):
        from kernels.denoiser import Denoiser
        from kernels.erasers import SafeGuidancePatch

        concept = _need(concept)
        text = _encode(clip, [concept])
        # a family without a negative batch (FLUX) is steered against the empty prompt's prediction
        uncond = None if Denoiser.of(model).takes_negative else _encode(clip, [""])
        meta = {"method": "safe-guidance", "concept": concept}
        return {"model": model.with_patch(SafeGuidancePatch(
            text.embeds, scale, warmup, strength, meta, concept_pooled=text.pooled,
            uncond_embeds=None if uncond is None else uncond.embeds,
            uncond_pooled=None if uncond is None else uncond.pooled))}


@register
class RedTeamPrompt(Node):
    """Attack an erased model (Prompting4Debugging): search for a few tokens that make it draw the
    erased concept again, by matching its predictions to the original model's on the concept
    prompt. Outputs the found prompt and the erased model's samples for it (decode them). With a judge (the
    ShapesT2I oracle) the attack success rate is measured; `report` saves it as JSON."""

    category = "erasers"
    # It writes the report file: served from the cache it would not, and a deleted report would
    # stay missing. Downstream nodes stay cached when the attack finds the same prompt again.
    always_run = True
    inputs = {"model": MODEL, "clip": CLIP, "original_model": MODEL, "original_clip": CLIP}
    params = {
        "prompt": String("", help="the prompt whose concept was erased, e.g. a red circle"),
        "tokens": Int(4, 1, 32, help="free tokens to optimise"),
        "steps": Int(40, 1, 5000, help="optimisation steps"),
        "lr": Float(0.1, 1e-4, 10.0, step=0.01, help="learning rate of the soft prompt"),
        "cfg": Float(4.0, 1.0, 30.0, step=0.5, help="guidance scale used when matching and sampling"),
        "sample_steps": Int(12, 1, 200, help="sampling steps of the judged images"),
        "samples": Int(4, 1, 64, help="images sampled for the found prompt"),
        "avoid_words": String("", help="words the attack may not use (e.g. the concept itself)"),
        "judge": Choice(("none", "shapes-oracle"), "none", help="how success is judged"),
        "report": Path("", mode="save", filters="JSON (*.json)", help="optional JSON file for the result"),
        "seed": Seed(),
    }
    outputs = {"conditioning": CONDITIONING, "latent": LATENT}

    def run(self, ctx, model, clip, original_model, original_clip, prompt, tokens, steps, lr, cfg, sample_steps,
            samples, avoid_words, judge, report, seed):
        import json

        from kernels.erasers import Generator, red_team_prompt
        from kernels.files import atomic_write

        prompt = _need(prompt)
        judge_fn = None
        if judge == "shapes-oracle":
            from kernels.shapes.judge import concept_judge

            judge_fn = concept_judge(prompt)
            if judge_fn is None:
                raise NodeError("the ShapesT2I oracle cannot judge this prompt (it names no colour or shape)")
        erased = Generator(model, clip)
        try:
            result = red_team_prompt(erased, Generator(original_model, original_clip), prompt, n_tokens=tokens,
                                     steps=steps, lr=lr, cfg=cfg, sample_steps=sample_steps,
                                     eval_seeds=list(range(seed, seed + samples)), judge=judge_fn, seed=seed,
                                     banned_words=avoid_words.split(),
                                     progress=lambda i, n: ctx.progress(i, n, sampler_step=False))
        except ValueError as exc:
            raise NodeError(f"RedTeamPrompt: {exc}") from None
        if report:
            summary = {"target": prompt, "prompt": result.prompt, "loss": result.loss,
                       "attack_success_rate": result.success_rate, "seconds": result.seconds}
            atomic_write(ctx.output_file(report), json.dumps(summary, indent=2).encode("utf-8"), durable=False)
        return {"conditioning": erased.encode(result.prompt), "latent": result.images.float().cpu()}


@register
class SaveEraser(Node):
    """Save the erasers recorded on a MODEL and/or CLIP (in chain order) to a safetensors file, in
    your erasers folder unless a folder is given."""

    category = "erasers"
    inputs = {"model": MODEL.optional("a model with eraser patches"),
              "clip": CLIP.optional("a text encoder with eraser patches")}
    params = {"name": String("eraser", file_name=True, help="file name (.safetensors is added)"),
              "folder": Path("", mode="folder", help="where to save: empty or a relative folder is in the "
                             "user's erasers folder; another place only if allowed in the app")}
    output_node = True
    always_run = True

    def run(self, ctx, model, clip, name, folder):
        import os

        from kernels.erasers import EraserPatch, default_eraser_dir, save_erasers

        patches = [p for b in (model, clip) if b is not None for p in b.patches if isinstance(p, EraserPatch)]
        if not patches:
            raise NodeError("nothing to save: the inputs carry no eraser")
        name = (name or "eraser").strip()
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        problem = file_name_problem(name)
        if problem:
            raise NodeError(f"the name {problem}")
        # Only inside the erasers folder, the output folder or a folder the user allowed.
        save_erasers(str(ctx.output_file(os.path.join(folder or "", name), default_dir=default_eraser_dir())),
                     patches)
        return {}


@register
class LoadEraser(Node):
    """Load erasers saved by SaveEraser and apply them (in their saved order) to a MODEL and CLIP.
    A bare file name is looked up in your erasers folder."""

    category = "erasers"
    inputs = {"model": MODEL, "clip": CLIP}
    params = {"path": Path("", mode="file", filters="Erasers (*.safetensors)", help="the eraser file"),
              "strength": _strength()}
    outputs = {"model": MODEL, "clip": CLIP}

    @classmethod
    def _resolve(cls, path, ctx):
        import os

        from kernels.erasers import default_eraser_dir

        full = ctx.resolve_path(path)
        if not os.path.exists(full) and path and not os.path.isabs(path):
            alt = os.path.join(default_eraser_dir(), path)
            if os.path.exists(alt):
                return alt
            if os.path.exists(alt + ".safetensors"):
                return alt + ".safetensors"
        return full

    @classmethod
    def fingerprint(cls, params, ctx):
        return path_fingerprint(cls._resolve(params["path"], ctx))

    def run(self, ctx, model, clip, path, strength):
        from kernels.erasers import EraserFileError, load_erasers

        if not path:
            raise NodeError("no eraser file chosen")
        try:
            patches = load_erasers(self._resolve(path, ctx))
        except EraserFileError as exc:
            raise NodeError(str(exc)) from None
        for p in patches:
            if strength != 1.0:
                p = p.with_strength(p.strength * strength)
            if p.target == "text_encoder":
                clip = clip.with_patch(p)
            else:
                model = model.with_patch(p)
        return {"model": model, "clip": clip}
