"""Models folders in the app: the setting (File > Models Folders), the searchable picker a model
path offers in the inspector, and the runner finding `ckpt:` names in those folders."""

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("NodeGraphQt")

pytestmark = pytest.mark.filterwarnings("ignore:Function.*is marked as deprecated:DeprecationWarning")

from conftest import load_and_encode_on_canvas  # noqa: E402
from PySide6 import QtWidgets  # noqa: E402
from test_model_folders import LORA_KEYS, SD1_KEYS, SDXL_KEYS, write_safetensors  # noqa: E402

from kernels.model_folders import CHECKPOINT_KINDS  # noqa: E402


@pytest.fixture
def comfy(tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    write_safetensors(models / "checkpoints" / "dreamshaper.safetensors", SD1_KEYS)
    write_safetensors(models / "checkpoints" / "sdxl" / "juggernaut.safetensors", SDXL_KEYS)
    write_safetensors(models / "loras" / "detail.safetensors", LORA_KEYS)
    return tmp_path / "ComfyUI"


def open_picker(qtbot, kinds=CHECKPOINT_KINDS, current=""):
    from app.ui.model_picker import ModelPicker

    picker = ModelPicker(kinds, current)
    qtbot.addWidget(picker)
    qtbot.waitUntil(lambda: not picker.scanning, timeout=10000)
    return picker


def shown_names(picker):
    t = picker.table
    return sorted(t.topLevelItem(i).text(0) for i in range(t.topLevelItemCount()) if not t.topLevelItem(i).isHidden())


def test_the_setting_keeps_folders_and_adds_the_environments(window, comfy, tmp_path, monkeypatch):
    from app.ui import session

    assert session.model_folders() == []
    session.set_model_folders([str(comfy)])
    assert session.model_folders() == [str(comfy)]  # a one-item list survives QSettings
    monkeypatch.setenv("LOOMWORK_MODELS", str(tmp_path / "other"))
    assert session.all_model_roots() == [str(comfy), str(tmp_path / "other")]


def test_the_picker_lists_only_the_kinds_asked_for_and_filters_by_any_column(window, comfy, qtbot):
    from app.ui import session

    session.set_model_folders([str(comfy)])
    picker = open_picker(qtbot)
    assert shown_names(picker) == ["dreamshaper.safetensors", "sdxl/juggernaut.safetensors"]  # no LoRA
    picker.filter.setText("sdxl")  # the family column matches too
    assert shown_names(picker) == ["sdxl/juggernaut.safetensors"]
    assert picker.chosen() == "ckpt:sdxl/juggernaut.safetensors"
    picker.filter.setText("nothing like it")
    assert shown_names(picker) == [] and picker.chosen() is None and not picker.ok.isEnabled()
    loras = open_picker(qtbot, kinds=("lora",))
    assert shown_names(loras) == ["detail.safetensors"]


def test_the_picker_without_folders_says_how_to_add_them(window, qtbot):
    picker = open_picker(qtbot)
    assert shown_names(picker) == [] and "Models Folders" in picker.status.text()


def test_a_model_path_in_the_inspector_is_chosen_from_the_picker(window, comfy, qtbot, monkeypatch):
    from app.ui import model_picker, session

    session.set_model_folders([str(comfy)])
    doc, load, _text = load_and_encode_on_canvas(window)
    window.canvas.select([load])
    field = window.inspector.fields["path"]
    assert field.models is not None  # LoadModel's path names models; SaveImage's folder would not

    def pick(self):
        qtbot.waitUntil(lambda: not self.scanning, timeout=10000)
        self.filter.setText("dreamshaper")
        return QtWidgets.QDialog.Accepted

    monkeypatch.setattr(model_picker.ModelPicker, "exec", pick)
    field.choose_model()
    assert doc.graph.nodes[load].params["path"] == "ckpt:dreamshaper.safetensors"


def test_the_runner_finds_ckpt_names_in_the_folders_set_in_the_app(window, comfy, monkeypatch):
    from app.ui import model_picker

    def accept(self):
        self.add_folder(str(comfy))
        self.accept()
        return QtWidgets.QDialog.Accepted

    monkeypatch.setattr(model_picker.ModelFoldersDialog, "exec", accept)
    window.edit_model_folders()
    executor = window.runner.executor()
    assert executor.model_roots == [str(comfy)]
    found = executor.resolve_path("ckpt:dreamshaper.safetensors")
    assert found == str(comfy / "models" / "checkpoints" / "dreamshaper.safetensors")
    assert executor.resolve_path("ckpt:detail.safetensors", kinds=("lora",)).endswith("detail.safetensors")
