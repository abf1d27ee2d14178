"""Uploaded datasets: a ZIP of files (e.g. the four MNIST IDX files), size-limited while it
streams in, unpacked into ``<data_dir>/datasets/<id>/``, referred to as ``dataset:<id>``."""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

from sqlalchemy.orm import Session

from .db import Dataset, Token
from .jobs import BadName
from .settings import ServiceSettings

_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class TooLarge(Exception):
    pass


class BadUpload(Exception):
    pass


def check_filename(name: str) -> str:
    if not _FILENAME.match(name or "") or ".." in name:
        raise BadName(
            f"bad dataset file name {name!r}: use a plain name like mnist.zip "
            "(letters, digits, '.', '_', '-'; no folders)"
        )
    return name


def _safe_member(name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or ":" in name:
        raise BadName(f"the archive holds a bad name {name!r}: names must stay inside it")
    return p


async def save_upload(
    settings: ServiceSettings,
    db: Session,
    owner: Token,
    filename: str,
    chunks: AsyncIterator[bytes],
) -> Dataset:
    """Stream the body to disk (refusing it past the limit), check and unpack the ZIP."""
    check_filename(filename)
    limit = settings.upload_limit_bytes
    ds_id = uuid.uuid4().hex
    root = settings.datasets_dir
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{ds_id}.upload"
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TooLarge(
                        f"upload larger than the limit of {settings.upload_limit_mb:g} MB"
                    )
                digest.update(chunk)
                f.write(chunk)
        if size == 0:
            raise BadUpload("empty upload: send the ZIP file as the request body")
        files = _unpack(tmp, root / ds_id, limit)
    except BaseException:
        shutil.rmtree(root / ds_id, ignore_errors=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    ds = Dataset(id=ds_id, owner_id=owner.id, filename=filename, size=size,
                 sha256=digest.hexdigest(), files=files)  # fmt: skip
    db.add(ds)
    db.commit()
    return ds


def _unpack(archive: Path, dest: Path, limit: int) -> list[str]:
    if not zipfile.is_zipfile(archive):
        raise BadUpload("not a ZIP archive: upload the dataset's files as one .zip")
    with zipfile.ZipFile(archive) as z:
        infos = [i for i in z.infolist() if not i.is_dir()]
        members = [(_safe_member(i.filename), i) for i in infos]
        if not members:
            raise BadUpload("the ZIP archive holds no files")
        if sum(i.file_size for i in infos) > 4 * limit:
            raise TooLarge("the archive unpacks to more than 4x the upload limit")
        dest.mkdir(parents=True)
        names = []
        for rel, info in members:
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            names.append(str(rel))
    return sorted(names)


def delete_dataset(settings: ServiceSettings, db: Session, ds: Dataset) -> None:
    db.delete(ds)
    db.commit()
    shutil.rmtree(settings.datasets_dir / ds.id, ignore_errors=True)
