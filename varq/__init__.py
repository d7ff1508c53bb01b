"""varq: post-training quantization benchmark suite for visual autoregressive (VAR) image generators."""

__version__ = "0.1.0"
