"""service/archives.py: uploaded dataset archives are told apart by their bytes, and hostile or broken ones are
refused with the right status and a message naming the entry, with nothing written outside the destination.

Every archive is built here with zipfile / tarfile; the bombs are small because the limits are.
"""

import gzip
import io
import random
import stat
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest

from service.archives import (
    ARCHIVE_FORMATS,
    ArchiveLimits,
    ArchiveListing,
    ArchiveRefused,
    _Writer,
    archive_format,
    extract_archive,
    inspect_archive,
)

LIMITS = ArchiveLimits(max_expanded_bytes=10_000_000, max_entries=100)
MB = 1_000_000

# A small dataset as users zip it: nested folders, and the junk macOS adds.
DATASET = {
    "dataset/annotations/train.json": b'{"images": [], "annotations": [], "categories": []}',
    "dataset/annotations/test.json": b'{"images": []}',
    "dataset/images/ap10k/0001.jpg": b"\xff\xd8\xff" + bytes(range(256)) * 4,
    "dataset/images/ap10k/deeper/0002.jpg": b"\xff\xd8\xff" + b"jpeg" * 100,
}
JUNK = {
    "__MACOSX/dataset/annotations/._train.json": b"\0\5\26\7 apple double",
    "dataset/.DS_Store": b"Bud1 finder",
    "dataset/images/._0001.jpg": b"\0\5\26\7 fork",
}


