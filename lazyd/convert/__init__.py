"""Image conversion to eStargz (``lazyctl image convert``)."""

from .image import ConvertError, ConvertOptions, ConvertResult, LayerResult, ManifestResult, convert_image

__all__ = ["ConvertError", "ConvertOptions", "ConvertResult", "LayerResult", "ManifestResult", "convert_image"]
