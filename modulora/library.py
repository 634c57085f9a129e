"""A library of adapters: a SQLite catalog over immutable, content-addressed files.

Layout of a library directory:

    catalog.sqlite        names, versions, configs, cards; derived data (routing caches)
    objects/<object_id>/  the files of one adapter, never modified; object_id hashes their content
    tmp/                  objects being written (renamed into objects/ when complete)
    lock                  flock: adds hold it shared, garbage collection exclusive

An add checks everything first, writes the object (temp dir, fsync, rename; identical content is
stored once), then inserts the catalog row in one transaction. A crash at any point leaves the
catalog as it was; what it leaves on disk is unreferenced and `gc()` removes it.

A library this process cannot write (read-only mount, folder or catalog without write permission)
is opened read-only: reads work, writes raise LibraryError. Reads never need to write, so they also
work on a full disk; a write that fails for lack of space raises OSError(ENOSPC) naming the folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from .validate import Limits, ValidationError, validate_adapter_dir, validate_name

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: gc falls back to age-based cleanup
    fcntl = None

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0
# Without flock (non-POSIX) a temp dir or unreferenced object younger than this may belong to an
# add in progress, so gc leaves it alone.
STALE_AFTER_S = 3600.0
PAUSE_ENV = "MODULORA_LIBRARY_PAUSE_BEFORE_COMMIT"  # test hook, see _before_commit
# Derived data under an object id with this prefix belongs to the library, not to one object
# (object ids are hex digests, never containing ':'); gc keeps it.
LIBRARY_SCOPE = "library:"
# A write that failed while the library's file system has less free space than this failed for
# lack of space (SQLite reports a -shm it cannot grow as a plain "disk I/O error").
FULL_BELOW_BYTES = 1 << 20


class LibraryError(ValueError):
    """A library operation cannot be done (unknown name or version, busy, bad export target...)."""


_UNSET = object()


class AdapterRecord:
    """One version of an adapter. `card` and `config` are parsed from the catalog on first access
    (then kept): listing a library reads neither, so a request that only needs names, types or
    object ids costs one small query however large the cards are. Reading them after the version
    (and every other version with the same content) was removed raises LibraryError."""

    __slots__ = ("name", "version", "type", "object_id", "path", "created", "base_id", "num_params",
                 "_card", "_config", "_load")

    def __init__(self, name: str, version: int, type: str, object_id: str, path: Path, created: str,
                 card=_UNSET, config=_UNSET, base_id: str | None = None, num_params: int = 0, *, load=None):
        self.name, self.version, self.type, self.object_id = name, version, type, object_id
        self.path = path  # the immutable directory holding the files
        self.created, self.base_id, self.num_params = created, base_id, num_params
        self._card, self._config, self._load = card, config, load

    def _field(self, key: str):
        value = getattr(self, "_" + key)
        if value is _UNSET:
            if self._load is None:
                raise LibraryError(f"{self.ref} has no {key} loaded")
            value = self._load(self, key)
            setattr(self, "_" + key, value)
        return value

    @property
    def card(self) -> dict | None:
        return self._field("card")

    @card.setter
    def card(self, value) -> None:
        self._card = value

    @property
    def config(self) -> dict:
        return self._field("config")

    @config.setter
    def config(self, value) -> None:
        self._config = value

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        """Every field (card and config parsed), JSON-serialisable except `path`."""
        return {"name": self.name, "version": self.version, "type": self.type, "object_id": self.object_id,
                "path": self.path, "created": self.created, "card": self.card, "config": self.config,
                "base_id": self.base_id, "num_params": self.num_params}

    def __eq__(self, other):
        if not isinstance(other, AdapterRecord):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None

    def __repr__(self) -> str:
        return (f"AdapterRecord(name={self.name!r}, version={self.version}, type={self.type!r}, "
                f"object_id={self.object_id!r}, created={self.created!r})")


# ---------------------------------------------------------------------------------------------
# object store: the only code that knows objects are directories on a local disk


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def object_id_for(digests: dict[str, str]) -> str:
    """sha256 over the sorted (filename, file sha256) pairs."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


