#!/usr/bin/env bash
# The GPU checks, in one go (about 5 minutes on one H100/H200):  bash bench/cuda_check.sh LIKE_DIR OUT_DIR
# LIKE_DIR: a llama-family folder's config.json + tokenizer files (weights not needed: a random checkpoint of that
# shape is written, so this runs on a machine that cannot fetch any). Then:
#   1. bench/cuda_check.py: logits, greedy decoding (CUDA graph vs eager vs transformers) and a LoRA step vs PEFT,
#      in fp32 / bf16 / fp16 on the GPU;
#   2. train.py for 20 steps on the synthetic benchmark in fp32, bf16 and fp16 (the GradScaler path), and once
#      under torchrun (NCCL process group, one rank) with gradient checkpointing;
#   3. bench/speed.py --device cuda --quick.
set -uo pipefail
like=${1:?usage: bash bench/cuda_check.sh LIKE_DIR OUT_DIR}
out=${2:?usage: bash bench/cuda_check.sh LIKE_DIR OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
status=0
python3 bench/cuda_check.py --like "$like" --out "$out" || status=1
model="$out/model"
python3 support/synth.py --out "$out/synth" --n-train 256 --n-test 16 >/dev/null || status=1
common=(--model "$model" --data "$out/synth"/train_N.jsonl --max-steps 20 --batch-size 8 --grad-accum 1 --lr 1e-3
        --lora-r 16 --lora-alpha 32 --warmup-samples 32 --ramp-steps 5 --max-len 512 --log-every 5 --no-resume)
for d in fp32 bf16 fp16; do
  echo "== train.py --dtype $d"
  python3 train.py "${common[@]}" --dtype "$d" --out "$out/train_$d" 2>&1 | tail -n 8 || status=1
  python3 - "$d" "/tmp/cuda_train_$d/metrics.jsonl" <<'EOF' || status=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[2]) if '"loss"' in l]
first, last = rows[0], rows[-1]
print(f"{sys.argv[1]}: {len(rows)} logged steps, loss {first['loss']:.3f} -> {last['loss']:.3f}, "
      f"{last['tokens_per_s']:.0f} tokens/s, skipped steps {last['skipped_steps']}")
sys.exit(0 if last["loss"] < first["loss"] else 1)
EOF
done
echo "== torchrun (NCCL, 1 rank), bf16, gradient checkpointing"
torchrun --nproc_per_node=1 train.py "${common[@]}" --dtype bf16 --grad-checkpointing --max-steps 10 \
  --out "$out/train_ddp" 2>&1 | tail -n 5 || status=1
echo "== bench/speed.py --device cuda --quick"
python3 bench/speed.py --device cuda --quick --model "$model" --out "$out/speed" 2>&1 | tail -n 30 || status=1
echo "cuda_check.sh: exit $status"
exit $status
