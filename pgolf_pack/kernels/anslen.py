"""Exact length of a ``constriction`` ANS stream without encoding it (encoder-side model choice).

``entropy_encode`` keeps the shortest of several fitted models; predicting each stream's length
exactly lets it run the real coder once, on the winner. This repeats what constriction 0.5 does
for ``Categorical(p, perfect=False)`` and the default ``AnsCoder`` (32-bit words, 64-bit state,
24-bit probabilities):

* quantization: with ``scale = (2**24 - n) / sum(p)`` (sums taken left to right), symbol i's
  left cumulative is ``trunc(cum_i * scale) + i`` and the last symbol's right end is ``2**24``;
* coding, in reverse order: if ``state >> 40 >= q`` the low word is emitted and the state
  shifted down by 32 bits; then ``state = (state // q) << 24 | (left + state % q)``;
* the compressed words are the emitted ones plus the state's nonzero low words (at most two).

``tests/test_kernels.py`` checks the predicted length against constriction's output, and the
encoder re-checks the winner's real length, falling back to encoding every model on a mismatch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

PRECISION = 24


def quantized_cdf(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(left cumulative, weight) per symbol of constriction's fast quantization of ``p`` (float64)."""
    p = np.asarray(p, dtype=np.float64)
    n = p.size
    cum = np.concatenate([[0.0], np.cumsum(p)])  # np.cumsum adds left to right, as the Rust fold
    scale = float((1 << PRECISION) - n) / cum[-1]
    left = (cum[:-1] * scale).astype(np.int64) + np.arange(n, dtype=np.int64)
    right = np.append(left[1:], 1 << PRECISION)
    return left, right - left


def _tables(segments: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, np.ndarray, np.ndarray]:
    """(alphabet size, left cumulatives, weights) of every segment's quantized table, padded to
    the largest alphabet (segments × n; unused entries weigh 1 and are never coded)."""
    n = max(len(p) for _, p in segments)
    left = np.zeros((len(segments), n), np.int64)
    weight = np.ones((len(segments), n), np.int64)
    for j, (_, p) in enumerate(segments):
        lo, w = quantized_cdf(p)
        left[j, : len(p)], weight[j, : len(p)] = lo, w
    return n, left, weight


