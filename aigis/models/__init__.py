"""Backbones: ConViT and ViT (timm-format names), EfficientNet-Lite0 (the embedded default)."""
