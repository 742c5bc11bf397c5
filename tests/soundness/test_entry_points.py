"""Every construction of `constructions.CASES` through every entry point that reads a model.

One checker per entry point. The contract (issue 15):

* a refusal is an instance of `lipnets.errors.LipnetsError` (for `seqlip`,
  whose "does not apply" is a ValueError, a ValueError too); any other
  exception (RuntimeError, AssertionError, a plain TypeError...) fails;
* a bound is at least a lower bound measured here, independently of lipnets
  (float64 dense Jacobians at random points and difference quotients of random
  pairs), up to a relative 1e-9, and at least the exact constant in exact
  arithmetic (`fractions.Fraction`) where the case knows it;
* propagated output bounds contain the model's outputs at a few hundred points
  of each ball (l2 and l-infinity, boundary included);
* a local Lipschitz bound is at least every difference quotient of pairs in
  the ball;
* no point certified (by `certified_accuracy` in both modes, `certify_crown`,
  `certification_report`) is broken by `pgd_l2` at its radius;
* `to_vanilla` returns a model computing the same function (and leaves the
  original alone), or refuses;
* estimators (`autolip`, `seqlip`) only must not raise untyped errors;
* positive controls must be bounded (not refused) where flagged; NaN models
  must be refused with a message naming NaN; a wrong ``input_shape`` must be
  refused.
"""

from __future__ import annotations

import functools
import math
import traceback
from fractions import Fraction

import pytest
import torch
from torch.nn.utils import parametrize

import lipnets
from lipnets.errors import LipnetsError
from lipnets.estimators import autolip, pgd_l2, seqlip
from lipnets.propagation import crown_bounds, interval_bounds, local_lipschitz
from tests.soundness import constructions as C
from tests.soundness.constructions import CASES, F64, Built, Case

REL = 1e-9  # relative tolerance of bound checks
NORMS = (2.0, math.inf)
CERT_POINTS = 16
RADII = (0.02, 0.2, 1.0)  # radii of the certified_accuracy checks (attacked once per case)
CROWN_RADII = RADII[:2]  # radii of certify_crown and certification_report (a subset)
PGD_STEPS, PGD_RESTARTS = 12, 2


# ---------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return ""
    inner = [f for f in frames if "/lipnets/" in f.filename] or frames
    f = inner[-1]
    return f" (raised at {f.filename.split('/main/')[-1]}:{f.lineno} in {f.name})"


OUTCOMES: dict[str, list[str]] = {}  # "case | entry" -> outcomes (see conftest.py)


def _log(case: Case, entry: str, what: str) -> None:
    OUTCOMES.setdefault(f"{case.name} | {entry}", []).append(what)


def attempt(case: Case, entry: str, fn, *, also: tuple[type[BaseException], ...] = ()):
    """Run an entry point: its value, or None after a refusal that the case allows."""
    try:
        value = fn()
    except LipnetsError as e:
        _log(case, entry, f"refused {type(e).__name__}: {str(e)[:160]}")
        _refused(case, entry, e)
        return None
    except also as e:
        _log(case, entry, f"refused {type(e).__name__}: {str(e)[:160]}")
        _refused(case, entry, e)
        return None
    except Exception as e:
        _log(case, entry, f"UNTYPED {type(e).__name__}: {str(e)[:160]}")
        pytest.fail(
            f"[{case.name}] {entry} raised an untyped {type(e).__module__}."
            f"{type(e).__qualname__}: {e}{_where(e)}",
            pytrace=False,
        )
    _log(case, entry, f"returned {_short(value)}")
    if case.must_refuse is not None and entry in C.SOUND:
        pytest.fail(
            f"[{case.name}] {entry} returned {_short(value)} for a model holding "
            f"{case.must_refuse}; expected a typed refusal naming {case.must_refuse}",
            pytrace=False,
        )
    return value


