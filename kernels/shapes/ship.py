"""Copy trained ShapesT2I weights into the repository: fp16 safetensors, sampling config.

    python -m kernels.shapes.ship TRAINED_FOLDER [--dest resources/models/shapes-t2i]

The train command, its flags and the step go to training_metrics.json beside the weights.
Weights are stored in fp16 (half the size; the app loads them as float32) only if the fp16 copy
scores no worse than fp32 on the 48-prompt probe set, else in fp32 (19 MB, within the 40 MB
budget); the scheduler config is the current one (trailing spacing), whatever training saved.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from kernels.models import load_model_folder
from kernels.shapes import model as shapes_model
from kernels.shapes.train import eval_subset, evaluate, load_heldout, training_curve

DEST = Path(__file__).resolve().parents[2] / "resources" / "models" / "shapes-t2i"


def probe_scores(folder: str) -> dict:
    unet, clip, _ = load_model_folder(folder)
    config = dict(shapes_model.build_scheduler().config)
    metrics, _ = evaluate(unet.unet, clip.text_encoder, clip.tokenizer, config, eval_subset(load_heldout()))
    return metrics


def training_metrics(source: Path, probe: dict) -> dict:
    """What the shipped weights are: the train command, its flags and step (training_state.json,
    or an older run's metrics.json), the 48-prompt probe of the shipped copy, and the eval curve."""
    state_file, old_metrics = source / "training_state.json", source / "metrics.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
    elif old_metrics.exists():
        state = json.loads(old_metrics.read_text())
    else:
        state = {}
    log = source / "train_log.jsonl"
    return {**state, "probe_48_prompts": probe, "curve": training_curve(log) if log.exists() else []}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source")
    parser.add_argument("--dest", default=str(DEST))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    unet, clip, _ = load_model_folder(args.source)
    with tempfile.TemporaryDirectory() as tmp:
        half_dir, full_dir = Path(tmp) / "fp16", Path(tmp) / "fp32"
        for folder, dtype in ((half_dir, torch.float16), (full_dir, torch.float32)):
            shapes_model.save_model(str(folder), unet.unet, clip.text_encoder, clip.tokenizer,
                                    shapes_model.build_scheduler(), dtype=dtype)
        full, half = probe_scores(str(full_dir)), probe_scores(str(half_dir))
        worse = {k: (full[k], half[k]) for k in full if isinstance(full[k], float) and half[k] < full[k]}
        chosen = full_dir if worse else half_dir
        print(json.dumps({"fp32": full, "fp16": half, "shipped": chosen.name,
                          "fp16_worse_on": worse}, indent=1))
        dest = Path(args.dest)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(chosen, dest)
    metrics = training_metrics(Path(args.source), full if worse else half)
    (dest / "training_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
