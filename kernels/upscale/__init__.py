"""Upscaling: super-resolution models loaded through spandrel, run tile by tile.

- model_upscale: reading a model file safely (safetensors, or a pickle through
  `torch.load(weights_only=True)`), spandrel's architecture detection, the memory budget and
  the tiled run;
- tiling: the generic tile-and-feather loop over any image-to-image callable.
"""
