"""Property-based fuzzing of the input side: whatever a user writes, the validation entry points
either accept it or raise a PrefkitError (one clear message); never any other exception.

Recipes and compare recipes are perturbations of the tiny ones (a key set to junk, removed, or
added); data rows are random dicts; files are random bytes under every supported suffix; YAML and
overrides are random text. ``derandomize=True`` and a fixed ``max_examples`` keep CI deterministic
and fast (a few seconds each).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from prefkit.api import PrefkitError
from prefkit.compare.recipe import apply_compare_overrides, validate_compare
from prefkit.data.io import read_file
from prefkit.data.rows import check_rows, detect_format
from prefkit.inputs import load_yaml
from prefkit.loops import check_recipe
from prefkit.plugins import load_registry
from prefkit.loops.preflight import preflight
from prefkit.recipe import Recipe, apply_overrides, validate_recipe

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = load_registry()
WORK = Path(tempfile.mkdtemp(prefix="prefkit-fuzz-"))
TINY = yaml.safe_load((ROOT / "recipes" / "dpo_tiny.yaml").read_text())
TINY.update(output_dir=str(WORK / "run"), cache_dir=str(WORK / "cache"))
COMPARE = yaml.safe_load((ROOT / "recipes" / "compare_tiny.yaml").read_text())
COMPARE.update(output_dir=str(WORK / "compare"), cache_dir=str(WORK / "cache"))

FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----------------------------------------------------------------------------- values


ODD_TEXT = st.sampled_from(["", " ", "inf", "-inf", "nan", "1e999", "0", "-1", "tiny-prefs", "tiny-pref", "dpo",
                            "tiny-llama", "smollm2-135m-instruc", "org/name", "../x", "/", "~", "a" * 300,
                            "x.jsonl", "\ud800", "caf\u00e9", "\u202e", "a\x00b", "null", "[", "{"])
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | ODD_TEXT)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8) | ODD_TEXT, inner, max_size=4), max_leaves=12)


def schema_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of a pydantic model, nested models included."""
    out = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        out.append(path)
        annotation = info.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                out += schema_paths(candidate, path)
    return out


def document_paths(data: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out += [path, *document_paths(value, path)]
    elif isinstance(data, list):
        for i, value in enumerate(data):
            path = f"{prefix}.{i}" if prefix else str(i)
            out += [path, *document_paths(value, path)]
    return out


RECIPE_PATHS = sorted(set(schema_paths(Recipe) + document_paths(TINY)
                          + [f"objective.params.{k}" for k in REGISTRY.objectives["dpo"].Params.model_fields]
                          + [f"model.options.{k}" for k in REGISTRY.model_sources["tiny-llama"].Params.model_fields]))
COMPARE_PATHS = sorted(set(document_paths(COMPARE)))


def perturb(base: dict, paths: list[str]):
    """A strategy: ``base`` with one to three keys set to junk, removed, or added."""
    change = st.tuples(st.sampled_from(["set", "delete", "add"]), st.sampled_from(paths), JUNK,
                       st.text(min_size=1, max_size=10) | ODD_TEXT)
    return st.lists(change, min_size=1, max_size=3).map(lambda changes: _apply(base, changes))


def _apply(base: dict, changes) -> dict:
    data = copy.deepcopy(base)
    for action, path, value, extra in changes:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {}) if not isinstance(node.get(part), (dict, list)) else node[part]
            else:
                break
        else:
            key: Any = int(last) if isinstance(node, list) and last.isdigit() else last
            if isinstance(node, list) and not (isinstance(key, int) and key < len(node)):
                continue
            if action == "set":
                node[key] = value
            elif action == "delete" and isinstance(node, dict):
                node.pop(key, None)
            elif action == "add" and isinstance(node, dict):
                node[extra] = value
    return data


def accepted_or_clear(call) -> None:
    try:
        call()
    except PrefkitError as exc:
        assert str(exc).strip(), "an empty error message"


# ----------------------------------------------------------------------------- recipes


@settings(FUZZ, max_examples=400)
@given(perturb(TINY, RECIPE_PATHS))
def test_random_recipes_are_accepted_or_refused_clearly(data):
    def validate():
        loaded = validate_recipe(data, "fuzz.yaml", registry=REGISTRY)
        check_recipe(loaded)
        loaded.resolved_dict()

    accepted_or_clear(validate)


