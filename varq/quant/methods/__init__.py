"""One file per quantization method; each registers itself with ``varq.quant.registry.register_method``."""
