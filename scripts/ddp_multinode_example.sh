#!/usr/bin/env bash
# Multi-node training with the console entry point, under torchrun or srun (docs/scaling.md).
#
#   scripts/ddp_multinode_example.sh torchrun teacher   # run on every node; HEAD_NODE, NNODES set
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 scripts/ddp_multinode_example.sh srun distill
#
# Environment: ENV (Kedro env, default imagenet256), NNODES, GPUS_PER_NODE (default 8),
# HEAD_NODE (torchrun rendezvous host), PORT (default 29500), OUT (default runs/).
# Inputs are the latest versions the catalog holds under data_root.
set -euo pipefail

LAUNCHER=${1:?usage: $0 torchrun|srun teacher|distill}
STAGE=${2:?usage: $0 torchrun|srun teacher|distill}
ENV=${ENV:-imagenet256}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PORT=${PORT:-29500}
OUT=${OUT:-runs}
mkdir -p "$OUT"

# The parameters the Kedro node would get, interpolations resolved.
CONFIG="$OUT/params_${ENV}.yaml"
ROOT=$(python - "$ENV" "$CONFIG" <<'PY'
import sys
import yaml
from kedro.config import OmegaConfigLoader
from ibmd_pipeline.settings import CONFIG_LOADER_ARGS
loader = OmegaConfigLoader("conf", env=sys.argv[1], **CONFIG_LOADER_ARGS)
params = loader["parameters"]
with open(sys.argv[2], "w") as handle:
    yaml.safe_dump({k: params[k] for k in ("teacher", "distill", "task", "seed", "engine")}, handle)
print(loader["globals"]["data_root"])
PY
)

latest() {  # the file of the newest version of a versioned catalog entry: <entry>/<version>/<name>
    python - "$1" <<'PY'
import sys
from ibmd_pipeline.engine.catalog_files import latest_version_file
try:
    print(latest_version_file(sys.argv[1]))
except FileNotFoundError as err:
    sys.exit(f"{err}: run the upstream pipeline first")
PY
}

if [ "$STAGE" = teacher ]; then
    ARGS=(--stage teacher --config "$CONFIG"
          --data "$(latest "$ROOT/05_model_input/pairs_train.npz")"
          --val-data "$(latest "$ROOT/05_model_input/pairs_val.npz")"
          --output "$OUT/teacher.pt" --register-catalog "$ROOT/06_models/teacher.pt")
else
    ARGS=(--stage distill --config "$CONFIG"
          --data "$(latest "$ROOT/05_model_input/corrupted_train.npz")"
          --teacher "$(latest "$ROOT/06_models/teacher.pt")"
          --output "$OUT/student.pt" --register-catalog "$ROOT/06_models/student.pt")
fi

case "$LAUNCHER" in
    torchrun)
        exec torchrun --nnodes "${NNODES:?set NNODES}" --nproc-per-node "$GPUS_PER_NODE" \
            --rdzv-backend c10d --rdzv-endpoint "${HEAD_NODE:?set HEAD_NODE}:$PORT" --rdzv-id "ibmd-$STAGE" \
            -m ibmd_pipeline.commands.train "${ARGS[@]}" ;;
    srun)
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        export MASTER_ADDR MASTER_PORT=$PORT
        exec srun python -m ibmd_pipeline.commands.train "${ARGS[@]}" ;;
    *)
        echo "unknown launcher '$LAUNCHER': torchrun | srun" >&2; exit 2 ;;
esac
