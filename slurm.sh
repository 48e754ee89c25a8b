#!/bin/bash
# pretrain.py or finetune.py under SLURM: one torchrun per node, one process per GPU. Before the
# time limit the ranks save and stop, and the job requeues itself; the requeued job runs the same
# command, which resumes from --output (auto-resume). Usage, any number of nodes:
#   sbatch --nodes 2 slurm.sh pretrain.py --model swin_base --data-path /data/imagenet/train \
#       --output output/swin_b --save-steps 500
#SBATCH --job-name=simmim
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out

export HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export GPUS=${SLURM_GPUS_ON_NODE:-8} PORT=${SIMMIM_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
export PIDS="${TMPDIR:-/tmp}/simmim-$SLURM_JOB_ID"  # each node's torchrun: PIDS.NODE

# USR1, 10 minutes before the time limit: SIGTERM to this node's ranks, not to torchrun (which
# would kill them 30 s later); all ranks agree at the next log line, save and exit 0. Then the
# job requeues itself and, when it runs again, resumes from that checkpoint
stopping=0 interrupted=0
stop() {
    interrupted=1
    local torchrun=$(cat "$PIDS.0" 2>/dev/null)
    [ -n "$torchrun" ] && pkill -TERM -P "$torchrun" && stopping=1
}
trap stop USR1

# one task per node, each with its own SLURM_NODEID (this script runs on node 0), all the node's
# CPUs for its loader workers (SLURM 22.05 stopped passing --cpus-per-task on to srun); a failed
# node ends the others
srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 \
    bash -c 'echo $$ > "$PIDS.$SLURM_NODEID"; exec torchrun \
    --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$GPUS" \
    --master_addr "$HEAD" --master_port "$PORT" "$@"' torchrun "$@" &
pid=$!
status=0
wait $pid || status=$?
while [ $interrupted = 1 ]; do  # the trap ended the wait: torchrun is still saving
    interrupted=0 status=0
    wait $pid || status=$?
done
if [ $stopping = 1 ] && [ $status = 0 ]; then  # saved and stopped: to be continued
    scontrol requeue "$SLURM_JOB_ID"  # pending again; when it runs, it resumes
fi
rm -f "$PIDS.0"
exit $status
