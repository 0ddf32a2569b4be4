/* Candidate selection of the per-row soft top-k: a row's best `cap` finite scores, sorted best
 * first (larger score, then lower index), by a sorting network (rows of at most 16 scores), a bar
 * from the top two of each lane and a second pass (long rows, cap <= 8), blocks merged into a kept
 * top 8 / 16 (long rows, cap <= 16) or a heap and a merge sort (the rest).
 *
 * Part of lapsum_row.h: included by it, once per math type, where its macros (R, SMOE_AT) and the
 * block helpers (smoe_block, ...) are defined; not a header of its own.
 */
#ifndef SMOE_SUFFIX
#error "lapsum_select.h is part of lapsum_row.h: include that"
#endif

/* Order used to pick candidates: larger score first, lower index on ties. */
SMOE_HD int SMOE_FN(smoe_worse)(const R *val, const int32_t *idx, int64_t ss, int64_t a, int64_t b) {
  R va = SMOE_AT(val, a), vb = SMOE_AT(val, b);
  return va < vb || (va == vb && SMOE_AT(idx, a) > SMOE_AT(idx, b));
}

SMOE_HD void SMOE_FN(smoe_swap)(R *val, int32_t *idx, int64_t ss, int64_t a, int64_t b) {
  R tv = SMOE_AT(val, a);
  int32_t ti = SMOE_AT(idx, a);
  SMOE_AT(val, a) = SMOE_AT(val, b);
  SMOE_AT(idx, a) = SMOE_AT(idx, b);
  SMOE_AT(val, b) = tv;
  SMOE_AT(idx, b) = ti;
}

/* Min-heap (root = worst candidate) sift-down over the first `size` entries. */
SMOE_HD void SMOE_FN(smoe_sift)(R *val, int32_t *idx, int64_t ss, int64_t size, int64_t i) {
  for (;;) {
    int64_t l = 2 * i + 1, w = i;
    if (l < size && SMOE_FN(smoe_worse)(val, idx, ss, l, w)) w = l;
    if (l + 1 < size && SMOE_FN(smoe_worse)(val, idx, ss, l + 1, w)) w = l + 1;
    if (w == i) return;
    SMOE_FN(smoe_swap)(val, idx, ss, i, w);
    i = w;
  }
}

/* Up to this many candidates a sorted buffer with insertion beats a heap: a new score is usually
 * rejected by one well-predicted comparison, and an insertion is a short linear shift. */
#define SMOE_INSERTION_CAP 48

/* Best-first stable order of (val, idx) pairs: larger value first, lower index on ties. */
#define SMOE_BETTER(v1, i1, v2, i2) ((v1) > (v2) || ((v1) == (v2) && (i1) < (i2)))

/* Sorts val/idx[0..m) best first: insertion-sorted runs of 8, then bottom-up merges through
 * tv/ti. The merge step picks with conditional moves, not branches, so it runs at the same speed
 * whatever the data; this is what makes the uncapped (plain) case fast for large E. */
