#!/usr/bin/env bash
# Set up rustforge on a fresh Debian machine: system packages (bubblewrap for the sandbox, Rust crate
# sources for the corpus), a virtual environment in .venv with the CPU build of torch, and the package.
# Idempotent: a second run only checks. GPU machines: see README ("GPU install").
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v bwrap >/dev/null || need_apt+=(bubblewrap)      # the sandbox for untrusted Rust
command -v prlimit >/dev/null || need_apt+=(util-linux)   # prlimit/setpriv for the sandbox's limits
command -v chromium >/dev/null || need_apt+=(chromium)    # renders the run report in its test
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done < scripts/debian-crates.txt
if ((${#need_apt[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build these machines provide; an unpinned torch pulls CUDA.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,cpu-kernel-tests]"  # the CPU build: see pyproject.toml
echo "rustforge set up: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
