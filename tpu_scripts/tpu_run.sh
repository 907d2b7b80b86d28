#!/usr/bin/env bash
# Train steppo_jax on a Cloud TPU VM or pod slice, from creation to teardown.
#
#   tpu_scripts/tpu_run.sh --config configs/paper_hotpotqa_qwen2.5_3b.yaml --name steppo-hotpot \
#       --accelerator v4-32 --checkpoint hf://Qwen/Qwen2.5-3B-Instruct \
#       --data http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_train_v1.1.json
#
# Stages, run in this order when none is named (or with "all"):
#   (plan)   before create, and in --dry-run too: `steppo plan --config ... --topology
#            <accelerator>` here, on this machine (needs `pip install -e '.[tpu]'`; for an HF
#            checkpoint only its config.json is fetched), aborting when the run does not fit
#            the slice's memory; --no-plan skips it
#   create   gcloud compute tpus tpu-vm create (one VM, or every host of a pod slice)
#   install  on all workers: clone the repository, venv, pip install -e '.[envs,gcs]' jax[tpu]
#   mount    on all workers: install gcsfuse and mount --mount-bucket at <workdir>/gcs (only
#            with --mount-bucket)
#   copy     on all workers: the checkpoint (--checkpoint) and data files (--data), then the
#            --prepare command
#   launch   on all workers at once: STEPPO_DISTRIBUTED=1 steppo train --config ... in the
#            background (the trainer calls jax.distributed.initialize() when it is set; on TPU
#            it finds the coordinator and process ids itself)
#   watch    follow worker 0's log until the training process exits
#   fetch    copy the run directory (metrics, curves, summary, checkpoints) back here
#   delete   delete the TPU
# Extra stages, never part of "all": status (ssh: is training still running?), stop (kill it).
#
# --dry-run prints every command, one per line, and runs none of them. Arguments after "--"
# are config overrides for steppo train (e.g. -- train.iterations=10).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  cat <<'USAGE'
Options (defaults in brackets; most also read an environment variable):
  --config PATH          steppo config, relative to the repository root (required)
  --name NAME            TPU name [$TPU_NAME or steppo-$USER]
  --zone ZONE            [$TPU_ZONE or us-central2-b]
  --project PROJECT      [$TPU_PROJECT or gcloud's default]
  --accelerator TYPE     accelerator type, e.g. v4-8, v4-32, v5p-16 [$TPU_ACCELERATOR or v4-8]
  --version VERSION      TPU VM runtime [$TPU_VERSION or the accelerator's: v4 tpu-ubuntu2204-base,
                         v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e]
  --spot                 create a spot (preemptible) TPU
  --repo URL             repository to clone on the workers [$STEPPO_REPO]
  --ref REF              branch, tag or commit to check out [$STEPPO_REF or main]
  --checkpoint SRC       HF checkpoint: hf://org/model, gs://..., a local directory, or
                         worker:PATH (already on the workers); sets model.hf_path
  --data [OPTION=]SRC    data file, copied to data/ on the workers; sets env.options.OPTION
                         (default path) to it; repeatable. SRC: gs://..., http(s)://..., a local
                         file or worker:PATH
  --prepare COMMAND      run on all workers in the clone after the copy (e.g. build a corpus)
  --mount-bucket BUCKET  mount gs://BUCKET on every worker at <workdir>/gcs with gcsfuse
  --run-dir DIR          run directory on the workers, or gs://... [runs/<name>]
  --results DIR          where fetch puts the run directory here [results/<name>]
  --workdir DIR          repository clone on the workers, relative to home [steppo_jax]
  --no-plan              do not check with `steppo plan` that the config fits before create
  --dry-run              print the commands instead of running them
  -h, --help             this text
USAGE
}

CONFIG=""
NAME="${TPU_NAME:-steppo-${USER:-user}}"
ZONE="${TPU_ZONE:-us-central2-b}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR="${TPU_ACCELERATOR:-v4-8}"
VERSION="${TPU_VERSION:-}"
SPOT=0
REPO="${STEPPO_REPO:-https://github.com/steppo-jax/steppo_jax.git}"
REF="${STEPPO_REF:-main}"
CHECKPOINT=""
DATA=()
PREPARE=""
BUCKET=""
RUN_DIR=""
RESULTS=""
WORKDIR="steppo_jax"
PLAN=1
STAGES=()
OVERRIDES=()

