"""Models: registry of architectures, builders, pretrained weights, cost tables."""
