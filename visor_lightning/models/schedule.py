"""The one place that knows which LLM layer plays which role (method note, Eq. 3).

A layer is one of: self-attention over [V; T] (SA, visual tokens refined), cross-attention (CA, a new block in
front of the layer's text-only pass, text reads the latest V) or text-only. SA layers are *candidates*: a
configuration names which of them run; the rest fall back to text-only. ``always_on_sa`` run in every
configuration, and the policy (router) sits in front of the first optional SA layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

FeasibleSpec = Literal["counts", "all"] | list[list[int]]


@dataclass
class ScheduleConfig:
    """User-facing schedule knobs (YAML ``model.schedule``); ``None`` means "uniform default".

    Defaults follow the method note: |L_CA| = |L_SA| = L/3, CA spread uniformly, one SA candidate in front of
    each CA layer, the first SA layer always on, feasible set = one configuration per SA count.
    """

    num_ca: int | None = None  # CA layers, spread uniformly (default L/3)
    num_sa: int | None = None  # SA candidate layers (default: as many as CA layers)
    ca_layers: list[int] | None = None  # explicit CA layer indices (override num_ca)
    sa_layers: list[int] | None = None  # explicit SA candidate indices (override num_sa)
    always_on_sa: list[int] | None = None  # SA layers every configuration runs (default: the first candidate)
    feasible: FeasibleSpec = "counts"  # "counts" (one per SA count), "all" (every subset) or explicit layer lists


def _uniform_blocks(num_layers: int, num_blocks: int) -> list[int]:
    """Start index of ``num_blocks`` near-equal contiguous blocks covering ``num_layers`` layers."""
    return [(b * num_layers) // num_blocks for b in range(num_blocks)]


def _spread(items: Sequence[int], k: int) -> list[int]:
    """``k`` of ``items`` spread evenly (all of them when k == len(items), none when k == 0)."""
    n = len(items)
    if k <= 0:
        return []
    return [items[min(n - 1, int((i + 0.5) * n / k))] for i in range(k)]


DENSE = "dense"  # the name of a dense model's only configuration (every layer self-attends over visual tokens)


def config_name(active: Sequence[int]) -> str:
    """Stable, human-readable name of a configuration: the active SA layer indices."""
    return "sa[" + ",".join(str(i) for i in sorted(active)) + "]"


@dataclass(frozen=True)
class LayerSchedule:
    """Resolved, validated layer roles for an ``num_layers``-layer LLM."""

    num_layers: int
    ca_layers: tuple[int, ...]
    sa_layers: tuple[int, ...]
    always_on_sa: tuple[int, ...]
    feasible: tuple[tuple[int, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        L = self.num_layers
        if L < 1:
            raise ValueError(f"schedule.num_layers must be >= 1, got {L}")
        for name in ("ca_layers", "sa_layers", "always_on_sa"):
            idx = getattr(self, name)
            bad = [i for i in idx if not 0 <= i < L]
            if bad:
                raise ValueError(f"schedule.{name} has indices {bad} outside [0, {L}) for a {L}-layer model")
            if len(set(idx)) != len(idx):
                raise ValueError(f"schedule.{name} has duplicate indices: {list(idx)}")
        overlap = sorted(set(self.ca_layers) & set(self.sa_layers))
        if overlap:
            raise ValueError(f"schedule.ca_layers and schedule.sa_layers overlap at {overlap}: a layer has one role")
        extra = sorted(set(self.always_on_sa) - set(self.sa_layers))
        if extra:
            raise ValueError(f"schedule.always_on_sa {extra} are not in schedule.sa_layers {list(self.sa_layers)}")
        if not self.feasible:
            raise ValueError("schedule.feasible is empty: at least one configuration is needed")
        for cfg in self.feasible:
            if not set(cfg) <= set(self.sa_layers):
                raise ValueError(f"schedule.feasible entry {list(cfg)} uses layers outside sa_layers {list(self.sa_layers)}")
            if not set(self.always_on_sa) <= set(cfg):
                raise ValueError(f"schedule.feasible entry {list(cfg)} misses always-on SA layers {list(self.always_on_sa)}")
        if len(set(self.feasible)) != len(self.feasible):
            raise ValueError("schedule.feasible has duplicate configurations")

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def build(cls, num_layers: int, cfg: ScheduleConfig | None = None) -> "LayerSchedule":
        """Resolve a :class:`ScheduleConfig` (uniform defaults) into explicit indices."""
        cfg = cfg or ScheduleConfig()
        if num_layers < 1:
            raise ValueError(f"schedule.num_layers must be >= 1, got {num_layers}")
        n_ca = cfg.num_ca if cfg.num_ca is not None else max(1, num_layers // 3)
        n_sa = cfg.num_sa if cfg.num_sa is not None else n_ca
        for name, n in (("num_ca", n_ca), ("num_sa", n_sa)):
            if not 0 <= n <= num_layers:
                raise ValueError(f"schedule.{name}={n} must be in [0, {num_layers}]")
        if cfg.ca_layers is not None:
            ca = list(cfg.ca_layers)
        elif n_ca:
            # one block per CA layer; SA candidate first, CA second, so each CA reads freshly refined V
            if num_layers < 2 * n_ca:
                raise ValueError(f"schedule.num_ca={n_ca} needs at least {2 * n_ca} layers, model has {num_layers}")
            ca = [s + 1 for s in _uniform_blocks(num_layers, n_ca)]
        else:
            ca = []
        if cfg.sa_layers is not None:
            sa = list(cfg.sa_layers)
        else:
            free = [i for i in range(num_layers) if i not in set(ca)]
            # prefer the layer right before each CA layer, then spread the rest evenly over the free layers
            preferred = [c - 1 for c in ca if c - 1 in free][:n_sa]
            rest = [i for i in free if i not in preferred]
            sa = sorted(preferred + _spread(rest, n_sa - len(preferred)))
        always = list(cfg.always_on_sa) if cfg.always_on_sa is not None else sa[:1]
        optional = [i for i in sorted(sa) if i not in set(always)]
        if isinstance(cfg.feasible, str):
            if cfg.feasible == "counts":
                feas = [tuple(sorted(always + _spread(optional, k))) for k in range(len(optional) + 1)]
            elif cfg.feasible == "all":
                if len(optional) > 12:
                    raise ValueError(f"schedule.feasible='all' with {len(optional)} optional SA layers is too many")
                feas = [
                    tuple(sorted(always + [o for j, o in enumerate(optional) if mask >> j & 1]))
                    for mask in range(2 ** len(optional))
                ]
                feas.sort(key=lambda c: (len(c), c))
            else:
                raise ValueError(f"schedule.feasible must be 'counts', 'all' or a list of layer lists, got {cfg.feasible!r}")
        else:
            feas = [tuple(sorted(c)) for c in cfg.feasible]
        return cls(num_layers, tuple(sorted(ca)), tuple(sorted(sa)), tuple(sorted(always)), tuple(feas))

    @classmethod
    def dense(cls, num_layers: int) -> "LayerSchedule":
        """Every layer SA, no CA: the host model itself (used for parity and as the FLOPs baseline)."""
        all_layers = tuple(range(num_layers))
        return cls(num_layers, (), all_layers, all_layers, (all_layers,))

    # ---- queries ------------------------------------------------------------------------------------
    @property
    def optional_sa(self) -> tuple[int, ...]:
        return tuple(i for i in self.sa_layers if i not in set(self.always_on_sa))

    @property
    def router_layer(self) -> int | None:
        """Index of the layer in front of which the policy decides (the first optional SA layer)."""
        opt = self.optional_sa
        return opt[0] if opt and len(self.feasible) > 1 else None

    @property
    def is_dense(self) -> bool:
        """No CA layers and every layer SA: the host model (LLaVA-OV) itself."""
        return not self.ca_layers and len(self.sa_layers) == self.num_layers

    @property
    def names(self) -> list[str]:
        """Configuration names: ``sa[...]`` (the active SA layers); ``dense`` for a dense model's all-SA one."""
        full = tuple(range(self.num_layers))
        return [DENSE if self.is_dense and c == full else config_name(c) for c in self.feasible]

    @property
    def full_config(self) -> int:
        """Index of the feasible configuration with the most SA layers (the 'maximal' model)."""
        return max(range(len(self.feasible)), key=lambda i: (len(self.feasible[i]), -i))

    def index(self, name_or_layers: str | Sequence[int]) -> int:
        """Feasible-configuration index from its name or its active SA layers."""
        key = name_or_layers if isinstance(name_or_layers, str) else config_name(name_or_layers)
        if key in self.names:
            return self.names.index(key)
        aliases = [config_name(c) for c in self.feasible]  # a dense model's ``dense`` is also its sa[0,...,L-1]
        if key in aliases:
            return aliases.index(key)
        if key == DENSE:
            raise ValueError(f"configuration 'dense' names a dense model's only configuration; this model has CA "
                             f"layers {list(self.ca_layers)} (evaluate the dense base's weights for the dense row); "
                             f"feasible: {self.names}")
        raise ValueError(f"configuration {key!r} is not feasible; feasible: {self.names}")

    def canonical(self, name: str) -> str:
        """The name :attr:`names` reports for ``name`` (``sa[0,...,L-1]`` on a dense model -> ``dense``)."""
        return self.names[self.index(name)]

    def role(self, layer: int) -> str:
        if layer in self.ca_layers:
            return "ca"
        if layer in self.sa_layers:
            return "sa"
        return "text"

    def active_mask(self, config_ids: torch.Tensor) -> torch.Tensor:
        """[B] feasible-configuration ids -> [B, num_layers] bool, True where that sample runs SA."""
        table = torch.zeros(len(self.feasible), self.num_layers, dtype=torch.bool)
        for i, cfg in enumerate(self.feasible):
            table[i, list(cfg)] = True
        ids = config_ids.to(torch.long).cpu()
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self.feasible)):
            raise ValueError(f"config_ids must be in [0, {len(self.feasible)}), got {ids.tolist()}")
        return table[ids].to(config_ids.device)

    def describe(self) -> str:
        """One character per layer: S = always-on SA, s = optional SA, C = CA, . = text-only."""
        out = []
        for i in range(self.num_layers):
            r = self.role(i)
            out.append("C" if r == "ca" else ("S" if i in self.always_on_sa else "s") if r == "sa" else ".")
        return "".join(out)


def schedule_to_dict(s: LayerSchedule) -> dict[str, Any]:
    """The schedule as visor.json stores it (a stage's weights/ directory and its checkpoints)."""
    return {"num_layers": s.num_layers, "ca_layers": list(s.ca_layers), "sa_layers": list(s.sa_layers),
            "always_on_sa": list(s.always_on_sa), "feasible": [list(c) for c in s.feasible]}


def schedule_from_dict(d: dict[str, Any]) -> LayerSchedule:
    return LayerSchedule(d["num_layers"], tuple(d["ca_layers"]), tuple(d["sa_layers"]), tuple(d["always_on_sa"]),
                         tuple(tuple(c) for c in d["feasible"]))
