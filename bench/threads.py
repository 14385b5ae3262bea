"""Torch thread count for batch-1 sampling: 1 vs 2 threads, idle and with a competing process.

Prints JSON. The CLI's default (one thread) comes from this measurement.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
from kernels.models import load_model_folder
from kernels.sampling import make_scheduler, sample
from kernels.text import encode_text
model, clip, vae = load_model_folder(sys.argv[1])
cond = encode_text(clip.tokenizer, clip.text_encoder, "a red circle on the left")
shape = (1, vae.latent_channels, 32 // vae.scale_factor, 32 // vae.scale_factor)
times = []
for i in range(4):
    g = torch.Generator().manual_seed(i)
    t = time.perf_counter()
    sample(model.unet, make_scheduler("dpmpp_2m", model.scheduler_config), cond.embeds, cond.empty,
           torch.randn(shape, generator=g), 20, 4.0, g)
    times.append(time.perf_counter() - t)
print(json.dumps(sorted(times)[len(times) // 2]))
"""


def _burn(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def measure(model: str, threads: int, loaded: bool) -> float:
    burner = None
    if loaded:
        burner = multiprocessing.Process(target=_burn, args=(time.time() + 600,), daemon=True)
        burner.start()
    try:
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        out = subprocess.run([sys.executable, "-c", SCRIPT, model, str(ROOT), str(threads)],
                             env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    finally:
        if burner is not None:
            burner.terminate()


def main() -> None:
    sys.path.insert(0, str(ROOT))
    model = str(ROOT / "resources/models/shapes-t2i")
    if not (Path(model) / "model_index.json").exists():
        from kernels.tiny import build_tiny_model
        model = build_tiny_model(tempfile.mkdtemp(prefix="loomwork-threads-") + "/tiny")
    result = {"model": model, "cpus": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "seconds_per_image_20_steps": {}}
    for loaded in (False, True):
        for threads in (1, 2):
            key = f"{threads}_thread{'s' if threads > 1 else ''}_{'with_competing_process' if loaded else 'idle'}"
            result["seconds_per_image_20_steps"][key] = round(measure(model, threads, loaded), 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
