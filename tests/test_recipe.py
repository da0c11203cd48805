"""Recipe validation: every problem names the file and the key path; no model is loaded."""

from pathlib import Path

import pytest
import yaml

from prefkit.api.errors import RecipeError
from prefkit.recipe import apply_overrides, load_recipe, parse_override

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "dpo_tiny.yaml"


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def tiny_dict():
    return yaml.safe_load(TINY.read_text())


def problems(exc_info):
    return dict(exc_info.value.problems)


def test_tiny_recipe_is_valid_and_objective_params_are_typed():
    loaded = load_recipe(TINY, registry=REGISTRY)
    assert loaded.objective.name == "dpo"
    assert loaded.params.beta == 0.1
    assert loaded.model_options.hidden_size == 64
    resolved = loaded.resolved_dict()
    assert resolved["objective"]["params"]["label_smoothing"] == 0.0  # defaults are written out


def test_unknown_top_level_key_is_named(tmp_path):
    path = write(tmp_path, {**tiny_dict(), "bogus_key": 1})
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, registry=REGISTRY)
    assert problems(exc) == {"bogus_key": "unknown key"}
    assert str(path) in str(exc.value) and "bogus_key" in str(exc.value)


def test_nested_unknown_key_and_wrong_type_are_named(tmp_path):
    data = tiny_dict()
    data["train"]["lerning_rate"] = 1
    data["train"]["batch_size"] = "four"
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, data), registry=REGISTRY)
    found = problems(exc)
    assert found["train.lerning_rate"] == "unknown key; did you mean 'lr'?"
    assert "integer" in found["train.batch_size"]


def test_missing_required_section(tmp_path):
    data = tiny_dict()
    del data["model"]
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, data), registry=REGISTRY)
    assert problems(exc) == {"model": "required key is missing"}


def test_objective_params_are_validated_by_the_objective(tmp_path):
    data = tiny_dict()
    data["objective"]["params"] = {"beta": -1, "gamma": 2}
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, data), registry=REGISTRY)
    found = problems(exc)
    assert "objective.params.beta" in found and found["objective.params.gamma"] == "unknown key"


def test_unknown_objective_lists_the_registered_ones(tmp_path):
    data = tiny_dict()
    data["objective"]["name"] = "dpoo"
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, data), registry=REGISTRY)
    message = problems(exc)["objective.name"]
    assert "'dpoo'" in message and "dpo" in message


def test_model_source_options_are_validated(tmp_path):
    data = tiny_dict()
    data["model"]["options"] = {"hidden": 3}
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, data), registry=REGISTRY)
    assert problems(exc) == {"model.options.hidden": "unknown key; did you mean 'hidden_size'?"}


def test_options_on_a_plain_path_are_refused(tmp_path):
    data = tiny_dict()
    data["model"] = {"source": "some-org/some-model", "options": {"x": 1}}
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, data), registry=REGISTRY)
    assert "model.options" in problems(exc)


@pytest.mark.parametrize(
    "text, where",
    [("a: [1, 2\n", "line"), ("- just\n- a list\n", "mapping"), ("", "required")],
)
def test_bad_yaml_documents(tmp_path, text, where):
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, text), registry=REGISTRY)
    assert where in str(exc.value)


def test_missing_file():
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe("does/not/exist.yaml", registry=REGISTRY)


def test_yaml_is_parsed_safely(tmp_path):
    path = write(tmp_path, "output_dir: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path, registry=REGISTRY)


def test_overrides_use_the_recipe_key_paths():
    assert parse_override("train.lr=1e-5") == (["train", "lr"], 1e-5)
    assert parse_override("output_dir=/tmp/x") == (["output_dir"], "/tmp/x")
    assert parse_override("model.lora={r: 4}") == (["model", "lora"], {"r": 4})
    data = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=2", "model.lora.r=4"])
    assert data == {"train": {"lr": 2}, "model": {"lora": {"r": 4}}}
    loaded = load_recipe(TINY, ["output_dir=/tmp/elsewhere", "objective.params.beta=0.5"], registry=REGISTRY)
    assert loaded.recipe.output_dir == "/tmp/elsewhere" and loaded.params.beta == 0.5


def test_bad_override_key_is_named():
    with pytest.raises(RecipeError) as exc:
        load_recipe(TINY, ["train.bogus=1"], registry=REGISTRY)
    assert problems(exc) == {"train.bogus": "unknown key"}
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(TINY, ["no-equals-sign"], registry=REGISTRY)


def test_overriding_the_model_source_drops_the_old_sources_options():
    from prefkit.recipe import apply_overrides

    data = {"model": {"source": "tiny-llama", "options": {"hidden_size": 64}}}
    assert apply_overrides(data, ["model.source=runs/x/final"]) == {"model": {"source": "runs/x/final"}}
    data = {"model": {"source": "tiny-llama", "options": {"hidden_size": 64}}}
    kept = apply_overrides(data, ["model.source=tiny-llama", "model.options.hidden_size=32"])
    assert kept["model"]["options"] == {"hidden_size": 32}
    data = {"model": {"source": "tiny-llama", "options": {"hidden_size": 64}}}
    assert apply_overrides(data, ["train.lr=0.1"])["model"]["options"] == {"hidden_size": 64}
