"""Nodes that work on erasers: the red team that attacks one, and saving and loading them.

The erasers themselves are in nodes/erasers.py; the math in kernels/erasers/.
"""

from __future__ import annotations

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
from .erasers import _need, _strength
from .registry import register


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
