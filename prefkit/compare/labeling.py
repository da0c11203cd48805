"""Labelling preference pairs from sampled completions with a gold reward: ``prefkit label``.

Input: the JSONL that ``prefkit sample`` writes (one object per sample, with ``prompt``,
``completion`` and ``prompt_index``; ``score`` when the sampling recipe had a reward). Every
completion is scored by the gold reward function (or its ``score`` column is reused), completions
are grouped by prompt, and pairs are written in prefkit's standard format::

    {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 0.42}

- ``best-worst``: per prompt, the best-scored completion against the worst-scored one;
- ``all-pairs``: every two completions of a prompt whose scores differ, the higher one chosen;
- ``unpaired``: KTO's data (prompt, completion, label): per prompt, each completion scored above
  the mean of that prompt's completions is desirable (``label: true``), each one below it is
  undesirable; completions exactly at the mean are dropped as ties. One gold label per sample.

Ties (equal scores, or the same text) are dropped, as are empty completions (a pair needs two
non-empty answers). A conversational prompt (a list of messages) gives conversational pairs: the
answers become one assistant message each. ``margin`` is the score difference (chosen − rejected),
which ``bt_reward`` can use (``use_margin``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefkit.api.errors import DataError, PrefkitError

Mode = Literal["best-worst", "all-pairs", "unpaired"]
MODES = ("best-worst", "all-pairs", "unpaired")


def check_mode(mode: str) -> None:
    """Refuse a labelling mode that is not one of :data:`MODES`."""
    if mode not in MODES:
        raise PrefkitError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")


@dataclass
class Completion:
    line: int  # 1-based line in the samples file
    prompt_key: str
    prompt: Any
    text: str
    sample_index: int
    score: float | None = None


@dataclass
class LabelReport:
    samples: str
    output: str
    mode: str
    reward: str
    rescored: bool  # scores came from the reward function (not the file's score column)
    samples_read: int = 0
    prompts: int = 0
    empty_dropped: int = 0
    pairs: int = 0
    ties_dropped: int = 0
    prompts_without_pair: int = 0
    mean_margin: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


def read_samples(path: Path | str) -> list[Completion]:
    """Read ``prefkit sample`` output; a row needs ``prompt`` and ``completion`` (strings or messages)."""
    from prefkit.data.io import json_object_lines
    from prefkit.inputs import InputError, read_text

    path = Path(path)
    try:
        content = read_text(path)
    except InputError as exc:
        raise DataError(str(exc)) from None
    rows: list[Completion] = []
    problems: list[str] = []
    for line_no, row, problem in json_object_lines(content):
        if problem is not None:
            problems.append(f"line {line_no}: {problem}")
            continue
        prompt, text = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, (str, list)) or not prompt:
            problems.append(f"line {line_no}: field 'prompt' is missing or not a string / list of messages")
            continue
        if not isinstance(text, str):
            problems.append(f"line {line_no}: field 'completion' is missing or not a string")
            continue
        score = row.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            problems.append(f"line {line_no}: field 'score' is not a number")
            continue
        try:
            finite = score is None or math.isfinite(score)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            shown = str(score) if len(str(score)) <= 40 else f"{str(score)[:20]}... ({len(str(score))} digits)"
            problems.append(f"line {line_no}: field 'score' is not a finite number ({shown})")
            continue
        index = row.get("prompt_index")
        key = f"i:{index}" if isinstance(index, int) else "p:" + json.dumps(prompt, sort_keys=True)
        sample_index = row.get("sample_index", len(rows))
        rows.append(Completion(line_no, key, prompt, text, int(sample_index) if isinstance(sample_index, int)
                               else len(rows), None if score is None else float(score)))
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataError(f"{path}: not prefkit sample output:\n  {shown}")
    if not rows:
        raise DataError(f"{path}: no samples")
    return rows


def make_pairs(completions: list[Completion], mode: Mode) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pairs from scored completions, grouped by prompt; ties and empty completions are dropped."""
    check_mode(mode)
    groups: dict[str, list[Completion]] = {}
    counts = {"empty_dropped": 0, "ties_dropped": 0, "prompts_without_pair": 0}
    for c in completions:
        groups.setdefault(c.prompt_key, [])
        if not c.text.strip():
            counts["empty_dropped"] += 1
            continue
        groups[c.prompt_key].append(c)
    pairs: list[dict[str, Any]] = []
    for members in groups.values():
        members = sorted(members, key=lambda c: c.sample_index)
        if mode == "unpaired":
            rows, ties = _unpaired(members)
            counts["ties_dropped"] += ties
            counts["prompts_without_pair"] += not rows
            pairs.extend(rows)
            continue
        found: list[tuple[Completion, Completion]] = []
        if mode == "best-worst":
            if len(members) >= 2:
                best = max(members, key=lambda c: (c.score, -c.sample_index))  # ties: the first
                worst = min(members, key=lambda c: (c.score, c.sample_index))
                if best.score == worst.score or best.text == worst.text:
                    counts["ties_dropped"] += 1
                else:
                    found.append((best, worst))
        else:
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    if a.score == b.score or a.text == b.text:
                        counts["ties_dropped"] += 1
                    else:
                        found.append((a, b) if a.score > b.score else (b, a))
        if not found:
            counts["prompts_without_pair"] += 1
        for chosen, rejected in found:
            pairs.append(_pair(chosen, rejected))
    return pairs, counts


