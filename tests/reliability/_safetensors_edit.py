"""Raw safetensors editing for the corrupted-checkpoint tests: header JSON, data bytes, digests."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path


def read(path: Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)


def tensor_bytes(header: dict, data: bytes, key: str) -> bytes:
    a, b = header[key]["data_offsets"]
    return data[a:b]


def digest(dtype: str, shape, payload: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{dtype}|{tuple(shape)}|".encode())
    h.update(payload)
    return h.hexdigest()


def resign(header: dict, data: bytes) -> dict:
    """Recompute the `roste_digests` table from the (edited) header and data, as a forger would."""
    digests = {k: digest(v["dtype"], v["shape"], tensor_bytes(header, data, k))
               for k, v in header.items() if k != "__metadata__"}
    header["__metadata__"]["roste_digests"] = json.dumps(digests, sort_keys=True)
    return header


def set_tensor_bytes(header: dict, data: bytes, key: str, payload: bytes) -> bytes:
    a, b = header[key]["data_offsets"]
    assert len(payload) == b - a
    return data[:a] + payload + data[b:]