class _FileStore:
    def __init__(self, root: Path, create: bool = True):
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        if create:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, object_id: str) -> Path:
        return self.objects / object_id

    def has(self, object_id: str) -> bool:
        return self.path(object_id).is_dir()

    def ids(self) -> set[str]:
        return {p.name for p in self.objects.iterdir()} if self.objects.is_dir() else set()

    def put(self, object_id: str, files: dict, digests: dict[str, str]) -> bool:
        """Store files (bytes or source paths) under object_id unless present; True if written.

        A source path is re-hashed while copied, so a file changed since validation is refused.
        """
        if self.has(object_id):
            return False
        tmp = self.tmp / f"add-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            for name, content in files.items():
                target = tmp / name
                h = hashlib.sha256()
                with open(target, "xb") as out:
                    if isinstance(content, (bytes, bytearray)):
                        out.write(content)
                        h.update(content)
                    else:
                        fd = os.open(content, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                        with os.fdopen(fd, "rb") as src:
                            for chunk in iter(lambda: src.read(1 << 20), b""):
                                out.write(chunk)
                                h.update(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                if h.hexdigest() != digests[name]:
                    raise LibraryError(f"{name} changed while it was being added; try again")
                os.chmod(target, 0o444)
            _fsync_dir(tmp)
            _before_rename_hook()
            try:
                os.rename(tmp, self.path(object_id))
            except OSError:
                if not self.has(object_id):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another add stored the same content first
                return False
            _fsync_dir(self.objects)
            return True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def delete(self, object_id: str) -> None:
        """Move out of objects/ first (atomic), then remove: no half-deleted object keeps its id."""
        src = self.path(object_id)
        dead = self.tmp / f"del-{object_id[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(src, dead)
        except FileNotFoundError:
            return
        shutil.rmtree(dead, ignore_errors=True)

    def temp_dirs(self) -> list[Path]:
        return list(self.tmp.iterdir()) if self.tmp.is_dir() else []

    def files(self, object_id: str) -> dict[str, Path]:
        return {p.name: p for p in sorted(self.path(object_id).iterdir())}


def _before_rename_hook() -> None:
    """Monkeypatched by tests to fail while an object is half written."""


def _before_commit(name: str, version: int) -> None:
    """Runs inside the catalog transaction, after the object is in place and the row inserted.

    Tests monkeypatch it to raise, or set $MODULORA_LIBRARY_PAUSE_BEFORE_COMMIT to a file path:
    the add then creates that file and sleeps, so that a test can SIGKILL it right here.
    """
    flag = os.environ.get(PAUSE_ENV)
    if flag:
        Path(flag).write_text(f"{os.getpid()} {name} {version}\n")
        time.sleep(600)


# ---------------------------------------------------------------------------------------------


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    type TEXT NOT NULL,
    object_id TEXT NOT NULL,
    created TEXT NOT NULL,
    card TEXT,
    config TEXT NOT NULL,
    base_id TEXT,
    num_params INTEGER NOT NULL,
    files TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS adapters_object ON adapters (object_id);
-- the last version number ever given to a name: numbers are never reused, even after remove
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS derived (
    object_id TEXT NOT NULL, kind TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (object_id, kind)
);
"""

_COLUMNS = "name, version, type, object_id, created, card, config, base_id, num_params, files"
# what a record is made of: no card, config or file list (parsed lazily, see AdapterRecord)
_RECORD_COLUMNS = "name, version, type, object_id, created, base_id, num_params"
# A catalog made before auto_vacuum is VACUUMed after a removal once half of it, or this many
# bytes and a quarter of it, are free (newer ones give pages back at every removal).
RECLAIM_MIN_BYTES = 1 << 20


def _why_read_only(root: Path, paths: list[Path]) -> OSError | None:
    """Why this process cannot write the library at `root` (EROFS or EACCES naming the first path
    it may not write), or None. Asks the kernel (access(2)), so root on a writable mount can."""
    for path in paths:
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            try:
                read_only_fs = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
            except (OSError, AttributeError):  # pragma: no cover - no statvfs
                read_only_fs = False
            code = errno.EROFS if read_only_fs else errno.EACCES
            return OSError(code, os.strerror(code), str(path))
    return None


def _wal_is_empty(catalog: Path) -> bool:
    """True when the catalog's write-ahead log holds nothing, so the main file is the whole catalog."""
    try:
        return os.stat(f"{catalog}-wal").st_size == 0
    except FileNotFoundError:
        return True


class Library:
    def __init__(self, path: str | Path | None = None, *, limits: Limits = Limits(), auto_gc: bool = True,
                 read_only: bool = False):
        """read_only: only read, even where this process may write (a Ray worker: the catalog keeps
        one writer, the driver); derived data is then computed again rather than cached."""
        if path is None:  # base.home(), without importing torch (keeps `library list` fast)
            path = Path(os.environ.get("MODULORA_HOME") or Path.home() / ".modulora") / "library"
        self.root = Path(path).expanduser()
        self.limits = limits
        self.catalog = self.root / "catalog.sqlite"
        self._lock_path = self.root / "lock"
        if not self.root.exists():
            if read_only:
                raise LibraryError(f"there is no library at {self.root}")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LibraryError(f"cannot create the library at {self.root}: {e}") from e
        self._read_only = _why_read_only(self.root, [self.root, self.root / "objects", self.root / "tmp",
                                                     self.catalog, self._lock_path])
        if self._read_only is None and read_only:
            self._read_only = OSError(errno.EPERM, "opened read-only", str(self.root))
        self._store = _FileStore(self.root, create=not self.read_only)
        if self.read_only:
            self._open_read_only()
            return
        self._lock_path.touch(exist_ok=True)
        try:
            with self._db() as db:
                version = self._schema_version(db)
            if version is None:  # new library: create it (once, whoever is first)
                with self._storage_errors(), self._db(write=True) as db:
                    if self._schema_version(db) is None:
                        db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before any table: removals can shrink the file
                        db.execute("PRAGMA journal_mode=WAL")
                        with self._write(db):
                            for stmt in filter(str.strip, _SCHEMA.split(";")):
                                db.execute(stmt)
                            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                       (str(SCHEMA_VERSION),))
                    version = self._schema_version(db)
        except sqlite3.DatabaseError as e:
            raise LibraryError(f"cannot open the library catalog {self.catalog}: {e}") from e
        self._check_version(version)
        if auto_gc:
            try:
                self.gc(wait=False)
            except OSError:  # a full disk (see _storage_errors): a later gc frees what this one left
                if self._disk_problem() is None:
                    raise

    @property
    def read_only(self) -> bool:
        """True when this process cannot write the library: reads work, writes raise LibraryError."""
        return self._read_only is not None

    def _open_read_only(self) -> None:
        """Open without writing anything: no folders, lock file, schema, migration or gc."""
        if not self.catalog.is_file():
            raise LibraryError(f"there is no library at {self.root} (no {self.catalog.name}), and none can be "
                               f"created there: {self._read_only.strerror} ({self._read_only.filename})") from self._read_only
        try:
            with self._db() as db:
                version = self._schema_version(db)
        except sqlite3.DatabaseError as e:
            raise LibraryError(f"cannot open the library catalog {self.catalog} (read-only): {e}") from e
        if version is None:
            raise LibraryError(f"{self.catalog} holds no library catalog, and the library at {self.root} is "
                               f"read-only ({self._read_only.strerror}), so none can be created") from self._read_only
        self._check_version(version)
        if version < SCHEMA_VERSION:
            raise LibraryError(f"{self.catalog} has schema version {version} and must be upgraded to "
                               f"{SCHEMA_VERSION}, but the library at {self.root} is read-only "
                               f"({self._read_only.strerror}): open it once with write access") from self._read_only

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise LibraryError(f"{self.catalog} has schema version {version}; this modulora knows up to "
                               f"{SCHEMA_VERSION}: upgrade modulora")

    def _check_writable(self, op: str) -> None:
        """LibraryError naming the folder when the library was opened read-only; chained to the
        OSError (EROFS or EACCES) that says why, so storage_problem (cli) classifies a read-only
        file system."""
        why = self._read_only
        if why is not None:
            reason = ("a read-only file system" if why.errno == errno.EROFS
                      else f"no write permission on {why.filename}" if why.errno == errno.EACCES else why.strerror)
            raise LibraryError(f"cannot {op}: the library at {self.root} is read-only ({reason})") from why

    def _disk_problem(self) -> OSError | None:
        """OSError(ENOSPC or EROFS) naming the library folder when its file system is full or
        read-only right now, else None."""
        try:
            st = os.statvfs(self.root)
        except (OSError, AttributeError):  # pragma: no cover - no statvfs
            return None
        if st.f_flag & os.ST_RDONLY:
            code = errno.EROFS
        elif st.f_bavail * st.f_frsize < FULL_BELOW_BYTES:
            code = errno.ENOSPC
        else:
            return None
        return OSError(code, os.strerror(code), str(self.root))

    @contextlib.contextmanager
    def _storage_errors(self):
        """Around a write: an SQLite error (or an errno-less OSError) while the disk is full or
        read-only is re-raised as that OSError(ENOSPC / EROFS) naming the folder, the one error
        the CLI and the server report as a storage problem (SQLite may call it "disk I/O error")."""
        try:
            yield
        except (sqlite3.Error, OSError) as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            problem = self._disk_problem()
            if problem is None:
                raise
            raise problem from e

    # -- plumbing ------------------------------------------------------------------------------

    @staticmethod
    def _schema_version(db) -> int | None:
        try:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):  # a new catalog
                return None
            raise
        return None if row is None else int(row[0])

    @contextlib.contextmanager
    def _db(self, write: bool = False):
        """A new connection to the catalog, closed after use (one per call: safe across threads
        and processes). For reads it may be read-only, see _connect_for_reading."""
        db = self._connect() if write else self._connect_for_reading()
        try:
            yield db
        finally:
            db.close()

    def _connect(self, query: str = "") -> sqlite3.Connection:
        if query:
            target, uri = "file:" + quote(str(self.catalog.absolute())) + query, True
        else:
            target, uri = str(self.catalog), False
        db = sqlite3.connect(target, timeout=BUSY_TIMEOUT_S, isolation_level=None, uri=uri)
        try:
            db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            db.close()
            raise
        return db

    def _connect_for_reading(self) -> sqlite3.Connection:
        """A connection that can read the catalog without writing anything.

        Reading a WAL catalog maps its -shm index, which SQLite creates (and grows, writing) when
        no other connection holds it open: impossible on a full disk or in a read-only folder. So
        when that fails, read through a read-only connection, then an `immutable` one: it needs no
        -shm and is exact when the -wal is empty (the main file then holds every commit), which is
        the case unless another connection is open, and then the -shm exists and `mode=ro` works.
        A writer starting in between is the one risk (a read fails or sees the earlier state)."""
        attempts = ["?mode=ro"] if self.read_only else ["", "?mode=ro"]
        first = None
        for i, query in enumerate(attempts + ["?mode=ro&immutable=1"]):
            if i == len(attempts) and not _wal_is_empty(self.catalog):
                break
            try:
                db = self._connect(query)
            except sqlite3.OperationalError as e:
                first = first or e
                continue
            try:
                db.execute("PRAGMA schema_version").fetchone()  # opens the WAL index (-shm) now
                return db
            except sqlite3.OperationalError as e:
                db.close()
                if "locked" in str(e):  # busy past the timeout: not a storage problem
                    raise
                first = first or e
        raise first

    @staticmethod
    @contextlib.contextmanager
    def _write(db: sqlite3.Connection):
        """One write transaction, taken at once (BEGIN IMMEDIATE), rolled back on any error."""
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextlib.contextmanager
    def _lock(self, exclusive: bool, wait: bool = True):
        """flock on the lock file: yields True if held, False if not waiting and busy."""
        if fcntl is None:  # pragma: no cover
            yield True
            return
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if exclusive or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            try:  # a read on a read-only library: flock needs no write access
                fd = os.open(self._lock_path, os.O_RDONLY)
            except FileNotFoundError:  # and none can be made: nothing to wait for here
                yield True
                return
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            deadline = time.monotonic() + BUSY_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        yield False
                        return
                    if time.monotonic() > deadline:
                        raise LibraryError(f"the library at {self.root} stayed busy for "
                                           f"{BUSY_TIMEOUT_S:.0f} s") from None
                    time.sleep(0.05)
            yield True
        finally:
            os.close(fd)  # releases the lock

    def _record(self, row) -> AdapterRecord:
        """A record from a row of _RECORD_COLUMNS (the first 7 of a _COLUMNS row are different:
        use _full_record for those)."""
        name, version, type_, object_id, created, base_id, num_params = row
        return AdapterRecord(name, version, type_, object_id, self._store.path(object_id), created,
                             base_id=base_id, num_params=num_params, load=self._load_field)

    def _full_record(self, row) -> AdapterRecord:
        """A record from a row of _COLUMNS: card and config still parsed only when accessed."""
        name, version, type_, object_id, created, card, config, base_id, num_params, _ = row
        rec = self._record((name, version, type_, object_id, created, base_id, num_params))
        rec._load = lambda r, key: self._parse_field(r, key, card if key == "card" else config)
        return rec

    def _load_field(self, rec: AdapterRecord, key: str):
        """The card or config of a listed record, read from the catalog when first accessed. Same
        object id, same files, same card and config: any version holding that content will do."""
        assert key in ("card", "config")
        with self._db() as db:
            row = db.execute(f"SELECT {key} FROM adapters WHERE object_id=? LIMIT 1", (rec.object_id,)).fetchone()
        if row is None:
            raise LibraryError(f"{rec.ref} was removed from the library since it was listed: its {key} is gone")
        return self._parse_field(rec, key, row[0])

    @staticmethod
    def _parse_field(rec: AdapterRecord, key: str, text):
        if text is None:
            if key == "card":
                return None
            raise LibraryError(f"the catalog holds no config for {rec.ref}")
        try:
            return json.loads(text)
        except ValueError as e:
            raise LibraryError(f"the catalog's {key} of {rec.ref} is not valid JSON ({e}): the catalog is "
                               f"damaged; remove and re-add {rec.ref}") from None

    def _row(self, db, name: str, version: int | None):
        if version is None:
            row = db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name=? ORDER BY version DESC LIMIT 1",
                             (name,)).fetchone()
        else:
            row = db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name=? AND version=?",
                             (name, version)).fetchone()
        if row is not None:
            return row
        have = [r[0] for r in db.execute("SELECT version FROM adapters WHERE name=? ORDER BY version", (name,))]
        if have:
            raise LibraryError(f"adapter {name} has no version {version} (have: {', '.join(map(str, have))})")
        names = [r[0] for r in db.execute("SELECT DISTINCT name FROM adapters ORDER BY name LIMIT 21")]
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise LibraryError(f"no adapter named {name} (have: {shown or 'none, the library is empty'})")

    # -- API -------------------------------------------------------------------------------------

    def add(self, name: str, adapter_dir, fingerprint: dict | None = None) -> AdapterRecord:
        """Check and store an adapter directory as the next version of `name`."""
        self._check_writable(f"add {name}")
        validate_name(name)
        checked = validate_adapter_dir(adapter_dir, fingerprint, self.limits)
        object_id = object_id_for(checked.sha256)
        base_id = (fingerprint or {}).get("id") or ((checked.card or {}).get("base_fingerprint") or {}).get("id")
        files = {n: {"size": checked.sizes[n], "sha256": checked.sha256[n]} for n in sorted(checked.files)}
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._storage_errors(), self._lock(exclusive=False):  # gc waits for the commit
            self._store.put(object_id, checked.files, checked.sha256)
            with self._db(write=True) as db, self._write(db):
                row = db.execute("SELECT last_version FROM counters WHERE name=?", (name,)).fetchone()
                version = (row[0] if row else 0) + 1
                db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                           "last_version=excluded.last_version", (name, version))
                db.execute(f"INSERT INTO adapters ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                           (name, version, checked.type, object_id, created,
                            None if checked.card is None else json.dumps(checked.card),
                            json.dumps(checked.config), base_id, checked.num_params, json.dumps(files)))
                _before_commit(name, version)
        return AdapterRecord(name, version, checked.type, object_id, self._store.path(object_id), created,
                             card=checked.card, config=checked.config, base_id=base_id,
                             num_params=checked.num_params, load=self._load_field)

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        """A version of an adapter (the latest by default)."""
        with self._db() as db:
            return self._full_record(self._row(db, name, version))

    def list(self) -> list[AdapterRecord]:
        """The latest version of each name, sorted by name. One query of small columns: cards and
        configs are parsed only for the records whose `card` / `config` is read."""
        with self._db() as db:
            rows = db.execute(f"SELECT {_RECORD_COLUMNS} FROM adapters a WHERE version = "
                              "(SELECT MAX(version) FROM adapters b WHERE b.name = a.name) ORDER BY name")
            return [self._record(r) for r in rows]

    def latest_object_ids(self) -> dict[str, str]:
        """name -> object id of its latest version, sorted by name; cheap (no cards parsed), for
        callers that poll for changes (routers keep indexes keyed by object id)."""
        with self._db() as db:  # SQLite takes the bare column from the row holding the MAX
            rows = db.execute("SELECT name, object_id, MAX(version) FROM adapters GROUP BY name ORDER BY name")
            return {name: oid for name, oid, _ in rows}

    def versions(self, name: str) -> list[AdapterRecord]:
        with self._db() as db:
            rows = db.execute(f"SELECT {_RECORD_COLUMNS} FROM adapters WHERE name=? ORDER BY version",
                              (name,)).fetchall()
            if not rows:
                self._row(db, name, None)  # raises with the list of names
            return [self._record(r) for r in rows]

    def show(self, name: str, version: int | None = None) -> dict:
        """Everything about one version, JSON-serialisable."""
        with self._db() as db:
            row = self._row(db, name, version)
            versions = [r[0] for r in db.execute("SELECT version FROM adapters WHERE name=? ORDER BY version",
                                                 (name,))]
            derived = [r[0] for r in db.execute("SELECT kind FROM derived WHERE object_id=? ORDER BY kind",
                                                (row[3],))]
        rec = self._full_record(row)
        out = rec.to_dict()
        out["path"] = str(rec.path)
        out["ref"] = rec.ref
        out["files"] = json.loads(row[9])
        out["total_bytes"] = sum(f["size"] for f in out["files"].values())
        out["versions"] = versions
        out["derived"] = derived
        out["present"] = self._store.has(rec.object_id)
        return out

    def remove(self, name: str, version: int | None = None) -> int:
        """Remove all versions of `name` (or one); returns how many. Frees unreferenced objects."""
        self._check_writable(f"remove {name}")
        with self._storage_errors(), self._db(write=True) as db:
            with self._write(db):
                if version is not None:
                    rows = [self._row(db, name, version)]
                else:
                    rows = db.execute("SELECT name, version, type, object_id FROM adapters WHERE name=?",
                                      (name,)).fetchall()
                    if not rows:
                        self._row(db, name, None)  # raises
                ids = {r[3] for r in rows}
                for r in rows:
                    db.execute("DELETE FROM adapters WHERE name=? AND version=?", (r[0], r[1]))
                for oid in ids:
                    if db.execute("SELECT 1 FROM adapters WHERE object_id=? LIMIT 1", (oid,)).fetchone() is None:
                        db.execute("DELETE FROM derived WHERE object_id=?", (oid,))
            self._reclaim(db)
        with self._storage_errors():
            self._collect(ids, wait=False)  # busy (an add in flight): a later gc frees them
        return len(rows)

    def export(self, name: str, out_dir, version: int | None = None) -> Path:
        """Copy an adapter's files into out_dir (which must not exist or be empty); returns it."""
        rec = self.get(name, version)
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise LibraryError(f"export target {out} exists and is not an empty directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            with self._lock(exclusive=False):  # remove/gc must not free the object mid-copy
                if not self._store.has(rec.object_id):
                    raise LibraryError(f"the files of {rec.ref} are missing from {rec.path}")
                for fname, src in self._store.files(rec.object_id).items():
                    shutil.copyfile(src, tmp / fname)  # plain copy: the export is writable
            os.replace(tmp, out)  # onto a missing or empty directory
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def put_derived(self, object_id: str, kind: str, value: bytes) -> None:
        """Cache derived data (safetensors bytes, never pickle) for a stored object, or for the
        whole library under an object id starting with LIBRARY_SCOPE (e.g. a trained router)."""
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError("derived values are bytes (e.g. safetensors.torch.save output)")
        self._check_writable("cache derived data")
        with self._storage_errors(), self._db(write=True) as db, self._write(db):
            known = object_id.startswith(LIBRARY_SCOPE) or db.execute(
                "SELECT 1 FROM adapters WHERE object_id=? LIMIT 1", (object_id,)).fetchone() is not None
            if not known:
                raise LibraryError(f"no adapter in the library has object id {object_id}")
            db.execute("INSERT OR REPLACE INTO derived VALUES (?, ?, ?)", (object_id, kind, bytes(value)))

    def get_derived(self, object_id: str, kind: str) -> bytes | None:
        with self._db() as db:
            row = db.execute("SELECT value FROM derived WHERE object_id=? AND kind=?", (object_id, kind)).fetchone()
        return None if row is None else bytes(row[0])

    def gc(self, wait: bool = True) -> int:
        """Delete objects and temp dirs the catalog does not reference (crash leftovers); returns
        how many. Takes the exclusive lock, so no add is in flight meanwhile; with wait=False it
        does nothing (returns 0) while one is."""
        self._check_writable("collect garbage")
        with self._storage_errors():
            return self._collect(None, wait=wait)

    def _collect(self, candidates: set[str] | None, wait: bool) -> int:
        with self._lock(exclusive=True, wait=wait) as held:
            if not held:
                return 0
            now = time.time()

            def stale(p: Path) -> bool:
                if fcntl is not None:
                    return True  # exclusive lock held: no add is writing
                try:  # pragma: no cover
                    return now - p.stat().st_mtime > STALE_AFTER_S
                except FileNotFoundError:  # pragma: no cover
                    return False

            orphan = (f"FROM derived WHERE object_id NOT IN (SELECT object_id FROM adapters) "
                      f"AND object_id NOT LIKE '{LIBRARY_SCOPE}%'")
            with self._db() as db:  # a read: on a full disk gc can still free objects
                referenced = {r[0] for r in db.execute("SELECT DISTINCT object_id FROM adapters")}
                orphans = candidates is None and db.execute(f"SELECT 1 {orphan} LIMIT 1").fetchone()
            if orphans:
                with self._db(write=True) as db, self._write(db):
                    db.execute(f"DELETE {orphan}")
            count = 0
            for oid in (self._store.ids() if candidates is None else candidates):
                if oid not in referenced and self._store.has(oid) and stale(self._store.path(oid)):
                    self._store.delete(oid)
                    count += 1
            if candidates is None:
                for tmp in self._store.temp_dirs():
                    if stale(tmp):
                        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
                        count += 1
            return count

    @staticmethod
    def _reclaim(db: sqlite3.Connection) -> bool:
        """Give the catalog's free pages back to the file system after a removal; True if it did.
        Catalogs with auto_vacuum=INCREMENTAL (all made since) always do, cheaply; older ones are
        rewritten (VACUUM) once enough is free. Best effort: a busy catalog waits for the next."""
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        total = db.execute("PRAGMA page_count").fetchone()[0]
        incremental = db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        if free == 0 or not (incremental or free * 2 >= total
                             or (free * page_size >= RECLAIM_MIN_BYTES and free * 4 >= total)):
            return False
        try:
            # executescript steps the pragma to the end (execute() would free a single page)
            db.executescript("PRAGMA incremental_vacuum;" if incremental else "VACUUM;")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # shrink the file now, not later
        except sqlite3.OperationalError:  # pragma: no cover - busy
            return False
        return True

    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check` ("ok" when sound)."""
        with self._db() as db:
            return db.execute("PRAGMA integrity_check").fetchone()[0]


__all__ = ["AdapterRecord", "LIBRARY_SCOPE", "Library", "LibraryError", "ValidationError", "object_id_for"]
