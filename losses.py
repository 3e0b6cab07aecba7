"""DINOv2 losses: the DINO head, the teacher targets and the DINO, iBOT and KoLeo loss terms.

Implements the self-supervised objective of DINOv2 (Oquab et al., 2023, §4 "Discriminative Self-supervised
Pre-training"): the image-level objective (DINO, on the cls token), the patch-level objective (iBOT, on masked
patch tokens), Sinkhorn-Knopp centering of the teacher and the KoLeo regulariser, each as the released
facebookresearch/dinov2 code defines it (`dinov2/layers/dino_head.py`, `dinov2/loss/*.py`,
`dinov2/train/ssl_meta_arch.py`).

Public names, in reading order:
    DINOHead                         MLP -> L2 normalise -> weight-normalised layer onto K prototypes
    convert_official_head_keys       rename weight_g/weight_v so released training checkpoints load
    SoftmaxCentering                 teacher targets, option 1: softmax around an EMA centre (default config)
    sinkhorn_knopp                   teacher targets, option 2: Sinkhorn-Knopp (the released ViT-L/g configs)
    dino_loss                        cross-entropy between cls-token distributions of different views
    ibot_loss                        cross-entropy on the masked patch tokens
    koleo_loss                       nearest-neighbour spreading of the student cls features

How train.py combines them (a single backward; the weights are flags, by default 1, 1 and 0.1):
    loss = dino_weight * (dino_global + dino_local) + ibot_weight * ibot + koleo_weight * (koleo(A) + koleo(B))
with A, B the student backbone cls tokens of the two masked global views.

Precision: the heads run in whatever dtype autocast gives; the loss functions upcast logits to fp32 before any
softmax, and centering, Sinkhorn-Knopp and KoLeo run in fp32.

Run the tests: python -m pytest -q tests/test_losses.py
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from util.distributed import all_reduce_  # sums / maxima over ranks; a no-op in one process

# -----------------------------------------------------------------------------
# The projection head (released `dinov2/layers/dino_head.py`)


class DINOHead(nn.Module):
    """Projection head: MLP -> L2 normalisation -> weight-normalised linear layer onto K prototypes.

    With nlayers=3: Linear(in, hidden) - GELU - Linear(hidden, hidden) - GELU - Linear(hidden, bottleneck),
    with no GELU after the last MLP layer. The last layer is `weight_norm(Linear(bottleneck, K, bias=False))`
    with dim=0, so each prototype row is w_k = g_k * v_k / |v_k|; g (shape (K,1)) starts at 1 and is TRAINABLE
    (DINOv1 froze it; DINOv2 only sets its lr to 0 during the first epoch, which is train.py's business).
    Parameter names: mlp.0/2/4.{weight,bias}, last_layer.parametrizations.weight.original0 (g) / original1 (v);
    see convert_official_head_keys for the released names.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                layers.append(nn.GELU())  # exact GELU between Linears, none after the last one
            layers.append(nn.Linear(d_in, d_out))
        self.mlp = nn.Sequential(*layers)  # keys mlp.0, mlp.2, mlp.4 for nlayers=3
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """(Re-)initialise every parameter, so the head can be built on the meta device then `to_empty()`.

        MLP Linears: weight trunc_normal(std=0.02), bias 0. Last layer: v keeps nn.Linear's default
        kaiming-uniform init (only its direction matters), g = 1, so every prototype starts with unit norm.
        """
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        weight = self.last_layer.parametrizations.weight
        nn.init.kaiming_uniform_(weight.original1, a=math.sqrt(5))  # what nn.Linear.reset_parameters does
        weight.original0.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (..., D) -> (..., bottleneck)
        # 1e-12 rounds to 0 in fp16, hence the larger eps there (as released)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)  # (..., K) logits; the losses upcast them to fp32


# Released checkpoints were written with the old torch.nn.utils.weight_norm, which names g and v differently.
_OFFICIAL_TO_PARAMETRIZED = {
    "last_layer.weight_g": "last_layer.parametrizations.weight.original0",  # g, (K, 1)
    "last_layer.weight_v": "last_layer.parametrizations.weight.original1",  # v, (K, bottleneck)
}


def convert_official_head_keys(state_dict: dict, to_official: bool = False) -> dict:
    """Rename head keys between the released names and ours; any prefix is kept, other keys pass through.

    Released -> ours (default): `*last_layer.weight_g` -> `*last_layer.parametrizations.weight.original0`,
    `*last_layer.weight_v` -> `*.original1`. With to_official=True the reverse. Shapes are identical.
    (The released iBOT centre has shape (1,1,K) where SoftmaxCentering's has (1,K); that reshape is the
    caller's, as it is not a head key.)
    """
    mapping = _OFFICIAL_TO_PARAMETRIZED
    if to_official:
        mapping = {ours: official for official, ours in mapping.items()}
    converted = {}
    for key, value in state_dict.items():
        for old, new in mapping.items():
            if key == old or key.endswith("." + old):
                key = key[: len(key) - len(old)] + new
                break
        converted[key] = value
    return converted


# -----------------------------------------------------------------------------
# Teacher targets (released `dino_clstoken_loss.py`, `ibot_patch_loss.py`). N rows = one per token: the 2B cls
# tokens for DINO, the M masked patch tokens for iBOT. Both options return fp32 probabilities with no gradient.


class SoftmaxCentering(nn.Module):
    """Teacher targets softmax((t - c) / temp) with an EMA centre c, as in DINO/iBOT (the default config).

    The centre is used BEFORE it is updated: step n sees the centre of steps < n (the released code applies the
    update lazily at the next call to overlap its asynchronous all-reduce; the result is the same). Then
    c <- m * c + (1 - m) * mean of the raw logits over all tokens of all ranks. Use one instance for the DINO
    cls logits (2B, K) and another for the iBOT masked-token logits (M, K).
    """

    def __init__(self, n_prototypes: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))  # (1,K), saved with the checkpoint

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        t = teacher_logits.float()  # (N,K)
        probs = F.softmax((t - self.center) / temp, dim=-1)  # (N,K) with the OLD centre
        self.update_center(t)
        return probs

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor):
        t = teacher_logits.float()  # (N,K)
        # One all-reduce carries both the per-prototype sum and the token count: (1, K+1).
        sum_and_count = torch.cat([t.sum(dim=0), t.new_tensor([t.shape[0]])]).unsqueeze(0)
        all_reduce_(sum_and_count, op="sum")
        row_sum, count = sum_and_count[:, :-1], sum_and_count[:, -1:]  # (1,K), (1,1)
        # NOTE(deviation): the mean is over all tokens of all ranks (ranks weighted by their token counts). The
        # released iBOT centre averages the per-GPU token means unweighted; with unequal masked-token counts per
        # GPU that over-weights GPUs with few tokens. For the DINO cls logits (equal counts) both agree.
        batch_mean = row_sum / count.clamp(min=1)  # (1,K)
        updated = self.center * self.momentum + batch_mean * (1 - self.momentum)
        # No token on any rank (possible for iBOT on a tiny batch): keep the centre. torch.where avoids a sync.
        self.center.copy_(torch.where(count > 0, updated, self.center))


