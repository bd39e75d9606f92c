"""Field checks of the config dataclasses, declared beside each field and run when a config is
built (apps, library calls and configs restored from JSON all get the same one-line message,
which names the flag, since flags take the fields' names: `experiments/flagdefs.py`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional
from lps_jax.common.errors import UserError


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


def problem(rule: Range, value, help_text: str = '') -> Optional[str]:
  """What is wrong with `value` (a number or a tuple) under `rule`, or None: 'must be ...'."""
  items = value if isinstance(value, (tuple, list)) else (value,)
  why = help_text.split('. ')[0].rstrip('.')
  why = f' ({why})' if why else ''
  if isinstance(value, (tuple, list)) and rule.nonempty and not items:
    return f'is empty: give at least one value, {rule.text()} each{why}.'
  if not all(rule.ok(v) for v in items):
    each = ' each' if isinstance(value, (tuple, list)) else ''
    return f'must be {rule.text()}{each}{why}.'
  return None


def check(config) -> None:
  """Raises ValueError('--name=value: must be ...') for the first field that breaks its rule."""
  for f in dataclasses.fields(config):
    rule = f.metadata.get('valid')
    if rule is None:
      continue
    value = getattr(config, f.name)
    message = problem(rule, value, f.metadata.get('help', ''))
    if message:
      shown = ','.join(str(v) for v in value) if isinstance(value, tuple) else value
      raise UserError(f'--{f.name}={shown}: {message}')
