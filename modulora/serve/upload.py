"""Adapter uploads over HTTP: a multipart/form-data parser and the checks on untrusted archives.

Why a parser of our own: python-multipart would be one more dependency, and an upload here is
small (one adapter, capped by `max_upload_bytes`) and read whole into memory anyway, so the body
is parsed exactly, binary parts included, with every size bound checked by this code.

The upload is a `name` field plus the files `adapter_config.json`, `adapter_model.safetensors`
(and optionally `card.json` / `README.md`), OR one `.tar.gz`/`.tgz`/`.zip` holding them at top
level or in one folder. The body is capped (Content-Length checked first, bytes counted as read)
-> 413. Archives are untrusted: gzip is decompressed under the same cap before tarfile sees a
byte, zip sizes are summed first and counted again as read; members that are links, devices,
absolute, hold `..`, nest deeper than one folder, or number more than MAX_ARCHIVE_MEMBERS are
refused (400 `unsafe_archive`), as are more than MAX_GZIP_MEMBERS gzip members, a zip central
directory over MAX_ZIP_DIRECTORY bytes (both checked before the members are read) and more
than MAX_TAR_EXTENSIONS bytes of tar extension headers (pax, GNU long names); only the allowed
file names are written, by this code, into a fresh staging dir (never `extractall`; see
`staging_dir`, leftovers of killed servers are removed at start-up by `clean_staging`); other
names -> 422. Then the library validates the adapter as for `modulora library add`.

Time: every step is linear in the body and bounded (gzip is fed in slices, so no member copies
the rest of the data; multipart parts are found by one forward scan and number at most
MAX_PARTS, their headers at most MAX_PART_HEADER bytes, which also bounds the stdlib's header
parsers, quadratic on long inputs); the body must arrive within the server's `body_timeout`
(-> 408, the connection closed). The server runs this in a thread pool of its own.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from starlette.requests import ClientDisconnect

from .errors import APIError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
MAX_ARCHIVE_MEMBERS = 8  # the adapter files, plus one folder
MAX_GZIP_MEMBERS = 64  # concatenated gzip members: a .tar.gz has one
MAX_ZIP_DIRECTORY = 1 << 20  # bytes of a zip's central directory (a few entries take a few hundred)
MAX_TAR_HEADERS = 4 * (MAX_ARCHIVE_MEMBERS + 1)  # tar header blocks read: members and their extensions
MAX_TAR_EXTENSIONS = 16 << 10  # bytes of pax / GNU long-name headers in all (the stdlib's pax parser is quadratic)
MAX_PARTS = 16  # multipart parts: a name field and a handful of files
MAX_PART_HEADER = 4 << 10  # bytes of one part's headers (and of the Content-Type header)
GZIP_SLICE = 64 << 10  # gzip input fed per call at most (a member's unused tail is copied)
_NONZERO = re.compile(rb"[^\x00]")


def bad_upload(message: str) -> APIError:
    """The 400 of a request body that is not the multipart upload this endpoint takes."""
    return APIError(400, message, code="bad_upload")


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """(form fields, [(filename, content)]) of a multipart/form-data body; exact for binary parts.
    One forward scan finds the boundaries (linear); more than MAX_PARTS parts, or a part whose
    headers pass MAX_PART_HEADER bytes, is refused before anything more is parsed."""
    from email.message import Message

    ct = Message()
    if len(content_type) <= MAX_PART_HEADER:
        ct["content-type"] = content_type
    if ct.get_content_type() != "multipart/form-data" or not ct.get_param("boundary"):
        raise bad_upload("send the adapter as multipart/form-data (a 'name' field and the adapter files, "
                         "or one .tar.gz/.tgz/.zip archive)")
    delim = b"--" + str(ct.get_param("boundary")).encode("latin-1")
    sep = b"\r\n" + delim
    if body.startswith(delim):
        pos = len(delim)
    else:
        at = body.find(sep)
        if at < 0:
            raise bad_upload("malformed multipart body: no boundary")
        pos = at + len(sep)
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    parts = 0
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the body
        parts += 1
        if parts > MAX_PARTS:
            raise bad_upload(f"the multipart body has more than {MAX_PARTS} parts (an upload is a 'name' "
                             "field and the adapter files, or one archive)")
        end = body.find(sep, pos)
        if end < 0:
            raise bad_upload("malformed multipart body: no closing boundary")
        if not body.startswith(b"\r\n", pos):
            raise bad_upload("malformed multipart body")
        head_end = body.find(b"\r\n\r\n", pos + 2, min(end, pos + 2 + MAX_PART_HEADER + 4))
        if head_end < 0:
            if end - pos - 2 > MAX_PART_HEADER:
                raise bad_upload(f"a multipart part's headers are over {MAX_PART_HEADER} bytes")
            raise bad_upload("malformed multipart part: no blank line after its headers")
        name, filename = part_names(body[pos + 2:head_end].decode("latin-1"))
        content = body[head_end + 4:end]
        if filename is None:
            if name is None:
                raise bad_upload("multipart field without a name")
            fields[name] = content.decode("utf-8", "replace")
        else:
            files.append((filename, content))
        pos = end + len(sep)
    return fields, files


def part_names(head: str) -> tuple[str | None, str | None]:
    """(field name, filename) from a multipart part's headers (at most MAX_PART_HEADER chars)."""
    from email.message import Message

    headers = Message()
    for line in head.split("\r\n"):
        key, colon, value = line.partition(":")
        if colon:
            headers[key.strip()] = value.strip()
    if headers.get("content-disposition") is None:
        raise bad_upload("multipart part without Content-Disposition")
    name = headers.get_param("name", header="content-disposition")
    filename = headers.get_filename()
    return (None if name is None else str(name)), (None if filename is None else str(filename))


