"""The `visearch` command: run the local mesh, ingest catalogs, search them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import grpc

from visearch import mesh, meshfiles
from visearch.sdk import ManifestError, hits_json, ingest_rows, read_manifest, search_batch, search_one, wait_job
from visearch.search import INDEX_KINDS, REGION_MODES


def _data_dir(value: str | None) -> Path:
    return Path(value) if value else mesh.default_data_dir()


def _gateway(ctx: click.Context) -> str:
    if ctx.obj.get("gateway"):
        return ctx.obj["gateway"]
    address = meshfiles.gateway_address(ctx.obj["data_dir"])
    if not address:
        raise Failure(f"no mesh is up in {ctx.obj['data_dir']}: run `visearch up` "
                                   "(or pass --gateway / VISEARCH_GATEWAY_ADDR)")
    return address


def _api_key(ctx: click.Context) -> str:
    """VISEARCH_API_KEY, else the admin key `visearch up` wrote into the data dir."""
    return meshfiles.api_key(ctx.obj["data_dir"])


def _client(ctx: click.Context):
    from visearch.client import GatewayClient

    return GatewayClient(_gateway(ctx), key=_api_key(ctx), timeout=ctx.obj["timeout"])


# Exit codes: 0 done, 1 an operational failure or a request refused (one line on stderr: what,
# why, where to look), 2 a usage error, 70 an internal error (a bug: --debug shows the traceback).
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 70


class Failure(click.ClickException):
    """An operational failure, told in one line."""

    def show(self, file=None) -> None:
        click.echo(f"visearch: {self.format_message()}", err=True)


class InternalError(Failure):
    exit_code = EXIT_INTERNAL


def one_line(exc: BaseException) -> Failure:
    """What a person reads for an exception that escaped a command."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else "") or ""
        hint = " (is the mesh up? `visearch status`)" if code == grpc.StatusCode.UNAVAILABLE else ""
        return Failure(f"{code.name if code else 'gRPC error'}: {details.splitlines()[0][:300] if details else ''}{hint}")
    if isinstance(exc, mesh.MeshError):
        return Failure(str(exc).splitlines()[0][:600])
    if isinstance(exc, ModuleNotFoundError):  # a command of the server side run from the SDK-only install
        extra = "train" if (exc.name or "").split(".")[0] in ("torch", "torchvision", "onnx") else "server"
        return Failure(f"{exc}: this command needs the {extra} extra (pip install 'visearch[{extra}]')")
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return Failure(f"{exc.strerror or exc}{where}")
    return InternalError(f"internal error ({type(exc).__name__}: {str(exc)[:200]}); "
                         "run with --debug for the traceback")


# What the services need beyond the SDK (pyproject's `server` extra), by import name.
SERVER_MODULES = ("PIL", "onnxruntime", "cv2", "celery", "redis", "pymilvus", "milvus_lite", "prometheus_client",
                  "grpc_health", "grpc_reflection")


def _server_extra(what: str) -> None:
    """Failure naming the server extra when it is not installed (`pip install visearch` is the client)."""
    import importlib.util

    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise Failure(f"{what}: it needs the server extra (pip install 'visearch[server]'); missing {', '.join(missing)}")


