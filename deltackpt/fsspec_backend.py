"""A :class:`~deltackpt.backend.Backend` over fsspec: S3 (s3fs), GCS, Azure, fsspec memory.

Objects live under ``<root>/<name>`` with exactly the names and bytes of a local store
(docs/format.md §4, §6). Two implementations share one class:

- **S3** (an ``s3fs.S3FileSystem``): every call goes straight to the S3 API through
  s3fs's client, so no fsspec listing cache can serve a stale answer. ``create()`` buffers
  up to one part; a bigger object becomes a multipart upload whose parts are sent in
  parallel (``max_concurrency`` in flight) while the caller keeps writing. ``commit()`` is
  ``CompleteMultipartUpload`` (or one ``PutObject``) with ``If-None-Match: *``: the object
  appears atomically, never replaces one, and an unfinished upload is invisible (no
  ``.partial`` object exists at all; ``gc`` aborts stale uploads). Reads are ranged GETs.
- **Any other fsspec filesystem**: ``create()`` streams into ``<name>.partial`` and
  ``commit()`` moves it into place after checking the name is free (check-then-move is
  not atomic; fine under the writer lease).

Retries: s3fs retries connection errors, timeouts and throttling (``retries``, default 5,
exponential back-off) and botocore retries 5xx replies; a request that still fails raises
:class:`~deltackpt.errors.StorageError`-compatible ``OSError`` and the save aborts cleanly
(docs/object-storage.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .backend import PARTIAL_SUFFIX, check_name
from .errors import CorruptionError, InvalidStoreError

#: default size of one multipart part (S3 needs >= 5 MiB for all parts but the last)
DEFAULT_PART_SIZE = 16 * 1024 * 1024
DEFAULT_CONCURRENCY = 8
DEFAULT_READAHEAD = 32 * 1024 * 1024
#: bytes past part_size a writer buffers before it starts a multipart upload
_SLACK = 4 * 1024 * 1024


class ConditionFailedError(OSError):
    """A conditional write or delete lost: the object changed since it was read."""


def _client_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated (or the exception itself)."""
    for e in (exc, exc.__cause__, exc.__context__):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            code = resp.get("Error", {}).get("Code")
            if code is not None:
                return str(code)
    return None


