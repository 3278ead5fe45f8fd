"""A clean stop: Ctrl-C or SIGTERM while training finishes the step, saves, and exits resumable."""
import signal
import threading

__all__ = ['StopRequest']


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop reads after each step; a second Ctrl-C stops at once.

    Example:
        >>> with StopRequest() as stop:
        ...     stop.requested
        False
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> 'StopRequest':
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
