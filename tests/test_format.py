"""The .loom file format: round trip, migrations, placeholders, PNG embedding, atomic save, and
malformed files (each one a GraphFileError naming the file and the problem, never anything else)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from app.graph import FORMAT_VERSION, Graph, GraphFileError, dumps, load, loads, save, validate
from app.graph.png import png_bytes
from nodes import registry

DATA = Path(__file__).parent / "data"
OLD_V1 = DATA / "old_v1.loom"


def catalog(name):
    return registry.get(name)


def add_node(graph, type_name, params=None, **kw):
    """Add a node recording its type's current version (as the app does)."""
    return graph.add_node(type_name, params, version=registry.get(type_name).version, **kw)


def sample_graph() -> Graph:
    """A small graph with every kind of content the file holds (no model needed)."""
    g = Graph(meta={"author": "Zoë", "notes": ["first", "second"], "canvas": {"zoom": 1.25}})
    load_ = add_node(g, "LoadModel", {"path": "models/tiny", "dtype": "float16"}, title="Load", pos=(0, 0))
    text = add_node(g, "TextEncode", {"text": "a red circle\non the left — «quoted»"}, title="Prompt",
                    pos=(200, 10.5))
    empty = add_node(g, "EmptyLatent", {"height": 64, "width": 32}, title="Empty", pos=(200, 200))
    sampler = add_node(g, "Sampler", {"seed": 7, "steps": 3, "scheduler": "ddim", "cfg": 2.5},
                       title="Sampler", pos=(400, -20))
    decode = add_node(g, "VAEDecode", {}, pos=(600, 0))
    save_ = add_node(g, "SaveImage", {"prefix": "rt", "embed_graph": False}, title="Save", pos=(800, 0))
    sampler.meta["color"] = "#ff0000"
    g.connect(load_.id, "clip", text.id, "clip")
    g.connect(load_.id, "vae", empty.id, "vae")
    g.connect(load_.id, "model", sampler.id, "model")
    g.connect(text.id, "conditioning", sampler.id, "positive")
    g.connect(empty.id, "latent", sampler.id, "latent")
    g.connect(load_.id, "vae", decode.id, "vae")
    g.connect(sampler.id, "latent", decode.id, "latent")
    g.connect(decode.id, "image", save_.id, "image")
    from app.graph import Group

    g.groups.append(Group(id="grp-1", title="Sampling", nodes=[sampler.id, decode.id],
                          rect=(380.0, -40.0, 400.0, 180.0), color="#224466"))
    return g


# -- round trip ----------------------------------------------------------------------------
def test_round_trip_is_exact(tmp_path):
    g = sample_graph()
    path = tmp_path / "g.loom"
    save(g, path)
    back = load(path, catalog)
    assert dumps(back) == dumps(g)
    assert back.nodes == g.nodes and back.edges == g.edges and back.groups == g.groups
    assert back.meta == g.meta
    # Saving what was loaded gives the same bytes (the format is stable).
    save(back, tmp_path / "again.loom")
    assert (tmp_path / "again.loom").read_bytes() == path.read_bytes()


