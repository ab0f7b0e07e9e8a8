"""Uploaded dataset archives (.zip, .tar.gz): told apart by their first bytes, inspected without extracting them (the
API, before it accepts an upload) and extracted (a worker, into the dataset's folder).

An archive is hostile input. Both steps refuse the same things: entry names that leave the folder (absolute, "..",
drive letters, backslash tricks), links, device files and fifos, duplicate paths, too many entries and more expanded
bytes than the bound. A zip is judged by its central directory, which may lie, so extraction counts the bytes it
actually writes; a tar.gz has no directory, so its decompressed bytes are counted while tarfile streams through them.
Standard library only, and torch-free: the API process imports this module.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

ARCHIVE_FORMATS = ("zip", "tar.gz")

_ACCEPTED = "accepted formats: zip, tar.gz (a gzip-compressed tar)"
_CHUNK = 1 << 20
# Below this size an entry cannot be a bomb whatever its ratio, and a small file of blanks legitimately compresses
# past 200 to 1.
_RATIO_FLOOR_BYTES = 1 << 20
# A long name or a pax record is a few KiB at most; tarfile reads such a header whole into memory before we see the
# member it describes, so a bigger one is refused before it is read.
_MAX_TAR_HEADER_DATA = 64 << 10
# What a tar adds to its files' bytes: per entry a header, an extended header and padding; once, the end blocks and
# the record padding. Only the decompressed stream is held to this; the files themselves are held to the exact bound.
_TAR_OVERHEAD_PER_ENTRY = 4096
_TAR_OVERHEAD = 1 << 20
_MAX_NAME_BYTES, _MAX_PART_BYTES = 1024, 255
_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
# What reading a damaged archive raises (OSError: gzip.BadGzipFile, bz2's "Invalid data stream").
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
# Recognised so that a refusal can say what the file is instead of only what it is not.
_OTHER_FORMATS = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"BZh", "a bzip2-compressed file (.tar.bz2 is not accepted)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file (.tar.xz is not accepted)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"%PDF", "a PDF document"),
)


class ArchiveRefused(Exception):
    """An uploaded archive that is not accepted: 413 when it expands past the bound or holds too many entries, 422
    when it is unsafe, damaged or not an archive. The message names the entry and what is allowed."""

    def __init__(self, message: str, status_code: int = 422):
        super().__init__(message)
        self.message = message
        self.status_code = status_code


@dataclass(frozen=True)
class ArchiveLimits:
    max_expanded_bytes: int
    max_entries: int
    max_ratio: float = 200.0  # a zip entry's declared size over its compressed size

    def __post_init__(self):
        if self.max_expanded_bytes < 1 or self.max_entries < 1 or not self.max_ratio >= 1:
            raise ValueError(
                f"ArchiveLimits needs max_expanded_bytes >= 1, max_entries >= 1 and max_ratio >= 1, got {self}"
            )


@dataclass(frozen=True)
class ArchiveListing:
    format: str  # one of ARCHIVE_FORMATS
    entries: int  # every entry the archive holds (folders and skipped macOS junk included): what max_entries bounds
    expanded_bytes: int  # the bytes of the regular files listed: what extraction writes
    files: tuple[str, ...]  # the regular files' names, relative posix paths, sorted; macOS junk left out


def archive_format(path: Path) -> str:
    """The archive's format, one of ARCHIVE_FORMATS, told by its first bytes, never by its name."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        _require_tar_inside_gzip(path)
        return "tar.gz"
    if not head:
        what = "an empty file"
    elif head[257:262] == b"ustar":
        what = "an uncompressed tar: compress it with gzip (tar czf)"
    else:
        what = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), "no known archive format")
    raise ArchiveRefused(f"the file is not an accepted archive ({what}); {_ACCEPTED}")


def inspect_archive(path: Path, limits: ArchiveLimits) -> ArchiveListing:
    """What the archive holds, refusing a hostile or damaged one (ArchiveRefused) without writing anything."""
    return _walk(Path(path), limits, writer=None)


