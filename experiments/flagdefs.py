"""absl flags derived from the library's config dataclasses (each default is written once).

A field becomes a flag of the same name, its default the field's default, its help the field's
`metadata['help']` (enum choices from `metadata['choices']`). Tuples become comma lists and are
parsed back to the field's element type. Nested dataclass fields are skipped (define them from
their own class).

Every flag is checked when the command line is parsed, before any import of jax or compile:
the fields' rules (`lps_jax.common.checks`) become absl validators, and the apps declare the
rest of their flags' rules with `check`, `names`, `parsed`, `input_path` and `output_path`.
`run(main)` starts an app so that any flag error is one line on stderr (`error: flag --x=...:
...`) and exit code 2, never a traceback.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import typing
from typing import Callable, Collection, Optional

from absl import app, flags

from lps_jax.common import checks as config_checks
from lps_jax.common.errors import UserError

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
    if 'valid' in f.metadata:
      item = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else None
      check(f.name, f.metadata['valid'], item=item)


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


def check(name: str, rule: config_checks.Range, item: Optional[type] = None) -> None:
  """Flag `name` (a number, or with `item` a list of them) must satisfy `rule`."""
  help_text = flags.FLAGS[name].help

  def checker(value):
    if value is None:
      return True
    if item is not None:
      try:
        value = tuple(item(v) for v in value)
      except ValueError:
        raise flags.ValidationError(f'must be {rule.text()} each.')
    message = config_checks.problem(rule, value, help_text)
    if message:
      raise flags.ValidationError(message)
    return True
  flags.register_validator(name, checker)


def names(name: str, known: Collection[str], what: str) -> None:
  """Each item of list flag `name` must be one of `known`."""
  def checker(value):
    unknown = [v for v in value or () if v not in known]
    if unknown:
      raise flags.ValidationError(f'unknown {what} {unknown[0]!r}; choose from '
                                  f'{", ".join(known)}.')
    return True
  flags.register_validator(name, checker)


def parsed(name: str, parse: Callable) -> None:
  """`parse(value)` must not raise ValueError (its message becomes the flag's error)."""
  def checker(value):
    if value is None:
      return True
    try:
      parse(value)
    except ValueError as e:
      raise flags.ValidationError(str(e))
    return True
  flags.register_validator(name, checker)


def _path_problem(path: str, kind: str) -> Optional[str]:
  if kind == 'dir' and not os.path.isdir(path):
    return f'{path} is not a folder.'
  if kind == 'file' and not os.path.isfile(path):
    return f'{path} is not a file.'
  return None


def input_path(name: str, kind: str = 'any', must_exist: bool = True,
               when: Optional[Callable[[flags.FlagValues], bool]] = None, hint: str = '') -> None:
  """Flag `name`, when set (and `when(FLAGS)` holds), names an existing file / folder ('any':
  either); with must_exist=False it may be missing but not of the other kind. `hint` follows
  the error (what to do)."""
  def checker(value):     # a path, or a list flag's paths
    if not value or (when is not None and not when(flags.FLAGS)):
      return True
    for path in value if isinstance(value, list) else [value]:
      if not os.path.exists(path):
        if must_exist:
          which = f'{path}: ' if isinstance(value, list) else ''   # a list: say which item
          raise flags.ValidationError(f'{which}not found.{" " + hint if hint else ""}')
        continue
      message = _path_problem(path, kind)
      if message:
        raise flags.ValidationError(message)
    return True
  flags.register_validator(name, checker)


def output_path(name: str, kind: str = 'file',
                when: Optional[Callable[[flags.FlagValues], bool]] = None) -> None:
  """Flag `name`, when set, is a file (kind='file') or folder ('dir') this app may create or
  overwrite: if it exists it is of that kind, and its nearest existing parent is a writable
  folder. Checks only; nothing is created."""
  def checker(value):
    if not value or (when is not None and not when(flags.FLAGS)):
      return True
    path = os.path.abspath(value.split('{')[0] if '{' in value else value)
    if os.path.exists(path) and '{' not in value:
      message = _path_problem(path, kind)
      if message:
        raise flags.ValidationError(message + ' Choose another path.')
    parent = os.path.dirname(path) if not os.path.isdir(path) else path
    while parent and not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise flags.ValidationError(f'{parent} is a file, so nothing can be written under it.')
    if not os.access(parent, os.W_OK | os.X_OK):
      raise flags.ValidationError(f'{parent} is not writable by this user.')
    return True
  flags.register_validator(name, checker)


def host_port(value: str) -> None:
  """Raises ValueError unless `value` is host:port with a port in 1-65535."""
  host, _, port = value.rpartition(':')
  if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise UserError('must be host:port, e.g. 10.0.0.1:1234.')


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = ' '.join(str(e).split()).removeprefix('ERROR:: ')
    if message.startswith('Unable to open flagfile'):
      message = '--flagfile: ' + message.replace('Unable to open flagfile: ', 'cannot read it: ')
    sys.stderr.write(f'error: {message} (--helpfull lists the flags)\n')
    sys.exit(2)


def run(main: Callable) -> None:
  """app.run with flag errors as one line on stderr and exit code 2."""
  app.run(main, flags_parser=_parse_flags)