def refuse_unsafe(what: str) -> APIError:
    """The 400 of an archive refused for its structure (a link, `..`, too many members...)."""
    return APIError(400, f"archive refused: {what}", param="file", code="unsafe_archive")


def member_target(name: str) -> tuple[str, str] | None:
    """(folder, filename) of an archive member path, refusing unsafe paths; None for a folder entry."""
    if not name or "\\" in name or "\x00" in name:
        raise refuse_unsafe(f"member name {name!r}")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise refuse_unsafe(f"absolute path {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise refuse_unsafe(f"path {name!r} leaves the archive")
    if not parts:
        return None
    if len(parts) > 2:
        raise refuse_unsafe(f"{name!r} is nested too deep (the files go at top level or in one folder)")
    return ("" if len(parts) == 1 else parts[0]), parts[-1]


def check_file_name(fname: str, where: str) -> None:
    """422 unless `fname` is one of the files an adapter may hold (pickles named as such)."""
    from ..validate import ALLOWED_FILES, PICKLE_MESSAGE, PICKLE_SUFFIXES

    if fname.lower().endswith(PICKLE_SUFFIXES):
        raise APIError(422, f"{fname}: {PICKLE_MESSAGE}", param="file", code="invalid_adapter")
    if fname not in ALLOWED_FILES:
        raise APIError(422, f"unexpected file {fname!r} in {where}; an adapter holds only "
                            f"{', '.join(ALLOWED_FILES)}", param="file", code="invalid_adapter")


def too_big(limit: int, what: str = "the upload") -> APIError:
    """The 413 of a body or an unpacked archive over `limit` bytes."""
    return APIError(413, f"{what} is over the limit of {limit} bytes", code="payload_too_large")


def bad_archive(message: str) -> APIError:
    """The 400 of an archive that cannot be read (truncated, not gzip/tar/zip)."""
    return APIError(400, message, param="file", code="bad_archive")


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress gzip data, stopping as soon as the output passes `limit` bytes (gzip bombs).

    Linear: the input is fed in slices of one memoryview (1 KiB first, doubling up to GZIP_SLICE),
    so a member that ends mid-slice leaves at most one slice in `unused_data`, never the rest of
    the data as feeding it whole did (quadratic in the members); and at most MAX_GZIP_MEMBERS
    concatenated members are read (a .tar.gz has one). Zero bytes after a member (padding) are
    skipped."""
    import zlib

    view, size = memoryview(data), len(data)
    step = 1 << 20  # output per decompress call: the limit is checked in these steps
    out, total, pos, members = [], 0, 0, 0
    while pos < size:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise refuse_unsafe(f"more than {MAX_GZIP_MEMBERS} concatenated gzip members "
                                "(a .tar.gz holds one)")
        d, feed = zlib.decompressobj(wbits=31), 1 << 10  # small first: most of it is copied if the member ends
        while not d.eof:
            if pos >= size:
                raise bad_archive("the archive is truncated")
            buf = view[pos:pos + feed]
            pos, feed = pos + len(buf), min(2 * feed, GZIP_SLICE)
            while True:
                try:
                    piece = d.decompress(buf, step)
                except zlib.error as e:
                    raise bad_archive(f"the archive is not valid gzip: {e}") from None
                total += len(piece)
                if total > limit:
                    raise too_big(limit, "the unpacked archive")
                out.append(piece)
                buf = d.unconsumed_tail
                if d.eof or (not buf and len(piece) < step):  # done, or this slice is used up
                    break
        pos -= len(d.unused_data)  # the next member starts right after this one
        nonzero = _NONZERO.search(data, pos)
        pos = nonzero.start() if nonzero else size
    return b"".join(out)


def check_zip_directory(data: bytes) -> None:
    """Refuse a zip whose central directory, as zipfile will find it, is over MAX_ZIP_DIRECTORY
    bytes or lists more than MAX_ARCHIVE_MEMBERS entries: zipfile parses the whole directory,
    one object per entry, before any count can be checked. The end-of-central-directory record
    is looked up where zipfile looks (the last 22 bytes, else the last signature in the final
    64 KiB), and a zip64 record right before it overrides it, as in zipfile. A zip without that
    record is left to zipfile to refuse."""
    import struct

    eocd = b"PK\x05\x06"
    at = len(data) - 22
    if not (at >= 0 and data.startswith(eocd, at) and data.endswith(b"\0\0")):
        at = data.rfind(eocd, max(0, len(data) - 22 - (1 << 16)))
        if at < 0 or len(data) - at < 22:
            return
    entries, dir_size = struct.unpack_from("<HI", data, at + 10)
    record = at - 20 - 56  # zip64's record, right before its locator, right before the record above
    if record >= 0 and data.startswith(b"PK\x06\x07", at - 20) and data.startswith(b"PK\x06\x06", record):
        entries, dir_size = struct.unpack_from("<QQ", data, record + 32)
    if entries > MAX_ARCHIVE_MEMBERS:
        raise refuse_unsafe(f"{entries} members (at most {MAX_ARCHIVE_MEMBERS})")
    if dir_size > MAX_ZIP_DIRECTORY:
        raise refuse_unsafe(f"a central directory of {dir_size} bytes (at most {MAX_ZIP_DIRECTORY})")


def guarded_tarinfo():
    """A TarInfo class for one tar archive that refuses it past MAX_TAR_HEADERS header blocks or
    MAX_TAR_EXTENSIONS bytes of extension headers (pax, GNU long names): tarfile reads a chain of
    those recursively, and its pax parser is quadratic in a header's size."""
    import tarfile

    headers, extension_bytes = 0, 0
    extensions = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                  tarfile.GNUTYPE_LONGLINK)

    class GuardedTarInfo(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf, encoding, errors):
            nonlocal headers, extension_bytes
            info = super().frombuf(buf, encoding, errors)
            headers += 1
            if headers > MAX_TAR_HEADERS:
                raise refuse_unsafe(f"more than {MAX_TAR_HEADERS} tar headers")
            if info.type in extensions:
                extension_bytes += info.size
                if extension_bytes > MAX_TAR_EXTENSIONS:
                    raise refuse_unsafe(f"over {MAX_TAR_EXTENSIONS} bytes of tar extension headers "
                                        "(pax, long names)")
            return info

    return GuardedTarInfo


