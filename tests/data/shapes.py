"""Synthetic image dataset for training tests: pictures of a coloured shape
(square, disc or triangle) on a light background; the question asks for the
colour and the answer is one word. Standard library only (PNG via zlib), so
every test machine can generate it. Deterministic for a given seed."""
import io
import json
import random
import struct
import tarfile
import zlib

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("square", "disc", "triangle")
QUESTION = "What colour is the shape?"


def png(width, height, pixels):
    """pixels: bytes of height rows of width RGB triples."""
    raw = b"".join(b"\x00" + pixels[y * width * 3:(y + 1) * width * 3] for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def inside(shape, x, y, cx, cy, r):
    if shape == "square":
        return abs(x - cx) <= r and abs(y - cy) <= r
    if shape == "disc":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    return y >= cy - r and y <= cy + r and abs(x - cx) <= (y - (cy - r)) / 2  # triangle, apex up


def picture(colour, shape, rng, size=48):
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    fg = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r)
    px = bytearray()
    for y in range(size):
        for x in range(size):
            px += bytes(fg if inside(shape, x, y, cx, cy, r) else bg)
    return png(size, size, bytes(px))


def dataset(n, seed, prefix="img"):
    """(jsonl bytes, tar bytes, [(colour, png bytes)]) of n conversations."""
    rng = random.Random(seed)
    names = sorted(COLOURS)
    lines, items = [], []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            colour, shape = names[i % 3], rng.choice(SHAPES)
            data = picture(colour, shape, rng)
            name = "%s/%04d.png" % (prefix, i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            items.append((colour, data))
            lines.append(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": colour}]}))
    rng.shuffle(lines)
    return ("\n".join(lines) + "\n").encode(), buf.getvalue(), items
