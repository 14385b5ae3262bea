"""Default settings of Multi-Concept T2I-Zero, declared once for the kernels and the nodes.

Plain numbers only: the node catalogue imports this module before torch is loaded. The paper
gives no values for these in what we could read; see kernels/t2i_zero/embedding.py and nms.py.
The correction's threshold and strength were picked on ShapesT2I's tuning stream
(`bench/t2i_zero.py --source world --world-seed 777 --n 16`): of the two settings tried
(strength 0.5 / threshold 0.5, strength 1 / threshold 0), only the second changed any outcome.
"""

# Correction by Similarities (correct_conditioning, the EmbeddingTweak node)
CORR_WINDOW = 3  # prompt tokens on each side of a concept token that may contribute
CORR_THRESHOLD = 0.0  # score threshold on the normalised element-wise similarities, in 0..1
CORR_STRENGTH = 1.0  # blend of the corrected embedding into the concept token's; 0 = off

# Cross-Token Non-Maximum Suppression (CrossTokenNMSPatch, the CrossTokenNMS node)
NMS_STRENGTH = 1.0  # how far a non-maximal concept's attention is suppressed (1: to zero)
NMS_SIGMA = 0.5  # sigma of the 3x3 Gaussian the maps are smoothed with before the argmax
NMS_START = 0.0
NMS_END = 1.0
