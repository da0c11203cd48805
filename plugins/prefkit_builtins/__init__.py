"""prefkit's built-in plugins: objectives, model sources and datasets.

Each module here is a pluggy plugin registered under the ``prefkit`` entry point group in
``pyproject.toml`` — exactly as a third-party package registers its own.
"""
