"""Speed techniques for the sampler family: patches that make a sampling run cheaper.

- feature_cache: DeepCache-style feature inheritance (A-SDM's tuning-free variant), reusing the
  deep UNet blocks' outputs between adjacent steps;
- magnitude_pruning: post-training unstructured magnitude pruning of the denoiser and the text
  encoder (global or layer-wise).
"""
