"""Models: registry of architectures, builders, pretrained weights, cost tables."""

# importing the zoo registers its entries, so the registry is full once this package is
# imported; registry.py cannot import the zoo itself, the zoo imports it
from . import zoo  # noqa: F401