def write_zip(path: Path, entries) -> Path:
    """entries: (name or ZipInfo, bytes) pairs, written deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


def tar_member(name: str, data: bytes | None = None, kind=tarfile.REGTYPE, linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data or b"")
    return info, data


def write_tar_gz(path: Path, members, format=tarfile.GNU_FORMAT) -> Path:
    """members: (TarInfo, bytes or None) pairs."""
    with tarfile.open(path, "w:gz", format=format) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def files_outside(root: Path, dest: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p != dest and dest not in p.parents}


def refused_extract(archive: Path, tmp_path: Path, limits: ArchiveLimits = LIMITS) -> ArchiveRefused:
    """Extracts an archive that must be refused; asserts that nothing was written outside dest."""
    dest = tmp_path / f"dest-{archive.name}"
    before = files_outside(tmp_path, dest)
    with pytest.raises(ArchiveRefused) as refused:
        extract_archive(archive, dest, limits)
    assert files_outside(tmp_path, dest) == before
    assert not (tmp_path / "evil.txt").exists()
    return refused.value


def refused_both(archive: Path, tmp_path: Path, status: int, *words: str, limits: ArchiveLimits = LIMITS):
    """Both inspect and extract refuse with `status` and a message holding each of `words`."""
    with pytest.raises(ArchiveRefused) as inspected:
        inspect_archive(archive, limits)
    extracted = refused_extract(archive, tmp_path, limits)
    for refused in (inspected.value, extracted):
        assert refused.status_code == status, refused.message
        assert refused.message == str(refused)
        for word in words:
            assert word in refused.message, refused.message
    return inspected.value


def test_a_good_zip_is_listed_and_extracted_without_macos_junk(tmp_path):
    entries = [("dataset/", b""), ("dataset/images/", b""), *DATASET.items(), *JUNK.items()]
    archive = write_zip(tmp_path / "upload.bin", entries)
    listing = inspect_archive(archive, LIMITS)
    assert listing == ArchiveListing(
        format="zip",
        entries=len(entries),
        expanded_bytes=sum(len(data) for data in DATASET.values()),
        files=tuple(sorted(DATASET)),
    )

    dest = tmp_path / "out"
    assert extract_archive(archive, dest, LIMITS) == listing
    written = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert written == DATASET
    assert not (dest / "__MACOSX").exists()


def test_a_good_tar_gz_is_listed_and_extracted_without_macos_junk(tmp_path):
    # `tar czf x.tar.gz .` names entries "./...", and lists the folder itself as "./"
    members = [tar_member("./", kind=tarfile.DIRTYPE), tar_member("./dataset/images/ap10k", kind=tarfile.DIRTYPE)]
    members += [tar_member(f"./{name}", data) for name, data in {**DATASET, **JUNK}.items()]
    archive = write_tar_gz(tmp_path / "upload.zip", members)  # the name says zip: the bytes decide
    listing = inspect_archive(archive, LIMITS)
    assert listing.format == "tar.gz"
    assert listing.files == tuple(sorted(DATASET))
    assert listing.entries == len(members)
    assert listing.expanded_bytes == sum(len(data) for data in DATASET.values())

    dest = tmp_path / "out"
    dest.mkdir()  # an empty folder is as good as a new one
    assert extract_archive(archive, dest, LIMITS) == listing
    written = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert written == DATASET
    assert sorted(p.name for p in dest.iterdir()) == ["dataset"]


def test_formats_are_told_by_their_bytes_not_their_names(tmp_path):
    assert ARCHIVE_FORMATS == ("zip", "tar.gz")
    assert archive_format(write_zip(tmp_path / "a.tar.gz", DATASET.items())) == "zip"
    assert archive_format(write_zip(tmp_path / "empty.bin", [])) == "zip"  # PK\x05\x06
    assert inspect_archive(tmp_path / "empty.bin", LIMITS).files == ()
    assert archive_format(write_tar_gz(tmp_path / "b.zip", [tar_member("a.json", b"{}")])) == "tar.gz"


def test_extract_wants_a_new_or_empty_folder(tmp_path):
    archive = write_zip(tmp_path / "a.zip", DATASET.items())
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "already.txt").write_text("here")
    with pytest.raises(FileExistsError, match="new or empty folder"):
        extract_archive(archive, dest, LIMITS)


ESCAPES = [
    ("../evil.txt", "'..'"),
    ("dataset/../../evil.txt", "'..'"),
    ("/tmp/evil.txt", "absolute"),
    ("..\\evil.txt", "'..'"),
    ("dataset\\..\\..\\evil.txt", "'..'"),
    ("\\evil.txt", "absolute"),
    ("C:/evil.txt", "drive"),
    ("C:evil.txt", "drive"),
]


@pytest.mark.parametrize("name, why", ESCAPES)
def test_zip_entries_that_escape_are_refused(tmp_path, name, why):
    archive = write_zip(tmp_path / "a.zip", [*DATASET.items(), (name, b"owned")])
    refused = refused_both(archive, tmp_path, 422, repr(name), why, "relative paths inside")
    assert refused.status_code == 422


@pytest.mark.parametrize("name, why", ESCAPES)
def test_tar_entries_that_escape_are_refused(tmp_path, name, why):
    archive = write_tar_gz(tmp_path / "a.tar.gz", [tar_member("dataset/a.json", b"{}"), tar_member(name, b"owned")])
    refused_both(archive, tmp_path, 422, repr(name), why)


def test_empty_and_nul_names_are_refused(tmp_path):
    refused_both(write_zip(tmp_path / "empty.zip", [(zipfile.ZipInfo(""), b"x")]), tmp_path, 422, "empty name")
    # zipfile cuts a name at its NUL when writing, so the byte is put in afterwards
    nul = write_zip(tmp_path / "nul.zip", [("evil.txt#x", b"x")]).read_bytes().replace(b"evil.txt#x", b"evil.txt\0x")
    (tmp_path / "nul.zip").write_bytes(nul)
    refused_both(tmp_path / "nul.zip", tmp_path, 422, "NUL byte", repr("evil.txt\0x"))


def test_a_name_too_long_to_write_is_refused(tmp_path):
    name = "dataset/" + "a" * 300 + ".json"
    refused_both(write_zip(tmp_path / "a.zip", [(name, b"{}")]), tmp_path, 422, "too long a name", "255")


@pytest.mark.parametrize(
    "member, kind",
    [
        (tar_member("dataset/passwd", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), "a symbolic link"),
        (tar_member("dataset/up", kind=tarfile.SYMTYPE, linkname="../.."), "a symbolic link"),
        (tar_member("dataset/hard", kind=tarfile.LNKTYPE, linkname="dataset/a.json"), "a hard link"),
        (tar_member("dataset/fifo", kind=tarfile.FIFOTYPE), "a device file or fifo"),
        (tar_member("dataset/null", kind=tarfile.CHRTYPE), "a device file or fifo"),
        (tar_member("dataset/sda", kind=tarfile.BLKTYPE), "a device file or fifo"),
    ],
)
def test_tar_links_devices_and_fifos_are_refused(tmp_path, member, kind):
    archive = write_tar_gz(tmp_path / "a.tar.gz", [tar_member("dataset/a.json", b"{}"), member])
    refused_both(archive, tmp_path, 422, repr(member[0].name), kind, "only regular files and folders")


def test_a_symlink_in_a_zip_is_refused(tmp_path):
    link = zipfile.ZipInfo("dataset/passwd")
    link.create_system = 3  # unix
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = write_zip(tmp_path / "a.zip", [*DATASET.items(), (link, b"/etc/passwd")])
    refused_both(archive, tmp_path, 422, "'dataset/passwd'", "symbolic link", "only regular files and folders")
    assert not (tmp_path / "dest-a.zip" / "dataset" / "passwd").is_symlink()


def test_a_fifo_in_a_zip_is_refused(tmp_path):
    fifo = zipfile.ZipInfo("dataset/fifo")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    refused_both(write_zip(tmp_path / "a.zip", [(fifo, b"")]), tmp_path, 422, "'dataset/fifo'", "fifo")


def test_an_encrypted_zip_entry_is_refused(tmp_path):
    archive = write_zip(tmp_path / "a.zip", [("dataset/a.json", b"{}")])
    data = bytearray(archive.read_bytes())
    # zipfile writes no encryption: its flag, bit 0 of the flags 6 bytes into the local header and 8 into the central
    # directory's, is enough to be read as encrypted
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(signature) + offset] |= 0x1
    archive.write_bytes(bytes(data))
    refused_both(archive, tmp_path, 422, "'dataset/a.json'", "encrypted", "without a password")


def test_a_zip_bomb_past_the_bound_is_refused(tmp_path):
    archive = write_zip(tmp_path / "bomb.zip", [*DATASET.items(), ("dataset/zeros.bin", bytes(50 * MB))])
    assert archive.stat().st_size < MB
    refused_both(archive, tmp_path, 413, "'dataset/zeros.bin'", "at most 10,000,000 bytes")


def test_a_zip_bomb_by_ratio_is_refused_under_the_bound(tmp_path):
    archive = write_zip(tmp_path / "bomb.zip", [("dataset/zeros.bin", bytes(5 * MB))])
    limits = ArchiveLimits(max_expanded_bytes=100 * MB, max_entries=10)
    refused_both(archive, tmp_path, 413, "'dataset/zeros.bin'", "at most 200 to 1", limits=limits)
    # the same bytes pass a ratio bound they keep
    generous = ArchiveLimits(max_expanded_bytes=100 * MB, max_entries=10, max_ratio=5000)
    assert inspect_archive(archive, generous).expanded_bytes == 5 * MB


def test_a_zip_that_lies_about_its_sizes_is_stopped_while_extracting(tmp_path):
    archive = write_zip(tmp_path / "liar.zip", [("dataset/zeros.bin", bytes(5 * MB))])
    data = bytearray(archive.read_bytes())
    declared = 1000
    # the uncompressed size: 22 bytes into the local header, 24 into the central directory's
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature) + offset
        assert int.from_bytes(data[at : at + 4], "little") == 5 * MB
        data[at : at + 4] = declared.to_bytes(4, "little")
    archive.write_bytes(bytes(data))

    # Its central directory holds nothing to refuse...
    assert inspect_archive(archive, LIMITS).expanded_bytes == declared
    # ...but extraction reads the entry, and never writes more than it declared.
    refused = refused_extract(archive, tmp_path)
    assert refused.status_code == 422
    assert "'dataset/zeros.bin'" in refused.message
    written = tmp_path / "dest-liar.zip" / "dataset" / "zeros.bin"
    assert not written.exists() or written.stat().st_size <= declared


def test_extraction_counts_what_it_writes_whatever_an_entry_declares(tmp_path):
    # zipfile itself stops at the declared size (above); the writer holds to it, and to the bound, on its own.
    writer = _Writer(tmp_path, ArchiveLimits(max_expanded_bytes=3 * MB, max_entries=10))
    with pytest.raises(ArchiveRefused, match="lies about its sizes") as refused:
        writer.write("a.bin", io.BytesIO(bytes(2 * MB)), MB, "a.bin")
    assert refused.value.status_code == 413
    with pytest.raises(ArchiveRefused, match="more than 3,000,000 bytes") as refused:
        writer.write("b.bin", io.BytesIO(bytes(3 * MB)), 3 * MB, "b.bin")
    assert refused.value.status_code == 413


def test_the_writer_writes_nowhere_outside_its_folder_whatever_name_it_is_given(tmp_path):
    # The second line of defence, behind the names' cleaning: a name that still leads out is refused.
    dest = tmp_path / "dest"
    dest.mkdir()
    writer = _Writer(dest, LIMITS)
    for name in ("../evil.txt", str(tmp_path / "evil.txt")):
        with pytest.raises(ArchiveRefused, match="outside the dataset's folder"):
            writer.write(name, io.BytesIO(b"owned"), 5, name)
    (tmp_path / "elsewhere").mkdir()
    (dest / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ArchiveRefused, match="outside the dataset's folder"):
        writer.write("link/evil.txt", io.BytesIO(b"owned"), 5, "link/evil.txt")
    assert files_outside(tmp_path, dest) == {tmp_path / "elsewhere"}


def test_a_tar_gz_bomb_past_the_bound_is_refused(tmp_path):
    archive = write_tar_gz(tmp_path / "bomb.tar.gz", [tar_member("dataset/zeros.bin", bytes(50 * MB))])
    assert archive.stat().st_size < MB
    refused_both(archive, tmp_path, 413, "'dataset/zeros.bin'", "at most 10,000,000 bytes")


def test_a_tar_gz_bomb_hidden_in_macos_junk_is_stopped_while_streaming(tmp_path):
    # Junk is never written, yet its bytes are decompressed to be skipped: the stream's count stops them.
    archive = write_tar_gz(tmp_path / "bomb.tar.gz", [tar_member("__MACOSX/._zeros", bytes(20 * MB))])
    limits = ArchiveLimits(max_expanded_bytes=MB, max_entries=10)
    refused_both(archive, tmp_path, 413, "'__MACOSX/._zeros'", "headers included", limits=limits)


def test_a_gzip_bomb_is_stopped_at_the_bound_not_decompressed_whole(tmp_path):
    # A valid tar, then 200 MB of zeros in a gzip stream that never ends: decompressed whole it would be told
    # "truncated" (422); stopped at the bound it is told "too large" (413).
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        info, data = tar_member("dataset/a.json", b"{}")
        archive.addfile(info, io.BytesIO(data))
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header
    pieces = [deflate.compress(tar.getvalue()), deflate.flush(zlib.Z_FULL_FLUSH)]
    zeros = deflate.compress(bytes(MB)) + deflate.flush(zlib.Z_FULL_FLUSH)
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(b"".join(pieces) + zeros * 200)
    assert bomb.stat().st_size < MB

    limits = ArchiveLimits(max_expanded_bytes=MB, max_entries=10)
    refused_both(bomb, tmp_path, 413, "expands past", limits=limits)


def test_too_many_entries_are_refused(tmp_path):
    limits = ArchiveLimits(max_expanded_bytes=MB, max_entries=10)
    files = [(f"dataset/{i}.json", b"{}") for i in range(11)]
    refused_both(write_zip(tmp_path / "a.zip", files), tmp_path, 413, "at most 10 are allowed", limits=limits)
    members = [tar_member(name, data) for name, data in files]
    refused = refused_both(write_tar_gz(tmp_path / "a.tar.gz", members), tmp_path, 413, "at most 10", limits=limits)
    assert "'dataset/10.json'" in refused.message
    # ten are fine
    assert len(inspect_archive(write_zip(tmp_path / "ten.zip", files[:10]), limits).files) == 10


def test_two_entries_writing_one_path_are_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate it is asked to write
        twice = write_zip(tmp_path / "twice.zip", [("dataset/a.json", b"{}"), ("dataset/a.json", b"[]")])
    refused_both(twice, tmp_path, 422, "'dataset/a.json'", "only once")

    spelled_twice = [tar_member("dataset/a.json", b"{}"), tar_member("./dataset//a.json", b"[]")]
    refused_both(write_tar_gz(tmp_path / "t.tar.gz", spelled_twice), tmp_path, 422, "'./dataset//a.json'", "once")

    file_then_folder = [("dataset/a", b"{}"), ("dataset/a/b.json", b"{}")]
    refused_both(write_zip(tmp_path / "ff.zip", file_then_folder), tmp_path, 422, "'dataset/a/b.json'", "is a file")


def test_an_oversized_tar_header_is_refused_before_it_is_read(tmp_path):
    long_name = "dataset/" + "a/" * 50_000 + "x.json"
    archive = write_tar_gz(tmp_path / "a.tar.gz", [tar_member(long_name, b"{}")], format=tarfile.PAX_FORMAT)
    refused_both(archive, tmp_path, 422, "extended header", "at most 65,536")


def test_a_damaged_tar_header_is_not_taken_for_the_end(tmp_path):
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        for name in ("dataset/a.json", "dataset/b.json"):
            info, data = tar_member(name, b"{}")
            archive.addfile(info, io.BytesIO(data))
    data = bytearray(tar.getvalue())
    data[1024 + 148] ^= 0x01  # the second header's checksum
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(gzip.compress(bytes(data)))
    refused_both(archive, tmp_path, 422, "after entry 'dataset/a.json'", "damaged")


def png_named_zip(tmp_path):
    path = tmp_path / "photo.zip"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    return path, "a PNG image"


def text_file(tmp_path):
    path = tmp_path / "notes.zip"
    path.write_text("images and annotations\n" * 40)
    return path, "no known archive format"


def plain_gzip(tmp_path):
    path = tmp_path / "a.tar.gz"
    path.write_bytes(gzip.compress(b'{"images": []}' * 100))
    return path, "holds no tar archive"


def tar_bz2(tmp_path):
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:bz2") as archive:
        info, data = tar_member("a.json", b"{}")
        archive.addfile(info, io.BytesIO(data))
    return path, "bzip2"


def plain_tar(tmp_path):
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w") as archive:
        info, data = tar_member("a.json", b"{}")
        archive.addfile(info, io.BytesIO(data))
    return path, "uncompressed tar"


def empty_file(tmp_path):
    path = tmp_path / "a.zip"
    path.write_bytes(b"")
    return path, "an empty file"


@pytest.mark.parametrize("make", [png_named_zip, text_file, plain_gzip, tar_bz2, plain_tar, empty_file])
def test_what_is_not_an_accepted_archive_is_refused_naming_the_formats(tmp_path, make):
    path, what = make(tmp_path)
    with pytest.raises(ArchiveRefused) as refused:
        archive_format(path)
    assert refused.value.status_code == 422
    assert what in refused.value.message
    assert "accepted formats: zip, tar.gz" in refused.value.message
    refused_both(path, tmp_path, 422, what)


def test_a_truncated_zip_is_refused(tmp_path):
    whole = write_zip(tmp_path / "a.zip", DATASET.items()).read_bytes()
    (tmp_path / "a.zip").write_bytes(whole[: len(whole) // 2])
    refused_both(tmp_path / "a.zip", tmp_path, 422, "damaged or truncated")


def test_a_truncated_tar_gz_is_refused(tmp_path):
    members = [tar_member(name, data) for name, data in DATASET.items()]
    members.append(tar_member("dataset/noise.bin", random.Random(0).randbytes(50_000)))  # incompressible
    whole = write_tar_gz(tmp_path / "a.tar.gz", members).read_bytes()
    (tmp_path / "a.tar.gz").write_bytes(whole[: len(whole) - 2000])
    refused_both(tmp_path / "a.tar.gz", tmp_path, 422, "damaged or truncated")


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_entries >= 1"):
        ArchiveLimits(max_expanded_bytes=MB, max_entries=0)
