# Helpers shared by the launch scripts in this folder (sourced, never run on its own).
# shellcheck shell=bash

DRY_RUN=0

# One word, quoted for a POSIX shell only when it needs to be (single quotes).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The words, quoted and joined by spaces: a command line a shell reads back as the same words.
quote_all() {
  local first=1 word
  for word in "$@"; do
    ((first)) || printf ' '
    quote "$word"
    first=0
  done
}

# Runs a command, first echoing it on one line ("+ cmd args", quoted as a shell would need).
# With --dry-run (DRY_RUN=1) the line goes to stdout and nothing runs.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_all "$@")"
  else
    printf '+ %s\n' "$(quote_all "$@")" >&2
    "$@"
  fi
}

die() {
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

# Where a source lives: hf (hf://org/model), gs (gs://...), http(s), worker (worker:PATH,
# already on the machines, e.g. under a mounted bucket) or local (a path on this machine).
source_kind() {
  case "$1" in
    hf://*) echo hf ;;
    gs://*) echo gs ;;
    http://* | https://*) echo http ;;
    worker:*) echo worker ;;
    *) echo local ;;
  esac
}

# The path a source gets inside the repository clone on a worker: DIR/basename, or the path
# itself for worker:PATH.
dest_path() {
  local src="$1" dir="$2"
  if [[ "$(source_kind "$src")" == worker ]]; then
    echo "${src#worker:}"
  else
    local name="${src%/}"
    echo "$dir/${name##*/}"
  fi
}

# A shell snippet, run on a worker inside the clone, that fetches a remote source to DEST.
# TARGET is dir (a checkpoint) or file (a data file).
fetch_snippet() {
  local src="$1" dest="$2" target="$3"
  case "$(source_kind "$src")" in
    hf) echo "mkdir -p $dest && .venv/bin/hf download ${src#hf://} --local-dir $dest" ;;
    gs)
      if [[ "$target" == dir ]]; then
        echo "mkdir -p $dest && gcloud storage rsync --recursive $src $dest"
      else
        echo "mkdir -p ${dest%/*} && gcloud storage cp $src $dest"
      fi ;;
    http) echo "curl -fL --create-dirs -o $dest $src" ;;
    *) return 1 ;;
  esac
}

# The snippet a worker runs to clone (or update) the repository and install it with the
# accelerator's JAX build: install_snippet REPO_URL REF WORKDIR JAX_EXTRA.
install_snippet() {
  local repo="$1" ref="$2" workdir="$3" jax_extra="$4"
  echo "(test -d $workdir/.git || git clone $repo $workdir) && cd $workdir && git fetch origin $ref && git checkout --detach FETCH_HEAD" \
    "&& (test -x .venv/bin/python || python3 -m venv .venv) && .venv/bin/pip install -q --upgrade pip" \
    "&& .venv/bin/pip install -q -e '.[envs,gcs]' 'jax[$jax_extra]==0.10.2'"
}

# The snippet that installs gcsfuse from Google's apt repository on an Ubuntu worker.
gcsfuse_snippet() {
  echo "(command -v gcsfuse > /dev/null || (curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null" \
    "&& echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list" \
    "&& sudo apt-get update -q && sudo apt-get install -y -q gcsfuse))"
}
