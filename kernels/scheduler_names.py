"""The schedulers the sampler offers, by name, in a module without torch: node declarations list
the names at import, and the app builds its palette before torch is loaded.

Names are what graphs store: never rename one without a node migration.
"""

from __future__ import annotations

# name -> (diffusers scheduler class, config overrides); kernels.sampling builds each from these.
SCHEDULER_CLASSES: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "flow_match_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULER_CLASSES)  # what node declarations offer
FLOW_SCHEDULERS = {"flow_match_euler"}  # the ones that can sample a flow-matching model
