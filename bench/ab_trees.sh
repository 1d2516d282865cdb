#!/bin/bash
# A/B of two source trees on the same recipes and files, alternating: wall, CPU, peak RSS per run.
#   bench/ab_trees.sh OLD_SRC NEW_SRC RECIPE.yml [RECIPE.yml ...]
# e.g. OLD_SRC from `git worktree add /tmp/old <commit>` -> /tmp/old/src; NEW_SRC: src
set -eu
old=$1; new=$2; shift 2
py=${PYTHON:-.venv/bin/python}
out=$(mktemp -d)
for rep in 1 2; do
  for r in "$@"; do
    for side in old new; do
      src=$old; [ "$side" = new ] && src=$new
      rm -rf "$out/o" "$out/o.partial"
      env -u MALLOC_ARENA_MAX PYTHONPATH="$src" /usr/bin/time -f "$rep $(basename "$r") $side %e s wall %U user %S sys %M KB" \
        "$py" -m mergesmith run "$r" "$out/o" --seed 1 -q 2>&1 | tail -1
    done
  done
done
rm -rf "$out"
