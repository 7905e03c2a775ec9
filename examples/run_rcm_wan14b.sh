#!/usr/bin/env bash
# rCM distillation of Wan2.1 T2V 14B on a Slurm cluster (8 GPUs per node).
#
#   sbatch --nodes 16 examples/run_rcm_wan14b.sh \
#       model.teacher_checkpoint=/ckpt/wan2.1_t2v_14b_mcore data.path=/data/wan_shards
#
# Extra arguments are config overrides (dotted keys, YAML values) on top of
# examples/configs/wan2.1_t2v_14b.yaml (480p, TP=8), or of $CONFIG; for 720p with context parallelism
# (TP=4 x CP=2 per node):
#   CONFIG=examples/configs/wan2.1_t2v_14b_720p.yaml sbatch --nodes 16 examples/run_rcm_wan14b.sh ...
# Convert the teacher first:
#   python tools/convert.py import /hf/Wan2.1-T2V-14B-Diffusers /ckpt/wan2.1_t2v_14b_mcore
#SBATCH --job-name=rcm-wan14b
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-examples/configs/wan2.1_t2v_14b.yaml}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron: keep TP collectives ordered with compute
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
mkdir -p logs

# One task per GPU; megatron_rcm.parallel.state reads RANK/WORLD_SIZE/LOCAL_RANK from
# SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID.
srun --kill-on-bad-exit=1 python -m megatron_rcm.cli train --config "$CONFIG" "$@"
