#!/bin/bash
# The demo inside the image (the `train` service of docker/compose.yaml): prepare the
# standard library as a byte-level corpus, train the tiny n=4 model, export it, and
# complete a held-out function with plain and with self-speculative greedy decoding,
# which must agree. Metrics go to MLFLOW_TRACKING_URI (the compose MLflow server).
# Re-running continues the same run (it is already finished the second time).
#
# Settings (environment):
#   DEMO_STEPS       training steps (default 150, about ten minutes on 2 CPU cores)
#   DEMO_SOURCE      what `mtp prepare --source` reads (default: stdlib, the whole standard library)
#   DEMO_DATA        prepared data directory (default runs/data/stdlib-byte)
#   DEMO_VAL_FRACTION  share of documents held out for validation (default: mtp prepare's 0.01;
#                    a source of a few dozen files needs more, e.g. 0.2, to hold any)
#   DEMO_RUN         run directory (default runs/demo)
#   DEMO_NEW_TOKENS  tokens each completion generates (default 128)
# Any arguments are extra `mtp train` overrides (key.sub=value).
set -euo pipefail

STEPS=${DEMO_STEPS:-150}
DATA=${DEMO_DATA:-runs/data/stdlib-byte}
RUN=${DEMO_RUN:-runs/demo}
NEW_TOKENS=${DEMO_NEW_TOKENS:-128}
CONFIG=/opt/mtp/configs/tiny-cpu.yaml
read -ra SOURCE <<< "${DEMO_SOURCE:-stdlib}"
VAL=()
[ -n "${DEMO_VAL_FRACTION:-}" ] && VAL=(--val-fraction "$DEMO_VAL_FRACTION")

if [ ! -f "$DATA/manifest.json" ]; then
  mtp prepare --source "${SOURCE[@]}" --tokenizer byte --out "$DATA" "${VAL[@]}"
fi
mtp train --config "$CONFIG" model.n_future=4 run.dir="$RUN" data.dir="$DATA" train.max_steps="$STEPS" \
  schedule.warmup_steps=$(( STEPS / 10 )) train.eval_interval=$(( (STEPS + 2) / 3 )) \
  checkpoint.interval=$(( (STEPS + 2) / 3 )) "$@"
rm -f "$RUN/model.safetensors"
mtp export --checkpoint "$RUN" --out "$RUN/model.safetensors"
echo "== a held-out stdlib function completed by plain greedy decoding (head 1) =="
mtp generate --model "$RUN/model.safetensors" --heldout-function 1 --max-new-tokens "$NEW_TOKENS" \
  --speculative off --stats --echo | tee "$RUN/plain.txt"
echo "== the same with self-speculative decoding: heads 2-4 draft, head 1 verifies =="
mtp generate --model "$RUN/model.safetensors" --heldout-function 1 --max-new-tokens "$NEW_TOKENS" \
  --speculative 4 --stats --echo > "$RUN/speculative.txt"
cmp "$RUN/plain.txt" "$RUN/speculative.txt"
echo "== speculative greedy output is identical to plain greedy decoding =="
