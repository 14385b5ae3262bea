"""Fine-tuned LoRA erasers: the negative-guidance family, trained on the CPU in minutes.

The LoRA is trained with peft on a private copy of the UNet against the frozen model (the input
model with its patches), on x_t drawn from the frozen model's own sampling trajectories for the
concept (ESD is data-free). Each objective is one loss function, a list of squared-error terms:

- ESD (Gandikota et al., "Erasing Concepts from Diffusion Models"):
  eps(x_t, c) -> eps*(x_t) - eta (eps*(x_t, c) - eps*(x_t));
- All-but-One (Hong et al., "All but One: Surgical Concept Erasing with Model Preservation in
  Text-to-Image Diffusion Models"; only the abstract was available to check: the alternative
  concept and model preservation): eps(x_t, c) -> eps*(x_t) + eta (eps*(x_t, c_alt) - eps*(x_t)),
  plus a term that holds the unconditional prediction at the frozen model's;
- SPM (kernels.erasers.membrane): the ESD loss with the empty prompt as neutral, plus latent
  anchoring: anchor prompts' predictions held at the frozen model's, on the concept's x_t as in
  SPM and also on the anchors' own trajectories. Given anchors, ESD and All-but-One get the same
  anchoring term (our addition: without it they also unlearn the words the concept's prompts
  share, e.g. every colour for a shape).

The trained LoRA is kept as peft's (A, B) factors (`LoraPatch`, `MembranePatch`).

Every family trains the same way (kernels.denoiser): text is a tensor or a DenoiserText (with
the pooled embedding SDXL, SD3 and FLUX take), the model a module or a Denoiser. FLUX has no
negative batch: its trajectories are sampled at guidance `pool_cfg` through its guidance input,
and every prediction of its training takes that guidance.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from kernels.denoiser import as_denoiser, cat_text
from kernels.sampling import cfg_mix

from .model_io import predict_noise
from .patches import lora_targets

OBJECTIVES = ("esd", "all_but_one", "spm")

LoraFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def spread_rows(count: int, prompts: int) -> torch.Tensor:
    """Which of `prompts` rows each of `count` runs samples: spread evenly over all of them.
    With fewer runs than prompts, taking the first `count` rows would leave the rest of a
    prompt list (the later colours of a vocabulary anchor set, a colour's later shapes) with
    no trajectory at all."""
    if count >= prompts:
        return torch.arange(count) % prompts
    return (torch.arange(count) * prompts) // count


@torch.no_grad()
def concept_trajectories(unet, scheduler, cond, uncond, *, count: int,
                         steps: int, cfg: float, generator: torch.Generator, sample_shape: tuple,
                         with_prompts: bool = False):
    """x_t and t at every step of `count` sampling runs of the model on `cond` (ESD's data);
    with_prompts: also which row of `cond` each x_t was sampled for."""
    denoiser = as_denoiser(unet)
    timesteps = denoiser.set_timesteps(scheduler, steps)
    x = torch.randn((count,) + tuple(sample_shape), generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    x = x.to(cond.device, cond.dtype)
    which = spread_rows(count, cond.shape[0])
    c = cond[which]
    u = uncond.expand(count, -1, -1)
    xs, ts = [], []
    for t in timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        xs.append(x_in.clone())
        ts.append(torch.full((count,), float(t)))
        x = scheduler.step(denoiser.guided(x_in, t, c, u, cfg), t, x).prev_sample
    if with_prompts:
        return torch.cat(xs), torch.cat(ts), which.repeat(len(xs))
    return torch.cat(xs), torch.cat(ts)


# ---------------------------------------------------------------------------------------------
# the training data: trajectory pools and the batches drawn from them
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainingPools:
    """x_t, t and the concept prompt's row from the frozen model's trajectories for the concept,
    and (for anchoring) x_t, t and the anchor row from its trajectories for the anchor prompts."""

    x: torch.Tensor
    t: torch.Tensor
    rows: torch.Tensor
    anchors: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None


@dataclass
class TrainingBatch:
    """One step's samples: x_t, t and the concept's embeddings; the alternative concept's
    embeddings (All-but-One); the anchoring samples (x_t, t, anchor embeddings)."""

    x: torch.Tensor
    t: torch.Tensor
    concept: torch.Tensor
    alternative: Optional[torch.Tensor] = None
    anchor: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None


def training_pools(teacher, scheduler, target_embeds, empty_embeds, anchor_embeds, *, runs: int, steps: int,
                   cfg: float, generator: torch.Generator) -> TrainingPools:
    sample_shape = as_denoiser(teacher).sample_shape()
    x, t, rows = concept_trajectories(teacher, scheduler, target_embeds, empty_embeds, count=runs, steps=steps,
                                      cfg=cfg, generator=generator, sample_shape=sample_shape, with_prompts=True)
    anchors = None
    if anchor_embeds is not None:
        # Anchors are held on their own trajectories as well as on the concept's (SPM holds them
        # on the concept's only): what a neighbour concept draws is what must not change.
        anchors = concept_trajectories(teacher, scheduler, anchor_embeds, empty_embeds,
                                       count=max(runs, min(anchor_embeds.shape[0], 4 * runs)), steps=steps,
                                       cfg=cfg, generator=generator, sample_shape=sample_shape, with_prompts=True)
    return TrainingPools(x, t, rows, anchors)


def draw_batch(pools: TrainingPools, target_embeds, alt_embeds, anchor_embeds, size: int,
               generator: torch.Generator) -> TrainingBatch:
    """`size` pool samples with the concept prompt each was sampled for (as ESD), and the
    alternative's prompt of the same template (when given: n rows as the concept's, or one);
    for anchoring, half of them with a random anchor prompt and as many anchor-pool samples with
    the anchor they were sampled for."""
    dev = target_embeds.device
    idx = torch.randint(0, pools.x.shape[0], (size,), generator=generator)
    x, t, rows = pools.x[idx], pools.t[idx].to(dev), pools.rows[idx]
    concept = target_embeds[rows]
    alternative = None
    if alt_embeds is not None:
        # the same template: "a red circle on the left" becomes "a red triangle on the left",
        # not a random other alternative prompt (which would also teach another colour or place)
        alternative = alt_embeds[rows if alt_embeds.shape[0] == target_embeds.shape[0] else torch.zeros_like(rows)]
    anchor = None
    if pools.anchors is not None:
        half = size // 2
        ax, at, ap = pools.anchors
        j = torch.randint(0, ax.shape[0], (size - half,), generator=generator)
        rows = anchor_embeds[torch.randint(0, anchor_embeds.shape[0], (half,), generator=generator)]
        anchor = (torch.cat([x[:half], ax[j]]), torch.cat([t[:half], at[j].to(dev)]),
                  cat_text([rows, anchor_embeds[ap[j]]]))
    return TrainingBatch(x, t, concept, alternative, anchor)


# ---------------------------------------------------------------------------------------------
# the objectives: one loss function each, as squared-error terms on the student
# ---------------------------------------------------------------------------------------------
@dataclass
class LossTerm:
    """weight * |student(x, t, embeds) - target|^2 (mean squared error)."""

    x: torch.Tensor
    t: torch.Tensor
    embeds: torch.Tensor
    target: torch.Tensor
    weight: float = 1.0


@torch.no_grad()
def esd_loss(teacher, batch: TrainingBatch, empty_embeds, *, eta: float) -> list[LossTerm]:
    """ESD: the concept's prediction pushed along the negative guidance direction."""
    x, t, c = batch.x, batch.t, batch.concept
    u = empty_embeds.expand(x.shape[0], -1, -1)
    e_u, e_c = predict_noise(teacher, torch.cat([x, x]), torch.cat([t, t]), cat_text([u, c])).chunk(2)
    return [LossTerm(x, t, c, cfg_mix(e_u, e_c, -eta))]  # guidance away from the concept


@torch.no_grad()
def all_but_one_loss(teacher, batch: TrainingBatch, empty_embeds, *, eta: float,
                     uncond_weight: float) -> list[LossTerm]:
    """All-but-One: the concept's prediction pulled towards the alternative concept's guidance
    direction, and the unconditional prediction held at the frozen model's."""
    x, t = batch.x, batch.t
    u = empty_embeds.expand(x.shape[0], -1, -1)
    e_u, e_a = predict_noise(teacher, torch.cat([x, x]), torch.cat([t, t]),
                             cat_text([u, batch.alternative])).chunk(2)
    terms = [LossTerm(x, t, batch.concept, cfg_mix(e_u, e_a, eta))]
    if uncond_weight > 0:
        terms.append(LossTerm(x, t, u, e_u, uncond_weight))
    return terms


# SPM's erasing term is ESD's with the empty prompt as neutral; its anchoring is `anchoring_loss`.
spm_loss = esd_loss


@torch.no_grad()
def anchoring_loss(teacher, batch: TrainingBatch, weight: float) -> list[LossTerm]:
    """Latent anchoring: the anchor prompts' predictions held at the frozen model's."""
    if batch.anchor is None:
        return []
    x, t, embeds = batch.anchor
    return [LossTerm(x, t, embeds, predict_noise(teacher, x, t, embeds), weight)]


def objective_loss(objective: str, *, eta: float, uncond_weight: float) -> Callable[..., list[LossTerm]]:
    """The loss function of `objective`: (teacher, batch, empty_embeds) -> terms."""
    if objective == "all_but_one":
        return functools.partial(all_but_one_loss, eta=eta, uncond_weight=uncond_weight)
    if objective == "esd":
        return functools.partial(esd_loss, eta=eta)
    if objective == "spm":
        return functools.partial(spm_loss, eta=eta)
    raise ValueError(f"objective must be one of {OBJECTIVES}")


def squared_error(student, terms: list[LossTerm]) -> torch.Tensor:
    """sum_i weight_i * MSE(student prediction, target_i), all terms in one student call."""
    preds = predict_noise(student, torch.cat([term.x for term in terms]), torch.cat([term.t for term in terms]),
                          cat_text([term.embeds for term in terms])).split([term.x.shape[0] for term in terms])
    total = None
    for term, pred in zip(terms, preds):
        part = term.weight * torch.nn.functional.mse_loss(pred.float(), term.target.float())
        total = part if total is None else total + part
    return total


# ---------------------------------------------------------------------------------------------
# the student LoRA and the training loop
# ---------------------------------------------------------------------------------------------
def lora_student(unet, scope: str, rank: int, alpha: float) -> tuple[torch.nn.Module, list[str]]:
    """A frozen private copy of `unet` with a trainable peft LoRA on the layers of `scope`."""
    from peft import LoraConfig, inject_adapter_in_model

    student = copy.deepcopy(unet)  # (safe guidance hooks the UNet only while it samples: none is copied)
    student.requires_grad_(False)
    targets = lora_targets(student, scope)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                        init_lora_weights=True, bias="none")
    student = inject_adapter_in_model(config, student)
    for name, p in student.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    return student, targets


