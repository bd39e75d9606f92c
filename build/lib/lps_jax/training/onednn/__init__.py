"""oneDNN convolutions for XLA:CPU (optional extra): `conv.py` (the op), `build.py` (the build)."""
