"""Errors raised at the engine's boundary. Frontends map them to status codes in one place."""


class InvalidRequestError(ValueError):
    """A caller passed a bad value. `field` names it; the message says what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full (SchedulerConfig.max_queued_requests)."""


class EngineDeadError(RuntimeError):
    """The engine stopped; requests in flight end with this instead of hanging."""
