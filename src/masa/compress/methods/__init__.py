"""The compression methods, one module each; ``masa.compress.registry`` finds them by name."""