def _unpaired(members: list[Completion]) -> tuple[list[dict[str, Any]], int]:
    """KTO rows from one prompt's completions: above the prompt's mean score desirable, below it not."""
    if len(members) < 2:
        return [], 0
    mean = math.fsum(c.score for c in members) / len(members)
    rows, ties = [], 0
    for c in members:
        if c.score == mean:
            ties += 1
            continue
        answer = [{"role": "assistant", "content": c.text}] if isinstance(c.prompt, list) else c.text
        rows.append({"prompt": c.prompt, "completion": answer, "label": c.score > mean, "score": float(c.score)})
    if rows and len({r["label"] for r in rows}) == 1:  # every completion on one side: nothing to contrast
        return [], ties + len(rows)
    return rows, ties


def _pair(chosen: Completion, rejected: Completion) -> dict[str, Any]:
    conversational = isinstance(chosen.prompt, list)

    def answer(text: str) -> Any:
        return [{"role": "assistant", "content": text}] if conversational else text

    return {"prompt": chosen.prompt, "chosen": answer(chosen.text), "rejected": answer(rejected.text),
            "margin": float(chosen.score) - float(rejected.score)}


def reward_from_options(name: str, params: list[str] | None, registry: Any) -> tuple[Any, Any]:
    """``--reward NAME --reward-param k=v ...`` -> (RewardConfig, the reward function's validated Params).

    Values are read as YAML (``targets=[e]`` is a list); a dotted key makes a nested mapping.
    """
    from pydantic import ValidationError

    from prefkit.api.errors import RecipeError
    from prefkit.recipe import RewardConfig, apply_overrides
    function = registry.reward_functions.get(name)
    if function is None:
        known = ", ".join(sorted(registry.reward_functions)) or "none"
        raise PrefkitError(f"--reward: unknown reward function {name!r}; registered: {known}")
    try:
        values = apply_overrides({}, list(params or []))
    except RecipeError as exc:
        raise PrefkitError("--reward-param: " + "; ".join(f"{p}: {m}" for p, m in exc.problems)) from None
    try:
        validated = function.Params.model_validate(values)
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            where = ".".join(str(p) for p in item["loc"])
            message = "unknown parameter" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"{where}: {message}")
        raise PrefkitError(f"--reward-param for {name!r}: " + "; ".join(problems)) from None
    return RewardConfig(name=name, params=values), validated


def _scored_by(samples: Path) -> str | None:
    """The reward named in the ``prefkit sample`` summary beside the samples file, if there is one."""
    from prefkit.models.sampling import summary_path

    try:
        summary = json.loads(summary_path(samples).read_text())
    except (OSError, ValueError):
        return None
    name = summary.get("reward") if isinstance(summary, dict) else None
    return name if isinstance(name, str) else None


def label_samples(samples: Path | str, output: Path | str, *, reward: Any, reward_params: Any = None,
                  mode: Mode = "best-worst", rescore: bool = False, margin: bool = True,
                  cache_dir: Path | None = None, registry: Any) -> LabelReport:
    """Score sampled completions with ``reward`` (a RewardConfig) and write preference pairs.

    The file's ``score`` column is reused when every row has one, ``rescore`` is false, and
    ``reward`` is None or names the reward the samples were scored with (per the ``prefkit sample``
    summary beside the file, when there is one); otherwise every completion is scored by ``reward``. Returns the counts, also
    written beside the output as ``<stem>.summary.json``.
    """
    from prefkit.models.rewards import build_reward
    from prefkit.models.sampling import _write_atomic, summary_path

    started = time.perf_counter()
    check_mode(mode)
    completions = read_samples(samples)
    scored = all(c.score is not None for c in completions)
    scored_by = _scored_by(Path(samples)) if scored else None
    reuse = scored and not rescore and (reward is None or scored_by in (None, reward.name))
    if not reuse and reward is None:
        raise PrefkitError(f"{samples}: not every row has a 'score'; name the gold reward with --reward")
    if not reuse:
        import torch

        if cache_dir is None:
            import os

            env = os.environ.get("PREFKIT_CACHE")
            cache_dir = Path(env).expanduser() if env else Path.home() / ".cache" / "prefkit"
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        scorer = build_reward(reward, reward_params, cache_dir=cache_dir, device=device, registry=registry,
                              key="--reward")
        scores = scorer([c.prompt for c in completions], [c.text for c in completions])
        for c, s in zip(completions, scores):
            c.score = float(s)
    pairs, counts = make_pairs(completions, mode)
    if not pairs:  # an empty pairs file would only fail later, in the run that reads it
        raise PrefkitError(
            f"{samples}: no preference pairs: every one of the {len({c.prompt_key for c in completions})} prompts' "
            f"completions tied or were identical ({counts.get('ties_dropped', 0)} ties dropped); sample more "
            f"completions per prompt (sampling.num_samples), at a higher temperature, or use a finer reward. "
            f"{output} was not written")
    if not margin:
        for pair in pairs:
            pair.pop("margin", None)
    output = Path(output)
    _write_atomic(output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    margins = [p["margin"] for p in pairs if "margin" in p]
    report = LabelReport(
        samples=str(samples), output=str(output), mode=mode,
        reward=f"{scored_by or (reward.name if reward else 'unknown')} (the file's score column)" if reuse
        else reward.name, rescored=not reuse,
        samples_read=len(completions), prompts=len({c.prompt_key for c in completions}), pairs=len(pairs),
        mean_margin=sum(margins) / len(margins) if margins else None,
        seconds=round(time.perf_counter() - started, 3), **counts,
    )
    _write_atomic(summary_path(output), json.dumps(report.to_dict(), indent=2) + "\n")
    return report
