"""Reading images within limits (genserve.multimodal.images): markdown, data URLs, fetches
through an httpx mock transport (redirect rules, size limits while streaming), decoding."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from genserve.multimodal.images import (
    ImageError,
    ImageLimits,
    decode_data_url,
    decode_image,
    fetch_url,
    split_markdown,
)
from genserve.multimodal.testing import data_url, png_bytes, random_image

LIMITS = ImageLimits(max_images=2, max_bytes=10_000, max_pixels=5_000, fetch_timeout_s=2)


def test_split_markdown():
    texts, urls = split_markdown("a ![](x.png) b ![alt text](data:image/png;base64,AA==)c")
    assert texts == ["a ", " b ", "c"] and urls == ["x.png", "data:image/png;base64,AA=="]
    assert split_markdown("no images [link](x)") == (["no images [link](x)"], [])


def test_data_urls():
    img = random_image(20, 10)
    assert decode_data_url(data_url(img), LIMITS) == png_bytes(img)
    assert decode_data_url("data:image/png,%89PNG", LIMITS) == b"\x89PNG"  # percent-encoded
    with pytest.raises(ImageError, match="malformed data URL"):
        decode_data_url("data:image/png;base64", LIMITS)
    with pytest.raises(ImageError, match="too large"):
        decode_data_url("data:image/png;base64," + "A" * 20_000, LIMITS)


def test_decode_checks_pixels_before_decoding_and_formats():
    assert decode_image(png_bytes(random_image(50, 40)), LIMITS).size == (50, 40)
    with pytest.raises(ImageError, match="too many pixels: 100x60"):
        decode_image(png_bytes(random_image(100, 60)), LIMITS)
    with pytest.raises(ImageError, match="truncated or corrupt|cannot decode"):
        decode_image(png_bytes(random_image(50, 40))[:200], LIMITS)


def fetch(handler, url="http://img.test/a.png", limits=LIMITS):
    return asyncio.run(fetch_url(url, limits, httpx.MockTransport(handler)))


def test_fetch_follows_http_redirects_only():
    body = png_bytes(random_image(10, 10))

    def handler(request):
        if request.url.path == "/a.png":
            return httpx.Response(301, headers={"location": "/b.png"})
        if request.url.path == "/b.png":
            return httpx.Response(200, content=body)
        return httpx.Response(302, headers={"location": "ftp://img.test/x.png"})

    assert fetch(handler) == body
    with pytest.raises(ImageError, match="non-http"):
        fetch(handler, "http://img.test/ftp")


def test_fetch_refuses_redirect_loops_errors_and_large_bodies():
    with pytest.raises(ImageError, match="more than 5 redirects"):
        fetch(lambda r: httpx.Response(302, headers={"location": "/again"}))
    with pytest.raises(ImageError, match="HTTP 500"):
        fetch(lambda r: httpx.Response(500))
    with pytest.raises(ImageError, match="too large: 99999 bytes"):
        fetch(lambda r: httpx.Response(200, headers={"content-length": "99999"}, content=b""))

    async def chunks():
        for _ in range(20):
            yield b"x" * 1000

    # No Content-Length: the limit holds while the body streams.
    with pytest.raises(ImageError, match="more than 10000 bytes"):
        fetch(lambda r: httpx.Response(200, content=chunks()))
