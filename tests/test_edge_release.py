"""Release updates: a good gallery or model is verified, canaried and swapped in without a restart; a wrong
hash, a bad signature, a broken model or a model that finds nothing is refused and the agent keeps what it
had; errors after a swap roll it back."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_edge_run import COLOURS, detector_onnx, embedder_onnx, signed_models

from edge_agent.agent import AgentCamera, EdgeAgent, Pipeline, release_manager
from edge_agent.outbox import Outbox
from edge_agent.routing import UncertaintyRouter
from edge_agent.sources import Frame, SourceStats
from edge_agent.tracking import IouTracker
from edge_agent.updates import read_active, resolve_pointer
from models.backends import create_backend
from models.bundle import generate_signing_key, pack_bundle, sign_bundle
from models.gallery import Gallery
from models.loader import load_gallery, load_model_bundle
from models.recognizer import SkuEmbedder
from shelfloop import contract as c
from shelfloop.settings import Settings

STORE, DEV = "store-1", "dev-1"


class Frames:
    """An endless checkout camera showing two coloured packs."""

    def __init__(self) -> None:
        self.camera_id, self.stats, self.n = "till-1", SourceStats(), 0
        self.image = np.full((120, 160, 3), 128, np.uint8)
        self.image[20:100, 10:70] = COLOURS["red-can"]
        self.image[20:100, 90:150] = COLOURS["green-box"]

    exhausted = False

    def read(self) -> Frame:
        self.n += 1
        return Frame(self.camera_id, self.n, self.image, c.utc_now(), 0.1)

    def take_faults(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def pointer_for(
    bundle: Path, root: Path, artifact: str, *, version: str | None = None, **override: Any
) -> Any:
    archive = pack_bundle(bundle, root / "published" / f"{bundle.name}.tar.gz")
    manifest = json.loads((bundle / "manifest.json").read_text())
    fields: dict[str, Any] = {
        "artifact": artifact,
        "name": manifest["name"],
        "version": version or str(manifest["version"]),
        "url": archive.as_uri(),
        "size_bytes": archive.stat().st_size,
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "signature": (bundle / "manifest.sig").read_text().strip(),
        "key_id": manifest["key_id"],
        "published_at": c.utc_now(),
    }
    fields.update(override)
    return c.ReleasePointer(**fields)


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    """An agent on signed test models with its release manager, having seen a few frames."""
    model, gallery, pub = signed_models(tmp_path / "models")
    settings = Settings(edge={"data_dir": str(tmp_path / "edge"), "trusted_keys": [str(pub)], "cameras": []})
    from models.loader import default_trusted_keys

    keys = default_trusted_keys([pub])
    bundle = load_model_bundle(model, keys)
    pipeline = Pipeline(bundle.detector, bundle.recognizer(load_gallery(gallery, keys)), "m-1", "g-1")
    outbox = Outbox(tmp_path / "outbox.db")
    agent = EdgeAgent(
        store_id=STORE,
        device_id=DEV,
        cameras=[AgentCamera("till-1", "checkout", Frames(), tracker=IouTracker())],  # type: ignore[arg-type]
        pipeline=pipeline,
        outbox=outbox,
        router=UncertaintyRouter(),
    )
    for _ in range(6):
        agent.step()
    manager = release_manager(settings, agent)

    class Rig:
        pass

    r = Rig()
    r.agent, r.manager, r.root, r.key, r.bundle = (
        agent,
        manager,
        tmp_path / "models",
        tmp_path / "models" / "keys" / "test.pem",
        bundle,
    )  # type: ignore[attr-defined]
    r.data_dir = tmp_path / "edge"  # type: ignore[attr-defined]
    yield r
    outbox.close()


def new_gallery(
    rig: Any, version: str, *, key: Path | None = None, embedder: SkuEmbedder | None = None
) -> Path:
    embedder = embedder or rig.bundle.embedder
    crops = [np.full((40, 30, 3), bgr, np.uint8) for bgr in COLOURS.values()]
    gallery = Gallery(
        embedder.embed(crops), list(COLOURS), list(COLOURS), embedder.fingerprint, version, 0.05, 0.3
    )
    out = rig.root / f"gallery-{version}"
    manifest = gallery.save(out)
    sign_bundle(out, {**manifest, "name": "test-gallery"}, key or rig.key)
    return out


def store_topic(artifact: str) -> str:
    return c.release_topic(artifact, store_id=STORE)


def test_a_gallery_update_is_swapped_in_without_new_weights_or_a_restart(rig: Any) -> None:
    detector_before = rig.agent.pipeline.detector
    rig.manager.on_pointer(store_topic("gallery"), pointer_for(new_gallery(rig, "g-2"), rig.root, "gallery"))
    (outcome,) = rig.manager.apply_pending()
    assert outcome.status == "activated" and outcome.version == "g-2"
    assert rig.agent.pipeline.gallery_version == "g-2" and rig.agent.pipeline.detector is detector_before
    assert read_active(rig.data_dir).gallery_version == "g-2"
    assert rig.agent.step() == 1  # and it serves
    assert rig.manager.apply_pending()[0].status == "current"  # the same pointer again: nothing to do


@pytest.mark.parametrize("attack", ["sha256", "size", "untrusted_key", "pointer_signature", "scheme"])
def test_a_bad_release_is_refused_and_the_agent_keeps_what_it_had(rig: Any, attack: str) -> None:
    gallery = new_gallery(rig, "g-bad")
    override: dict[str, Any] = {}
    if attack == "sha256":
        override["sha256"] = "0" * 64
    elif attack == "size":
        override["size_bytes"] = 10
    elif attack == "untrusted_key":
        other = rig.root / "keys" / "intruder.pem"
        generate_signing_key(other)
        gallery = new_gallery(rig, "g-bad2", key=other)
    elif attack == "pointer_signature":
        override["signature"] = "A" * 86 + "=="
    elif attack == "scheme":
        override["url"] = "ftp://example/g.tar.gz"
    pointer = pointer_for(gallery, rig.root, "gallery", **override)
    rig.manager.on_pointer(store_topic("gallery"), pointer)
    (outcome,) = rig.manager.apply_pending()
    assert outcome.status == "rejected", outcome
    assert rig.agent.pipeline.gallery_version == "g-1"
    assert any("rejected" in f for f in rig.agent.heartbeat().faults)
    assert rig.manager.apply_pending() == []  # refused once, not retried in a loop
    assert rig.agent.step() == 1


def _model_bundle(
    rig: Any, version: str, *, broken: bool = False, blind: bool = False
) -> tuple[Path, SkuEmbedder]:
    out = rig.root / f"model-{version}"
    out.mkdir()
    if broken:
        (out / "detector.onnx").write_bytes(b"not an onnx graph")
    else:
        detector_onnx(out / "detector.onnx")
        if blind:  # a model that finds nothing: every anchor's score zeroed
            import onnx

            model = onnx.load(str(out / "detector.onnx"))
            arr = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
            arr[0, 4, :] = 0.0
            model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(arr, "boxes"))
            onnx.save(model, str(out / "detector.onnx"))
    embedder_onnx(out / "recognizer.onnx")
    import onnx

    rec = onnx.load(str(out / "recognizer.onnx"))
    rec.doc_string = f"recognizer {version}"  # another network as far as fingerprints go
    onnx.save(rec, str(out / "recognizer.onnx"))
    manifest = {
        "name": "test-model",
        "kind": "model",
        "version": version,
        "detector": {"file": "detector.onnx"},
        "recognizer": {"file": "recognizer.onnx"},
    }
    sign_bundle(out, manifest, rig.key)
    return out, SkuEmbedder(create_backend("onnxruntime", out / "recognizer.onnx"))


def test_a_model_update_waits_for_its_gallery_then_both_are_swapped_in(rig: Any) -> None:
    model, embedder = _model_bundle(rig, "m-2")
    rig.manager.on_pointer(store_topic("model"), pointer_for(model, rig.root, "model"))
    (outcome,) = rig.manager.apply_pending()
    assert outcome.status == "waiting" and rig.agent.pipeline.model_version == "m-1"
    gallery = new_gallery(rig, "g-for-m2", embedder=embedder)
    rig.manager.on_pointer(store_topic("gallery"), pointer_for(gallery, rig.root, "gallery"))
    outcomes = rig.manager.apply_pending()
    assert {(o.artifact, o.status) for o in outcomes} == {("model", "activated"), ("gallery", "activated")}
    assert (rig.agent.pipeline.model_version, rig.agent.pipeline.gallery_version) == ("m-2", "g-for-m2")
    assert rig.agent.step() == 1


@pytest.mark.parametrize("kind", ["broken", "blind"])
def test_a_broken_or_blind_model_is_refused(rig: Any, kind: str) -> None:
    model, embedder = _model_bundle(rig, f"m-{kind}", broken=kind == "broken", blind=kind == "blind")
    rig.manager.on_pointer(store_topic("model"), pointer_for(model, rig.root, "model"))
    gallery = new_gallery(rig, f"g-{kind}", embedder=embedder)
    rig.manager.on_pointer(store_topic("gallery"), pointer_for(gallery, rig.root, "gallery"))
    outcomes = rig.manager.apply_pending()
    assert [o.status for o in outcomes] == ["rejected"], outcomes
    assert ("canary" in outcomes[0].detail) == (kind == "blind")
    assert rig.agent.pipeline.model_version == "m-1" and rig.agent.step() == 1


def test_errors_after_a_swap_roll_back_to_the_previous_pipeline(rig: Any) -> None:
    good = rig.agent.pipeline

    def explode(image: np.ndarray) -> Any:
        raise RuntimeError("engine crashed")

    rig.agent.swap_pipeline(Pipeline(explode, None, "m-x", "g-x"), probation_frames=10)
    for _ in range(4):
        rig.agent.step()
    assert rig.agent.pipeline is good
    assert any("rolled back" in f for f in rig.agent.heartbeat().faults)
    assert rig.manager.outcomes[-1].status == "rolled_back"


def test_the_most_specific_pointer_wins() -> None:
    def ptr(version: str) -> c.ReleasePointer:
        return c.ReleasePointer(
            artifact="model",
            name="m",
            version=version,
            url="file:///x.tar.gz",
            size_bytes=1,
            sha256="a" * 64,
            signature="A" * 86 + "==",
            key_id="k",
            published_at=c.utc_now(),
        )

    assert resolve_pointer({"fleet": ptr("1"), "store": ptr("2")}).version == "2"  # type: ignore[union-attr]
    assert resolve_pointer({"fleet": ptr("1"), "device": ptr("3"), "store": ptr("2")}).version == "3"  # type: ignore[union-attr]
    assert resolve_pointer({}) is None


def test_pointers_arrive_through_the_broker_as_retained_messages(mosquitto: Any, rig: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_agent.uplink import Uplink, UplinkConfig

    broker = mosquitto()
    cloud = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cloud", protocol=mqtt.MQTTv5)
    cloud.connect(broker.host, broker.port)
    cloud.loop_start()
    pointer = pointer_for(new_gallery(rig, "g-retained"), rig.root, "gallery")
    cloud.publish(c.release_topic("gallery"), c.encode(pointer), qos=1, retain=True).wait_for_publish(5)
    cloud.disconnect()
    cloud.loop_stop()
    uplink = Uplink(
        UplinkConfig(STORE, DEV, broker.host, broker.port),
        rig.agent.outbox,
        on_release=rig.manager.on_pointer,
    )
    rig.manager.start()
    uplink.start()
    try:
        deadline = time.monotonic() + 15
        while rig.agent.pipeline.gallery_version != "g-retained" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rig.agent.pipeline.gallery_version == "g-retained"
    finally:
        uplink.stop()
        rig.manager.stop()
