#!/usr/bin/env bash
# Start TensorFlow Serving in Docker on a dplg-export model base path.
#   serving/run_tf_serving.sh models/dplg [image tag, default 2.21.0]
# Each version replays its assets.extra/tf_serving_warmup_requests (written by
# dplg-export) before it serves. Change the served models without a restart:
#   python serving/reload_models.py --server=127.0.0.1:8500 new_models.config
set -euo pipefail
base=$(cd "${1:?usage: $0 MODEL_BASE_PATH [TF_SERVING_VERSION]}" && pwd)
tag=${2:-2.21.0}
here=$(cd "$(dirname "$0")" && pwd)
ls "$base" | grep -qE '^[0-9]+$' || { echo "$base has no integer version folder; run dplg-export" >&2; exit 1; }
exec docker run --rm --name dplg-serving \
  -p 127.0.0.1:8500:8500 -p 127.0.0.1:8501:8501 \
  -v "$base:/models/dplg:ro" -v "$here:/config:ro" \
  "tensorflow/serving:$tag" \
  --port=8500 --rest_api_port=8501 \
  --model_config_file=/config/models.config \
  --file_system_poll_wait_seconds=1 \
  --enable_batching=true --batching_parameters_file=/config/batching_parameters.txt \
  --monitoring_config_file=/config/monitoring.config \
  --enable_model_warmup=true
