"""The 200 held-out prompts that score ShapesT2I (resources/shapes/heldout_prompts.json).

Drawn from a seed the training data never uses, always with position phrases (the cell metric
needs them, and position-less captions are too few to hold any out); training drops any caption
identical to one of these.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kernels.shapes.world import caption_for, sample_scene

HELDOUT_SEED = 20261122
MIX = {1: 100, 2: 60, 3: 40}


def make_heldout_prompts(seed: int = HELDOUT_SEED) -> list[dict]:
    rng = np.random.default_rng(seed)
    prompts, seen = [], set()
    for n, count in MIX.items():
        made = 0
        while made < count:
            scene = sample_scene(rng, n)
            text = caption_for(scene, with_position=True, with_background=bool(rng.random() < 0.5))
            if text in seen:
                continue
            seen.add(text)
            prompts.append({"caption": text, "seed": int(rng.integers(2**31)),
                            "objects": [{"colour": o.colour, "shape": o.shape, "cell": o.cell}
                                        for o in scene.objects]})
            made += 1
    return prompts


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[2] / "resources" / "shapes" / "heldout_prompts.json"
    out.write_text(json.dumps({"seed": HELDOUT_SEED, "prompts": make_heldout_prompts()}, indent=1))
    print(out)
