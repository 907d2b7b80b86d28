#!/usr/bin/env bash
# Train steppo_jax on GPU machines: one node, or several nodes with one process per node.
#
# One node (no --hosts): everything runs here, in this repository clone; one process drives
# all the node's GPUs, so no distributed setup is needed.
#
#   tpu_scripts/gpu_launch.sh --config configs/paper_hotpotqa_qwen2.5_3b.yaml \
#       --checkpoint hf://Qwen/Qwen2.5-3B-Instruct --data /data/hotpot_train_v1.1.json
#
# Several nodes (--hosts h0,h1,...; reached with ssh, so use ~/.ssh/config for users and
# keys): every node gets its own clone in --workdir and runs one process
#
#   STEPPO_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS=h0:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \
#     steppo train --config ...
#
# (the trainer calls jax.distributed.initialize() when STEPPO_DISTRIBUTED is set, passing it
# the three JAX_* variables).
#
#   tpu_scripts/gpu_launch.sh --hosts gpu-a,gpu-b --config configs/paper_textworld_qwen3_4b.yaml \
#       --checkpoint hf://Qwen/Qwen3-4B-Instruct-2507
#
# Stages, run in this order when none is named (or with "all"):
#   install  venv and pip install -e '.[envs]' 'jax[cuda12]' (several nodes: clone first)
#   copy     the checkpoint (--checkpoint) and data file (--data) to where training reads them
#   launch   one node: steppo train in the foreground; several: in the background on every node
#   watch    several nodes: follow the first node's log until its training process exits
#   fetch    several nodes: copy the run directory back from the first node
# Extra stages, never part of "all": status, stop (several nodes).
#
# --dry-run prints every command, one per line, and runs none of them. Arguments after "--"
# are config overrides for steppo train.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  cat <<'USAGE'
Options (defaults in brackets):
  --config PATH          steppo config, relative to the repository root (required)
  --hosts H0,H1,...      nodes to train on, the first is the coordinator [none: this machine]
  --coordinator ADDR     coordinator host as the other nodes reach it [the first host]
  --port PORT            coordinator port [12355]
  --repo URL             repository to clone on the nodes [$STEPPO_REPO]
  --ref REF              branch, tag or commit to check out [$STEPPO_REF or main]
  --cuda EXTRA           JAX's CUDA extra: cuda12 or cuda13 [cuda12]
  --checkpoint SRC       HF checkpoint: hf://org/model, gs://..., a local directory (copied
                         to every node), or worker:PATH (already there); sets model.hf_path
  --data SRC             data file (sets env.options.path): gs://..., http(s)://..., a local
                         file or worker:PATH
  --run-dir DIR          run directory (on the first node, or gs://...) [runs/<config name>]
  --results DIR          where fetch puts the run directory [results/<config name>]
  --workdir DIR          the clone on each node, relative to home [steppo_jax]
  --dry-run              print the commands instead of running them
  -h, --help             this text
USAGE
}

CONFIG=""
HOSTS=()
COORDINATOR=""
PORT=12355
REPO="${STEPPO_REPO:-https://github.com/steppo-jax/steppo_jax.git}"
REF="${STEPPO_REF:-main}"
CUDA=cuda12
CHECKPOINT=""
DATA=""
RUN_DIR=""
RESULTS=""
WORKDIR="steppo_jax"
STAGES=()
OVERRIDES=()

while (($#)); do
  case "$1" in
    --config) CONFIG="${2:?--config needs a value}"; shift ;;
    --hosts) IFS=, read -r -a HOSTS <<<"${2:?--hosts needs a value}"; shift ;;
    --coordinator) COORDINATOR="${2:?--coordinator needs a value}"; shift ;;
    --port) PORT="${2:?--port needs a value}"; shift ;;
    --repo) REPO="${2:?--repo needs a value}"; shift ;;
    --ref) REF="${2:?--ref needs a value}"; shift ;;
    --cuda) CUDA="${2:?--cuda needs a value}"; shift ;;
    --checkpoint) CHECKPOINT="${2:?--checkpoint needs a value}"; shift ;;
    --data) DATA="${2:?--data needs a value}"; shift ;;
    --run-dir) RUN_DIR="${2:?--run-dir needs a value}"; shift ;;
    --results) RESULTS="${2:?--results needs a value}"; shift ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    install | copy | launch | watch | fetch | status | stop) STAGES+=("$1") ;;
    all) STAGES+=(install copy launch watch fetch) ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$CONFIG" ]] || die "--config is required (e.g. --config configs/paper_hotpotqa_qwen2.5_3b.yaml)"
