"""The seed scan's "clip" metric with a tiny random-weight CLIPModel saved to a folder.

Exact checks: the node's scores are the cosine similarities computed here directly from the
same model's text and image features, of the Sampler's own images; a second scan gives the
same table; a missing folder, or one with only pickled weights, fails naming the node and path.
"""

import pytest
import torch
from conftest import QuietContext

from kernels.images import model_to_image
from kernels.models import load_model_folder
from kernels.text import encode_text
from kernels.tiny import TINY_WORDS, build_word_tokenizer
from nodes.analysis import SeedScan
from nodes.base import NodeError
from nodes.core import Sampler

PROMPT = "a red circle"


class Ctx(QuietContext):
    def resolve_path(self, path, kinds=None):
        return path


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_word_tokenizer(TINY_WORDS, 16)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        vision_config={"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _direct(folder, image):
    """CLIP similarity of one HWC image to PROMPT, step by step with transformers' own classes."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    ids = AutoTokenizer.from_pretrained(folder)([PROMPT], return_tensors="pt")
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pixels = processor(images=[(image.clamp(0, 1).numpy() * 255).round().astype("uint8")],
                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        t = model.text_projection(model.text_model(**ids).pooler_output)[0]
        v = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
    return float(t @ v / (t.norm() * v.norm()))


def test_clip_scores_are_the_models_similarities_and_the_ranking_repeats(tiny_pixel_model, clip_folder):
    model, clip, vae = load_model_folder(tiny_pixel_model)
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    latent = torch.zeros(1, 3, 16, 16)
    node = SeedScan()
    out = node.run(Ctx(), model, vae, cond, None, latent, "euler", 2, 4.0, 5, 3, "clip", str(clip_folder))
    table = out["table"]
    assert table.title.startswith("Seed scan (clip") and sorted(table.column("seed")) == [5, 6, 7]
    for seed, score in zip(table.column("seed"), table.column("score")):
        image = model_to_image(Sampler().run(Ctx(), model, cond, None, latent, "euler", 2, 4.0, seed, 1.0)["latent"])
        assert score == pytest.approx(_direct(clip_folder, image[0]), abs=2e-6)
    scores = table.column("score")
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 3  # random weights still differ
    again = node.run(Ctx(), model, vae, cond, None, latent, "euler", 2, 4.0, 5, 3, "clip", str(clip_folder))
    assert again["table"] == table


def test_a_missing_or_pickled_clip_folder_is_refused(tiny_pixel_model, clip_folder, tmp_path):
    model, clip, vae = load_model_folder(tiny_pixel_model)
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    latent = torch.zeros(1, 3, 16, 16)
    missing = tmp_path / "no-such-clip"
    with pytest.raises(NodeError, match=rf"SeedScan: CLIP model folder '{missing}' does not exist"):
        SeedScan().run(Ctx(), model, vae, cond, None, latent, "euler", 2, 4.0, 0, 2, "clip", str(missing))
    with pytest.raises(NodeError, match="SeedScan: CLIP model folder '' does not exist"):
        SeedScan().run(Ctx(), model, vae, cond, None, latent, "euler", 2, 4.0, 0, 2, "clip", "")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((clip_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(NodeError, match=rf"SeedScan: CLIP model folder '{pickled}' has no .safetensors"):
        SeedScan().run(Ctx(), model, vae, cond, None, latent, "euler", 2, 4.0, 0, 2, "clip", str(pickled))


def test_the_cache_key_follows_the_clip_folders_files(clip_folder, tmp_path):
    import shutil

    copy = tmp_path / "clip"
    shutil.copytree(clip_folder, copy)
    params = {"metric": "clip", "clip_folder": str(copy)}
    before = SeedScan.fingerprint(params, Ctx())
    assert SeedScan.fingerprint({**params, "metric": "contrast"}, Ctx()) is None
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert SeedScan.fingerprint(params, Ctx()) != before


def test_the_app_loads_the_clip_model_once_through_its_model_manager(tiny_pixel_model, clip_folder, tmp_path):
    """Two runs of a scan with other seeds (the scan runs again) load the CLIP folder once: it is
    one of the model manager's models, counted in its budget like the diffusion model."""
    import os

    from test_analysis_graphs import small_example

    from app.engine import Executor

    g = small_example("analysis-seed-scan", tiny_pixel_model, PROMPT,
                      SeedScan={"metric": "clip", "clip_folder": str(clip_folder)})
    scan = next(n for n in g.nodes.values() if n.type == "SeedScan")
    executor = Executor(device="cpu", disk_cache=False)
    for first in (0, 10):
        scan.params["first"] = first
        report = executor.run(g, output_dir=tmp_path)
        assert report.ok, {r.title: r.error for r in report.nodes.values()}
        assert report.status(scan.id) == "ran"
    manager = executor.models
    sources = [os.path.abspath(m["source"]) for m in manager.usage()["models"]]
    assert sources.count(os.path.abspath(clip_folder)) == 1
    assert manager.loads == 2  # the tiny diffusion model and CLIP, each once
    clip_entry = next(m for m in manager.usage()["models"] if os.path.abspath(m["source"]) == os.path.abspath(clip_folder))
    assert clip_entry["bytes"].get("cpu", 0) > 0  # measured and counted against the budget
