"""Step 6 of the cloud: the HTTP API. Roles on every route (no token 401, wrong role 403), the annotation
flow end to end, health/readiness/metrics, and Schemathesis against the OpenAPI document (no 5xx)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cloud_api.devsim import make_crop, random_jpeg
from cloud_api.main import create_app
from shelfloop import contract as c
from shelfloop.broker import free_port
from shelfloop.settings import Settings
from shelfloop.sim.catalogue import make_catalogue

ROLES = ("annotator", "reviewer", "merchandiser", "admin")
PASSWORD = "correct horse battery"


def make_settings(tmp_path: Path, **cloud: Any) -> Settings:
    return Settings(
        database={"url": f"sqlite:///{tmp_path / 'api.db'}"},
        storage={"backend": "local", "local_dir": tmp_path / "objects"},
        cloud={"bootstrap_admin": "root", "bootstrap_admin_password": PASSWORD, "json_logs": False, **cloud},
    )


class Api:
    """A test client plus a bearer token per role."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.client = TestClient(app)
        self.tokens: dict[str, str] = {"admin": self.login("root")}
        for role in ROLES[:-1]:
            r = self.client.post(
                "/users",
                json={"username": role, "password": PASSWORD, "role": role},
                headers=self.auth("admin"),
            )
            assert r.status_code == 201, r.text
            self.tokens[role] = self.login(role)

    def login(self, username: str) -> str:
        r = self.client.post("/auth/token", json={"username": username, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def call(self, method: str, path: str, role: str | None = None, **kw: Any) -> Any:
        headers = self.auth(role) if role else {}
        return self.client.request(method, path, headers=headers, **kw)

    @property
    def services(self) -> Any:
        return self.app.state.services


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    app = create_app(make_settings(tmp_path))
    yield Api(app)
    app.state.services.db.dispose()


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One app for the read-mostly tests (argon2 makes logging in every role per test slow)."""
    app = create_app(make_settings(tmp_path_factory.mktemp("shared")))
    yield Api(app)
    app.state.services.db.dispose()


# Every route that needs a role: (method, path template, the roles that may call it besides admin).
PROTECTED = [
    ("GET", "/auth/me", {"annotator", "reviewer", "merchandiser"}),
    ("POST", "/users", set()),
    ("GET", "/users", set()),
    ("GET", "/catalogue/skus", {"annotator", "reviewer", "merchandiser"}),
    ("GET", "/catalogue/skus/x", {"annotator", "reviewer", "merchandiser"}),
    ("PUT", "/catalogue/skus/x", {"merchandiser"}),
    ("POST", "/catalogue/skus/x/variants", {"merchandiser"}),
    ("POST", "/catalogue/skus/x/images", {"merchandiser"}),
    ("POST", "/catalogue/import", {"merchandiser"}),
    ("POST", "/catalogue/import.csv", {"merchandiser"}),
    ("GET", "/catalogue/export", {"annotator", "reviewer", "merchandiser"}),
    ("GET", "/catalogue/export.csv", {"annotator", "reviewer", "merchandiser"}),
    ("GET", "/catalogue/events", {"merchandiser"}),
    ("GET", "/stores", set()),
    ("PUT", "/stores/s1", set()),
    ("GET", "/devices", set()),
    ("POST", "/devices", set()),
    ("DELETE", "/devices/s1/d1", set()),
    ("POST", "/devices/sync", set()),
    ("POST", "/queue/claim", {"annotator", "reviewer"}),
    ("POST", "/queue/tasks/1/complete", {"annotator", "reviewer"}),
    ("POST", "/queue/tasks/1/extend", {"annotator", "reviewer"}),
    ("GET", "/queue/review", {"reviewer"}),
    ("POST", "/queue/tasks/1/review", {"reviewer"}),
    ("POST", "/queue/tasks/1/requeue", set()),
    ("POST", "/queue/gold", {"reviewer"}),
    ("GET", "/queue/stats", {"reviewer"}),
    ("GET", "/queue/stats/annotators", {"reviewer"}),
    ("GET", "/queue/stats/agreement", {"reviewer"}),
    ("GET", "/dead-letters", set()),
    ("GET", "/dead-letters/1", set()),
    ("GET", "/dead-letters/1/payload", set()),
    ("POST", "/dead-letters/1/replay", set()),
    ("GET", "/crops/01ABCDEFGH", {"annotator", "reviewer"}),
    ("GET", "/crops/01ABCDEFGH/image", {"annotator", "reviewer"}),
    ("GET", "/reports/stores", {"merchandiser"}),
    ("GET", "/reports/stores/s1", {"merchandiser"}),
    ("GET", "/reports/stores/s1/bays/x", {"merchandiser"}),
    ("GET", "/reports/tasks", {"merchandiser"}),
    ("GET", "/reports/tasks.csv", {"merchandiser"}),
    ("GET", "/reports/slots.csv", {"merchandiser"}),
    ("GET", "/reports/aggregates", {"merchandiser"}),
    ("GET", "/reports/trends", {"merchandiser"}),
    ("GET", "/reports/snapshots/x/image", {"merchandiser"}),
]
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/auth/token")}


def test_every_route_is_in_the_role_table(api: Api) -> None:
    documented = {
        (method.upper(), path) for path, ops in api.app.openapi()["paths"].items() for method in ops
    }
    listed = {(m_, re.sub(r"/(x|s1|d1|1|01ABCDEFGH)(?=/|$)", "/{}", p)) for m_, p, _ in PROTECTED}
    normalised = {(m_, re.sub(r"\{[a-z_]+\}", "{}", p)) for m_, p in documented}
    assert normalised - PUBLIC == listed


def test_no_token_is_401_and_wrong_role_is_403(shared_api: Api) -> None:
    api = shared_api
    wrong: list[tuple[str, str, str, int]] = []
    for method, path, allowed in PROTECTED:
        r = api.call(method, path)
        if r.status_code != 401 or r.headers.get("www-authenticate") != "Bearer":
            wrong.append((method, path, "no token", r.status_code))
        bad = api.client.request(method, path, headers={"Authorization": "Bearer nope"}).status_code
        if bad != 401:
            wrong.append((method, path, "bad token", bad))
        for role in ROLES:
            status = api.call(method, path, role, json={}).status_code
            permitted = role == "admin" or role in allowed
            if (permitted and status in (401, 403)) or (not permitted and status != 403):
                wrong.append((method, path, role, status))
    assert wrong == []


def test_wrong_password_is_401_and_users_are_unique(shared_api: Api) -> None:
    api = shared_api
    assert api.client.post("/auth/token", json={"username": "root", "password": "nope"}).status_code == 401
    assert api.client.post("/auth/token", json={"username": "ghost", "password": "nope"}).status_code == 401
    dup = api.call(
        "POST", "/users", "admin", json={"username": "annotator", "password": PASSWORD, "role": "admin"}
    )
    assert dup.status_code == 409
    assert api.call("GET", "/auth/me", "reviewer").json()["role"] == "reviewer"


def test_health_readiness_and_metrics(shared_api: Api) -> None:
    api = shared_api
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "storage": "ok"}
    api.client.get("/catalogue/skus")
    text = api.client.get("/metrics").text
    assert 'shelfloop_http_requests_total{method="GET",route="/catalogue/skus",status="401"}' in text


def test_catalogue_over_http(api: Api) -> None:
    world = make_catalogue(np.random.default_rng(9), 8, 1, 1, variant_rate=0.5)
    doc = {"catalogue_version": "1", "skus": [s.to_json() for s in world.skus]}
    r = api.call("POST", "/catalogue/import", "merchandiser", json=doc)
    assert r.status_code == 200 and r.json()["created"] == 8
    first = doc["skus"][0]["sku_id"]
    got = api.call("GET", f"/catalogue/skus/{first}", "annotator").json()
    assert got["gtin"] == doc["skus"][0]["gtin"] and got["family"] == doc["skus"][0]["family"]
    found = api.call("GET", "/catalogue/skus", "annotator", params={"q": doc["skus"][0]["brand"]}).json()
    assert first in [x["sku_id"] for x in found]
    put = api.call(
        "PUT", "/catalogue/skus/new-1", "merchandiser", json={"name": "New One", "gtin": "4006381333931"}
    )
    assert put.status_code == 200 and put.json()["status"] == "active"
    bad = api.call(
        "PUT", "/catalogue/skus/new-2", "merchandiser", json={"name": "X", "gtin": "4006381333932"}
    )
    assert bad.status_code == 422
    img = api.client.post(
        "/catalogue/skus/new-1/images",
        content=random_jpeg(),
        headers={**api.auth("merchandiser"), "Content-Type": "image/jpeg"},
    )
    assert img.status_code == 201 and img.json()["object_key"].startswith("catalogue/new-1/")
    notjpeg = api.client.post(
        "/catalogue/skus/new-1/images", content=b"png?", headers=api.auth("merchandiser")
    )
    assert notjpeg.status_code == 422
    csv_text = api.call("GET", "/catalogue/export.csv", "merchandiser").text
    assert csv_text.startswith("sku_id,gtin,name") and "new-1" in csv_text
    edited = csv_text.replace("New One", "New One Renamed")
    r = api.client.post(
        "/catalogue/import.csv",
        content=edited.encode(),
        headers={**api.auth("merchandiser"), "Content-Type": "text/csv"},
    )
    assert r.status_code == 200 and r.json()["updated"] == 1
    events = api.call("GET", "/catalogue/events", "merchandiser").json()
    assert {"create", "update", "image_add", "import"} <= {e["action"] for e in events}


def test_annotation_flow_over_http(api: Api) -> None:
    svc = api.services
    api.call("PUT", "/catalogue/skus/sku-a", "merchandiser", json={"name": "A"})
    crop = make_crop("s1", "d1")
    assert svc.ingestor.handle(c.uplink_topic("s1", "d1", "crop"), c.encode(crop)).status == "stored"
    lease = api.call("POST", "/queue/claim", "annotator").json()
    assert lease["crop_id"] == crop.crop_id and lease["suggestions"][0]["sku_id"] == "sku-a"
    image = api.call("GET", lease["image_url"], "annotator")
    assert (
        image.status_code == 200
        and image.content == crop.jpeg
        and image.headers["content-type"] == "image/jpeg"
    )
    assert api.call("GET", f"/crops/{crop.crop_id}", "annotator").json()["candidates"][1]["sku_id"] == "sku-b"
    assert api.call("POST", "/queue/claim", "reviewer").status_code == 204
    path = f"/queue/tasks/{lease['task_id']}"
    assert api.call("POST", f"{path}/extend", "annotator", json={"token": lease["token"]}).status_code == 200
    stale = api.call(
        "POST", f"{path}/complete", "annotator", json={"token": lease["token"] + 1, "outcome": "skip"}
    )
    assert stale.status_code == 409
    wrong = api.call(
        "POST",
        f"{path}/complete",
        "annotator",
        json={"token": lease["token"], "outcome": "sku", "sku_id": "nope"},
    )
    assert wrong.status_code == 422
    done = api.call(
        "POST",
        f"{path}/complete",
        "annotator",
        json={"token": lease["token"], "outcome": "sku", "sku_id": "sku-a"},
    )
    assert done.status_code == 200 and done.json()["final_label"] == "sku:sku-a"
    assert api.call("GET", "/queue/stats", "reviewer").json()["done"] == 1
    gold = api.call(
        "POST", "/queue/gold", "reviewer", json={"crop_id": crop.crop_id, "outcome": "sku", "sku_id": "sku-a"}
    )
    assert gold.status_code == 201
    assert (
        api.call(
            "POST", "/queue/gold", "reviewer", json={"crop_id": crop.crop_id, "outcome": "not_a_product"}
        ).status_code
        == 409
    )
    assert api.call("GET", "/queue/stats/agreement", "reviewer").json()["tasks"] == 0


def test_dead_letters_and_devices_over_http(api: Api) -> None:
    svc = api.services
    bad = c.encode(make_crop("s1", "d1", jpeg=random_jpeg()))[:-40]
    assert svc.ingestor.handle(c.uplink_topic("s1", "d1", "crop"), bad).status == "rejected"
    listed = api.call("GET", "/dead-letters", "admin").json()
    assert len(listed) == 1 and listed[0]["reason"] == "malformed"
    dl = listed[0]["id"]
    assert api.call("GET", f"/dead-letters/{dl}/payload", "admin").content == bad
    assert api.call("GET", "/dead-letters", "admin", params={"reason": "oversize"}).json() == []
    replay = api.call("POST", f"/dead-letters/{dl}/replay", "admin").json()
    assert replay["status"] == "rejected" and replay["reason"] == "malformed"
    assert api.call("GET", f"/dead-letters/{dl}", "admin").json()["replay_result"] == "rejected:malformed"
    assert api.call("GET", "/dead-letters/999", "admin").status_code == 404
    creds = api.call("POST", "/devices", "admin", json={"store_id": "s1", "device_id": "d1"})
    assert creds.status_code == 201 and len(creds.json()["mqtt_password"]) >= 24
    devices = api.call("GET", "/devices", "admin").json()
    assert devices[0]["mqtt_username"] == "d1@s1" and "password" not in str(devices)
    assert api.call("DELETE", "/devices/s1/d1", "admin").status_code == 204
    assert api.call("GET", "/devices", "admin").json()[0]["status"] == "revoked"
    assert api.call("DELETE", "/devices/s1/zz", "admin").status_code == 404
    assert api.call("PUT", "/stores/_fleet", "admin", json={"store_id": "_fleet"}).status_code == 422


# ---------------------------------------------------------------------------------------------------------
# Schemathesis: generated requests (valid and invalid) against every operation, as admin; no 5xx allowed.


@pytest.fixture(scope="module")
def fuzz_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    app = create_app(make_settings(tmp_path_factory.mktemp("fuzz")))
    api = Api(app)
    api.call("PUT", "/catalogue/skus/sku-a", "merchandiser", json={"name": "A"})
    crop = make_crop("s1", "d1")
    api.services.ingestor.handle(c.uplink_topic("s1", "d1", "crop"), c.encode(crop))
    api.services.ingestor.handle(c.uplink_topic("s1", "d1", "crop"), b"junk")
    yield api
    app.state.services.db.dispose()


def test_openapi_fuzz_finds_no_server_error(fuzz_api: Api) -> None:
    """Valid and invalid requests generated from the OpenAPI document for every operation."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_api.app)
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
            )
            def run(case: Any) -> None:
                response = case.call(headers=fuzz_api.auth("admin"))
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}")

            try:
                run()
            except Exception as exc:  # a generation problem must not hide the server errors found so far
                if "Unsatisfiable" not in type(exc).__name__:
                    raise
    print(f"schemathesis: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert failures == []
    assert sum(statuses.values()) > 300 and statuses[200] > 50 and statuses[422] > 50


def test_shelfloop_cloud_serve_answers_on_loopback(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    import httpx
    import yaml

    port = free_port()
    config = tmp_path / "cloud.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": {"url": f"sqlite:///{tmp_path / 'serve.db'}"},
                "storage": {"backend": "local", "local_dir": str(tmp_path / "objects")},
                "cloud": {"api_host": "127.0.0.1", "api_port": port},
            }
        )
    )
    root = Path(__file__).resolve().parents[1]
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shelfloop.cli", "cloud", "serve", "--config", str(config)],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, (tmp_path / "serve.log").read_text()[-2000:]
        assert httpx.get(f"http://127.0.0.1:{port}/catalogue/skus", timeout=5).status_code == 401
        assert "/queue/claim" in httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).json()["paths"]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    lines = [ln for ln in (tmp_path / "serve.log").read_text().splitlines() if ln.startswith("{")]
    assert any('"route": "/readyz"' in ln for ln in lines)  # structured JSON access log
