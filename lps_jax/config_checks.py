"""Field checks of the config dataclasses, declared beside each field and run when a config is
built (apps, library calls and configs restored from JSON all get the same one-line message,
which names the flag, since flags take the fields' names: `experiments/flagdefs.py`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Range:
  """A number (or each item of a tuple) within [lo, hi] (or (lo, hi) with open=True)."""
  lo: Optional[float] = None
  hi: Optional[float] = None
  integer: bool = False
  open: bool = False
  nonempty: bool = False   # tuples: at least one item

  def ok(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    if self.integer and not float(v).is_integer():
      return False
    if not math.isfinite(v):
      return False
    if self.lo is not None and (v <= self.lo if self.open else v < self.lo):
      return False
    return self.hi is None or (v < self.hi if self.open else v <= self.hi)

  def text(self) -> str:
    kind = 'an integer' if self.integer else 'a finite number'
    if self.lo is not None and self.hi is not None:
      l, r = ('(', ')') if self.open else ('[', ']')
      return f'{kind} in {l}{self.lo:g}, {self.hi:g}{r}'
    if self.lo is not None:
      return f'{kind} {">" if self.open else ">="} {self.lo:g}'
    return kind


def valid(rule: Range, help_text: str, **extra) -> dict:
  """Field metadata: its help text and the rule `check` enforces."""
  return {'help': help_text, 'valid': rule, **extra}


def check(config) -> None:
  """Raises ValueError('--name=value: must be ...') for the first field that breaks its rule."""
  for f in dataclasses.fields(config):
    rule = f.metadata.get('valid')
    if rule is None:
      continue
    value = getattr(config, f.name)
    items = value if isinstance(value, tuple) else (value,)
    shown = ','.join(str(v) for v in items) if isinstance(value, tuple) else value
    if isinstance(value, tuple) and rule.nonempty and not items:
      raise ValueError(f'--{f.name} is empty: give at least one value ({rule.text()} each).')
    for v in items:
      if not rule.ok(v):
        each = ' each' if isinstance(value, tuple) else ''
        raise ValueError(f'--{f.name}={shown}: must be {rule.text()}{each} '
                         f'({f.metadata.get("help", "").split(". ")[0].rstrip(".")}).')
