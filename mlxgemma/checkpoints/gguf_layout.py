"""A GGUF file's header and metadata walked before the gguf package reads them: every count the file states
(tensors, key-value pairs, array lengths, string lengths) must fit in the bytes the file has. The gguf package
loops over a stated array length in Python, so a corrupted or crafted count (an array of 2^60 empty arrays)
would fill the memory before any error: here it is one clear error, in time proportional to the file.
"""

import struct
from pathlib import Path

from ..errors import MlxGemmaError

# GGUF value types: fixed sizes in bytes; 8 is a string (u64 length + bytes), 9 an array (u32 type, u64 count).
SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


class _Cursor:
    def __init__(self, data: bytes, order: str):
        self.data, self.order, self.at = data, order, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise ValueError("it ends inside its metadata")
        value = struct.unpack_from(self.order + fmt, self.data, self.at)[0]
        self.at += size
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.at + n > len(self.data):
            raise ValueError(f"a length of {n} bytes runs past its end")
        self.at += n

    def value(self, kind: int, depth: int = 0) -> None:
        if kind in SIZES:
            self.skip(SIZES[kind])
        elif kind == STRING:
            self.skip(self.take("Q"))
        elif kind == ARRAY and depth < 4:
            item, count = self.take("I"), self.take("Q")
            least = SIZES.get(item, 8 if item == STRING else 12)
            if count * least > len(self.data) - self.at:
                raise ValueError(f"an array of {count} items does not fit in its bytes")
            if item in SIZES:
                self.skip(count * SIZES[item])
            else:
                for _ in range(count):
                    self.value(item, depth + 1)
        else:
            raise ValueError(f"a value of type {kind} is not one GGUF has")


def check_layout(path: Path, limit: int = 1 << 30) -> None:
    """Refuse a file whose stated counts and lengths do not fit in it (the metadata, up to `limit` bytes,
    is read; a model's tensors are not)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError as e:
        raise MlxGemmaError(f"cannot read {path}: {e.strerror or e}") from None
    if data[:4] != b"GGUF":
        return  # not GGUF at all: the reader says so
    order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"  # as the gguf package tells them
    try:
        cursor = _Cursor(data, order)
        cursor.skip(8)
        tensors, pairs = cursor.take("Q"), cursor.take("Q")
        if pairs * 12 > len(data) or tensors * 24 > len(data):
            raise ValueError(f"it states {pairs} metadata entries and {tensors} tensors")
        for _ in range(pairs):
            cursor.skip(cursor.take("Q"))  # the key
            cursor.value(cursor.take("I"))
    except ValueError as e:
        raise MlxGemmaError(f"{path} is not a readable GGUF file ({e})") from None