class Commands(click.Group):
    """Every command: an exception that escapes it becomes one line and an exit code, unless --debug."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            raise one_line(exc) from None


@click.group(cls=Commands)
@click.option("--debug", is_flag=True, envvar="VISEARCH_DEBUG", help="Show the traceback of a failure.")
@click.option("--data-dir", envvar="VISEARCH_DATA_DIR", help="Where the local mesh keeps its state and data.")
@click.option("--gateway", envvar="VISEARCH_GATEWAY_ADDR", help="Gateway address (default: the local mesh's).")
@click.option("--timeout", default=60.0, show_default=True, help="Deadline of each call, in seconds.")
@click.pass_context
def main(ctx, debug, data_dir, gateway, timeout):
    """visearch: visual instance search.

    Exit status: 0 done, 1 an operational failure or a refused request (one line: what, why, which
    log), 2 a usage error, 70 an internal error (--debug shows its traceback)."""
    ctx.obj = {"data_dir": _data_dir(data_dir), "gateway": gateway, "timeout": timeout}


@main.command()
@click.option("--ingest-root", "roots", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A folder the gateway may read images from by path (repeatable).")
@click.option("--timeout", "wait", default=180.0, show_default=True, help="Seconds to wait for health.")
@click.option("--replicas", multiple=True, metavar="SERVICE=N",
              help="Run N processes of a service behind one round-robin target (repeatable), e.g. embedding=2.")
@click.option("--workers", default=1, show_default=True, help="Celery ingestion workers.")
@click.pass_context
def up(ctx, roots, wait, replicas, workers):
    """Start Redis, Milvus Lite, every service and a worker; wait until healthy."""
    data_dir = ctx.obj["data_dir"]
    _server_extra("`visearch up` runs the services")
    counts = {}
    for r in replicas:
        name, _, n = r.partition("=")
        if name not in mesh.SERVICES or not n.isdigit() or int(n) < 1:
            raise click.BadParameter(f"{r!r}: expected SERVICE=N with SERVICE one of {', '.join(mesh.SERVICES)}")
        counts[name] = int(n)
    click.echo(f"starting the mesh in {data_dir}", err=True)
    try:
        state = mesh.up(data_dir, ingest_roots=list(roots), timeout=wait, log=lambda m: click.echo(m, err=True),
                        replicas=counts, workers=workers)
    except mesh.MeshError as exc:
        raise Failure(str(exc)) from None
    click.echo(f"gateway: {state['gateway']}")


@main.command()
@click.pass_context
def down(ctx):
    """Stop what `up` started."""
    mesh.down(ctx.obj["data_dir"], log=lambda m: click.echo(m, err=True))


@main.command()
@click.argument("component")
@click.pass_context
def restart(ctx, component):
    """Restart one component of the local mesh by name (`visearch status`): same settings, address, data."""
    try:
        c = mesh.restart(ctx.obj["data_dir"], component)
    except mesh.MeshError as exc:
        raise Failure(str(exc)) from None
    click.echo(f"{component} restarted: pid {c['pid']}, {c['address']}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx, as_json):
    """Each component with its pid, address, health, restarts, last exit and log."""
    comps = mesh.status(ctx.obj["data_dir"])
    rows = [{"name": c["name"], "pid": c["pid"], "address": c["address"], "kind": c["kind"],
             "health": "SERVING" if c["healthy"] else ("NOT_SERVING" if c["running"] else "STOPPED"),
             # running | restarting (exited, the supervisor starts it again) | failed (it kept exiting)
             "state": c.get("state", "running"), "restarts": c.get("restarts", 0), "last_exit": c.get("last_exit"),
             "log": c.get("log", ""),
             **({"metrics": f"http://{c['metrics']}/metrics"} if c.get("metrics") else {})}
            for c in comps]
    sup = mesh.supervisor_status(ctx.obj["data_dir"])
    if as_json:
        click.echo(json.dumps({"data_dir": str(ctx.obj["data_dir"]), "components": rows,
                               **({"supervisor": sup} if sup else {})}, indent=2))
    elif not rows:
        click.echo("mesh is not up")
    else:
        for r in rows:
            extra = f"  {r['restarts']} restarts, last exit {r['last_exit']}" if r["restarts"] or r["state"] != "running" else ""
            click.echo(f"{r['name']:<10} {r['health']:<12} pid {r['pid']:<8} {r['address']}{extra}"
                       + (f"  {r['state'].upper()}: see {r['log']}" if r["state"] == "failed" else ""))
        if sup and not sup["running"]:
            click.echo(f"supervisor not running: nothing restarts a component that exits (log: {sup['log']})")
    if rows and not all(r["health"] == "SERVING" for r in rows):
        sys.exit(1)


@main.command()
@click.option("--manifest", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--catalog", default="default", show_default=True)
@click.option("--wait", is_flag=True, help="Return when the job is done and print the counts.")
@click.option("--by-path", is_flag=True, help="Send paths (inside the gateway's ingest roots), not bytes.")
@click.option("--regions", type=click.Choice(list(REGION_MODES)), default=None,
              help="When this ingest makes the catalog: store each object's base regions for --rerank "
                   "regions|qam, as float32 in the vector store (24.6 KB an object in memory) or as int8 files "
                   "read by key (6.6 KB an object on disk), or not (default: the gateway's, off).")
@click.option("--index", "index_kind", type=click.Choice(list(INDEX_KINDS)), default=None,
              help="When this ingest makes the catalog: its vector index, hnsw (recall@10 0.9995 at 1M), ivf_sq8 "
                   "(8-bit codes: 230 B a row in memory against HNSW's 653; recall about 0.98) or flat (exact, for "
                   "small catalogs); default: the gateway's, "
                   "hnsw. docs/CAPACITY.md measures them.")
@click.option("--duplicates", type=click.Choice(["off", "report", "skip"]), default="off", show_default=True,
              help="Check each item against the catalog's stored items for the same picture (re-encoded, resized, "
                   "cropped a little): list them in the job (report), or also leave them out (skip).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ingest(ctx, manifest, catalog, wait, by_path, regions, index_kind, duplicates, as_json):
    """Queue the images of a CSV manifest (item_id,path) for ingestion."""
    try:
        rows = read_manifest(manifest)
    except ManifestError as exc:
        raise Failure(str(exc)) from None
    with _client(ctx) as client:
        try:
            job_id, local_failed = ingest_rows(client, rows, catalog, by_path, regions or "",
                                               "" if duplicates == "off" else duplicates, index_kind or "")
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None
        out = {"job_id": job_id, "catalog": catalog, "submitted": len(rows)}
        if wait and job_id:
            job = wait_job(client, job_id, len(rows) - len(local_failed), quiet=as_json)
            failures = {f.item_id: f.reason for f in job.failures} | local_failed
            out.update(ok=job.done, failed=job.failed + len(local_failed), failures=failures)
            if duplicates != "off":
                out["duplicates"] = {d.item_id: {"of": d.of_item_id, "skipped": d.skipped} for d in job.duplicates}
        elif local_failed:
            out.update(failed_locally=local_failed)
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"job {job_id}: {len(rows)} submitted to catalog {catalog!r}")
        if "ok" in out:
            click.echo(f"ok {out['ok']}, failed {out['failed']}")
            for item_id, reason in sorted(out["failures"].items()):
                click.echo(f"  failed {item_id}: {reason}")
            for item_id, d in sorted(out.get("duplicates", {}).items()):
                click.echo(f"  {item_id} is the same picture as {d['of']}{' (skipped)' if d['skipped'] else ''}")


@main.command()
@click.argument("job_id")
@click.option("--wait", is_flag=True)
@click.pass_context
def job(ctx, job_id, wait):
    """An ingestion job's counts and failures, as JSON."""
    from google.protobuf.json_format import MessageToDict

    with _client(ctx) as client:
        try:
            j = wait_job(client, job_id, client.job(job_id).submitted, quiet=True) if wait else client.job(job_id)
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None
    click.echo(json.dumps(MessageToDict(j, always_print_fields_with_no_presence=True)))


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--catalog", default="default", show_default=True)
@click.option("--top-k", default=10, show_default=True)
@click.option("--rerank", default="", help="none|regions|qam|qe|verify (default: the service's).")
@click.option("--filter", "filters", multiple=True, help="key=value on item metadata (repeatable).")
@click.option("--full-frame", is_flag=True, help="Search with the whole photo, not the detected object.")
@click.option("--per-object", is_flag=True, help="Also search with each object detected in the photo (\"objects\").")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def search(ctx, images, catalog, top_k, rerank, filters, full_frame, per_object, as_json):
    """Search a catalog with each image; one JSON object per image, in order."""
    flt = dict(f.split("=", 1) for f in filters)
    failed = 0
    with _client(ctx) as client:
        # Several photos go as BatchSearch calls (64 a call, forwards batched server-side); one, or
        # --per-object, as Search.
        batched = len(images) > 1 and not per_object
        answers = (search_batch(client, list(images), catalog, top_k, rerank, flt, full_frame) if batched
                   else (search_one(client, p, catalog, top_k, rerank, flt, full_frame, per_object) for p in images))
        for path, out in zip(images, answers, strict=True):
            failed += "error" in out
            if as_json:
                click.echo(json.dumps(out))
            elif "error" in out:
                click.echo(f"{path}: {out['error']['code']}: {out['error']['message']}")
            else:
                click.echo(f"{path} ({out['latency_ms']:.0f} ms)")
                for rank, h in enumerate(out["hits"], 1):
                    click.echo(f"  {rank:>3}. {h['item_id']}  {h['score']:.4f}")
                for o in out.get("objects", []):
                    click.echo(f"  object {o['label']} {o['score']:.2f} at {[round(v) for v in o['query_box']]}: "
                               + ", ".join(f"{h['item_id']} {h['score']:.3f}" for h in o["hits"][:3]))
    if failed == len(images):
        sys.exit(1)