SMOE_HD void SMOE_FN(smoe_merge_sort)(R *val, int32_t *idx, R *tv, int32_t *ti, int64_t m, int64_t ss) {
  for (int64_t lo = 0; lo < m; lo += 8) {
    const int64_t hi = lo + 8 < m ? lo + 8 : m;
    for (int64_t i = lo + 1; i < hi; ++i) {
      const R v = SMOE_AT(val, i);
      const int32_t x = SMOE_AT(idx, i);
      int64_t j = i;
      for (; j > lo && SMOE_BETTER(v, x, SMOE_AT(val, j - 1), SMOE_AT(idx, j - 1)); --j) {
        SMOE_AT(val, j) = SMOE_AT(val, j - 1);
        SMOE_AT(idx, j) = SMOE_AT(idx, j - 1);
      }
      SMOE_AT(val, j) = v;
      SMOE_AT(idx, j) = x;
    }
  }
  R *sv = val, *dv = tv;
  int32_t *si = idx, *di = ti;
  for (int64_t width = 8; width < m; width *= 2) {
    for (int64_t lo = 0; lo < m; lo += 2 * width) {
      const int64_t mid = lo + width < m ? lo + width : m, hi = lo + 2 * width < m ? lo + 2 * width : m;
      int64_t i = lo, j = mid, o = lo;
      while (i < mid && j < hi) {
        const R lv = SMOE_AT(sv, i), rv = SMOE_AT(sv, j);
        const int32_t li = SMOE_AT(si, i), ri = SMOE_AT(si, j);
        const int take_left = SMOE_BETTER(lv, li, rv, ri);
        SMOE_AT(dv, o) = take_left ? lv : rv;
        SMOE_AT(di, o) = take_left ? li : ri;
        i += take_left;
        j += 1 - take_left;
        ++o;
      }
      for (; i < mid; ++i, ++o) {
        SMOE_AT(dv, o) = SMOE_AT(sv, i);
        SMOE_AT(di, o) = SMOE_AT(si, i);
      }
      for (; j < hi; ++j, ++o) {
        SMOE_AT(dv, o) = SMOE_AT(sv, j);
        SMOE_AT(di, o) = SMOE_AT(si, j);
      }
    }
    R *t = sv;
    sv = dv;
    dv = t;
    int32_t *u = si;
    si = di;
    di = u;
  }
  if (sv != val)
    for (int64_t i = 0; i < m; ++i) {
      SMOE_AT(val, i) = SMOE_AT(sv, i);
      SMOE_AT(idx, i) = SMOE_AT(si, i);
    }
}
#undef SMOE_BETTER

/* Block i0 of a row (smoe_block, -inf past the row's n entries) for the selections that keep the
 * scores beating a bar: *enter is set when one of them does (one vector compare for the block),
 * *bad accumulates NaN or +inf scores (checked once after the row). */
SMOE_HD const R *SMOE_FN(smoe_block_above)(const void *scores, smoe_dtype dtype, int64_t base, int64_t i0, int64_t n,
                                           R bar, R *buf, int *bad, int *enter) {
  const R *x = SMOE_FN(smoe_block)(scores, dtype, base, i0, n, -(R)INFINITY, buf);
  int b = 0, e = 0;
  SMOE_SIMD_REDUCE(|, b, e)
  for (int l = 0; l < SMOE_LANES; ++l) {
    b |= !(x[l] < (R)INFINITY);
    e |= x[l] > bar;
  }
  *bad |= b;
  *enter = e;
  return x;
}

#if !SMOE_IS_F64
/* Compare-exchange of a sorting network on order keys, best (largest) first: a compare and two
 * conditional moves, whatever the data. */
SMOE_HD void smoe_key_cx(uint64_t *key, int a, int b) {
  const uint64_t x = key[a], y = key[b];
  key[a] = x > y ? x : y;
  key[b] = x > y ? y : x;
}

/* Sorts the keys best first: the 19-comparator network for 8 inputs (n <= 8; also the network of
 * lapsum_rows8.h) or the 60-comparator one for 16 (Knuth, TAOCP vol. 3, 5.3.4; Green's network
 * for 16). */
