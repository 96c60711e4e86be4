"""stabbench: compare methods for training very deep neural networks stably."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1  # of the run outputs (metrics.csv, layers.csv, summary.json); see docs/outputs.md