@main.command()
@click.argument("item_id")
@click.option("--catalog", default="default", show_default=True)
@click.option("--top-k", default=10, show_default=True)
@click.option("--rerank", default="", help="none|qe|verify (default: the service's).")
@click.option("--filter", "filters", multiple=True, help="key=value on item metadata (repeatable).")
@click.option("--full-frame", is_flag=True, help="Search with the item's full frame only, not its detected object.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def similar(ctx, item_id, catalog, top_k, rerank, filters, full_frame, as_json):
    """Items like one already in the catalog ("more like this"): its stored vectors and local features
    are the query, nothing is uploaded or embedded again, and the item itself is left out."""
    flt = dict(f.split("=", 1) for f in filters)
    with _client(ctx) as client:
        t0 = time.perf_counter()
        try:
            resp = client.similar(item_id, catalog=catalog, top_k=top_k, rerank=rerank, filters=flt,
                                  full_frame=full_frame)
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None
    out = {"item_id": item_id, "hits": hits_json(resp.hits), "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
           "model": f"{resp.model.name}:{resp.model.version}", "rerank": resp.rerank}
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"like {item_id} ({out['latency_ms']:.0f} ms)")
        for rank, h in enumerate(out["hits"], 1):
            click.echo(f"  {rank:>3}. {h['item_id']}  {h['score']:.4f}" + ("  match" if h["match"] else ""))


