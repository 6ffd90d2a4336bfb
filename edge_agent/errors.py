"""What the edge agent raises, each mapped to one HTTP status by edge_agent/service.py."""
from __future__ import annotations

from progvlm.net.transport import CloudError  # noqa: F401 - the cloud's refusals, re-exported


class AskError(ValueError):
    """A request the agent cannot serve as asked; str(e) says why."""


class PairingError(RuntimeError):
    """The cloud runs another VLM or MAE than this device: their answers cannot be compared."""


class DeadlineError(RuntimeError):  # (not TimeoutError: asyncio.wait_for raises that one)
    """The request could not finish within its deadline; str(e) says where it stood."""


class BusyError(DeadlineError):
    """Other requests held the device until this one's deadline."""


__all__ = ["AskError", "BusyError", "CloudError", "DeadlineError", "PairingError"]
