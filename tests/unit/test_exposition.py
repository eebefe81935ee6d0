"""agent.daemon.exposition: family-by-family rendering equals the encoders' own, reusing unchanged text."""

from __future__ import annotations

import gzip
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from agent.daemon.exposition import ExpositionCache, zlib_gzip

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Families:
    """A collector handing out a fixed list plus one fresh family per collect."""

    def __init__(self, n: int) -> None:
        self.fixed = []
        for i in range(n):
            family = GaugeMetricFamily(f"x_{i}", f"help {i}", labels=["unit"])
            family.add_metric([f'u"{i}\\'], float(i))
            self.fixed.append(family)
        self.collects = 0

    def collect(self) -> Iterator[Metric]:
        self.collects += 1
        yield from self.fixed
        fresh = GaugeMetricFamily("x_scrape", "fresh each time")
        fresh.add_metric([], float(self.collects))
        yield fresh


def test_render_equals_the_encoder_and_reuses_unchanged_families() -> None:
    for accept in (None, OPENMETRICS):
        registry = Families(3)
        cache = ExpositionCache()
        encoder, content_type = choose_encoder(accept)   # type: ignore[arg-type]
        first = cache.render(registry, encoder, content_type)
        assert first == encoder(Families(3))       # the same collect number: identical bytes
        assert (cache.rendered, cache.reused) == (4, 0)
        second = cache.render(registry, encoder, content_type)
        assert (cache.rendered, cache.reused) == (5, 3)
        assert second == first.replace(b"x_scrape 1.0", b"x_scrape 2.0")
        assert second.count(b"# EOF") == (1 if accept else 0)


def test_a_new_family_object_is_rendered_again() -> None:
    registry = Families(2)
    cache = ExpositionCache()
    encoder, content_type = choose_encoder(None)   # type: ignore[arg-type]
    cache.render(registry, encoder, content_type)
    registry.fixed[0] = GaugeMetricFamily("x_0", "help 0", value=42.0)
    body = cache.render(registry, encoder, content_type)
    assert b"x_0 42.0" in body and cache.reused == 1


def test_content_types_remembered_are_bounded() -> None:
    registry = Families(1)
    cache = ExpositionCache()
    encoder, _ = choose_encoder(None)   # type: ignore[arg-type]
    for i in range(50):
        cache.render(registry, encoder, f"text/plain; v={i}")
    assert len(cache._last) <= 4


def test_zlib_gzip_is_a_gzip_member() -> None:
    body = b"driftwatch_unit_up 1.0\n" * 1000
    packed = zlib_gzip(body)
    assert gzip.decompress(packed) == body and len(packed) < len(body) // 10
