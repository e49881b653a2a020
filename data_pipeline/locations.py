"""Where a prepared data set lives, and how its files are opened.

A location is a local directory, a URL prefix webdataset can open (`pipe:cat /data`,
`https://host/data`), or a template holding `{name}` for URLs whose file name is not
at the end (`pipe:aws s3 cp s3://bucket/data/{name} -`). Every file of a data set
(manifest, tokenizer, shards) is reached through `resolve`, so a data set copied to
object storage is read exactly like a local one.
"""

import os
from urllib.parse import urlparse

from pretrain.errors import UserError


def is_url(location: str) -> bool:
    return "{name}" in location or urlparse(location).scheme != ""


def resolve(location: str, name: str) -> str:
    """The path or webdataset URL of file `name` inside `location`."""
    if "{name}" in location:
        return location.replace("{name}", name)
    if is_url(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


def open_url(url: str):
    """A binary read stream for a local path or any URL webdataset's `gopen` supports."""
    import webdataset

    return webdataset.gopen(url, "rb")


def read_bytes(location: str, name: str) -> bytes:
    """The whole of file `name`; UserError naming it when it cannot be read."""
    data = read_optional(location, name)
    if data is None:
        raise UserError(f"cannot read {resolve(location, name)}: no such file")
    return data


def read_optional(location: str, name: str) -> bytes | None:
    """The whole of file `name`, or None when it does not exist (local) or the URL fails."""
    url = resolve(location, name)
    if not is_url(location):
        if not os.path.isfile(url):
            return None
        with open(url, "rb") as f:
            return f.read()
    try:
        stream = open_url(url)
        try:
            data = stream.read()
        finally:
            stream.close()  # a pipe: URL reports its command's exit status here
    except OSError:
        return None
    return data
