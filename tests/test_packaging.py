"""The installer recipe stays in step with the repository (the build itself is not run here)."""

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "packaging" / "loomwork.spec"


def _spec_list(name):
    tree = ast.parse(SPEC.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in {SPEC}")


def test_spec_names_every_resource_folder():
    shipped, left_out = set(_spec_list("RESOURCE_DIRS")), set(_spec_list("NOT_SHIPPED"))
    present = {p.name for p in (ROOT / "resources").iterdir() if p.is_dir()}
    assert present <= shipped | left_out, f"resource folders missing from the spec: {sorted(present - shipped - left_out)}"
    assert not shipped & left_out


def test_spec_copies_metadata_that_libraries_check_at_import():
    metadata = set(_spec_list("METADATA"))
    assert {"torch", "diffusers", "transformers", "tokenizers", "safetensors", "huggingface_hub"} <= metadata


def test_desktop_entry_and_mime_type_agree():
    desktop = configparser.ConfigParser(interpolation=None)
    desktop.read(ROOT / "packaging" / "linux" / "loomwork.desktop")
    entry = desktop["Desktop Entry"]
    mime = (ROOT / "packaging" / "linux" / "loomwork-mime.xml").read_text()
    assert entry["MimeType"].rstrip(";") in mime and '*.loom' in mime
    assert entry["Exec"].startswith("loomwork")


def test_deb_depends_on_the_xcb_libraries_qt_needs():
    control = (ROOT / "packaging" / "linux" / "control.in").read_text()
    for lib in ("libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1", "libxkbcommon-x11-0", "libegl1",
                "libfontconfig1"):
        assert lib in control
