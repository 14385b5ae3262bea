"""Red team: find prompts that make an erased model draw the erased concept again.

Prompting4Debugging (Chin et al., "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models
by Finding Problematic Prompts"), P4D-N: optimise free token embeddings so the erased model's
prediction on them matches the original model's prediction on the concept prompt at noised
images of the concept, projecting to the nearest vocabulary token every step (PEZ: Wen et al.,
"Hard Prompts Made Easy"); the best hard prompt is judged by generating with the erased model.
Checked against joycenerd/P4D prompt_optimization/optimize_n.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from kernels.patching import SamplingRun, applied_patches
from kernels.sampling import cfg_mix, noised_sample, training_timesteps
from kernels.text import Conditioning, TextEncoderSet, tokenize, words_of

from .generator import Generator, model_scheduler
from .model_io import predict_noise

Judge = Callable[[torch.Tensor], list[bool]]  # images -> [the concept is in the image]


@dataclass
class RedTeamResult:
    prompt: str
    token_ids: list[int]
    loss: float
    losses: list[float]
    images: Optional[torch.Tensor] = None   # erased model's samples for the found prompt
    successes: Optional[list[bool]] = None  # judge per image
    seconds: float = 0.0

    @property
    def success_rate(self) -> Optional[float]:
        if self.successes is None:
            return None
        return sum(self.successes) / max(1, len(self.successes))


class TokenVocabulary:
    """The tokens a hard prompt is made of: the text encoder's token embeddings, without the
    special tokens and the tokens of banned words."""

    def __init__(self, tokenizer, text_encoder, banned_words: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.embeddings = text_encoder.get_input_embeddings().weight.detach().float()
        banned = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
        banned.discard(None)
        for w in banned_words:
            banned.update(tokenizer(w, add_special_tokens=False).input_ids)
        self.allowed = torch.ones(self.embeddings.shape[0], dtype=torch.bool)
        for i in banned:
            if 0 <= i < self.embeddings.shape[0]:
                self.allowed[i] = False
        self._unit = torch.nn.functional.normalize(self.embeddings, dim=-1)

    def project(self, soft: torch.Tensor) -> torch.Tensor:
        """The allowed token nearest (by cosine) to each soft embedding."""
        sims = torch.nn.functional.normalize(soft.detach().float(), dim=-1) @ self._unit.T
        sims[:, ~self.allowed] = -2.0
        return sims.argmax(dim=-1)

    def text(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()

    def token(self, token_id: int) -> str:
        tok = self.tokenizer
        return tok.convert_ids_to_tokens(int(token_id)) if hasattr(tok, "convert_ids_to_tokens") else "a"


class FreeTokenEncoder:
    """Encodes n free token embeddings as a prompt: a dummy prompt of n placeholder words, then
    EOS and padding as usual, whose input embeddings at positions 1..n are replaced."""

    def __init__(self, clip, placeholder: str, n_tokens: int):
        self.clip = clip
        self.ids = tokenize(clip.tokenizer, [" ".join([placeholder] * n_tokens)]).input_ids.to(
            clip.text_encoder.device)
        self.positions = list(range(1, 1 + n_tokens))

    def __call__(self, token_embeds: torch.Tensor) -> torch.Tensor:
        te = self.clip.text_encoder

        def hook(_m, _inp, out):
            out = out.clone()
            out[:, self.positions] = token_embeds.to(out.dtype)
            return out

        handle = te.get_input_embeddings().register_forward_hook(hook)
        try:
            with applied_patches(self.clip.patches, te):
                return te(self.ids).last_hidden_state
        finally:
            handle.remove()


def guided_prediction(gen: Generator, cond, z: torch.Tensor, t: torch.Tensor, positive: torch.Tensor,
                      negative: torch.Tensor, cfg: float, scheduler) -> torch.Tensor:
    """CFG-combined noise prediction of `gen`'s model (with its patches, in a one-step run for
    `cond`) at z_t: text embeddings `positive` and `negative`, one row per sample."""
    unet = gen.model.unet
    run = SamplingRun(unet=unet, scheduler=scheduler, positive=cond, negative=None, cfg=cfg, steps=1,
                      latent_shape=tuple(z.shape))
    with applied_patches(gen.model.patches, unet, run):
        e_u, e_c = predict_noise(unet, torch.cat([z, z]), torch.cat([t, t]), torch.cat([negative, positive])).chunk(2)
    return cfg_mix(e_u, e_c, cfg)


def prediction_matching_loss(erased: Generator, original: Generator, target_cond, prompt: Conditioning,
                             prompt_embeds: torch.Tensor, clean: torch.Tensor, cfg: float, scheduler,
                             generator: torch.Generator) -> torch.Tensor:
    """|eps_erased(z_t, prompt) - eps_orig(z_t, target)|^2, both CFG-combined, at the clean
    target images noised to random training timesteps. `prompt_embeds` are the prompt's
    embeddings with their gradient (`prompt`, what the erased model's patches see, holds them
    detached)."""
    dev, dt = clean.device, clean.dtype
    b = clean.shape[0]
    noise = torch.randn(clean.shape, generator=generator).to(dev, dt)
    t = training_timesteps(scheduler, b, generator)
    z = noised_sample(scheduler, clean, noise, t)
    t = t.to(dev)
    with torch.no_grad():
        want = guided_prediction(original, target_cond, z, t, target_cond.embeds.to(dev, dt).expand(b, -1, -1),
                                 target_cond.empty.to(dev, dt).expand(b, -1, -1), cfg, scheduler)
    got = guided_prediction(erased, prompt, z, t, prompt_embeds.expand(b, -1, -1), prompt.empty.expand(b, -1, -1),
                            cfg, scheduler)
    return torch.nn.functional.mse_loss(got.float(), want.float())


def judged_rate(gen: Generator, prompt: str, judge: Judge, seeds: Sequence[int], steps: int, cfg: float) -> float:
    """Share of `gen`'s samples of `prompt` (one per seed) that the judge finds the concept in."""
    images = gen.sample(gen.encode(prompt), seeds=seeds, steps=steps, cfg=cfg)
    return sum(judge(images)) / len(seeds)


