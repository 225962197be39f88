"""Where outputs go, as the user names it: a folder, or ``s3://bucket/prefix``.

Pure parsing, shared by the settings (which must tell a URL from a folder before a
:class:`~pathlib.Path` folds ``s3://`` into ``s3:/``) and :mod:`jobs.output_store` (which reads
and writes there). Bucket names follow S3's rules
(https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html).
"""

from __future__ import annotations

import re

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
#: Longest key S3 takes, in bytes of UTF-8 (https://docs.aws.amazon.com/AmazonS3/latest/userguide/object-keys.html).
S3_KEY_MAX_BYTES = 1024


def key_bytes(text: str) -> int:
    """Bytes of UTF-8 ``text`` takes in a key (a lone surrogate counted as what it would take)."""
    return len(text.encode("utf-8", "surrogatepass"))


def prefix_room(prefix: str) -> int:
    """Bytes of UTF-8 a key prefix may have so that the longest key wanbatch makes under it
    (``<prefix>/<batch slug>/<item>-<job id>.json``, :func:`jobs.outputs.longest_name_bytes`)
    stays within :data:`S3_KEY_MAX_BYTES`."""
    from jobs.outputs import longest_name_bytes

    return S3_KEY_MAX_BYTES - len("/") - longest_name_bytes()


def is_s3_url(value: str) -> bool:
    """True for ``s3://…`` (any case of the scheme): object storage rather than a folder."""
    return value.strip()[:5].lower() == "s3://"


def parse_s3_url(value: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")``; ValueError says what is wrong.

    The prefix may be empty. Its segments may not be empty, ``.`` or ``..`` (S3 would store
    such keys literally, but most tools that sync buckets to disk would not), nor hold control
    characters; a query or fragment is refused rather than silently dropped. It may not be so
    long that the longest key wanbatch makes under it passes S3's :data:`S3_KEY_MAX_BYTES`
    (:func:`prefix_room`): every upload would fail only after its video was paid for.
    """
    text = value.strip()
    if not is_s3_url(text):
        raise ValueError(f"{value!r} is not an s3://bucket/prefix URL")
    rest = text[5:]
    if "?" in rest or "#" in rest:
        raise ValueError("an s3:// URL takes no query or fragment (?, #)")
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket:  # not echoed: the part before the "@" is a key and its secret
        raise ValueError(
            "an s3:// URL takes no credentials (KEY:SECRET@bucket): give them as "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(
            f"{bucket!r} is not a valid bucket name (3-63 lower-case letters, digits, dots and hyphens)"
        )
    prefix = prefix.strip("/")
    if prefix:
        for part in prefix.split("/"):
            if part in ("", ".", "..") or CONTROL_CHARS.search(part):
                raise ValueError(
                    f"the key prefix {prefix!r} has an empty, '.', '..' or control character part"
                )
        room = prefix_room(prefix)
        if key_bytes(prefix) > room:
            raise ValueError(
                f"the key prefix is {key_bytes(prefix):,} bytes long in UTF-8; S3 keys take at most "
                f"{S3_KEY_MAX_BYTES:,} bytes and wanbatch adds up to {S3_KEY_MAX_BYTES - room:,} after "
                f"the prefix (/<batch name>/<item>-<job id>.json), so the prefix may be at most "
                f"{room:,} bytes: shorten it"
            )
    return bucket, prefix


def normalise_s3_url(value: str) -> str:
    """The canonical form of an ``s3://`` location: no trailing slash (ValueError when invalid)."""
    bucket, prefix = parse_s3_url(value)
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` of a stored object → ``(bucket, key)``; ValueError when not one."""
    if not is_s3_url(uri):
        raise ValueError(f"{uri!r} is not an s3:// object")
    bucket, _, key = uri.strip()[5:].partition("/")
    if not bucket or not key:
        raise ValueError(f"{uri!r} names no object")
    return bucket, key
