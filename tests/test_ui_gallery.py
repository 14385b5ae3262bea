"""The gallery (lazy thumbnails off the UI thread, labels, drag out, open folder), the large
viewer, the compare views and the icon toolbar."""

import threading

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("NodeGraphQt")

pytestmark = pytest.mark.filterwarnings("ignore:Function.*is marked as deprecated:DeprecationWarning")


def _pngs(folder, n, size=(96, 64)):
    from PySide6 import QtGui

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        image = QtGui.QImage(size[0], size[1], QtGui.QImage.Format_RGB32)
        image.fill(QtGui.QColor((k * 37) % 256, (k * 91) % 256, 128))
        path = folder / f"img_{k:05d}.png"
        assert image.save(str(path))
        paths.append(str(path))
    return paths


def _solid(color, w=64, h=48):
    from PySide6 import QtGui

    image = QtGui.QImage(w, h, QtGui.QImage.Format_RGB32)
    image.fill(QtGui.QColor(color))
    return image


def test_thumbnails_load_in_worker_threads_only_for_what_is_on_screen(qtbot, tmp_path):

    from app.ui.gallery import GalleryPanel, ThumbnailLoader

    paths = _pngs(tmp_path / "out", 150)
    loader = ThumbnailLoader(side=48)
    threads = []
    loader.on_ready(lambda p, i: threads.append(threading.current_thread()))  # delivered on the UI thread
    original = ThumbnailLoader.load
    loaded_in = []

    def load(path, side):
        loaded_in.append(threading.current_thread().name)
        return original(path, side)

    loader.load = load
    panel = GalleryPanel(None, loader, output_dir=lambda: tmp_path / "out")
    qtbot.addWidget(panel)
    panel.resize(400, 300)
    panel.show()
    qtbot.waitExposed(panel)
    assert panel.count.text() == "150 images"
    qtbot.waitUntil(lambda: loader.pending() == 0 and len(loader._cache) > 0, timeout=20_000)
    first = len(loader._cache)
    assert 0 < first < 150  # only the rows the view showed were asked for
    assert set(loaded_in) == {"loomwork-thumbnails"}
    assert all(t is threading.main_thread() for t in threads)
    thumb = loader.get(paths[-1]) or loader.get(panel.model.entries[0].path)
    assert thumb is not None and max(thumb.width(), thumb.height()) == 48  # shrunk, aspect kept
    assert thumb.width() == 48 and thumb.height() == 32
    panel.view.scrollToBottom()
    last = panel.model.entries[-1].path
    qtbot.waitUntil(lambda: loader.get(last) is not None, timeout=20_000)
    icon = panel.model.item(149).icon()
    assert loader.get(last).size() == icon.availableSizes()[0]  # the item shows its thumbnail
    panel.filter.setText("img_00007")
    assert [e.path for e in panel.model.entries] == [paths[7]]
    loader.stop()


def test_one_drain_tick_hands_over_a_bounded_batch_of_thumbnails(qtbot, tmp_path):
    """Many thumbnails finished at once are handed to the view a bounded batch per UI tick, so
    the event loop is not held while hundreds become pixmaps; the rest follow on later ticks."""
    import time

    from app.ui.gallery import ThumbnailLoader

    paths = _pngs(tmp_path / "out", 60, size=(32, 32))
    loader = ThumbnailLoader(side=16)
    seen = []
    loader.on_ready(lambda p, i: seen.append(p))
    for p in paths:
        loader.request(p)
    end = time.monotonic() + 30
    while loader.pending() and time.monotonic() < end:  # no event processing: the drain waits
        time.sleep(0.01)
    assert loader.pending() == 0 and len(loader._done) == 60
    handled = loader._drain()
    assert 1 <= handled <= ThumbnailLoader.DRAIN_MAX < 60
    assert len(seen) == handled and len(loader._cache) == handled
    qtbot.waitUntil(lambda: len(seen) == 60, timeout=10_000)  # the timer drains the rest
    assert sorted(seen) == sorted(paths)
    loader.stop()


