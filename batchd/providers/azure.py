"""Azure OpenAI batches (`kind = "azure_openai"`): OpenAI's shapes with Azure's quirks.

- `base_url` is the resource endpoint (as `AzureOpenAI(azure_endpoint=...)` takes it);
  with `api_version` batchd speaks the classic surface (`{base}/openai/...?api-version=`),
  without it the v1 API (`{base}/openai/v1/...`).
- Auth: the `api-key` header, or (`auth = "entra"`) the key source holds a Microsoft
  Entra ID token sent as `Authorization: Bearer` (re-read at each probe and on SIGHUP).
- Every line's `body.model` is the batch deployment, one per file (`deployments` lists
  the names lines may use; checked before upload).
- An upload is processed asynchronously: batchd waits for the file to be `processed`.
- `token_limit_exceeded` at create is an admission refusal (the attempt waits, the
  limit is learned), not a failure; older api-versions' capitalised statuses and ISO
  timestamps are read as OpenAI's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from batchd.providers.base import Create, Snapshot
from batchd.providers.errors import InvalidRequest, QuotaRefused
from batchd.providers.http import bearer
from batchd.providers.openai import BatchApi, OpenAI

FILE_POLL_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
FILE_POLLS = 150  # about 12 minutes at most


def azure_auth(entra: bool) -> Any:
    """`api-key: KEY`, or `Authorization: Bearer TOKEN` for an Entra ID token."""

    def auth(key: str | None) -> dict[str, str]:
        if entra:
            return bearer(key)
        return {"api-key": key} if key else {}

    return auth


class _AzureApi(BatchApi):
    uploads_api = False  # Azure has no Uploads API: one multipart request per file
    root_hint = "is {section} base_url the resource endpoint (https://NAME.openai.azure.com)?"

    async def wait_processed(self, file_id: str) -> None:
        """Azure processes an upload before a batch may use it: poll until it has."""
        for i in range(FILE_POLLS):
            f = await self.call("get_file", "GET", f"/files/{file_id}")
            status = str(f.get("status") or "processed").lower()
            if status == "processed":
                return
            if status in ("error", "deleted"):
                why = f.get("status_details") or status
                raise InvalidRequest(f"the uploaded file was not accepted: {why}")
            await asyncio.sleep(FILE_POLL_SECONDS[min(i, len(FILE_POLL_SECONDS) - 1)])
        raise InvalidRequest(f"the uploaded file {file_id} was not processed in time")


class Azure(OpenAI):
    """Azure OpenAI Global-Batch / Data Zone Batch deployments."""

    kind = "azure_openai"
    client_class = _AzureApi

    @property
    def classic(self) -> bool:
        """The api-version surface (else the v1 API)."""
        return bool(self.cfg.api_version)

    @property
    def path_suffix(self) -> str:  # type: ignore[override]
        return "/openai" if self.classic else "/openai/v1"

    def client_options(self) -> dict[str, Any]:
        params = {"api-version": self.cfg.api_version} if self.cfg.api_version else {}
        return {"auth": azure_auth(self.cfg.auth == "entra"), "params": params}

    async def stage(self, path: Any, filename: str, tap: Any = None) -> str | None:
        file_id = await super().stage(path, filename, tap)
        assert file_id is not None
        api = self.api
        assert isinstance(api, _AzureApi)
        await api.wait_processed(file_id)
        return file_id

    async def create(self, req: Create) -> Snapshot:
        try:
            return await super().create(req)
        except InvalidRequest as e:
            if e.code == "token_limit_exceeded":
                from batchd.admission import limit_from_message

                refused = QuotaRefused(e.message, limit_from_message(e.message), status=e.status)
                refused.code, refused.provider = e.code, e.provider
                raise refused from None
            raise
