"""Edge agent: what store devices run all day (cameras -> models -> routing -> durable outbox -> MQTT).

Imports `models`, `planograms` and `shelfloop.contract`; never `cloud_api` or `retrain`.
"""
