"""What auto cannot measure before sending, learnt per client from clean answers."""
from __future__ import annotations

import statistics
import threading
from collections import deque

from progvlm.net.link import LinkProfile


class LinkEstimates:
    """auto's model of what it cannot measure before sending, the cloud's compute and the
    protocol overhead, per client: the median of that client's last WINDOW clean requests
    (answered, nothing cut) on the same link, else on any link, else a prior. A median over a
    window per client is not moved by one slow or cut request, nor by another client's."""

    WINDOW = 15
    PRIORS = {"cloud_ms": 30.0, "overhead_ms": 5.0}

    def __init__(self):
        self._samples: dict[tuple, deque] = {}
        self._lock = threading.Lock()

    def add(self, client: str, link: LinkProfile, watched: bool, cloud_ms: float, overhead_ms: float):
        """One clean request's measured cloud and overhead times (`watched`: the cloud answered
        every layer, so its time holds the earlier layers' answers)."""
        with self._lock:
            window = self._samples.setdefault((client, watched), deque(maxlen=self.WINDOW))
            window.append(((link.bandwidth_mbps, link.rtt_ms), cloud_ms, overhead_ms))

    def estimate(self, client: str, link: LinkProfile, watched: bool) -> dict:
        """{"cloud_ms": {"ms", "samples", "source"}, "overhead_ms": {…}, "method"}."""
        with self._lock:
            window = list(self._samples.get((client, watched), ()))
        same_link = [s for s in window if s[0] == (link.bandwidth_mbps, link.rtt_ms)]
        used, source = ((same_link, "this client's requests on this link") if same_link else
                        (window, "this client's requests on other links") if window else
                        ([], "prior (no clean request from this client yet)"))
        out = {"method": f"median of the client's last {self.WINDOW} answered requests with "
                         "nothing cut (cut or failed ones never count)"}
        for i, name in ((1, "cloud_ms"), (2, "overhead_ms")):
            value = statistics.median(s[i] for s in used) if used else self.PRIORS[name]
            out[name] = {"ms": round(value, 3), "samples": len(used), "source": source}
        return out
