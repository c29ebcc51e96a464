"""Per-matrix loss sensitivity, measured by running the model: the multipliers the rate–distortion
allocation (``quantize --method ecsq|rdoq|trellis --sensitivity``) uses to put bits where the loss
needs them. Lives here, not in quant/, because it runs a model; it needs only named parameters and
the adapter's loss, so it works for any architecture the adapter builds."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoint import DEFAULT_MIN_NUMEL, is_quantizable, to_float32
from ..errors import PgolfError
from ..quant.ecsq import ecsq_codes, make_grid
from ..quant.gptq import PreparedHessian, check_hessian, prepare_hessian
from .adapter import LoadedModel, loss_sum, module_device, nll_sum
from .block_replay import BlockReplay

# The guide skips a ladder step only when its predicted loss change is this many times below
# ``min_dloss``. Measured on the bundled example (7 scoring windows of 1-8 sequences × 256-1024
# tokens, RTN steps 0.05-1.5, 369 changes of 1e-6 to 3e-3 nats): the measured change was at
# most 2.0× the prediction, so 4 leaves a factor 2 of margin.
GUIDE_SAFETY = 4.0
# Measured changes up to this many times ``min_dloss`` test the prediction: far above it the
# ladder's coarse steps leave the second-order regime (up to 50× on the example at Δloss ~0.1),
# which says nothing about the small changes the skips are about.
GUIDE_BAND = 100.0

@dataclass
class Sensitivity:
    """Loss per unit of GPTQ's proxy, per matrix, from output-gradient second moments.

    ``rows[name]`` holds B_i = mean over tokens of (∂ΣCE/∂y_i)² for each output row i of the
    matrix (for the tied embedding: the logit rows). ``tensor[name]`` is the multiplier that
    turns ``trace(ΔW H ΔWᵀ)`` into nats per token at a reference error (see
    :func:`fisher_sensitivity`).
    """

    tensor: dict[str, float]
    rows: dict[str, np.ndarray]
    tokens: int
    # What the direct measurement cost: scoring passes over the window (the base one included),
    # and ladder steps the curvature guide skipped (see :func:`measure_sensitivity`).
    forwards: int = 0
    skipped: int = 0

    def to_json(self) -> dict:
        return dict(self.tensor)


def _scoring_window(tokens: np.ndarray, seqs: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """The tokens as one flat tensor and how many whole sequences (plus targets) they hold."""
    toks = torch.as_tensor(np.asarray(tokens).astype(np.int64)).reshape(-1)
    n_seq = min(int(seqs), (toks.numel() - 1) // seq_len)
    if n_seq < 1:
        raise PgolfError(f"need more than {seq_len} tokens to measure sensitivity, got {toks.numel()}")
    return toks, n_seq


def _weight_and_metric(name: str, t: torch.Tensor, hessians: Mapping[str, np.ndarray],
                       counts: Mapping[str, int] | None) -> tuple[np.ndarray, np.ndarray, PreparedHessian]:
    """float32 weight, count-normalised Hessian A and its GPTQ preparation (damp 0.01, act-order)."""
    # A copy: the perturbation measurement writes into model parameters that may share storage.
    w = to_float32(t).astype(np.float32)
    a = check_hessian(name, hessians[name], w.shape[1]).astype(np.float64) / max(int((counts or {}).get(name, 1)), 1)
    return w, a, prepare_hessian(a, 0.01, True, name)


def output_gradient_moments(tensors: Mapping[str, torch.Tensor], tokens: np.ndarray, seqs: int = 8,
                            seq_len: int = 1024, batch: int = 2) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Per-output-row mean squared loss gradients of every linear layer of the reference GPT (its
    tied head and logit soft-cap are built in, so this estimate is for that architecture only).

    Returns (B per weight name, C, tokens) where C[v, d] is the summed squared gradient at the
    embedding output over the tokens whose id is v (the lookup role of a tied embedding), divided
    by the token count. Gradients are of the summed next-token cross entropy (empirical Fisher).
    """
    import torch.nn.functional as F

    from .adapter import build_model
    from .model import CastedLinear

    model = build_model(tensors).module
    for p in model.parameters():
        p.requires_grad_(False)
    toks, n_seq = _scoring_window(tokens, seqs, seq_len)
    acc: dict[str, torch.Tensor] = {}
    emb = model.tok_emb.weight
    c_acc = torch.zeros(emb.shape, dtype=torch.float64)
    cur_idx: list[torch.Tensor] = []

    def out_hook(name):
        def hook(_m, _inp, out):
            def g(grad):
                s = grad.detach().double().pow(2).sum(dim=tuple(range(grad.dim() - 1)))
                acc[name] = acc.get(name, 0) + s
            out.register_hook(g)
        return hook

    def emb_hook(_m, _inp, out):
        out.requires_grad_(True)

        def g(grad):
            c_acc.index_add_(0, cur_idx[0].reshape(-1), grad.detach().double().pow(2).reshape(-1, grad.shape[-1]))
        out.register_hook(g)
        return out

    handles = [m.register_forward_hook(out_hook(n + ".weight")) for n, m in model.named_modules() if isinstance(m, CastedLinear)]
    handles.append(model.tok_emb.register_forward_hook(emb_hook))
    head = torch.zeros(emb.shape[0], dtype=torch.float64)
    cap = model.config.logit_softcap
    try:
        for start in range(0, n_seq, batch):
            stop = min(start + batch, n_seq)
            chunk = toks[start * seq_len: stop * seq_len + 1]
            x = chunk[:-1].view(-1, seq_len)
            y = chunk[1:].view(-1, seq_len)
            cur_idx[:] = [x]
            with torch.enable_grad():
                logits = model(x)
                ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
                ce.backward()
            with torch.no_grad():
                # Gradient at the tied head's pre-cap logits: (softmax - onehot) · d(cap·tanh(z/cap))/dz.
                lg = logits.detach().double().reshape(-1, logits.size(-1))
                gz = torch.softmax(lg, dim=-1)
                gz[torch.arange(gz.shape[0]), y.reshape(-1)] -= 1.0
                gz *= 1.0 - (lg / cap) ** 2
                head += gz.pow(2).sum(dim=0)
    finally:
        for h in handles:
            h.remove()
    n = n_seq * seq_len
    rows = {k: (v / n).numpy() for k, v in acc.items()}
    if "lm_head.weight" not in rows and model.lm_head is None:
        rows["tok_emb.weight"] = (head / n).numpy()
    return rows, (c_acc / n).numpy(), n


