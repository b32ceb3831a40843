"""Memory-pressure worker: fill N MiB with varied, compressible pages, then
verify every byte for R rounds.  Run inside a small memory cgroup so that the
pages go to swap.  Exit 0 if all data verified, 3 on corruption."""

import hashlib
import sys


def corpus() -> bytes:
    # Text-like and structured content: compressible but varied, never zero.
    words = [
        b"swap",
        b"page",
        b"kernel",
        b"memory",
        b"compress",
        b"zsmalloc",
        b"handle",
        b"frame",
        b"class",
        b"object",
        b"0x7f3a",
        b"struct",
        b"return",
        b"python",
        b"\x00\x01\x02",
        b"\xff\xfe",
    ]
    out = bytearray()
    x = 12345
    while len(out) < 1 << 20:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out += words[x % len(words)] + (b" " if x & 256 else b"\n") + str(x % 997).encode()
    return bytes(out)


def page(c: bytes, i: int) -> bytes:
    seed = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()
    off = int.from_bytes(seed[:4], "little") % (len(c) - 4096)
    body = c[off : off + 4096 - 32]
    return seed + i.to_bytes(16, "little") + body


def main() -> int:
    mib, rounds = int(sys.argv[1]), int(sys.argv[2])
    c = corpus()
    n = mib * 256
    buf = bytearray(n * 4096)
    for i in range(n):
        buf[i * 4096 : (i + 1) * 4096] = page(c, i)
    print("filled", flush=True)
    for r in range(rounds):
        bad = 0
        for i in range(n):
            if buf[i * 4096 : (i + 1) * 4096] != page(c, i):
                bad += 1
        print(f"round {r}: {bad} bad pages of {n}", flush=True)
        if bad:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
