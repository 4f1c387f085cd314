"""srdata: Selective Reflection Distillation data curation."""

__version__ = "0.1.0"
