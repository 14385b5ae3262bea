"""Analysis techniques: what a model knows, read from its denoising.

- table: the plain-data result table the analysis nodes return;
- classifier: Diffusion Classifier (zero-shot classification from denoising error);
- seed_scan: render many seeds of one prompt and rank them by a metric (golden seeds);
- activation_patch: prompt B's cross-attention inputs patched into prompt A's run, per layer.
"""
