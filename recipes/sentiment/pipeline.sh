#!/usr/bin/env bash
# The controlled-sentiment experiment end to end, each stage timed:
#   bash recipes/sentiment/pipeline.sh          # SmolLM2-135M-Instruct -> runs/sentiment/  (about 2 h on 2 CPU cores)
#   bash recipes/sentiment/pipeline.sh tiny     # the tiny random model -> runs/sentiment-tiny/ (CI, about a minute)
# Run it from the directory that should hold runs/. A finished run directory is never overwritten:
# delete runs/sentiment (or runs/sentiment-tiny) to start again. PREFKIT overrides the command
# (default: prefkit).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
suffix=""
out="runs/sentiment"
if [[ "${1:-}" == "tiny" ]]; then
  suffix="_tiny"
  out="runs/sentiment-tiny"
elif [[ -n "${1:-}" ]]; then
  echo "usage: bash $0 [tiny]" >&2
  exit 2
fi
read -r -a prefkit <<< "${PREFKIT:-prefkit}"

stage() {
  local name="$1"
  shift
  local started=$SECONDS
  echo "== stage $name: prefkit $*"
  "${prefkit[@]}" "$@"
  echo "== stage $name: $((SECONDS - started)) s"
}

started=$SECONDS
# 1. The starting model's completions of the training prompts, and of the held-out prompts (only to
#    measure the reward model on prompts it was not trained on), each scored by the gold reward.
stage 1-sample sample "$here/sample$suffix.yaml"
stage 1-sample-heldout sample "$here/sample$suffix.yaml" data.train_split=test "output_dir=$out/heldout"
# 2. Preference pairs: every two completions of a prompt with different gold scores.
stage 2-label label "$out/samples.jsonl" --mode all-pairs --output "$out/pairs.jsonl"
stage 2-label-heldout label "$out/heldout/samples.jsonl" --mode all-pairs --output "$out/heldout/pairs.jsonl"
# 3. The learned reward: a Bradley-Terry model on the pairs (held-out accuracy on the held-out pairs).
stage 3-reward-model run "$here/bt_reward$suffix.yaml"
# 4. Every arm trained on the same pairs, seed and budget, then measured identically.
stage 4-compare compare "$here/compare$suffix.yaml"
echo "== pipeline: $((SECONDS - started)) s in all; report: $out/compare/report.md"
