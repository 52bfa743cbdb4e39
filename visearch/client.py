"""A small synchronous client of the gateway, used by the CLI and the tests."""

from __future__ import annotations

import json
from collections.abc import Iterable

from visearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from visearch.grpcserver import client_options, sync_channel
from visearch.settings import SecuritySettings

# Reads are safe to retry; ingestion is too (idempotent per item id), deletes as well.
_RETRY_POLICY = {
    "methodConfig": [{
        "name": [{"service": "visearch.gateway.v1.GatewayService"}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }]
}


class GatewayClient:
    """`key`: the API key sent on every call; TLS comes from VISEARCH_TLS_CA_FILE (and client cert/key for mTLS)."""

    def __init__(self, address: str, key: str = "", timeout: float = 60.0, security: SecuritySettings | None = None):
        opts = [*client_options(), ("grpc.service_config", json.dumps(_RETRY_POLICY))]
        self.address = address
        self.channel = sync_channel(address, security or SecuritySettings(), key=key, options=opts)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.timeout = timeout

    def search(self, image: bytes, catalog: str = "default", top_k: int = 10, filters: dict | None = None,
               rerank: str = "", full_frame: bool = False, per_object: bool = False) -> gateway_pb2.SearchResponse:
        req = gateway_pb2.SearchRequest(catalog=catalog, image=image, top_k=top_k, filters=filters or {},
                                        rerank=rerank, full_frame=full_frame, per_object=per_object)
        return self.stub.Search(req, timeout=self.timeout)

    def ingest(self, items: Iterable[gateway_pb2.IngestItem], catalog: str = "default", job_id: str = ""
               ) -> gateway_pb2.IngestItemsResponse:
        req = gateway_pb2.IngestItemsRequest(catalog=catalog, items=list(items), job_id=job_id)
        return self.stub.IngestItems(req, timeout=self.timeout)

    def job(self, job_id: str) -> gateway_pb2.IngestJob:
        return self.stub.GetIngestJob(gateway_pb2.GetIngestJobRequest(job_id=job_id), timeout=self.timeout).job

    def delete(self, item_ids: list[str], catalog: str = "default") -> int:
        req = gateway_pb2.DeleteItemsRequest(catalog=catalog, item_ids=item_ids)
        return self.stub.DeleteItems(req, timeout=self.timeout).deleted

    def get(self, item_id: str, catalog: str = "default") -> gateway_pb2.Item:
        return self.stub.GetItem(gateway_pb2.GetItemRequest(catalog=catalog, item_id=item_id),
                                 timeout=self.timeout).item

    def catalogs(self) -> list[gateway_pb2.Catalog]:
        return list(self.stub.ListCatalogs(gateway_pb2.ListCatalogsRequest(), timeout=self.timeout).catalogs)

    def reembed(self, catalog: str = "default", model_version: str = "") -> gateway_pb2.ReembedCatalogResponse:
        req = gateway_pb2.ReembedCatalogRequest(catalog=catalog, model_version=model_version)
        return self.stub.ReembedCatalog(req, timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
