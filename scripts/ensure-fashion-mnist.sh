#!/usr/bin/env bash
# Make sure the Fashion-MNIST files of Debian's dataset-fashion-mnist package are present.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
cmd="apt-get update && apt-get install -y dataset-fashion-mnist"
if [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST not found in $dir; installing it: $cmd"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  echo "Fashion-MNIST not found in $dir; installing it with sudo: $cmd"
  sudo -n sh -c "DEBIAN_FRONTEND=noninteractive $cmd" >/dev/null
else
  echo "error: Fashion-MNIST is not installed ($dir is missing) and this user cannot install it." >&2
  echo "Run as root:  $cmd" >&2
  echo "or pass --data-dir to a folder holding the four IDX files." >&2
  exit 1
fi
[ -f "$dir/t10k-labels-idx1-ubyte.gz" ] || { echo "error: installing dataset-fashion-mnist did not create $dir" >&2; exit 1; }
