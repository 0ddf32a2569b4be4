#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz targets into tests/fuzz/corpus/<target>/seed-*.

The byte formats are the decoders of fuzz_topk.c and fuzz_dispatch.c (README.md, "Input
encoding"). Seeds give libFuzzer realistic starting points (PRNG rows of normal scores, moderate k
and alpha) that random mutation rarely reaches, plus one input per bug the fuzzers found, written
by hand so that the regression stays pinned even if the decoders change. Run it again after
changing a decoder: `python3 tests/fuzz/make_seeds.py` (it only rewrites seed-* files).
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
F32, F64, BF16, F16 = 0, 1, 2, 3


def u8(v):
    return struct.pack("<B", v & 0xFF)


def u16(v):
    return struct.pack("<H", v & 0xFFFF)


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def f32(v):
    return struct.pack("<f", v)


def f64(v):
    return struct.pack("<d", v)


# ---- fuzz_topk -------------------------------------------------------------------------------

def topk_header(dtype, E, rows, max_active=None, k_per_row=False, alpha_per_row=False, backward=True,
                arg_checks=False, eps=b"\x00", split=0):
    flags = dtype | (k_per_row << 2) | (alpha_per_row << 3) | ((not backward) << 4) | (arg_checks << 5)
    ma = 0x8000 if max_active is None else (max_active - 1)
    return u8(flags) + u16(E - 1) + u8(rows - 1) + u16(ma) + eps + u8(split)


def eps_uniform(eps):  # mode 1: u16 / 65536 * 0.5
    return u8(1) + u16(int(round(eps / 0.5 * 65536)))


def eps_table(i):  # mode 2: {1e-300, 1e-45, 1e-38, 1e-30, 1e-8, 1e-2, 0.25, 0.5 - 2^-54}
    return u8(2) + u8(i)


def row_prng(seed, scale_idx=0, grid=None, special_rate=0):
    """Normal scores * SCALES[scale_idx]; grid g in 0..7 rounds to multiples of 2^-(g-2); rate/64 specials."""
    q = (8 if grid is None else grid) | (special_rate << 4)
    return u8(16 | scale_idx) + u32(seed) + u8(q)


def row_codes(codes, scale_idx=0):
    """Per-element codes: bytes objects (a code byte and its payload)."""
    return u8(scale_idx) + b"".join(codes)


def raw32(v):  # code 240..255: raw f32 bits (raw f64 bits for f64 rows)
    return u8(240) + f32(v)


def raw64(v):
    return u8(240) + f64(v)


def small(i):  # code < 128: (code - 64) / 16 * scale
    return u8(i + 64)


def k_frac(frac):  # mode 0: (u16 + 1) / 65537 * m
    return u8(0) + u16(max(0, int(frac * 65537) - 1))


def k_int(i):  # mode 2: u8 % (m + 1)
    return u8(2) + u8(i)


def k_raw32(v):
    return u8(7) + f32(v)


def k_raw64(v):
    return u8(7) + f64(v)


def k_special(mode, i=None):
    """mode 3: k = 0, 4: k = m, 5: k = m - 1 ulp (no payload); 6: tiny[i], 8: bad[i] (table index)."""
    return u8(mode) + (u8(i) if i is not None else b"")


def alpha_log(a):  # mode 0: 10^(u16 / 65535 * 12 - 6)
    import math
    return u8(0) + u16(int(round((math.log10(a) + 6) / 12 * 65535)))


def alpha_raw32(v):  # mode 4 (bit 3 clear): raw f32 bits
    return u8(4) + f32(v)


def alpha_raw64(v):  # mode 12 = 4 | 8: raw f64 bits
    return u8(12) + f64(v)


def alpha_one():
    return u8(6)


def grad_const(v):  # mode 0: (u8 - 128) / 8
    return u8(0) + u8(int(v * 8) + 128)


def grad_prng(seed, scale_exp=3):  # mode 2: normal * 10^(b % 8 - 3)
    return u8(2) + u32(seed) + u8(scale_exp)


def grad_onehot(at, v):
    return u8(1) + u16(at) + u8(int(v * 8) + 128)


