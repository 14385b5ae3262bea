"""Multi-Concept T2I-Zero (Tunanyan, Xu, Navasardyan, Wang, Shi; arXiv:2310.07419): two
training-free tweaks against a multi-object prompt losing one of its objects.

- embedding: Correction by Similarities ("Corr-Emb"), a pure function on a Conditioning that
  rebuilds each concept token's embedding from the prompt tokens most similar to it, element by
  element (`correct_conditioning`, the EmbeddingTweak node).
- nms: Cross-Token Non-Maximum Suppression, a cross-attention transform on the layout processor
  stack (kernels.attention): at each pixel, per head, only the concept whose smoothed attention is
  highest keeps its attention (`CrossTokenNMSPatch`, the CrossTokenNMS node).
- concepts: which tokens are the concepts (explicit phrases, or the noun after each "a"/"an").
- defaults: the settings both the kernels and the nodes read (no torch).

Nothing is imported here, so `kernels.t2i_zero.defaults` loads before torch does.
"""
