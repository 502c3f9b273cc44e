"""Plain-PyTorch references of every op: the spec in code, the CPU fallback and the test oracle."""