def lora_factors(student, targets: list[str]) -> LoraFactors:
    """{`<layer>.weight`: (A, B)} of the student's trained LoRA."""
    loras = {}
    for name in targets:
        module = student.get_submodule(name)
        loras[f"{name}.weight"] = (module.lora_A["default"].weight.detach().clone(),
                                   module.lora_B["default"].weight.detach().clone())
    return loras


def train_erasure_lora(unet, scheduler, target_embeds: torch.Tensor, empty_embeds: torch.Tensor, *,
                       objective: str = "esd", alt_embeds: Optional[torch.Tensor] = None,
                       anchor_embeds: Optional[torch.Tensor] = None, scope: str = "cross_attention",
                       rank: int = 4, alpha: Optional[float] = None, steps: int = 200, lr: float = 1e-3,
                       eta: float = 1.0, anchor_weight: float = 1.0, uncond_weight: float = 1.0,
                       batch: int = 4, pool_runs: int = 8, pool_steps: int = 10, pool_cfg: float = 3.0,
                       seed: int = 0, progress: Optional[Callable[[int, int], None]] = None
                       ) -> tuple[LoraFactors, float, TrainReport]:
    """Train an erasing LoRA on a private copy of `unet` (the frozen teacher is `unet` itself).

    unet: a denoiser module or a kernels.denoiser.Denoiser (any family); target_embeds: (n, L, D)
    the concept's prompts and empty_embeds: (1, L, D) the unconditional text, tensors or
    DenoiserTexts (with the pooled embeddings of the families that take them).
    objective "esd" (`esd_loss`), "all_but_one" (`all_but_one_loss`, needs alt_embeds (n or 1,
    L, D)), "spm" (`spm_loss`); given anchor_embeds, every objective adds `anchoring_loss` with
    `anchor_weight`. Returns ({param name: (A, B)}, scale, report); `unet` is not modified.
    """
    loss_terms = objective_loss(objective, eta=eta, uncond_weight=uncond_weight)
    if objective == "all_but_one" and alt_embeds is None:
        raise ValueError("All-but-One needs an alternative concept")
    if objective == "all_but_one" and alt_embeds.shape[0] not in (1, target_embeds.shape[0]):
        raise ValueError(f"All-but-One: {alt_embeds.shape[0]} alternative prompts for {target_embeds.shape[0]} "
                         "concept prompts (give one per concept prompt, or one)")
    started = time.perf_counter()
    gen = torch.Generator("cpu").manual_seed(seed)
    torch.manual_seed(seed)  # peft draws the initial A factors from the global generator
    alpha = float(alpha if alpha is not None else rank)
    teacher = as_denoiser(unet).with_guidance(pool_cfg)  # (the guidance input of FLUX "dev" only)
    student_module, targets = lora_student(teacher.module, scope, rank, alpha)
    student = teacher.on(student_module)
    opt = torch.optim.Adam([p for n, p in student_module.named_parameters() if "lora_" in n], lr=lr)

    params = next(teacher.module.parameters())
    dev, dt = params.device, params.dtype
    target_embeds, empty_embeds = target_embeds.to(dev, dt), empty_embeds.to(dev, dt)
    alt = alt_embeds.to(dev, dt) if objective == "all_but_one" else None
    anchors = anchor_embeds.to(dev, dt) if anchor_embeds is not None and anchor_weight > 0 else None
    pools = training_pools(teacher, scheduler, target_embeds, empty_embeds, anchors, runs=pool_runs,
                           steps=pool_steps, cfg=pool_cfg, generator=gen)
    report = TrainReport()
    student_module.train()
    for step in range(steps):
        sample = draw_batch(pools, target_embeds, alt, anchors, batch, gen)
        terms = loss_terms(teacher, sample, empty_embeds) + anchoring_loss(teacher, sample, anchor_weight)
        loss = squared_error(student, terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        report.losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps)
    report.steps = steps
    report.seconds = time.perf_counter() - started
    return lora_factors(student_module, targets), alpha / rank, report
