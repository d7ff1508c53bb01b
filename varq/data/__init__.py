"""Image data: the digits data set of the embedded default and uint8 ↔ model-range conversions."""

from varq.data.digits import digits_split_indices, load_digits_split, upsample_digits
from varq.data.images import to_model_range, to_uint8

__all__ = ["digits_split_indices", "load_digits_split", "to_model_range", "to_uint8", "upsample_digits"]
