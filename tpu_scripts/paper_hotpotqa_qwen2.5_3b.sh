#!/usr/bin/env bash
# The paper's HotpotQA run: StepPO on Qwen2.5-3B-Instruct (configs/paper_hotpotqa_qwen2.5_3b.yaml)
# on a v5e-32 pod slice (v5litepod-32: 8 hosts, 32 chips; the config's mesh is fsdp 16 x tensor 2,
# which `steppo plan` finds fits in 16 GiB a chip), from creation to teardown. The workers
# download the checkpoint from the Hugging Face Hub and the HotpotQA train and dev splits from
# its authors' site, then build the retrieval corpus from both (configs/..., env.options.corpus).
#
#   tpu_scripts/paper_hotpotqa_qwen2.5_3b.sh --dry-run          # print every command
#   tpu_scripts/paper_hotpotqa_qwen2.5_3b.sh --zone us-east5-a --accelerator v5p-8 \
#     -- mesh.fsdp=4 mesh.tensor=1 optim.micro_batch_rows=4     # also fits, see docs/tpu_gpu.md
#   tpu_scripts/paper_hotpotqa_qwen2.5_3b.sh watch              # one stage (see tpu_run.sh)
#
# Any tpu_run.sh option or stage may follow and overrides these defaults; so do the environment
# variables TPU_NAME, TPU_ACCELERATOR, TPU_ZONE, CHECKPOINT, DATA and EVAL_DATA.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/tpu_run.sh" \
  --config configs/paper_hotpotqa_qwen2.5_3b.yaml \
  --name "${TPU_NAME:-steppo-hotpotqa-qwen25-3b}" \
  --accelerator "${TPU_ACCELERATOR:-v5litepod-32}" \
  --zone "${TPU_ZONE:-us-west4-a}" \
  --checkpoint "${CHECKPOINT:-hf://Qwen/Qwen2.5-3B-Instruct}" \
  --data "path=${DATA:-http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_train_v1.1.json}" \
  --data "eval_path=${EVAL_DATA:-http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json}" \
  --prepare "python -m steppo_jax.envs.corpus data/hotpot_corpus.jsonl data/hotpot_train_v1.1.json data/hotpot_dev_distractor_v1.json" \
  "$@"
