"""Images named in a request: data URLs decoded, http(s) URLs fetched, bytes decoded by Pillow,
all within ``ImageLimits``. Every failure is an ``ImageError`` whose message the server sends
back (422).

Remote fetches use httpx: a timeout for the whole fetch, a size limit enforced while the body
streams (and from ``Content-Length`` before it does), and redirects followed by hand, at most
``MAX_REDIRECTS``, only to http(s) URLs (never ``file:``, ``ftp:`` or ``data:``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 5
# What Pillow may decode: the formats browsers and OpenAI's API take.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
# TGI's markdown image syntax in `inputs`: ![alt](url)
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]*)\)")
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*?)(?P<b64>;base64)?,(?P<data>.*)",
                      re.DOTALL)


class ImageError(ValueError):
    """An image the server cannot take; the message says which and why."""


@dataclass(frozen=True)
class ImageLimits:
    """``max_images`` per request, ``max_bytes`` per encoded image, ``max_pixels`` (width x
    height) per decoded image, ``fetch_timeout_s`` seconds for one remote fetch."""

    max_images: int = 4
    max_bytes: int = 10_000_000
    max_pixels: int = 16_777_216
    fetch_timeout_s: float = 10.0

    @classmethod
    def from_args(cls, args) -> ImageLimits:
        """--max-images, --max-image-bytes, --max-image-pixels, --image-fetch-timeout."""
        return cls(args.max_images, args.max_image_bytes, args.max_image_pixels, args.image_fetch_timeout)


def split_markdown(text: str) -> tuple[list[str], list[str]]:
    """TGI's chunks: the text between markdown images, and the images' URLs
    (``len(texts) == len(urls) + 1``)."""
    texts, urls, last = [], [], 0
    for m in MARKDOWN_IMAGE.finditer(text):
        texts.append(text[last:m.start()])
        urls.append(m.group(1))
        last = m.end()
    texts.append(text[last:])
    return texts, urls


def describe(url: str) -> str:
    """The URL as error messages show it (data URLs shortened)."""
    return url[:40] + "..." if url.startswith("data:") and len(url) > 40 else url


def decode_data_url(url: str, limits: ImageLimits) -> bytes:
    """The bytes of a ``data:`` URL (base64 or percent-encoded)."""
    m = DATA_URL.fullmatch(url)
    if m is None:
        raise ImageError("malformed data URL: expected data:<mime type>;base64,<data>")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise ImageError(f"data URL of type {mime!r} is not an image")
    data = m.group("data")
    if m.group("b64"):
        if len(data) * 3 // 4 > limits.max_bytes + 3:
            raise ImageError(f"image is too large: more than {limits.max_bytes} bytes")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("data URL is not valid base64") from None
    else:
        from urllib.parse import unquote_to_bytes

        raw = unquote_to_bytes(data)
    if len(raw) > limits.max_bytes:
        raise ImageError(f"image is too large: {len(raw)} bytes (limit {limits.max_bytes})")
    return raw


async def fetch_url(url: str, limits: ImageLimits, transport=None) -> bytes:
    """GET ``url`` (http or https) within the limits; ``transport`` is httpx's (tests)."""
    import httpx

    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=limits.fetch_timeout_s,
                                     transport=transport) as client:
            return await asyncio.wait_for(_fetch(client, url, limits), limits.fetch_timeout_s)
    except asyncio.TimeoutError:
        raise ImageError(f"fetching {url} timed out after {limits.fetch_timeout_s:g} s") from None
    except httpx.TimeoutException:
        raise ImageError(f"fetching {url} timed out after {limits.fetch_timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise ImageError(f"fetching {url} failed: {exc or type(exc).__name__}") from None


async def _fetch(client, url: str, limits: ImageLimits) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        async with client.stream("GET", url) as resp:
            if resp.is_redirect:
                target = urljoin(url, resp.headers.get("location", ""))
                if urlsplit(target).scheme not in ("http", "https"):
                    raise ImageError(f"fetching {url}: redirect to a non-http(s) URL refused")
                url = target
                continue
            if resp.status_code != 200:
                raise ImageError(f"fetching {url} failed: HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
                raise ImageError(f"image is too large: {declared} bytes (limit {limits.max_bytes})")
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > limits.max_bytes:
                    raise ImageError(f"image is too large: more than {limits.max_bytes} bytes")
            return bytes(body)
    raise ImageError(f"fetching {url}: more than {MAX_REDIRECTS} redirects")


async def read_image_bytes(url: str, limits: ImageLimits, transport=None) -> bytes:
    """The encoded image a URL names: a data URL, or an http(s) URL fetched."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "data":
        return decode_data_url(url, limits)
    if scheme in ("http", "https"):
        return await fetch_url(url, limits, transport)
    raise ImageError(f"unsupported image URL {describe(url)!r}: use a data URL or an http(s) URL")


def decode_image(raw: bytes, limits: ImageLimits):
    """Encoded bytes -> an RGB ``PIL.Image`` (one of ``FORMATS``), its size checked from the
    header before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(f"image has too many pixels (limit {limits.max_pixels})") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError(f"cannot decode the image: not one of {', '.join(FORMATS)}, or corrupt") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageError(f"image has too many pixels: {width}x{height} (limit {limits.max_pixels} pixels)")
    if width == 0 or height == 0:
        raise ImageError("image is empty (0 pixels)")
    try:
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        raise ImageError(f"cannot decode the {img.format} image: it is truncated or corrupt") from None


async def load_images(urls: list[str], limits: ImageLimits, in_worker, transport=None) -> list:
    """Every URL's image, fetched concurrently, decoded by ``in_worker(fn, *args)`` (a thread,
    off the event loop). Raises ``ImageError``."""
    if len(urls) > limits.max_images:
        raise ImageError(f"too many images: {len(urls)} (limit {limits.max_images} per request)")
    raws = await asyncio.gather(*(read_image_bytes(u, limits, transport) for u in urls))
    return [await in_worker(decode_image, raw, limits) for raw in raws]
