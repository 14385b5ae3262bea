"""Sampling at sizes other than the model's own.

- entropy: attention-entropy scaling of self-attention for sizes other than the training size
  (`EntropyScalePatch`, the AttentionEntropyScale node);
- tiled_diffusion: MultiDiffusion-style overlapping latent tiles under one noise schedule
  (`TiledDenoiser`, the TiledSampler node).

DiffuseHigh's progressive upscale lives with the upscalers (kernels.upscale.diffusehigh).
"""
