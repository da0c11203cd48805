"""The recipes shipped with prefkit: ``prefkit recipes`` lists them, ``prefkit recipes copy`` writes one
(or a folder of them) where you can edit it, as torchtune's ``tune ls`` / ``tune cp`` do.

In a checkout they are the repository's ``recipes/`` folder; an installed wheel carries the same files
as the data package ``prefkit_recipes`` (see setup.py). A recipe's name is its path under that folder
without ``.yaml`` (``dpo_tiny``, ``sentiment/sample_tiny``); its description is the first sentence of its opening comment.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefkit.api.errors import PrefkitError
from prefkit.inputs import InputError, did_you_mean, load_yaml, read_text


@dataclass
class ShippedRecipe:
    name: str  # "dpo_tiny", "sentiment/sample_tiny"
    path: Path
    description: str  # the first sentence of the file's opening comment
    command: str  # "run", "sample" or "compare": the command it is written for
    objective: str | None  # the objective's name ("compare" recipes: the number of arms, e.g. "9 arms")
    needs: list[str]  # files under runs/ it reads, which earlier steps write
    guide: str | None  # the README.md beside it that says which steps, if any

    def note(self) -> str:
        if not self.needs:
            return ""
        more = f" and {len(self.needs) - 1} more" if len(self.needs) > 1 else ""
        where = f"; see {self.guide}" if self.guide else ""
        return f"needs earlier steps (reads {self.needs[0]}{more}{where})"


def recipes_root() -> Path:
    """The folder of the shipped recipes: a checkout's ``recipes/`` beside the ``prefkit`` package,
    else the installed ``prefkit_recipes`` data package."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"  # this file is prefkit/catalog.py
    if any(checkout.glob("*.yaml")):
        return checkout
    spec = importlib.util.find_spec("prefkit_recipes")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if any(Path(location).glob("*.yaml")):
                return Path(location)
    raise PrefkitError("the shipped recipes are not installed (neither a recipes/ folder beside the prefkit package "
                       "nor the prefkit_recipes package); reinstall prefkit")


def _description(text: str, limit: int = 110) -> str:
    """The first sentence of the comment the file opens with (commands in it are left out)."""
    words: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        comment = stripped.lstrip("#").strip()
        if not comment or comment.startswith(("prefkit ", "bash ")):
            break
        words.append(comment)
    joined = " ".join(words)
    end = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", joined)  # the first sentence
    if end:
        joined = joined[: end.start() + 1]
    return joined if len(joined) <= limit else joined[: limit - 1].rstrip() + "…"


def _run_paths(value: Any, found: list[str], key: str = "") -> None:
    """Paths under runs/ that a recipe reads (not the folders it writes: output_dir)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in ("output_dir", "cache_dir"):
                _run_paths(v, found, str(k))
    elif isinstance(value, list):
        for v in value:
            _run_paths(v, found, key)
    elif isinstance(value, str) and value.startswith("runs/") and value not in found:
        found.append(value)


def _describe(root: Path, path: Path, registry: Any) -> ShippedRecipe:
    text = path.read_text(encoding="utf-8")
    where = str(path.relative_to(root))
    try:
        data = load_yaml(text, where)
    except InputError as exc:
        raise PrefkitError(f"shipped recipe {where}: {exc}") from None
    data = data if isinstance(data, dict) else {}
    needs: list[str] = []
    _run_paths(data, needs)
    if "arms" in data:
        command, objective = "compare", f"{len(data.get('arms') or [])} arms"
    else:
        objective = (data.get("objective") or {}).get("name") if isinstance(data.get("objective"), dict) else None
        plugin = registry.objectives.get(objective) if (registry is not None and objective) else None
        command = "sample" if objective is None or getattr(plugin, "kind", None) == "inference" else "run"
    readme = path.parent / "README.md"
    guide = str(readme.relative_to(root)) if needs and readme.is_file() else None
    name = str(path.relative_to(root).with_suffix("")).replace("\\", "/")
    return ShippedRecipe(name, path, _description(text), command, objective, needs, guide)


def list_recipes(registry: Any = None) -> list[ShippedRecipe]:
    """Every shipped recipe (``recipes/**/*.yaml``), top-level ones first, by name."""
    root = recipes_root()
    paths = sorted(root.rglob("*.yaml"), key=lambda p: (len(p.relative_to(root).parts), str(p.relative_to(root))))
    return [_describe(root, p, registry) for p in paths]


def find(name: str) -> Path:
    """The file or folder of a shipped recipe name (``dpo_tiny``, ``dpo_tiny.yaml``, ``sentiment``,
    ``sentiment/pipeline.sh``). Raises PrefkitError with the closest names for an unknown one."""
    root = recipes_root()
    clean = name.strip().strip("/")
    if clean and ".." not in Path(clean).parts and not Path(clean).is_absolute():
        for candidate in (root / clean, root / f"{clean}.yaml"):
            if candidate.is_file() or (candidate.is_dir() and any(candidate.iterdir())):
                return candidate
    names = [str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")]
    names += [str(p.relative_to(root)) for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    raise PrefkitError(f"no shipped recipe {name!r}{did_you_mean(clean, names)} (`prefkit recipes` lists them)")


def copy(name: str, dest: str | Path | None = None, *, force: bool = False) -> list[Path]:
    """Copy the shipped recipe ``name`` (a file, or a folder such as ``sentiment`` with its README and
    script) to ``dest`` (default: the current folder, under its own file name; an existing folder
    receives it under its own name). An existing file is never overwritten unless ``force``.
    Returns the files written."""
    source = find(name)
    target = Path(dest) if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
        if source.is_dir() else [source]
    pairs = [(f, target / f.relative_to(source) if source.is_dir() else target) for f in files]
    existing = [str(t) for _, t in pairs if t.exists()]
    if existing and not force:
        raise PrefkitError(f"{existing[0]} already exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}; "
                           "pass --force to overwrite, or name another destination (nothing was written)")
    for _, t in pairs:
        if t.exists() and t.is_dir():
            raise PrefkitError(f"{t} is a folder; name a file or another destination (nothing was written)")
        blocking = next((p for p in t.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise PrefkitError(f"cannot write {t}: {blocking} is a file, not a folder; name another destination "
                               "(nothing was written)")
    written = []
    try:
        for f, t in pairs:
            t.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, t)
            if f.suffix == ".sh":
                t.chmod(0o755)
            written.append(t)
    except OSError as exc:
        raise PrefkitError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return written


def show(name: str) -> str:
    """The text of a shipped recipe."""
    path = find(name)
    if path.is_dir():
        raise PrefkitError(f"{name!r} is a folder of recipes; `prefkit recipes` lists them, "
                           f"`prefkit recipes copy {name}` copies the folder")
    try:
        return read_text(path)
    except InputError as exc:
        raise PrefkitError(str(exc)) from None