def fisher_sensitivity(tensors: Mapping[str, torch.Tensor], hessians: Mapping[str, np.ndarray],
                       counts: Mapping[str, int] | None, tokens: np.ndarray, seqs: int = 8, seq_len: int = 1024,
                       delta: float = 0.35, batch: int = 2) -> Sensitivity:
    """Per-matrix loss sensitivity of GPTQ's proxy, estimated on (training) tokens, reference GPT only.

    Second-order, K-FAC style: a weight error ΔW of a layer with inputs of covariance A (the
    count-normalised Hessian) and output-gradient second moments B_i adds about
    ½ Σ_i B_i (ΔW A ΔWᵀ)_ii nats per token; for the tied embedding also ½ Σ C_vd ΔW_vd² through
    the lookup. The multiplier is that estimate over ``trace(ΔW A ΔWᵀ)`` for the error of
    round-to-nearest ECSQ at step ``delta`` (one step for the whole matrix, column steps on) —
    a reference error, since the ratio depends a little on how the error spreads over rows.
    """
    rows, c_emb, n = output_gradient_moments(tensors, tokens, seqs, seq_len, batch)
    sens: dict[str, float] = {}
    for name, t in tensors.items():
        if name not in rows or name not in hessians:
            continue
        w, a, prep = _weight_and_metric(name, t, hessians, counts)
        grid = make_grid(w, delta, prep, "flat", 1.0)
        dw = (w - ecsq_codes(w, grid, None) * grid.steps()).astype(np.float64)
        d_rows = np.einsum("ij,ij->i", dw @ a, dw)
        est = 0.5 * float((rows[name] * d_rows).sum())
        if name == "tok_emb.weight" and c_emb.shape == dw.shape:
            est += 0.5 * float((c_emb * dw * dw).sum())
        sens[name] = est / max(float(d_rows.sum()), 1e-300)
    return Sensitivity(sens, rows, n)