def _logsumexp_over_all_rows(log_q: torch.Tensor) -> torch.Tensor:
    """log(sum over the rows of ALL ranks of exp(log_q)), per column: (N,K) -> (1,K), overflow-free.

    The usual max shift, made global: MAX all-reduce of the column maxima, then SUM all-reduce of the shifted
    sums. A rank with N=0 rows contributes -inf to the max and 0 to the sum but still joins both collectives.
    """
    n_rows, k = log_q.shape
    if n_rows > 0:
        col_max = log_q.amax(dim=0, keepdim=True)  # (1,K)
    else:
        col_max = log_q.new_full((1, k), float("-inf"))
    all_reduce_(col_max, op="max")
    col_sum = (log_q - col_max).exp().sum(dim=0, keepdim=True)  # (1,K); >= 1 on the rank holding the max
    all_reduce_(col_sum, op="sum")
    return col_max + col_sum.log()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV; released `sinkhorn_knopp_teacher`), jointly over all rows of all
    ranks. Returns (N,K) fp32.

    The released loop, with Q of shape (K, B') and B' the row count over all ranks:
        Q = exp(t / temp).T;  Q /= sum(Q)                      # sum all-reduced
        3 times: Q /= rowsum(Q) (all-reduced); Q /= K;  Q /= colsum(Q); Q /= B'
        Q *= B';  return Q.T                                   # every sample's row sums to 1
    It alternately gives each prototype the same total mass over the global batch and makes each sample a
    distribution over prototypes. In exact arithmetic every division by a constant (sum(Q), K, B') is undone
    by the next normalisation, so what remains is: 3 x [normalise prototypes over all rows; normalise each row].

    The released exp(t / 0.04) overflows fp32 once a logit passes ~3.5. We compute the same math in the log
    domain. Why not subtract each sample's max, the softmax trick? In Q that multiplies column n (one sample)
    by its own constant BEFORE the first prototype normalisation, which sums over samples, so samples would be
    re-weighted and the result would change. A constant per prototype (here the prototype's max over all ranks)
    or one global constant is removed exactly by that first normalisation, hence the shift below is safe.
    """
    t = teacher_logits.float()  # (N,K)
    n_rows, k = t.shape
    col_max = t.amax(dim=0, keepdim=True) if n_rows > 0 else t.new_full((1, k), float("-inf"))
    all_reduce_(col_max, op="max")  # (1,K): each prototype's max logit over all ranks
    # Shift the raw logits before dividing by temp: t - col_max is exact for nearby values, so the large
    # t / temp never has to be rounded. log_q <= 0, so nothing can overflow from here on.
    log_q = (t - col_max) / temp  # (N,K)
    for _ in range(n_iterations):
        log_q = log_q - _logsumexp_over_all_rows(log_q)  # each prototype: total mass 1 over the global batch
        log_q = log_q - log_q.logsumexp(dim=1, keepdim=True)  # each row: a distribution over the K prototypes
    return log_q.exp()  # (N,K); no NaN when this rank holds no rows, just an empty (0,K) tensor


# -----------------------------------------------------------------------------
# The loss terms (paper §4; released `dinov2/loss/`). All return fp32 scalars.


def dino_loss(student_global: torch.Tensor, student_local: torch.Tensor | None, teacher_probs: torch.Tensor,
              student_temp: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-level DINO loss: cross-entropy between teacher and student cls distributions of DIFFERENT views.

    student_global (2B,K) and teacher_probs (2B,K) are ordered [view-0 images; view-1 images]; student_local
    (L*B,K) is ordered [local-0 images; local-1 images; ...] or None (L=0). Pairs: each student global view with
    the OTHER teacher global view (2 pairs, no same-view pair) and each local crop with both teacher global views
    (2L pairs; local crops are never targets). Each pair is CE = mean over the B images of -sum_k t log p with
    p = softmax(s / student_temp). Both returned terms are divided by n_terms = 2 + 2L, so that
    loss_global + loss_local is the mean over all pairs (18 for L=8).
    """
    n_global, k = student_global.shape
    if n_global % 2 or teacher_probs.shape != student_global.shape:
        raise ValueError(f"dino_loss: need student_global and teacher_probs of equal shape (2B,K), got "
                         f"{tuple(student_global.shape)} and {tuple(teacher_probs.shape)}")
    b = n_global // 2
    n_local_crops = 0 if student_local is None else student_local.shape[0] // b
    if student_local is not None and student_local.shape[0] != n_local_crops * b:
        raise ValueError(f"dino_loss: student_local has {student_local.shape[0]} rows, not a multiple of B={b}")
    n_terms = 2 + 2 * n_local_crops

    t_view0, t_view1 = teacher_probs.float().chunk(2)  # (B,K) each
    t_swapped = torch.cat([t_view1, t_view0])  # (2B,K): student view 0 learns from teacher view 1 and vice versa
    log_p_global = F.log_softmax(student_global.float() / student_temp, dim=-1)  # (2B,K)
    # sum over all 2B rows / B = CE(s_0, t_1) + CE(s_1, t_0), each a mean over the B images
    loss_global = -(t_swapped * log_p_global).sum() / b / n_terms

    if n_local_crops == 0:
        return loss_global, torch.zeros((), device=student_global.device)
    log_p_local = F.log_softmax(student_local.float() / student_temp, dim=-1).view(n_local_crops, b, k)  # (L,B,K)
    # Pairing a local crop with both teacher views = pairing it once with the sum of the two targets, so the
    # 2L cross-entropies need one broadcast product (elementwise ops stay fp32 under autocast; a matmul would not).
    t_both = t_view0 + t_view1  # (B,K)
    loss_local = -(log_p_local * t_both).sum() / b / n_terms  # (L,B,K) * (B,K) summed -> scalar
    return loss_global, loss_local


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, mask_weights: torch.Tensor,
              n_global_crops: int, student_temp: float = 0.1) -> torch.Tensor:
    """Patch-level iBOT loss on the M masked tokens of this rank's 2B global crops (released
    `iBOTPatchLoss.forward_masked`).

    loss = -sum_j w_j sum_k t_jk log softmax(s_j / student_temp)_k / n_global_crops, with w_j = 1 / (number of
    masked tokens in j's crop): each masked crop's token mean, summed over crops, divided by ALL global crops
    (2B, the unmasked ones included), so images weigh equally whatever their mask size. M=0 gives an exact 0
    that is still connected to student_logits, so backward works.
    """
    if not (student_logits.shape == teacher_probs.shape and mask_weights.shape == student_logits.shape[:1]):
        raise ValueError(f"ibot_loss: need (M,K), (M,K), (M,), got {tuple(student_logits.shape)}, "
                         f"{tuple(teacher_probs.shape)}, {tuple(mask_weights.shape)}")
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # (M,K)
    per_token = (teacher_probs.float() * log_p).sum(dim=-1)  # (M,)
    return -(per_token * mask_weights.float()).sum() / n_global_crops


def koleo_loss(x: torch.Tensor) -> torch.Tensor:
    """KoLeo regulariser on one view's features x (B,D): -mean_i log(distance to the nearest neighbour of x_i).

    As released (`dinov2/loss/koleo_loss.py`): x = normalize(x, eps=1e-8); the neighbour is the argmax of x x^T with the
    diagonal set to -1 (no gradient through the search); d_i = |x_i - x_nn(i) + 1e-8| (PairwiseDistance,
    eps 1e-8); loss = -mean log(d + 1e-8). Computed per rank on the local batch (not gathered).
    """
    if x.shape[0] < 2:
        # NOTE(deviation): with one sample the released code pairs it with itself and returns -log(eps * sqrt(D)
        # + 1e-8), a large constant with zero gradient. 0 (still connected to x) has the same gradient.
        return x.float().sum() * 0.0
    # NOTE(deviation): the input is upcast to fp32. The released code only disables autocast, so under fp16
    # parameters its input stays fp16, where 1e-8 rounds to 0 and two identical vectors give log(0) = -inf.
    # Autocast is disabled as well so that the neighbour search x x^T is not run in bf16.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=1e-8)  # (B,D)
        with torch.no_grad():
            sim = x @ x.T  # (B,B) cosine similarities
            sim.fill_diagonal_(-1.0)  # a sample is not its own neighbour
            nn_index = sim.argmax(dim=1)  # (B,)
        dist_nn = F.pairwise_distance(x, x[nn_index], p=2, eps=1e-8)  # (B,)
        return -torch.log(dist_nn + 1e-8).mean()
