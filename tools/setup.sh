#!/usr/bin/env bash
# mmoc set-up on a fresh Debian/Ubuntu machine: system packages, a Python venv holding the
# torch==2.11.0 wheel (LibTorch for the engine), then prints the environment to build with.
# Idempotent and cached: the venv and pip cache live under ~/.cache/mmoc, keyed by requirements.txt,
# so repeated runs on one machine reuse them and a fresh machine installs from nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${MMOC_CACHE:-$HOME/.cache/mmoc}"
mkdir -p "$cache"
log() { echo "[setup] $*" >&2; }

need_pkgs=(build-essential cmake ninja-build ccache pkg-config nlohmann-json3-dev libcli11-dev doctest-dev
           libboost-graph-dev libsentencepiece-dev sentencepiece libgloo-dev python3-venv chromium
           liburing-dev)
missing=()
for p in "${need_pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "${MMOC_SKIP_APT:-0}" = 1 ]; then log "missing packages (MMOC_SKIP_APT=1): ${missing[*]}";
  else
    log "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" > "$cache/apt.log" 2>&1 || { cat "$cache/apt.log" >&2; exit 1; }
  fi
fi

# The venv is keyed by the torch pin (the large part); the rest of requirements.txt is installed into it
# on top, a quick no-op when already satisfied.
key=$(grep -E '^torch==' "$here/requirements.txt" | sha256sum | cut -c1-12)
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  log "creating venv $venv (the torch wheel is large; pip cache in $cache/pip)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  PIP_CACHE_DIR="$cache/pip" "$venv/bin/python" -m pip install -q --upgrade pip >&2
  PIP_CACHE_DIR="$cache/pip" "$venv/bin/python" -m pip install -q "$(grep -E '^torch==' "$here/requirements.txt")" >&2
  touch "$venv/.complete"
fi
stamp="$venv/.req-$(sha256sum "$here/requirements.txt" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "installing requirements.txt into $venv"
  PIP_CACHE_DIR="$cache/pip" "$venv/bin/python" -m pip install -q -r "$here/requirements.txt" >&2
  touch "$stamp"
fi
ln -sfn "$venv" "$cache/venv"
echo "$venv"
