"""What a weights file is, told from its first bytes and without torch.

adm reads three formats: safetensors (by the ``.safetensors`` name), torch's zip archive and
torch's older pickle format (any other name). A file in none of them is refused here with what it
looks like instead, since that says what went wrong: an HTML page saved in place of a download,
a Git LFS pointer checked out without ``git lfs pull``, an empty or cut-short file, a NumPy
archive such as ``samples.npz``. `adm sample` and `adm convert-weights` call this before they
import torch, so such a slip costs a second; the loaders call ``describe`` only once a file has
failed, to say the same in place of the parser's words.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from .errors import ConversionError, FileFormatError

SAFETENSORS = "safetensors"
TORCH = "torch"
_SNIFF = 512  # bytes read to tell the kinds apart
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_PICKLE_PROTOCOLS = range(2, 6)  # torch.save's legacy format writes protocol 2 unless told otherwise


def check_format(path: str | Path) -> str:
    """SAFETENSORS or TORCH for a file whose bytes are that format and whose name agrees;
    otherwise a ``FileFormatError`` that says what the file is."""
    path = Path(path)
    try:
        found, why = _identify(path)
    except OSError as exc:  # no read permission, an I/O error (/proc/self/mem reads as one)
        raise ConversionError(f"cannot read {path}: {exc.strerror or exc}") from None
    if found is None:
        raise FileFormatError(f"{path.name} is not a checkpoint: {why}")
    named = SAFETENSORS if path.suffix == ".safetensors" else TORCH
    if found != named:
        if found == SAFETENSORS:
            raise FileFormatError(f"{path.name} is a safetensors file: name it {path.stem}.safetensors")
        raise FileFormatError(f"{path.name} is a torch checkpoint ({why}), not a safetensors file: "
                              f"name it {path.stem}.pt (`adm convert-weights` reads it)")
    return found


def describe(path: str | Path) -> str | None:
    """What ``check_format`` would object to in the file, or None where its first bytes look
    right (the fault is then deeper in it, and the parser's own message says more)."""
    try:
        check_format(path)
    except FileFormatError as exc:
        return str(exc)
    except ConversionError:  # unreadable now: the loader's own error says why
        return None
    return None


def _identify(path: Path) -> tuple[str | None, str]:
    """(format, how it was told) or (None, what the file looks like instead)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    if not head:
        return None, "the file is empty"
    if head[:4] == b"PK\x03\x04":
        return _zip_kind(path)
    if head[0] == 0x80 and len(head) > 1 and head[1] in _PICKLE_PROTOCOLS:
        return TORCH, "a pickle"
    if len(head) > 262 and head[257:262] == b"ustar":  # torch.save before 0.4 wrote a tar archive
        return TORCH, "a tar archive"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= (length := struct.unpack("<Q", head[:8])[0]) <= _MAX_HEADER:
        if length > size - 8:
            return None, f"it is cut short (a safetensors header of {length} bytes in a file of {size})"
        return _safetensors_header(path, length, size)
    return None, _looks_like(head)


def _zip_kind(path: Path) -> tuple[str | None, str]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):  # the member list sits at the end: a download cut short
        return None, "it is a zip archive that is cut short or damaged"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return TORCH, "a zip archive"
    if names and all(n.endswith(".npy") for n in names):
        return None, "it is a NumPy archive (.npz), such as the samples `adm sample` writes"
    return None, "it is a zip archive without a torch checkpoint in it"


def _safetensors_header(path: Path, length: int, size: int) -> tuple[str | None, str]:
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None, "its safetensors header is damaged"
    # the tensors' bytes follow the header back to back: a file that stops short of the last
    # one's end is a download or copy cut short (safetensors itself would say "incomplete metadata")
    if (end := 8 + length + max(ends, default=0)) > size:
        return None, f"it is cut short ({size} of the {end} bytes its header describes)"
    return SAFETENSORS, "a safetensors header"


def _looks_like(head: bytes) -> str:
    lower = head.lstrip().lower()
    if lower.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file it points to (`git lfs pull` fetches that)"
    if lower.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in lower:
        return "it is an HTML page (an error or login page saved in place of the download?)"
    if head[:2] == b"\x1f\x8b":
        return "it is a gzip file: unpack it first"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end of the sniffed bytes
        text = head[:exc.start].decode("utf-8") if exc.start > len(head) - 4 else None
    if text is not None and text.strip() and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0]
        return f"it is a text file (it begins {first[:40]!r}{'...' if len(first) > 40 else ''})"
    return f"its first bytes ({head[:8].hex(' ')}) are neither torch's formats nor safetensors"
