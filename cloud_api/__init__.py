"""Cloud side: MQTT ingest into S3 and the database, the catalogue, devices and the annotation queue."""
