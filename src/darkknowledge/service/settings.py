"""Service settings: environment variables ``DK_SERVE_*`` or a TOML file, validated once.

Data roots are the only folders a job's recipe may read from (besides uploaded datasets):
``DK_SERVE_DATA_ROOTS='{"shared": "../shared/data", "system": "/usr/share/datasets"}'``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..errors import DKError


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DK_SERVE_", extra="forbid", frozen=True)

    data_dir: Path = Path("dk-service")  # database (SQLite), jobs, uploads
    database_url: str | None = None  # default: sqlite:///<data_dir>/service.db
    data_roots: dict[str, Path] = {}  # name → folder that recipes may read datasets from
    workers: Annotated[int, Field(ge=0, le=64)] = 1  # 0: accept jobs but run none
    threads_per_job: Annotated[int, Field(ge=1, le=256)] = 1
    upload_limit_mb: Annotated[float, Field(gt=0)] = 512.0
    # every other request body (JSON, forms); refused with 413 while it streams in
    max_request_mb: Annotated[float, Field(gt=0)] = 16.0
    heartbeat_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3  # starts of one job, resumes included
    poll_s: Annotated[float, Field(gt=0, le=60)] = 0.2  # how often an idle worker looks
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000

    @field_validator("data_dir")
    @classmethod
    def _abs_dir(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("data_roots")
    @classmethod
    def _roots(cls, v: dict[str, Path]) -> dict[str, Path]:
        out = {}
        for name, path in v.items():
            if not name.isidentifier():
                raise ValueError(f"data root name {name!r}: use letters, digits and _")
            out[name] = path.expanduser().resolve()
        return out

    @model_validator(mode="after")
    def _db_default(self):
        if self.database_url is None:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'service.db'}")
        return self

    @property
    def upload_limit_bytes(self) -> int:
        return int(self.upload_limit_mb * 1024 * 1024)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    def to_env(self) -> dict[str, str]:
        """These settings as ``DK_SERVE_*`` variables, for the worker processes."""
        out = {}
        for k, v in self.model_dump(mode="json").items():
            out[f"DK_SERVE_{k.upper()}"] = v if isinstance(v, str) else json.dumps(v)
        return out


def load_settings(config_file: str | Path | None = None, **overrides) -> ServiceSettings:
    """Settings from the environment, then ``config_file`` (TOML), then ``overrides``
    (later wins). Any problem is a one-line :class:`DKError`."""
    from pydantic import ValidationError

    values: dict = {}
    path = config_file or os.environ.get("DK_SERVE_CONFIG")
    if path:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise DKError("a settings file needs Python 3.11 or newer (tomllib)") from None
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise DKError(f"{path}: cannot read settings file ({e.strerror or e})") from None
        except tomllib.TOMLDecodeError as e:
            raise DKError(f"{path}: malformed TOML: {e}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServiceSettings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "settings"
        raise DKError(f"service settings: {where}: {err['msg']}") from None
