#!/usr/bin/env bash
# Build a folder of the Python packages the GPU benchmarks need beyond what the GPU image has
# (torch, transformers, safetensors, tokenizers are there), for a GPU machine without network:
#
#   bash scripts/gpu_site/build.sh .gpudeps/site        # here, where the package registry is reachable
#   WITH_LLMCOMPRESSOR=1 bash scripts/gpu_site/build.sh .gpudeps/site   # and llm-compressor's runs' packages
#   PYTHONPATH=$PWD/.gpudeps/site:$PWD python3 benchmarks/gptqmodel_gpu.py ...   # there
#
# A device call carries at most 64 MiB (working tree included), so the llm-compressor packages (about 13 MB,
# auto-round most of it) can go into a folder of their own, carried only by llm-compressor's runs:
#   WITH_LLMCOMPRESSOR=only bash scripts/gpu_site/build.sh .gpudeps/site-llmc     # just those packages
#   PYTHONPATH=$PWD/.gpudeps/site:$PWD/.gpudeps/site-llmc:$PWD python3 benchmarks/distributed_gpu.py ...   # there
# Once the tracked tree and both folders pass 64 MiB (round 51: 38 + 20 + 12 MB), llm-compressor's runs carry one folder
# without GPTQModel and what only it needs (defuser, logbar, tokenicer, device-smi), about 23 MB:
#   WITH_LLMCOMPRESSOR=alone bash scripts/gpu_site/build.sh .gpudeps/llmc-run
#   PYTHONPATH=$PWD/.gpudeps/llmc-run:$PWD python3 benchmarks/distributed_gpu.py ...   # there
#
# Wheels are fetched for CPython 3.12 on x86-64 Linux (the GPU image's Python; PY=3.x to change)
# and unpacked as they are. PyPcre, a GPTQModel requirement, ships no wheel (it compiles against
# libpcre2), so a stand-in built on the stdlib `re` takes its place (scripts/gpu_site/pcre_stand_in.py):
# GPTQModel uses it only to match module names against its dynamic per-module config rules.
#
# A fresh GPU machine compiles GPTQModel's block-update and pack extensions and defuser-quant's rows
# kernel before the first run (about 90 s). To pay that once, build them into folders that come back:
#   export GPTQMODEL_TORCH_EXTENSIONS_DIR=/tmp/gext TORCH_EXTENSIONS_DIR=/tmp/text   # there, first call
#   ...; tar czf $OUT/ext.tgz -C /tmp gext text                                     # there, after the run
#   mkdir -p .gpudeps/ext && tar xzf ext.tgz -C .gpudeps/ext                        # here
#   find .gpudeps/ext/gext -type f ! -name '*.so' ! -name '*.lock' -delete          # here: GPTQModel needs the .so only
# and in later calls (torch's build folder is only reused at the path it was built in, hence the copy):
#   mkdir -p /tmp/text && cp -a .gpudeps/ext/text/. /tmp/text/
#   export GPTQMODEL_TORCH_EXTENSIONS_DIR=$PWD/.gpudeps/ext/gext TORCH_EXTENSIONS_DIR=/tmp/text
set -euo pipefail
dest=${1:?usage: build.sh DEST_DIR}
py=${PY:-3.12}
here=$(cd "$(dirname "$0")" && pwd)
gptqmodel_only=(defuser==0.0.28 logbar==0.4.15 tokenicer==0.0.14 device-smi==0.5.7)
shared=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
pins=("${gptqmodel_only[@]}" "${shared[@]}")
case "${WITH_LLMCOMPRESSOR:-0}" in
  0|1|only|alone) ;;
  *) echo "build.sh: WITH_LLMCOMPRESSOR must be 0, 1, only or alone, got '${WITH_LLMCOMPRESSOR}'" >&2; exit 2 ;;
esac
# llm-compressor and what it needs beyond the GPU image and the base site (auto-round: imported with its modifiers)
llmc=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3 auto-round==0.15.1)
base=(gptqmodel==7.6.0)
case "${WITH_LLMCOMPRESSOR:-0}" in
  1) pins+=("${llmc[@]}") ;;
  only) base=(); pins=("${llmc[@]}") ;;
  alone) base=(); pins=("${shared[@]}" "${llmc[@]}") ;;
esac
if [ -e "$dest" ] && [ -n "$(ls -A "$dest")" ]; then
  echo "build.sh: $dest exists and is not empty; remove it or name another folder" >&2
  exit 2
fi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
for pin in "${base[@]}" "${pins[@]}"; do
  # A wheel for the GPU machine's Python where one is published; else (sdist-only packages, such
  # as GPTQModel, whose wheel built here is pure Python with no CUDA extensions) build one here.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$wheels" "$pin" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w "$wheels" "$pin"
done
mkdir -p "$dest.partial"
for w in "$wheels"/*.whl; do
  python3 -m zipfile -e "$w" "$dest.partial"
done
if [ "${#base[@]}" -gt 0 ]; then  # the base site: GPTQModel's PyPcre stand-in
  mkdir -p "$dest.partial/pcre"
  cp "$here/pcre_stand_in.py" "$dest.partial/pcre/__init__.py"
fi
rm -rf "$dest" && mv "$dest.partial" "$dest"
echo "wrote $dest ($(du -sh "$dest" | cut -f1))"
