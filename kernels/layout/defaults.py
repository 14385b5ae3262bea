"""Default settings of the layout techniques, declared once: the patches' keyword defaults and
the layout nodes' parameter defaults both read them (saved graphs store only what differs from
a node's defaults, so these values are what old graphs run with).

Plain numbers only: the node catalogue imports this module before torch is loaded.
"""

# Paint-with-Words (RegionAttentionPatch, the RegionAttention node)
REGION_STRENGTH = 0.5  # w' of eDiff-I

# per-region prompts (RegionalPromptPatch, the RegionalPrompts node)
REGIONAL_MIX = 1.0  # the box's phrase weight inside its box
REGIONAL_EMPHASIS = 1.0  # Paint-with-Words w' on the phrase inside its box

# gradient guidance (ZestGuide, box guidance, A-STAR): step size, steps per guided step, window
GUIDANCE_ETA = 0.5
GUIDANCE_ITERATIONS = 1
GUIDANCE_START = 0.0
GUIDANCE_END = 0.5  # ZestGuide's tau: the first half of the steps

# box guidance (BoxGuidancePatch, the BoxGuidance node): loss weights, CSG's settings
BOX_INNER = 1.0
BOX_OUTER = 1.0
BOX_CORNER = 0.5
BOX_WITHIN = 1.0
BOX_INTER = 1.0  # CSG's inter-token loss, in CSG's balance against `within`
BOX_SELF_ATTENTION = 1.0  # CSG's self-attention loss, likewise
BOX_REDISTRIBUTE_END = 0.5
CSG_TOPK = 0.8
CSG_DROPOUT = 0.5
CSG_MARGIN = 0.1

# A-STAR (AStarPatch, the AStar node)
A_STAR_RETENTION = 1.0
A_STAR_SMOOTHING = 0.5  # sigma of the 3x3 Gaussian (Attend-and-Excite's)

# 3DIS joint-attention masks (JointAttentionMaskPatch, the JointAttentionMask node): steps
JOINT_IMAGE_STEPS = 4  # image->image region masks
JOINT_TEXT_STEPS = 20  # image->text, text->image, text->text masks