def test_file_layout_stores_params_by_name(tmp_path):
    g = sample_graph()
    path = tmp_path / "g.loom"
    save(g, path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["format"] == "loomwork.graph" and doc["version"] == FORMAT_VERSION
    sampler = next(n for n in doc["nodes"] if n["type"] == "Sampler")
    assert sampler["params"] == {"seed": 7, "steps": 3, "scheduler": "ddim", "cfg": 2.5}
    assert sampler["version"] == registry.get("Sampler").version
    assert all(set(e) == {"from", "to"} and set(e["to"]) == {"node", "port"} for e in doc["edges"])
    assert doc["groups"][0]["nodes"] == [sampler["id"], doc["groups"][0]["nodes"][1]]
    assert doc["meta"]["author"] == "Zoë"

    # Params are read by name: their order in the file does not matter.
    sampler["params"] = dict(reversed(list(sampler["params"].items())))
    back = loads(json.dumps(doc), catalog)
    assert back.nodes[sampler["id"]].params == {"seed": 7, "steps": 3, "scheduler": "ddim", "cfg": 2.5}


def test_minimal_file_uses_defaults(tmp_path):
    """Optional keys (title, params, pos, meta, edges, groups) may be left out."""
    text = json.dumps({"format": "loomwork.graph", "version": FORMAT_VERSION,
                       "nodes": [{"id": "n1", "type": "EmptyLatent", "version": 1}]})
    g = loads(text, catalog)
    n = g.nodes["n1"]
    assert (n.title, n.params, n.pos, n.meta) == ("", {}, (0.0, 0.0), {})
    assert g.edges == [] and g.groups == [] and g.meta == {}
    assert [(p.node_id, p.message) for p in validate(g, catalog)] == [
        ("n1", "EmptyLatent [n1]: input 'vae' (VAE) is not connected")]


# -- migration -----------------------------------------------------------------------------
def test_v1_file_migrates_edges_and_sampler_params():
    text = OLD_V1.read_text(encoding="utf-8")
    assert json.loads(text)["version"] == 1  # the fixture really is an old file
    g = load(OLD_V1, catalog)
    sampler = g.nodes["6f1c2a7e-0b1d-4c55-9a0e-2b9f3e1d7a04"]
    assert sampler.version == 2 and not sampler.is_placeholder
    assert sampler.params == {"scheduler": "euler_ancestral", "steps": 12, "cfg": 5.5, "seed": 42,
                              "denoise": 1.0}
    assert len(g.edges) == 8
    assert g.input_edge(sampler.id, "positive").src == "6f1c2a7e-0b1d-4c55-9a0e-2b9f3e1d7a02"
    assert g.groups[0].rect == (380.0, -20.0, 200.0, 160.0)
    assert g.meta == {"saved_by": "loomwork 0.0.9"}
    assert validate(g, catalog) == []

    doc = json.loads(dumps(g))
    assert doc["version"] == FORMAT_VERSION == 2
    assert {"from": {"node": "6f1c2a7e-0b1d-4c55-9a0e-2b9f3e1d7a04", "port": "latent"},
            "to": {"node": "6f1c2a7e-0b1d-4c55-9a0e-2b9f3e1d7a05", "port": "latent"}} in doc["edges"]
    rec = next(n for n in doc["nodes"] if n["type"] == "Sampler")
    assert rec["version"] == 2 and "sampler_name" not in rec["params"]
    # ... and the migrated file reads back as itself.
    assert dumps(loads(dumps(g), catalog)) == dumps(g)


def test_v1_edge_strings_split_at_the_last_colon():
    """v1 port names could not hold ':' (why v2 exists); node ids could."""
    doc = json.loads(OLD_V1.read_text(encoding="utf-8"))
    doc["nodes"].append({"id": "x:y", "type": "SomeoneElsesNode", "params": {}})
    doc["edges"].append({"from": "x:y:out", "to": "6f1c2a7e-0b1d-4c55-9a0e-2b9f3e1d7a06:extra"})
    g = loads(json.dumps(doc), catalog)
    assert (g.edges[-1].src, g.edges[-1].src_port) == ("x:y", "out")
    assert g.nodes["x:y"].is_placeholder


@pytest.mark.parametrize("old, new", [("euler_a", "euler_ancestral"), ("dpmpp_2m_karras", "dpmpp_2m"),
                                      ("ddim", "ddim")])
def test_sampler_v1_names(old, new):
    doc = json.loads(OLD_V1.read_text(encoding="utf-8"))
    doc["nodes"][3]["params"]["sampler_name"] = old
    assert loads(json.dumps(doc), catalog).nodes[doc["nodes"][3]["id"]].params["scheduler"] == new


def test_current_sampler_keeps_its_scheduler(tmp_path):
    """A v2 Sampler is not migrated again (its scheduler survives a save and load)."""
    g = sample_graph()
    save(g, tmp_path / "g.loom")
    back = load(tmp_path / "g.loom", catalog)
    assert [n.params.get("scheduler") for n in back.nodes.values() if n.type == "Sampler"] == ["ddim"]


# -- placeholders --------------------------------------------------------------------------
UNKNOWN = {"id": "0a0a0a0a-unknown", "type": "FancyUpscaler9000", "version": 3, "title": "Upscale",
           "params": {"model": "x4.safetensors", "tile": 512, "ratio": 1.5, "opts": {"b": [1, 2.0, None]}},
           "pos": [1000, 20], "meta": {"ui": {"collapsed": True}},
           "extra_field_from_the_future": ["kept", {"as": "is"}]}
NEWER = {"id": "0b0b0b0b-newer", "type": "Sampler", "version": 99, "title": "Future sampler",
         "params": {"scheduler": "warp_drive", "steps": 9, "new_knob": 0.5}, "pos": [10.5, 0], "meta": {}}


def _doc_with(records, extra_edges=()):
    g = sample_graph()
    doc = json.loads(dumps(g))
    decode = next(n["id"] for n in doc["nodes"] if n["type"] == "VAEDecode")
    doc["nodes"].extend(records)
    for rec in records:
        doc["edges"].append({"from": {"node": decode, "port": "image"}, "to": {"node": rec["id"], "port": "image"}})
    doc["edges"].extend(extra_edges)
    return doc


@pytest.mark.parametrize("record", [UNKNOWN, NEWER], ids=["unknown-type", "newer-node-version"])
def test_placeholder_written_back_byte_identical(tmp_path, record):
    doc = _doc_with([record])
    path = tmp_path / "future.loom"
    original = json.dumps(doc, indent=2, ensure_ascii=False)
    path.write_text(original, encoding="utf-8")

    g = load(path, catalog)
    node = g.nodes[record["id"]]
    assert node.is_placeholder and node.type == record["type"]
    problems = [p for p in validate(g, catalog) if p.node_id == node.id]
    assert len(problems) == 1
    assert ("unknown node type" if record is UNKNOWN else "newer") in problems[0].message
    assert len(g.inputs_of(node.id)) == 1  # its wires are kept too

    save(g, tmp_path / "out.loom")
    out_text = (tmp_path / "out.loom").read_text(encoding="utf-8")
    out = json.loads(out_text)
    rec = next(n for n in out["nodes"] if n["id"] == record["id"])
    assert json.dumps(rec) == json.dumps(record)  # not merely equal: 1000 stays 1000, not 1000.0
    # The record's text is the same too, and so is the whole file written by the same formatter.
    block = json.dumps(record, indent=2, ensure_ascii=False).replace("\n", "\n    ")
    assert block in out_text
    assert out_text == original


def test_moved_placeholder_keeps_the_rest_of_its_record(tmp_path):
    doc = _doc_with([UNKNOWN])
    g = loads(json.dumps(doc), catalog)
    g.nodes[UNKNOWN["id"]].pos = (5.0, 6.0)
    rec = next(n for n in json.loads(dumps(g))["nodes"] if n["id"] == UNKNOWN["id"])
    assert rec == {**UNKNOWN, "pos": [5.0, 6.0]}


def test_newer_node_version_problem_names_the_node_and_version():
    g = loads(json.dumps(_doc_with([NEWER])), catalog)
    messages = [p.message for p in validate(g, catalog)]
    assert any("v99" in m and "Future sampler" in m for m in messages)


# -- newer format ----------------------------------------------------------------------------
def test_newer_format_refused_clearly(tmp_path):
    doc = json.loads(dumps(sample_graph()))
    doc["version"] = FORMAT_VERSION + 1
    doc["edges"] = "a shape this build cannot even read"
    path = tmp_path / "new.loom"
    path.write_text(json.dumps(doc))
    with pytest.raises(GraphFileError) as info:
        load(path, catalog)
    message = str(info.value)
    assert str(path) in message
    assert f"format version {FORMAT_VERSION + 1}" in message and "newer Loomwork" in message
    assert "Update Loomwork" in message


# -- PNG ---------------------------------------------------------------------------------------
def _image(color=(200, 30, 30)):
    from PIL import Image

    return Image.new("RGB", (8, 8), color)


def test_png_round_trip(tmp_path):
    g = sample_graph()
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(_image(), dumps(g), extra={"parameters": "a1111 style text"}))
    back = load(path, catalog)
    assert dumps(back) == dumps(g)
    from PIL import Image

    with Image.open(path) as im:  # still an ordinary image
        assert im.size == (8, 8) and im.getpixel((0, 0)) == (200, 30, 30)


