"""An upload -> a decoded photo, or a refusal with its HTTP status: the checks before any pixel is
decoded, then the one photo pipeline (`photos.decode`, as `predict` decodes a file).

    python -c "from replicate.serving.uploads import image_format; print(image_format(b'GIF89a'))"

`inspect` checks an upload's first bytes against the allowed image formats and its header's pixel
count, so a 1 MB PNG that claims 20,000 x 20,000 px is refused in milliseconds without its pixels
ever being allocated.
"""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image

from .. import photos

# Magic bytes of the formats the server takes. A table of our own: Pillow has no way to name a
# format without starting to parse it, and the check must come before any parsing.
SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}
FORMATS = "JPEG, PNG, WebP, GIF, BMP, TIFF"
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class Refusal(Exception):
    """A request or photo the server does not take: its HTTP status, one-line message and
    headers (the app answers it as {"error": message})."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def image_format(data: bytes) -> str | None:
    """The allowed format `data` starts as, by its magic bytes; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((f for f, sigs in SIGNATURES.items() if data.startswith(sigs)), None)


def inspect(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height upright) from the header alone; Refusal(415) for a format not on
    the allow list, Refusal(422) for a header that does not parse or claims over `max_pixels`."""
    fmt = image_format(data)
    if fmt is None:
        raise Refusal(415, f"not an image this server takes ({FORMATS}), judged by its first bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # the header only: nothing is decoded
                width, height = im.size
                orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "TIFF", "WEBP") else 1
    except Image.DecompressionBombError:
        raise Refusal(422, f"the photo's header claims over {max_pixels:,} pixels") from None
    except Exception as e:  # PIL raises many types for broken headers
        raise Refusal(422, f"the photo does not decode: {type(e).__name__}: {e}") from None
    if width * height > max_pixels:
        raise Refusal(422, f"the photo is {width} x {height} px, over --max-pixels {max_pixels:,}")
    return fmt, *((height, width) if orientation in ROTATED else (width, height))


def prepare(data: bytes, geometries: list, max_pixels: int) -> dict:
    """An upload -> {sha256, format, width, height, arrays} (the decoded crops, one per input
    geometry); Refusal for what `inspect` refuses and for pixels that do not decode. Runs in the
    server's decoding threads (Pillow releases the GIL while it decodes)."""
    fmt, width, height = inspect(data, max_pixels)
    arrays, error = photos.decode(io.BytesIO(data), geometries)
    if error:
        raise Refusal(422, f"the photo does not decode: {error}")
    digest = hashlib.sha256(data).hexdigest()
    return {"sha256": digest, "format": fmt, "width": width, "height": height, "arrays": arrays}
