"""The tiny ViT shared by the evolution tests: 8x8x1 inputs, 4 classes, one block."""

from models import vit

TINY_VIT = vit.ViTConfig(
    hidden=16,
    mlp_dim=32,
    num_heads=2,
    qk_dim=8,
    v_dim=8,
    num_layers=1,
    image_shape=(8, 8, 1),
    patch_size=4,
    num_classes=4,
)
