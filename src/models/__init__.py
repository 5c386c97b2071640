"""AlexNet variants with named post-ReLU taps, and their receptive fields."""

from convergent.models.alexnet import CONV_LAYERS, FC_LAYERS, LAYERS, AlexNet, build_model
from convergent.models.receptive_field import ReceptiveField, receptive_field

__all__ = ["AlexNet", "build_model", "LAYERS", "CONV_LAYERS", "FC_LAYERS", "ReceptiveField", "receptive_field"]
