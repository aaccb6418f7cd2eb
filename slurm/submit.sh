#!/bin/bash
# Check a gpt2dist submission, then sbatch slurm/fit.sbatch. Fails before queueing on a missing
# config or a world size the config contradicts, and prints the global-batch arithmetic.
#
#   slurm/submit.sh --nodes 2 --gpus-per-node 8 --config configs/gpt2-large.yaml --trainer.num_nodes 2 [--section.key value ...]
#   slurm/submit.sh --nodes 2 --gpus-per-node 0 --tasks-per-node 2 --config x.yaml --trainer.accelerator cpu
#
# Options: --nodes N (1), --gpus-per-node G (8), --tasks-per-node T (G; needed when G is 0),
# --cpus-per-task C (8), --time HH:MM:SS (24:00:00), --array SPEC (a job array: 0-3, 1,5-7, 0-15:4, 0-99%10;
# %a, the task id, in the arguments: --config sweep/%a.yaml), each also as --opt=value. Everything else goes
# to `gpt2dist fit`. Partition, account, QOS: sbatch's own environment (SBATCH_PARTITION, SBATCH_ACCOUNT,
# SBATCH_QOS; an array also as SBATCH_ARRAY_INX, sbatch's name for it).
# Prints the job id on success.
set -euo pipefail
HERE=$(CDPATH='' cd -- "$(dirname -- "${BASH_SOURCE[0]}")" >/dev/null && pwd)  # CDPATH: cd would print the folder
PYTHON=${PYTHON:-python}
die() { echo "submit.sh: error: $*" >&2; exit 2; }
int() { [[ $2 =~ ^(0|[1-9][0-9]*)$ ]] || die "$1 '$2' is not a whole number (no sign, no leading zero)"; }

NODES=1 GPUS=8 TASKS="" CPUS=8 TIME=24:00:00 ARRAY_SPEC=${SBATCH_ARRAY_INX:-}
# Not sbatch's variable (it reads SBATCH_ARRAY_INX): set, it queued one plain job with a literal %a.
[[ -z ${SBATCH_ARRAY:-} ]] || die "SBATCH_ARRAY is not read by sbatch; pass --array $SBATCH_ARRAY (or SBATCH_ARRAY_INX)"
ARGS=()
while (($#)); do
  case $1 in
    --nodes=*|--gpus-per-node=*|--tasks-per-node=*|--cpus-per-task=*|--time=*|--array=*)
      opt=${1%%=*} value=${1#*=}; shift; set -- "$opt" "$value" "$@"; continue ;;  # sbatch's --opt=value spelling
    --nodes|--gpus-per-node|--tasks-per-node|--cpus-per-task|--time|--array)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --nodes) int "$1" "$2"; NODES=$2 ;;
        --gpus-per-node) int "$1" "$2"; GPUS=$2 ;;
        --tasks-per-node) int "$1" "$2"; TASKS=$2 ;;
        --cpus-per-task) int "$1" "$2"; CPUS=$2 ;;
        --time) TIME=$2 ;;
        --array) ARRAY_SPEC=$2 ;;
      esac
      shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
TASKS=${TASKS:-$GPUS}
((TASKS >= 1)) || die "--gpus-per-node 0 (CPU) needs --tasks-per-node N"
((GPUS == 0 || GPUS == TASKS)) || die "--tasks-per-node $TASKS != --gpus-per-node $GPUS: one process per GPU"
command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"

# Config files exist, world size agrees with the configs; prints the global batch. A job array: each task's
# arguments, %a its id, as fit.sbatch will run them.
CHECK=() QUEUE=()
[[ -n $ARRAY_SPEC ]] && CHECK=(--array "$ARRAY_SPEC") QUEUE=(--array="$ARRAY_SPEC")
"$PYTHON" -m gpt2dist.launch --nodes "$NODES" --tasks-per-node "$TASKS" ${CHECK[@]+"${CHECK[@]}"} -- ${ARGS[@]+"${ARGS[@]}"} >&2

# The array is passed, not left to the environment: what was checked is what is queued. Submitted from
# inside a job (a pipeline's next stage), that job's array ids and restart count are not this one's.
[[ -z ${GPT2DIST_PORT_JOB:-} ]] || unset MASTER_PORT GPT2DIST_PORT_JOB  # that job's rendezvous port (fit.sbatch)
exec env -u SLURM_ARRAY_JOB_ID -u SLURM_ARRAY_TASK_ID -u SLURM_RESTART_COUNT sbatch --parsable --nodes="$NODES" --ntasks-per-node="$TASKS" --gpus-per-node="$GPUS" \
    --cpus-per-task="$CPUS" --time="$TIME" ${QUEUE[@]+"${QUEUE[@]}"} "$HERE/fit.sbatch" ${ARGS[@]+"${ARGS[@]}"}