def topk_seeds():
    seeds = {}
    seed = 1
    # realistic rows: every dtype, several E, k, alpha, eps, caps
    for dtype in (F32, F64, BF16, F16):
        for E, max_active, eps, k, a in (
            (8, None, b"\x00", 0.25, 1.0),
            (8, 4, eps_table(5), 0.4, 0.5),
            (64, 6, eps_table(5), 0.03, 0.25),
            (64, None, eps_uniform(0.1), 0.5, 2.0),
            (512, None, b"\x00", 0.01, 1.0),
            (512, 64, eps_table(4), 0.05, 0.1),
            (512, 48, eps_uniform(0.3), 0.9, 1.0),
            (512, 49, eps_uniform(0.01), 0.97, 3.0),
            (3, None, b"\x00", 0.5, 1e-3),
            (1, None, b"\x00", 0.5, 1.0),
        ):
            name = f"seed-{('f32', 'f64', 'bf16', 'f16')[dtype]}-E{E}-cap{max_active or E}-k{k}-a{a}"
            rows = 1 + seed % 4
            body = topk_header(dtype, E, rows, max_active, k_per_row=bool(seed % 2), eps=eps, split=seed % 3)
            for r in range(rows):
                body += row_prng(1000 * seed + r, scale_idx=0, grid=None if r % 2 == 0 else 3)
            for r in range(rows if seed % 2 else 1):
                body += k_frac(min(0.999, k * (1 + 0.1 * r)))
            body += alpha_log(a)
            for r in range(rows):
                body += grad_prng(77 * seed + r, 3)
            body += u8(seed)
            seeds[name] = body
            seed += 1
    # limits and contract rows: k = 0, k = m, NaN / +inf rows, bad alpha, per-row params
    base = topk_header(F32, 16, 4, None, k_per_row=True, alpha_per_row=True, eps=eps_table(5))
    rows = row_prng(5, 0) + row_codes([small(1)] * 5 + [u8(194)] + [small(2)] * 10) + row_prng(6, 0) + row_codes(
        [u8(196)] + [small(i % 7) for i in range(15)])
    ks = k_special(3) + k_special(4) + k_frac(0.5) + k_special(8, 4)  # 0, m, 0.5 m, NaN
    alphas = alpha_one() + alpha_one() + u8(5) + u8(0) + alpha_log(0.5)  # third alpha: 0 (bad)
    seeds["seed-limits-and-nan-rows"] = base + rows + ks + alphas + grad_prng(1) * 4 + u8(0)
    # ties and near-ties at the max_active cut (insertion path cap <= 48 and heap path cap > 48)
    for cap in (5, 60):
        body = topk_header(F32, 128, 1, cap, eps=b"\x00")
        codes = [small(3)] + [u8(208)] * 70 + [u8(224)] * 10 + [u8(232)] * 10 + [small(2)] * 37
        body += row_codes(codes) + k_frac(0.5) + alpha_one() + grad_prng(9) + u8(0)
        seeds[f"seed-ties-at-cap-{cap}"] = body
    # -inf scores: fewer candidates than max_active
    body = topk_header(F64, 10, 1, None, eps=eps_table(5))
    body += row_codes([u8(195)] * 7 + [small(1), small(2), small(3)]) + k_frac(0.5) + alpha_one() + grad_prng(3) + u8(0)
    seeds["seed-mostly-minus-inf"] = body
    # argument checks on
    body = topk_header(F32, 8, 2, 3, arg_checks=True, eps=eps_table(5)) + row_prng(1) + row_prng(2) + k_frac(0.5)
    seeds["seed-arg-checks"] = body + alpha_one() + grad_prng(1) + grad_prng(2) + u8(3)

    # ---- regressions, by hand (see README.md, "Bugs found") ----
    # A: integer k with a gap that overflows float: p = [1, NaN], threshold -inf before the fix
    body = topk_header(F32, 2, 1, None, eps=b"\x00") + row_codes([raw32(3e38), raw32(-3e38)])
    seeds["seed-regress-A-integer-k-overflowing-gap-nan-p"] = body + k_int(1) + alpha_one() + grad_prng(4) + u8(0)
    body = topk_header(F32, 3, 1, None, eps=b"\x00") + row_codes([raw32(1e30), raw32(-1e30), raw32(-1e30)])
    seeds["seed-regress-A2-integer-k-overflow-tiny-alpha"] = body + k_int(1) + alpha_raw32(1e-9) + grad_prng(5) + u8(0)
    # B: the only active entry has an infinite x: all gradients NaN before the fix
    body = topk_header(F32, 2, 1, None, eps=eps_table(5)) + row_codes([raw32(3e38), raw32(-3e38)])
    seeds["seed-regress-B-infinite-x-nan-gradients"] = body + k_int(1) + alpha_one() + grad_prng(6) + u8(0)
    # C: 0 * inf in grad_alpha: tiny alpha, an entry far above the threshold
    body = topk_header(F32, 2, 1, None, eps=b"\x00") + row_codes([raw32(100.0), raw32(0.0)])
    seeds["seed-regress-C-grad-alpha-zero-times-inf"] = body + k_raw32(1.5) + alpha_raw32(1e-37) + grad_prng(7) + u8(0)
    # D: k within an ulp of the active count: K rounds up to it, threshold -inf before the fix
    #    (eps = 43691 / 131072 ~ 1/3 is one where float rounds K = k (1 - eps) + 3 eps up to 3)
    eps_d = u8(1) + u16(43691)
    body = topk_header(F32, 3, 1, None, eps=eps_d) + row_prng(13)
    seeds["seed-regress-D-K-rounds-to-active"] = body + k_special(5) + alpha_one() + grad_prng(8) + u8(0)
    body = topk_header(F32, 8, 1, 3, eps=eps_d) + row_codes([small(40), small(30), small(20)] + [small(-60)] * 5)
    seeds["seed-regress-D2-K-rounds-to-active-capped"] = body + k_special(5) + alpha_one() + grad_prng(9) + u8(0)
    # E: subnormal k: 2K / (1 + V0) underflows (V0 = 7 for 8 tied scores), threshold +inf before the fix
    body = topk_header(F32, 8, 1, None, eps=b"\x00") + row_codes([small(0)] * 8)
    seeds["seed-regress-E-subnormal-k-f32"] = body + k_special(6, 0) + alpha_one() + grad_prng(10) + u8(0)
    # F: a tie group cut by the truncated active count: equal scores, one p > 0 and one p = 0
    codes = [small(6)] * 2 + [small(5)] * 2 + [small(4)] * 2 + [small(3)] * 2 + [small(2)] * 2 + [small(1)]
    body = topk_header(F32, 16, 1, None, eps=eps_table(5)) + row_codes(codes + [small(0)] * 2 + [small(-60)] * 3, 1)
    seeds["seed-regress-F-tie-group-cut-by-active-count"] = body + k_int(11) + alpha_log(1e-6) + grad_prng(12) + u8(0)
    # G: a huge alpha puts the threshold b beyond the float range: r - b overflowed in the backward
    body = topk_header(F32, 8, 1, None, eps=b"\x00") + row_prng(14)
    seeds["seed-regress-G-huge-alpha-backward-overflow"] = body + k_frac(0.0001) + alpha_raw32(1e38) + grad_prng(13) + u8(0)
    # H: scores of opposite sign near FLT_MAX with alpha = FLT_MAX: s_i - s_j overflowed float in the
    #    forward although the gap / alpha is 1.76, and p came out [1, 0] instead of [0.80, 0.20]
    body = topk_header(F32, 2, 1, None, eps=eps_table(5)) + row_codes([raw32(3e38), raw32(-3e38)])
    seeds["seed-regress-H-huge-alpha-forward-gap-overflow"] = body + k_int(1) + alpha_raw32(3.4028234663852886e38) + grad_prng(14) + u8(0)
    body = topk_header(F64, 200, 1, None, eps=b"\x00") + row_prng(12)
    seeds["seed-regress-E2-subnormal-k-f64"] = body + k_special(6, 0) + alpha_one() + grad_prng(11) + u8(0)
    # I: float64, a tiny k (FLT_MIN) and alpha = 4e306: the threshold s - alpha * tau overflowed double (+inf,
    #    read by the backward as k = 0: zero gradients); now the row is out of range (NaN)
    body = topk_header(F64, 3, 1, None, eps=b"\x00") + row_prng(15)
    seeds["seed-regress-I-f64-threshold-overflow"] = (body + k_raw64(1.1754943508222875e-38)
                                                      + alpha_raw64(4e306) + grad_prng(15) + u8(0))
    return seeds