def archive_files(filename: str, data: bytes, limit: int) -> dict[str, bytes]:
    """The adapter files of an untrusted archive, checked member by member; nothing is written."""
    import io
    import stat
    import tarfile
    import zipfile

    entries: list[tuple[str, Any]] = []  # (member name, reader) of regular files
    if filename.lower().endswith(".zip"):
        check_zip_directory(data)  # before zipfile reads (and makes an object of) every entry
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            infos = zf.infolist()
        except (zipfile.BadZipFile, ValueError, EOFError) as e:
            raise bad_archive(f"the archive is not a valid zip: {e}") from None
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise refuse_unsafe(f"{len(infos)} members (at most {MAX_ARCHIVE_MEMBERS})")
        if sum(i.file_size for i in infos) > limit:
            raise too_big(limit, "the unpacked archive")
        for info in infos:
            mode = info.external_attr >> 16
            if info.flag_bits & 0x1:
                raise refuse_unsafe(f"{info.filename!r} is encrypted")
            if info.is_dir():
                member_target(info.filename)
                continue
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: made without Unix modes
                raise refuse_unsafe(f"{info.filename!r} is not a regular file (link or device)")
            entries.append((info.filename, lambda info=info: zf.open(info)))
    else:
        raw = gunzip_bounded(data, limit)  # bounded before tarfile sees a byte
        try:
            tf = tarfile.open(fileobj=io.BytesIO(raw), mode="r:", tarinfo=guarded_tarinfo())
            members = []
            for m in tf:
                members.append(m)
                if len(members) > MAX_ARCHIVE_MEMBERS:
                    raise refuse_unsafe(f"more than {MAX_ARCHIVE_MEMBERS} members")
        except tarfile.TarError as e:
            raise bad_archive(f"the archive is not a valid tar: {e}") from None
        if sum(m.size for m in members if m.isreg()) > limit:
            raise too_big(limit, "the unpacked archive")
        for m in members:
            if m.isdir():
                member_target(m.name)
                continue
            if m.issym() or m.islnk():
                raise refuse_unsafe(f"{m.name!r} is a link")
            if not m.isreg():
                raise refuse_unsafe(f"{m.name!r} is not a regular file (device, fifo...)")
            entries.append((m.name, lambda m=m: tf.extractfile(m)))
    folders, out = set(), {}
    for name, _ in entries:  # every path is checked before any content is read
        target = member_target(name)
        if target is None:
            raise refuse_unsafe(f"member name {name!r}")
        folders.add(target[0])
    if len(folders) > 1:
        raise refuse_unsafe("the files must be at top level or in ONE folder")
    total = 0
    for name, reader in entries:
        fname = member_target(name)[1]
        check_file_name(fname, "the archive")
        if fname in out:
            raise refuse_unsafe(f"{fname} appears twice")
        chunks = []
        try:
            with reader() as f:
                while piece := f.read(1 << 20):
                    total += len(piece)
                    if total > limit:
                        raise too_big(limit, "the unpacked archive")
                    chunks.append(piece)
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, NotImplementedError, RuntimeError) as e:
            raise bad_archive(f"cannot read {name!r} from the archive: {e}") from None
        out[fname] = b"".join(chunks)
    return out


