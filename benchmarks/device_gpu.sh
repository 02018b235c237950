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
described=$(find "$kit_dir" -mindepth 2 -maxdepth 2 -name kit.json 2>/dev/null | head -1)
if [ -z "$described" ]; then
  echo "device_gpu: no kit part in $kit_dir; carry .devkit/N (made by benchmarks/device_kit.py)" >&2
  exit 2
fi
read -r parts sha < <(python3 -c 'import json,sys; k=json.load(open(sys.argv[1])); print(k["parts"], k["sha256"])' \
  "$described")
store="$root/$sha"  # one folder per kit: parts of another kit never mix in
mkdir -p "$store/parts" "$out"
find "$kit_dir" -mindepth 2 -maxdepth 2 -name 'kit.tar.*' -exec cp {} "$store/parts/" \;
have=$(find "$store/parts" -name 'kit.tar.*' | wc -l)
if [ "$have" -lt "$parts" ]; then
  echo "device_gpu: $have of $parts parts here; carry the next one"
  exit 0
fi
if [ ! -d "$store/site" ]; then
  find "$store/parts" -name 'kit.tar.*' | sort | xargs cat > "$store/kit.tar"
  if ! echo "$sha  $store/kit.tar" | sha256sum -c --quiet - >/dev/null 2>&1; then
    echo "device_gpu: the joined parts do not match the kit's sha256; carry them again" >&2
    rm -rf "$store"
    exit 1
  fi
  mkdir -p "$store/kit"
  tar -xf "$store/kit.tar" -C "$store/kit"
  rm "$store/kit.tar"
  shopt -s nullglob
  wheels=("$store"/kit/wheels/*.whl)
  mkdir -p "$store/site.tmp"
  if [ ${#wheels[@]} -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$store/site.tmp" \
      "${wheels[@]}"
  fi
  mv "$store/site.tmp" "$store/site"
fi
export PYTHONPATH="$store/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" SEMVEC_DATASETS="$store/kit/datasets"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${SEMVEC_KIT_PYTHON:-python3}  # the lent machines: the python3 that holds PyTorch
(nvidia-smi || true) > "$out/nvidia-smi.txt" 2>&1
"$python" benchmarks/gpu.py --model "$store/kit/model" --out "$store/run-$(date +%s%N)" "$@" 2>&1 \
  | tee "$out/gpu.log"
