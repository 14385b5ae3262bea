"""Edit > Preferences: folders, cache, device and memory, saved and given to the engine."""

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("NodeGraphQt")

pytestmark = pytest.mark.filterwarnings("ignore:Function.*is marked as deprecated:DeprecationWarning")


def test_preferences_are_saved_and_the_next_engine_uses_them(window, tmp_path, monkeypatch):
    from app.ui import session
    from app.ui.preferences import PreferencesDialog

    monkeypatch.delenv("LOOMWORK_OUTPUT_DIR")
    dialog = PreferencesDialog(window.runner, window)
    dialog.models.add_folder(str(tmp_path / "ComfyUI"))
    dialog.output.setText(str(tmp_path / "pictures"))
    dialog.cache_folder.setText(str(tmp_path / "results"))
    dialog.cache_budget.setText("0.5")
    dialog.ram_budget.setText("6G")
    dialog.device.setCurrentText("cpu")
    before = window.runner.executor()
    dialog.accept()
    assert session.model_folders() == [str(tmp_path / "ComfyUI")]
    assert session.default_output_dir() == tmp_path / "pictures"
    engine = window.runner.executor()
    assert engine is not before  # rebuilt for the next run
    assert engine.device == "cpu" and engine.disk.root == tmp_path / "results"
    assert engine.disk.budget == 1 << 29 and engine.models.ram_budget == 6 << 30
    assert engine.model_roots[0] == str(tmp_path / "ComfyUI")


def test_bad_values_are_refused_with_the_reason(window):
    from app.ui.preferences import PreferencesDialog

    dialog = PreferencesDialog(window.runner, window)
    dialog.ram_budget.setText("lots")
    dialog.accept()
    assert dialog.result() != dialog.DialogCode.Accepted  # not saved
    assert "memory for models" in dialog.problem.text()
    dialog.ram_budget.setText("")
    dialog.cache_budget.setText("-1")
    assert "cache size" in dialog.check()


def test_the_cache_shows_its_size_and_clears(window, tmp_path):
    from app.engine.cache import DiskCache
    from app.ui.preferences import PreferencesDialog

    cache = DiskCache(tmp_path / "results")
    cache.put("k" * 40, {"out": "h"}, {"out": 1})
    dialog = PreferencesDialog(window.runner, window)
    dialog.cache_folder.setText(str(tmp_path / "results"))
    dialog.refresh_cache_size()
    assert "holds" in dialog.cache_size.text() and cache.size_bytes() > 0
    dialog.clear_cache()
    assert cache.size_bytes() == 0 and "Cleared" in dialog.problem.text()


def test_file_name_pattern_and_theme_are_saved_and_a_bad_pattern_is_refused(window):
    from PySide6 import QtWidgets

    from app.ui import session, theme
    from app.ui.preferences import PreferencesDialog
    from app.ui.run_queue import NAME_PATTERN_KEY

    dialog = PreferencesDialog(window.runner, window)
    assert dialog.name_pattern.text() == "{prefix}_{counter:05}"
    assert dialog.name_example.text() == "e.g. loomwork_00001.png"  # the names the engine always gave
    dialog.name_pattern.setText("{graph}_{node}_{seed}_{counter:05}")
    assert dialog.name_example.text() == "e.g. portrait_Save-Image_42_00001.png"
    dialog.name_pattern.setText("{graph}_{nope}_{counter:05}")
    assert "unknown field {nope}" in dialog.name_example.text()
    dialog.accept()
    assert dialog.result() != dialog.DialogCode.Accepted and "unknown field" in dialog.problem.text()
    dialog.name_pattern.setText("{graph}_{seed}_{counter:05}")
    dialog.theme.setCurrentText("light")
    dialog.accept()
    assert session.settings().value(NAME_PATTERN_KEY) == "{graph}_{seed}_{counter:05}"
    app = QtWidgets.QApplication.instance()
    try:
        assert theme.saved_theme() == "light" and theme.apply.name == "light"
        assert app.palette().window().color().name() == theme.LIGHT["BG"]
        assert theme.LIGHT["TEXT"] in app.styleSheet()
        # the toolbar's icons were drawn again in the light theme's text colour
        pixmap = window.act_run.icon().pixmap(32, 32).toImage()
        colours = {pixmap.pixelColor(x, y).name() for x in range(32) for y in range(32) if pixmap.pixelColor(x, y).alpha() == 255}
        assert theme.LIGHT["TEXT"] in colours
    finally:
        theme.apply(app, "dark")


def test_the_interface_scale_is_saved_and_applies_at_the_next_start(window, monkeypatch):
    import os

    from app.ui import _apply_ui_scale, session
    from app.ui.preferences import PreferencesDialog

    dialog = PreferencesDialog(window.runner, window)
    assert dialog.scale.currentText() == "system"
    dialog.scale.setCurrentText("2")
    dialog.accept()
    assert session.ui_scale() == "2"
    monkeypatch.delenv("QT_SCALE_FACTOR", raising=False)
    _apply_ui_scale()  # what the next start does before Qt is up
    assert os.environ["QT_SCALE_FACTOR"] == "2"
    monkeypatch.setenv("QT_SCALE_FACTOR", "1.5")  # one set by hand wins
    _apply_ui_scale()
    assert os.environ["QT_SCALE_FACTOR"] == "1.5"
    again = PreferencesDialog(window.runner, window)
    again.scale.setCurrentText("system")
    again.accept()
    assert session.ui_scale() == ""
