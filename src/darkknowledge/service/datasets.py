"""Uploaded datasets: a ZIP of files (e.g. the four MNIST IDX files), size-limited while it
streams in, unpacked into ``<data_dir>/datasets/<id>/``, referred to as ``dataset:<id>``."""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
import zipfile
import zlib
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


MAX_NAME_PART = 200  # characters of one folder or file name inside an archive
MAX_NAME = 1000  # characters of one member's whole path
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand past ~1032:1; a bigger claim is forged


def _safe_member(info: zipfile.ZipInfo) -> PurePosixPath:
    raw = info.orig_filename  # zipfile cuts a name at NUL; the original keeps it
    name = info.filename
    p = PurePosixPath(name.replace("\\", "/"))
    if (
        p.is_absolute()
        or any(part in ("..", "") for part in p.parts)
        or ":" in name
        or any(ord(c) < 32 or c == "\x7f" for c in raw)
    ):
        raise BadName(f"the archive holds a bad name {raw[:80]!r}: names must stay inside it")
    if len(name) > MAX_NAME or any(len(part) > MAX_NAME_PART for part in p.parts):
        raise BadName(
            f"the archive holds a name too long ({raw[:40]!r}...): at most {MAX_NAME_PART} "
            f"characters a part, {MAX_NAME} in all"
        )
    return p


def _check_members(infos: list[zipfile.ZipInfo]) -> list[tuple[PurePosixPath, zipfile.ZipInfo]]:
    """Names that can all be written (no name twice, no file where a folder must go) and
    entries whose headers are believable, before anything is unpacked."""
    members = [(_safe_member(i), i) for i in infos]
    files: dict[PurePosixPath, str] = {}
    folders: set[PurePosixPath] = set()
    for rel, info in members:
        if info.flag_bits & 0x1:
            raise BadUpload(f"{info.filename!r} is encrypted: upload an archive without a password")
        if info.is_dir():
            folders.add(rel)
            continue
        if rel in files:
            raise BadUpload(f"the archive holds {info.filename!r} twice")
        files[rel] = info.filename
        folders.update(rel.parents)
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise BadUpload(f"the archive is damaged: {info.filename!r} has forged sizes")
        if (
            info.compress_type == zipfile.ZIP_DEFLATED
            and info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 1024
        ):
            raise BadUpload(f"the archive is damaged: {info.filename!r} has forged sizes")
    for rel, name in files.items():
        if rel in folders:
            raise BadUpload(f"the archive holds {name!r} as both a file and a folder")
    return [(rel, i) for rel, i in members if not i.is_dir()]


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
    try:
        with zipfile.ZipFile(archive) as z:
            members = _check_members(z.infolist())
            if not members:
                raise BadUpload("the ZIP archive holds no files")
            if sum(i.file_size for _, i in members) > 4 * limit:
                raise TooLarge("the archive unpacks to more than 4x the upload limit")
            dest.mkdir(parents=True)
            names = []
            for rel, info in members:
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                names.append(str(rel))
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
        # a bad CRC, a size that does not match the data, an unknown compression method
        raise BadUpload(f"the archive is damaged: {' '.join(str(e).split())}") from None
    return sorted(names)


def delete_dataset(settings: ServiceSettings, db: Session, ds: Dataset) -> None:
    db.delete(ds)
    db.commit()
    shutil.rmtree(settings.datasets_dir / ds.id, ignore_errors=True)
