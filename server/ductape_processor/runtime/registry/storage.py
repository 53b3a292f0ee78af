"""The manifest's `storage` section: a storage per tag, and per environment the provider that holds its files.

Kept apart from `manifest.py` (which lists it on `Manifest`) so that module stays small. Credentials are never
values here: a field that takes one holds `$Secret{NAME}` (or text containing it), resolved when the storage is
first used.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from ductape_processor.runtime.registry.fields import ManifestModel as _StorageModel
from ductape_processor.runtime.registry.fields import Tag, http_url, together

BUCKET_PATTERN = r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$"
CONTAINER_PATTERN = r"^[a-z0-9](?:-?[a-z0-9])+$"


def _relative_directory(value: str) -> str:
    path = PurePosixPath(value)
    if path.is_absolute() or "\\" in value or any(part in ("..", ".") for part in value.split("/")) or "\0" in value:
        raise ValueError("must be a relative path without '.' or '..' segments (it is under the data directory)")
    return value


def _endpoint(value: str) -> str:
    return http_url(value, secret=True, query=False).rstrip("/")


Endpoint = Annotated[str, AfterValidator(_endpoint)]


class FsStorageEnv(_StorageModel):
    """Files in a folder of the processor's data directory: the embedded default, nothing to install."""

    provider: Literal["fs"]
    directory: Annotated[str, AfterValidator(_relative_directory)] | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="Folder under `<data_dir>/storage/`; default `<product>/<tag>/<env>`.",
    )


class S3StorageEnv(_StorageModel):
    """An S3 bucket (AWS, or an S3-compatible store at `endpoint`), through aiobotocore."""

    provider: Literal["s3"]
    bucket: str = Field(pattern=BUCKET_PATTERN, description="The bucket's name.")
    region: str = Field("us-east-1", min_length=1, max_length=64, description="The bucket's region.")
    endpoint: Endpoint | None = Field(None, description="URL of an S3-compatible store; default: AWS.")
    access_key_id: str | None = Field(None, description="`$Secret{NAME}`; default: the SDK's own chain.")
    secret_access_key: str | None = Field(None, description="`$Secret{NAME}`, with access_key_id.")
    session_token: str | None = Field(None, description="`$Secret{NAME}` of a temporary credential's token.")
    path_style: bool = Field(False, description="Address the bucket in the path (most S3-compatible stores).")

    _credentials = together("access_key_id", "secret_access_key")


class GcsStorageEnv(_StorageModel):
    """A Google Cloud Storage bucket, through gcloud-aio-storage."""

    provider: Literal["gcs"]
    bucket: str = Field(pattern=BUCKET_PATTERN, description="The bucket's name.")
    credentials: str | None = Field(
        None, description="`$Secret{NAME}` holding a service account's JSON key; default: the SDK's own chain."
    )
    endpoint: Endpoint | None = Field(None, description="URL of an emulator serving the JSON API.")


class AzureStorageEnv(_StorageModel):
    """An Azure Blob Storage container, through azure-storage-blob's aio client."""

    provider: Literal["azure"]
    container: str = Field(min_length=3, max_length=63, pattern=CONTAINER_PATTERN, description="The container's name.")
    connection_string: str | None = Field(None, description="`$Secret{NAME}` holding a connection string.")
    account: str | None = Field(None, min_length=3, max_length=24, description="The storage account's name.")
    account_key: str | None = Field(None, description="`$Secret{NAME}` holding the account's key.")
    endpoint: Endpoint | None = Field(None, description="Blob endpoint URL; default `https://<account>.blob…`.")

    @model_validator(mode="after")
    def _credentials(self) -> AzureStorageEnv:
        if (self.connection_string is None) == (self.account is None):
            raise ValueError("give either connection_string or account (with account_key)")
        if self.connection_string is not None and (self.account_key is not None or self.endpoint is not None):
            raise ValueError("a connection_string carries the key and the endpoint: give neither beside it")
        return self


StorageEnv = Annotated[FsStorageEnv | S3StorageEnv | GcsStorageEnv | AzureStorageEnv, Field(discriminator="provider")]


class Storage(_StorageModel):
    """A storage: where a product's files live in each environment."""

    tag: Tag = Field(description="What calls name (`event`).")
    name: str | None = None
    description: str = ""
    envs: dict[str, StorageEnv] = Field(description="Per product environment slug: provider and its settings.")
    max_file_bytes: int | None = Field(
        None, ge=1, description="Largest file saved; default the processor's PROCESSOR_STORAGE_MAX_FILE_BYTES."
    )