STAGING_PREFIX = "upload-"  # <library>/staging/upload-<pid>-<random>: an upload being written


def staging_dir(library) -> str:
    """Where uploads are staged: `staging/` in the library's folder (the library's own `tmp/` is
    emptied by any process's gc, which would pull files from under an upload in flight), so
    a full or read-only library fails the upload at once and leftovers stay with their library."""
    import os

    return os.path.join(str(library.root), "staging")


def _started_at(pid: int) -> float | None:
    """When process `pid` started (epoch seconds, from /proc/<pid>/stat and the boot time);
    None when it is not running."""
    import os

    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def clean_staging(folder: str) -> int:
    """Remove the staging folders left by killed servers; returns how many. A folder is a
    leftover when the process named in it is not running, or started after the folder was last
    written (its pid was reused, e.g. a restarted container). Folders of live servers stay."""
    import os
    import shutil

    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    have_proc = os.path.isdir("/proc/self")
    removed = 0
    for e in entries:
        pid = e.name[len(STAGING_PREFIX):].partition("-")[0]
        if not e.name.startswith(STAGING_PREFIX) or not pid.isdigit():
            continue
        try:
            mtime = e.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if have_proc:
            started = _started_at(int(pid))
            stale = started is None or mtime < started - 2
        else:  # pragma: no cover - no /proc: liveness only
            try:
                os.kill(int(pid), 0)
                stale = False
            except ProcessLookupError:
                stale = True
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(e.path, ignore_errors=True) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)
            removed += 1
    return removed


