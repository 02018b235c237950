#!/usr/bin/env bash
# On a lent GPU machine (benchmarks/device_kit.py says how to call it): keep the part of the kit
# this call carried, and once every part is here, check the archive, install its wheels into a
# folder of their own and run benchmarks/gpu.py on the model and datasets it holds. Arguments go
# to gpu.py. The log and the GPU's description land in $OUT (the device tool's output folder).
set -euo pipefail
cd "$(dirname "$0")/.."
kit_dir=${SEMVEC_KIT_DIR:-.devkit}  # where this call's part was carried
root=${SEMVEC_KIT_STORE:-/tmp/semvec-kit}  # where the parts gather, outside the checkout
out=${OUT:-$root/out}
python=${SEMVEC_KIT_PYTHON:-python3}  # the lent machines: the python3 that holds PyTorch
if ! compgen -G "$kit_dir/*/kit.json" >/dev/null; then
  echo "device_gpu: no kit part in $kit_dir; carry .devkit/N (made by benchmarks/device_kit.py)" >&2
  exit 2
fi
# each carried folder holds one part and its kit's kit.json: parts gather per kit (by its sha256),
# so a part of an older kit left on a warm machine never mixes into a newer one
store=""
for described in "$kit_dir"/*/kit.json; do
  read -r parts sha < <("$python" -c 'import json,sys; k=json.load(open(sys.argv[1])); print(k["parts"], k["sha256"])' \
    "$described")
  mkdir -p "$root/$sha/parts"
  cp "$(dirname "$described")"/kit.tar.* "$root/$sha/parts/"
  have=$(find "$root/$sha/parts" -name 'kit.tar.*' | wc -l)
  echo "device_gpu: kit ${sha:0:12}: $have of $parts parts here"
  if [ "$have" -ge "$parts" ]; then
    store="$root/$sha"  # complete: this is the kit to run
  fi
done
if [ -z "$store" ]; then
  echo "device_gpu: carry the next part (within the machine's warm time, or the parts are lost)"
  # meanwhile, what the machine offers (cheap, and what to look at first if the last call fails)
  "$python" -c 'import sys, torch, transformers; print("device_gpu: python", sys.version.split()[0],
    "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)' \
    || true
  exit 0
fi
mkdir -p "$out"
if [ ! -d "$store/site" ]; then
  cat "$store"/parts/kit.tar.* > "$store/kit.tar"  # the glob sorts: kit.tar.01, kit.tar.02, ...
  if ! echo "$sha  $store/kit.tar" | sha256sum -c --quiet - >/dev/null 2>&1; then
    echo "device_gpu: the joined parts do not match the kit's sha256; carry them all again" >&2
    rm -rf "$store"
    exit 1
  fi
  mkdir -p "$store/kit"
  tar -xf "$store/kit.tar" -C "$store/kit"
  rm "$store/kit.tar"
  shopt -s nullglob
  wheels=("$store"/kit/wheels/*.whl)
  rm -rf "$store/site.tmp"  # a half-made install of an earlier call is not kept
  mkdir -p "$store/site.tmp"
  if [ ${#wheels[@]} -gt 0 ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$store/site.tmp" \
      "${wheels[@]}"
  fi
  mv "$store/site.tmp" "$store/site"
fi
export PYTHONPATH="$store/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" SEMVEC_DATASETS="$store/kit/datasets"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
(nvidia-smi || true) > "$out/nvidia-smi.txt" 2>&1
"$python" benchmarks/gpu.py --model "$store/kit/model" --out "$store/run-$(date +%s%N)" "$@" 2>&1 \
  | tee "$out/gpu.log"
