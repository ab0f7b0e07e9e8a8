"""Service configuration, from the environment with the ``CAPE_`` prefix (pydantic-settings).

    CAPE_DATABASE_URL   sqlite:///data/cape.sqlite3 (embedded) or postgresql+psycopg://user:pw@host/db
    CAPE_BROKER_URL     redis://127.0.0.1:6379/0
    CAPE_DATASETS       JSON object, dataset name -> root folder on the workers, e.g. {"synthetic": "data/synthetic"}
    CAPE_DEFAULT_DATASET  the dataset a job gets when it names none
    CAPE_ARTIFACTS_DIR  checkpoints and run files, one folder per job (the default, local artifact store)
    CAPE_ARTIFACTS_URL  s3://bucket/prefix: the artifact store in S3-compatible storage instead, with
                        CAPE_S3_ENDPOINT_URL, CAPE_S3_ACCESS_KEY_ID, CAPE_S3_SECRET_ACCESS_KEY, CAPE_S3_REGION;
                        the workers then run jobs in CAPE_WORK_DIR
    CAPE_DEVICE         the workers' device: auto (CUDA when there is one), cpu, cuda, cuda:N or mps
    CAPE_API_KEYS       comma-separated keys; when set, every endpoint but /healthz, /readyz and the docs needs one
    CAPE_MAX_UPLOAD_BYTES, CAPE_MAX_IMAGE_PIXELS, CAPE_PREDICT_TIMEOUT_S, CAPE_PREDICT_CACHE_SIZE: predictions
    CAPE_MAX_DATASET_BYTES, CAPE_MAX_DATASET_EXPANDED_BYTES, CAPE_MAX_DATASET_ENTRIES: an uploaded dataset's archive
    CAPE_MAX_ATTEMPTS, CAPE_HEARTBEAT_TIMEOUT_S, CAPE_REDISPATCH_AFTER_S, CAPE_REAPER_INTERVAL_S: see the reaper
    CAPE_STORE_RETRY_S, CAPE_DATABASE_RETRY_S  seconds a worker waits out an artifact store or database it cannot
                        reach (a restart) before the job fails, or is left to the reaper (default 300 each)

Read by the library itself (cape.backbone_weights), the same in the API, the workers and the CLI, so not a field here:
    CAPE_DOWNLOAD_WEIGHTS  true (default) or false: whether ImageNet backbone weights missing from torchvision's cache
                        (TORCH_HOME) may be downloaded; false makes the API refuse (422) a job whose weights are not
                        in the cache it sees
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cape.config import DEVICE_FORMS, DeviceName
from cape.inference.inputs import MAX_IMAGE_PIXELS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAPE_", extra="ignore")

    database_url: str = "sqlite:///data/cape.sqlite3"
    broker_url: str = "redis://127.0.0.1:6379/0"
    datasets: dict[str, str] = Field(default_factory=lambda: {"synthetic": "data/synthetic"})
    default_dataset: str = "synthetic"
    artifacts_dir: Path = Path("artifacts")
    # The artifact store (service/artifacts.py): empty keeps every job's files in artifacts_dir; s3://bucket/prefix
    # puts them in S3-compatible object storage that every worker and the API reach. No keys set: botocore's own
    # chain (AWS_* variables, ~/.aws, an instance role). With a remote store a worker runs each job in a scratch
    # folder under work_dir (copied from the store when it claims the job) and keeps its model cache there.
    artifacts_url: str = ""
    s3_endpoint_url: str | None = None  # MinIO or another S3-compatible server; None: AWS
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_region: str | None = None
    work_dir: Path = Path("work")
    # A job runs for hours: the broker must not hand its message to a second worker while the first still trains.
    visibility_timeout_s: int = 7 * 24 * 3600
    heartbeat_interval_s: float = 10.0
    # The reaper (run by every worker): a running job whose heartbeat is older than heartbeat_timeout_s lost its
    # worker and goes back to the queue, until max_attempts tries have been lost; a queued job whose message did
    # not reach the broker, or was sent longer than redispatch_after_s ago, is sent again.
    max_attempts: int = Field(default=3, ge=1)
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)
    redispatch_after_s: float = Field(default=900.0, gt=0)
    reaper_interval_s: float = Field(default=30.0, gt=0)
    # How long a worker tries again (backoff 0.5 s doubling to 10 s: service/retry.py) when the artifact store or the
    # database cannot be reached, its training paused meanwhile: long enough for a restart, short enough that a dead
    # store fails the job with a message naming it. 0: no second try. A database outage longer than
    # heartbeat_timeout_s makes the reaper give the job to another worker once the database is back (nothing is
    # lost: it resumes from its checkpoint).
    store_retry_s: float = Field(default=300.0, ge=0)
    database_retry_s: float = Field(default=300.0, ge=0)
    api_keys: str = ""
    max_body_bytes: int = 64 * 1024
    # POST /jobs/{id}/predict carries two images: its own body limit, and a pixel limit checked before decoding.
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=MAX_IMAGE_PIXELS, gt=0)
    # How long the API waits for a predict worker (a cold one loads the model first), and how many trained models a
    # predict worker keeps loaded.
    predict_timeout_s: float = Field(default=30.0, gt=0)
    predict_cache_size: int = Field(default=4, ge=1)
    # POST /datasets: the archive as sent (its own body limit), and what it may expand to, in bytes and in entries.
    # The expanded bound is what stops a zip bomb: checked on the listing in the API, counted again while a worker
    # extracts it.
    max_dataset_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_dataset_expanded_bytes: int = Field(default=8 * 1024**3, gt=0)
    max_dataset_entries: int = Field(default=200_000, gt=0)
    # The workers' device, for training, evaluation and prediction: checked as the settings load, so that a typo
    # stops the worker at its start rather than failing every job it takes.
    device: DeviceName = Field(default="auto", description=DEVICE_FORMS)

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    @model_validator(mode="after")
    def _default_dataset_exists(self) -> Settings:
        if self.default_dataset not in self.datasets:
            raise ValueError(
                f"CAPE_DEFAULT_DATASET {self.default_dataset!r} is not one of CAPE_DATASETS {sorted(self.datasets)}"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
