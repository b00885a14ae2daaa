"""One router per area; `cloud_api.main` mounts them all."""