def extract_archive(path: Path, dest: Path, limits: ArchiveLimits) -> ArchiveListing:
    """Extracts the archive's regular files and folders (macOS junk left out) into dest, a new or empty folder.

    On ArchiveRefused, part of the archive may already lie in dest, never outside it: the caller removes dest.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} is not an empty folder: extract_archive writes into a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    return _walk(Path(path), limits, writer=_Writer(dest, limits))


def _walk(path: Path, limits: ArchiveLimits, writer: _Writer | None) -> ArchiveListing:
    fmt = archive_format(path)
    tally = _Tally(limits)
    if fmt == "zip":
        _walk_zip(path, limits, tally, writer)
    else:
        _walk_tar_gz(path, limits, tally, writer)
    return ArchiveListing(fmt, tally.entries, tally.expanded_bytes, tuple(sorted(tally.files)))


def _walk_zip(path: Path, limits: ArchiveLimits, tally: _Tally, writer: _Writer | None) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as e:
        message = f"the zip archive cannot be read, it is damaged or truncated ({e}); upload it again"
        raise ArchiveRefused(message) from e
    with archive:
        infos = archive.infolist()
        tally.count_entries(len(infos), infos[-1].orig_filename if infos else "")
        to_write = []
        for info in infos:
            # orig_filename: zipfile cuts filename at a NUL byte, which must be refused, not hidden
            name = _clean_name(info.orig_filename)
            is_dir = _zip_entry_is_dir(info)
            if _is_junk(name):
                continue
            if is_dir:
                tally.add_dir(name, info.orig_filename)
                continue
            _check_zip_file_entry(info)
            tally.add_file(name, info.file_size, info.orig_filename)
            _check_zip_ratio(info, limits)
            to_write.append((name, info))
        if writer is None:
            return
        # The whole central directory is judged before the first byte is written.
        for name in sorted(tally.dirs):
            writer.make_dir(name)
        for name, info in to_write:
            try:
                source = archive.open(info)
            except (*_READ_ERRORS, NotImplementedError, RuntimeError) as e:
                message = f"entry {info.orig_filename!r} cannot be read ({e}): the zip is damaged or truncated"
                raise ArchiveRefused(message) from e
            with source:
                writer.write(name, source, info.file_size, info.orig_filename)


def _zip_entry_is_dir(info: zipfile.ZipInfo) -> bool:
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise ArchiveRefused(
            f"entry {info.orig_filename!r} is a symbolic link: only regular files and folders are allowed"
        )
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveRefused(
            f"entry {info.orig_filename!r} is a device file, fifo or socket: only regular files and folders are allowed"
        )
    return kind == stat.S_IFDIR or info.orig_filename.endswith(("/", "\\"))


def _check_zip_file_entry(info: zipfile.ZipInfo) -> None:
    entry = info.orig_filename
    if info.flag_bits & 0x1:
        raise ArchiveRefused(
            f"entry {entry!r} is encrypted: upload an archive without a password (unencrypted entries only)"
        )
    if info.compress_type not in _ZIP_METHODS:
        raise ArchiveRefused(
            f"entry {entry!r} uses zip compression method {info.compress_type}: "
            f"allowed methods are {', '.join(_ZIP_METHODS.values())}"
        )


def _check_zip_ratio(info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    entry = info.orig_filename
    if info.file_size > _RATIO_FLOOR_BYTES and info.file_size > limits.max_ratio * info.compress_size:
        ratio = info.file_size / max(info.compress_size, 1)
        raise ArchiveRefused(
            f"entry {entry!r} expands {ratio:,.0f} to 1 ({info.compress_size:,} bytes to {info.file_size:,}): "
            f"at most {limits.max_ratio:,.0f} to 1 is allowed",
            413,
        )


def _walk_tar_gz(path: Path, limits: ArchiveLimits, tally: _Tally, writer: _Writer | None) -> None:
    bound = limits.max_expanded_bytes + _TAR_OVERHEAD + _TAR_OVERHEAD_PER_ENTRY * limits.max_entries
    # tarfile's "r|gz" would decompress out of sight; here gzip decompresses into a counter that tarfile's plain
    # stream mode "r|" reads, so a bomb stops at the bound, wherever its bytes hide (a file, a header, the padding).
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
        stream = _CountedStream(unzipped, bound)
        with _reading(stream, lambda: tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo)) as archive:
            while member := _reading(stream, archive.next):
                stream.where = f"at entry {member.name!r}"
                tally.count_entries(tally.entries + 1, member.name)
                name = _clean_name(member.name)
                _check_tar_type(member)
                if _is_junk(name):
                    continue
                if member.isdir():
                    tally.add_dir(name, member.name)
                    if writer is not None:
                        writer.make_dir(name)
                    continue
                tally.add_file(name, member.size, member.name)
                if writer is not None:
                    writer.write(name, archive.extractfile(member), member.size, member.name)
            # tarfile stops at the first block it cannot read as a header and calls that the end; what follows
            # must be the end's zeros, or a header was damaged. Reading to the end also checks the gzip trailer.
            # (Through tarfile's own stream: it has read ahead of ours.)
            stream.where = f"after entry {tally.last!r}"
            while block := _reading(stream, lambda: archive.fileobj.read(_CHUNK)):
                if block.strip(b"\0"):
                    raise ArchiveRefused(
                        f"the tar.gz archive holds unreadable data after entry {tally.last!r}: it is damaged; "
                        "upload it again"
                    )


_T = TypeVar("_T")


def _reading(stream: _CountedStream, read: Callable[[], _T]) -> _T:
    """read(), with the errors of a damaged tar.gz told as such; only reads are guarded, never writes (a full disk
    is not the archive's fault)."""
    try:
        return read()
    except _READ_ERRORS as e:
        message = f"the tar.gz archive is damaged or truncated ({stream.where}: {e}); upload it again"
        raise ArchiveRefused(message) from e


def _check_tar_type(member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        kind = "a symbolic link" if member.issym() else "a hard link"
        raise ArchiveRefused(
            f"entry {member.name!r} is {kind} (to {member.linkname!r}): only regular files and folders are allowed"
        )
    if member.ischr() or member.isblk() or member.isfifo():
        raise ArchiveRefused(
            f"entry {member.name!r} is a device file or fifo: only regular files and folders are allowed"
        )
    if member.issparse() or not (member.isreg() or member.isdir()):
        raise ArchiveRefused(
            f"entry {member.name!r} has tar type {member.type!r}: only regular files and folders are allowed"
        )


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses an extended header (long name, pax record) too big to be one, before tarfile reads it into memory."""

    def _proc_member(self, tarfile_):
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)
        if self.type in (*extended, tarfile.SOLARIS_XHDTYPE) and self.size > _MAX_TAR_HEADER_DATA:
            raise ArchiveRefused(
                f"the tar.gz archive has an extended header of {self.size:,} bytes (entry {self.name!r}): "
                f"at most {_MAX_TAR_HEADER_DATA:,} are allowed"
            )
        return super()._proc_member(tarfile_)


class _CountedStream:
    """A read-only stream that refuses (413) to give more than `bound` bytes in all."""

    def __init__(self, source: BinaryIO, bound: int):
        self.source, self.bound, self.count = source, bound, 0
        self.where = "at the start"

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = _CHUNK
        # One byte past the bound is asked for, so that reaching it exactly is told apart from going past it.
        data = self.source.read(min(size, self.bound - self.count + 1))
        self.count += len(data)
        if self.count > self.bound:
            raise ArchiveRefused(
                f"the tar.gz archive expands past {self.bound:,} bytes ({self.where}): "
                f"at most {self.bound:,} bytes are allowed, headers included",
                413,
            )
        return data


def _require_tar_inside_gzip(path: Path) -> None:
    try:
        with gzip.open(path, "rb") as f:
            block = f.read(tarfile.BLOCKSIZE)
    except (EOFError, OSError, zlib.error) as e:
        raise ArchiveRefused(f"the gzip file is damaged or truncated ({e}); {_ACCEPTED}") from e
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:
        return  # an empty tar: zeros from its first block
    except tarfile.HeaderError as e:
        raise ArchiveRefused(f"the file is gzip-compressed but holds no tar archive ({e}); {_ACCEPTED}") from e


def _clean_name(raw: str) -> str:
    """The entry's name as a relative posix path inside the archive's folder ("" for the folder itself), refusing
    any name that could be written elsewhere or not at all."""
    allowed = "entry names must be relative paths inside the archive's folder"
    if raw == "":
        raise ArchiveRefused(f"an entry has an empty name: {allowed}")
    if "\0" in raw:
        raise ArchiveRefused(f"entry {raw!r} has a NUL byte in its name: {allowed}")
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ArchiveRefused(f"entry {raw!r} has a name that is not valid UTF-8: {allowed}") from e
    # Windows tools may write backslashes; read as separators, "..\\x" is caught as the escape it is meant to be.
    name = raw.replace("\\", "/")
    if name.startswith("/"):
        raise ArchiveRefused(f"entry {raw!r} is an absolute path: {allowed}")
    if _DRIVE.match(name):
        raise ArchiveRefused(f"entry {raw!r} names a Windows drive: {allowed}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveRefused(f"entry {raw!r} has a '..' part that leads out of the archive's folder: {allowed}")
    if len(encoded) > _MAX_NAME_BYTES or any(len(part.encode()) > _MAX_PART_BYTES for part in parts):
        raise ArchiveRefused(
            f"entry {raw[:80]!r}... has too long a name: at most {_MAX_NAME_BYTES} bytes, "
            f"{_MAX_PART_BYTES} per folder or file name"
        )
    return "/".join(parts)


def _is_junk(name: str) -> bool:
    """What macOS adds to an archive: resource forks and Finder settings, never a user's data."""
    parts = name.split("/")
    return parts[0] == "__MACOSX" or parts[-1] == ".DS_Store" or parts[-1].startswith("._")


class _Tally:
    """The entries met so far, held to the limits, and the paths they claim: two entries may not write one path,
    nor a file stand where a folder must."""

    def __init__(self, limits: ArchiveLimits):
        self.limits = limits
        self.entries, self.expanded_bytes, self.last = 0, 0, ""
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def count_entries(self, entries: int, entry: str) -> None:
        if entries > self.limits.max_entries:
            raise ArchiveRefused(
                f"the archive holds more than {self.limits.max_entries:,} entries (at entry {entry!r}): "
                f"at most {self.limits.max_entries:,} are allowed",
                413,
            )
        self.entries, self.last = entries, entry

    def add_dir(self, name: str, entry: str) -> None:
        if not name:
            return  # "./": the archive's folder itself
        if name in self.files:
            raise ArchiveRefused(f"entry {entry!r} is a folder where another entry is a file: each path once")
        self._add_parents(name, entry)
        self.dirs.add(name)

    def add_file(self, name: str, size: int, entry: str) -> None:
        if not name:
            raise ArchiveRefused(f"entry {entry!r} is a file without a name: entry names must name a file")
        if name in self.files:
            raise ArchiveRefused(f"entry {entry!r} writes {name!r} again: each path may appear only once")
        if name in self.dirs:
            raise ArchiveRefused(f"entry {entry!r} is a file where another entry is a folder: each path once")
        self._add_parents(name, entry)
        self.files.add(name)
        self.expanded_bytes += size
        if self.expanded_bytes > self.limits.max_expanded_bytes:
            raise ArchiveRefused(
                f"the archive expands to more than {self.limits.max_expanded_bytes:,} bytes (at entry {entry!r}, "
                f"{size:,} bytes): at most {self.limits.max_expanded_bytes:,} bytes are allowed",
                413,
            )

    def _add_parents(self, name: str, entry: str) -> None:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in self.files:
                raise ArchiveRefused(f"entry {entry!r} lies inside {parent!r}, which is a file: each path once")
            self.dirs.add(parent)


class _Writer:
    """Writes regular files and folders under dest, and nothing else, nowhere else; counts what it writes."""

    def __init__(self, dest: Path, limits: ArchiveLimits):
        self.root, self.limits, self.written = dest.resolve(), limits, 0

    def make_dir(self, name: str) -> None:
        if name:
            self._inside(name, name).mkdir(parents=True, exist_ok=True)

    def write(self, name: str, source: BinaryIO, declared: int, entry: str) -> None:
        target = self._inside(name, entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL and O_NOFOLLOW: never through a link, never over a file already written
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        size = 0
        with os.fdopen(fd, "wb") as out:
            for chunk in _chunks(source, entry):
                size += len(chunk)
                self.written += len(chunk)
                if size > declared:
                    raise ArchiveRefused(
                        f"entry {entry!r} expands past the {declared:,} bytes it declares: the archive lies about "
                        "its sizes; entries must hold what they declare",
                        413,
                    )
                if self.written > self.limits.max_expanded_bytes:
                    raise ArchiveRefused(
                        f"the archive expands to more than {self.limits.max_expanded_bytes:,} bytes (at entry "
                        f"{entry!r}): at most {self.limits.max_expanded_bytes:,} bytes are allowed",
                        413,
                    )
                out.write(chunk)
        if size != declared:
            raise ArchiveRefused(f"entry {entry!r} holds {size:,} bytes, not the {declared:,} it declares: damaged")

    def _inside(self, name: str, entry: str) -> Path:
        # The names were cleaned already; this catches whatever the cleaning might miss.
        target = self.root / name
        if not target.resolve().is_relative_to(self.root):
            raise ArchiveRefused(f"entry {entry!r} would be written outside the dataset's folder: refused")
        return target


def _chunks(source: BinaryIO, entry: str) -> Iterator[bytes]:
    while True:
        try:
            chunk = source.read(_CHUNK)
        except _READ_ERRORS as e:
            message = f"entry {entry!r} cannot be decompressed ({e}): the archive is damaged or truncated"
            raise ArchiveRefused(message) from e
        if not chunk:
            return
        yield chunk
