#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html, warnings as errors.
# The build fails when a name of adahessian_optax.__all__ is missing from the
# API reference or has no docstring (docs/_ext/aho_api.py).
#
#   bash docs/build.sh                  # HTML site
#   bash docs/build.sh --doctest        # also run the doctests of the package
#                                       # and of the guides (docs/*.md)
set -euo pipefail
cd "$(dirname "$0")/.."

doctest=0
for arg in "$@"; do
  case "$arg" in
    --doctest) doctest=1 ;;
    *) echo "usage: bash docs/build.sh [--doctest]" >&2; exit 2 ;;
  esac
done

# -E: fresh environment, so that every page (and the __all__ check) is redone.
python -m sphinx -W --keep-going -E -b html docs docs/_build/html

if [ "$doctest" = 1 ]; then
  python -m pytest -q -p no:cacheprovider --doctest-modules adahessian_optax \
    --doctest-glob='*.md' docs/*.md
fi
