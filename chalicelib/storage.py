"""S3 access for bundles: presigned uploads and downloads, streaming reads.

The bucket is versioned: a recorded version names the S3 object version it validated, and
every download of it is pinned to that object version, so a later write to the same key (an
overwrite through a leaked form, or by a principal with s3:PutObject) can never change what a
version serves. Deleting a key removes every object version of it.
"""
from __future__ import annotations

import base64
from typing import Any, BinaryIO

from botocore.exceptions import ClientError

from chalicelib.exceptions import StorageError

BUNDLE_CONTENT_TYPE = "application/gzip"


def bundle_key(deployment: str, deploy_id: str) -> str:
    return f"bundles/{deployment}/{deploy_id}.tar.gz"


def delta_key(deployment: str, deploy_id: str) -> str:
    """Where a deploy's delta against the version live before it is kept (outside bundles/: no ingest)."""
    return f"deltas/{deployment}/{deploy_id}.tar.gz"


DELTA_SUFFIX = ".delta.tar.gz"


def uploaded_delta_key(deployment: str, deploy_id: str) -> str:
    """Where a deploy that uploads a delta puts it (under bundles/: its arrival notifies ingest too)."""
    return f"bundles/{deployment}/{deploy_id}{DELTA_SUFFIX}"


def parse_bundle_key(key: str) -> tuple[str, str] | None:
    """(deployment, deploy_id) of a bundle key, or None for keys that are not bundles (an uploaded delta is not)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "bundles" or not parts[2].endswith(".tar.gz") or parts[2].endswith(DELTA_SUFFIX):
        return None
    return parts[1], parts[2].removesuffix(".tar.gz")


def parse_delta_key(key: str) -> tuple[str, str] | None:
    """(deployment, deploy_id) of an uploaded delta's key, or None."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "bundles" or not parts[2].endswith(DELTA_SUFFIX):
        return None
    return parts[1], parts[2].removesuffix(DELTA_SUFFIX)


