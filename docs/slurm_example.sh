#!/bin/bash
# Multi-node FCDM training on SLURM: one task per node, accelerate starts 8 GPU processes per node.
# Submit:  sbatch docs/slurm_example.sh          (edit the paths and sizes below first)
# Because the run folder name is derived from the settings, a requeued or resubmitted job resumes
# from the newest readable checkpoint in results/<name>/checkpoints/.
#SBATCH --job-name=fcdm-xl-256
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

GPUS_PER_NODE=8
BATCH_PER_GPU=8    # micro-batch per GPU: 256 / (4 nodes x 8 GPUs) = 8 in one pass; lower it (4, 2) to
                   # accumulate gradients on smaller GPUs - the run is the same at any setting and GPU count
STORE=/shared/data/imagenet256.zarr          # from preparation/extract_features.py
RESULTS=/shared/results                      # shared by all nodes; only the main process writes
VAE_DIR=/shared/vae/sd-vae-ft-ema            # local VAE snapshot for the sample grids (offline nodes)

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=29500
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

RUN=fcdm-xl-256                              # fixed run name: the requeue test below knows the folder

# 300 s before the time limit SLURM sends USR1 to this shell (--signal=B:USR1@300): pass it to the
# training processes on every node; they finish the step, write a checkpoint and <run>/preempted.json,
# and exit with status 75. Then requeue: the rerun resumes bit-exactly from that checkpoint.
trap 'echo "time limit near: asking train.py to checkpoint"; srun --overlap --ntasks-per-node=1 pkill -USR1 -f "python[^ ]* -u .*train_gen/train\.py"' USR1

srun --kill-on-bad-exit=1 bash -c "
  . .venv/bin/activate
  accelerate launch --multi_gpu --mixed_precision bf16 \
    --num_machines $SLURM_NNODES --num_processes $NUM_PROCESSES \
    --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
    train_gen/train.py --model FCDM-XL --zarr-path $STORE --results-dir $RESULTS \
      --global-batch-size 256 --batch-per-gpu $BATCH_PER_GPU --hf-model-dir $VAE_DIR \
      --ckpt-every 10000 --sample-every 10000 --exp-name $RUN
" &
wait || true   # returns early when the trap runs
wait || true   # the training step itself
if [ -f "$RESULTS/$RUN/preempted.json" ]; then
  echo "checkpointed after the warning: requeueing"
  scontrol requeue "$SLURM_JOB_ID"
fi
