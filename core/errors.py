"""Errors a user can act on. Each names what was wrong and where."""


class FedloraError(Exception):
    """Base class: every error fedlora raises on purpose derives from it."""


class ConfigError(FedloraError):
    """A configuration value is missing or out of range."""


class BundleError(FedloraError):
    """An artifact bundle is incomplete, corrupted or does not match its manifest."""


class DataError(FedloraError):
    """A local data set cannot be read or lacks the configured columns."""


class ProtocolError(FedloraError):
    """A message on the wire is malformed, oversize, or fails its hash check."""


class PayloadTooLarge(ProtocolError):
    """A message announces more bytes than the receiver accepts."""


class UpdateRejected(FedloraError):
    """An update was refused by the aggregator; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