@pytest.mark.parametrize("kind", ["itxt-zip", "itxt", "text", "ztxt"])
def test_png_graph_in_any_text_chunk_kind(tmp_path, kind):
    """Other tools re-saving our PNGs may rewrite the chunk as tEXt/zTXt or uncompressed iTXt."""
    from PIL import PngImagePlugin

    g = Graph(meta={"note": "ascii only"})
    add_node(g, "EmptyLatent", {"width": 64}, title="Empty")
    info = PngImagePlugin.PngInfo()
    if kind.startswith("itxt"):
        info.add_itxt("loomwork.graph", dumps(g), zip=kind == "itxt-zip")
    else:
        info.add_text("loomwork.graph", dumps(g), zip=kind == "ztxt")
    path = tmp_path / "k.png"
    _image().save(path, pnginfo=info)
    assert dumps(load(path, catalog)) == dumps(g)


def test_png_with_a_big_graph(tmp_path):
    """Pillow refuses text chunks over 1 MB; a big graph we wrote must still read back."""
    g = sample_graph()
    g.meta["notes"] = [f"note {i}: " + "lorem ipsum dolor sit amet " * 4 for i in range(20_000)]
    text = dumps(g)
    assert len(text) > 2 << 20
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(_image(), text))
    assert dumps(load(path, catalog)) == text


