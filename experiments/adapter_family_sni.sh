#!/usr/bin/env bash
# Issue 2 check: each adapter type, trained with `modulora train` on one SNI task (50 instances
# held out), against the base model on the held-out instances. Usage:
#   bash experiments/adapter_family_sni.sh [TASK_JSON] [OUT_DIR]
set -euo pipefail
DATA=${1:-../shared/data/sni/task1146_country_capital.json}
OUT=${2:-runs/adapter-family-sni}
EPOCHS=${EPOCHS:-3}
mkdir -p "$OUT"
export MODULORA_HOME=${MODULORA_HOME:-$HOME/.modulora}
LIB="$OUT/library"
for TYPE in lora series parallel prefix; do
  modulora --library "$LIB" train --data "$DATA" --type "$TYPE" --holdout 50 --epochs "$EPOCHS" \
      --out "$OUT/$TYPE" --add "sni-$TYPE" 2>&1 | sed 's/.*\r//' | tee "$OUT/train-$TYPE.log" | grep -v '^train ' || true
done
modulora --library "$LIB" eval --data "$DATA" --holdout 50 --metric em --show 5 --out "$OUT/eval" \
    --route base --route sni-lora --route sni-series --route sni-parallel --route sni-prefix
