# Sourced by scripts/serve and scripts/test: a virtualenv in .venv with requirements.txt
# installed, reinstalled only when requirements.txt changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv with $("$PYTHON" --version)…"
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.requirements-$(sha256sum requirements.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "Installing requirements…"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
    rm -f .venv/.requirements-*
    touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
