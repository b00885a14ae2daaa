"""Stores and devices (admin): provisioning issues MQTT credentials, revocation removes them."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, status

from cloud_api import models as m
from cloud_api.api.deps import Admin, ServicesDep
from cloud_api.api.schemas import ID_PATTERN, DeviceCredentialsOut, DeviceIn, DeviceOut, StoreIn, StoreOut
from cloud_api.devices import DeviceError

router = APIRouter(tags=["devices"])
IdPath = Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]


@router.get("/stores", response_model=list[StoreOut], summary="List stores (admin)")
def list_stores(svc: ServicesDep, _: Admin) -> list[StoreOut]:
    with svc.db.session() as s:
        return [
            StoreOut(store_id=x.store_id, name=x.name)
            for x in s.scalars(sa.select(m.Store).order_by(m.Store.store_id))
        ]


@router.put("/stores/{store_id}", response_model=StoreOut, summary="Create or rename a store (admin)")
def put_store(store_id: IdPath, body: StoreIn, svc: ServicesDep, _: Admin) -> StoreOut:
    if body.store_id != store_id:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "store_id in the path and body differ")
    try:
        with svc.db.session() as s:
            store = svc.registry.ensure_store(s, store_id, body.name)
            return StoreOut(store_id=store.store_id, name=store.name)
    except Exception as exc:  # contract.InvalidTopic: e.g. the reserved fleet id
        if type(exc).__name__ == "InvalidTopic":
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        raise


@router.get("/devices", response_model=list[DeviceOut], summary="List devices (admin)")
def list_devices(svc: ServicesDep, _: Admin) -> list[DeviceOut]:
    with svc.db.session() as s:
        rows = s.scalars(sa.select(m.Device).order_by(m.Device.store_id, m.Device.device_id)).all()
        return [DeviceOut.model_validate(d, from_attributes=True) for d in rows]


@router.post(
    "/devices",
    response_model=DeviceCredentialsOut,
    status_code=201,
    summary="Provision a device or rotate its credential (admin); the password is shown only here",
)
def provision(body: DeviceIn, svc: ServicesDep, _: Admin) -> DeviceCredentialsOut:
    try:
        creds = svc.registry.provision(body.store_id, body.device_id)
    except DeviceError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return DeviceCredentialsOut(
        store_id=creds.store_id,
        device_id=creds.device_id,
        mqtt_username=creds.username,
        mqtt_password=creds.password,
        broker_reloaded=svc.registry.broker.pid_file is not None,
    )


@router.delete(
    "/devices/{store_id}/{device_id}",
    status_code=204,
    summary="Revoke a device's credential (admin)",
    responses={404: {"description": "no such device"}},
)
def revoke(store_id: IdPath, device_id: IdPath, svc: ServicesDep, _: Admin) -> None:
    try:
        svc.registry.revoke(store_id, device_id)
    except DeviceError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@router.post("/devices/sync", summary="Rewrite the broker's password and ACL files and reload it (admin)")
def sync(svc: ServicesDep, _: Admin) -> dict[str, bool]:
    return {"reloaded": svc.registry.sync()}
