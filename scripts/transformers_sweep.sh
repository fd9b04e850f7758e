#!/usr/bin/env bash
# Run the suite (everything that needs no quantizer) against each Transformers release named, in
# throwaway copies of .venv-newest (torch 2.13.0 CPU, no quantizers), and record the closing line
# of each run in benchmarks/results/transformers_sweep.txt. Not part of CI (each release costs a
# few minutes); CI covers 5.17.0 (.venv) and the newest (.venv-newest).
#
#   bash scripts/bootstrap.sh --newest && bash scripts/transformers_sweep.sh 5.18.0 5.19.0 ...
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: transformers_sweep.sh VERSION..." >&2; exit 2; }
[ -x .venv-newest/bin/python ] || { echo "transformers_sweep.sh: run scripts/bootstrap.sh --newest first" >&2; exit 2; }
out=benchmarks/results/transformers_sweep.txt
for v in "$@"; do
  venv=$(mktemp -d /tmp/tf-sweep-XXXX)
  trap 'rm -rf "$venv"' EXIT
  cp -a .venv-newest/. "$venv"
  sed -i "s#$(pwd)/.venv-newest#$venv#g" "$venv/pyvenv.cfg" 2>/dev/null || true
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "transformers==$v" 2>&1 | grep -v "^WARNING: Location" || true
  got=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
  log=$(mktemp)
  "$venv/bin/python" -m pytest -q -p no:cacheprovider >"$log" 2>&1 && status=0 || status=$?
  line=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" "$log" | tail -n 1)
  printf 'transformers %s (torch 2.13.0 CPU, no quantizers): exit %s: %s\n' "$got" "$status" "$line" | tee -a "$out"
  [ "$status" -eq 0 ] || grep -E "^(FAILED|ERROR) " "$log" | head -n 20 | sed 's/^/    /' | tee -a "$out"
  rm -rf "$venv" "$log"
  trap - EXIT
done