def loss_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   params: Sequence[nn.Parameter]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(g, F) per parameter on the scoring window: g the gradient of the mean next-token loss,
    F the empirical diagonal Fisher Σ_s G_s² / tokens from the gradients G_s of each sequence's
    summed loss. Any model the adapter runs (one backward pass per sequence).

    Near a trained model's weights ``Δloss(ΔW) ≈ g·ΔW + ½ Σ F ⊙ ΔW²`` on these tokens; the
    per-sequence gradients stand in for per-token ones (the tokens of one sequence are scored
    together), which is as accurate as the guide of :func:`measure_sensitivity` needs.
    """
    n_seq, n_tok = x.shape[0], y.numel()
    # float32 sums of a few terms are plenty for a guide, and half the memory of float64.
    g = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    f = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for i in range(n_seq):
            with torch.enable_grad():
                loss = loss_sum(model, x[i:i + 1], y[i:i + 1])
                grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for gi, fi, gr in zip(g, f, grads):
                if gr is not None:
                    gr = gr.detach().float()
                    gi += gr
                    fi += gr * gr
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return [((gi / n_tok).cpu().numpy(), (fi / n_tok).cpu().numpy()) for gi, fi in zip(g, f)]


def _guide_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     params: Sequence[nn.Parameter]) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """:func:`loss_curvature`, or None (no guide) where the model cannot run backward: it holds
    tensors cached under ``torch.inference_mode`` (e.g. a pass the caller made in that mode on the
    same module), which autograd refuses. The measurement alone is then as exact, only slower."""
    try:
        return loss_curvature(model, x, y, params)
    except RuntimeError as e:
        if "nference tensor" in str(e):
            return None
        raise


def predicted_dloss(g: np.ndarray, f: np.ndarray, dw: np.ndarray) -> float:
    """Second-order loss change of the error ``dw`` (weight minus quantized weight, so the model
    moves by −dw); the first-order term counts by its size, so the prediction errs high."""
    return abs(float(np.vdot(g, dw))) + 0.5 * float(np.vdot(f, dw * dw))


class _Guide:
    """Which ladder steps the curvature estimate skips, and whether the measurements so far back it.

    It skips nothing until a measured step before the last, with a loss change in the band
    (``min_dloss`` to ``GUIDE_BAND`` times it), came within ``GUIDE_SAFETY`` of its prediction,
    and turns off for good on one that did not:
    a model whose gradients do not describe its loss (a detached path, a custom backward) is
    measured step by step, as without the guide.
    """

    def __init__(self, curv: list[tuple[np.ndarray, np.ndarray]] | None, min_dloss: float) -> None:
        self.curv = curv
        self.min_dloss = min_dloss
        self.confirmed = False

    def predict(self, k: int, dw: np.ndarray) -> float | None:
        if self.curv is None:
            return None
        g, f = self.curv[k]
        if not f.any():  # no gradient reaches this matrix: no estimate, not a zero one
            return None
        return predicted_dloss(g, f, dw)

    def skip(self, pred: float | None, last: bool) -> bool:
        return (pred is not None and self.curv is not None and self.confirmed and not last
                and pred < self.min_dloss / GUIDE_SAFETY)

    def check(self, pred: float | None, dl: float, last: bool) -> None:
        # The last, coarsest step is never skipped, and often far outside the second-order regime.
        if pred is None or last or not self.min_dloss <= dl <= GUIDE_BAND * self.min_dloss:
            return
        if dl > GUIDE_SAFETY * pred:
            self.curv = None
        else:
            self.confirmed = True


def measure_sensitivity(
    model: nn.Module | LoadedModel,
    hessians: Mapping[str, np.ndarray],
    tokens: np.ndarray,
    counts: Mapping[str, int] | None = None,
    seqs: int = 4,
    seq_len: int = 1024,
    deltas: Sequence[float] = (0.5, 1.5, 4.5),
    min_dloss: float = 3e-5,
    min_numel: int = DEFAULT_MIN_NUMEL,
    names: Sequence[str] | None = None,
    on_tensor: Callable[[str, float], None] | None = None,
    batch: int = 4,
    guide: bool = True,
    reuse_blocks: bool = True,
) -> Sensitivity:
    """Per-matrix loss sensitivity measured directly: quantize one matrix alone (round-to-nearest
    ECSQ, one step per matrix, column steps on) and score the mean next-token loss on ``tokens``.

    Any model the adapter runs (``model(input_ids, target_ids)`` returning the mean loss or
    logits). The matrices measured are the parameters that quantize would quantize
    (:func:`~pgolf_pack.checkpoint.is_quantizable` at ``min_numel``) and that have a Hessian, in
    the order of ``names`` (default: the model's state dict). ``sens = Δloss / trace(ΔW A ΔWᵀ)``
    with A the count-normalised Hessian. A matrix whose loss change stays below ``min_dloss``
    nats at a step is re-measured at the next, coarser step of ``deltas`` (tiny changes drown in
    the float noise of the forward pass); if none reaches it, the last ratio with Δloss clamped up
    to ``min_dloss`` is kept (an upper bound). Costs one forward pass over ``seqs`` sequences per
    measurement, ``batch`` sequences per model call; use training tokens, never the validation text.

    ``guide`` (default on) saves the passes spent on steps that would fail: a diagonal-Fisher
    estimate of each step's loss change (:func:`loss_curvature`, one backward pass per sequence)
    skips a step that is not the last when it predicts less than ``min_dloss / GUIDE_SAFETY``.
    The measurement still decides: a skipped step that would have failed leaves the result as it
    was. The estimate must first be confirmed by a measured step, and one measured step that
    changes the loss by more than ``GUIDE_SAFETY`` times its prediction turns the guide off
    (:class:`_Guide`). ``forwards`` and ``skipped`` of the result say what it saved.

    ``reuse_blocks`` (default on) takes the output of each block that runs before the perturbed
    matrix from the base pass instead of running it again (:class:`~.block_replay.BlockReplay`:
    only where the block's arguments are bit-identical, so the scores do not change).
    """
    if batch < 1:
        raise PgolfError(f"batch must be at least 1, got {batch}")
    if isinstance(model, LoadedModel):
        model = model.module
    params = dict(model.named_parameters())
    device = module_device(model)
    toks, n_seq = _scoring_window(tokens, seqs, seq_len)
    chunk = toks[: n_seq * seq_len + 1]
    x, y = chunk[:-1].view(-1, seq_len).to(device), chunk[1:].view(-1, seq_len).to(device)
    was_training = model.training
    model.eval()

    replay: BlockReplay | None = None

    def score() -> float:
        # Sequences go through in batches: one call per ``batch`` sequences instead of one per
        # sequence (the loss differs only by float summation order, ~1e-7 nats on the bundled
        # example, far below ``min_dloss``).
        total = 0.0
        # no_grad, not inference_mode: tensors a model caches during the pass (rotary tables)
        # must stay usable by the guide's backward passes in a later call.
        with torch.no_grad():
            for c, i in enumerate(range(0, n_seq, batch)):
                if replay is not None:
                    replay.start_call(c)
                total += nll_sum(model, x[i:i + batch], y[i:i + batch], per_token_float64=False)[0]
        return total / (n_seq * seq_len)

    todo = []
    for name in (names if names is not None else list(model.state_dict())):
        p = params.get(name)
        if name in hessians and p is not None and is_quantizable(p.detach(), min_numel):
            todo.append((name, p))
    sens: dict[str, float] = {}
    forwards = skipped = 0
    try:
        with ExitStack() as stack:
            # Before the replay hooks go in: they would cut the gradient's path through the blocks.
            curv = _guide_curvature(model, x, y, [p for _, p in todo]) if guide and len(deltas) > 1 and todo else None
            steer = _Guide(curv, min_dloss)
            if reuse_blocks:
                replay = stack.enter_context(BlockReplay(model))
                replay.recording(True)
            base = score()
            forwards += 1
            if replay is not None:
                replay.recording(False)
            for k, (name, p) in enumerate(todo):
                if replay is not None:
                    replay.changed([p])
                w, a, prep = _weight_and_metric(name, p.detach(), hessians, counts)
                orig = p.detach().clone()
                ratio = 0.0
                try:
                    for j, d in enumerate(deltas):
                        grid = make_grid(w, d, prep, "flat", 1.0)
                        wq = (ecsq_codes(w, grid, None) * grid.steps()).astype(np.float32)
                        dw = (w - wq).astype(np.float64)
                        pred = steer.predict(k, dw)
                        if steer.skip(pred, last=j == len(deltas) - 1):
                            skipped += 1
                            continue
                        proxy = max(float(np.einsum("ij,ij->", dw @ a, dw)), 1e-300)
                        with torch.no_grad():
                            p.copy_(torch.from_numpy(wq).to(device=p.device, dtype=p.dtype))
                        dl = score() - base
                        forwards += 1
                        ratio = max(dl, min_dloss) / proxy
                        steer.check(pred, dl, last=j == len(deltas) - 1)
                        if dl >= min_dloss:
                            break
                finally:
                    with torch.no_grad():
                        p.copy_(orig)
                sens[name] = ratio
                if on_tensor:
                    on_tensor(name, ratio)
    finally:
        model.train(was_training)
    return Sensitivity(sens, {}, n_seq * seq_len, forwards, skipped)
