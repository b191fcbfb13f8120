"""Metric registry: a metric is one small function plus one ``register`` call.

Each metric names the shared intermediate it needs — ``moments`` (one float64 pass over the
tensor) or ``spectrum`` (the matrix's singular values, computed once per matrix) — so the
expensive part is never repeated per metric. Parameters that change a metric's value (energy
level, rank tolerance, fit threshold) are bound at registration or from the config, and are part
of the store key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from ...config import Config
from ...errors import LayerscopeError

NEEDS = ("moments", "spectrum")


@dataclass(frozen=True)
class Metric:
    name: str
    needs: str
    group: str
    fn: Callable[..., Any] = field(compare=False)
    params: tuple[tuple[str, Any], ...] = ()
    integer: bool = False
    doc: str = ""
    certify: Callable[..., bool] | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        """Store key of the parameters (stable across runs)."""
        return json.dumps(dict(self.params), sort_keys=True)

    def __call__(self, intermediate: Any) -> Any:
        return self.fn(intermediate, **dict(self.params))

    def certified(self, spectrum: Any) -> bool:
        """Whether this metric's value from ``spectrum`` (whose singular values are each within
        ``spectrum.rel_err`` relative of the float64 answer) is within the 1e-4 promise — and, for
        an integer or a discrete choice, exactly the float64 one. A metric registered without a
        certificate accepts only the float64 route."""
        if getattr(spectrum, "rel_err", None) is None:
            return True
        return self.certify is not None and bool(self.certify(spectrum, **dict(self.params)))


@dataclass
class _Registration:
    name: str
    needs: str
    group: str
    fn: Callable[..., Any]
    params: dict[str, Any]
    from_config: dict[str, str]
    integer: bool
    per_energy_level: bool
    certify: Callable[..., bool] | None


_REGISTRATIONS: list[_Registration] = []


def register(name: str, needs: str, group: str, *, params: dict[str, Any] | None = None,
             from_config: dict[str, str] | None = None, integer: bool = False, per_energy_level: bool = False,
             certify: Callable[..., bool] | None = None):
    """Register ``fn(intermediate, **params)`` as metric ``name``.

    ``certify(spectrum, **params)`` (spectral metrics): True when the metric computed from a
    mixed-precision spectrum (relative bound ``spectrum.rel_err`` on every σ) is certainly within
    1e-4 of, and for discrete results equal to, the float64 value; without one, float64 is used.

    ``from_config`` maps a parameter to a Config field read when metrics are built.
    ``per_energy_level``: ``name`` contains ``{p}`` and one metric is made per configured level.
    """
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {NEEDS}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRATIONS.append(_Registration(name, needs, group, fn, dict(params or {}), dict(from_config or {}),
                                            integer, per_energy_level, certify))
        return fn

    return decorator


def level_tag(p: float) -> str:
    """0.9 -> "90", 0.995 -> "99_5": the column-name form of an energy level."""
    pct = round(p * 100, 6)
    return f"{pct:g}".replace(".", "_")


def all_metrics(config: Config | None = None) -> dict[str, Metric]:
    """Every metric available under ``config``, in column order."""
    config = config or Config()
    out: dict[str, Metric] = {}
    for reg in _REGISTRATIONS:
        base = dict(reg.params)
        for param, cfg_field in reg.from_config.items():
            base[param] = getattr(config, cfg_field)
        variants = [(reg.name.format(p=level_tag(p)), {**base, "p": p}) for p in config.energy_levels] \
            if reg.per_energy_level else [(reg.name, base)]
        for name, params in variants:
            out[name] = Metric(name, reg.needs, reg.group, reg.fn, tuple(sorted(params.items())), reg.integer,
                               (reg.fn.__doc__ or "").strip().splitlines()[0] if reg.fn.__doc__ else "",
                               reg.certify)
    return out


def select_metrics(config: Config) -> list[Metric]:
    """The metrics ``config.metrics`` asks for (names or groups), in column order; unknown names rejected."""
    available = all_metrics(config)
    if not config.metrics:
        return list(available.values())
    groups = {g for m in available.values() for g in (m.group,)} | {"all"}
    wanted: set[str] = set()
    for item in config.metrics:
        if item == "all":
            wanted |= set(available)
        elif item in groups:
            wanted |= {n for n, m in available.items() if m.group == item}
        elif item in available:
            wanted.add(item)
        else:
            raise LayerscopeError(
                f"unknown metric {item!r} (known: {', '.join(available)}; groups: {', '.join(sorted(groups))})"
            )
    return [m for n, m in available.items() if n in wanted]
