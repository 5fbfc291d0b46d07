"""imgfeat: batch, offline image feature extraction with Keras backbones."""

__version__ = "0.1.0"
