"""Checkpoints: loading (HF, Hub, MLX, GGUF), convert, GGUF import, quantize and calibrate, prompt-cache files,
and the embedded default model. What a family's weights look like is asked of the family (models/)."""