def _is_missing(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or _client_code(exc) in ("NoSuchKey", "404",
                                                                       "NotFound")


def _is_range_error(exc: BaseException) -> bool:
    return _client_code(exc) in ("InvalidRange", "416") or (
        isinstance(exc, OSError) and exc.errno == errno.EINVAL)


def _is_precondition(exc: BaseException) -> bool:
    return _client_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict")


class FsspecBackend:
    """Objects under ``root`` (``"bucket/prefix"`` for S3) of an fsspec filesystem.

    ``url`` is only used in messages and to key the local index cache. ``part_size`` and
    ``max_concurrency`` bound the memory a writer holds: at most ``max_concurrency + 1``
    parts. ``readahead`` (0: off) and ``prefetch`` size the read windows over packs
    (:meth:`read`); at most ``prefetch + 4`` windows are held.
    """

    def __init__(self, fs: Any, root: str, *, url: str | None = None,
                 part_size: int = DEFAULT_PART_SIZE,
                 max_concurrency: int = DEFAULT_CONCURRENCY,
                 readahead: int = DEFAULT_READAHEAD, prefetch: int = 2) -> None:
        if part_size < 5 * 1024 * 1024:
            raise ValueError("part_size must be at least 5 MiB (the S3 minimum)")
        self.fs = fs
        self.root = root.strip("/")
        self.url = url or f"{_protocol(fs)}://{self.root}"
        self.durable = True
        self.part_size = int(part_size)
        self.max_concurrency = max(1, int(max_concurrency))
        self.is_s3 = hasattr(fs, "_call_s3")
        if self.is_s3:
            self.bucket, _, prefix = self.root.partition("/")
            if not self.bucket:
                raise InvalidStoreError(f"{self.url}: no bucket in the URL")
            self._prefix = prefix + "/" if prefix else ""
        #: called before a manifest is written or deleted (the writer lease's check)
        self.before_commit: Callable[[], None] | None = None
        #: requests sent, by S3 operation (benchmarks and tests read it)
        self.requests: dict[str, int] = {}
        #: ETag of each manifest this backend wrote (S3), until the store records it
        self.put_etags: dict[str, str] = {}
        self._count_lock = threading.Lock()
        self.readahead = int(readahead)
        self.prefetch = int(prefetch)
        self._wlock = threading.Lock()
        self._windows: OrderedDict[tuple[str, int], concurrent.futures.Future] = OrderedDict()
        self._ends: dict[str, int] = {}
        self._last_end: dict[str, int] = {}
        self._pending: dict[str, concurrent.futures.Future] = {}
        #: keys per ListObjectsV2 page (S3's maximum; tests lower it)
        self.list_page = 1000

    def __repr__(self) -> str:
        return f"<FsspecBackend {self.url}>"

    # -- plumbing --------------------------------------------------------------
    def _key(self, name: str) -> str:
        return self._prefix + check_name(name)

    def _path(self, name: str) -> str:
        return f"{self.root}/{check_name(name)}" if self.root else check_name(name)

    def _count(self, op: str) -> None:
        with self._count_lock:
            self.requests[op] = self.requests.get(op, 0) + 1

    def call(self, op: str, **kw: Any) -> Any:
        """One S3 API call from a synchronous thread (s3fs retries it as documented)."""
        self._count(op)
        return self.result(asyncio.run_coroutine_threadsafe(self.fs._call_s3(op, **kw),
                                                            self.fs.loop), op)

    def result(self, fut: concurrent.futures.Future, op: str) -> Any:
        """``fut.result()``, with transport errors that outlived the retries (aiohttp,
        botocore) raised as ``OSError`` so that the store reports a StorageError."""
        try:
            return fut.result()
        except OSError:
            raise
        except Exception as exc:
            raise OSError(errno.EIO, f"{self.url}: {op} failed: {exc!r}") from exc

    def call_async(self, op: str, **kw: Any) -> concurrent.futures.Future:
        """Start one S3 API call; the caller's thread goes on while it runs."""
        self._count(op)
        return asyncio.run_coroutine_threadsafe(self.fs._call_s3(op, **kw), self.fs.loop)

    def _get(self, key: str, rng: str | None) -> bytes:
        async def go() -> bytes:
            kw = {"Range": rng} if rng else {}
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key, **kw)
            try:
                return await resp["Body"].read()
            finally:
                resp["Body"].close()

        self._count("get_object")
        return self.result(asyncio.run_coroutine_threadsafe(_retry_reads(self.fs, go),
                                                            self.fs.loop), "get_object")

    def _guard(self, name: str, deleting: bool = False) -> None:
        # a manifest write commits a step; any delete may remove what another writer needs
        if self.before_commit is not None and (deleting or name.startswith("manifests/")):
            self.before_commit()

    # -- Backend ---------------------------------------------------------------
    def create(self, name: str) -> _S3Writer | _FsspecWriter:
        check_name(name)
        return _S3Writer(self, name) if self.is_s3 else _FsspecWriter(self, name)

    def put(self, name: str, data: bytes) -> None:
        self._guard(name)
        self._forget(name)
        if self.is_s3:
            resp = self.call("put_object", Bucket=self.bucket, Key=self._key(name),
                             Body=bytes(data))
            etag = _etag(resp) if isinstance(resp, dict) else None
        else:
            self.fs.pipe_file(self._path(name), bytes(data))
            etag = None
            if name.startswith("manifests/"):
                # filesystems whose listings carry ETags (gcsfs, adlfs): ask for it; without
                # one the cache records none and its next refresh rebuilds (slow, not wrong)
                try:
                    etag = _etag(self.fs.info(self._path(name)))
                except Exception:  # noqa: BLE001 - the manifest is written; only the record
                    etag = None
        if etag is not None and name.startswith("manifests/"):
            with self._count_lock:
                self.put_etags[name] = etag

    def read(self, name: str, offset: int = 0, length: int | None = None, *,
             window: bool | None = None) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (the Backend contract).

        Reads of packs (immutable) that look sequential are served from ``readahead``-byte
        aligned windows, each one ranged GET, with the next ``prefetch`` windows requested
        in the background: a load sorted by pack offset turns into a few large parallel
        GETs instead of one per block. ``window=False`` forces an exact ranged GET.
        """
        if offset < 0 or (length is not None and length < 0):
            check_name(name)
            raise CorruptionError(f"{self.url}/{name}: bad byte range {offset}+{length}")
        if length is None or length == 0:
            size = self.size(name)
            if length is None:
                length = size - offset
            if offset + length > size or length < 0:
                raise CorruptionError(f"{self.url}/{name}: short read at offset {offset} "
                                      f"({max(0, size - offset)} of {length} bytes)")
            if length == 0:
                return b""
        try:
            if self._pending:
                self._settle(name)
            if self.is_s3 and self._windowed(name, offset, length, window):
                data = self._read_windows(name, offset, length)
            elif self.is_s3:
                data = self._get(self._key(name), f"bytes={offset}-{offset + length - 1}")
            else:
                data = self.fs.cat_file(self._path(name), start=offset, end=offset + length)
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(errno.ENOENT, "no such object",
                                        f"{self.url}/{name}") from None
            if _is_range_error(exc):
                raise CorruptionError(f"{self.url}/{name}: short read at offset {offset} "
                                      f"(the object ends before it)") from None
            raise
        if len(data) != length:
            raise CorruptionError(f"{self.url}/{name}: short read at offset {offset} "
                                  f"({len(data)} of {length} bytes; the object is truncated)")
        return data

    # -- readahead windows over packs ---------------------------------------------------
    def _windowed(self, name: str, offset: int, length: int, window: bool | None) -> bool:
        if window is False or not self.readahead or length >= self.readahead or \
                not name.startswith("packs/"):
            return False
        with self._wlock:
            last = self._last_end.get(name)
            if len(self._last_end) > 4096:
                self._last_end.clear()
            self._last_end[name] = offset + length
            if window:
                return True
            if (name, offset // self.readahead) in self._windows:
                return True
        if last is None:
            return offset <= 8  # a read from the first frame on: a whole-pack load
        return abs(offset - last) <= self.readahead // 4

    def _window(self, name: str, i: int) -> concurrent.futures.Future:
        key = (name, i)
        with self._wlock:
            fut = self._windows.get(key)
            if fut is not None:
                self._windows.move_to_end(key)
                return fut
            end = self._ends.get(name)
            if end is not None and i * self.readahead >= end:
                fut = concurrent.futures.Future()
                fut.set_result(b"")
                return fut
            w = self.readahead
            fut = asyncio.run_coroutine_threadsafe(
                self._fetch_window(name, f"bytes={i * w}-{(i + 1) * w - 1}", i), self.fs.loop)
            self._count("get_object")
            self._windows[key] = fut
            while len(self._windows) > self.prefetch + 4:
                self._windows.popitem(last=False)
            return fut

    async def _fetch_window(self, name: str, rng: str, i: int) -> bytes:
        key = self._key(name)

        async def go() -> bytes:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key, Range=rng)
            total = str(resp.get("ContentRange", "")).rpartition("/")[2]
            if total.isdigit():  # the object's size: no prefetch past its end
                with self._wlock:
                    self._ends[name] = int(total)
            return await _read_body(resp["Body"])

        try:
            data = await _retry_reads(self.fs, go)
        except Exception as exc:
            if _is_range_error(exc):
                data = b""  # prefetched past the end
            else:
                raise
        if len(data) < self.readahead:
            with self._wlock:
                self._ends[name] = i * self.readahead + len(data)
        return data

    def _read_windows(self, name: str, offset: int, length: int) -> bytes:
        w = self.readahead
        first, last = offset // w, (offset + length - 1) // w
        futs = [self._window(name, i) for i in range(first, last + 1)]
        end = self._ends.get(name)
        if end is not None:  # known once a first window came back
            for i in range(last + 1, min(last + 1 + self.prefetch, -(-end // w))):
                self._window(name, i)
        try:
            chunks = [self.result(f, "get_object") for f in futs]
        except BaseException:
            self._forget(name)
            raise
        start = offset - first * w
        if len(chunks) == 1:
            return chunks[0][start:start + length]
        return b"".join(chunks)[start:start + length]

    def _forget(self, name: str) -> None:
        """Drop cached windows of ``name`` (replaced, deleted or failed)."""
        with self._wlock:
            for key in [k for k in self._windows if k[0] == name]:
                del self._windows[key]
            self._ends.pop(name, None)
            self._last_end.pop(name, None)

    # -- background completion of packs --------------------------------------------------
    def _defer(self, name: str, fut: concurrent.futures.Future) -> None:
        with self._wlock:
            self._pending[name] = fut
            oldest = [f for f in self._pending.values() if not f.done()]
        if len(oldest) > self.max_concurrency:  # bound what is in flight
            concurrent.futures.wait(oldest[:len(oldest) - self.max_concurrency])

    def _settle(self, name: str | None = None) -> None:
        """Wait for background completions (of ``name``, or all); raise the first error."""
        with self._wlock:
            if name is None:
                todo, self._pending = self._pending, {}
            else:
                f = self._pending.pop(name, None)
                todo = {name: f} if f is not None else {}
        error: BaseException | None = None
        for f in todo.values():
            try:
                self.result(f, "commit")
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    def size(self, name: str) -> int:
        self._settle(name)
        try:
            if self.is_s3:
                return int(self.call("head_object", Bucket=self.bucket,
                                     Key=self._key(name))["ContentLength"])
            self.fs.invalidate_cache()
            return int(self.fs.info(self._path(name))["size"])
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(errno.ENOENT, "no such object",
                                        f"{self.url}/{name}") from None
            raise

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except FileNotFoundError:
            return False
        return True

    def list_info(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        """``{name: {"size": int, "etag": str | None}}`` of every object under ``prefix``."""
        if self._pending:
            self._settle()
        out: dict[str, dict[str, Any]] = {}
        if self.is_s3:
            first = self._list_pages(prefix, max_pages=1 if prefix == "packs/" else None)
            if first is None:
                # many packs: list the 256 subdirectories packs/00/ … packs/ff/ in parallel
                # (the format spreads packs over them) instead of 1,000 keys per round trip
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    for part in pool.map(self._list_pages, [f"packs/{i:02x}/"
                                                           for i in range(256)]):
                        out.update(part or {})
            else:
                out.update(first)
            return dict(sorted(out.items()))
        self.fs.invalidate_cache()
        base = self.root
        try:
            found = self.fs.find(base, detail=True) if self.fs.exists(base) or not base else {}
        except FileNotFoundError:
            found = {}
        for path, info in found.items():
            name = _relative(path, base)
            if name and name.startswith(prefix):
                out[name] = {"size": int(info.get("size") or 0),
                             "etag": _etag(info)}
        return dict(sorted(out.items()))

    def _list_pages(self, prefix: str,
                    max_pages: int | None = None) -> dict[str, dict[str, Any]] | None:
        """ListObjectsV2 pages under ``prefix``; None when ``max_pages`` did not reach the
        end."""
        out: dict[str, dict[str, Any]] = {}
        token, pages = None, 0
        while True:
            kw = {"ContinuationToken": token} if token else {}
            resp = self.call("list_objects_v2", Bucket=self.bucket, MaxKeys=self.list_page,
                             Prefix=self._prefix + prefix, **kw)
            for obj in resp.get("Contents", []):
                out[obj["Key"][len(self._prefix):]] = {"size": int(obj["Size"]),
                                                       "etag": _etag(obj)}
            pages += 1
            if not resp.get("IsTruncated"):
                return out
            if max_pages is not None and pages >= max_pages:
                return None
            token = resp["NextContinuationToken"]

    def list(self, prefix: str = "") -> list[str]:
        return list(self.list_info(prefix))

    def delete(self, name: str) -> None:
        self._guard(name, deleting=True)
        self._forget(name)
        try:
            self._settle(name)
        except OSError:
            pass  # it never appeared; deleting it is what the caller wants anyway
        if self.is_s3:
            self.call("delete_object", Bucket=self.bucket, Key=self._key(name))
            return
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass

    def sync(self) -> None:
        """Wait until every committed pack is complete in the store (raising the first
        failure); a completed object is durable when its request returns."""
        self._settle()

    def close(self) -> None:
        try:
            self._settle()
        except OSError:
            pass  # a save that failed already reported it; unreferenced packs go at gc

    # -- conditional requests (the writer lease, store creation) ----------------
    def put_if_absent(self, name: str, data: bytes) -> str | None:
        """Create ``name`` only if no object has that name; ``FileExistsError`` otherwise.

        Atomic on S3 (``If-None-Match: *``); check-then-write elsewhere. Returns the ETag.
        """
        if not self.is_s3:
            if self.exists(name):
                raise FileExistsError(errno.EEXIST, "object exists", f"{self.url}/{name}")
            self.fs.pipe_file(self._path(name), bytes(data))
            return None
        try:
            resp = self.call("put_object", Bucket=self.bucket, Key=self._key(name),
                             Body=bytes(data), IfNoneMatch="*")
        except Exception as exc:
            if isinstance(exc, FileExistsError) or _is_precondition(exc):
                raise FileExistsError(errno.EEXIST, "object exists",
                                      f"{self.url}/{name}") from None
            raise
        return resp.get("ETag")

    def read_tagged(self, name: str) -> tuple[bytes, str | None]:
        """The whole object and its ETag (None off S3)."""
        if not self.is_s3:
            return self.read(name), None
        try:
            resp = self.call("get_object", Bucket=self.bucket, Key=self._key(name))
            body = self.result(asyncio.run_coroutine_threadsafe(_read_body(resp["Body"]),
                                                                self.fs.loop), "get_object")
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(errno.ENOENT, "no such object",
                                        f"{self.url}/{name}") from None
            raise
        return body, resp.get("ETag")

    def put_if_match(self, name: str, data: bytes, etag: str | None) -> str | None:
        """Replace ``name`` only if its ETag is still ``etag``; :class:`ConditionFailedError`
        when another writer changed (or removed) it in between."""
        if not self.is_s3:
            self.fs.pipe_file(self._path(name), bytes(data))
            return None
        try:
            resp = self.call("put_object", Bucket=self.bucket, Key=self._key(name),
                             Body=bytes(data), IfMatch=etag)
        except Exception as exc:
            if _is_precondition(exc) or _is_missing(exc) or isinstance(exc, FileExistsError):
                raise ConditionFailedError(errno.EBUSY, f"{self.url}/{name} changed") from None
            raise
        return resp.get("ETag")

    def delete_if_match(self, name: str, etag: str | None) -> None:
        """Delete ``name`` if its ETag is still ``etag`` (no-op when already gone)."""
        if not self.is_s3 or etag is None:
            # the lease itself: not guarded by the lease (release runs once it is let go)
            try:
                if self.is_s3:
                    self.call("delete_object", Bucket=self.bucket, Key=self._key(name))
                else:
                    self.fs.rm_file(self._path(name))
            except FileNotFoundError:
                pass
            return
        try:
            self.call("delete_object", Bucket=self.bucket, Key=self._key(name), IfMatch=etag)
        except Exception as exc:
            if _is_missing(exc):
                return
            if _is_precondition(exc):
                raise ConditionFailedError(errno.EBUSY, f"{self.url}/{name} changed") from None
            raise

    def abort_uploads(self, prefix: str, started_before: float) -> int:
        """Abort unfinished multipart uploads under ``prefix`` begun before the given Unix
        time (a crashed writer's; they are invisible but billed). Returns how many."""
        if not self.is_s3:
            return 0
        n = 0
        kw: dict[str, Any] = {}
        while True:
            resp = self.call("list_multipart_uploads", Bucket=self.bucket,
                             Prefix=self._prefix + prefix, **kw)
            for up in resp.get("Uploads", []):
                if up["Initiated"].timestamp() < started_before:
                    try:
                        self.call("abort_multipart_upload", Bucket=self.bucket, Key=up["Key"],
                                  UploadId=up["UploadId"])
                        n += 1
                    except Exception as exc:
                        if not _is_missing(exc) and _client_code(exc) != "NoSuchUpload":
                            raise
            if not resp.get("IsTruncated"):
                return n
            kw = {"KeyMarker": resp.get("NextKeyMarker"),
                  "UploadIdMarker": resp.get("NextUploadIdMarker")}


async def _read_body(body: Any) -> bytes:
    try:
        return await body.read()
    finally:
        body.close()


async def _retry_reads(fs: Any, go: Callable) -> bytes:
    """s3fs's retry wrapper around a GET and its body read (a body cut mid-way is retried)."""
    from s3fs.core import _error_wrapper

    return await _error_wrapper(go, retries=fs.retries)


def _protocol(fs: Any) -> str:
    p = fs.protocol
    return p[0] if isinstance(p, (tuple, list)) else str(p)


def _etag(info: dict) -> str | None:
    """An object's ETag as listings and PUT replies give it, normalized (quotes and a weak
    ``W/`` prefix dropped: S3-compatible servers differ in how they print it)."""
    raw = info.get("ETag") or info.get("etag")
    if not isinstance(raw, str) or not raw:
        return None
    raw = raw[2:] if raw.startswith("W/") else raw
    return raw.strip('"') or None


def _relative(path: str, base: str) -> str:
    path = path.lstrip("/")
    base = base.strip("/")
    if not base:
        return path
    return path[len(base) + 1:] if path.startswith(base + "/") else ""


class _S3Writer:
    """One new S3 object: a single PUT when small, else a parallel multipart upload."""

    def __init__(self, backend: FsspecBackend, name: str) -> None:
        self._b = backend
        self.name = name
        self._key = backend._key(name)
        self._buf = bytearray()
        self._pos = 0
        self._upload_id: str | None = None
        self._parts: list[tuple[int, concurrent.futures.Future]] = []
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        if self._done:
            raise ValueError("writer already finished")
        mv = memoryview(data).cast("B")
        self._buf += mv
        self._pos += len(mv)
        # an object up to part_size + slack stays one PUT; beyond, parts of part_size
        while len(self._buf) >= self._b.part_size + _SLACK:
            self._send_part(self._b.part_size)

    def tell(self) -> int:
        return self._pos

    def _send_part(self, n: int) -> None:
        """Send the first ``n`` buffered bytes as the next part."""
        if self._upload_id is None:
            resp = self._b.call("create_multipart_upload", Bucket=self._b.bucket, Key=self._key)
            self._upload_id = resp["UploadId"]
        # bound memory: wait for the oldest part before queueing one more
        while sum(not f.done() for _, f in self._parts) >= self._b.max_concurrency:
            concurrent.futures.wait([f for _, f in self._parts if not f.done()],
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        for _, f in self._parts:
            if f.done() and f.exception() is not None:
                self._b.result(f, "upload_part")
        number = len(self._parts) + 1
        body = memoryview(self._buf)[:n].tobytes()
        del self._buf[:n]
        fut = self._b.call_async("upload_part", Bucket=self._b.bucket, Key=self._key,
                                 UploadId=self._upload_id, PartNumber=number, Body=body)
        self._parts.append((number, fut))

    def commit(self) -> None:
        """Make the object appear (never over an existing one).

        A pack (``packs/…``: a random name no other writer uses) is completed in the
        background: commit returns at once and :meth:`FsspecBackend.sync` waits for it and
        raises its error; until then this backend's own ``read``/``size``/``exists``/
        ``list`` wait for it, so to its user the object is there. Anything else commits
        before returning.
        """
        if self._done:
            raise ValueError("writer already finished")
        try:
            self._b._guard(self.name)
            self._b._forget(self.name)
            if self._upload_id is not None and self._buf:
                self._send_part(len(self._buf))
            fut = asyncio.run_coroutine_threadsafe(self._finish(), self._b.fs.loop)
        except BaseException:
            self.abort()
            raise
        self._done = True
        if self.name.startswith("packs/"):
            self._b._defer(self.name, fut)
            return
        self._b.result(fut, "commit")

    async def _finish(self) -> None:
        b = self._b
        try:
            if self._upload_id is None:
                b._count("put_object")
                # the buffer itself (no copy): nothing writes to it after commit
                await b.fs._call_s3("put_object", Bucket=b.bucket, Key=self._key,
                                    Body=self._buf, IfNoneMatch="*")
                return
            parts = []
            for n, f in self._parts:
                parts.append({"PartNumber": n, "ETag": (await asyncio.wrap_future(f))["ETag"]})
            b._count("complete_multipart_upload")
            await b.fs._call_s3("complete_multipart_upload", Bucket=b.bucket, Key=self._key,
                                UploadId=self._upload_id, MultipartUpload={"Parts": parts},
                                IfNoneMatch="*")
        except BaseException as exc:
            if self._upload_id is not None:
                try:
                    b._count("abort_multipart_upload")
                    await b.fs._call_s3("abort_multipart_upload", Bucket=b.bucket,
                                        Key=self._key, UploadId=self._upload_id)
                except Exception:
                    pass  # gc aborts what is left (abort_uploads)
            if isinstance(exc, FileExistsError) or _is_precondition(exc):
                raise FileExistsError(errno.EEXIST, "object exists",
                                      f"{b.url}/{self.name}") from None
            raise
        finally:
            self._buf = bytearray()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buf = bytearray()
        for _, f in self._parts:
            f.cancel()
        concurrent.futures.wait([f for _, f in self._parts])
        if self._upload_id is not None:
            try:
                self._b.call("abort_multipart_upload", Bucket=self._b.bucket, Key=self._key,
                             UploadId=self._upload_id)
            except Exception:
                pass  # unreachable now: gc aborts uploads left behind (abort_uploads)


class _FsspecWriter:
    """One new object of a non-S3 filesystem, streamed to ``<name>.partial`` then moved."""

    def __init__(self, backend: FsspecBackend, name: str) -> None:
        self._b = backend
        self.name = name
        self._final = backend._path(name)
        self._tmp = self._final + PARTIAL_SUFFIX
        self._f = backend.fs.open(self._tmp, "wb")
        self._pos = 0
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        b = memoryview(data).cast("B")
        self._f.write(b)
        self._pos += len(b)

    def tell(self) -> int:
        return self._pos

    def commit(self) -> None:
        if self._done:
            raise ValueError("writer already finished")
        self._f.close()
        self._b._guard(self.name)
        if self._b.exists(self.name):
            self.abort()
            raise FileExistsError(errno.EEXIST, "object exists", f"{self._b.url}/{self.name}")
        self._done = True
        self._b.fs.mv(self._tmp, self._final)
        self._b.fs.invalidate_cache()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        finally:
            try:
                self._b.fs.rm_file(self._tmp)
            except FileNotFoundError:
                pass
            self._b.fs.invalidate_cache()
