"""prefkit: align language models with preference data.

Objectives are pluggy plugins, one engine does the expensive parts (batching, the
reference log-prob cache, precision, checkpoints), and a harness compares objectives.
"""

__version__ = "0.1.0"