def write_upload(files: dict[str, bytes], folder: str | None = None) -> str:
    """A fresh staging dir holding exactly `files` (plain names, checked by the caller), in
    `folder` (created if missing; default the system's temp dir), named upload-<pid>-<random>;
    removed again if writing fails (a full disk)."""
    import os
    import shutil
    import tempfile

    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder)
    try:
        for fname, content in files.items():
            fd = os.open(os.path.join(tmp, fname),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def body_timed_out(timeout: float) -> APIError:
    """The 408 of a request body not received whole within `timeout` seconds; the connection is
    closed (what is left of the body is never read)."""
    return APIError(408, f"the request body was not received within {timeout:g} seconds (--body-timeout)",
                    code="body_timeout", headers={"connection": "close"})


async def read_body(request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is known to pass `limit` bytes: by its
    Content-Length before reading, else as counted while reading (chunked bodies declare none);
    408 unless the whole body arrives within `timeout` seconds (None: no limit), so a client that
    declares a large body and stalls does not hold the connection."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise APIError(400, "bad Content-Length") from None
        if declared > limit:
            raise too_big(limit)
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for piece in request.stream():
                total += len(piece)
                if total > limit:
                    raise too_big(limit)
                chunks.append(piece)
    except TimeoutError:
        raise body_timed_out(timeout) from None
    except ClientDisconnect:  # nobody reads the answer; logged and counted as 499, not as a failure
        raise APIError(499, "the client closed the connection before sending the whole body",
                       code="client_disconnect") from None
    return b"".join(chunks)


def adapter_files(files: list[tuple[str, bytes]], limit: int) -> dict[str, bytes]:
    """{file name: content} of an upload: the files sent, or those of the one archive sent."""
    if len(files) == 1 and files[0][0].lower().endswith(ARCHIVE_SUFFIXES):
        return archive_files(files[0][0], files[0][1], limit)
    out: dict[str, bytes] = {}
    for fname, content in files:
        if fname.lower().endswith(ARCHIVE_SUFFIXES):
            raise APIError(400, "send one archive alone, or the adapter files without an archive",
                           param="file", code="bad_upload")
        if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
            raise APIError(400, f"bad file name {fname!r}: send plain file names", param="file",
                           code="bad_upload")
        check_file_name(fname, "the upload")
        if fname in out:
            raise APIError(400, f"{fname} was sent twice", param="file", code="bad_upload")
        out[fname] = content
    if not out:
        raise APIError(400, "no files: send adapter_config.json and adapter_model.safetensors "
                            "(card.json optional), or one .tar.gz/.tgz/.zip archive", param="file",
                       code="bad_upload")
    return out


def check_upload_name(name: str, reserved: tuple[str, ...] = ()) -> str:
    """The adapter name of an upload form, stripped; 400 when missing, unsafe or reserved (the
    library's RESERVED_NAMES, checked by validate_name, plus any names in `reserved`)."""
    from ..validate import ValidationError, validate_name

    name = name.strip()
    if not name:
        raise APIError(400, "the form field 'name' is missing", param="name", code="bad_upload")
    try:
        validate_name(name)
    except ValidationError as e:
        raise APIError(400, str(e), param="name", code="invalid_name") from None
    if name in reserved:
        raise APIError(400, f"{name!r} is reserved for a routing policy; choose another name",
                       param="name", code="invalid_name")
    return name


def add_to_library(library, name: str, files: dict[str, bytes], fingerprint: dict, staging: str | None = None):
    """Write `files` to a fresh staging dir (in `staging`, default the system's temp dir) and
    add them to the library as `name` (its record). Refused adapters -> 422 (the library is
    unchanged); a busy library -> 409; a full or read-only disk raises its OSError / sqlite3
    error (the server answers 507)."""
    import shutil

    from ..base import BaseModelError
    from ..library import LibraryError
    from ..validate import ValidationError

    tmp = write_upload(files, staging)
    try:
        return library.add(name, tmp, fingerprint)
    except (ValidationError, BaseModelError) as e:
        raise APIError(422, str(e), param="file", code="invalid_adapter") from None
    except LibraryError as e:
        raise refusal(e, APIError(409, str(e), code="library_busy")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refusal(e: Exception, otherwise: APIError) -> Exception:
    """What to raise for a library's refusal `e`: the full or read-only storage behind it (the
    server answers 507), else `otherwise`."""
    from ..cli import storage_problem

    if storage_problem(e) is None:
        return otherwise
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return cause if cause is not None else OSError(30, str(e))  # 30: EROFS


__all__ = ["ARCHIVE_SUFFIXES", "MAX_ARCHIVE_MEMBERS", "MAX_GZIP_MEMBERS", "MAX_PARTS", "STAGING_PREFIX",
           "parse_multipart", "archive_files", "gunzip_bounded", "body_timed_out",
           "write_upload", "staging_dir", "clean_staging",
           "read_body", "adapter_files", "check_upload_name", "add_to_library", "too_big"]