def test_png_with_cut_image_data_still_gives_its_graph(tmp_path):
    data = png_bytes(_image(), dumps(sample_graph()))
    idat = data.index(b"IDAT") - 4
    assert data.index(b"iTXt") < idat  # the graph chunk comes before the image data
    path = tmp_path / "cut.png"
    path.write_bytes(data[: idat + 10])
    assert load(path, catalog).meta["author"] == "Zoë"


def test_png_of_a_v1_graph_is_migrated(tmp_path):
    path = tmp_path / "old.png"
    path.write_bytes(png_bytes(_image(), OLD_V1.read_text(encoding="utf-8")))
    g = load(path, catalog)
    assert g.nodes["6f1c2a7e-0b1d-4c55-9a0e-2b9f3e1d7a04"].params["scheduler"] == "euler_ancestral"


def test_save_image_node_embeds_the_graph(tmp_path):
    """The SaveImage path end to end: LoadImage -> SaveImage through the executor (no model)."""
    from app.engine import Executor

    src = tmp_path / "in.png"
    _image((10, 250, 40)).save(src)
    g = Graph(meta={"title": "copy"})
    load_ = add_node(g, "LoadImage", {"path": str(src)}, title="Load image")
    out = add_node(g, "SaveImage", {"prefix": "copy"}, title="Save", pos=(200, 0))
    g.connect(load_.id, "image", out.id, "image")
    report = Executor(disk_cache=False, device="cpu").run(g, output_dir=tmp_path / "out")
    assert report.ok, report.as_json()
    [written] = report.outputs()
    back = load(written, catalog)
    assert dumps(back) == dumps(g)
    from PIL import Image

    with Image.open(written) as im:
        assert im.convert("RGB").getpixel((3, 3)) == (10, 250, 40)