def sha256_b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class BundleStorage:
    """The bundles bucket. Takes a boto3 S3 client."""

    def __init__(self, s3: Any, bucket: str) -> None:
        self._s3 = s3
        self.bucket = bucket

    def presigned_upload(self, key: str, size: int, sha256_hex: str, expires_in: int) -> tuple[str, dict[str, str]]:
        """A presigned POST that S3 accepts only for this key, this exact size and this checksum."""
        checksum = sha256_b64(sha256_hex)
        fields = {
            "Content-Type": BUNDLE_CONTENT_TYPE,
            "x-amz-checksum-algorithm": "SHA256",
            "x-amz-checksum-sha256": checksum,
        }
        conditions: list[Any] = [
            {"bucket": self.bucket},
            ["eq", "$key", key],
            ["content-length-range", size, size],
            {"Content-Type": BUNDLE_CONTENT_TYPE},
            {"x-amz-checksum-algorithm": "SHA256"},
            {"x-amz-checksum-sha256": checksum},
        ]
        try:
            post = self._s3.generate_presigned_post(
                Bucket=self.bucket, Key=key, Fields=fields, Conditions=conditions, ExpiresIn=expires_in
            )
        except ClientError as exc:
            raise StorageError(f"cannot presign upload of {key}: {exc}") from exc
        return str(post["url"]), {k: str(v) for k, v in post["fields"].items()}

    def presigned_download(self, key: str, expires_in: int, object_version: str | None = None) -> str:
        """A GET of the key (of that object version, when given) that works for `expires_in` seconds."""
        params = {"Bucket": self.bucket, "Key": key, **({"VersionId": object_version} if object_version else {})}
        try:
            url: str = self._s3.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in)
        except ClientError as exc:
            raise StorageError(f"cannot presign download of {key}: {exc}") from exc
        return url

    def open(self, key: str, object_version: str | None = None) -> tuple[BinaryIO, int, str | None]:
        """A streaming body of the object (the current one, or that object version), its size and its version id."""
        try:
            out = self._s3.get_object(
                Bucket=self.bucket, Key=key, **({"VersionId": object_version} if object_version else {})
            )
        except ClientError as exc:
            raise StorageError(f"cannot read {key}: {exc}") from exc
        version_id = out.get("VersionId")
        return out["Body"], int(out["ContentLength"]), None if version_id in (None, "null") else str(version_id)

    def put(self, key: str, body: bytes, content_type: str) -> str | None:
        """Write the object; returns its object version id (None on a bucket without versioning)."""
        try:
            out = self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        except ClientError as exc:
            raise StorageError(f"cannot write {key}: {exc}") from exc
        version_id = out.get("VersionId")
        return None if version_id in (None, "null") else str(version_id)

    def copy(self, source_key: str, source_version: str | None, key: str) -> str | None:
        """A server-side copy of an object (of that object version, when given) to `key`: no byte goes through
        the caller. Returns the new object's version id."""
        source = {"Bucket": self.bucket, "Key": source_key, **({"VersionId": source_version} if source_version else {})}
        try:
            out = self._s3.copy_object(Bucket=self.bucket, Key=key, CopySource=source, ContentType=BUNDLE_CONTENT_TYPE,
                                       MetadataDirective="REPLACE")
        except ClientError as exc:
            raise StorageError(f"cannot copy {source_key} to {key}: {exc}") from exc
        version_id = out.get("VersionId")
        return None if version_id in (None, "null") else str(version_id)

    def put_checked(self, key: str, body: BinaryIO, sha256_hex: str) -> str | None:
        """Write a bundle from a file (streamed, not held in memory) that S3 must find to hash to sha256_hex."""
        try:
            out = self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=BUNDLE_CONTENT_TYPE,
                                      ChecksumSHA256=sha256_b64(sha256_hex))
        except ClientError as exc:
            raise StorageError(f"cannot write {key}: {exc}") from exc
        version_id = out.get("VersionId")
        return None if version_id in (None, "null") else str(version_id)

    def read(self, key: str) -> bytes:
        try:
            data: bytes = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            raise StorageError(f"cannot read {key}: {exc}") from exc
        return data

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot look up {key}: {exc}") from exc
        return True

    def tag(self, key: str, tags: dict[str, str]) -> None:
        try:
            self._s3.put_object_tagging(
                Bucket=self.bucket, Key=key, Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]}
            )
        except ClientError as exc:
            raise StorageError(f"cannot tag {key}: {exc}") from exc

    def delete(self, key: str) -> None:
        """Remove the key for good: every object version of it and every delete marker."""
        try:
            versions = self._object_versions(key)
            if not versions:
                self._s3.delete_object(Bucket=self.bucket, Key=key)
            for version_id in versions:
                self._s3.delete_object(Bucket=self.bucket, Key=key, VersionId=version_id)
        except ClientError as exc:
            raise StorageError(f"cannot delete {key}: {exc}") from exc

    def delete_version(self, key: str, object_version: str) -> None:
        """Remove one object version of the key (a write that must not be kept)."""
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=key, VersionId=object_version)
        except ClientError as exc:
            raise StorageError(f"cannot delete version {object_version} of {key}: {exc}") from exc

    def delete_other_versions(self, key: str, keep: str) -> list[str]:
        """Remove every object version of the key but `keep` (and every delete marker); returns the removed."""
        try:
            removed = [v for v in self._object_versions(key) if v != keep]
            for version_id in removed:
                self._s3.delete_object(Bucket=self.bucket, Key=key, VersionId=version_id)
        except ClientError as exc:
            raise StorageError(f"cannot remove other versions of {key}: {exc}") from exc
        return removed

    def _object_versions(self, key: str) -> list[str]:
        ids: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key}
        while True:
            out = self._s3.list_object_versions(**kwargs)
            for entry in (*out.get("Versions", []), *out.get("DeleteMarkers", [])):
                if entry.get("Key") == key and entry.get("VersionId"):
                    ids.append(str(entry["VersionId"]))
            if not out.get("IsTruncated"):
                return ids
            kwargs = {**kwargs, "KeyMarker": out.get("NextKeyMarker"), "VersionIdMarker": out.get("NextVersionIdMarker")}
