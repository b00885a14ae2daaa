"""Errors the runtime raises: each names its cause, so a device reports a fault instead of a wrong answer."""


class ModelError(Exception):
    """Base of every runtime error."""


class BadImage(ModelError):
    """An input image that is empty, corrupt or of an unusable shape."""


class BackendUnavailable(ModelError):
    """The configured inference backend cannot run here (library, provider or GPU missing)."""


class BundleError(ModelError):
    """A model bundle or gallery that must not be used: tampered, truncated, unsigned, or mismatched."""


class GalleryMismatch(BundleError):
    """A gallery built with another embedding model than the one loaded."""
