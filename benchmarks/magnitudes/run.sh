#!/usr/bin/env bash
# Issue 11, section 4: SD-LoRA's magnitudes at freeze ("preserve": the update's norm; "normalized": 1, the norm kept
# in the frozen scale) and a learning rate of their own, on bench_accuracy.py's mnist suite (both settings) and its
# banking77 suite (42 optimizer steps a task against mnist's 9), 3 seeds; and old magnitudes held fixed (the paper's
# ablation-fixed) on banking77 at both rates. One sdlora-cil process per variant (later options win); the "preserve"
# rows at the shared rate are bench_accuracy's own runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
COMMON=(--epochs 3 --batch-size 32 --seeds 0,1,2 --methods sdlora@aligned-sdc,sdlora@ranpac)
MNIST=(--model dinov2-small --image-size 56 --layers 8,9,10,11 --dataset mnist --num-tasks 5
       --max-train-per-class 40 --max-test-per-class 200)
BANKING77=(--model minilm --max-length 32 --dropout 0 --layers 4,5 --dataset banking77 --num-tasks 7
           --max-train-per-class 40)
SLOW=(--lr 1e-4 --head-lr 1e-3)
FAST=(--lr 1e-3 --head-lr 1e-2)
FIXED=(--methods ablation-fixed@aligned-sdc,ablation-fixed@ranpac)
source benchmarks/study.sh
run() { run_study "benchmarks/magnitudes/$1" "${COMMON[@]}" "${@:2}"; }  # name, options...
run fast-normalized                   "${MNIST[@]}" "${FAST[@]}" --freeze-scale normalized
run fast-normalized-mlr1e-2           "${MNIST[@]}" "${FAST[@]}" --freeze-scale normalized --magnitude-lr 1e-2
run slow-normalized                   "${MNIST[@]}" "${SLOW[@]}" --freeze-scale normalized
run slow-normalized-mlr1e-2           "${MNIST[@]}" "${SLOW[@]}" --freeze-scale normalized --magnitude-lr 1e-2
run banking77-slow-normalized         "${BANKING77[@]}" "${SLOW[@]}" --freeze-scale normalized
run banking77-slow-normalized-mlr1e-2 "${BANKING77[@]}" "${SLOW[@]}" --freeze-scale normalized --magnitude-lr 1e-2
run banking77-slow-fixed             "${BANKING77[@]}" "${SLOW[@]}" "${FIXED[@]}"
run banking77-fast-fixed             "${BANKING77[@]}" "${FAST[@]}" "${FIXED[@]}"
