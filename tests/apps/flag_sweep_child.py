"""Driver of test_flag_sweep: runs one app on many command lines, each in a forked child.

  python tests/apps/flag_sweep_child.py APP SPEC.json OUT.json

SPEC: {"base": [args], "strings": {flag: [[value, [extra args]], ...]}, "exempt": [flags],
"tmp": dir}. Generated bad values per flag type (ints: -1 and a word; floats: nan and -1;
enums: an unknown name; bools: a non-boolean; lists: an unknown name and -1); string flags
take their values from SPEC (paths cannot be judged by type). Each case runs the app exactly
as `python -m experiments.APP` would (flagdefs.run(main)) with stderr to a file; the parent
imports the app (and jax) once, so a case costs a fork, not an interpreter start. OUT gets, per
case, the flag, the command line, the exit code and stderr.
"""
import importlib
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 60.0

GENERATED = {'IntegerParser': ['-1', 'seven'], 'FloatParser': ['nan', '-1'],
             'EnumParser': ['nope'], 'BooleanParser': ['maybe'], 'ListParser': ['nope', '-1']}


def cases(module, spec):
  from absl import flags
  tmp = spec['tmp']
  with open(os.path.join(tmp, 'bad.flags'), 'w') as f:   # a flagfile with an unknown flag
    f.write('--no_such_flag_in_file=1\n')
  out = [('no_such_flag', ['--no_such_flag=1']),
         ('flagfile', [f'--flagfile={tmp}/missing.flags']), ('flagfile', [f'--flagfile={tmp}']),
         ('no_such_flag_in_file', [f'--flagfile={tmp}/bad.flags'])]
  for f in flags.FLAGS.get_flags_for_module(module.__name__):
    if f.name in spec['exempt']:
      continue
    kind = type(f.parser).__name__
    if kind in GENERATED:
      out += [(f.name, [f'--{f.name}={v}']) for v in GENERATED[kind]]
    for value, extra in spec['strings'].get(f.name, []):
      out.append((f.name, list(extra) + [f'--{f.name}={value.format(tmp=spec["tmp"])}']))
  return out


def run_case(module, flagdefs, argv, err_path):
  pid = os.fork()
  if pid == 0:   # the child: the app, as its __main__ runs it
    code = 1
    try:
      fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      os.dup2(fd, 2)
      os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
      sys.argv = argv
      flagdefs.run(module.main)
      code = 0
    except SystemExit as e:
      if isinstance(e.code, str):
        sys.stderr.write(e.code + '\n')
        code = 1
      else:
        code = e.code or 0
    except BaseException:
      traceback.print_exc()
    sys.stderr.flush()
    os._exit(code)
  start = time.time()
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    if time.time() - start > TIMEOUT_S:
      os.kill(pid, 9)
      os.waitpid(pid, 0)
      return 'timeout'
    time.sleep(0.005)


def main(app_name, spec_path, out_path):
  sys.path.insert(0, ROOT)
  os.chdir(ROOT)
  spec = json.load(open(spec_path))
  import jax  # noqa: F401  (imported once here, before any fork; no backend started)
  module = importlib.import_module(f'experiments.{app_name}')
  from absl import flags
  from experiments import flagdefs
  results = []
  for i, (flag, args) in enumerate(cases(module, spec)):
    argv = [f'experiments/{app_name}.py'] + spec['base'] + args
    err = os.path.join(spec['tmp'], f'case_{i}.err')
    code = run_case(module, flagdefs, argv, err)
    results.append({'flag': flag, 'argv': argv[1:], 'code': code, 'stderr': open(err).read()})
  app_flags = [f.name for f in flags.FLAGS.get_flags_for_module(module.__name__)]
  json.dump({'flags': app_flags, 'results': results}, open(out_path, 'w'), indent=1)


if __name__ == '__main__':
  main(*sys.argv[1:])
