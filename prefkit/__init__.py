"""prefkit: align language models with preference data.

Objectives are pluggy plugins, one engine does the expensive parts (batching, the
reference log-prob cache, precision, checkpoints), and a harness compares objectives.

The Python API (docs/python.md)::

    import prefkit
    summary = prefkit.train("recipes/dpo_tiny.yaml", ["output_dir=runs/x"], train_dataset=my_dataset)
    metrics = prefkit.evaluate("runs/x")
    folder = prefkit.export("runs/x", step=18)
"""

__version__ = "0.1.0"

__all__ = ["train", "evaluate", "export", "load", "__version__"]


def __getattr__(name: str):
    # imported on first use, so `import prefkit` (and the CLI's start) stays light
    if name in ("train", "evaluate", "export", "load"):
        from prefkit import workflows

        return getattr(workflows, name)
    raise AttributeError(f"module 'prefkit' has no attribute {name!r}")
