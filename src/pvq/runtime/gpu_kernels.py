"""The Triton kernels of runtime/gpu.py (imported only when one is first used, so TRITON_INTERPRET set by
then applies). See that module for the code layout and the decoding scheme."""
import triton
import triton.language as tl


@triton.jit
def read_codes(codes, nbytes, g, gm, B: tl.constexpr, NB: tl.constexpr):
    """The B-bit codes of groups g (int64) from the little-endian bit stream."""
    bit = g * B
    byte = bit >> 3
    sh = (bit & 7).to(tl.uint64)
    code = tl.zeros(g.shape, tl.uint64)
    for i in tl.static_range(NB):
        bi = byte + i
        v = tl.load(codes + bi, mask=gm & (bi < nbytes), other=0).to(tl.uint64)
        if i == 0:
            code = code | (v >> sh)
        else:
            up = (8 * i - sh).to(tl.uint64)
            code = code | tl.where(up < 64, v << tl.minimum(up, 63).to(tl.uint64), 0)
    mask = (tl.full(g.shape, 1, tl.uint64) << B) - 1
    return (code & mask).to(tl.int64)

@triton.jit
def rebuild(codes, nbytes, g, gm, offs, v2, lut, base, V,
            B: tl.constexpr, NB: tl.constexpr, L: tl.constexpr, K: tl.constexpr, DEPTH: tl.constexpr,
            LANES: tl.constexpr, LOGK: tl.constexpr):
    """(integer points [len(g), 2^DEPTH * LANES] (padded lanes 0), gain levels, index out of range)."""
    code = read_codes(codes, nbytes, g, gm, B, NB)
    idx = code // L
    lvl = code - idx * L
    bad = gm & (idx >= V)
    idx = tl.where(bad, 0, idx)[:, None]
    kk = tl.full(idx.shape, K, tl.int64)
    for level in tl.static_range(DEPTH):
        row = offs + level * (K + 1) * (K + 1) + kk * (K + 1)
        lo = tl.zeros(idx.shape, tl.int64)
        hi = kk
        for _ in tl.static_range(LOGK):
            mid = (lo + hi + 1) >> 1
            ok = (mid <= hi) & (tl.load(row + tl.minimum(mid, K)) <= idx)
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, tl.minimum(hi, mid - 1))
        rest = idx - tl.load(row + lo)
        k2 = kk - lo
        vv = tl.load(v2 + level * (K + 1) + k2)
        a = rest // vv
        b = rest - a * vv
        idx = tl.reshape(tl.join(a, b), (idx.shape[0], 2 * idx.shape[1]))
        kk = tl.reshape(tl.join(lo, k2), (kk.shape[0], 2 * kk.shape[1]))
    r = tl.load(base + kk) + idx
    lane = tl.arange(0, LANES)
    y = tl.load(lut + r[:, :, None] * LANES + lane[None, None, :])
    y = tl.reshape(y, (idx.shape[0], idx.shape[1] * LANES))
    return y, lvl, bad

@triton.jit
def lane_columns(DEPTH: tl.constexpr, LANES: tl.constexpr, D: tl.constexpr):
    """For each of the 2^DEPTH * LANES lanes rebuild returns: its column inside the group, and whether it is one
    (each of the 2^DEPTH segments holds D columns, padded to LANES)."""
    S: tl.constexpr = 1 << DEPTH
    j = tl.arange(0, S * LANES)
    seg = j // LANES
    ln = j - seg * LANES
    return seg * D + ln, ln < D

@triton.jit
def row_weights(codes, nbytes, offs, v2, lut, base, levels, r, rm, c0, GPR, V,
                B: tl.constexpr, NB: tl.constexpr, L: tl.constexpr, K: tl.constexpr, DEPTH: tl.constexpr,
                LANES: tl.constexpr, LOGK: tl.constexpr, BG: tl.constexpr):
    """Weights of groups c0..c0+BG of rows r as float32 [len(r) * BG, lanes], without the row scales (applied
    once to the sums), with those groups' numbers in their rows and which of them exist; groups outside the
    masks and padded lanes hold 0."""
    c = c0 + tl.arange(0, BG).to(tl.int64)
    cm = c < GPR
    g = tl.reshape(r[:, None] * GPR + c[None, :], (r.shape[0] * BG,))
    gm = tl.reshape(rm[:, None] & cm[None, :], (r.shape[0] * BG,))
    y, lvl, bad = rebuild(codes, nbytes, g, gm, offs, v2, lut, base, V, B, NB, L, K, DEPTH, LANES, LOGK)
    yf = y.to(tl.float32)
    rinv = 1.0 / tl.sqrt(tl.maximum(tl.sum(yf * yf, axis=1), 1.0))
    lev = tl.load(levels + lvl, mask=gm, other=0.0)
    return yf * (rinv * lev)[:, None], c, cm

