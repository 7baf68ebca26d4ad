#!/usr/bin/env bash
# One short GPU check, for a machine with an NVIDIA GPU (well under 8 minutes there): installs the
# `gpu` extra (faiss-gpu, CUDA 12 wheels) beside the locked torch (CUDA 13), checks that both load
# in one process and see the GPU, runs the demo lake (5,000 Fashion-MNIST images, the demo
# config, every stage on the GPU) and prints each stage's seconds, the device and the ACC.
#
#   bench/gpu_check.sh [OUT_DIR]      # default OUT_DIR: ${OUT:-/tmp/scan-lake-gpu-check}
#
# Needs the registry (or a uv cache holding the wheels) for `uv sync`; writes OUT_DIR/gpu_check.json
# (the run's --json result) and OUT_DIR/gpu_check.txt (what it prints).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-/tmp/scan-lake-gpu-check}}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.txt") 2>&1

export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || python3 -m pip install --quiet --user uv
echo "[gpu_check] $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# the gpu extra replaces faiss-cpu (the default `cpu` group) with faiss-gpu
uv sync --frozen --extra gpu --no-group cpu --quiet
RUN=(uv run --frozen --extra gpu --no-group cpu)

"${RUN[@]}" python - <<'EOF'
import faiss
import numpy as np
import torch

assert torch.cuda.is_available(), "torch sees no CUDA device"
gpus = faiss.get_num_gpus()
print(f"[gpu_check] torch {torch.__version__} (CUDA {torch.version.cuda}) on "
      f"{torch.cuda.get_device_name(0)}; faiss {faiss.__version__} sees {gpus} GPU(s)")
assert gpus > 0, "faiss-gpu sees no GPU: the CUDA 12 faiss wheels did not load beside torch"
x = np.random.default_rng(0).standard_normal((100_000, 128)).astype("float32")
index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(128))
index.add(x)
D, I = index.search(x[:1000], 21)
assert (I[:, 0] == np.arange(1000)).mean() > 0.99
torch.ones(1, device="cuda")  # both CUDA runtimes in one process
print("[gpu_check] faiss-gpu search and torch CUDA in one process: ok")
EOF

start=$(date +%s)
"${RUN[@]}" scan-lake demo --images 5000 --directory "$out/demo" --json "$out/gpu_check.json" \
  --set pretext.device=cuda --set scan.device=cuda --set selflabel.device=cuda
echo "[gpu_check] demo run: $(( $(date +%s) - start )) s wall"

"${RUN[@]}" python - "$out/gpu_check.json" <<'EOF'
import json
import sys

result = json.load(open(sys.argv[1]))
print(f"[gpu_check] ok={result['ok']} seconds={result['seconds']:.1f}")
for record in result["stages"]:
    print(f"[gpu_check]   {record['stage']:<15} {record['seconds']:8.1f} s  cached={record['cached']}")
metrics = result["metrics"]
print(f"[gpu_check] ACC {metrics.get('acc', float('nan')):.4f}  NMI {metrics.get('nmi', float('nan')):.4f}"
      f"  K-means ACC {metrics.get('kmeans_acc', float('nan')):.4f}")
EOF
