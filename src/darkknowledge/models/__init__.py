"""Networks for teachers and students, built by registry name (see ``registry.py``)."""

from .vision import MLP, LeNet5, SmallCNN, SmallResNet

__all__ = ["MLP", "LeNet5", "SmallCNN", "SmallResNet"]
