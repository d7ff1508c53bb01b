"""One file per quantization method, each registering itself with ``varq.quant.registration.register_method``; modules
whose name starts with ``_`` hold pieces several methods share and are never taken for a method."""
