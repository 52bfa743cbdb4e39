"""A worker killed with SIGKILL mid-job: nothing is lost and nothing is duplicated."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Proc, wait_until
from tests.test_mesh import cli
from visearch.demo import write_manifest
from visearch.jobs import Jobs
from visearch.mesh import alive, load_state

pytestmark = pytest.mark.mesh


def test_killed_worker_loses_and_duplicates_nothing(tmp_path, model_repo, grocery):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    # A short visibility timeout so the dead worker's unacknowledged batch comes back within seconds.
    env.update(VISEARCH_DATA_DIR=str(tmp_path / "mesh"), VISEARCH_MODEL_REPOSITORY=str(model_repo),
               VISEARCH_VISIBILITY_TIMEOUT="6", VISEARCH_INGEST_BATCH="8")
    cli(env, "up")
    replacement = None
    try:
        photos = [p for p in grocery["train"] if p.is_product][:160]
        manifest = write_manifest(photos, tmp_path / "m.csv")
        job_id = json.loads(cli(env, "ingest", "--manifest", str(manifest), "--catalog", "crash", "--json").stdout)["job_id"]
        state = load_state(Path(env["VISEARCH_DATA_DIR"]))
        comps = {c["name"]: c for c in state["components"]}
        jobs = Jobs.from_url(comps["redis"]["address"], 60)
        wait_until(lambda: jobs.status(job_id).done >= 16, 120, "first batches stored")
        worker = comps["worker"]["pid"]
        os.killpg(worker, signal.SIGKILL)  # the main process and its pool child, mid-batch
        wait_until(lambda: not alive(worker), 10, "worker gone")
        killed_at = jobs.status(job_id)
        assert killed_at.pending > 0, "the kill must land while work is left"

        wenv = dict(env, VISEARCH_REDIS_URL=comps["redis"]["address"], VISEARCH_MILVUS_URI=comps["milvus"]["address"],
                    VISEARCH_DETECTION_ADDR=comps["detection"]["address"],
                    VISEARCH_EMBEDDING_ADDR=comps["embedding"]["address"])
        replacement = Proc([sys.executable, "-m", "services.worker"], tmp_path / "worker2.log", wenv)
        wait_until(lambda: jobs.status(job_id).finished, 240, "job finished after the crash", replacement.p,
                   replacement.log)
        st = jobs.status(job_id)
        assert (st.submitted, st.done, st.failed) == (160, 160, 0), st
        objects = {c["name"]: c["objects"] for c in map(json.loads, cli(env, "catalogs").stdout.splitlines())}
        assert objects["crash"] == 160, "every item exactly once"
    finally:
        if replacement:
            replacement.p.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            replacement.stop()
        cli(env, "down", check=False)
