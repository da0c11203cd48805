"""``prefkit new-objective NAME``: the skeleton of a plugin package for a new objective.

:func:`new_objective` writes ``prefkit-NAME/`` with

- ``pyproject.toml``: the package, with the ``prefkit`` entry point that makes prefkit find it;
- ``prefkit_NAME.py``: the objective (params model, needs, a pure loss function, the hook);
- ``tests/test_NAME.py``: the ``prefkit.testing`` conformance check, a golden value, and a check
  that the entry point registers the objective once the package is installed;
- ``NAME_tiny.yaml``: a recipe that trains it for a few steps on a tiny model;
- ``README.md``.

As generated, the objective is a working placeholder (a reference-free sigmoid loss on the
log-prob margin) and the package passes its own tests; replace the math with yours.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefkit.api.errors import PrefkitError

NAME = re.compile(r"^[a-z][a-z0-9_]*$")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "__DIST__"
version = "0.1.0"
description = "The __NAME__ objective for prefkit."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["prefkit>=0.1"]

# prefkit finds plugins through the `prefkit` entry point group: <plugin name> = "<module>".
[project.entry-points.prefkit]
__NAME__ = "__MODULE__"

[tool.setuptools]
py-modules = ["__MODULE__"]

[tool.pytest.ini_options]
pythonpath = ["."]
testpaths = ["tests"]
'''

MODULE = '''\
"""The `__NAME__` objective for prefkit.

Write here what the objective does, and cite its paper.

