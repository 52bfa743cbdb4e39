"""Who may do what, on a real mesh over TLS: keys, grants, internal tokens, paths, JSON-only queue, no leaked secrets."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import wait_until
from tests.test_mesh import cli, jsonl
from visearch.auth import KeyStore, hash_key
from visearch.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from visearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from visearch.grpcserver import sync_channel
from visearch.mesh import load_state, read_admin_key
from visearch.settings import SecuritySettings

pytestmark = pytest.mark.mesh
SHOP_KEY = "vsk_shop_app_key_for_tests_only"


def make_certs(d: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1/localhost, made with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=visearch test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "2", "-extfile", "ext.cnf")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=client")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "client.pem", "-days", "2")
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem"), "key": str(d / "server.key"),
            "client_cert": str(d / "client.pem"), "client_key": str(d / "client.key")}


@pytest.fixture(scope="module")
def secure_mesh(tmp_path_factory, model_repo, grocery):
    root = tmp_path_factory.mktemp("secure")
    certs = make_certs(root)
    data = root / "mesh"
    # An admin key and a key for one app that may only search catalog "shop".
    from visearch.mesh import ensure_credentials

    keys_file, _ = ensure_credentials(data)
    entries = json.loads(keys_file.read_text())["keys"]
    entries.append({"id": "shop-app", "sha256": hash_key(SHOP_KEY), "catalogs": ["shop"], "actions": ["search"]})
    KeyStore.write(keys_file, entries)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(model_repo),
               VISEARCH_TLS_CERT_FILE=certs["cert"], VISEARCH_TLS_KEY_FILE=certs["key"],
               VISEARCH_TLS_CA_FILE=certs["ca"],
               # mTLS: every server requires a client certificate signed by the CA.
               VISEARCH_TLS_CLIENT_CA_FILE=certs["ca"], VISEARCH_TLS_CLIENT_CERT_FILE=certs["client_cert"],
               VISEARCH_TLS_CLIENT_KEY_FILE=certs["client_key"])
    cli(env, "up", "--ingest-root", str(grocery["root"]))
    photos = [p for p in grocery["train"] if p.is_product][:6]
    manifest = root / "m.csv"
    manifest.write_text("item_id,path\n" + "".join(f"{p.path.stem},{p.path}\n" for p in photos))
    res = json.loads(cli(env, "ingest", "--manifest", str(manifest), "--catalog", "shop", "--wait", "--json").stdout)
    assert res["ok"] == 6
    state = load_state(data)
    yield {"env": env, "data": data, "state": state, "photo": grocery["val"][0].path, "certs": certs,
           "comps": {c["name"]: c for c in state["components"]}}
    cli(env, "down", check=False)


def client_tls(m, with_cert: bool = True) -> SecuritySettings:
    c = m["certs"]
    if not with_cert:
        return SecuritySettings(tls_ca_file=c["ca"], tls_client_cert_file=None, tls_client_key_file=None)
    return SecuritySettings(tls_ca_file=c["ca"], tls_client_cert_file=c["client_cert"], tls_client_key_file=c["client_key"])


def gateway_stub(m, key: str | None):
    sec = client_tls(m)
    ch = sync_channel(m["state"]["gateway"], sec, key=key or "")
    return ch, gateway_pb2_grpc.GatewayServiceStub(ch)


def code_of(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_cli_works_over_tls_with_the_admin_key(secure_mesh):
    out = jsonl(cli(secure_mesh["env"], "search", str(secure_mesh["photo"]), "--catalog", "shop", "--json").stdout)
    assert out[0]["hits"], out


def test_plaintext_client_cannot_talk_to_a_tls_gateway(secure_mesh):
    with grpc.insecure_channel(secure_mesh["state"]["gateway"]) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        assert code_of(lambda: stub.ListCatalogs(gateway_pb2.ListCatalogsRequest(), timeout=5)) == \
            grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_certificate(secure_mesh):
    key = read_admin_key(secure_mesh["data"])
    with sync_channel(secure_mesh["state"]["gateway"], client_tls(secure_mesh, with_cert=False), key=key) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        assert code_of(lambda: stub.ListCatalogs(gateway_pb2.ListCatalogsRequest(), timeout=5)) == \
            grpc.StatusCode.UNAVAILABLE
    ch, stub = gateway_stub(secure_mesh, key)
    with ch:
        assert [c.name for c in stub.ListCatalogs(gateway_pb2.ListCatalogsRequest(), timeout=10).catalogs]


def test_missing_and_wrong_keys_are_unauthenticated(secure_mesh):
    image = secure_mesh["photo"].read_bytes()
    for key in (None, "vsk_wrong"):
        ch, stub = gateway_stub(secure_mesh, key)
        with ch:
            assert code_of(lambda s=stub: s.Search(gateway_pb2.SearchRequest(catalog="shop", image=image), timeout=10)) \
                == grpc.StatusCode.UNAUTHENTICATED
    env = dict(secure_mesh["env"], VISEARCH_API_KEY="vsk_wrong")
    out = jsonl(cli(env, "search", str(secure_mesh["photo"]), "--catalog", "shop", "--json", check=False).stdout)
    assert out[0]["error"]["code"] == "UNAUTHENTICATED"


def test_grants_limit_catalogs_and_actions(secure_mesh):
    image = secure_mesh["photo"].read_bytes()
    ch, stub = gateway_stub(secure_mesh, SHOP_KEY)
    with ch:
        assert stub.Search(gateway_pb2.SearchRequest(catalog="shop", image=image), timeout=30).hits
        denied = [
            lambda: stub.Search(gateway_pb2.SearchRequest(catalog="other", image=image), timeout=10),
            lambda: stub.IngestItems(gateway_pb2.IngestItemsRequest(
                catalog="shop", items=[gateway_pb2.IngestItem(item_id="x", image=image)]), timeout=10),
            lambda: stub.DeleteItems(gateway_pb2.DeleteItemsRequest(catalog="shop", item_ids=["x"]), timeout=10),
            lambda: stub.GetItem(gateway_pb2.GetItemRequest(catalog="shop", item_id="x"), timeout=10),
        ]
        assert [code_of(f) for f in denied] == [grpc.StatusCode.PERMISSION_DENIED] * 4
        # It sees no catalog it may not read or search.
        names = [c.name for c in stub.ListCatalogs(gateway_pb2.ListCatalogsRequest(), timeout=10).catalogs]
        assert names == ["shop"]


def test_internal_services_need_the_internal_token(secure_mesh):
    addr = secure_mesh["comps"]["embedding"]["address"]
    sec = client_tls(secure_mesh)
    admin = read_admin_key(secure_mesh["data"])
    for key, expected in (("", grpc.StatusCode.UNAUTHENTICATED), (admin, grpc.StatusCode.UNAUTHENTICATED)):
        with sync_channel(addr, sec, key=key) as ch:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)
            assert code_of(lambda s=stub: s.GetModelInfo(embedding_pb2.GetModelInfoRequest(), timeout=10)) == expected
    # Health stays open for probes.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with sync_channel(addr, sec) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("uri, reason", [
    ("/etc/passwd", "outside the gateway's ingest roots"),
    ("{root}/../../../../etc/passwd", "outside the gateway's ingest roots"),
    ("http://169.254.169.254/latest/meta-data", "only local paths"),
    ("file:///etc/shadow", "outside the gateway's ingest roots"),
    ("relative/path.jpg", "must be absolute"),
])
def test_paths_outside_roots_are_refused(secure_mesh, grocery, uri, reason):
    ch, stub = gateway_stub(secure_mesh, read_admin_key(secure_mesh["data"]))
    with ch, pytest.raises(grpc.RpcError) as err:
        stub.IngestItems(gateway_pb2.IngestItemsRequest(catalog="shop", items=[
            gateway_pb2.IngestItem(item_id="p1", uri=uri.format(root=grocery["root"]))]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.value.details()


def test_queue_refuses_pickle(secure_mesh):
    from visearch.queue import INGEST_TASK, make_celery
    from visearch.settings import QueueSettings

    redis_url = secure_mesh["comps"]["redis"]["address"]
    app = make_celery(QueueSettings(redis_url=redis_url))
    app.conf.accept_content = ["json", "pickle"]  # the attacker's producer allows pickle; the worker must not
    app.send_task(INGEST_TASK, args=["pickled", "shop", []], serializer="pickle")
    log = Path(secure_mesh["comps"]["worker"]["log"])
    wait_until(lambda: "pickle" in log.read_text() and "disallowed" in log.read_text().lower(), 30,
               "worker refusing a pickle message")


def test_secrets_never_logged(secure_mesh):
    admin = read_admin_key(secure_mesh["data"])
    token = (secure_mesh["data"] / "secrets" / "internal.token").read_text().strip()
    time.sleep(0.5)
    for log in (secure_mesh["data"] / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert admin not in text and token not in text and SHOP_KEY not in text, log
    assert oct((secure_mesh["data"] / "secrets" / "admin.key").stat().st_mode & 0o777) == "0o600"