NUMERIC = [p for p in RECIPE_PATHS if p.startswith(("train.", "data.max", "sampling.", "seed", "objective.params"))]


@settings(FUZZ, max_examples=120)
@given(perturb(TINY, NUMERIC))
def test_random_budgets_pass_preflight_or_are_refused_clearly(data):
    def validate():
        loaded = validate_recipe(data, "fuzz.yaml", registry=REGISTRY)
        check_recipe(loaded)
        preflight(loaded, REGISTRY, command="validate")

    accepted_or_clear(validate)


@settings(FUZZ, max_examples=60)
@given(perturb(COMPARE, COMPARE_PATHS))
def test_random_compare_recipes_are_accepted_or_refused_clearly(data):
    accepted_or_clear(lambda: validate_compare(data, "fuzz-compare.yaml", registry=REGISTRY))


@settings(FUZZ, max_examples=200)
@given(st.lists(st.text(max_size=40) | st.sampled_from(["=", "a.=1", ".a=1", "train.lr=.inf", "arms.x.y=1",
                                                        "arms.99.params.beta=1", "seed={a: 1, a: 2}"]), max_size=3))
def test_random_overrides(overrides):
    accepted_or_clear(lambda: validate_recipe(apply_overrides(copy.deepcopy(TINY), overrides), "o.yaml",
                                              registry=REGISTRY))
    accepted_or_clear(lambda: apply_compare_overrides(copy.deepcopy(COMPARE), overrides))


@settings(FUZZ, max_examples=300)
@given(st.text(max_size=200) | st.sampled_from(["a: [", "{a: 1, a: 2}", "a: &x [*x]", "? [1]\n: 2", "!!python/object:os.system x",
                                               "a: !!binary 'zz'", "- " * 200]))
def test_random_yaml_text(text):
    accepted_or_clear(lambda: load_yaml(text, "t.yaml"))


# ----------------------------------------------------------------------------- data


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "robot", ""]) | JUNK,
                                 "content": st.text(max_size=20) | JUNK})
HUGE = st.integers(min_value=10_000, max_value=200_000).map(lambda n: "long text " * n)
TEXTISH = st.text(max_size=40) | ODD_TEXT | st.lists(MESSAGE, max_size=3) | JUNK | HUGE
ROW = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "completion", "label", "margin", "extra"]),
                      TEXTISH, max_size=6)


@settings(FUZZ, max_examples=300)
@given(st.lists(ROW, min_size=1, max_size=6), st.sampled_from(["auto", "standard", "conversational"]))
def test_random_rows_are_checked_never_crash(rows, fmt):
    for kind in REGISTRY.data_kinds.values():
        chosen = detect_format(rows, kind.text_fields) if fmt == "auto" else fmt
        checked = check_rows(rows, kind, chosen)
        assert len(checked.examples) + checked.bad_rows == len(rows)
        for row, message in checked.problems:
            assert 1 <= row <= len(rows) and isinstance(message, str) and message


@settings(FUZZ, max_examples=200)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_random_files_are_read_or_refused_clearly(content, suffix):
    path = WORK / f"random{suffix}"
    path.write_bytes(content)
    accepted_or_clear(lambda: read_file(path, "train"))


TOKENIZER = None


def tiny_tokenizer():
    global TOKENIZER
    if TOKENIZER is None:
        from prefkit.models.tiny import build_tiny_tokenizer

        TOKENIZER = build_tiny_tokenizer()
    return TOKENIZER


@settings(FUZZ, max_examples=100)
@given(st.lists(ROW, min_size=1, max_size=4), st.sampled_from(sorted(REGISTRY.data_kinds)),
       st.sampled_from(["error", "skip"]), st.sampled_from(["truncate", "drop", "error"]))
def test_random_rows_through_the_whole_data_path(rows, kind, bad_rows, truncation):
    """Rows -> JSONL file -> read, check, chat template, tokens, lengths: accepted or one clear error."""
    import json

    from prefkit.data.prepare import prepare_dataset
    from prefkit.recipe import DataConfig

    path = WORK / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DataConfig(train=str(path), max_length=64, max_prompt_length=32, bad_rows=bad_rows, truncation=truncation)
    accepted_or_clear(lambda: prepare_dataset(cfg, tiny_tokenizer(), REGISTRY.data_kinds[kind], registry=REGISTRY))