def test_gallery_labels_come_from_the_history_and_files_drag_out_and_show_their_folder(qtbot, tmp_path):
    from PySide6 import QtCore, QtGui

    from app.ui.gallery import GalleryPanel, ThumbnailLoader
    from app.ui.history import HistoryStore, RunRecord
    from app.ui.image_viewer import file_mime

    paths = _pngs(tmp_path / "out", 3)
    store = HistoryStore(tmp_path / "history")
    store.add(RunRecord(id="20260101-000000-aaaa", graph_text='{"nodes": []}', status="done",
                        graph_path="/x/portrait.loom", overrides={"seeds": {"s": 42}},
                        outputs=[{"node": "n1", "title": "Save Image", "path": paths[1]}], ended_at=1e10))
    panel = GalleryPanel(store, ThumbnailLoader(side=32), output_dir=lambda: tmp_path / "out")
    qtbot.addWidget(panel)
    panel.show()
    labels = [e.label() for e in panel.model.entries]
    assert labels[0] == "portrait · Save Image\nseed 42"  # from the history, newest first
    assert sorted(labels[1:]) == ["img_00000.png", "img_00002.png"]  # the rest: file names
    panel.source.setCurrentText("History")
    assert [e.path for e in panel.model.entries] == [paths[1]]

    mime = file_mime([paths[1]])
    assert [u.toLocalFile() for u in mime.urls()] == [paths[1]] and mime.urls()[0].scheme() == "file"

    class Catch(QtCore.QObject):
        urls = []

        @QtCore.Slot(QtCore.QUrl)
        def open(self, url):
            self.urls.append(url)

    catch = Catch()
    QtGui.QDesktopServices.setUrlHandler("file", catch, "open")
    try:
        panel.select_rows([0])
        assert panel.folder_btn.isEnabled() and not panel.compare_btn.isEnabled()
        panel.folder_btn.click()
    finally:
        QtGui.QDesktopServices.unsetUrlHandler("file")
    assert [u.toLocalFile() for u in catch.urls] == [str(tmp_path / "out")]


def test_the_large_viewer_steps_through_the_gallery(qtbot, tmp_path):
    from app.ui.gallery import GalleryPanel, ThumbnailLoader

    paths = _pngs(tmp_path / "out", 3, size=(40, 30))
    panel = GalleryPanel(None, ThumbnailLoader(side=32), output_dir=lambda: tmp_path / "out")
    qtbot.addWidget(panel)
    panel.show()
    viewer = panel.open_large(1)
    qtbot.addWidget(viewer)
    assert viewer.path() == panel.model.entries[1].path
    assert "2/3" in viewer.caption.text() and "40×30" in viewer.caption.text()
    viewer.step(1)
    viewer.step(1)
    assert viewer.path() == panel.model.entries[0].path  # wraps around
    assert viewer.view.zoom() > 1  # a small image is fitted up to the window
    assert set(paths) == {e.path for e in panel.model.entries}


def test_the_ab_slider_shows_a_left_of_the_line_and_b_right_of_it(qtbot):
    from app.ui.compare import SliderCompare

    view = SliderCompare()
    qtbot.addWidget(view)
    view.resize(400, 300)
    view.set_images(_solid("#ff0000"), _solid("#0000ff"))
    view.show()
    qtbot.waitExposed(view)

    def colour_at(fx):
        return view.grab().toImage().pixelColor(int(400 * fx), 200).name()

    view.set_split(0.3)
    assert colour_at(0.15) == "#ff0000" and colour_at(0.6) == "#0000ff"
    view.set_split(0.9)
    assert colour_at(0.6) == "#ff0000"
    rect = view.image_rect()
    view.zoom_at(2.0, rect.center())
    assert view.image_rect().width() == pytest.approx(rect.width() * 2)
    assert view.image_rect().center().x() == pytest.approx(rect.center().x())  # zoomed about the point


def test_side_by_side_zooms_both_and_the_window_swaps(qtbot):
    from app.ui.compare import SIDE_BY_SIDE, CompareWindow

    window = CompareWindow(_solid("#ff0000"), _solid("#00ff00", 128, 96), ("red", "green"), mode=SIDE_BY_SIDE)
    qtbot.addWidget(window)
    window.show()
    a, b = window.side.views
    assert b.item.pixmap().width() == 64  # B is drawn at A's size
    a.set_zoom(3.0)
    assert b.zoom() == pytest.approx(3.0)
    window.swap()
    assert window.labels == ("green", "red") and window.slider.labels == ("green", "red")
    window.mode.setCurrentText("A/B slider")
    assert window.stack.currentWidget() is window.slider


def test_the_toolbar_has_an_icon_and_a_tooltip_for_every_action(window):
    tb = window.toolbar
    actions = [a for a in tb.actions() if not a.isSeparator() and a.text()]
    assert {window.act_run, window.act_gallery, window.act_history, window.act_preferences} <= set(actions)
    for a in actions:
        assert not a.icon().isNull(), a.text()
        assert a.toolTip(), a.text()
    assert "(Ctrl+H)" in window.act_history.toolTip()
    window.act_gallery.trigger()
    assert window.gallery_dock.isVisible()
    window.act_history.trigger()
    assert window.history_dock.isVisible() and window.gallery_dock in window.tabifiedDockWidgets(window.history_dock)


def test_compare_last_two_names_each_side_once(window, qtbot):
    """The slider's tags read "A · Save (older)", not "A · A: Save (older)"."""
    from PySide6 import QtWidgets

    from app.ui.compare import CompareWindow

    window.images.add_image(_solid("#ff0000"), "Save")
    window.images.add_image(_solid("#00ff00"), "Save")
    window.compare_last_two()
    shown = [w for w in QtWidgets.QApplication.topLevelWidgets() if isinstance(w, CompareWindow) and w.isVisible()]
    assert len(shown) == 1
    assert shown[0].labels == ("Save (older)", "Save (latest)")
    assert shown[0].side.captions[0].text() == "A · Save (older)"
    shown[0].close()
