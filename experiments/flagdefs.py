"""absl flags derived from the library's config dataclasses (each default is written once).

A field becomes a flag of the same name, its default the field's default, its help the field's
`metadata['help']` (enum choices from `metadata['choices']`). Tuples become comma lists and are
parsed back to the field's element type. Nested dataclass fields are skipped (define them from
their own class).
"""
from __future__ import annotations

import dataclasses
import sys
import typing

from absl import flags

_SCALARS = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
            bool: flags.DEFINE_bool}


def _fields(cls, skip):
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    kind = hints[f.name]
    if f.name in skip or dataclasses.is_dataclass(kind):
      continue
    yield f, kind


def define(cls, skip: tuple[str, ...] = (), overrides: dict | None = None) -> None:
  """Defines one flag per field of dataclass `cls` (minus `skip`); `overrides` replaces
  defaults for this app (e.g. an app whose natural default differs)."""
  overrides = overrides or {}
  caller = sys._getframe(1).f_globals.get('__name__', '')
  # Listed under the calling app in --help (absl names the main module by its file).
  module = sys.argv[0] if caller == '__main__' else caller
  for f, kind in _fields(cls, skip):
    default = overrides.get(f.name, f.default)
    help_text = f.metadata.get('help', f.name)
    choices = f.metadata.get('choices')
    if typing.get_origin(kind) is tuple:
      flags.DEFINE_list(f.name, [str(v) for v in default], help_text, module_name=module)
    elif choices:
      flags.DEFINE_enum(f.name, default, list(choices), help_text, module_name=module)
    elif kind in _SCALARS:
      _SCALARS[kind](f.name, default, help_text, module_name=module)
    else:
      raise TypeError(f'{cls.__name__}.{f.name}: no flag type for {kind}.')


def build(cls, values: flags.FlagValues, skip: tuple[str, ...] = (), **given):
  """An instance of `cls` from the flags `define(cls)` made; `given` sets the skipped fields."""
  kwargs = dict(given)
  for f, kind in _fields(cls, skip):
    value = values[f.name].value
    if typing.get_origin(kind) is tuple:
      item = typing.get_args(kind)[0]
      value = tuple(item(v) for v in value)
    kwargs[f.name] = value
  return cls(**kwargs)
