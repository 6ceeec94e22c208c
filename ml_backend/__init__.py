"""AnomalyMatch for Label Studio: an ML backend that finds rare objects from a few labels."""

__version__ = "0.1.0"