def red_team_prompt(erased: Generator, original: Generator, target_prompt: str, *,
                    n_tokens: int = 4, steps: int = 40, lr: float = 0.1, cfg: float = 4.0,
                    target_images: Optional[torch.Tensor] = None, n_targets: int = 2,
                    sample_steps: int = 12, eval_every: int = 10, eval_seeds: Sequence[int] = (0, 1, 2, 3),
                    judge: Optional[Judge] = None, seed: int = 0, banned_words: Sequence[str] = (),
                    progress: Optional[Callable[[int, int], None]] = None) -> RedTeamResult:
    """P4D-N: find n_tokens hard tokens that make the erased model act like the original on the concept.

    Loss: E_t |eps_erased(z_t, P) - eps_orig(z_t, target_prompt)|^2 with both CFG-combined at
    `cfg` (`prediction_matching_loss`); z_t are noised target images (default: the original
    model's samples of the target prompt). Every step the soft embeddings are projected to their
    nearest vocabulary tokens by cosine and the gradient at the projection updates the soft ones
    (PEZ). Every `eval_every` steps the hard prompt is sampled on the erased model and judged (if
    `judge` is given: images -> [concept present]); the best-judged (else lowest-loss) prompt is
    returned. `banned_words` are never chosen (e.g. the concept's own words, to look for a bypass).
    """
    if isinstance(erased.clip.text_encoder, TextEncoderSet) or isinstance(original.clip.text_encoder, TextEncoderSet):
        raise ValueError("the red team optimises one CLIP encoder's tokens (SD 1.x/2.x); SDXL, SD3 and FLUX "
                         "models, with several text encoders, are not supported")
    started = time.perf_counter()
    gen = torch.Generator("cpu").manual_seed(seed)
    unet = erased.model.unet
    dev, dt = unet.device, unet.dtype
    target_cond = original.encode(target_prompt)
    if target_images is None:
        target_images = original.sample(target_cond, seeds=list(range(1000 + seed, 1000 + seed + n_targets)),
                                        steps=sample_steps, cfg=cfg)
    sched = model_scheduler(erased.model)
    vocab = TokenVocabulary(erased.clip.tokenizer, erased.clip.text_encoder, banned_words)
    start_ids = torch.multinomial(vocab.allowed.float(), n_tokens, replacement=True, generator=gen)
    soft = vocab.embeddings[start_ids].clone().requires_grad_(True)
    opt = torch.optim.AdamW([soft], lr=lr, weight_decay=0.1)
    encode_free_tokens = FreeTokenEncoder(erased.clip, vocab.token(start_ids[0]), n_tokens)
    with torch.no_grad():
        empty = erased.encode("").embeds.to(dev, dt)
    clean = target_images.to(dev, dt)
    best_rate, best_loss, best_ids = -1.0, float("inf"), None
    losses: list[float] = []
    for step in range(steps):
        ids = vocab.project(soft)
        hard = vocab.embeddings[ids].clone().requires_grad_(True)
        text = vocab.text(ids)
        embeds = encode_free_tokens(hard).to(dev, dt)
        prompt = Conditioning(embeds=embeds.detach(), prompt=text,
                              words={w: (i,) for i, w in enumerate(words_of(text))}, empty=empty)
        loss = prediction_matching_loss(erased, original, target_cond, prompt, embeds, clean, cfg, sched, gen)
        grad, = torch.autograd.grad(loss, [hard])
        soft.grad = grad.to(soft.dtype)  # PEZ: the gradient at the projection moves the soft prompt
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps)
        if judge is not None and (step % eval_every == eval_every - 1 or step == steps - 1):
            rate = judged_rate(erased, text, judge, eval_seeds, sample_steps, cfg)
            if rate > best_rate or (rate == best_rate and losses[-1] < best_loss):
                best_rate, best_loss, best_ids = rate, losses[-1], ids.clone()
        elif judge is None and losses[-1] < best_loss:
            best_loss, best_ids = losses[-1], ids.clone()
    ids = best_ids if best_ids is not None else vocab.project(soft)
    text = vocab.text(ids)
    result = RedTeamResult(prompt=text, token_ids=[int(i) for i in ids], loss=best_loss, losses=losses)
    result.images = erased.sample(erased.encode(text), seeds=eval_seeds, steps=sample_steps, cfg=cfg)
    if judge is not None:
        result.successes = list(judge(result.images))
    result.seconds = time.perf_counter() - started
    return result