SMOE_HD void smoe_key_sort(uint64_t *k, int64_t n) {
  if (n <= 8) {
#define SMOE_KEY_CX8(a, b) smoe_key_cx(k, a, b);
    SMOE_SORT8_NETWORK(SMOE_KEY_CX8)
#undef SMOE_KEY_CX8
    return;
  }
  smoe_key_cx(k, 0, 13), smoe_key_cx(k, 1, 12), smoe_key_cx(k, 2, 15), smoe_key_cx(k, 3, 14);
  smoe_key_cx(k, 4, 8), smoe_key_cx(k, 5, 6), smoe_key_cx(k, 7, 11), smoe_key_cx(k, 9, 10);
  smoe_key_cx(k, 0, 5), smoe_key_cx(k, 1, 7), smoe_key_cx(k, 2, 9), smoe_key_cx(k, 3, 4);
  smoe_key_cx(k, 6, 13), smoe_key_cx(k, 8, 14), smoe_key_cx(k, 10, 15), smoe_key_cx(k, 11, 12);
  smoe_key_cx(k, 0, 1), smoe_key_cx(k, 2, 3), smoe_key_cx(k, 4, 5), smoe_key_cx(k, 6, 8);
  smoe_key_cx(k, 7, 9), smoe_key_cx(k, 10, 11), smoe_key_cx(k, 12, 13), smoe_key_cx(k, 14, 15);
  smoe_key_cx(k, 0, 2), smoe_key_cx(k, 1, 3), smoe_key_cx(k, 4, 10), smoe_key_cx(k, 5, 11);
  smoe_key_cx(k, 6, 7), smoe_key_cx(k, 8, 9), smoe_key_cx(k, 12, 14), smoe_key_cx(k, 13, 15);
  smoe_key_cx(k, 1, 2), smoe_key_cx(k, 3, 12), smoe_key_cx(k, 4, 6), smoe_key_cx(k, 5, 7);
  smoe_key_cx(k, 8, 10), smoe_key_cx(k, 9, 11), smoe_key_cx(k, 13, 14);
  smoe_key_cx(k, 1, 4), smoe_key_cx(k, 2, 6), smoe_key_cx(k, 5, 8), smoe_key_cx(k, 7, 10);
  smoe_key_cx(k, 9, 13), smoe_key_cx(k, 11, 14);
  smoe_key_cx(k, 2, 4), smoe_key_cx(k, 3, 6), smoe_key_cx(k, 9, 12), smoe_key_cx(k, 11, 13);
  smoe_key_cx(k, 3, 5), smoe_key_cx(k, 6, 8), smoe_key_cx(k, 7, 9), smoe_key_cx(k, 10, 12);
  smoe_key_cx(k, 3, 4), smoe_key_cx(k, 5, 6), smoe_key_cx(k, 7, 8), smoe_key_cx(k, 9, 10);
  smoe_key_cx(k, 11, 12);
  smoe_key_cx(k, 6, 7), smoe_key_cx(k, 8, 9);
}

/* Merges 8 sorted keys b into the w = 8 or 16 sorted keys k, keeping the best w: the maximum of k
 * against b reversed is a bitonic sequence holding them, which Batcher's half-cleaners sort. */
SMOE_HD void smoe_key_merge(uint64_t *k, const uint64_t *b, int64_t w) {
  uint64_t *t = k + (w - 8);
  for (int l = 0; l < 8; ++l) t[l] = t[l] > b[7 - l] ? t[l] : b[7 - l];
  if (w == 16) {
    smoe_key_cx(k, 0, 8), smoe_key_cx(k, 1, 9), smoe_key_cx(k, 2, 10), smoe_key_cx(k, 3, 11);
    smoe_key_cx(k, 4, 12), smoe_key_cx(k, 5, 13), smoe_key_cx(k, 6, 14), smoe_key_cx(k, 7, 15);
    for (int h = 0; h < 16; h += 8) {
      uint64_t *q = k + h;
      smoe_key_cx(q, 0, 4), smoe_key_cx(q, 1, 5), smoe_key_cx(q, 2, 6), smoe_key_cx(q, 3, 7);
      smoe_key_cx(q, 0, 2), smoe_key_cx(q, 1, 3), smoe_key_cx(q, 4, 6), smoe_key_cx(q, 5, 7);
      smoe_key_cx(q, 0, 1), smoe_key_cx(q, 2, 3), smoe_key_cx(q, 4, 5), smoe_key_cx(q, 6, 7);
    }
    return;
  }
  smoe_key_cx(k, 0, 4), smoe_key_cx(k, 1, 5), smoe_key_cx(k, 2, 6), smoe_key_cx(k, 3, 7);
  smoe_key_cx(k, 0, 2), smoe_key_cx(k, 1, 3), smoe_key_cx(k, 4, 6), smoe_key_cx(k, 5, 7);
  smoe_key_cx(k, 0, 1), smoe_key_cx(k, 2, 3), smoe_key_cx(k, 4, 5), smoe_key_cx(k, 6, 7);
}

/* The first m keys that stand for finite scores (-inf sorts below every finite score, the empty
 * key 0 below that) as candidate values and indices. */
