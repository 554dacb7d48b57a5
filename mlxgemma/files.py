"""Small files read safely, for every layer that reads a checkpoint's or a processor's files: one clear
error for what is not a regular file, too large, or not the JSON it should be (never a traceback, never a hang
on a named pipe)."""

import json
import stat
from pathlib import Path

from .errors import MlxGemmaError

MAX_JSON_BYTES = 100 * 2**20  # a config, index or tokenizer file larger than this is not one


def read_json(file: Path) -> dict:
    """A small JSON object from a regular file, or one clear error (never a traceback, never a hang on a pipe)."""
    regular_file(file)
    if file.stat().st_size > MAX_JSON_BYTES:
        raise MlxGemmaError(f"{file} is larger than {MAX_JSON_BYTES >> 20} MiB: not a JSON file of a checkpoint")
    try:
        d = json.loads(file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxGemmaError(f"{file} is not valid JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise MlxGemmaError(f"{file} is nested too deeply to be a JSON file of a checkpoint") from None
    except OSError as e:
        raise MlxGemmaError(f"cannot read {file}: {e.strerror or e}") from None
    if not isinstance(d, dict):
        raise MlxGemmaError(f"{file} must hold a JSON object, not {type(d).__name__}")
    return d


def regular_file(file: Path) -> None:
    """Refuse what is not a regular file (a named pipe would block a read forever, a device never end)."""
    try:
        mode = file.stat().st_mode
    except OSError:
        raise MlxGemmaError(f"{file} not found") from None
    if not stat.S_ISREG(mode):
        raise MlxGemmaError(f"{file} is not a regular file")
