"""Local paths and ``s3://`` URLs behind one small API (pyarrow filesystems).

S3 settings come from the usual AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``) unless :class:`StorageOptions` sets them. Credentials never appear in
reprs, logs or error messages: :class:`StorageOptions` redacts them in its ``repr``.
"""
from __future__ import annotations

import fnmatch
import gzip
import os
import uuid
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import urlparse

import pyarrow.fs as pafs

_SECRET_FIELDS = ("access_key", "secret_key", "session_token")


@dataclass
class StorageOptions:
    """Where S3 lives and who we are. Empty fields fall back to the AWS environment variables."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{k}={'***' if getattr(self, k) else None}" for k in _SECRET_FIELDS
        )
        return f"StorageOptions(endpoint_url={self.endpoint_url!r}, region={self.region!r}, {shown})"

    __str__ = __repr__

    def resolved(self) -> "StorageOptions":
        """A copy with every empty field filled from the environment."""
        env = os.environ.get
        return StorageOptions(
            endpoint_url=self.endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
            region=self.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
            access_key=self.access_key or env("AWS_ACCESS_KEY_ID"),
            secret_key=self.secret_key or env("AWS_SECRET_ACCESS_KEY"),
            session_token=self.session_token or env("AWS_SESSION_TOKEN"),
        )


def is_s3(url: str) -> bool:
    return str(url).startswith(("s3://", "s3a://"))


def _s3_filesystem(options: StorageOptions) -> pafs.S3FileSystem:
    o = options.resolved()
    kwargs: dict = {}
    if o.endpoint_url:
        parsed = urlparse(o.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if o.region:
        kwargs["region"] = o.region
    if o.access_key and o.secret_key:
        kwargs.update(access_key=o.access_key, secret_key=o.secret_key)
        if o.session_token:
            kwargs["session_token"] = o.session_token
    return pafs.S3FileSystem(**kwargs)


def resolve_filesystem(url: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path, an ``s3://bucket/key`` URL (with the S3
    settings of ``options``, else the AWS environment) or another URI pyarrow knows (``gs://``,
    ``hdfs://``). The one place every job turns a location into a filesystem."""
    url = str(url)
    if is_s3(url):
        return _s3_filesystem(options or StorageOptions()), url.split("://", 1)[1].rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        fs, path = pafs.FileSystem.from_uri(url)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(url))


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for URLs and os.path for local paths."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def to_url(base: str, fs_path: str) -> str:
    """Turn a path inside the filesystem of ``base`` back into a user-facing URL."""
    if is_s3(base):
        return "s3://" + fs_path
    return fs_path


def file_info(url: str, options: StorageOptions | None = None) -> pafs.FileInfo:
    fs, path = resolve_filesystem(url, options)
    return fs.get_file_info(path)


def list_files(url: str, options: StorageOptions | None = None, pattern: str | None = None,
               recursive: bool = True) -> list[str]:
    """Sorted URLs of the files under ``url`` (a file gives itself); ``pattern`` is an
    fnmatch glob on the file name. Hidden files (``.`` or ``_`` prefix) are skipped."""
    fs, path = resolve_filesystem(url, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [to_url(url, path)]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{url}: no such file or directory")
    out = []
    for fi in fs.get_file_info(pafs.FileSelector(path, recursive=recursive)):
        if fi.type != pafs.FileType.File or fi.base_name.startswith((".", "_")):
            continue
        if pattern and not fnmatch.fnmatch(fi.base_name, pattern):
            continue
        out.append(to_url(url, fi.path))
    return sorted(out)


def read_range(url: str, offset: int, nbytes: int, options: StorageOptions | None = None) -> bytes:
    """One contiguous read (a single ranged GET on S3)."""
    fs, path = resolve_filesystem(url, options)
    with fs.open_input_file(path) as f:
        return f.read_at(nbytes, offset)


def read_bytes(url: str, options: StorageOptions | None = None, decompress: bool = True) -> bytes:
    """The whole file; ``.gz`` files are gunzipped when ``decompress``."""
    fs, path = resolve_filesystem(url, options)
    with fs.open_input_stream(path, compression=None) as f:
        data = f.read()
    if decompress and str(url).endswith(".gz"):
        data = gzip.decompress(data)
    return data


def open_input(url: str, options: StorageOptions | None = None) -> IO[bytes]:
    """A binary file object (random access) for reading."""
    fs, path = resolve_filesystem(url, options)
    return fs.open_input_file(path)


def open_output(url: str, options: StorageOptions | None = None) -> IO[bytes]:
    """A binary output stream; parent folders are created for local paths."""
    fs, path = resolve_filesystem(url, options)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open_output_stream(path)


def makedirs(url: str, options: StorageOptions | None = None) -> None:
    fs, path = resolve_filesystem(url, options)
    fs.create_dir(path, recursive=True)


def publish_bytes(url: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` so that readers see either nothing or the whole file: a temporary name
    and a rename locally; on S3 a single PUT is already atomic."""
    fs, path = resolve_filesystem(url, options)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


__all__ = ["StorageOptions", "resolve_filesystem", "list_files", "open_input", "open_output",
           "read_range", "read_bytes", "publish_bytes", "join", "is_s3", "makedirs"]