while (($#)); do
  case "$1" in
    --config) CONFIG="${2:?--config needs a value}"; shift ;;
    --name) NAME="${2:?--name needs a value}"; shift ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift ;;
    --project) PROJECT="${2:?--project needs a value}"; shift ;;
    --accelerator) ACCELERATOR="${2:?--accelerator needs a value}"; shift ;;
    --version) VERSION="${2:?--version needs a value}"; shift ;;
    --spot) SPOT=1 ;;
    --repo) REPO="${2:?--repo needs a value}"; shift ;;
    --ref) REF="${2:?--ref needs a value}"; shift ;;
    --checkpoint) CHECKPOINT="${2:?--checkpoint needs a value}"; shift ;;
    --data) DATA+=("${2:?--data needs a value}"); shift ;;
    --prepare) PREPARE="${2:?--prepare needs a value}"; shift ;;
    --mount-bucket) BUCKET="${2:?--mount-bucket needs a value}"; BUCKET="${BUCKET#gs://}"; shift ;;
    --run-dir) RUN_DIR="${2:?--run-dir needs a value}"; shift ;;
    --results) RESULTS="${2:?--results needs a value}"; shift ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    --no-plan) PLAN=0 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    create | install | mount | copy | launch | watch | fetch | delete | status | stop) STAGES+=("$1") ;;
    all) STAGES+=(create install mount copy launch watch fetch delete) ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$CONFIG" ]] || die "--config is required (e.g. --config configs/paper_hotpotqa_qwen2.5_3b.yaml)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$ROOT/$CONFIG" ]] || die "no config '$CONFIG' in this repository (paths are relative to its root)"
[[ -n "$NAME" ]] || die "--name is empty"
((${#STAGES[@]})) || STAGES=(create install mount copy launch watch fetch delete)
if [[ -z "$VERSION" ]]; then  # the runtime each accelerator family boots
  case "$ACCELERATOR" in
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) VERSION="tpu-ubuntu2204-base" ;;
  esac
fi
RUN_DIR="${RUN_DIR:-runs/$NAME}"
RESULTS="${RESULTS:-results/$NAME}"
LOG="steppo_train.log"
PIDFILE="steppo_train.pid"

LOCATION=(--zone "$ZONE")
[[ -z "$PROJECT" ]] || LOCATION+=(--project "$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

on_workers() {  # on_workers WORKER COMMAND: one ssh per worker ("all" or an index)
  run "${TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker="$1" --command "$2"
}

# --data entries: OPTION=SRC, or SRC alone for env.options.path.
data_option() { if [[ "$1" =~ ^[A-Za-z_]+= ]]; then echo "${1%%=*}"; else echo path; fi; }
data_source() { if [[ "$1" =~ ^[A-Za-z_]+= ]]; then echo "${1#*=}"; else echo "$1"; fi; }

# A source from this machine goes to every worker by scp; anything else is fetched by the
# workers themselves.
copy_source() {  # copy_source SRC DIR(checkpoints|data) TARGET(dir|file)
  local src="$1" dir="$2" target="$3" dest
  dest="$(dest_path "$src" "$dir")"
  case "$(source_kind "$src")" in
    worker) ;;
    local)
      on_workers all "mkdir -p $WORKDIR/$dir"
      run "${TPU[@]}" scp --recurse "$src" "$NAME:$WORKDIR/$dir/" "${LOCATION[@]}" --worker=all ;;
    *) on_workers all "cd $WORKDIR && $(fetch_snippet "$src" "$dest" "$target")" ;;
  esac
}

# The directory `steppo plan` reads the model's config.json from (on this machine): a local
# checkpoint itself, else config.json alone fetched into a temporary directory. Fails for a
# worker: checkpoint, which only the workers can read.
plan_model_dir() {
  local src="$1" dir
  case "$(source_kind "$src")" in
    local) (cd "$src" && pwd) ;;
    worker) return 1 ;;
    *)
      dir="$(mktemp -d)"
      case "$(source_kind "$src")" in
        hf) hf download "${src#hf://}" config.json --local-dir "$dir" >&2 ;;
        gs) gcloud storage cp "${src%/}/config.json" "$dir/" >&2 ;;
        http) curl -fsSL -o "$dir/config.json" "${src%/}/config.json" ;;
      esac && echo "$dir" ;;
  esac
}