# -- atomic save -------------------------------------------------------------------------------
def _only_file(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "g.loom"
    save(sample_graph(), path)
    before = path.read_bytes()
    g = sample_graph()
    g.meta["changed"] = True

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(GraphFileError) as info:
        save(g, path)
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert path.read_bytes() == before
    assert _only_file(tmp_path) == ["g.loom"]  # no temporary file left behind


def test_unsavable_param_keeps_the_old_file(tmp_path):
    path = tmp_path / "g.loom"
    save(sample_graph(), path)
    before = path.read_bytes()
    g = sample_graph()
    sampler = next(n for n in g.nodes.values() if n.type == "Sampler")
    g.set_param(sampler.id, "cfg", float("nan"))
    with pytest.raises(GraphFileError) as info:
        save(g, path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert _only_file(tmp_path) == ["g.loom"]


def test_value_json_cannot_hold_keeps_the_old_file(tmp_path):
    path = tmp_path / "g.loom"
    save(sample_graph(), path)
    before = path.read_bytes()
    g = sample_graph()
    g.meta["selection"] = {"a", "set"}  # e.g. a UI stashing a Python object
    with pytest.raises(GraphFileError):
        save(g, path)
    assert path.read_bytes() == before and _only_file(tmp_path) == ["g.loom"]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.loom"
    path.write_bytes(b"\xef\xbb\xbf" + VALID_TEXT.encode("utf-8"))
    assert dumps(load(path, catalog)) == VALID_TEXT


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_save_keeps_normal_file_permissions(tmp_path):
    """An atomic save must not leave the private 0600 of its temporary file behind."""
    mask = os.umask(0o022)
    os.umask(mask)
    path = tmp_path / "g.loom"
    save(sample_graph(), path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    path.chmod(0o640)
    save(sample_graph(), path)
    assert path.stat().st_mode & 0o777 == 0o640


def test_save_into_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(GraphFileError) as info:
        save(sample_graph(), tmp_path / "nope" / "g.loom")
    assert "nope" in str(info.value)


# -- malformed files ---------------------------------------------------------------------------
def _valid_doc() -> dict:
    return json.loads(dumps(sample_graph()))


def _edit(fn):
    doc = _valid_doc()
    fn(doc)
    return json.dumps(doc)


def _nodes(doc):
    return doc["nodes"]


def _png_without_graph():
    buf = io.BytesIO()
    _image().save(buf, format="PNG")
    return buf.getvalue()


def _damaged_png():
    data = png_bytes(_image(), dumps(sample_graph()))
    return data[:8] + bytes(b ^ 0x5A for b in data[8:60])


def _truncated_png():
    """Cut inside the graph's own chunk."""
    data = png_bytes(_image(), dumps(sample_graph()))
    return data[: data.index(b"iTXt") + 40]


def _png_bad_checksum():
    data = bytearray(png_bytes(_image(), dumps(sample_graph())))
    data[data.index(b"iTXt") + 30] ^= 0xFF
    return bytes(data)


def _png_zip_bomb():
    """A graph chunk that inflates far past any real graph."""
    import struct
    import zlib

    z = zlib.compressobj(9)
    block = b" " * (1 << 20)
    packed = b"".join(z.compress(block) for _ in range(80)) + z.flush()
    body = b"loomwork.graph\0" + b"\1\0" + b"\0\0" + packed
    chunk = struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _png_with_bad_graph():
    return png_bytes(_image(), '{"format": "loomwork.graph", "version": 2, "nodes": [')


def _set(path_fn, value):
    """An edit that sets doc[...] = value, where path_fn(doc) returns (container, key)."""
    def fn(doc):
        container, key = path_fn(doc)
        container[key] = value
    return fn


def _del(path_fn):
    def fn(doc):
        container, key = path_fn(doc)
        del container[key]
    return fn


def _sampler(doc):
    return next(n for n in doc["nodes"] if n["type"] == "Sampler")


def _dup_ids(doc):
    doc["nodes"][1]["id"] = doc["nodes"][0]["id"]


def _edge_to_missing_node(doc):
    doc["edges"][0]["to"]["node"] = "no-such-node"


def _wired_twice(doc):
    doc["edges"].append(json.loads(json.dumps(doc["edges"][-1])))


def _v1_edge_without_colon(doc):
    doc["version"] = 1
    doc["edges"] = [{"from": f"{e['from']['node']}:{e['from']['port']}", "to": f"{e['to']['node']}:{e['to']['port']}"}
                    for e in doc["edges"]]
    doc["edges"][2]["from"] = doc["edges"][2]["from"].replace(":", "")


VALID_TEXT = dumps(sample_graph())

# (id, file content as str or bytes, a word the message must contain)
MALFORMED = [
    ("not-json", "hello, I am not a graph", "not valid json"),
    ("truncated-json", VALID_TEXT[: len(VALID_TEXT) // 2], "not valid json"),
    ("empty-file", "", "empty"),
    ("only-whitespace", "  \n\t\n", "empty"),
    ("binary-garbage", bytes((i * 151 + 7) % 256 for i in range(600)), "utf-8"),
    ("not-utf8", '{"format": "loomwork.graph", "version": 2, "meta": {"x": "café"}}'.encode("latin-1"), "utf-8"),
    ("json-null", "null", "top level"),
    ("top-level-list", json.dumps([_valid_doc()]), "top level"),
    ("deeply-nested", "[" * 100_000 + "]" * 100_000, "nested"),
    ("wrong-format", _edit(_set(lambda d: (d, "format"), "comfyui.workflow")), "not a loomwork graph"),
    ("no-format", _edit(_del(lambda d: (d, "format"))), "not a loomwork graph"),
    ("missing-version", _edit(_del(lambda d: (d, "version"))), "'version'"),
    ("version-string", _edit(_set(lambda d: (d, "version"), "2")), "'version'"),
    ("version-zero", _edit(_set(lambda d: (d, "version"), 0)), "'version'"),
    ("version-bool", _edit(_set(lambda d: (d, "version"), True)), "'version'"),
    ("version-float", _edit(_set(lambda d: (d, "version"), 2.0)), "'version'"),
    ("newer-version", _edit(_set(lambda d: (d, "version"), FORMAT_VERSION + 7)), "newer loomwork"),
    ("nodes-not-list", _edit(_set(lambda d: (d, "nodes"), {"a": 1})), "'nodes' should be a list"),
    ("node-not-object", _edit(lambda d: d["nodes"].append("LoadModel")), "node #6 is not an object"),
    ("node-without-id", _edit(_del(lambda d: (d["nodes"][2], "id"))), "node #2 has no string 'id'"),
    ("node-id-number", _edit(_set(lambda d: (d["nodes"][2], "id"), 12)), "node #2 has no string 'id'"),
    ("duplicate-ids", _edit(_dup_ids), "appears twice"),
    ("type-not-string", _edit(_set(lambda d: (d["nodes"][0], "type"), ["LoadModel"])), "'type'"),
    ("node-version-string", _edit(_set(lambda d: (_sampler(d), "version"), "2")), "'version'"),
    ("params-list", _edit(_set(lambda d: (_sampler(d), "params"), [3, 7.0])), "'params' should be an object"),
    ("pos-one-number", _edit(_set(lambda d: (_sampler(d), "pos"), [1])), "'pos'"),
    ("pos-strings", _edit(_set(lambda d: (_sampler(d), "pos"), ["1", "2"])), "'pos'"),
    ("pos-infinite", _edit(_set(lambda d: (_sampler(d), "pos"), [1e400, 0])), "'pos'"),
    ("title-number", _edit(_set(lambda d: (_sampler(d), "title"), 5)), "'title'"),
    ("node-meta-list", _edit(_set(lambda d: (_sampler(d), "meta"), [])), "'meta'"),
    ("meta-list", _edit(_set(lambda d: (d, "meta"), ["a"])), "'meta' should be an object"),
    ("edges-not-list", _edit(_set(lambda d: (d, "edges"), "all of them")), "'edges' should be a list"),
    ("edge-not-object", _edit(lambda d: d["edges"].insert(0, 17)), "edge #0"),
    ("edge-missing-to", _edit(_del(lambda d: (d["edges"][3], "to"))), "edge #3: 'to'"),
    ("edge-port-number", _edit(_set(lambda d: (d["edges"][1]["from"], "port"), 1)), "edge #1: 'from'"),
    ("edge-to-missing-node", _edit(_edge_to_missing_node), "not in the file"),
    ("input-wired-twice", _edit(_wired_twice), "wired twice"),
    ("groups-not-list", _edit(_set(lambda d: (d, "groups"), {})), "'groups' should be a list"),
    ("group-without-id", _edit(_del(lambda d: (d["groups"][0], "id"))), "group #0 has no string 'id'"),
    ("group-rect-wrong", _edit(_set(lambda d: (d["groups"][0], "rect"), [0, 0, 10])), "'rect'"),
    ("group-nodes-wrong", _edit(_set(lambda d: (d["groups"][0], "nodes"), "all")), "'nodes'"),
    ("v1-edge-without-colon", _edit(_v1_edge_without_colon), "node_id:port"),
    ("png-without-graph", _png_without_graph(), "no loomwork graph"),
    ("damaged-png", _damaged_png(), "damaged png"),
    ("truncated-png", _truncated_png(), "damaged png"),
    ("png-bad-checksum", _png_bad_checksum(), "checksum"),
    ("png-zip-bomb", _png_zip_bomb(), "larger than"),
    ("png-signature-only", b"\x89PNG\r\n\x1a\n", "no loomwork graph"),
    ("png-with-bad-graph", _png_with_bad_graph(), "not valid json"),
]


def test_there_are_enough_malformed_cases():
    assert len(MALFORMED) >= 20


@pytest.mark.parametrize("content, needle", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_file(tmp_path, content, needle):
    path = tmp_path / ("bad.png" if isinstance(content, bytes) and content.startswith(b"\x89PNG") else "bad.loom")
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    _assert_clear_error(path, needle)


def test_folder_instead_of_file(tmp_path):
    folder = tmp_path / "graph.loom"
    folder.mkdir()
    _assert_clear_error(folder, "folder")


def test_missing_file(tmp_path):
    _assert_clear_error(tmp_path / "missing.loom", "no such file")


def _assert_clear_error(path: Path, needle: str) -> None:
    with pytest.raises(GraphFileError) as info:  # any other exception fails the test as it is
        load(path, catalog)
    message = str(info.value)
    assert info.value.path == str(path)
    assert message.startswith(f"{path}: "), message
    assert needle.lower() in message.lower(), message
    assert "\n" not in message and "Traceback" not in message
    assert len(message) < len(str(path)) + 300, message  # a sentence, not a dump of the file


def test_malformed_text_without_a_path_still_raises_graph_file_error():
    with pytest.raises(GraphFileError) as info:
        loads("[1, 2]", catalog)
    assert info.value.path is None and "top level" in str(info.value)
