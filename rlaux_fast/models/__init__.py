from .vgg import VGG16, mlp_head, vgg16_trunk

__all__ = ["VGG16", "mlp_head", "vgg16_trunk"]
