"""The plugin docs match the code: every hook's signature and docstring, and the field tables."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from prefkit.api import hookspecs
from prefkit.api import LossInputs, Needs
from prefkit.plugins import hook_names

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins"
HOOKS = (DOCS / "hooks.md").read_text()


def documented_hooks(text: str) -> dict[str, str]:
    """``## `name` `` heading -> the first python code block under it."""
    found = {}
    for match in re.finditer(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL):
        block = re.search(r"^```python\n(.*?)^```", match.group(2), re.MULTILINE | re.DOTALL)
        assert block, f"no python block under ## `{match.group(1)}`"
        found[match.group(1)] = block.group(1)
    return found


def expected_block(name: str) -> str:
    spec = getattr(hookspecs, name)
    options = {k: v for k, v in spec.prefkit_spec.items() if v not in (False, None)}
    marker = "@hookimpl" + (f"({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else "")
    doc = inspect.getdoc(spec)
    indented = "\n".join(("    " + line) if line else "" for line in doc.splitlines())
    return f'{marker}\ndef {name}{inspect.signature(spec)}:\n    """{indented.strip()}"""\n'


def test_every_hook_is_documented_and_no_other():
    assert set(documented_hooks(HOOKS)) == set(hook_names())
    assert hook_names(), "no hook specifications found"


def test_documented_signatures_and_docstrings_match_the_hookspecs():
    for name, block in documented_hooks(HOOKS).items():
        assert block == expected_block(name), f"docs/plugins/hooks.md, hook {name}: update it from prefkit/api/hookspecs.py"


def table_keys(text: str, header: str) -> list[str]:
    """First-column keys of the markdown table whose header row starts with ``| header |``."""
    start = text.index(f"| {header} |")
    keys = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        keys.append(re.match(r"^\| `(\w+)", line).group(1))
    return keys


def test_needs_and_loss_inputs_tables_match_the_dataclasses():
    section = HOOKS[HOOKS.index("`Needs` (a frozen"):]
    assert table_keys(section, "field") == [f.name for f in dataclasses.fields(Needs)]
    for f in dataclasses.fields(Needs):
        row = re.search(rf"^\| `{f.name}` \| `([^`]*)` \|", section, re.MULTILINE)
        assert row and row.group(1) == repr(f.default).replace("'", '"'), f.name
    section = HOOKS[HOOKS.index("`LossInputs`, what"):]
    assert table_keys(section, "field") == list(vars(LossInputs()))  # its tables, in order


def test_every_plugin_doc_page_exists_and_links_resolve():
    for page in sorted(p.name for p in DOCS.glob("*.md")):
        text = (DOCS / page).read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (DOCS / target).exists(), f"{page}: broken link {target}"
