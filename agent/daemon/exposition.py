"""The /metrics body: the registry rendered family by family, reusing unchanged families' text."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import Metric

Encoder = Callable[..., bytes]

#: Below about one TCP segment gzip cannot save a packet, only spend CPU.
GZIP_MIN_BYTES = 1400
#: Level 1: 63 KiB of exposition (20 units) in 0.5 ms to 6 KiB; level 9 takes 10 ms for 4.7 KiB.
GZIP_LEVEL = 1
# Distinct content types remembered (an Accept header may name any version string).
_MAX_CONTENT_TYPES = 4


def zlib_gzip(body: bytes, level: int = GZIP_LEVEL) -> bytes:
    """BODY as a gzip member (what Content-Encoding: gzip means), at LEVEL."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)   # 31: gzip header and trailer
    return compressor.compress(body) + compressor.flush()


class _One:
    """A registry of one family: what the encoders take."""

    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> Iterator[Metric]:
        yield self._family


class _Empty:
    def collect(self) -> Iterable[Metric]:
        return ()


class ExpositionCache:
    """Renders a registry the way ENCODER would as a whole, family by family; a family that is
    the very same object as in the previous scrape (the collector hands out one family list
    per snapshot) reuses its text. Fresh families (the scrape duration, counters) are
    rendered each time, so the body is always exactly what the encoder would produce."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # content type -> id(family) -> (family, its text): the family is kept so its id
        # cannot be reused by another object while remembered.
        self._last: dict[str, dict[int, tuple[Metric, bytes]]] = {}
        self.rendered = self.reused = 0

    def render(self, registry: object, encoder: Encoder, content_type: str) -> bytes:
        """The exposition of REGISTRY (anything with collect()) in CONTENT_TYPE."""
        with self._lock:
            previous = self._last.get(content_type, {})
        trailer = encoder(_Empty())          # "# EOF\n" for OpenMetrics, b"" for text 0.0.4
        current: dict[int, tuple[Metric, bytes]] = {}
        parts = []
        rendered = reused = 0
        for family in registry.collect():  # type: ignore[attr-defined]
            hit = previous.get(id(family))
            if hit is not None and hit[0] is family:
                text = hit[1]
                reused += 1
            else:
                text = encoder(_One(family))
                if trailer and text.endswith(trailer):
                    text = text[:-len(trailer)]
                rendered += 1
            current[id(family)] = (family, text)
            parts.append(text)
        parts.append(trailer)
        with self._lock:
            self._last.pop(content_type, None)
            self._last[content_type] = current
            while len(self._last) > _MAX_CONTENT_TYPES:
                del self._last[next(iter(self._last))]
            self.rendered += rendered
            self.reused += reused
        return b"".join(parts)