# Does the run fit the slice? `steppo plan` compiles its programs for the accelerator without
# weights; its report goes to stderr, so --dry-run's stdout stays the list of commands.
plan_check() {
  local args=(plan --config "$CONFIG" --topology "$ACCELERATOR") dir status=0
  if [[ -n "$CHECKPOINT" ]]; then
    if ! dir="$(plan_model_dir "$CHECKPOINT")"; then
      printf '%s: note: cannot plan without the checkpoint'"'"'s config.json here (%s); not checked\n' \
        "$(basename "$0")" "$CHECKPOINT" >&2
      return 0
    fi
    args+=("model.hf_path=$dir")
  fi
  args+=("${OVERRIDES[@]}")
  printf '+ %s\n' "$(quote_all steppo "${args[@]}")" >&2
  (cd "$ROOT" && steppo "${args[@]}") >&2 || status=$?
  if ((status == 1)); then
    printf '%s: error: the run does not fit %s (see steppo plan above; --no-plan skips this check)\n' \
      "$(basename "$0")" "$ACCELERATOR" >&2
    exit 1
  fi
  ((status == 0)) || die "steppo plan failed (exit status $status; --no-plan skips this check)"
}

train_command() {
  local args=(--config "$CONFIG" --run-dir "$RUN_DIR")
  [[ -z "$CHECKPOINT" ]] || args+=("model.hf_path=$(dest_path "$CHECKPOINT" checkpoints)")
  local entry
  for entry in "${DATA[@]}"; do
    args+=("env.options.$(data_option "$entry")=$(dest_path "$(data_source "$entry")" data)")
  done
  args+=("${OVERRIDES[@]}")
  echo "cd $WORKDIR && STEPPO_DISTRIBUTED=1 setsid nohup .venv/bin/steppo train $(quote_all "${args[@]}") > ~/$LOG 2>&1 < /dev/null & echo \$! > ~/$PIDFILE"
}

if ((PLAN)) && [[ " ${STAGES[*]} " == *" create "* ]]; then
  plan_check
fi

for stage in "${STAGES[@]}"; do
  case "$stage" in
    create)
      create=("${TPU[@]}" create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
      ((SPOT == 0)) || create+=(--spot)
      run "${create[@]}" ;;
    install)
      on_workers all "$(install_snippet "$REPO" "$REF" "$WORKDIR" tpu)" ;;
    mount)
      [[ -n "$BUCKET" ]] || continue
      on_workers all "$(gcsfuse_snippet) && mkdir -p $WORKDIR/gcs && gcsfuse --implicit-dirs $BUCKET $WORKDIR/gcs" ;;
    copy)
      [[ -z "$CHECKPOINT" ]] || copy_source "$CHECKPOINT" checkpoints dir
      for entry in "${DATA[@]}"; do
        copy_source "$(data_source "$entry")" data file
      done
      [[ -z "$PREPARE" ]] || on_workers all "cd $WORKDIR && source .venv/bin/activate && $PREPARE" ;;
    launch)
      on_workers all "$(train_command)" ;;
    watch)
      on_workers 0 "tail -n +1 --pid=\$(cat ~/$PIDFILE) -f ~/$LOG" ;;
    status)
      on_workers all "if kill -0 \$(cat ~/$PIDFILE) 2>/dev/null; then echo running; else echo stopped; fi; tail -n 3 ~/$LOG" ;;
    stop)
      on_workers all "kill \$(cat ~/$PIDFILE)" ;;
    fetch)
      run mkdir -p "$RESULTS"
      if [[ "$RUN_DIR" == gs://* ]]; then
        run gcloud storage rsync --recursive "$RUN_DIR" "$RESULTS"
      else
        run "${TPU[@]}" scp --recurse "$NAME:$WORKDIR/$RUN_DIR" "$RESULTS/" "${LOCATION[@]}" --worker=0
        run "${TPU[@]}" scp "$NAME:$LOG" "$RESULTS/" "${LOCATION[@]}" --worker=0
      fi ;;
    delete)
      run "${TPU[@]}" delete "$NAME" "${LOCATION[@]}" --quiet ;;
  esac
done