[[ -f "$(dirname "${BASH_SOURCE[0]}")/../$CONFIG" ]] || die "no config '$CONFIG' in this repository (paths are relative to its root)"
((${#STAGES[@]})) || STAGES=(install copy launch watch fetch)
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
NAME="$(basename "$CONFIG" .yaml)"
RUN_DIR="${RUN_DIR:-runs/$NAME}"
RESULTS="${RESULTS:-results/$NAME}"
NUM_NODES=${#HOSTS[@]}
COORDINATOR="${COORDINATOR:-${HOSTS[0]:-}}"
LOG="steppo_train.log"
PIDFILE="steppo_train.pid"

# Where training reads a source from, relative to the clone; a local path on one node is
# read where it is.
read_path() {  # read_path SRC DIR
  if ((NUM_NODES == 0)) && [[ "$(source_kind "$1")" == local ]]; then
    echo "$1"
  else
    dest_path "$1" "$2"
  fi
}

train_args() {
  local args=(--config "$CONFIG" --run-dir "$RUN_DIR")
  [[ -z "$CHECKPOINT" ]] || args+=("model.hf_path=$(read_path "$CHECKPOINT" checkpoints)")
  [[ -z "$DATA" ]] || args+=("env.options.path=$(read_path "$DATA" data)")
  quote_all "${args[@]}" "${OVERRIDES[@]}"
}

# -- one node: this machine ---------------------------------------------------------------------
fetch_here() {  # fetch_here SRC DIR TARGET: a remote source into the clone (local paths stay put)
  case "$(source_kind "$1")" in
    local | worker) ;;
    *) run bash -c "$(fetch_snippet "$1" "$(dest_path "$1" "$2")" "$3")" ;;
  esac
}

single_node() {
  local stage="$1"
  case "$stage" in
    install)
      run bash -c "test -x .venv/bin/python || python3 -m venv .venv"
      run .venv/bin/pip install -q --upgrade pip
      run .venv/bin/pip install -q -e '.[envs]' "jax[$CUDA]==0.10.2" ;;
    copy)
      [[ -z "$CHECKPOINT" ]] || fetch_here "$CHECKPOINT" checkpoints dir
      [[ -z "$DATA" ]] || fetch_here "$DATA" data file ;;
    launch)
      local args
      args="$(train_args)"
      run bash -c "set -o pipefail; .venv/bin/steppo train $args 2>&1 | tee $LOG" ;;
    watch | fetch | status | stop) ;;  # the run ran in the foreground, its directory is here
  esac
}

# -- several nodes, over ssh --------------------------------------------------------------------
copy_to_nodes() {  # copy_to_nodes SRC DIR TARGET
  local src="$1" dir="$2" target="$3" host
  for host in "${HOSTS[@]}"; do
    case "$(source_kind "$src")" in
      worker) ;;
      local)
        run ssh "$host" "mkdir -p $WORKDIR/$dir"
        run scp -r "$src" "$host:$WORKDIR/$dir/" ;;
      *) run ssh "$host" "cd $WORKDIR && $(fetch_snippet "$src" "$(dest_path "$src" "$dir")" "$target")" ;;
    esac
  done
}

multi_node() {
  local stage="$1" i host args
  case "$stage" in
    install)
      for host in "${HOSTS[@]}"; do
        run ssh "$host" "$(install_snippet "$REPO" "$REF" "$WORKDIR" "$CUDA")"
      done ;;
    copy)
      [[ -z "$CHECKPOINT" ]] || copy_to_nodes "$CHECKPOINT" checkpoints dir
      [[ -z "$DATA" ]] || copy_to_nodes "$DATA" data file ;;
    launch)
      args="$(train_args)"
      for i in "${!HOSTS[@]}"; do
        run ssh "${HOSTS[$i]}" "cd $WORKDIR && STEPPO_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS=$COORDINATOR:$PORT JAX_NUM_PROCESSES=$NUM_NODES JAX_PROCESS_ID=$i setsid nohup .venv/bin/steppo train $args > ~/$LOG 2>&1 < /dev/null & echo \$! > ~/$PIDFILE"
      done ;;
    watch)
      run ssh "${HOSTS[0]}" "tail -n +1 --pid=\$(cat ~/$PIDFILE) -f ~/$LOG" ;;
    status)
      for host in "${HOSTS[@]}"; do
        run ssh "$host" "if kill -0 \$(cat ~/$PIDFILE) 2>/dev/null; then echo $host running; else echo $host stopped; fi; tail -n 3 ~/$LOG"
      done ;;
    stop)
      for host in "${HOSTS[@]}"; do
        run ssh "$host" "kill \$(cat ~/$PIDFILE)"
      done ;;
    fetch)
      run mkdir -p "$RESULTS"
      if [[ "$RUN_DIR" == gs://* ]]; then
        run gcloud storage rsync --recursive "$RUN_DIR" "$RESULTS"
      else
        run scp -r "${HOSTS[0]}:$WORKDIR/$RUN_DIR" "$RESULTS/"
        run scp "${HOSTS[0]}:$LOG" "$RESULTS/"
      fi ;;
  esac
}

for stage in "${STAGES[@]}"; do
  if ((NUM_NODES == 0)); then single_node "$stage"; else multi_node "$stage"; fi
done
