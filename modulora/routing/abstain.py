"""Knowing when no expert fits: a calibrated abstention for the retrieval and learned routers.

A router that always picks an expert hurts when none fits (experiment 3: out of domain,
retrieval top-1 scores under the uniform mixture). Each of these routers gives its best expert a
score (retrieval: the cosine similarity; learned: the softmax probability). Under a threshold,
the request is answered by a fallback policy the user names instead: the base model, the uniform
mixture of the library, or Arrow.

The threshold is fitted on the library's own tasks with no extra data: for each adapter's card
samples, the score of the best expert as routing would see it for an in-domain request (retrieval:
the sample left out of its adapter's vector; learned: a router trained without that share of
the memory) and for an out-of-domain one (the sample's own adapter left out). The threshold is
the one that best separates the two (balanced accuracy), lowered if needed so that at most
`max_in_domain` of in-domain requests abstain. It is stored with the router (retrieval: in the
library's derived data; learned: in the saved router) and shown in every routing trace.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch

from .experts import RoutingError

FALLBACKS = ("base", "uniform", "arrow")
DEFAULT_MAX_IN_DOMAIN = 0.05


@dataclass(frozen=True)
class Abstention:
    """A fitted threshold on the best expert's score, and how it was fitted."""
    policy: str                  # "retrieval" or "learned"
    score: str                   # what is compared: "cosine" or "probability"
    threshold: float
    in_domain_abstain: float     # share of the calibration's in-domain requests under the threshold
    out_of_domain_abstain: float  # ... and of its out-of-domain ones
    samples: int                 # calibration requests (each counted once in and once out of domain)
    adapters: int
    max_in_domain: float = DEFAULT_MAX_IN_DOMAIN
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Abstention":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Decision:
    """What the abstention made of one request: shown in `--explain` and the API's routing trace."""
    policy: str
    best: str            # the expert the router ranked first
    score: float
    threshold: float
    abstained: bool
    fallback: str        # the policy that answered instead, when abstained

    def as_dict(self) -> dict:
        return {"policy": self.policy, "best": self.best, "score": round(self.score, 6),
                "threshold": round(self.threshold, 6), "abstained": self.abstained,
                "fallback": self.fallback if self.abstained else None}

    def line(self) -> str:
        verdict = f"abstained -> {self.fallback}" if self.abstained else "routed"
        cmp = "<" if self.abstained else ">="
        return f"  {self.policy}: best {self.best} score {self.score:.3f} {cmp} threshold {self.threshold:.3f}: {verdict}"


def check_fallback(fallback) -> str | None:
    if fallback is not None and fallback not in FALLBACKS:
        raise RoutingError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    return fallback


def fit_threshold(in_domain: torch.Tensor, out_of_domain: torch.Tensor,
                  max_in_domain: float = DEFAULT_MAX_IN_DOMAIN) -> float:
    """The threshold with the best balanced accuracy (in-domain kept + out-of-domain abstained,
    halved), taken midway between neighbouring scores, then lowered to the `max_in_domain`
    quantile of the in-domain scores if it abstains on more of them."""
    if not 0 <= max_in_domain < 1:
        raise RoutingError(f"max_in_domain must be in [0, 1), got {max_in_domain!r}")
    ins, outs = in_domain.double().sort().values, out_of_domain.double().sort().values
    if len(ins) == 0 or len(outs) == 0:
        raise RoutingError("calibration needs in-domain and out-of-domain scores (at least two adapters "
                           "with two card samples each)")
    points = torch.cat([ins, outs]).unique()
    cands = torch.cat([points[:1] - 1e-6, (points[1:] + points[:-1]) / 2, points[-1:] + 1e-6])
    kept = 1 - torch.searchsorted(ins, cands).double() / len(ins)         # in-domain at or above
    abstained = torch.searchsorted(outs, cands).double() / len(outs)      # out-of-domain below
    best = cands[int(torch.argmax(kept + abstained))]
    floor = ins[min(int(max_in_domain * len(ins)), len(ins) - 1)]         # at most that share below
    return float(min(best, floor))


def fit(policy: str, score: str, in_domain: torch.Tensor, out_of_domain: torch.Tensor, adapters: int,
        max_in_domain: float = DEFAULT_MAX_IN_DOMAIN) -> Abstention:
    t = fit_threshold(in_domain, out_of_domain, max_in_domain)
    return Abstention(policy=policy, score=score, threshold=t,
                      in_domain_abstain=float((in_domain < t).double().mean()),
                      out_of_domain_abstain=float((out_of_domain < t).double().mean()),
                      samples=len(in_domain), adapters=adapters, max_in_domain=max_in_domain)


def decide(policy: str, abstention: Abstention | None, best: list[tuple[str, float]], fallback: str
           ) -> list[Decision]:
    """One Decision per request from its (best expert, score)."""
    if abstention is None:
        how = "modulora router calibrate" if policy == "retrieval" else "modulora router train"
        raise RoutingError(f"fallback={fallback!r} needs a calibrated threshold for the {policy} router; "
                           f"fit one: {how}")
    return [Decision(policy, name, s, abstention.threshold, s < abstention.threshold, fallback) for name, s in best]


def table(a: Abstention) -> str:
    """The fitted threshold as a small Markdown table."""
    rows = [("policy", a.policy), ("score", a.score), ("threshold", f"{a.threshold:.4f}"),
            ("in-domain requests abstained", f"{100 * a.in_domain_abstain:.1f}% (at most {100 * a.max_in_domain:.0f}%)"),
            ("out-of-domain requests abstained", f"{100 * a.out_of_domain_abstain:.1f}%"),
            ("calibration requests", f"{a.samples} from {a.adapters} adapters")]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


__all__ = ["Abstention", "Decision", "FALLBACKS", "check_fallback", "decide", "fit", "fit_threshold", "table"]