SMOE_HD int64_t SMOE_FN(smoe_unpack_keys)(const uint64_t *key, int64_t cap, R *val, int32_t *idx, int64_t ss) {
  int64_t m = 0;
  SMOE_SIMD_REDUCE(+, m)
  for (int64_t j = 0; j < cap; ++j) m += (key[j] >> 32) > 0x007fffffu; /* above -inf's high word */
  SMOE_SIMD
  for (int64_t j = 0; j < m; ++j) {
    SMOE_AT(val, j) = smoe_order_key_value_f32(key[j]);
    SMOE_AT(idx, j) = smoe_order_key_index(key[j]);
  }
  return m;
}

/* Candidates of a longer row with cap <= 16 (float math): the best 8 or 16 keys seen so far stay
 * sorted in `top`; a block of 8 scores in which some score beats the kept cap-th one (one vector
 * compare; most blocks of a long row fail it) is sorted by the 8-input network and merged in. No
 * branch depends on the order of the scores within a block. */
SMOE_HD int64_t SMOE_FN(smoe_select_blocks)(const void *scores, smoe_dtype dtype, int64_t base, int64_t n,
                                            int64_t cap, R *val, int32_t *idx, int64_t ss) {
  const int64_t w = cap <= 8 ? 8 : 16;
  uint64_t top[16];
  for (int i = 0; i < 16; ++i) top[i] = 0;
  R bar = -(R)INFINITY; /* a score must beat this to enter: the cap-th kept one once there are cap */
  int bad = 0;
  for (int64_t i0 = 0; i0 < n; i0 += SMOE_LANES) {
    R buf[SMOE_LANES];
    int enter;
    const R *x = SMOE_FN(smoe_block_above)(scores, dtype, base, i0, n, bar, buf, &bad, &enter);
    if (!enter) continue;
    uint64_t blk[SMOE_LANES];
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) blk[l] = smoe_order_key_f32(x[l], (int32_t)(i0 + l));
    smoe_key_sort(blk, 8);
    smoe_key_merge(top, blk, w);
    if (top[cap - 1] != 0) bar = smoe_order_key_value_f32(top[cap - 1]);
  }
  if (bad) return -1;
  return SMOE_FN(smoe_unpack_keys)(top, cap, val, idx, ss);
}

/* Candidates of a longer row (n > 16) with cap <= 8 (float math), in three passes of vector code:
 * (1) the largest two scores of each lane (entries i = l mod 8), kept per lane over the blocks;
 * these are 16 distinct entries, so the cap-th largest of them, the bar, is at most the cap-th
 * largest score of the row; (2) every entry at or above the bar is collected (the candidates and
 * a few more, few blocks hold one); (3) a sorting network orders the collected keys. Rows where
 * more than 16 entries reach the bar (many ties, many -inf) take the block merge instead. The
 * bar is found by counting, for each of the 16 values, how many are greater (no sort). */
