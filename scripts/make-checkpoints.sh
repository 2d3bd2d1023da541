#!/usr/bin/env bash
# The exact commands that made the shipped checkpoints (CPU, 2 cores). Run from the repo root
# after `make demo` or `make test` has created .venv.
set -euo pipefail
ml() { .venv/bin/python -m modellego "$@"; }
mkdir -p checkpoints/fashion-mnist checkpoints/digits
ml train vgg16_bn --dataset digits --width 0.5 --epochs 60 --seed 0 --quiet \
   --out checkpoints/digits/vgg16_bn.safetensors
ml train vgg16_bn --dataset fashion-mnist --width 0.5 --epochs 12 --seed 0 --quiet \
   --out checkpoints/fashion-mnist/vgg16_bn.safetensors
ml train vgg16_bn --dataset fashion-mnist --classes 0-4 --width 0.5 --epochs 12 --seed 0 --quiet \
   --out checkpoints/fashion-mnist/vgg16_bn-classes0-4.safetensors
ml train vgg16_bn --dataset fashion-mnist --classes 5-9 --width 0.5 --epochs 12 --seed 0 --quiet \
   --out checkpoints/fashion-mnist/vgg16_bn-classes5-9.safetensors
ml train resnet18 --dataset fashion-mnist --width 0.25 --epochs 12 --seed 0 --quiet \
   --out checkpoints/fashion-mnist/resnet18.safetensors
# the third source of the disassembly benchmark (issue 13: a model nobody tuned the defaults on)
ml train mobilenet_v2 --dataset digits --width 0.5 --epochs 60 --seed 0 --quiet \
   --out checkpoints/digits/mobilenet_v2.safetensors
# the transformer of issue 30 (AdamW, the default optimizer of a network with attention)
ml train vit --dataset fashion-mnist --epochs 12 --seed 0 --quiet \
   --out checkpoints/fashion-mnist/vit.safetensors
# today's format: data and router fingerprints, the three VGG-16s only the assembly benchmark
# and the demo read stored in half precision (their test accuracies re-measured, unchanged)
.venv/bin/python scripts/rewrite-checkpoints.py