The math lives in :func:`__NAME___loss`, a pure function of tensors that a test can call with
hand-computed numbers; :class:`__CLASS__` adapts it to the engine's
:class:`~prefkit.api.LossInputs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prefkit.api import LossInputs, LossOutput, Needs, Objective, ObjectiveParams, hookimpl


def __NAME___loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Per-example losses ``[B]`` in fp32 from summed answer log-probs ``[B]``.

    Placeholder math to replace with yours: -log sigmoid(beta * (chosen - rejected)).
    """
    return -F.logsigmoid(beta * (chosen_logps.float() - rejected_logps.float()))


class __CLASS__Params(ObjectiveParams):
    """Recipe ``objective.params`` for ``__NAME__``; unknown keys are refused."""

    beta: float = Field(0.1, gt=0, description="Scale of the log-prob margin inside the sigmoid.")


class __CLASS__(Objective):
    name = "__NAME__"
    description = "One line shown by `prefkit objectives` (write yours)."
    Params = __CLASS__Params

    def needs(self, params: __CLASS__Params) -> Needs:
        # What the engine must build for this objective, and nothing else.
        return Needs(data="pairs", reference=False)

    def loss(self, params: __CLASS__Params, inputs: LossInputs) -> LossOutput:
        losses = __NAME___loss(inputs.chosen_logps, inputs.rejected_logps, beta=params.beta)
        chosen_logps, rejected_logps = inputs.chosen_logps.detach().float(), inputs.rejected_logps.detach().float()
        chosen, rejected = params.beta * chosen_logps, params.beta * rejected_logps
        metrics = {  # detached: metrics are logged, never differentiated
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).float(),
            "logps/chosen": chosen_logps,
            "logps/rejected": rejected_logps,
        }
        return LossOutput(losses=losses, metrics=metrics)


@hookimpl
def register_objectives(register):
    register(__CLASS__())
'''

TEST = '''\
"""Tests for the `__NAME__` objective. Run them with `pytest` in the package folder."""

import math

import torch

from prefkit.testing import check_objective, check_registered
from __MODULE__ import __CLASS__, __CLASS__Params, __NAME___loss


def test_conformance():
    # params round-trip through YAML, needs are honoured, the loss is a finite scalar whose
    # gradients reach the model: on a tiny random Llama, through prefkit's own engine path
    check_objective(__CLASS__())
    check_objective(__CLASS__(), __CLASS__Params(beta=1.0))


def test_golden_value():
    # chosen -10, rejected -12, beta 0.1: -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = 0.598138869
    losses = __NAME___loss(torch.tensor([-10.0]), torch.tensor([-12.0]), beta=0.1)
    assert math.isclose(losses.item(), 0.598138869, rel_tol=1e-6)


def test_registered_through_its_entry_point():
    # skipped until the package is installed (pip install -e .)
    check_registered("__NAME__", distribution="__DIST__")
'''

RECIPE = '''\
# __NAME__ on a tiny random-initialised Llama over prefkit's tiny preference set: seconds on a CPU.
#   prefkit run __NAME___tiny.yaml output_dir=runs/__NAME__-tiny
output_dir: runs/__NAME__-tiny
seed: 0
model:
  source: tiny-llama
data:
  train: tiny-prefs
  max_length: 128
  max_prompt_length: 64
objective:
  name: __NAME__
  params: {beta: 0.1}
train:
  max_steps: 8
  batch_size: 4
  lr: 1.0e-3
  log_every: 1
'''

README = '''\
# __DIST__

The `__NAME__` objective for [prefkit](https://github.com/prefkit/prefkit), as a plugin.

```bash
pip install -e .                       # registers the objective through the `prefkit` entry point
prefkit objectives                     # __NAME__ is listed, with this package
pytest                                 # conformance check (prefkit.testing) and golden values
prefkit run __NAME___tiny.yaml         # a few steps on a tiny model
```
'''


def package_names(name: str) -> dict[str, str]:
    """The names derived from an objective name: distribution, module, class. The class is the
    name in CamelCase, with ``Objective`` added when it (or its ``Params``) would be a name the
    generated files already use (``needs`` would shadow the ``Needs`` they import)."""
    camel = "".join(part.capitalize() for part in name.split("_"))
    if {camel, camel + "Params"} & _template_names():
        camel += "Objective"
    return {
        "__NAME__": name,
        "__DIST__": "prefkit-" + name.replace("_", "-"),
        "__MODULE__": "prefkit_" + name,
        "__CLASS__": camel,
    }


def _template_names() -> set[str]:
    """Every name the module and test templates bind or use, besides the generated ones."""
    return set(re.findall(r"\b[A-Za-z_][A-Za-z0-9_]*\b", MODULE + TEST)) - {"__CLASS__Params"}


def render(name: str) -> dict[str, str]:
    """Relative path -> text of every file of the skeleton for objective ``name``."""
    names = package_names(name)

    def fill(template: str) -> str:
        for key, value in names.items():
            template = template.replace(key, value)
        return template

    return {
        "pyproject.toml": fill(PYPROJECT),
        f"{names['__MODULE__']}.py": fill(MODULE),
        f"tests/test_{name}.py": fill(TEST),
        f"{name}_tiny.yaml": fill(RECIPE),
        "README.md": fill(README),
    }


def new_objective(name: str, directory: Path | str = ".", *, registry: Any = None) -> Path:
    """Write the skeleton package ``prefkit-NAME/`` into ``directory``; return its folder.

    Refuses a name that is not a lower-case identifier, one ``registry`` (when given) already
    registers (prefkit would refuse the second one), and a folder that already exists.
    """
    if not NAME.match(name):
        raise PrefkitError(
            f"objective name {name!r}: use lower-case letters, digits and '_', starting with a letter (e.g. simpo)"
        )
    if registry is not None:  # refuse a name an installed plugin already registers
        if name in registry.objectives:
            owner = registry.owner("objectives", name)
            raise PrefkitError(f"an objective named {name!r} is already registered by {owner.label}; pick another name")
    from prefkit.inputs import InputError, check_writable_dir

    try:
        check_writable_dir(directory, "--directory")
    except InputError as exc:
        raise PrefkitError(f"{exc} (nothing was written)") from None
    target = Path(directory) / package_names(name)["__DIST__"]
    if target.exists():
        raise PrefkitError(f"{target} already exists; remove it or choose another --directory (nothing was written)")
    files = render(name)
    try:
        for relative, text in files.items():
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    except OSError as exc:  # the disk filled, or the folder changed under us: leave nothing half-written
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        raise PrefkitError(f"cannot write {target}: {exc.strerror or exc} (nothing was written)") from exc
    return target
