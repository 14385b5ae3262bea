#!/usr/bin/env bash
# Loomwork's one entry point for people and CI. Each command installs what it needs first.
#   ./loom.sh render   render resources/graphs/default.loom headless into ./out/
#   ./loom.sh test     run the test suite
#   ./loom.sh lint     ruff over the tree (CI runs it before the tests)
#   ./loom.sh app      open the desktop app
#   ./loom.sh bench    run the benchmarks (JSON to stdout)
#   ./loom.sh env      only install the environment; prints its folder
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# One venv per machine, shared by clones: torch alone is ~5 GB, so a clone must not install its own.
venv="${LOOMWORK_VENV:-$HOME/.cache/loomwork/venv}"
python="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# On 2 cores, OpenMP spin-waiting makes torch far slower under load.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

ensure_env() {
    if [ ! -x "$venv/bin/python" ]; then
        echo "loom.sh: creating the Python environment in $venv (first run: several minutes)" >&2
        mkdir -p "$(dirname "$venv")"
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
    fi
    local stamp="$venv/.loomwork-deps" want
    want="$(sha256sum "$repo/pyproject.toml" | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "loom.sh: installing dependencies (torch is large; this takes a few minutes)" >&2
        "$venv/bin/python" -m pip install -q -e "$repo[test]"
        echo "$want" > "$stamp"
    elif ! (cd / && "$venv/bin/python" -c "import app, os, sys; sys.exit(os.path.dirname(os.path.dirname(app.__file__)) != sys.argv[1])" "$repo") 2>/dev/null; then
        # Same dependencies, different clone: point the editable install here. (The check runs
        # from / so that the current folder's own app/ package cannot answer for the install.)
        "$venv/bin/python" -m pip install -q --no-deps -e "$repo"
    fi
}

cmd="${1:-help}"; shift || true
case "$cmd" in
    render)
        ensure_env
        mkdir -p "$repo/out"
        "$venv/bin/loomwork" run "$repo/resources/graphs/default.loom" --out "$repo/out" "$@"
        ;;
    test)
        ensure_env
        cd "$repo"
        QT_QPA_PLATFORM=offscreen "$venv/bin/python" -m pytest -q "$@"
        ;;
    lint)
        ensure_env
        cd "$repo"
        "$venv/bin/ruff" check . "$@"
        ;;
    app)
        ensure_env
        "$venv/bin/loomwork" "$@"
        ;;
    env)
        ensure_env
        echo "$venv"
        ;;
    bench)
        ensure_env
        cd "$repo"
        for b in bench/*.py; do "$venv/bin/python" "$b" "$@"; done
        ;;
    *)
        sed -n '2,9p' "$0"
        ;;
esac
