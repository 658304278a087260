#!/usr/bin/env bash
# Runs llm_jax on every host of a Cloud TPU VM slice.
#
#   launch/tpu_vm.sh TPU_NAME ZONE setup            # copy this checkout, install on all hosts
#   launch/tpu_vm.sh TPU_NAME ZONE train ARGS...    # same command on all hosts (multi-host run)
#
# e.g. launch/tpu_vm.sh my-v5p europe-west4-b train --config=configs/llama3_8b.py \
#        --workdir=gs://bucket/llama3-8b --config.data.tokenizer_path=/ckpt/tokenizer.json
# Every host runs the same program; jax.distributed.initialize() is called automatically.
set -euo pipefail
tpu=$1 zone=$2 action=$3
shift 3
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }
case "$action" in
  setup)
    gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all \
      "$(git rev-parse --show-toplevel)" "$tpu":llm_jax
    ssh_all "cd llm_jax && pip install -e . 'jax[tpu]' gcsfs"
    ;;
  train)
    ssh_all "cd llm_jax && python3 -m llm_jax.main $(printf '%q ' "$@")"
    ;;
  *)
    echo "unknown action $action (expected setup or train)" >&2
    exit 2
    ;;
esac
