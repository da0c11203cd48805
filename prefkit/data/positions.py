"""How many positions (tokens) a model takes, the bound of ``data.max_length``, read from its
``config.json`` without loading it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefkit.api.errors import PrefkitError
from prefkit.inputs import InputError, is_dir, is_file, json_value, read_text

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def config_positions(config: Any) -> int | None:
    """The number of positions a Hugging Face ``config.json`` document declares, if any."""
    if not isinstance(config, dict):
        return None
    for key in POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    text_config = config.get("text_config")  # multimodal configs nest the language model's
    return config_positions(text_config) if isinstance(text_config, dict) else None


def folder_positions(folder: str | Path) -> tuple[int, str] | None:
    """``(positions, "max_position_embeddings in FOLDER/config.json")`` for a local model folder."""
    path = Path(folder).expanduser() / "config.json"
    if not is_file(path):
        return None
    try:
        config = json_value(read_text(path))
    except InputError as exc:
        raise PrefkitError(f"the model's {exc}") from None
    except ValueError as exc:
        raise PrefkitError(f"the model's {path}: not valid JSON: {exc}") from None
    count = config_positions(config)
    return (count, f"max_position_embeddings in {path}") if count else None


def check_max_length(max_length: int, tokenizer: Any) -> None:
    """After a named source is built: ``data.max_length`` against the positions in the folder the
    tokenizer came from (when it holds a config.json). Raises PrefkitError."""
    folder = getattr(tokenizer, "name_or_path", None)
    if not isinstance(folder, str) or not folder or not is_dir(folder):
        return
    try:
        found = folder_positions(folder)
    except PrefkitError:
        return  # the model loader reports a broken config.json
    if found and max_length > found[0]:
        raise PrefkitError(f"data.max_length {max_length} is more than the model's {found[0]} positions "
                           f"({found[1]}); use at most {found[0]}")