@njit(cache=True, nogil=True)
def _ans_words_kernel(symbols, seg_start, seg_table, left, weight):
    state = np.uint64(0)
    words = 0
    for s in range(seg_start.shape[0] - 2, -1, -1):
        t = seg_table[s]
        for i in range(seg_start[s + 1] - 1, seg_start[s] - 1, -1):
            y = symbols[i]
            q = np.uint64(weight[t, y])
            if (state >> np.uint64(64 - PRECISION)) >= q:
                words += 1
                state = state >> np.uint64(32)
            state = ((state // q) << np.uint64(PRECISION)) | np.uint64(left[t, y] + np.int64(state % q))
    if state >= (np.uint64(1) << np.uint64(32)):
        words += 2
    elif state > np.uint64(0):
        words += 1
    return words


def ans_words(segments: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """32-bit words constriction's ``AnsCoder`` returns after ``encode_reverse`` of each
    (symbols, probabilities) segment, last segment first (so the stream decodes in list order)."""
    if not segments:
        return 0
    _, left, weight = _tables(segments)
    sizes = [len(s) for s, _ in segments]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    syms = np.concatenate([np.asarray(s, np.int64) for s, _ in segments]) if sum(sizes) else np.zeros(0, np.int64)
    return int(_ans_words_kernel(syms, starts, np.arange(len(segments), dtype=np.int64), left, weight))


@njit(cache=True, nogil=True)
def _ans_head_kernel(symbols, seg_of, left, weight):
    """Encode ``symbols`` (segment ``seg_of[i]`` each) from the end until the state first reaches
    2**32 (no word can be emitted before: that needs a state of at least 2**40).
    Returns (state, symbols consumed)."""
    state = np.uint64(0)
    used = 0
    for i in range(symbols.shape[0] - 1, -1, -1):
        if state >= (np.uint64(1) << np.uint64(32)):
            return state, used
        s, y = seg_of[i], symbols[i]
        q = np.uint64(weight[s, y])
        state = ((state // q) << np.uint64(PRECISION)) | np.uint64(left[s, y] + np.int64(state % q))
        used += 1
    return state, used


# One emitted word moves the state's information by at most -log2(1 - 2**-8) bits, and so does
# the coding step right after it (the state is then at least q * 2**8).
_WORD_SLACK = 2.0 * -np.log2(1.0 - 2.0**-8)


def ans_words_bounds(segments: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """(lo, hi) bounds on :func:`ans_words` from symbol counts, without running the coder.

    Once the state is at least 2**32 (the first symbols are coded exactly to get there), each
    step ``state -> (state // q) << 24 | (left + state % q)`` multiplies the state by 2**24 / q
    within a factor 1 +- q / state, state >= 2**32 (>= q * 2**8 right after an emitted word), so
    32 * words + log2(final state) equals the head's log2(state) plus the symbols' information
    ``sum(24 - log2 q)``, give or take ``sum(-log2(1 - q / 2**32))`` and ``_WORD_SLACK`` per word.
    """
    if not segments:
        return 0, 0
    n, left, weight = _tables(segments)
    sizes = np.array([len(s) for s, _ in segments], dtype=np.int64)
    total = int(sizes.sum())
    # The head is coded exactly from the stream's tail (the coder starts at the end); a short
    # tail almost always suffices, so only that much is copied, growing while it does not.
    tail = 64
    while True:
        tail = min(tail, total)
        pieces, ids, need = [], [], tail
        for j in range(len(segments) - 1, -1, -1):
            if need <= 0:
                break
            k = min(int(sizes[j]), need)
            pieces.append(np.asarray(segments[j][0][int(sizes[j]) - k:], np.int64))
            ids.append(np.full(k, j, np.int64))
            need -= k
        part = np.concatenate(pieces[::-1]) if pieces else np.zeros(0, np.int64)
        seg_of = np.concatenate(ids[::-1]) if ids else np.zeros(0, np.int64)
        state, used = _ans_head_kernel(part, seg_of, left, weight)
        if state >= (1 << 32) or tail == total:
            break
        tail *= 4
    if used == total:
        w = 0 if state == 0 else (1 if state < (1 << 32) else 2)
        return w, w
    info = err = 0.0
    head_from = total - used  # symbols [head_from, total) were coded exactly
    start = 0
    for j, (sym, _) in enumerate(segments):
        a, b = start, min(start + int(sizes[j]), head_from)
        start += int(sizes[j])
        if b <= a:
            continue
        cnt = np.bincount(np.asarray(sym)[: b - a], minlength=n).astype(np.float64)
        w = weight[j].astype(np.float64)
        info += float((cnt * (PRECISION - np.log2(w))).sum())
        err += float((cnt * -np.log2(1.0 - w / 2.0**32)).sum())
    phi0 = float(np.log2(float(state)))
    # Float sums of a few million terms: a generous allowance for their rounding.
    fuzz = 1e-9 * (info + err) + 1.0
    words_max = (phi0 + info + err + fuzz) / (32.0 - _WORD_SLACK) + 1.0
    err += _WORD_SLACK * words_max + fuzz
    phi_lo, phi_hi = phi0 + info - err, phi0 + info + err
    # Final: 32 * emitted + log2(state) = phi with 2**32 <= state < 2**64, and the state's two
    # words are returned too.
    emitted_lo = max(0, int(np.floor((phi_lo - 64.0) / 32.0)))
    emitted_hi = int(np.ceil((phi_hi - 32.0) / 32.0))
    return emitted_lo + 2, emitted_hi + 2
