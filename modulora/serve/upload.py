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
refused (400 `unsafe_archive`); only the allowed file names are written, by this code, into a
fresh staging dir (never `extractall`; see `staging_dir`, leftovers of killed servers are
removed at start-up by `clean_staging`); other names -> 422. Then the library validates the adapter
as for `modulora library add`.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import APIError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
MAX_ARCHIVE_MEMBERS = 8  # the adapter files, plus one folder


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """(form fields, [(filename, content)]) of a multipart/form-data body; exact for binary parts."""
    from email.message import Message

    ct = Message()
    ct["content-type"] = content_type
    if ct.get_content_type() != "multipart/form-data" or not ct.get_param("boundary"):
        raise APIError(400, "send the adapter as multipart/form-data (a 'name' field and the adapter files, "
                            "or one .tar.gz/.tgz/.zip archive)", code="bad_upload")
    delim = b"--" + str(ct.get_param("boundary")).encode("latin-1")
    if body.startswith(delim):
        rest = body[len(delim):]
    else:
        at = body.find(b"\r\n" + delim)
        if at < 0:
            raise APIError(400, "malformed multipart body: no boundary", code="bad_upload")
        rest = body[at + 2 + len(delim):]
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    closed = False
    for chunk in rest.split(b"\r\n" + delim):
        if chunk.startswith(b"--"):
            closed = True
            break
        if not chunk.startswith(b"\r\n"):
            raise APIError(400, "malformed multipart body", code="bad_upload")
        head, sep, content = chunk[2:].partition(b"\r\n\r\n")
        if not sep:
            raise APIError(400, "malformed multipart part: no blank line after its headers", code="bad_upload")
        headers = Message()
        for line in head.decode("latin-1").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                headers[key.strip()] = value.strip()
        if headers.get("content-disposition") is None:
            raise APIError(400, "multipart part without Content-Disposition", code="bad_upload")
        field_name = headers.get_param("name", header="content-disposition")
        filename = headers.get_filename()
        if filename is None:
            if field_name is None:
                raise APIError(400, "multipart field without a name", code="bad_upload")
            fields[str(field_name)] = content.decode("utf-8", "replace")
        else:
            files.append((str(filename), content))
    if not closed:
        raise APIError(400, "malformed multipart body: no closing boundary", code="bad_upload")
    return fields, files


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


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress gzip data, stopping as soon as the output passes `limit` bytes (gzip bombs)."""
    import zlib

    out, total = [], 0
    while data:
        d = zlib.decompressobj(wbits=31)
        buf = data
        while buf:
            try:
                piece = d.decompress(buf, 1 << 20)
            except zlib.error as e:
                raise APIError(400, f"the archive is not valid gzip: {e}", param="file", code="bad_archive") from None
            total += len(piece)
            if total > limit:
                raise too_big(limit, "the unpacked archive")
            out.append(piece)
            buf = d.unconsumed_tail
            if d.eof:
                break
        if not d.eof:
            raise APIError(400, "the archive is truncated", param="file", code="bad_archive")
        data = d.unused_data.lstrip(b"\x00")  # concatenated gzip members; padding after the last
    return b"".join(out)


def archive_files(filename: str, data: bytes, limit: int) -> dict[str, bytes]:
    """The adapter files of an untrusted archive, checked member by member; nothing is written."""
    import io
    import stat
    import tarfile
    import zipfile

    entries: list[tuple[str, Any]] = []  # (member name, reader) of regular files
    if filename.lower().endswith(".zip"):
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            infos = zf.infolist()
        except (zipfile.BadZipFile, ValueError, EOFError) as e:
            raise APIError(400, f"the archive is not a valid zip: {e}", param="file", code="bad_archive") from None
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
            tf = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
            members = []
            for m in tf:
                members.append(m)
                if len(members) > MAX_ARCHIVE_MEMBERS:
                    raise refuse_unsafe(f"more than {MAX_ARCHIVE_MEMBERS} members")
        except tarfile.TarError as e:
            raise APIError(400, f"the archive is not a valid tar: {e}", param="file", code="bad_archive") from None
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
            raise APIError(400, f"cannot read {name!r} from the archive: {e}", param="file",
                           code="bad_archive") from None
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


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to pass `limit` bytes: by its
    Content-Length before reading, else as counted while reading (chunked bodies declare none)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise APIError(400, "bad Content-Length") from None
        if declared > limit:
            raise too_big(limit)
    chunks, total = [], 0
    async for piece in request.stream():
        total += len(piece)
        if total > limit:
            raise too_big(limit)
        chunks.append(piece)
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
        raise APIError(409, str(e), code="library_busy") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["ARCHIVE_SUFFIXES", "MAX_ARCHIVE_MEMBERS", "STAGING_PREFIX", "parse_multipart", "archive_files",
           "write_upload", "staging_dir", "clean_staging",
           "read_body", "adapter_files", "check_upload_name", "add_to_library", "too_big"]
