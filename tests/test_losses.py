"""Tests for losses.py: every value is checked against an independent computation written here (explicit loops,
math, float64 numpy), never against captured output. CPU, fp32, tiny sizes.

Run: python -m pytest -q tests/test_losses.py
"""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import losses  # noqa: E402
from util import runlog  # noqa: E402

TOL = 1e-6  # |actual - expected| <= TOL * (1 + |expected|), element-wise


def assert_close(actual, expected, tol=TOL):
    a = np.asarray(actual.detach().double() if torch.is_tensor(actual) else actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    err = np.abs(a - e) - tol * (1 + np.abs(e))
    assert np.all(np.isfinite(a)), "non-finite values"
    assert err.max(initial=-1.0) <= 0, f"max abs diff {np.abs(a - e).max()} (tol {tol})"


# ---------------------------------------------------------------------------------------------------------------
# Independent references (float64, loops)


def ref_log_softmax(row, temp):
    z = [v / temp for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def ref_cross_entropy(t_rows, s_rows, temp):
    """Mean over the batch of -sum_k t_k log softmax(s / temp)_k."""
    total = 0.0
    for t_row, s_row in zip(t_rows, s_rows):
        log_p = ref_log_softmax(s_row, temp)
        total += -sum(t * lp for t, lp in zip(t_row, log_p))
    return total / len(t_rows)


def ref_sinkhorn_released(logits, temp, n_iterations=3):
    """A literal float64 transcription of the released loop (Q is K x B)."""
    q = np.exp(np.asarray(logits, dtype=np.float64) / temp).T  # (K,B)
    q /= q.sum()
    k, b = q.shape
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def ref_sinkhorn_log_domain(logits, temp, n_iterations=3):
    """The same iteration in float64 logs, element by element, for inputs where exp would overflow."""
    log_q = [[v / temp for v in row] for row in np.asarray(logits, dtype=np.float64).tolist()]
    n, k = len(log_q), len(log_q[0])

    def lse(values):
        m = max(values)
        return m + math.log(sum(math.exp(v - m) for v in values))

    for _ in range(n_iterations):
        col = [lse([log_q[i][j] for i in range(n)]) for j in range(k)]
        log_q = [[log_q[i][j] - col[j] for j in range(k)] for i in range(n)]
        log_q = [[v - lse(row) for v in row] for row in log_q]
    return np.exp(np.array(log_q))


# ---------------------------------------------------------------------------------------------------------------
# DINO loss


def test_dino_pairing_matches_brute_force_18_terms():
    torch.manual_seed(0)
    b, k, n_local = 3, 7, 8
    s_global = torch.randn(2 * b, k) * 3  # [view0 images; view1 images]
    s_local = torch.randn(n_local * b, k) * 3  # [local0 images; local1 images; ...]
    teacher = torch.softmax(torch.randn(2 * b, k) * 2, dim=-1)  # [view0; view1], NOT swapped
    loss_global, loss_local = losses.dino_loss(s_global, s_local, teacher, student_temp=0.1)

    # Brute force: every (student view, teacher view) pair except same-view pairs; teachers are globals only.
    student_views = {f"g{v}": s_global[v * b:(v + 1) * b].tolist() for v in range(2)}
    student_views.update({f"l{i}": s_local[i * b:(i + 1) * b].tolist() for i in range(n_local)})
    teacher_views = {f"g{v}": teacher[v * b:(v + 1) * b].tolist() for v in range(2)}
    pairs = [(s, t) for s in student_views for t in teacher_views if s != t]
    assert len(pairs) == 18 and ("g0", "g0") not in pairs and ("g1", "g1") not in pairs
    ce = {(s, t): ref_cross_entropy(teacher_views[t], student_views[s], 0.1) for s, t in pairs}
    expected_global = sum(v for (s, _), v in ce.items() if s.startswith("g")) / len(pairs)
    expected_local = sum(v for (s, _), v in ce.items() if s.startswith("l")) / len(pairs)
    assert_close(loss_global, expected_global)
    assert_close(loss_local, expected_local)
    assert loss_global.dtype == loss_local.dtype == torch.float32


def test_dino_student_view_never_sees_its_own_teacher_view():
    # The gradient on student view-0 rows must not depend on teacher view 0 (and vice versa).
    torch.manual_seed(1)
    b, k = 4, 6
    teacher = torch.softmax(torch.randn(2 * b, k), dim=-1)
    other = teacher.clone()
    other[:b] = torch.softmax(torch.randn(b, k), dim=-1)  # change teacher view 0 only
    grads = []
    for t in (teacher, other):
        s = torch.randn(2 * b, k, generator=torch.Generator().manual_seed(2)).requires_grad_()
        losses.dino_loss(s, None, t)[0].backward()
        grads.append(s.grad)
    assert torch.equal(grads[0][:b], grads[1][:b])  # student view 0 only learns from teacher view 1
    assert not torch.equal(grads[0][b:], grads[1][b:])


def test_dino_loss_without_local_crops():
    torch.manual_seed(3)
    b, k = 2, 5
    s = torch.randn(2 * b, k)
    t = torch.softmax(torch.randn(2 * b, k), dim=-1)
    loss_global, loss_local = losses.dino_loss(s, None, t)
    expected = (ref_cross_entropy(t[b:].tolist(), s[:b].tolist(), 0.1)
                + ref_cross_entropy(t[:b].tolist(), s[b:].tolist(), 0.1)) / 2  # n_terms = 2
    assert_close(loss_global, expected)
    assert loss_local.item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Teacher targets


def test_softmax_centering_old_center_then_ema_lazy_order():
    torch.manual_seed(4)
    k, temp, m = 5, 0.07, 0.9
    logits1, logits2 = torch.randn(6, k), torch.randn(4, k) + 1.0
    centering = losses.SoftmaxCentering(k, momentum=m)
    probs1 = centering(logits1, temp)
    center1 = centering.center.clone()
    probs2 = centering(logits2, temp)
    center2 = centering.center.clone()

    def ref_probs(rows, center):
        out = []
        for row in rows:
            z = [(v - c) / temp for v, c in zip(row, center)]
            e = [math.exp(v - max(z)) for v in z]
            out.append([v / sum(e) for v in e])
        return out

    def ref_ema(center, rows):
        return [m * c + (1 - m) * sum(r[j] for r in rows) / len(rows) for j, c in enumerate(center)]

    c0 = [0.0] * k
    c1 = ref_ema(c0, logits1.tolist())
    c2 = ref_ema(c1, logits2.tolist())
    assert_close(probs1, ref_probs(logits1.tolist(), c0))  # first call: the zero centre
    assert_close(center1, [c1])
    assert_close(probs2, ref_probs(logits2.tolist(), c1))  # second call: the centre of call 1 only
    assert_close(center2, [c2])
    # the centre is state: it is saved with the module
    assert "center" in centering.state_dict()


@pytest.mark.parametrize("n, k", [(12, 5), (6, 20)])
def test_sinkhorn_matches_released_loop(n, k):
    torch.manual_seed(5)
    logits = torch.randn(n, k) * 0.5  # |logit / 0.04| stays far from float64 overflow
    probs = losses.sinkhorn_knopp(logits, temp=0.04)
    assert probs.dtype == torch.float32 and not probs.requires_grad
    assert_close(probs, ref_sinkhorn_released(logits.numpy(), 0.04))
    assert_close(probs.sum(dim=1), np.ones(n))  # every sample is a distribution over prototypes


def test_sinkhorn_balances_prototypes():
    torch.manual_seed(6)
    n, k = 64, 8
    logits = torch.randn(n, k) * 0.2 + torch.randn(1, k)  # some prototypes favoured by every sample
    probs = losses.sinkhorn_knopp(logits, temp=0.1)
    softmax_mass = torch.softmax(logits / 0.1, dim=-1).sum(dim=0) * k / n
    mass = probs.sum(dim=0) * k / n  # 1 for a perfectly balanced prototype
    assert (softmax_mass - 1).abs().max() > 3.0  # the plain softmax is far from balanced
    assert (mass - 1).abs().max() < 0.15  # 3 iterations: roughly balanced
    mass = losses.sinkhorn_knopp(logits, temp=0.1, n_iterations=30).sum(dim=0) * k / n
    assert_close(mass, np.ones(k))  # converged: exactly balanced


def test_sinkhorn_does_not_overflow():
    torch.manual_seed(7)
    temp = 0.04
    logits = 10.0 + 0.05 * torch.randn(8, 6)  # exp(10 / 0.04) = exp(250): inf in fp32
    # the released fp32 code fails here
    q = torch.exp(logits / temp).T
    q = q / q.sum()
    assert not torch.isfinite(q).all()
    probs = losses.sinkhorn_knopp(logits, temp)
    assert_close(probs, ref_sinkhorn_log_domain(logits.numpy(), temp))
    # a mixed case: a few logits of 10 among small ones
    mixed = torch.randn(8, 6)
    mixed[0, 0], mixed[3, 2], mixed[5, 2] = 10.0, 10.0, 9.0
    probs = losses.sinkhorn_knopp(mixed, temp)
    assert_close(probs, ref_sinkhorn_log_domain(mixed.numpy(), temp))


def test_sinkhorn_with_no_rows():
    probs = losses.sinkhorn_knopp(torch.zeros(0, 9), temp=0.04)
    assert probs.shape == (0, 9)
    centering = losses.SoftmaxCentering(9)
    assert centering(torch.zeros(0, 9), 0.04).shape == (0, 9)
    assert torch.equal(centering.center, torch.zeros(1, 9))  # no token: centre unchanged, no NaN


# ---------------------------------------------------------------------------------------------------------------
# iBOT and KoLeo


def test_ibot_loss_normalisation_with_unmasked_crop():
    torch.manual_seed(8)
    b, n_tokens, k = 2, 6, 5
    masks = torch.zeros(2 * b, n_tokens, dtype=torch.bool)  # 2B global crops
    masks[0, [1, 2, 4]] = True  # crop 0: 3 masked tokens
    masks[2, [0]] = True  # crop 2: 1 masked token; crops 1 and 3: unmasked, yet counted in 2B
    masks[3, [0, 5]] = True
    mask_indices = masks.flatten().nonzero().flatten()  # (M,)
    per_crop = masks.sum(dim=1, keepdim=True).expand_as(masks).flatten()[mask_indices]
    mask_weights = 1.0 / per_crop.float()  # (M,) as the collate writes them
    m = mask_indices.numel()
    student = torch.randn(m, k) * 3
    teacher = torch.softmax(torch.randn(m, k), dim=-1)
    loss = losses.ibot_loss(student, teacher, mask_weights, n_global_crops=2 * b)

    # -(1/2B) * sum over crops of (mean over that crop's masked tokens of sum_k t log p)
    expected, j = 0.0, 0
    for crop in range(2 * b):
        token_terms = []
        for token in range(n_tokens):
            if masks[crop, token]:
                log_p = ref_log_softmax(student[j].tolist(), 0.1)
                token_terms.append(sum(t * lp for t, lp in zip(teacher[j].tolist(), log_p)))
                j += 1
        if token_terms:
            expected += sum(token_terms) / len(token_terms)
    expected = -expected / (2 * b)
    assert_close(loss, expected)


def test_ibot_loss_with_no_masked_token_is_zero_and_differentiable():
    student = torch.zeros(0, 5, requires_grad=True)
    loss = losses.ibot_loss(student, torch.zeros(0, 5), torch.zeros(0), n_global_crops=4)
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and student.grad.shape == (0, 5)


def ref_koleo(x):
    rows = []
    for row in np.asarray(x, dtype=np.float64):
        rows.append(row / max(math.sqrt(float((row ** 2).sum())), 1e-8))
    logs = []
    for i, xi in enumerate(rows):
        best, best_j = -math.inf, None
        for j, xj in enumerate(rows):
            if j != i and float(xi @ xj) > best:
                best, best_j = float(xi @ xj), j
        d = math.sqrt(sum((a - c + 1e-8) ** 2 for a, c in zip(xi, rows[best_j])))
        logs.append(math.log(d + 1e-8))
    return -sum(logs) / len(logs)


def test_koleo_matches_brute_force_nearest_neighbour():
    torch.manual_seed(9)
    x = torch.randn(7, 4) * 2
    assert_close(losses.koleo_loss(x), ref_koleo(x.numpy()))


def test_koleo_duplicates_finite_and_single_sample_zero():
    torch.manual_seed(10)
    x = torch.randn(5, 4)
    x[3] = x[1]  # two identical vectors: distance eps * sqrt(D), no log(0)
    x.requires_grad_()
    loss = losses.koleo_loss(x)
    assert_close(loss, ref_koleo(x.detach().numpy()))
    loss.backward()
    assert torch.isfinite(x.grad).all()
    one = torch.randn(1, 4, requires_grad=True)
    loss = losses.koleo_loss(one)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(one.grad, torch.zeros(1, 4))


# ---------------------------------------------------------------------------------------------------------------
# DINOHead


def test_dino_head_official_keys_shapes_and_init():
    in_dim, k, hidden, bottleneck = 12, 32, 16, 8
    head = losses.DINOHead(in_dim, k, hidden_dim=hidden, bottleneck_dim=bottleneck)
    official = losses.convert_official_head_keys(head.state_dict(), to_official=True)
    assert {key: tuple(v.shape) for key, v in official.items()} == {
        "mlp.0.weight": (hidden, in_dim), "mlp.0.bias": (hidden,),
        "mlp.2.weight": (hidden, hidden), "mlp.2.bias": (hidden,),
        "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
        "last_layer.weight_g": (k, 1), "last_layer.weight_v": (k, bottleneck),
    }
    # released names (with a prefix, as in a training checkpoint) load strictly after conversion
    prefixed = {"student.dino_head." + key: v for key, v in official.items()}
    converted = losses.convert_official_head_keys(prefixed)
    other = losses.DINOHead(in_dim, k, hidden_dim=hidden, bottleneck_dim=bottleneck)
    other.load_state_dict({key.removeprefix("student.dino_head."): v for key, v in converted.items()}, strict=True)
    x = torch.randn(2, 3, in_dim)
    assert head(x).shape == (2, 3, k)
    assert torch.equal(head(x), other(x))
    # init: g = 1 and trainable, every prototype of unit norm, MLP biases 0, no GELU after the last Linear
    g = head.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.equal(g, torch.ones(k, 1))
    assert_close(head.last_layer.weight.norm(dim=1), np.ones(k))
    assert all(torch.equal(head.mlp[i].bias, torch.zeros_like(head.mlp[i].bias)) for i in (0, 2, 4))
    assert isinstance(head.mlp[-1], torch.nn.Linear) and len(head.mlp) == 5


def test_dino_head_meta_build_and_gradients_reach_every_parameter():
    with torch.device("meta"):
        head = losses.DINOHead(10, 24, hidden_dim=16, bottleneck_dim=6)
    head.to_empty(device="cpu")
    head.init_weights()
    assert torch.equal(head.last_layer.parametrizations.weight.original0, torch.ones(24, 1))
    x = torch.randn(8, 10)
    teacher = torch.softmax(torch.randn(8, 24), dim=-1)
    loss_global, _ = losses.dino_loss(head(x), None, teacher)
    loss_global.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------
# Two gloo processes, each holding part of the batch, must give the single-process results on the whole batch.

WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    import losses

    from util.distributed import init
    init("cpu")  # the project's one process-group set-up (gloo on the CPU)
    rank = dist.get_rank()
    out = {"world_size": dist.get_world_size()}
    k = 7
    g = torch.Generator().manual_seed(0)  # every rank draws the same whole batch, then keeps its part
    dino = torch.randn(16, k, generator=g) * 2
    ibot = torch.randn(9, k, generator=g) * 2
    cls1, cls2, cls3 = (torch.randn(n, k, generator=g) for n in (10, 7, 4))
    parts = {  # name: (whole batch, rows of rank 0 | rows of rank 1)
        "dino_sk": (dino, 8),          # equal halves, as for the 2B cls logits
        "ibot_sk_3_6": (ibot, 3),      # unequal masked-token counts
        "ibot_sk_9_0": (ibot, 9),      # rank 1 holds no masked token
        "center_1": (cls1, 5), "center_2": (cls2, 2), "center_3": (cls3, 0),
    }
    local = {name: (x[:cut] if rank == 0 else x[cut:]) for name, (x, cut) in parts.items()}
    for name in ("dino_sk", "ibot_sk_3_6", "ibot_sk_9_0"):
        out[name] = losses.sinkhorn_knopp(local[name], temp=0.04)
    centering = losses.SoftmaxCentering(k)
    for name in ("center_1", "center_2", "center_3"):
        out[name] = centering(local[name], temp=0.07)
        out[name + "_center"] = centering.center.clone()
    out["inputs"] = {name: x for name, (x, cut) in parts.items()}
    torch.save(out, f"{sys.argv[1]}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
""")


def test_two_gloo_processes_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # --standalone: the rendezvous picks a free port, so parallel runs cannot collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    files = [tmp_path / f"rank{r}.pt" for r in range(2)]
    assert all(f.exists() for f in files), f"rank outputs missing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    r0, r1 = (torch.load(f) for f in files)
    assert r0["world_size"] == r1["world_size"] == 2
    inputs = r0["inputs"]
    for name in ("dino_sk", "ibot_sk_3_6", "ibot_sk_9_0"):
        single = losses.sinkhorn_knopp(inputs[name], temp=0.04)
        assert_close(torch.cat([r0[name], r1[name]]), single)
        assert not torch.isnan(r1[name]).any()
    centering = losses.SoftmaxCentering(7)
    for name in ("center_1", "center_2", "center_3"):
        single = centering(inputs[name], temp=0.07)
        assert_close(torch.cat([r0[name], r1[name]]), single)
        assert_close(r0[name + "_center"], centering.center)
        assert_close(r1[name + "_center"], centering.center)


# -----------------------------------------------------------------------------
# Collapse watch

def test_teacher_diagnostics_entropy_and_prototypes_used():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0]])
    entropy, used, _ = runlog.teacher_diagnostics(torch.cat([p, p]))  # two identical "views"
    assert_close(entropy, (math.log(2) + math.log(4) + 0.0) / 3)
    assert used.item() == 2  # argmaxes: 0, 0 (first of the ties), 2


def test_teacher_cross_view_correlation():
    torch.manual_seed(0)
    logits = torch.randn(64, 32) * 0.05  # near the uniform target, where rho matters
    view_shift = torch.randn(1, 32) * 0.1  # a per-prototype offset (what a centre or Sinkhorn-Knopp absorbs)

    def rho(a, b, temp=0.04):
        return runlog.teacher_diagnostics(torch.cat([(a / temp).softmax(-1), (b / temp).softmax(-1)]))[2].item()

    assert rho(logits, logits + view_shift) == pytest.approx(1.0, abs=1e-5)  # same deviations, other offsets
    assert rho(logits, -logits) == pytest.approx(-1.0, abs=1e-5)
    assert abs(rho(logits, torch.randn(64, 32) * 0.05)) < 0.1  # independent views
    # a mix: b = a + noise of the same size has correlation 1 / sqrt(2) in expectation
    noisy = logits + torch.randn(64, 32) * 0.05
    expected = np.corrcoef(_double_centre(logits).ravel(), _double_centre(noisy).ravel())[0, 1]
    assert rho(logits, noisy) == pytest.approx(expected, abs=1e-4)


def _double_centre(x):
    x = x.double().numpy()
    x = x - x.mean(0, keepdims=True)
    return x - x.mean(1, keepdims=True)


def test_collapse_alarm_fires_once_after_the_window_on_a_uniform_teacher():
    alarm = runlog.CollapseAlarm(n_prototypes=256, window=20)
    ln_k = math.log(256)
    messages = [alarm.update(step, 0.99 * ln_k, 30, 64) for step in range(10, 101, 10)]
    assert messages[:2] == [None, None]  # steps 10 and 20: the streak is 0 and 10 steps old
    assert messages[2] is not None and "uniform" in messages[2] and "--teacher-temp" in messages[2]
    assert all(m is None for m in messages[3:])  # once per symptom


def test_collapse_alarm_streak_restarts_and_healthy_teacher_is_silent():
    alarm = runlog.CollapseAlarm(n_prototypes=256, window=20)
    ln_k = math.log(256)
    # uniform for 10 steps, healthy once, uniform again: no streak reaches 20 steps
    for step, e in [(10, ln_k), (20, ln_k), (30, 0.5 * ln_k), (40, ln_k), (50, ln_k)]:
        assert alarm.update(step, e, 40, 64) is None
    healthy = runlog.CollapseAlarm(n_prototypes=256, window=20)
    assert all(healthy.update(s, 0.6 * ln_k, 40, 64) is None for s in range(0, 500, 10))


def test_collapse_alarm_few_prototypes_needs_a_batch_that_could_show_more():
    alarm = runlog.CollapseAlarm(n_prototypes=1024, window=20)
    assert [alarm.update(s, 0.1, 1, 64) for s in (0, 10)] == [None, None]
    message = alarm.update(20, 0.1, 1, 64)
    assert message is not None and "1 prototype(s) of 1024" in message and "sinkhorn" in message
    tiny_batch = runlog.CollapseAlarm(n_prototypes=1024, window=20)
    assert all(tiny_batch.update(s, 0.1, 1, 8) is None for s in range(0, 200, 10))  # 8 crops: one-hot is normal
