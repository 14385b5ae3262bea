#!/usr/bin/env bash
# Build Loomwork's Linux installers: a PyInstaller one-dir bundle, then a .deb and a .tar.gz
# from it. Smoke-tests the bundle and the .deb (unpacked with dpkg -x into a scratch root) and
# fails if either fails. Prints the artifacts with their sizes, and timings as JSON.
#
#   packaging/build.sh [--skip-smoke]
#
# Output: build/dist/loomwork/ (bundle), build/loomwork_<version>_amd64.deb,
#         build/loomwork-<version>-linux-x86_64.tar.gz, build/packaging-report.json
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
skip_smoke=0
[ "${1:-}" = "--skip-smoke" ] && skip_smoke=1

venv="$(./loom.sh env | tail -1)"
"$venv/bin/python" -m pip install -q -e "$repo[test,package]"
py="$venv/bin/python"
version="$("$py" -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
out="$repo/build"
mkdir -p "$out"
t0=$(date +%s)

echo "== PyInstaller bundle"
# No --clean: PyInstaller's analysis cache (build/work) makes a rebuild minutes faster.
"$py" -m PyInstaller --noconfirm --log-level WARN \
    --distpath "$out/dist" --workpath "$out/work" packaging/loomwork.spec
bundle="$out/dist/loomwork"
t_bundle=$(date +%s)

smoke() {  # $1: the loomwork executable
    echo "== smoke: $1"
    local tmp; tmp="$(mktemp -d)"
    # A clean environment: nothing from our venv or repo may leak into the frozen app.
    env -i HOME="$tmp" PATH=/usr/bin:/bin QT_QPA_PLATFORM=offscreen LOOMWORK_CACHE_DIR="$tmp/cache" \
        "$1" --smoke
    rm -rf "$tmp"
}
[ $skip_smoke = 1 ] || smoke "$bundle/loomwork"
t_smoke1=$(date +%s)

echo "== .tar.gz"
tarball="$out/loomwork-$version-linux-$(uname -m).tar.gz"
tar -C "$out/dist" -cf - loomwork | gzip -1 > "$tarball"

echo "== .deb"
stage="$out/deb"
rm -rf "$stage"
mkdir -p "$stage/DEBIAN" "$stage/opt" "$stage/usr/bin" "$stage/usr/share/applications" \
         "$stage/usr/share/icons/hicolor/256x256/apps" "$stage/usr/share/icons/hicolor/scalable/apps" \
         "$stage/usr/share/mime/packages"
cp -a "$bundle" "$stage/opt/loomwork"
ln -s /opt/loomwork/loomwork "$stage/usr/bin/loomwork"
cp packaging/linux/loomwork.desktop "$stage/usr/share/applications/"
cp packaging/linux/loomwork-mime.xml "$stage/usr/share/mime/packages/loomwork.xml"
cp resources/icons/loomwork.png "$stage/usr/share/icons/hicolor/256x256/apps/loomwork.png"
[ -f resources/icons/loomwork.svg ] && cp resources/icons/loomwork.svg "$stage/usr/share/icons/hicolor/scalable/apps/"
installed_kb=$(du -sk "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$installed_kb/" \
    packaging/linux/control.in > "$stage/DEBIAN/control"
install -m 755 packaging/linux/postinst "$stage/DEBIAN/postinst"
install -m 755 packaging/linux/postinst "$stage/DEBIAN/postrm"
deb="$out/loomwork_${version}_${arch}.deb"
# gzip -1: the payload is mostly already-compressed shared libraries; xz would take many minutes.
dpkg-deb --root-owner-group -Zgzip -z1 --build "$stage" "$deb" >/dev/null
t_pkg=$(date +%s)

if [ $skip_smoke = 0 ]; then
    scratch="$(mktemp -d)"
    dpkg -x "$deb" "$scratch"
    smoke "$scratch/opt/loomwork/loomwork"
    rm -rf "$scratch"
fi
t_end=$(date +%s)

bundle_mb=$(du -sm "$bundle" | cut -f1)
size() { du -m "$1" | cut -f1; }
echo
echo "artifacts:"
printf '  %s  %s MB\n' "$bundle/" "$bundle_mb" "$tarball" "$(size "$tarball")" "$deb" "$(size "$deb")"
cat > "$out/packaging-report.json" <<JSON
{"version": "$version", "bundle_mb": $bundle_mb, "installed_mb": $((installed_kb / 1024)),
 "tar_gz_mb": $(size "$tarball"), "deb_mb": $(size "$deb"),
 "seconds": {"bundle": $((t_bundle - t0)), "smoke_bundle": $((t_smoke1 - t_bundle)),
             "tar_and_deb": $((t_pkg - t_smoke1)), "smoke_deb": $((t_end - t_pkg)), "total": $((t_end - t0))},
 "glibc_of_build_machine": "$(ldd --version | head -1 | awk '{print $NF}')"}
JSON
cat "$out/packaging-report.json"
