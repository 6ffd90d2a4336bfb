"""A bounded cache of frames by (client, frame id): what lets a conversation about one frame
send its image bytes once.

The cloud keeps, per frame id the edge chose, the bytes it received for that frame (a
progressive stream's complete layers, or a full-cloud image); a follow-up question names the
frame and is answered from them. The edge keeps the same kind of record of what it believes the
cloud holds (and the stream it made), so a follow-up asks to resume without redoing its work.

Bounds, all at once (whichever is hit first evicts, least recently used first):
    ttl_s               an entry unused this long is gone
    max_frames_per_client  one client cannot push out everyone else's frames
    max_total_bytes     the bytes of every entry together (entry overhead included)

Frames are scoped per client: another client naming the same frame id sees nothing (a frame id
is a content hash, and who sent which picture is not another client's business).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

FRAME_TTL_S = 300.0  # a conversation's pause between questions is seconds, not minutes
MAX_FRAMES_PER_CLIENT = 16
MAX_TOTAL_BYTES = 64 << 20  # full-cloud images are MBs; progressive streams a few hundred bytes
ENTRY_OVERHEAD_BYTES = 256  # the key, the dict entry and the bookkeeping, counted per entry
FRAME_ID_MAX_CHARS = 128
FRAME_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


def check_frame_id(frame_id) -> str:
    """The frame id as given, or ValueError naming what is allowed."""
    if (not isinstance(frame_id, str) or not 1 <= len(frame_id) <= FRAME_ID_MAX_CHARS
            or not set(frame_id) <= FRAME_ID_CHARS):
        raise ValueError(f"frame_id must be 1–{FRAME_ID_MAX_CHARS} characters of letters, digits, "
                         f"'-' and '_', got {frame_id!r:.80}")
    return frame_id


@dataclass
class CachedFrame:
    kind: str  # "progressive" (complete layers of a stream) or "full" (an image)
    data: bytes
    layers: int = 0  # complete layers in data (progressive)
    used: float = 0.0  # time.monotonic() of the last put or get

    @property
    def cost(self) -> int:
        return len(self.data) + ENTRY_OVERHEAD_BYTES


class FrameCache:
    def __init__(self, ttl_s: float = FRAME_TTL_S, max_frames_per_client: int = MAX_FRAMES_PER_CLIENT,
                 max_total_bytes: int = MAX_TOTAL_BYTES, clock=time.monotonic):
        self.ttl_s, self.max_frames_per_client = ttl_s, max_frames_per_client
        self.max_total_bytes, self.clock = max_total_bytes, clock
        self._entries: OrderedDict[tuple[str, str], CachedFrame] = OrderedDict()  # LRU first
        self._per_client: dict[str, int] = {}
        self.total_bytes = 0
        self.evictions = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, client: str, frame_id: str) -> CachedFrame | None:
        with self._lock:
            self._expire()
            entry = self._entries.get((client, frame_id))
            if entry is not None:
                entry.used = self.clock()
                self._entries.move_to_end((client, frame_id))
            return entry

    def put(self, client: str, frame_id: str, entry: CachedFrame) -> bool:
        """Keep `entry` (replacing what the client had under this id); False when it alone is
        over the byte bound (then nothing is kept under this id)."""
        with self._lock:
            self._drop((client, frame_id))
            if entry.cost > self.max_total_bytes:
                return False
            entry.used = self.clock()
            self._entries[(client, frame_id)] = entry
            self._per_client[client] = self._per_client.get(client, 0) + 1
            self.total_bytes += entry.cost
            self._expire()
            while self._per_client[client] > self.max_frames_per_client:
                self._evict(next(key for key in self._entries if key[0] == client))
            while self.total_bytes > self.max_total_bytes:
                self._evict(next(iter(self._entries)))
            return True

    def forget(self, client: str, frame_id: str):
        with self._lock:
            self._drop((client, frame_id))

    def stats(self) -> dict:
        with self._lock:
            self._expire()
            return {"frames": len(self._entries), "clients": len(self._per_client),
                    "total_bytes": self.total_bytes, "evictions": self.evictions,
                    "ttl_s": self.ttl_s, "max_frames_per_client": self.max_frames_per_client,
                    "max_total_bytes": self.max_total_bytes}

    # ---- under the lock ----------------------------------------------------------------------
    def _expire(self):
        oldest_kept = self.clock() - self.ttl_s
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.used > oldest_kept:
                return
            self._evict(key)

    def _evict(self, key):
        self._drop(key)
        self.evictions += 1

    def _drop(self, key):
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.total_bytes -= entry.cost
        client = key[0]
        self._per_client[client] -= 1
        if not self._per_client[client]:
            del self._per_client[client]
