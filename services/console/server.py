"""The web console: a small HTTP server that serves a static page (no CDN: everything it loads
comes from here) and a JSON API the page calls, answered over gRPC by the gateway with the
SDK. It holds no credentials of its own: the browser sends the user's API key
(`Authorization: Bearer KEY`) and the console passes it on, so the gateway applies the same
keys, catalogs and actions as for any other caller.

  GET  /, /jobs, /catalog       the page (search; catalogs and jobs; the catalog browser)
  GET  /static/<file>           its script and style
  GET  /healthz                 200 while the gateway answers health checks
  GET  /api/catalogs            catalogs with counts, model, generations
  GET  /api/jobs[?catalog=C]    newest jobs; /api/jobs/<id> one job with its failures
  GET  /api/image?catalog=C&item=I[&max_side=N]   an item's image (X-Image-Width/Height: original size)
  POST /api/search?catalog=C[&top_k=&rerank=&full_frame=1]   body: the photo's bytes
  GET  /api/items?catalog=C[&page_size=N&page_token=T]   a page of items in id order (ListItems)
  POST /api/ingest?catalog=C&item_id=I[&job_id=J&regions=R&index=X]   body: one image's bytes
  POST /api/ingest?catalog=C[&job_id=J&regions=R&index=X]   Content-Type text/csv, body: item_id,path[,metadata
                                columns] (paths the gateway reads inside its ingest roots; the console
                                reads no file); answers {"job_id", "accepted"}
  POST /api/delete?catalog=C     body: {"item_ids": [...]}; answers {"deleted": n}
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import signal
import socket
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc

from visearch.client import Client
from visearch.gateway.v1 import gateway_pb2
from visearch.settings import ConsoleSettings

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".png": "image/png", ".svg": "image/svg+xml"}
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST, grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED, grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.CONFLICT, grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT, grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}
HEADERS = {
    # Nothing but this origin: no CDN, no inline script; thumbnails arrive as blob: URLs.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
JOB_ID_RE = re.compile(r"[A-Za-z0-9]{1,64}", re.ASCII)
LENGTH_RE = re.compile(r"[0-9]{1,12}", re.ASCII)
CSV_BATCH = 1000  # items of a CSV per IngestItems call (one job): far below the gateway's limit
MAX_DELETE = 1000  # item ids per delete, as the gateway takes them


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def box(b) -> list[float]:
    return [round(b.x1, 1), round(b.y1, 1), round(b.x2, 1), round(b.y2, 1)]


def hit_json(h) -> dict:
    out = {"item_id": h.item_id, "score": round(h.score, 5), "metadata": dict(h.metadata)}
    if h.HasField("box"):
        out["box"] = box(h.box)
    if h.HasField("region"):
        out["region"] = box(h.region)
    out["match"] = bool(h.match)
    if h.inliers:
        out["inliers"] = h.inliers
        out["correspondences"] = [[round(c.query_x, 1), round(c.query_y, 1), round(c.x, 1), round(c.y, 1)]
                                  for c in h.correspondences]
    return out


def job_json(j) -> dict:
    return {"job_id": j.job_id, "catalog": j.catalog, "kind": j.kind or "ingest", "phase": j.phase,
            "message": j.message, "state": "done" if j.state == gateway_pb2.JOB_STATE_DONE else "running",
            "submitted": j.submitted,
            "done": j.done, "failed": j.failed, "pending": j.pending, "created_at": j.created_at,
            "updated_at": j.updated_at, "failures": [{"item_id": f.item_id, "reason": f.reason} for f in j.failures]}


def item_json(i) -> dict:
    return {"item_id": i.item_id, "metadata": dict(i.metadata), "model_version": i.model_version,
            "objects": [{"object_id": o.object_id, "box": box(o.box)} for o in i.objects]}


def bad(message: str) -> HttpError:
    return HttpError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", message)


def csv_items(body: bytes) -> list[gateway_pb2.IngestItem]:
    """IngestItems by path from a CSV manifest (header item_id,path; other columns are metadata), as
    `visearch ingest --manifest` reads it, except that paths must be absolute: they are the
    gateway's to read (inside its ingest roots), not the console's."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise bad(f"the CSV is not UTF-8 (byte {exc.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if not reader.fieldnames or not {"item_id", "path"} <= set(reader.fieldnames):
            raise bad(f"the CSV's header must name item_id and path (got {(reader.fieldnames or [])[:10]})")
        items = []
        for row in reader:
            if None in row:
                raise bad(f"CSV line {reader.line_num}: more fields than the header names")
            item_id, path = row["item_id"] or "", (row["path"] or "").strip()
            if not path.startswith("/"):
                raise bad(f"CSV line {reader.line_num}: path {path[:200]!r} is not absolute (the gateway reads it)")
            items.append(gateway_pb2.IngestItem(item_id=item_id, uri=path, metadata={
                k: v for k, v in row.items() if k not in ("item_id", "path") and v}))
    except csv.Error as exc:
        raise bad(f"CSV line {reader.line_num}: {exc}") from None
    if not items:
        raise bad("the CSV has no rows")
    return items


class Console:
    """Routes and the gateway clients, one per API key seen (a few, least recently used dropped)."""

    def __init__(self, settings: ConsoleSettings):
        self.s = settings
        self._clients: OrderedDict[str, Client] = OrderedDict()
        self._lock = threading.Lock()

    def client(self, key: str) -> Client:
        if not key:
            raise HttpError(HTTPStatus.UNAUTHORIZED, "UNAUTHENTICATED", "no API key: send Authorization: Bearer KEY")
        with self._lock:
            c = self._clients.pop(key, None) or Client(self.s.gateway_addr, api_key=key,
                                                       timeout=self.s.rpc_timeout_seconds, security=self.s)
            self._clients[key] = c
            while len(self._clients) > 16:
                # Not closed here: another request may be using it; its channels go with the last reference.
                self._clients.popitem(last=False)
            return c

    def healthy(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from visearch.channels import sync_channel

        try:
            with sync_channel(self.s.gateway_addr, self.s) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def api(self, method: str, path: str, query: dict[str, str], key: str, body: bytes | None,
            content_type: str = "") -> tuple[HTTPStatus, str, bytes, dict]:
        """(status, content type, body, extra headers) of an /api/ call."""
        vs = self.client(key)
        if method == "GET" and path == "/api/catalogs":
            cats = [{"name": c.name, "objects": c.objects, "model": f"{c.model.name}:{c.model.version}",
                     "generation": c.generation,
                     "building": ({"generation": c.building_generation, "objects": c.building_objects,
                                   "model": f"{c.building_model.name}:{c.building_model.version}"}
                                  if c.building_generation else None)} for c in vs.catalogs()]
            return self._json({"catalogs": cats})
        if method == "GET" and path == "/api/jobs":
            return self._json({"jobs": [job_json(j) for j in vs.jobs(query.get("catalog", ""), int(query.get("limit", 20)))]})
        if method == "GET" and path.startswith("/api/jobs/"):
            job_id = path.rsplit("/", 1)[1]
            if not JOB_ID_RE.fullmatch(job_id):
                raise HttpError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"job id {job_id!r} is invalid")
            return self._json(job_json(vs.job(job_id)))
        if method == "GET" and path == "/api/image":
            img = vs.item_image(query.get("item", ""), catalog=query.get("catalog", "default"),
                                max_side=int(query.get("max_side", self.s.thumb_side)))
            return HTTPStatus.OK, img.content_type, img.image, {
                "X-Image-Width": str(img.width), "X-Image-Height": str(img.height), "Cache-Control": "private, max-age=60"}
        if method == "POST" and path == "/api/search":
            if not body:
                raise HttpError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", "no photo: send its bytes as the body")
            res = vs.search(body, catalog=query.get("catalog", "default"), top_k=int(query.get("top_k", 12)),
                            rerank=query.get("rerank", ""), full_frame=query.get("full_frame") == "1",
                            correspondences=True)
            return self._json({"hits": [hit_json(h) for h in res.hits], "query_box": box(res.query_box),
                               "model": f"{res.model.name}:{res.model.version}", "rerank": res.rerank})
        if method == "GET" and path == "/api/items":
            page = vs.list_items(query.get("catalog", "default"), int(query.get("page_size") or 0),
                                 query.get("page_token", ""))
            return self._json({"items": [item_json(i) for i in page.items], "next_page_token": page.next_page_token,
                               "total_items": page.total_items})
        if method == "POST" and path == "/api/ingest":
            return self._json(self.ingest(vs, query, body or b"", content_type))
        if method == "POST" and path == "/api/delete":
            ids = self._item_ids(body or b"")
            return self._json({"deleted": vs.delete(ids, catalog=query.get("catalog", "default"))})
        raise HttpError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no such API: {method} {path}")

    @staticmethod
    def ingest(vs: Client, query: dict[str, str], body: bytes, content_type: str) -> dict:
        """Queue one image (its bytes, `item_id` in the query) or the rows of a CSV (by path) into one
        job: `job_id` adds to a job this page started (the page uploads dropped photos one a request)."""
        catalog, job_id, regions = query.get("catalog", ""), query.get("job_id", ""), query.get("regions", "")
        index = query.get("index", "")
        if not catalog:
            raise bad("no catalog: name the catalog to add to (a new name makes a new catalog)")
        if job_id and not JOB_ID_RE.fullmatch(job_id):
            raise bad(f"job id {job_id[:80]!r} is invalid")
        if not body:
            raise bad("nothing to ingest: send a photo's bytes or a CSV as the body")
        if content_type.split(";")[0].strip().lower() == "text/csv":
            items = csv_items(body)
        elif not query.get("item_id"):
            raise bad("no item id: pass item_id with a photo (or send a CSV as text/csv)")
        else:
            items = [gateway_pb2.IngestItem(item_id=query["item_id"], image=body)]
        for start in range(0, len(items), CSV_BATCH):
            try:
                job_id = vs.ingest(items[start:start + CSV_BATCH], catalog=catalog, job_id=job_id,
                                   regions=regions, index=index).job_id
            except grpc.RpcError as exc:
                if not start:
                    raise
                raise HttpError(HTTP_OF.get(exc.code(), HTTPStatus.BAD_GATEWAY), exc.code().name,
                                f"{exc.details()} (rows {start + 1} to {len(items)} were not queued; the first "
                                f"{start} are in job {job_id})") from None
        return {"job_id": job_id, "accepted": len(items), "catalog": catalog}

    @staticmethod
    def _item_ids(body: bytes) -> list[str]:
        try:
            ids = json.loads(body).get("item_ids") if body else None
        except (ValueError, AttributeError):
            ids = None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise bad('send {"item_ids": ["an id", ...]} as the body')
        if len(ids) > MAX_DELETE:
            raise bad(f"{len(ids)} item ids in one delete; the limit is {MAX_DELETE}")
        return ids

    @staticmethod
    def _json(obj) -> tuple[HTTPStatus, str, bytes, dict]:
        return HTTPStatus.OK, "application/json", json.dumps(obj).encode(), {"Cache-Control": "no-store"}


def make_handler(console: Console):
    class Handler(BaseHTTPRequestHandler):
        server_version = "visearch-console"
        protocol_version = "HTTP/1.1"
        # A connection idle (or sending) this long is closed: idle keep-alive connections cannot
        # hold the server's threads.
        timeout = console.s.idle_timeout_seconds

        def handle_one_request(self):
            # And one request, trickled in a byte at a time, gets this long in all (headers, body,
            # answer): then its connection is shut.
            timer = threading.Timer(console.s.request_deadline_seconds, self._cut)
            timer.daemon = True
            timer.start()
            try:
                super().handle_one_request()
            finally:
                timer.cancel()

        def _cut(self) -> None:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def log_message(self, fmt, *args):  # structured, through logging
            log.info("http", extra={"method": self.command, "path": self.path.split("?")[0],
                                    "status": getattr(self, "_status", 0)})

        def _send(self, status: HTTPStatus, ctype: str, body: bytes, extra: dict | None = None) -> None:
            self._status = int(status)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in {**HEADERS, **(extra or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: HTTPStatus, code: str, message: str) -> None:
            # A body we may not have read must not be parsed as the next request.
            self.close_connection = True
            self._send(status, "application/json", json.dumps({"error": {"code": code, "message": message}}).encode())

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                n = self._content_length()
                if n and method != "POST":  # never left unread, to be parsed as the next request
                    raise HttpError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"a {method} request has no body")
                if url.path.startswith("/api/"):
                    body = None
                    if method == "POST":
                        if n > console.s.max_upload_bytes:
                            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "INVALID_ARGUMENT",
                                            f"a body of {n} bytes; the limit is {console.s.max_upload_bytes}")
                        try:
                            body = self.rfile.read(n)
                        except TimeoutError:
                            raise HttpError(HTTPStatus.REQUEST_TIMEOUT, "DEADLINE_EXCEEDED",
                                            "the body did not arrive in time") from None
                        if len(body) != n:
                            raise HttpError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                                            f"the body ended after {len(body)} of {n} bytes")
                    auth = self.headers.get("Authorization", "")
                    key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
                    self._send(*console.api(method, url.path, query, key, body,
                                            self.headers.get("Content-Type", "")))
                elif method == "GET" and url.path == "/healthz":
                    ok = console.healthy()
                    self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, "text/plain",
                               b"ok" if ok else b"gateway not serving")
                elif method == "GET" and url.path in ("/", "/jobs", "/catalog"):
                    self._static("index.html")
                elif method == "GET" and url.path.startswith("/static/"):
                    self._static(url.path[len("/static/"):])
                else:
                    raise HttpError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"nothing at {url.path}")
            except HttpError as exc:
                self._error(exc.status, exc.code, exc.message)
            except grpc.RpcError as exc:
                self._error(HTTP_OF.get(exc.code(), HTTPStatus.BAD_GATEWAY), exc.code().name, exc.details() or "")
            except ValueError as exc:
                self._error(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug answers 500 with its reason, the server lives on
                log.exception("console error")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "INTERNAL", f"{type(exc).__name__}: {exc}")

        def _content_length(self) -> int:
            """The body's length: exactly one Content-Length, a non-negative integer, and no
            Transfer-Encoding (two framings of one body are how requests are smuggled)."""
            if self.headers.get_all("Transfer-Encoding"):
                raise HttpError(HTTPStatus.NOT_IMPLEMENTED, "INVALID_ARGUMENT",
                                "Transfer-Encoding is not accepted: send Content-Length")
            values = self.headers.get_all("Content-Length") or ["0"]
            if len(values) > 1:
                raise HttpError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"{len(values)} Content-Length headers")
            if not LENGTH_RE.fullmatch(values[0].strip()):
                raise HttpError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"Content-Length {values[0][:40]!r}")
            return int(values[0])

        def _static(self, name: str) -> None:
            try:
                path = (STATIC / name).resolve()
                ok = path.is_relative_to(STATIC.resolve()) and path.suffix in TYPES and path.is_file()
                body = path.read_bytes() if ok else b""
            except (OSError, ValueError):  # a name too long, a NUL byte
                ok = False
            if not ok:
                raise HttpError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no static file {name[:80]!r}")
            self._send(HTTPStatus.OK, TYPES[path.suffix], body, {"Cache-Control": "no-cache"})

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._handle("GET")

        def do_HEAD(self):  # noqa: N802
            self._handle("GET")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

    return Handler


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once: beyond that a connection gets a
    503 at once and is closed, instead of another thread."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n"
                                b"Retry-After: 1\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def main(settings: ConsoleSettings) -> None:
    console = Console(settings)
    server = BoundedServer((settings.host, settings.console_port), make_handler(console), settings.max_connections)

    def stop(*_):
        log.info("stopping")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("console serving", extra={"address": f"http://{settings.host}:{settings.console_port}",
                                       "gateway": settings.gateway_addr})
    server.serve_forever()
    server.server_close()
