#!/usr/bin/env bash
# GPU measurements in one call (at most GPU_SESSION_SECONDS, default 540 s): step benchmarks of the SD1.5-size and
# CIFAR-size UNets (baselines and fast paths in the same run), FID-50k, the attention backends, the default job.
#   bash eval/gpu_session.sh [OUTDIR]        # OUTDIR defaults to $OUT, else gpu-session/
#   GPU_SESSION_ONLY="cifar_base gpu_tests" bash eval/gpu_session.sh    # only these stages (e.g. a second call)
# Each stage has its own time limit, so a slow one cannot take the others with it; logs and JSON rows go to OUTDIR.
set -u
if [[ -z "${GPU_SESSION_ALLOW_CPU:-}" ]] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: no CUDA device here; this script measures a GPU (GPU_SESSION_ALLOW_CPU=1 runs its stages anyway)" >&2
    exit 2
fi
out=${1:-${OUT:-gpu-session}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
deadline=${GPU_SESSION_SECONDS:-540}  # every stage ends by then
stage() {  # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 left
    shift 2
    if [[ -n "${GPU_SESSION_ONLY:-}" && " $GPU_SESSION_ONLY " != *" $name "* ]]; then return; fi
    left=$(( deadline - ($(date +%s) - start) ))
    (( left < limit )) && limit=$left
    (( limit < 20 )) && { echo "=== $name: skipped (${left}s left)"; return; }
    echo "=== $name (limit ${limit}s, at $(( $(date +%s) - start ))s)"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name: exit $? after $(( $(date +%s) - start ))s"
    grep -v '^{' "$out/$name.log" | tail -n 25
}
bench="python3 eval/step_benchmark.py"

stage env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv;
  python3 -c "import torch, diffusers, accelerate, peft; print(torch.__version__, torch.version.cuda, diffusers.__version__,
  accelerate.__version__, peft.__version__); from onestep.attention import xformers_available; print(\"xformers usable:\", xformers_available()); from onestep.optim import check_available; \
  check_available(\"adamw8bit\"); print(\"bitsandbytes: importable\")"'
# In order of what is still unmeasured, so that a short session gets the open goals first; each stage is cut at
# the deadline, and skipped when under 20 s are left.
# 1. SD1.5-size UNet2DConditionModel (random weights), DMD2 at batch 8, 64x64 latents: peak memory (and the peak of
#    each phase of the step, in the JSON) of the memory options for the <= 16 GiB goal on the LoRA fake score with
#    gradient checkpointing: EMA on the GPU or in CPU memory, AdamW or 8-bit AdamW (needs bitsandbytes there)
#    (simulated on the CPU with --simulate-memory, a lower bound: EMA on the GPU 19.75 GiB with AdamW, 14.47 with
#    8-bit AdamW; EMA in CPU memory 16.55 and 11.27). The 8-bit rows first and in their own command: should
#    bitsandbytes not load on that machine, the benchmark refuses before any row, and the AdamW rows still run.
lowmem="$bench --preset sd15 --method dmd2 --variants bf16 --fake-score lora --gradient-checkpointing on --ema offload,on \
    --no-components --repeats 4 --warmup 2"
stage sd15_lowmem 160 bash -c "$lowmem --optimizer adamw8bit --out $out/sd15_lowmem_8bit.json;
    $lowmem --optimizer adamw --out $out/sd15_lowmem.json"
#    ... and the generator a LoRA too (--generator_lora_rank 64: no float32 generator, gradients, moments or EMA;
#    simulated 7.65 GiB with AdamW and the EMA on the GPU)
stage sd15_lora_generator 90 $lowmem --ema on --generator-lora 64 --optimizer adamw --out $out/sd15_lora_generator.json
# 2. FID-50k of a CIFAR-size one-step generator, end to end (stand-in Inception of the same architecture: timing;
#    the Frechet distance from the moments on the GPU, and clean-fid's scipy one on the CPU for comparison)
#    (features in NCHW and in channels-last layout, each over 50 000 samples)
stage fid50k 150 python3 eval/fid_speed.py --layouts nchw,nhwc --fid-baseline --out "$out/fid50k.json"
# 3. CIFAR-size UNet (google/ddpm-cifar10-32's config): torch.compile of the three networks (its compile time
#    reported) at batch 512 (the trainer's rule: no host read in the step) and, second (the fake score's graphs
#    already compiled), with the critic's loss on the DM direction's fake-score forward (shared_critic_pass: seven
#    forward-equivalents instead of eight; CPU, digits: -11 to -14% step time; +8.7 GiB simulated; a worse
#    digits-FID, so not the default); the bf16 eager baseline with each update rule (the loss terms read each turn
#    as before, a host read per update, none) and with the shared pass, the GPU tests (a DMD step with the device rule waits nowhere), compiled at batch 256 with
#    the device rule and, second (warm compile cache), the old one; then CUDA graphs (compile mode reduce-overhead)
stage cifar_compile_b512 260 $bench --preset cifar --variants bf16-compile --batch-size 512 --no-components \
    --critic-pass separate,shared --out "$out/cifar_compile_b512.json"
stage cifar_base 120 $bench --preset cifar --variants bf16 --sync logs,host,device --out "$out/cifar_base.json"
stage cifar_shared 90 $bench --preset cifar --variants bf16 --critic-pass separate,shared --out "$out/cifar_shared.json"
stage gpu_tests 120 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_attention.py tests/test_update.py
stage cifar_compile 240 $bench --preset cifar --variants bf16-compile --sync device,logs --out "$out/cifar_compile.json"
stage cifar_cudagraphs 200 $bench --preset cifar --variants bf16-reduce-overhead --out "$out/cifar_cudagraphs.json"
# FSDP2 on CUDA (NCCL, one rank; bf16 through FSDP2's MixedPrecisionPolicy): the smoke run of the shipped config
stage fsdp_smoke 90 accelerate launch --config_file train/accelerate/fsdp.yaml --num_processes 1 train/distill.py \
    --preset smoke --ema_decay 0.9 --eval_every 2 --name gpu-fsdp
cp runs/gpu-fsdp/metrics.json "$out/fsdp_metrics.json" 2>/dev/null
# 4. Again, as measured before: full-copy vs LoRA fake score with and without gradient checkpointing (EMA on the
#    GPU, AdamW), the attention backends, compile at batch 256, the default job (bf16 through mixed_precision auto)
#    (DMD2 simulated: copy 42.94 / copy + checkpointing 30.19 / LoRA 32.03 / LoRA + checkpointing 19.75 GiB)
stage sd15_memory 160 $bench --preset sd15 --method dmd2 --variants bf16 --fake-score copy,lora \
    --gradient-checkpointing off,on --ema on --no-components --repeats 4 --warmup 2 --out "$out/sd15_memory.json"
stage sd15_xformers 90 $bench --preset sd15 --method dmd2 --variants bf16 --fake-score lora --gradient-checkpointing on \
    --ema off --attention sdpa,xformers --no-components --repeats 4 --warmup 2 --out "$out/sd15_xformers.json"
stage fid50k_compile 150 python3 eval/fid_speed.py --generator compile --layouts nchw,nhwc --baseline-samples 0 \
    --out "$out/fid50k_compile.json"
stage default_run 200 accelerate launch --num_processes 1 train/distill.py --name gpu-default
cp runs/gpu-default/metrics.json "$out/default_metrics.json" 2>/dev/null
echo "=== total $(( $(date +%s) - start ))s"
