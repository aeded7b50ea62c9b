#!/usr/bin/env bash
# The GPU checks, on a machine with torch (CUDA), transformers and peft but without datasets or
# the weights and data packages: run `python3 benchmarks/gpu_pack.py` first (it writes .gpu/, which
# must travel with the checkout), then there:
#
#   bash benchmarks/gpu_check.sh OUT [PART ...]     # PART: strategies, strategies-gen, decode, loop-minilm,
#                                                   # loop-smollm2 (default: all)
#
# Each part has its own time limit, so one that hangs or fails leaves the others their time; logs
# and JSON land in OUT. Seen on an H200 (benchmarks/results/h200-gpu-check.md): decode ~140 s,
# loop-minilm ~220 s (strategies: about 4 minutes on this project's 2-core CPU, not yet run on a GPU); loop-smollm2 needs more than 125 s to compile each task, so it gets a
# call of its own.
set -u
out=${1:-gpu-check}
shift || true
parts=${*:-strategies strategies-gen decode loop-minilm loop-smollm2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
python3 -c 'import torch, transformers, peft, pyarrow, datasets; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "pyarrow", pyarrow.__version__, "datasets", datasets.__version__)'

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log
    local name=$1 limit=$2; shift 2
    case " $parts " in *" $name "*) ;; *) return ;; esac
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
}

# every strategy a few steps on the GPU: do the tensors each builds on its own follow the model there?
part strategies 300 python3 benchmarks/strategies_device.py --stream .gpu/streams/default/default.yaml --backbone .gpu/minilm
# the newer generative paths on a decoder (random SmolLM2 weights): lamol's seeded sampling, MIGU's
# masks, I-LoRA's states, OGD's directions, DER's logits on the GPU
part strategies-gen 240 python3 benchmarks/strategies_device.py --stream .gpu/streams/generative/generative.yaml \
    --backbone .gpu/smollm2 --random-init --only lamol,migu,i-lora,ogd,der,magmax
# decoding: ours against HF generate + PEFT, one LoRA and mixed 8 / 64, bf16 and fp32 (random
# SmolLM2 weights: the same shapes, so the same work)
part decode 200 python3 benchmarks/decode_speed.py --backbone .gpu/smollm2 --random-init --prompts .gpu/prompts.json \
    --repeats 3 --precisions bf16,fp32
# the real training loop under each compile mode: MiniLM (real weights), two classification tasks
part loop-minilm 240 python3 benchmarks/compile_loop.py --stream .gpu/streams/default/default.yaml --backbone .gpu/minilm \
    --modes none,default,reduce-overhead --timeout 100 --json "$out/loop-minilm.json"
# the same on a decoder: SmolLM2 (random weights), two generative tasks
part loop-smollm2 540 python3 benchmarks/compile_loop.py --stream .gpu/streams/generative/generative.yaml --backbone .gpu/smollm2 \
    --random-init --modes none,reduce-overhead --steps 60 --batch-size 8 --max-length 128 --eval-every 30 --timeout 450 \
    --json "$out/loop-smollm2.json"
for f in $parts; do echo; echo "## $f"; grep -v "Loading weights\|Writing model" "$out/$f.log" | tail -25; done
