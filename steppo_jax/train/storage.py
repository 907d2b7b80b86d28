"""Where a run's files live: a local directory or a bucket URI, through one path library.

Every file a run writes or reads back (checkpoints, ``metrics.jsonl``, plots, ``config.yaml``,
``summary.json``) goes through ``etils.epath``, the path library orbax itself uses, so a run
directory may be anything both accept: a local path or ``gs://bucket/...`` (``s3://`` and
``az://`` too, with the matching fsspec package installed: gcsfs, s3fs, adlfs)::

    run = as_path("gs://my-bucket/runs/x")
    write_atomic(run / "summary.json", text)
"""

from __future__ import annotations

import os

from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
    """True for a URI such as ``gs://bucket/x``, False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a URI kept as it is, a local path made absolute."""
    text = os.fspath(path)
    return epath.Path(text) if is_uri(text) else epath.Path(os.path.abspath(text))


def write_atomic(path: str | os.PathLike, data: str | bytes) -> epath.Path:
    """Writes ``data`` (text as UTF-8) to ``path`` whole or not at all; returns the path.

    The data goes to ``<name>.tmp`` beside it first and is then renamed over ``path``, so a
    reader never sees a partial file and a writer killed midway leaves the previous one. Parent
    directories are created as needed (on an object store there are none to create).
    """
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    tmp.replace(path)
    return path
