#!/usr/bin/env bash
# macOS recipe (for a CI matrix runner, macOS 13+ on arm64 or x86_64, Python 3.11):
#   packaging/macos/build.sh
# Builds Loomwork.app with PyInstaller (the spec adds a BUNDLE on darwin), smoke-tests it, and
# wraps it in a .dmg with dmgbuild. Signing/notarisation need the team's certificates:
# set CODESIGN_IDENTITY to sign; notarise with `xcrun notarytool` afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv build/venv
py=build/venv/bin/python
"$py" -m pip install --upgrade pip
"$py" -m pip install -e ".[package]" dmgbuild
version="$("$py" -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
export LOOMWORK_VERSION="$version"
"$py" -m PyInstaller --noconfirm --clean --distpath build/dist --workpath build/work packaging/loomwork.spec
QT_QPA_PLATFORM=offscreen build/dist/Loomwork.app/Contents/MacOS/loomwork --smoke
if [ -n "${CODESIGN_IDENTITY:-}" ]; then
    codesign --deep --force --options runtime --sign "$CODESIGN_IDENTITY" build/dist/Loomwork.app
fi
build/venv/bin/dmgbuild -s packaging/macos/dmg_settings.py -D app=build/dist/Loomwork.app \
    "Loomwork" "build/loomwork-$version-macos-$(uname -m).dmg"
ls -lh build/*.dmg
