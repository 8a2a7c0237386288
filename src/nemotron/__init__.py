"""nemotron: PyTorch-native Stage 0 pretraining for Nemotron 3 Nano."""

__version__ = "0.1.0"
