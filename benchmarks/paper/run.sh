#!/usr/bin/env bash
# Issue 11 section 3 and issue 12: the paper's protocol (masked linear head, SGD 0.9 at lr 1e-2, 20 epochs,
# augmentation; the batch shrinks with the data so each class keeps its optimizer steps) on the mnist suite:
# SD-LoRA, its peers and the paper's ablation, 3 seeds, one sdlora-cil process.
# The rates are the preset's one change: SGD at the paper's lr 1e-2 diverges on DINOv2-S (its pooled features have a
# norm of about 71, so one head step moves a logit by about lr * |f|^2 = 50; the loss swung between 0 and 36 and every
# task ended at 50% training accuracy); 1e-3 for the adapters and the head.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/study.sh
run_study benchmarks/paper/mnist --protocol paper --model dinov2-small --image-size 56 --layers 8,9,10,11 --dataset mnist \
  --lr 1e-3 --head-lr 1e-3 --num-tasks 5 --max-train-per-class 40 --max-test-per-class 200 --seeds 0,1,2 \
  --methods sdlora,inflora,olora,lora-seq,ablation-single,ablation-first,ablation-fixed