@triton.jit
def decode_kernel(codes, nbytes, offs, v2, lut, base, levels, scales, out, bad_out, G, GPR, V, per_row,
                  B: tl.constexpr, NB: tl.constexpr, L: tl.constexpr, K: tl.constexpr, DEPTH: tl.constexpr,
                  LANES: tl.constexpr, D: tl.constexpr, LOGK: tl.constexpr, N: tl.constexpr,
                  SHAPES: tl.constexpr, BLOCK: tl.constexpr, G0, row_ids, GATHER: tl.constexpr):
    pid = tl.program_id(0)
    gl = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # groups from G0, local numbering
    gm = gl < G
    if GATHER:  # the rows row_ids lists, one after another (an embedding's lookup)
        at = gl // GPR
        g = tl.load(row_ids + at, mask=gm, other=0) * GPR + (gl - at * GPR)
    else:
        g = gl + G0
    y, lvl, bad = rebuild(codes, nbytes, g, gm, offs, v2, lut, base, V, B, NB, L, K, DEPTH, LANES, LOGK)
    col, lane_ok = lane_columns(DEPTH, LANES, D)
    om = gm[:, None] & lane_ok[None, :]
    dst = out + gl[:, None] * N + col[None, :]
    if SHAPES:
        tl.store(dst, y.to(tl.int32), mask=om)
    else:
        yf = y.to(tl.float32)
        rinv = 1.0 / tl.sqrt(tl.sum(yf * yf, axis=1))
        row = g // GPR
        s = tl.load(scales + row * per_row, mask=gm, other=1.0)
        lev = tl.load(levels + lvl, mask=gm, other=0.0)
        tl.store(dst, yf * (rinv * s * lev)[:, None], mask=om)
    tl.store(bad_out + gl, bad.to(tl.int8), mask=gm)

@triton.jit
def gemv_kernel(codes, nbytes, offs, v2, lut, base, levels, scales, x, out, GPR, ROWS, V, per_row, T,
                B: tl.constexpr, NB: tl.constexpr, L: tl.constexpr, K: tl.constexpr, DEPTH: tl.constexpr,
                LANES: tl.constexpr, D: tl.constexpr, LOGK: tl.constexpr, N: tl.constexpr,
                BR: tl.constexpr, BG: tl.constexpr, TP: tl.constexpr):
    """out[t, r] = sum_c x[t, c] W'[r, c] for BR rows, BG groups of each row at a time."""
    pid = tl.program_id(0)
    r = pid * BR + tl.arange(0, BR).to(tl.int64)
    rm = r < ROWS
    W: tl.constexpr = (1 << DEPTH) * LANES
    col_in, lane_ok = lane_columns(DEPTH, LANES, D)
    t = tl.arange(0, TP)
    tm = t < T
    s = tl.load(scales + r * per_row, mask=rm, other=0.0)
    acc = tl.zeros((BR, TP), tl.float32)
    for c0 in range(0, GPR, BG):
        w, c, cm = row_weights(codes, nbytes, offs, v2, lut, base, levels, r, rm, c0, GPR, V,
                               B, NB, L, K, DEPTH, LANES, LOGK, BG)
        w = tl.reshape(w, (BR, BG, W))
        cols = c[:, None] * N + col_in[None, :]  # [BG, W]
        xm = tm[:, None, None] & (cm[:, None] & lane_ok[None, :])[None, :, :]
        xv = tl.load(x + t[:, None, None] * (GPR * N) + cols[None, :, :], mask=xm, other=0.0)  # [TP, BG, W]
        prod = w[:, None, :, :] * xv[None, :, :, :]  # [BR, TP, BG, W]
        acc += tl.sum(tl.sum(prod, axis=3), axis=2)
    acc = acc * s[:, None]
    tl.store(out + t[None, :] * ROWS + r[:, None], acc, mask=rm[:, None] & tm[None, :])

@triton.jit
def gemm_kernel(codes, nbytes, offs, v2, lut, base, levels, scales, x, out, GPR, ROWS, V, per_row, T,
                B: tl.constexpr, NB: tl.constexpr, L: tl.constexpr, K: tl.constexpr, DEPTH: tl.constexpr,
                LANES: tl.constexpr, D: tl.constexpr, LOGK: tl.constexpr, N: tl.constexpr,
                BM: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr, DOT: tl.constexpr):
    """out[t, r] = sum_c x[t, c] W'[r, c] for a tile of BM tokens and BR rows: each step rebuilds BG groups of
    every row into registers and multiplies them with tl.dot, its operands in float32 (DOT 0, exact products),
    float16 (1) or bfloat16 (2), the sums in float32; the matrix is never written, and every tile of tokens
    rebuilds its rows again."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    t = pid_t * BM + tl.arange(0, BM).to(tl.int64)
    tm = t < T
    r = pid_r * BR + tl.arange(0, BR).to(tl.int64)
    rm = r < ROWS
    W: tl.constexpr = (1 << DEPTH) * LANES
    col_in, lane_ok = lane_columns(DEPTH, LANES, D)
    s = tl.load(scales + r * per_row, mask=rm, other=0.0)
    acc = tl.zeros((BM, BR), tl.float32)
    for c0 in range(0, GPR, BG):
        w, c, cm = row_weights(codes, nbytes, offs, v2, lut, base, levels, r, rm, c0, GPR, V,
                               B, NB, L, K, DEPTH, LANES, LOGK, BG)
        w = tl.reshape(w, (BR, BG * W))
        cols = tl.reshape(c[:, None] * N + col_in[None, :], (BG * W,))
        ok = tl.reshape(cm[:, None] & lane_ok[None, :], (BG * W,))
        xv = tl.load(x + t[:, None] * (GPR * N) + cols[None, :], mask=tm[:, None] & ok[None, :], other=0.0)
        if DOT == 2:
            acc += tl.dot(xv.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        elif DOT == 1:
            acc += tl.dot(xv.to(tl.float16), tl.trans(w.to(tl.float16)))
        else:
            acc += tl.dot(xv, tl.trans(w), input_precision="ieee")
    acc = acc * s[None, :]
    tl.store(out + t[:, None] * ROWS + r[None, :], acc, mask=tm[:, None] & rm[None, :])
