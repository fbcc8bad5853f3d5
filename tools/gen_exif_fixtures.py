#!/usr/bin/python3
"""Regenerates tests/fixtures/images/exif/: images carrying an EXIF orientation
tag, and what PIL's ImageOps.exif_transpose (which transformers' load_image
applies) makes of them, saved losslessly as PNG.

Run with Debian's python3 (python3-pil): /usr/bin/python3 tools/gen_exif_fixtures.py
"""
import os
import struct

from PIL import Image, ImageOps

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "images", "exif")


def exif_bytes(orientation, big_endian):
    """A minimal TIFF block: header, IFD0 with the Orientation tag (SHORT)."""
    e = ">" if big_endian else "<"
    head = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8)
    ifd = struct.pack(e + "H", 1) + struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(e + "I", 0)
    return b"Exif\x00\x00" + head + ifd


def source_image():
    """20x12, every pixel distinct, so any flip or rotation shows."""
    img = Image.new("RGB", (20, 12))
    img.putdata([(x * 12, y * 20, (x * 7 + y * 13) % 256) for y in range(12) for x in range(20)])
    return img


def main():
    os.makedirs(OUT, exist_ok=True)
    src = source_image()
    cases = [(o, o % 2 == 0) for o in range(1, 9)]  # alternate byte orders
    for orientation, big in cases:
        path = os.path.join(OUT, "orient%d.jpg" % orientation)
        src.save(path, quality=95, exif=exif_bytes(orientation, big))
        with Image.open(path) as im:
            ImageOps.exif_transpose(im).convert("RGB").save(os.path.join(OUT, "orient%d.expected.png" % orientation))
    path = os.path.join(OUT, "orient6.png")
    src.save(path, exif=exif_bytes(6, False)[6:])
    with Image.open(path) as im:
        ImageOps.exif_transpose(im).convert("RGB").save(os.path.join(OUT, "orient6.png.expected.png"))


if __name__ == "__main__":
    main()