SMOE_HD int64_t SMOE_FN(smoe_select_bar)(const void *scores, smoe_dtype dtype, int64_t base, int64_t n,
                                         int64_t cap, R *val, int32_t *idx, int64_t ss) {
  R top1[SMOE_LANES], top2[SMOE_LANES];
  int32_t lane_bad[SMOE_LANES]; /* NaN or +inf seen in the lane: reduced once after the loop */
  SMOE_SIMD
  for (int l = 0; l < SMOE_LANES; ++l) top1[l] = top2[l] = -(R)INFINITY, lane_bad[l] = 0;
  for (int64_t i0 = 0; i0 < n; i0 += SMOE_LANES) {
    R buf[SMOE_LANES];
    const R *x = SMOE_FN(smoe_block)(scores, dtype, base, i0, n, -(R)INFINITY, buf);
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) {
      lane_bad[l] |= !(x[l] < (R)INFINITY);
      /* the second best is the larger of it and the lesser of (best, x): a min and two maxima (a
       * NaN row is redone, so which operand a compare returns on NaN does not matter) */
      const R low = x[l] < top1[l] ? x[l] : top1[l];
      top2[l] = low > top2[l] ? low : top2[l];
      top1[l] = x[l] > top1[l] ? x[l] : top1[l];
    }
  }
  int bad = 0;
  for (int l = 0; l < SMOE_LANES; ++l) bad |= lane_bad[l];
  if (bad) return -1;
  /* The bar: the smallest of the 16 values with fewer than cap of them greater (counted in the
   * lanes, no sort: only the cap-th value is needed). */
  R bar = (R)INFINITY;
  for (int h = 0; h < 2; ++h) {
    const R *t = h ? top2 : top1;
    int32_t greater[SMOE_LANES];
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) greater[l] = 0;
    for (int i = 0; i < SMOE_LANES; ++i) {
      SMOE_SIMD
      for (int l = 0; l < SMOE_LANES; ++l) greater[l] += (top1[i] > t[l]) + (top2[i] > t[l]);
    }
    R low[SMOE_LANES];
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) low[l] = SMOE_FN(smoe_where)(greater[l] < cap, t[l], (R)INFINITY);
    for (int l = 0; l < SMOE_LANES; ++l) bar = low[l] < bar ? low[l] : bar;
  }
  /* -inf never reaches: a bar of -inf (fewer than cap finite values among the 16) becomes the
   * lowest finite value, one compare per entry */
  bar = bar > -(R)INFINITY ? bar : -(R)FLT_MAX;
  /* Every entry's key is written at key[got] and got advances past the ones at or above the bar:
   * no branch on the data (a loop over each block's set bits mispredicted about once per block:
   * 174 -> 112 ns per row at n = 64, cap 8, an Intel Xeon). got <= 16 when a block starts, so
   * the writes stay below 16 + SMOE_LANES. */
  uint64_t key[16 + SMOE_LANES];
  int64_t got = 0;
  for (int64_t i0 = 0; i0 < n; i0 += SMOE_LANES) {
    R buf[SMOE_LANES];
    const R *x = SMOE_FN(smoe_block)(scores, dtype, base, i0, n, -(R)INFINITY, buf);
    uint64_t block_key[SMOE_LANES];
    int32_t reach[SMOE_LANES];
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) {
      block_key[l] = smoe_order_key_f32(x[l], (int32_t)(i0 + l));
      reach[l] = x[l] >= bar;
    }
    for (int l = 0; l < SMOE_LANES; ++l) {
      key[got] = block_key[l];
      got += reach[l];
    }
    if (got > 16) return SMOE_FN(smoe_select_blocks)(scores, dtype, base, n, cap, val, idx, ss);
  }
  for (int64_t j = got; j < 16; ++j) key[j] = 0;
  smoe_key_sort(key, got <= 8 ? 8 : 16);
  return SMOE_FN(smoe_unpack_keys)(key, cap, val, idx, ss);
}

/* Candidates of a row of n <= 16 scores (float math): every score becomes an order key (padding
 * keys 0 sort last, after -inf), a sorting network orders them, and the first `cap` finite ones
 * are the candidates. Same order and same values as the general selection below; no branch
 * depends on the scores, where an insertion sort mispredicts about once per score. Returns the
 * number of candidates, or -1 for a row with a NaN or +inf score. */
SMOE_HD int64_t SMOE_FN(smoe_select_network)(const void *scores, smoe_dtype dtype, int64_t base, int64_t n,
                                             int64_t cap, R *val, int32_t *idx, int64_t ss) {
  const int64_t w = n <= 8 ? 8 : 16;
  uint64_t key[16];
  int bad = 0;
  for (int64_t i0 = 0; i0 < w; i0 += SMOE_LANES) {
    R buf[SMOE_LANES];
    const R *x = SMOE_FN(smoe_block)(scores, dtype, base, i0, n, -(R)INFINITY, buf);
    SMOE_SIMD_REDUCE(|, bad)
    for (int l = 0; l < SMOE_LANES; ++l) bad |= !(x[l] < (R)INFINITY);
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) key[i0 + l] = i0 + l < n ? smoe_order_key_f32(x[l], (int32_t)(i0 + l)) : 0;
  }
  if (bad) return -1;
  smoe_key_sort(key, n);
  return SMOE_FN(smoe_unpack_keys)(key, cap, val, idx, ss);
}
#endif