# ---- fuzz_dispatch ---------------------------------------------------------------------------

def dispatch_header(p_dtype, x_dtype, T, E, M, d, mode, chunk=0, corrupt=False, arg_checks=False):
    """mode 0: p byte by byte; 1: soft top-k, eps > 0, max_active = M; 2: random sparse; 3: dense soft top-k."""
    flags = p_dtype | (x_dtype << 2) | (mode << 4) | (corrupt << 6) | (arg_checks << 7)
    return u8(flags) + u8(T) + u16(E - 1) + u16(M - 1) + u8(d) + u8(chunk)


def dispatch_seeds():
    seeds = {}
    i = 0
    for p_dtype in (F32, F64, BF16, F16):
        for x_dtype in (F32, F64, BF16, F16):
            for T, E, M, d in ((1, 1, 1, 1), (5, 8, 2, 3), (64, 64, 6, 8), (17, 512, 20, 2), (64, 16, 16, 0)):
                i += 1
                # mode 1: p from soft_topk with eps > 0 (realistic); PRNG seed, k fraction, eps
                body = dispatch_header(p_dtype, x_dtype, T, E, M, d, mode=1, chunk=i)
                body += u32(i * 7919) + u8(100) + u8(3)
                body += u32(i * 104729)  # values seed
                seeds[f"seed-topk-p{p_dtype}-x{x_dtype}-T{T}-E{E}-M{M}-d{d}"] = body
    # mode 0: p given byte by byte (zeros, -0.0, NaN, inf, subnormals)
    codes = bytes([0, 96, 112, 120, 128, 200, 255, 0, 0, 140, 97, 113] * 4)
    seeds["seed-raw-p-specials"] = dispatch_header(F16, F32, 4, 12, 5, 2, mode=0, chunk=2) + codes + u32(5)
    seeds["seed-raw-p-dense"] = dispatch_header(F32, BF16, 3, 6, 2, 4, mode=0) + bytes([200] * 18) + u32(6)
    seeds["seed-zero-tokens"] = dispatch_header(F32, F32, 0, 8, 3, 4, mode=1) + u32(1) + u8(50) + u8(1) + u32(2)
    # corrupt index arrays: gather / combine must reject them without touching memory out of range
    body = dispatch_header(F32, F32, 6, 8, 3, 2, mode=1, corrupt=True) + u32(9) + u8(120) + u8(2) + u32(3)
    seeds["seed-corrupt-indices"] = body + bytes([3, 0, 1, 2, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6])
    # mode 2: random sparse p with specials; mode 3: dense p (eps = 0), more actives than M per token
    for p_dtype, density in ((F32, 40), (BF16, 200), (F16, 255), (F64, 5)):
        body = dispatch_header(p_dtype, F32, 33, 40, 7, 3, mode=2, chunk=5) + u32(p_dtype + 11) + u8(density) + u32(3)
        seeds[f"seed-sparse-p{p_dtype}-density{density}"] = body
    seeds["seed-dense-topk-truncated-to-M"] = dispatch_header(F32, F32, 20, 32, 4, 2, mode=3) + u32(4) + u8(200) + u8(0) + u32(5)
    seeds["seed-arg-checks"] = dispatch_header(F32, F32, 5, 8, 3, 2, mode=1, arg_checks=True) + u32(8) + u8(90) + u8(1) + u32(9)
    return seeds


def write(target, seeds):
    out = os.path.join(HERE, "corpus", target)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith("seed-"):
            os.remove(os.path.join(out, name))
    for name, body in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(body)
    print(f"{target}: {len(seeds)} seeds", file=sys.stderr)


if __name__ == "__main__":
    write("fuzz_topk", topk_seeds())
    write("fuzz_dispatch", dispatch_seeds())
