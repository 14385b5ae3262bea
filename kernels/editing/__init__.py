"""Editing techniques: an existing image changed by a prompt.

- cycle_diffusion: CycleDiffusion's DPM-Encoder (encode with the source prompt, regenerate with
  the target prompt from the same latent code).
"""
