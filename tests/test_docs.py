"""The docs match the code: every recipe key is documented, every documented key exists."""

import re
from pathlib import Path

from prefkit.recipe import (DataConfig, LoraConfig, ModelConfig, ObjectiveConfig, Recipe, RewardConfig,
                            SamplingConfig, TrainConfig)

DOCS = Path(__file__).resolve().parent.parent / "docs"
SECTIONS = {"": Recipe, "model": ModelConfig, "data": DataConfig, "objective": ObjectiveConfig,
            "train": TrainConfig, "lora": LoraConfig, "reward": RewardConfig, "sampling": SamplingConfig}


def documented_keys(text: str) -> dict[str, set[str]]:
    """Keys in the first column of each table, by the `## section` they stand under."""
    found: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        heading = re.match(r"^## `(\w+)`", line)
        if heading:
            section = heading.group(1)
        elif line.startswith("## "):
            section = ""
        cell = re.match(r"^\| `([\w.]+)` \|", line)
        if cell:
            key = cell.group(1)
            if key.startswith("lora."):
                found.setdefault("lora", set()).add(key.split(".", 1)[1])
            else:
                found.setdefault(section, set()).add(key)
    return found


def test_every_recipe_key_is_documented_and_no_other():
    found = documented_keys((DOCS / "recipes.md").read_text())
    for section, model in SECTIONS.items():
        assert found.get(section, set()) == set(model.model_fields), section


def section_text(text: str, section: str) -> str:
    """The part of the page under ``## `section` `` (the top-level table for "")."""
    if section in ("", "lora"):
        start = text.index("## Top level") if section == "" else text.index("## `model`")
    else:
        start = text.index(f"## `{section}`")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_documented_defaults_match_the_code():
    text = (DOCS / "recipes.md").read_text()
    for section, model in SECTIONS.items():
        part = section_text(text, section)
        for name, field in model.model_fields.items():
            if field.is_required() or field.default_factory is not None:
                continue
            key = f"lora.{name}" if section == "lora" else name
            row = re.search(rf"^\| `{re.escape(key)}` \| `?([^|`]*)`? \|", part, re.M)
            assert row, key
            value, default = row.group(1).strip(), field.default
            if isinstance(default, bool) or default is None:
                assert value == {None: "null", True: "true", False: "false"}[default], (key, value)
            elif isinstance(default, (int, float)):
                assert float(value) == default, (key, value)
            elif isinstance(default, tuple):
                assert value == "[" + ", ".join(str(v) for v in default) + "]", (key, value)
            else:
                assert value == str(default), (key, value)


def test_relative_links_and_images_in_the_docs_point_at_files_that_exist():
    root = DOCS.parent
    pages = [root / "README.md", *DOCS.rglob("*.md"), *(root / "recipes").rglob("*.md")]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands, not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the same page
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(root)}: {target}")
    assert not broken, broken