/* Loads one row and keeps its `cap` best finite scores, sorted best first, in val/idx (tv/ti:
 * cap more words each, for the merge sort). Returns the number of candidates, or -1 when the row
 * holds a NaN or +inf score. */
SMOE_HD int64_t SMOE_FN(smoe_select)(const void *scores, smoe_dtype dtype, int64_t base, int64_t n,
                                     int64_t cap, R *val, int32_t *idx, R *tv, int32_t *ti, int64_t ss) {
  int64_t m = 0;
#if !SMOE_IS_F64
  if (n <= 16) return SMOE_FN(smoe_select_network)(scores, dtype, base, n, cap, val, idx, ss);
  if (cap <= 8) return SMOE_FN(smoe_select_bar)(scores, dtype, base, n, cap, val, idx, ss);
  if (cap <= 16) return SMOE_FN(smoe_select_blocks)(scores, dtype, base, n, cap, val, idx, ss);
#endif
  if (cap > SMOE_INSERTION_CAP && cap == n) { /* no cap: every finite score, merge-sorted */
    int bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const R x = SMOE_LOAD(scores, dtype, base + i);
      bad |= !(x < (R)INFINITY);
      if (!(x > -(R)INFINITY)) continue;
      SMOE_AT(val, m) = x;
      SMOE_AT(idx, m) = (int32_t)i;
      ++m;
    }
    if (bad) return -1;
    SMOE_FN(smoe_merge_sort)(val, idx, tv, ti, m, ss);
    return m;
  }
  if (cap <= SMOE_INSERTION_CAP) {
    /* A score enters only if it beats `bar`: -inf until `cap` candidates are kept, then the worst
     * of them (a later equal score loses the tie on its index). One vector compare per block
     * rejects most blocks of a long row at once. */
    int bad = 0;
    R bar = -(R)INFINITY;
    for (int64_t i0 = 0; i0 < n; i0 += SMOE_LANES) {
      R buf[SMOE_LANES];
      int enter;
      const R *x = SMOE_FN(smoe_block_above)(scores, dtype, base, i0, n, bar, buf, &bad, &enter);
      if (!enter) continue;
      for (int l = 0; l < SMOE_LANES && i0 + l < n; ++l) {
        if (!(x[l] > bar)) continue;
        int64_t j = m < cap ? m++ : cap - 1;
        for (; j > 0 && SMOE_AT(val, j - 1) < x[l]; --j) {
          SMOE_AT(val, j) = SMOE_AT(val, j - 1);
          SMOE_AT(idx, j) = SMOE_AT(idx, j - 1);
        }
        SMOE_AT(val, j) = x[l];
        SMOE_AT(idx, j) = (int32_t)(i0 + l);
        if (m == cap) bar = SMOE_AT(val, cap - 1);
      }
    }
    return bad ? -1 : m;
  }
  for (int64_t i = 0; i < n; ++i) {
    R x = SMOE_LOAD(scores, dtype, base + i);
    if (x != x || x == (R)INFINITY) return -1;
    if (x == -(R)INFINITY) continue;
    if (m < cap) {
      SMOE_AT(val, m) = x;
      SMOE_AT(idx, m) = (int32_t)i;
      ++m;
      if (m == cap)
        for (int64_t j = cap / 2 - 1; j >= 0; --j) SMOE_FN(smoe_sift)(val, idx, ss, cap, j);
    } else if (x > SMOE_AT(val, 0)) { /* equal scores keep the earlier (lower) index */
      SMOE_AT(val, 0) = x;
      SMOE_AT(idx, 0) = (int32_t)i;
      SMOE_FN(smoe_sift)(val, idx, ss, cap, 0);
    }
  }
  if (m < cap)
    for (int64_t j = m / 2 - 1; j >= 0; --j) SMOE_FN(smoe_sift)(val, idx, ss, m, j);
  /* Heap-sort: moving the worst to the end each time leaves the best first. */
  for (int64_t end = m - 1; end > 0; --end) {
    SMOE_FN(smoe_swap)(val, idx, ss, 0, end);
    SMOE_FN(smoe_sift)(val, idx, ss, end, 0);
  }
  return m;
}