def _refused(case: Case, entry: str, e: BaseException) -> None:
    if entry in case.must_bound:
        pytest.fail(
            f"[{case.name}] honest positive control refused by {entry}: {type(e).__name__}: {e}",
            pytrace=False,
        )
    if case.must_refuse is not None and entry in C.SOUND and case.must_refuse not in str(e):
        pytest.fail(
            f"[{case.name}] {entry} refused with {type(e).__name__} but the message does not "
            f"name {case.must_refuse}: {e}",
            pytrace=False,
        )


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}" if value.numel() > 1 else f"{float(value):.6g}"
    return type(value).__name__


# ---------------------------------------------------------------------------
# Independent measurements
# ---------------------------------------------------------------------------


def call(model, x: torch.Tensor) -> torch.Tensor:
    """The model's real output; a clone protects the caller from models that write to x."""
    with torch.no_grad(), parametrize.cached():
        return model(x.clone())


class CloneInput(torch.nn.Module):
    """``model(x.clone())``: what the attack runs, so that models writing to their input
    cannot move the attack's points."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.clone())


def _randn(shape, g, scale=1.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=F64) * scale


def per_sample(case: Case, built: Built) -> bool:
    return not case.coupled and (built.classes is not None or built.shape[0] > 1)


def sample_shape(built: Built) -> tuple[int, ...]:
    """One sample with a batch dimension of 1 (what the estimators take)."""
    return (1, *built.shape[1:])


@functools.cache
def measured_lower(name: str) -> tuple[float, str]:
    """A lower bound on the l2 Lipschitz constant of the batch map at the case's shape.

    Largest spectral norm of dense float64 Jacobians at random points (three
    scales) and largest difference quotient of random pairs (gaps 1e-4..1),
    which sees jumps that Jacobians cannot.
    """
    case = C.BY_NAME[name]
    built = case.final()
    model, shape = built.model, built.shape
    g = torch.Generator().manual_seed(case.seed() + 1)

    def f(t):
        return model(t.clone()).reshape(-1)

    with parametrize.cached():
        return _measure(case, model, shape, f, g)


def _measure(case, model, shape, f, g) -> tuple[float, str]:
    best, witness = 0.0, "none"
    vectorize = True
    for scale in (0.1, 1.0, 3.0):
        for _ in range(3):
            p = _randn(shape, g, scale * case.scale)
            try:
                jac = torch.autograd.functional.jacobian(f, p, vectorize=vectorize)
            except Exception:
                try:
                    vectorize = False
                    jac = torch.autograd.functional.jacobian(f, p)
                except Exception:
                    break
            jac = jac.reshape(-1, p.numel())
            if not bool(torch.isfinite(jac).all()):  # a NaN model: nothing to measure
                return math.nan, "non-finite Jacobian"
            value = float(torch.linalg.matrix_norm(jac, ord=2))
            if value > best or math.isnan(value):
                best, witness = value, f"Jacobian norm at a point of scale {scale}"
    for k in range(36):
        u = _randn(shape, g, case.scale * (0.1, 1.0, 3.0)[k % 3])
        gap = 10.0 ** (-4 + 4 * torch.rand((), generator=g, dtype=F64).item())
        d = _randn(shape, g)
        d = d * (gap * case.scale / float(d.norm()))
        value = float((call(model, u + d) - call(model, u)).norm() / d.norm())
        if value > best or math.isnan(value):
            best, witness = value, f"difference quotient at gap {gap:.2g}"
    return best, witness


def check_bound(case: Case, built: Built, entry: str, bound) -> None:
    value = float(bound)
    lower, witness = measured_lower(case.name)
    _log(case, entry, f"bound {value!r} vs lower {lower!r}")
    if math.isnan(value):
        pytest.fail(f"[{case.name}] {entry} returned a NaN bound", pytrace=False)
    if value * (1 + REL) < lower:
        pytest.fail(
            f"[{case.name}] UNSOUND: {entry} gave {value!r} < measured lower bound "
            f"{lower!r} ({witness}; ratio {lower / value if value else math.inf:.4g})",
            pytrace=False,
        )
    if (
        built.exact_sq is not None
        and math.isfinite(value)
        and Fraction(value) ** 2 < built.exact_sq
    ):
        pytest.fail(
            f"[{case.name}] UNSOUND (rounding): {entry} gave {value!r}, whose square is below "
            f"the exact squared constant {built.exact_sq} (sqrt = "
            f"{math.sqrt(built.exact_sq):.17g})",
            pytrace=False,
        )


# ---------------------------------------------------------------------------
# Sampling balls
# ---------------------------------------------------------------------------


def centres(case: Case, built: Built, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.seed() + 2)
    shape = (n, *built.shape[1:]) if per_sample(case, built) else built.shape
    return _randn(shape, g, case.scale)


def ball_deltas(x: torch.Tensor, eps: float, norm: float, m: int, g) -> torch.Tensor:
    """(m, *x.shape) perturbations, each sample's within its ball: a quarter on the
    boundary (the sphere, or the cube's corners), the rest inside or on the faces."""
    shape = (m, *x.shape)
    d = _randn(shape, g)
    flat = d.reshape(m, x.shape[0], -1)
    dim = flat.shape[-1]
    if norm == 2:
        unit = flat / flat.norm(dim=-1, keepdim=True)
        r = torch.rand((m, x.shape[0], 1), generator=g, dtype=F64) ** (1.0 / dim)
        r[: m // 4] = 1.0
        out = unit * r * eps
    else:
        out = (torch.rand(flat.shape, generator=g, dtype=F64) * 2 - 1) * eps
        out[: m // 4] = torch.sign(out[: m // 4]) * eps  # corners
        faces = slice(m // 4, m // 2)
        idx = torch.randint(0, dim, (m // 2 - m // 4, x.shape[0], 1), generator=g)
        out[faces] = out[faces].scatter(-1, idx, eps)
    out[0] = 0.0  # the centre itself
    return out.reshape(shape)


def outputs_at(model, x: torch.Tensor, deltas: torch.Tensor, batched: bool) -> torch.Tensor:
    m = deltas.shape[0]
    if batched:
        pts = (x.unsqueeze(0) + deltas).reshape(m * x.shape[0], *x.shape[1:])
        out = call(model, pts)
        return out.reshape(m, x.shape[0], *out.shape[1:])
    return torch.stack([call(model, x + deltas[k]) for k in range(m)])


def _eps(case: Case) -> float:
    return 0.1 * case.scale


def check_propagation(case: Case, built: Built, entry: str, fn) -> None:
    x = centres(case, built)
    eps = _eps(case)
    g = torch.Generator().manual_seed(case.seed() + 3)
    problems = []
    for norm in NORMS:
        bounds = attempt(case, entry, lambda q=norm: fn(built.model, x.clone(), eps, norm=q))
        if bounds is None:
            continue
        lower, upper = bounds
        deltas = ball_deltas(x, eps, norm, 48, g)
        out = outputs_at(built.model, x, deltas, per_sample(case, built))
        if lower.shape != out.shape[1:] or upper.shape != out.shape[1:]:
            problems.append(
                f"norm={norm}: bounds of shape {tuple(lower.shape)} for outputs of shape "
                f"{tuple(out.shape[1:])}"
            )
            continue
        tol = 1e-9 * (1 + float(out.abs().max()))
        below = float((lower - out).max())
        above = float((out - upper).max())
        if not (below <= tol and above <= tol):  # NaN bounds fail too
            problems.append(
                f"norm={norm}, eps={eps}: outputs leave [lower, upper] by "
                f"{max(below, above):.6g} (below lower by {below:.6g}, above upper by "
                f"{above:.6g}; {deltas.shape[0] * x.shape[0]} sampled points)"
            )
    if problems:
        pytest.fail(f"[{case.name}] UNSOUND {entry}: " + "; ".join(problems), pytrace=False)


def check_local(case: Case, built: Built, entry: str) -> None:
    x = centres(case, built)
    eps = _eps(case)
    g = torch.Generator().manual_seed(case.seed() + 4)
    batched = per_sample(case, built)
    problems = []
    for norm in NORMS:
        bound = attempt(
            case, entry, lambda q=norm: local_lipschitz(built.model, x.clone(), eps, norm=q)
        )
        if bound is None:
            continue
        bound = torch.as_tensor(bound, dtype=F64).reshape(-1)
        a = ball_deltas(x, eps, norm, 32, g)
        far = ball_deltas(x, eps, norm, 32, g)
        near = a + _randn(a.shape, g) * (eps * 1e-3)
        near = _project(near, eps, norm)
        worst = torch.zeros(x.shape[0], dtype=F64)
        fa = outputs_at(built.model, x, a, batched)
        for b in (far, near):
            fb = outputs_at(built.model, x, b, batched)
            num = (fa - fb).reshape(fa.shape[0], x.shape[0], -1).norm(dim=-1)
            den = (a - b).reshape(a.shape[0], x.shape[0], -1).norm(dim=-1)
            # Subtracting outputs loses ~ machine eps * |f|; allowed for, relative to the gap.
            size = torch.maximum(
                fa.reshape(*num.shape, -1).abs().amax(-1),
                fb.reshape(*num.shape, -1).abs().amax(-1),
            )
            num = (num - 8 * torch.finfo(F64).eps * size * fa[0, 0].numel() ** 0.5).clamp_min(0)
            q = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
            worst = torch.maximum(worst, q.max(dim=0).values)
        if bound.numel() != x.shape[0]:
            problems.append(f"norm={norm}: {bound.numel()} bounds for {x.shape[0]} centres")
            continue
        bad = ~(worst <= bound * (1 + REL) + 1e-12)
        if bad.any():
            i = int(bad.nonzero()[0])
            problems.append(
                f"norm={norm}, eps={eps}: centre {i} has local bound {float(bound[i])!r} < "
                f"difference quotient {float(worst[i])!r} ({int(bad.sum())}/{x.shape[0]} centres)"
            )
    if problems:
        pytest.fail(f"[{case.name}] UNSOUND {entry}: " + "; ".join(problems), pytrace=False)


def _project(d: torch.Tensor, eps: float, norm: float) -> torch.Tensor:
    if norm == 2:
        flat = d.reshape(d.shape[0], d.shape[1], -1)
        n = flat.norm(dim=-1, keepdim=True)
        return (flat * torch.clamp(eps / n, max=1.0)).reshape(d.shape)
    return d.clamp(-eps, eps)


# ---------------------------------------------------------------------------
# Certification
# ---------------------------------------------------------------------------


def _margin(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s = scores.reshape(scores.shape[0], -1)
    own = s.gather(1, y[:, None]).squeeze(1)
    others = s.scatter(1, y[:, None], -math.inf)
    return own - others.max(dim=1).values


class Attack:
    """`pgd_l2` at each radius; points it cannot break are robust (empirically).

    One instance per case (`attack_for`), so the certification checkers share its attacks.
    """

    def __init__(self, case: Case, built: Built, x: torch.Tensor, y: torch.Tensor) -> None:
        self.case, self.model, self.x, self.y = case, built.model, x, y
        self.cache: dict[float, torch.Tensor] = {}
        self.correct = _margin(call(self.model, x), y) > 0

    def robust(self, eps: float) -> torch.Tensor:
        if eps not in self.cache:
            g = torch.Generator().manual_seed(self.case.seed() + 6)

            try:
                adv = pgd_l2(
                    CloneInput(self.model),
                    self.x.clone(),
                    self.y,
                    eps,
                    steps=PGD_STEPS,
                    restarts=PGD_RESTARTS,
                    generator=g,
                )
                candidates = [adv]
            except Exception:
                candidates = []
            # Random points of the ball and its sphere as well: they need no gradient.
            deltas = ball_deltas(self.x, eps, 2.0, 8, g)
            candidates += [self.x + d for d in deltas]
            broken = torch.zeros_like(self.correct)
            for pts in candidates:
                inside = (pts - self.x).reshape(len(pts), -1).norm(dim=1) <= eps * (1 + 1e-9)
                broken |= inside & ~(_margin(call(self.model, pts), self.y) > 0)
            self.cache[eps] = self.correct & ~broken
        return self.cache[eps]


@functools.cache
def cert_points(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The certification points of a case and their labels: the model's own predictions
    (class 0 where the model cannot run, e.g. a Björck layer holding NaN)."""
    case = C.BY_NAME[name]
    built = case.final()
    g = torch.Generator().manual_seed(case.seed() + 5)
    x = _randn((CERT_POINTS, *built.shape[1:]), g, case.scale)
    try:
        y = call(built.model, x).reshape(CERT_POINTS, -1).argmax(dim=1)
    except Exception:
        y = torch.zeros(CERT_POINTS, dtype=torch.long)
    return x, y


@functools.cache
def attack_for(name: str) -> Attack:
    """The attack on a case's certification points, on a model of its own (built once,
    never handed to lipnets), shared by the certification checkers."""
    case = C.BY_NAME[name]
    x, y = cert_points(name)
    return Attack(case, case.final(), x, y)


def check_certified_accuracy(case: Case, built: Built, entry: str, mode: str) -> None:
    x, y = cert_points(case.name)
    acc = attempt(
        case,
        entry,
        lambda: lipnets.certify.certified_accuracy(
            built.model, x.clone(), y.clone(), list(RADII), mode=mode
        ),
    )
    if acc is None:
        return
    attack = attack_for(case.name)
    problems = []
    for eps in RADII:
        certified = round(float(acc[eps]) * CERT_POINTS)
        robust = int(attack.robust(eps).sum())
        if certified > robust:
            problems.append(
                f"eps={eps}: {certified}/{CERT_POINTS} certified, but pgd_l2 "
                f"breaks all but {robust}"
            )
    if problems:
        pytest.fail(f"[{case.name}] UNSOUND {entry}: " + "; ".join(problems), pytrace=False)
    if case.must_bound and entry in case.must_bound and round(acc[RADII[0]] * CERT_POINTS) == 0:
        pytest.fail(
            f"[{case.name}] positive control: {entry} certifies no point at "
            f"eps={RADII[0]} (vacuous)",
            pytrace=False,
        )


def check_certify_crown(case: Case, built: Built, entry: str) -> None:
    x, y = cert_points(case.name)
    problems, total = [], 0
    for norm in NORMS:
        for eps in CROWN_RADII:
            cert = attempt(
                case,
                entry,
                lambda r=eps, q=norm: lipnets.certify.certify_crown(
                    built.model, x.clone(), y.clone(), r, norm=q
                ),
            )
            if cert is None:
                continue
            cert = torch.as_tensor(cert, dtype=torch.bool).reshape(-1)
            attack = attack_for(case.name)
            total += int(cert.sum())
            # The l2 ball of radius eps lies inside the l-inf ball: pgd_l2 witnesses both.
            bad = cert & ~attack.robust(eps)
            if bad.any():
                problems.append(
                    f"norm={norm}, eps={eps}: {int(bad.sum())} of "
                    f"{int(cert.sum())} certified points broken by pgd_l2"
                )
    if problems:
        pytest.fail(f"[{case.name}] UNSOUND {entry}: " + "; ".join(problems), pytrace=False)
    if entry in case.must_bound and total == 0:
        pytest.fail(
            f"[{case.name}] positive control: certify_crown certifies nothing", pytrace=False
        )


def check_certification_report(case: Case, built: Built, entry: str) -> None:
    x, y = cert_points(case.name)
    g = torch.Generator().manual_seed(case.seed() + 7)
    rep = attempt(
        case,
        entry,
        lambda: lipnets.certification_report(
            built.model,
            x.clone(),
            y.clone(),
            list(CROWN_RADII),
            attack_steps=10,
            attack_restarts=1,
            generator=g,
        ),
    )
    if rep is None:
        return
    check_bound(case, built, f"{entry}.lipschitz_bound", rep.lipschitz_bound)
    attack = attack_for(case.name)
    problems = []
    for row in rep.rows:
        robust = int(attack.robust(row.eps).sum())
        for what, count in (("lipschitz", row.lipschitz_count), ("crown", row.crown_count)):
            if count > robust:
                problems.append(
                    f"eps={row.eps}: {what}-certified {count}/{CERT_POINTS}, but "
                    f"pgd_l2 breaks all but {robust}"
                )
        if row.broken_certified:
            problems.append(
                f"eps={row.eps}: the report's own attack broke "
                f"{row.broken_certified} certified points"
            )
    if problems:
        pytest.fail(f"[{case.name}] UNSOUND {entry}: " + "; ".join(problems), pytrace=False)


# ---------------------------------------------------------------------------
# Checkers
# ---------------------------------------------------------------------------


def check_lipschitz(case: Case, built: Built, entry: str) -> None:
    shape = built.shape if entry == C.LIPSCHITZ_SHAPE else None
    bound = attempt(case, entry, lambda: lipnets.lipschitz_bound(built.model, input_shape=shape))
    if bound is not None:
        check_bound(case, built, entry, bound)


def _check_estimate(case: Case, entry: str, value) -> None:
    if case.must_refuse is not None:
        return
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or math.isnan(float(value)):
        pytest.fail(
            f"[{case.name}] {entry} returned {value!r}, not a 0-dim non-NaN tensor", pytrace=False
        )


def check_autolip(case: Case, built: Built, entry: str) -> None:
    g = torch.Generator().manual_seed(case.seed() + 8)
    value = attempt(
        case, entry, lambda: autolip(built.model, sample_shape(built), iters=30, generator=g)
    )
    if value is not None:
        _check_estimate(case, entry, value)


def check_seqlip(case: Case, built: Built, entry: str) -> None:
    g = torch.Generator().manual_seed(case.seed() + 9)
    value = attempt(
        case,
        entry,
        lambda: seqlip(built.model, sample_shape(built), generator=g),
        also=(ValueError,),
    )
    if value is not None:
        _check_estimate(case, entry, value)


def check_report(case: Case, built: Built, entry: str) -> None:
    x = centres(case, built, n=2)
    g = torch.Generator().manual_seed(case.seed() + 10)
    rep = attempt(
        case,
        entry,
        lambda: lipnets.report(
            built.model, x.clone(), steps=1, restarts=1, seqlip_max_width=64, generator=g
        ),
    )
    if rep is not None:
        check_bound(case, built, f"{entry}.bound", rep.bound)


def check_to_vanilla(case: Case, built: Built, entry: str) -> None:
    plain = attempt(case, entry, lambda: lipnets.to_vanilla(built.model))
    if plain is None:
        return
    g = torch.Generator().manual_seed(case.seed() + 11)
    problems = []
    for k in range(4):
        x = _randn(
            (8, *built.shape[1:]) if per_sample(case, built) else built.shape,
            g,
            case.scale * (0.3, 1.0, 3.0, 10.0)[k],
        )
        try:
            before = call(built.model, x)
        except Exception as e:
            try:
                out = call(plain, x)
            except Exception:
                continue
            pytest.fail(
                f"[{case.name}] the model raises {type(e).__name__} ({e}) but its "
                f"export computes outputs of shape {tuple(out.shape)}",
                pytrace=False,
            )
        try:
            out = call(plain, x)
        except Exception as e:
            pytest.fail(
                f"[{case.name}] the exported model raised {type(e).__name__}: {e}", pytrace=False
            )
        after = call(built.model, x)
        if not torch.allclose(before, after, rtol=0, atol=0, equal_nan=True):
            problems.append("to_vanilla changed the original model")
        if out.shape != before.shape or not torch.allclose(
            out, before, rtol=1e-7, atol=1e-9, equal_nan=True
        ):
            if out.shape != before.shape:
                what = f"outputs of shape {tuple(out.shape)} for {tuple(before.shape)}"
            else:
                what = f"max |diff| {float((out - before).abs().max()):.6g}"
            problems.append(
                f"exported model computes another function ({what} at output scale "
                f"{float(before.abs().max()):.3g})"
            )
            break
    if problems:
        pytest.fail(
            f"[{case.name}] UNSOUND {entry}: " + "; ".join(dict.fromkeys(problems)), pytrace=False
        )


def check_wrong_shape(case: Case, built: Built, entry: str) -> None:
    wrong = case.wrong_shape
    problems = []
    for name, fn in (
        ("lipschitz_bound", lambda: lipnets.lipschitz_bound(built.model, input_shape=wrong)),
        ("autolip", lambda: autolip(built.model, wrong, iters=10)),
        ("seqlip", lambda: seqlip(built.model, wrong)),
    ):
        try:
            value = fn()
        except LipnetsError:
            continue
        except Exception as e:
            problems.append(
                f"{name} raised an untyped {type(e).__module__}."
                f"{type(e).__qualname__}: {e}{_where(e)}"
            )
            continue
        problems.append(f"{name} returned {_short(value)} for input_shape={wrong}")
    if problems:
        pytest.fail(
            f"[{case.name}] wrong input_shape {wrong} not refused with a typed error: "
            + "; ".join(problems),
            pytrace=False,
        )


CHECKERS = {
    C.LIPSCHITZ: check_lipschitz,
    C.LIPSCHITZ_SHAPE: check_lipschitz,
    C.AUTOLIP: check_autolip,
    C.SEQLIP: check_seqlip,
    C.IBP: lambda case, built, entry: check_propagation(case, built, entry, interval_bounds),
    C.CROWN: lambda case, built, entry: check_propagation(case, built, entry, crown_bounds),
    C.LOCAL: check_local,
    C.CERT_VECTOR: lambda case, built, entry: check_certified_accuracy(
        case, built, entry, "vector"
    ),
    C.CERT_LAST: lambda case, built, entry: check_certified_accuracy(
        case, built, entry, "last_layer"
    ),
    C.CERT_CROWN: check_certify_crown,
    C.REPORT: check_report,
    C.CERT_REPORT: check_certification_report,
    C.VANILLA: check_to_vanilla,
    C.WRONG_SHAPE: check_wrong_shape,
}

PAIRS = [(case.name, entry) for case in CASES for entry in case.entry_points(case.build())]


def test_table_size() -> None:
    """Issue 15: the six known routes and at least 40 further constructions, with controls."""
    routes = {case.route for case in CASES if case.route is not None}
    assert routes == {1, 2, 3, 4, 5, 6}
    assert len([case for case in CASES if case.route is None]) >= 40
    assert any(case.must_bound for case in CASES)
    assert set(CHECKERS) >= {entry for _, entry in PAIRS}


def warm(case: Case, built: Built) -> None:
    """A first pass through lipnets (it may cache the traced graph), outcome ignored."""
    x = centres(case, built)
    calls = [
        lambda: lipnets.lipschitz_bound(built.model, input_shape=built.shape),
        lambda: lipnets.lipschitz_bound(built.model, input_shape=sample_shape(built)),
        lambda: lipnets.lipschitz_bound(built.model),
        lambda: interval_bounds(built.model, x, 0.1, norm=2),
    ]
    if built.classes is not None:
        xc, yc = cert_points(case.name)
        calls.append(lambda: lipnets.certify.certified_accuracy(built.model, xc, yc, 0.1))
    for fn in calls:
        try:
            fn()
        except Exception:
            pass


@pytest.mark.parametrize(("case_name", "entry"), PAIRS, ids=[f"{c}-{e}" for c, e in PAIRS])
def test_entry_point(case_name: str, entry: str) -> None:
    case = C.BY_NAME[case_name]
    if case.mutate is not None:
        # Measurements build (and mutate) models of their own: do it before this test's
        # model exists, so that a change to shared state (SETTINGS) precedes the warm pass.
        measured_lower(case_name)
        if case.final().classes is not None:
            attack_for(case_name)
    built = case.build()
    if case.mutate is not None:
        warm(case, built)
        case.mutate(built.model)
    CHECKERS[entry](case, built, entry)
