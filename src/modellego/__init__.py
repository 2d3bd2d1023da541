"""modellego: take trained CNN classifiers apart into class-aware components and assemble
components into new classifiers, without training."""

__version__ = "0.1.0"