@main.command()
@click.argument("item_ids", nargs=-1, required=True)
@click.option("--catalog", default="default", show_default=True)
@click.pass_context
def delete(ctx, item_ids, catalog):
    """Delete items from a catalog."""
    with _client(ctx) as client:
        try:
            n = client.delete(list(item_ids), catalog=catalog)
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None
    click.echo(json.dumps({"deleted": n}))


@main.command("duplicates")
@click.option("--catalog", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def duplicates_cmd(ctx, catalog, as_json):
    """Groups of items whose images are the same picture (re-encoded, resized, cropped a little):
    docs/DUPLICATES.md."""
    with _client(ctx) as client:
        try:
            r = client.duplicates(catalog, timeout=max(ctx.obj["timeout"], 600.0))
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None
    out = {"catalog": catalog, "groups": [list(g.item_ids) for g in r.groups],
           "min_ncc": [round(g.min_ncc, 4) for g in r.groups], "items": r.items, "pairs_checked": r.pairs_checked,
           "unreadable": list(r.unreadable)}
    if as_json:
        click.echo(json.dumps(out))
        return
    for g in out["groups"]:
        click.echo(" ".join(g))
    click.echo(f"{len(out['groups'])} groups of the same picture among {r.items} items ({r.pairs_checked} pairs "
               f"checked{f', {len(r.unreadable)} images unreadable' if r.unreadable else ''})", err=True)


@main.command("backup")
@click.option("--catalog", required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A new (or empty) folder: manifest.json and the checksummed record files.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def backup_cmd(ctx, catalog, out, as_json):
    """Write everything a catalog holds (vectors, boxes, metadata, sources, local features, regions,
    its model version) to a folder, checksummed: docs/BACKUP.md."""
    from visearch import backup

    def progress(done: int, total: int) -> None:
        if not as_json:
            click.echo(f"\r{done}/{total} objects", nl=False, err=True)

    with _client(ctx) as client:
        try:
            manifest = client.backup(catalog, out, progress)
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None
        except backup.BackupError as exc:
            raise Failure(str(exc)) from None
    if as_json:
        click.echo(json.dumps(manifest))
    else:
        m = manifest["model"]
        click.echo(f"\rcatalog {catalog!r}: {manifest['objects']} objects of {manifest['items']} items, model "
                   f"{m['name']}:{m['version']}, in {out} ({len(manifest['files'])} files, sha256 in manifest.json)")


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--catalog", required=True, help="The catalog to make (it must not exist).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def restore(ctx, folder, catalog, as_json):
    """Bring a backup back as a new catalog, without re-embedding (its checksums checked first)."""
    from visearch import backup

    with _client(ctx) as client:
        try:
            r = client.restore(folder, catalog)
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None
        except backup.BackupError as exc:
            raise Failure(str(exc)) from None
    out = {"catalog": r.catalog, "objects": r.objects, "items": r.items, "generation": r.generation,
           "model": f"{r.model.name}:{r.model.version}"}
    click.echo(json.dumps(out) if as_json else f"restored catalog {r.catalog!r}: {r.objects} objects of {r.items} "
               f"items, model {out['model']}")


@main.command()
@click.argument("item_id")
@click.option("--catalog", default="default", show_default=True)
@click.pass_context
def get(ctx, item_id, catalog):
    """An item's stored objects and metadata, as JSON."""
    from google.protobuf.json_format import MessageToDict

    with _client(ctx) as client:
        try:
            item = client.get(item_id, catalog=catalog)
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None
    click.echo(json.dumps(MessageToDict(item)))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per catalog (the only output form).")
@click.pass_context
def catalogs(ctx, as_json):
    """Catalogs with their object counts, model, generation (and one being built, if any), storage
    and bytes per object (memory_bytes_per_object: what the vector store holds in memory to search
    it; bytes_per_object: everything stored per object, local features included)."""
    with _client(ctx) as client:
        for c in client.catalogs():
            row = {"name": c.name, "objects": c.objects, "model": f"{c.model.name}:{c.model.version}",
                   "dim": c.model.dim, "generation": c.generation, "regions": c.storage.regions,
                   "index": c.storage.index or "hnsw",
                   "memory_bytes_per_object": c.memory_bytes_per_object, "bytes_per_object": c.bytes_per_object}
            if c.building_generation:
                row["building"] = {"generation": c.building_generation, "objects": c.building_objects,
                                   "model": f"{c.building_model.name}:{c.building_model.version}"}
            click.echo(json.dumps(row))


def _wait_switched(client, job_id: str, as_json: bool) -> dict:
    """Wait for a re-embedding (or an adaptation, which ends as one), a line on stderr when its phase
    or counts change (the phase's message too, the first time), unless `as_json`; the job as a dict."""
    from google.protobuf.json_format import MessageToDict

    last: list = [None]

    def progress(job):
        now = (job.phase, job.done + job.failed, job.submitted)
        if now != last[0] and not as_json:
            said = f" ({job.message})" if job.message and (last[0] is None or job.phase != last[0][0]) else ""
            click.echo(f"  {job.phase}: {job.done + job.failed}/{job.submitted}{said}", err=True)
        last[0] = now

    return MessageToDict(client.wait(job_id, on_progress=progress), always_print_fields_with_no_presence=True)


def _end_switched(out: dict, wait: bool, as_json: bool) -> None:
    """Print the command's result; exit 1 when it waited and the catalog did not switch."""
    if as_json:
        click.echo(json.dumps(out))
    elif "job" in out:
        click.echo(f"{out['job']['phase']}: {out['job']['message']}")
    if wait and out["job"]["phase"] != "switched":
        sys.exit(1)


@main.command()
@click.option("--catalog", default="default", show_default=True)
@click.option("--model-version", default="", help="Embedding model version to re-embed with (default: the served one).")
@click.option("--wait", is_flag=True, help="Return when the catalog has switched (or the job failed).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def reembed(ctx, catalog, model_version, wait, as_json):
    """Re-embed a catalog with another model version, blue/green: searches keep working on the current
    generation while the new one is built through the queue, then the catalog switches at once."""
    with _client(ctx) as client:
        try:
            res = client.reembed(catalog, model_version)
            out = {"job_id": res.job_id, "catalog": catalog, "generation": res.generation,
                   "model": f"{res.model.name}:{res.model.version}"}
            if not as_json:
                click.echo(f"job {res.job_id}: re-embedding {catalog!r} into generation {res.generation} "
                           f"with {out['model']}", err=True)
            if wait:
                out["job"] = _wait_switched(client, res.job_id, as_json)
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None
    _end_switched(out, wait, as_json)


@main.command()
@click.option("--catalog", default="default", show_default=True)
@click.option("--views", default=0, help="Made-up views per object (0: the default, 4).")
@click.option("--max-objects", default=0, help="Objects of the catalog to adapt to (0: the default, 5000).")
@click.option("--wait", is_flag=True, help="Return when the catalog has switched to its adapted version (or the job failed).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def adapt(ctx, catalog, views, max_objects, wait, as_json):
    """Adapt a catalog's descriptor to its own images, without labels (docs/ADAPT.md): made-up views of
    its objects teach a projection (learned whitening) that becomes a model version of this catalog
    alone, and the catalog is re-embedded into it blue/green. Progress like any job."""
    with _client(ctx) as client:
        try:
            res = client.adapt(catalog, views, max_objects)
            out = {"job_id": res.job_id, "catalog": catalog}
            if not as_json:
                click.echo(f"job {res.job_id}: adapting {catalog!r}", err=True)
            if wait:
                out["job"] = _wait_switched(client, res.job_id, as_json)
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None
    _end_switched(out, wait, as_json)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image (line), boxes in original pixels.")
@click.option("--min-score", default=0.0, help="Drop boxes scoring below this (0: the service default, 0.3).")
@click.option("--max-detections", default=0, help="At most this many boxes per image (0: the default, 10).")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model repository (default: the project's model_repository/).")
def detect(images, as_json, min_score, max_detections, repo):
    """Find the objects in images with the served detector (run here, same code as the detection service).

    Prints {"image": PATH, "boxes": [{"box": [x1, y1, x2, y2], "score": S, "label": L}, ...]} per image,
    best first, in pixels of the original image (EXIF orientation applied). An image that cannot be
    read prints {"image": PATH, "error": REASON} and the exit status is 1.
    """
    from visearch.detection_model import DetectionModel, run_local
    from visearch.settings import DetectionSettings

    kw = {"model_repository": repo} if repo else {}
    settings = DetectionSettings(detection_port=0, **kw)
    failed = False
    for path, result in run_local(DetectionModel, settings, list(images), min_score, max_detections):
        if isinstance(result, str):
            failed = True
            row = {"image": str(path), "error": result}
        else:
            row = {"image": str(path), "boxes": [{"box": [round(v, 1) for v in b.xyxy], "score": round(b.score, 4),
                                                  "label": b.label} for b in result]}
        if as_json:
            click.echo(json.dumps(row))
        elif "error" in row:
            click.echo(f"{path}: error: {row['error']}")
        else:
            click.echo(f"{path}: {len(row['boxes'])} object(s)")
            for b in row["boxes"]:
                click.echo(f"  {b['label']:<12} {b['score']:.3f}  [{', '.join(f'{v:.0f}' for v in b['box'])}]")
    if failed:
        sys.exit(1)


@main.group()
def models():
    """Served models."""


@models.command("build")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model repository (default: the project's model_repository/).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Serve this training checkpoint as the embedder (runs/NAME/best.pt).")
@click.option("--off-the-shelf", "off_the_shelf", is_flag=True,
              help="Serve the ImageNet backbone without fine-tuning (no dataset needed).")
@click.option("--retrain", is_flag=True, help="Train the default recipe again even if runs/ holds its checkpoint.")
@click.option("--reduce-dim", type=click.IntRange(min=0), default=128, show_default=True,
              help="PCA dimension of the fine-tuned embedder's next version, served by default (0: none).")
def models_build(repo, checkpoint, off_the_shelf, retrain, reduce_dim):
    """Rebuild every served ONNX model and its meta record (needs the train extra).

    The embedder is the fine-tuned default (configs/default.json, trained on the grocery
    train photos when runs/ does not already hold that exact run: about 5 minutes on 2
    cores), else the off-the-shelf model when the dataset is missing or --off-the-shelf. The
    detector is the COCO SSD-MobileNetV2 converted from its frozen graph (version 1) and the
    class-agnostic detector fine-tuned on composited scenes (version 2, trained when runs/detector
    lacks it, about 15 minutes; not with --off-the-shelf). A fine-tuned embedder is followed by
    its PCA to --reduce-dim dimensions as the next version (`visearch models reduce`).
    """
    if checkpoint and off_the_shelf:
        raise click.UsageError("--checkpoint and --off-the-shelf exclude each other")
    try:
        from visearch.building import build_all
        from visearch.training.default import default_checkpoint
    except ImportError as exc:
        raise Failure(f"building models needs the train extra (torch): {exc}") from None
    from visearch.settings import DEFAULT_MODEL_REPOSITORY

    progress = lambda m: click.echo(m, err=True)  # noqa: E731
    if not checkpoint and not off_the_shelf:
        checkpoint = default_checkpoint(progress=progress, retrain=retrain)
        if checkpoint is None:
            progress("serving the off-the-shelf embedder")
    for record in build_all(repo or DEFAULT_MODEL_REPOSITORY, progress=progress, checkpoint=checkpoint,
                            off_the_shelf=off_the_shelf, reduce_dim=reduce_dim, retrain=retrain):
        click.echo(json.dumps(record))


@models.command("pack")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the packs and their SHA256SUMS (default: the project's params/).")
def models_pack(out):
    """Pack the trained parameters of the default recipes for the repository (needs the train extra).

    Writes embedder.npz from runs/<default>/best.pt and detector.npz from runs/detector/best.pt:
    only what training changed, int8 per output channel (visearch.training.params), with their
    sha256 in SHA256SUMS; then embedder-pca128.npz, the served PCA basis fitted on the model
    exported from that embedder.npz (a few minutes: it embeds every fit photo). A first
    `visearch models build` unpacks them instead of training and fitting; `visearch models build
    --retrain && visearch models pack` makes them again.
    """
    try:
        from visearch.training import default, detector
        from visearch.training.params import PARAMS_DIR, checkpoint_meta
        from visearch.training.train import load_config
    except ImportError as exc:
        raise Failure(f"packing models needs the train extra (torch): {exc}") from None
    out = out or PARAMS_DIR
    cfg = load_config(default.DEFAULT_CONFIG)
    sources = [(default.pack, default.DEFAULT_RUNS / cfg.name / "best.pt", out / default.PACK),
               (detector.pack, default.DEFAULT_RUNS / "detector" / "best.pt", out / detector.PACK)]
    for _, checkpoint, _ in sources:
        if not checkpoint.is_file():
            raise Failure(f"no checkpoint {checkpoint}: run `visearch models build` (or --retrain) first")
    if not default.reusable(sources[0][1], cfg):
        raise Failure(f"{sources[0][1]} was not trained by {default.DEFAULT_CONFIG}: run `visearch models build --retrain`")
    for _, checkpoint, _ in sources:
        if "unpacked_from" in checkpoint_meta(checkpoint):
            raise Failure(f"{checkpoint} was written from a pack, not trained: run `visearch models build --retrain` "
                          "to train it before packing")
    for pack, checkpoint, dest in sources:
        digest, n = pack(checkpoint, dest)
        click.echo(json.dumps({"pack": str(dest), "from": str(checkpoint), "tensors": n,
                               "bytes": dest.stat().st_size, "sha256": digest}))
    # The served PCA basis, fitted on the model a first build exports from the pack just written.
    dest, digest = default.pack_pca(out / default.PACK, cfg, out, progress=lambda m: click.echo(m, err=True))
    click.echo(json.dumps({"pack": str(dest), "from": f"the PCA of the model exported from {out / default.PACK}",
                           "bytes": dest.stat().st_size, "sha256": digest}))


@models.command("reduce")
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Model repository (default: the project's model_repository/).")
@click.option("--dim", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--source-version", type=click.IntRange(min=1), default=None,
              help="Embedder version to reduce (default: the newest one that is not a reduction).")
@click.option("--whitening-power", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="0: PCA projection only (kept the mAP here); 1: full PCA whitening.")
@click.option("--fit-photos", type=click.IntRange(min=0), default=0,
              help="Fit on this many grocery train photos spread over the split (0: all of them).")
def models_reduce(repo, dim, source_version, whitening_power, fit_photos):
    """Write the embedder's next version: PCA of its descriptor in the graph (no torch needed).

    Fitted on the grocery train photos; served by default as the newest version; catalogs keep
    the version that made them until `visearch reembed --catalog NAME` (docs/PERFORMANCE.md).
    """
    from visearch.modeling.reduce import default_fit_paths, reduce_embedder
    from visearch.settings import DEFAULT_MODEL_REPOSITORY

    fit = None
    if fit_photos:
        train = default_fit_paths()
        fit = train[:: max(1, len(train) // fit_photos)][:fit_photos]
    try:
        meta = reduce_embedder(repo or DEFAULT_MODEL_REPOSITORY, "embedder", source_version, dim, whitening_power,
                               fit_paths=fit, progress=lambda m: click.echo(m, err=True))
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise Failure(str(exc)) from None
    click.echo(json.dumps({k: meta[k] for k in ("name", "version", "id", "dim", "reduction")}))


def _delegate(module: str, what: str):
    """A command whose options belong to a torch-side module (`main(argv) -> int`), imported only when run."""

    @click.pass_context
    def run(ctx, args):
        import importlib

        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise Failure(f"{what} needs the train extra (torch): {exc}") from None
        sys.exit(mod.main(list(args)))

    return run


for _name, _module, _help in (
    ("train", "visearch.training.cli", "Train a descriptor model (`visearch train --help`)."),
    ("export", "visearch.training.export", "Export a checkpoint to the model repository as ONNX."),
    ("eval", "visearch.evaluation.cli", "Run the retrieval protocols; write tables, curves, example grids."),
):
    main.command(_name, help=_help, add_help_option=False,
                 context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(
        click.argument("args", nargs=-1, type=click.UNPROCESSED)(_delegate(_module, _name)))


@main.command()
@click.option("--port", default=8080, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.pass_context
def console(ctx, port, host):
    """Serve the web console for the local mesh's gateway (until Ctrl-C); prints its address with the
    admin key in the fragment (#key=..., kept in the browser tab, never sent in a URL to the server)."""
    from services.console.server import main as serve_console
    from visearch.settings import ConsoleSettings

    settings = ConsoleSettings(console_port=port, host=host, gateway_addr=_gateway(ctx))
    key = _api_key(ctx)
    click.echo(f"http://{host}:{port}/" + (f"#key={key}" if key else ""), err=True)
    serve_console(settings)


@main.command()
@click.option("--catalog", default="demo", show_default=True)
@click.option("--queries", default=0, help="Search with only this many query photos (0: all).")
@click.option("--keep-up", is_flag=True, help="Leave the mesh running afterwards.")
@click.pass_context
def demo(ctx, catalog, queries, keep_up):
    """Up, ingest a real-photo sample catalog, search it, print results and metrics."""
    from visearch.demo import run_demo

    run_demo(ctx.obj["data_dir"], catalog=catalog, n_queries=queries, keep_up=keep_up, timeout=ctx.obj["timeout"])


@main.command()
@click.option("--catalog", default="default", show_default=True)
@click.option("--page-size", default=100, show_default=True, help="Items per ListItems call.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per item: item_id, metadata, objects.")
@click.pass_context
def items(ctx, catalog, page_size, as_json):
    """Every item of a catalog, in item-id order (ListItems, page by page)."""
    with _client(ctx) as client:
        try:
            for it in client.items(catalog, page_size):
                if as_json:
                    click.echo(json.dumps({"item_id": it.item_id, "metadata": dict(it.metadata),
                                           "objects": len(it.objects)}))
                else:
                    click.echo(it.item_id)
        except grpc.RpcError as exc:
            raise Failure(f"{exc.code().name}: {exc.details()}") from None


if __name__ == "__main__":
    main()
