# dmgbuild settings (https://dmgbuild.readthedocs.io): the app and an Applications link.
import os

application = defines.get("app", "build/dist/Loomwork.app")  # noqa: F821 (dmgbuild injects `defines`)
appname = os.path.basename(application)
format = "UDZO"
size = None
files = [application]
symlinks = {"Applications": "/Applications"}
icon_locations = {appname: (140, 160), "Applications": (420, 160)}
window_rect = ((200, 200), (560, 340))
default_view = "icon-view"
icon_size = 96
