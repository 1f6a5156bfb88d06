"""m2core: tokenizers, the modality registry, the model, masking, generation, checkpoints."""

__version__ = "0.1.0"
